"""Test setup: 8 fake CPU devices stand in for a pod slice's mesh.

The flag must be set before jax is first imported, so it lives here rather than in each test.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# Tests that need a system tool skip, naming its package, where it is missing; CI (.ci/run, which
# installs the tools) sets K15_REQUIRE_TOOLS=1 so that a missing tool fails instead.
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position

import gc  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REQUIRE_TOOLS_ENV = "K15_REQUIRE_TOOLS"


def missing_tool(reason: str) -> None:
  """Skips the calling test for `reason`, or fails it when K15_REQUIRE_TOOLS=1."""
  if os.environ.get(REQUIRE_TOOLS_ENV, "") == "1":
    pytest.fail(f"{reason} ({REQUIRE_TOOLS_ENV}=1: required here)", pytrace=False)
  pytest.skip(reason)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  XLA:CPU maps each compiled executable into memory in a dozen or so regions and keeps it while
  jax's caches hold it. One process running the whole suite compiles thousands of programs and,
  without this, runs past the kernel's limit on memory maps (vm.max_map_count, 65530 by default),
  where the next compile segfaults. Modules share no programs, so nothing is recompiled for it.
  """
  yield
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def sandbox():
  """The code sandbox (Debian package bubblewrap) works on this machine."""
  from k15.rewards import code  # pylint: disable=g-import-not-at-top
  try:
    return code.isolation_mechanism()
  except code.SandboxUnavailableError as e:
    missing_tool(f"the code sandbox needs the package bubblewrap (apt-get install bubblewrap) "
                 f"and user namespaces: {e}")


@pytest.fixture
def shellcheck():
  """The shellcheck binary (Debian package shellcheck)."""
  path = shutil.which("shellcheck")
  if path is None:
    missing_tool("shellcheck is not installed (Debian/Ubuntu package shellcheck: "
                 "apt-get install shellcheck)")
  return path
