"""Tests that need bubblewrap or shellcheck skip without them, naming the package, and fail
instead when K15_REQUIRE_TOOLS=1 (CI, which installs both)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pytest_without_tools(test_id: str, require: bool) -> subprocess.CompletedProcess:
  # An empty PATH hides bwrap and shellcheck (python is called by its full path).
  env = dict(os.environ, PATH=os.path.join(ROOT, "no-such-dir"), PYTHONPATH=ROOT)
  env.pop("K15_REQUIRE_TOOLS", None)
  if require:
    env["K15_REQUIRE_TOOLS"] = "1"
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
                         test_id], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("test_id, package", [
    ("tests/test_sandbox.py::test_honest_programs_pass", "bubblewrap"),
    ("tests/test_launch.py::test_shellcheck_is_clean", "shellcheck"),
])
def test_missing_tool_skips_naming_the_package_or_fails_in_ci(test_id, package):
  r = _pytest_without_tools(test_id, require=False)
  assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
  assert f"package {package}" in r.stdout
  r = _pytest_without_tools(test_id, require=True)
  # A fixture's failure is reported as an error, the test's own as a failure: both fail the run.
  assert r.returncode == 1 and ("1 failed" in r.stdout or "1 error" in r.stdout), (
      r.stdout[-2000:] + r.stderr[-2000:])
  assert f"package {package}" in r.stdout and "K15_REQUIRE_TOOLS=1" in r.stdout
