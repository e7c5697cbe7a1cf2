"""Tests for launch/, the gcloud TPU VM scripts (issue 7, section 2).

The scripts run against a fake `gcloud` on PATH that appends each call's arguments to a log (one
JSON array per line). The fake can also play the TPU VM's workers: `tpu-vm ssh` then runs the
`--command` string with bash in one temporary home directory per worker, and `tpu-vm scp` copies
into or out of those homes, so that setup.sh, run.sh (and the worker.sh it calls) and logs.sh are
exercised end to end: code copied, background runs started and stopped, logs fetched.
"""
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("create.sh", "setup.sh", "run.sh", "logs.sh", "delete.sh")

NAME = "k15-test"
WHERE = ["--zone=us-central2-b", "--project=my-proj"]
TPU_ENV = {
    "TPU_NAME": NAME,
    "ZONE": "us-central2-b",
    "PROJECT": "my-proj",
    "ACCELERATOR_TYPE": "v4-8",
}
WORKDIR = "gs://my-bucket/k15/exp1"

# The fake gcloud. It is only as clever as the scripts need: the flags it reads are the ones a
# user would type (--worker, --command, --recurse).
FAKE_GCLOUD = """#!{python}
import json, os, pathlib, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
group = args[:4]
flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
positional = [a for a in args[4:] if not a.startswith("--")]

def workers():
  if "FAKE_WORKERS" not in os.environ:
    return []
  homes = sorted(pathlib.Path(os.environ["FAKE_WORKERS"]).iterdir())
  which = flags.get("worker", "0")
  return list(enumerate(homes)) if which == "all" else [(int(which), homes[int(which)])]

if group == ["compute", "tpus", "queued-resources", "describe"]:
  states = pathlib.Path(os.environ["FAKE_STATES"])
  pending = states.read_text().split() if states.exists() else []
  states.write_text("\\n".join(pending[1:]))
  print(pending[0] if pending else "ACTIVE")
elif group == ["compute", "tpus", "tpu-vm", "scp"]:
  *sources, dest = positional
  for _, home in workers():
    if ":" in dest:  # local -> worker
      for src in sources:
        shutil.copy(src, home / dest.split(":", 1)[1])
    else:  # worker -> local, scp -r into an existing directory
      for src in sources:
        remote = home / src.split(":", 1)[1]
        shutil.copytree(remote, pathlib.Path(dest) / remote.name, dirs_exist_ok=True)
elif group == ["compute", "tpus", "tpu-vm", "ssh"]:
  for index, home in workers():
    env = dict(HOME=str(home), TPU_WORKER_ID=str(index), PATH=os.environ["FAKE_WORKER_PATH"],
               FAKE_TEMPLATES=os.environ["FAKE_TEMPLATES"])
    done = subprocess.run(["bash", "-c", flags["command"]], cwd=home, env=env)
    if done.returncode:
      sys.exit(done.returncode)
"""

# A worker's system python3: records its calls; `-m uv venv ... DIR` makes a stand-in venv.
FAKE_SYSTEM_PYTHON = """#!{python}
import os, pathlib, shutil, sys

with open(pathlib.Path.home() / "python3.log", "a") as f:
  f.write(os.getcwd() + ": " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:4] == ["-m", "uv", "venv"]:
  venv = pathlib.Path(sys.argv[-1])
  (venv / "bin").mkdir(parents=True)
  for tool in ("python", "pip"):
    shutil.copy(pathlib.Path(os.environ["FAKE_TEMPLATES"], tool), venv / "bin" / tool)
"""

# The venv's pip: records its calls.
FAKE_PIP = """#!{python}
import os, pathlib, sys

with open(pathlib.Path.home() / "pip.log", "a") as f:
  f.write(os.getcwd() + ": " + " ".join(sys.argv[1:]) + "\\n")
"""

# The venv's python, standing in for `python -m k15.main`: reports what it was given, then waits
# while ~/hold exists (to test runs that are still going).
FAKE_K15_MAIN = """#!{python}
import json, os, pathlib, sys, time

print("K15_MAIN " + json.dumps({{
    "argv": sys.argv[1:], "K15_DISTRIBUTED": os.environ.get("K15_DISTRIBUTED"),
    "LIBTPU_INIT_ARGS": os.environ.get("LIBTPU_INIT_ARGS"),
    "cwd": os.getcwd(), "VIRTUAL_ENV": os.environ.get("VIRTUAL_ENV")}}))
deadline = time.time() + 60
while pathlib.Path.home().joinpath("hold").exists() and time.time() < deadline:
  time.sleep(0.05)
"""


def _write_exe(path: pathlib.Path, text: str) -> None:
  path.write_text(text.format(python=sys.executable))
  path.chmod(0o755)


class FakeCloud:
  """A fake gcloud on PATH, its call log, and optionally simulated TPU VM workers."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.bin = root / "bin"
    self.bin.mkdir()
    _write_exe(self.bin / "gcloud", FAKE_GCLOUD)
    self.log = root / "gcloud.log"
    self.states = root / "states"
    self.home = root / "home"  # this laptop's home, so nothing touches the real one
    self.home.mkdir()
    self.workers = []
    self.env = {
        "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(self.home),
        "LANG": "C.UTF-8",
        "FAKE_GCLOUD_LOG": str(self.log),
        "FAKE_STATES": str(self.states),
        # git stash create makes a commit, which needs an identity.
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        **TPU_ENV,
    }

  def add_workers(self, count: int) -> None:
    """Simulates a TPU VM slice with `count` workers, each an empty home directory."""
    worker_bin = self.root / "worker_bin"
    templates = self.root / "templates"
    worker_bin.mkdir()
    templates.mkdir()
    _write_exe(worker_bin / "python3", FAKE_SYSTEM_PYTHON)
    _write_exe(templates / "python", FAKE_K15_MAIN)
    _write_exe(templates / "pip", FAKE_PIP)
    for i in range(count):
      home = self.root / "workers" / f"worker-{i}"
      home.mkdir(parents=True)
      self.workers.append(home)
    self.env.update(
        FAKE_WORKERS=str(self.root / "workers"),
        FAKE_TEMPLATES=str(templates),
        FAKE_WORKER_PATH=f"{worker_bin}{os.pathsep}{os.environ['PATH']}",
    )

  def run(self, script: str, *args: str, ok: bool = True,
          **env: str) -> subprocess.CompletedProcess:
    full_env = {**self.env, **env}
    for key, value in env.items():
      if value is None:
        del full_env[key]
    done = subprocess.run(
        [str(LAUNCH / script), *args], env=full_env, cwd=self.root,
        capture_output=True, text=True, timeout=60)
    if ok:
      assert done.returncode == 0, f"{script} {args} failed:\n{done.stderr}"
    return done

  def calls(self) -> list[list[str]]:
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def clear(self) -> None:
    self.log.unlink(missing_ok=True)

  def stop_everything(self) -> None:
    """Ends any run left going by a test: its process group, recorded in the pid files."""
    for home in self.workers:
      (home / "hold").unlink(missing_ok=True)
      for pid_file in home.glob("k15_logs/*/*.pid"):
        try:
          os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
          pass


@pytest.fixture
def cloud(tmp_path):
  fake = FakeCloud(tmp_path)
  yield fake
  fake.stop_everything()


@pytest.fixture
def local_repo(tmp_path):
  """A local checkout holding launch/, with one uncommitted edit and one untracked file."""
  repo = tmp_path / "checkout"
  shutil.copytree(LAUNCH, repo / "launch")
  (repo / "k15").mkdir()
  (repo / "k15" / "__init__.py").write_text("")
  (repo / "README.md").write_text("committed\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
  subprocess.run([*git, "init", "-q"], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "init"], check=True)
  (repo / "README.md").write_text("edited, not committed\n")
  (repo / "scratch.txt").write_text("untracked\n")
  return repo


def _wait_for(predicate, what: str, timeout: float = 15.0) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.05)


def _printed_commands(stdout: str) -> list[list[str]]:
  """The `+ ...` lines of a dry run, parsed as a shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------------------------
# create.sh

@pytest.mark.parametrize("env, pricing", [
    ({}, []),
    ({"SPOT": "1"}, ["--spot"]),
    ({"PREEMPTIBLE": "1"}, ["--preemptible"]),
])
def test_create_tpu_vm(cloud, env, pricing):
  cloud.run("create.sh", **env)
  assert cloud.calls() == [[
      "compute", "tpus", "tpu-vm", "create", NAME, *WHERE,
      "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", *pricing]]


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_default_runtime_version(cloud, accelerator, version):
  cloud.run("create.sh", ACCELERATOR_TYPE=accelerator)
  cloud.run("create.sh", ACCELERATOR_TYPE=accelerator, RUNTIME_VERSION="my-version")
  first, second = cloud.calls()
  assert f"--accelerator-type={accelerator}" in first
  assert f"--version={version}" in first
  assert "--version=my-version" in second


def test_create_queued_resource_waits_until_active(cloud):
  cloud.states.write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
  done = cloud.run("create.sh", "--", "--reserved", QUEUED="1", SPOT="1",
                   ACCELERATOR_TYPE="v5p-64", POLL_SECONDS="0")
  describe = ["compute", "tpus", "queued-resources", "describe", NAME, *WHERE,
              "--format=value(state.state)"]
  assert cloud.calls() == [
      ["compute", "tpus", "queued-resources", "create", NAME, *WHERE, f"--node-id={NAME}",
       "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot", "--reserved"],
      describe, describe, describe]
  assert "WAITING_FOR_RESOURCES" in done.stderr and "ACTIVE" in done.stderr


def test_create_queued_resource_no_wait_and_own_id(cloud):
  cloud.run("create.sh", "--no-wait", QUEUED="1", QR_ID="my-request")
  (call,) = cloud.calls()
  assert call[:5] == ["compute", "tpus", "queued-resources", "create", "my-request"]
  assert f"--node-id={NAME}" in call


@pytest.mark.parametrize("state", ["FAILED", "SUSPENDED"])
def test_create_queued_resource_that_fails(cloud, state):
  cloud.states.write_text(f"WAITING_FOR_RESOURCES\n{state}\n")
  done = cloud.run("create.sh", QUEUED="1", POLL_SECONDS="0", ok=False)
  assert done.returncode != 0
  assert state in done.stderr
  assert len(cloud.calls()) == 3  # create, then two checks


@pytest.mark.parametrize("env, words", [
    ({"ACCELERATOR_TYPE": "v9x-8"}, ["RUNTIME_VERSION", "v9x-8"]),
    ({"SPOT": "1", "PREEMPTIBLE": "1"}, ["SPOT", "PREEMPTIBLE"]),
    ({"QUEUED": "1", "PREEMPTIBLE": "1"}, ["PREEMPTIBLE", "SPOT=1"]),
    ({"SPOT": "maybe"}, ["SPOT", "maybe"]),
])
def test_create_refuses_bad_settings(cloud, env, words):
  done = cloud.run("create.sh", ok=False, **env)
  assert done.returncode != 0
  for word in words:
    assert word in done.stderr
  assert cloud.calls() == []


# ---------------------------------------------------------------------------------------------
# Every script: required variables, --help, --dry-run.

@pytest.mark.parametrize("script, variable", [
    *[(script, var) for script in SCRIPTS for var in ("TPU_NAME", "ZONE", "PROJECT")],
    ("create.sh", "ACCELERATOR_TYPE"),
    ("run.sh", "WORKDIR"),
])
def test_missing_variable_is_named(cloud, local_repo, script, variable):
  env = {"WORKDIR": WORKDIR, "LOCAL_DIR": str(local_repo), variable: None}
  done = cloud.run(script, ok=False, **env)
  assert done.returncode != 0
  assert variable in done.stderr
  assert cloud.calls() == []


@pytest.mark.parametrize("script", [*SCRIPTS, "worker.sh"])
def test_help_lists_usage_and_variables(cloud, script):
  done = cloud.run(script, "--help", TPU_NAME=None, ZONE=None, PROJECT=None)
  assert done.stdout.startswith("Usage: launch/" + script)
  expected = {
      "create.sh": ["ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "PREEMPTIBLE", "QUEUED"],
      "setup.sh": ["LOCAL_DIR", "REPO_URL", "BRANCH", "PYTHON_VERSION"],
      "run.sh": ["WORKDIR", "RUN_NAME", "K15_DISTRIBUTED", "--dry-run", "COMPILATION_CACHE_DIR",
                 "LIBTPU_INIT_ARGS"],
      "logs.sh": ["RUN_NAME", "--fetch", "--worker"],
      "delete.sh": ["--quiet", "QUEUED"],
      "worker.sh": ["K15_VENV", "K15_LOG_ROOT", "TPU_WORKER_ID"],
  }[script]
  if script != "worker.sh":
    expected += ["TPU_NAME", "ZONE", "PROJECT", "DRY_RUN"]
  for word in expected:
    assert word in done.stdout, word
  assert cloud.calls() == []


DRY_RUN_CASES = {
    "create": ("create.sh", [], {"SPOT": "1"}),
    "create_queued": ("create.sh", [], {"QUEUED": "1", "SPOT": "1"}),
    "setup_copy": ("setup.sh", [], {}),
    "setup_clone": ("setup.sh", [], {"REPO_URL": "https://github.com/me/k15.git",
                                     "BRANCH": "dev"}),
    "run": ("run.sh", ["--config=configs/tiny_cpu.py", "--config.note=it's a test"], {}),
    "run_stop": ("run.sh", ["--stop"], {}),
    "logs": ("logs.sh", ["--worker=1"], {}),
    "logs_fetch": ("logs.sh", ["--fetch=fetched"], {}),
    "delete": ("delete.sh", [], {}),
    "delete_queued": ("delete.sh", [], {"QUEUED": "1"}),
}


@pytest.mark.parametrize("case", DRY_RUN_CASES)
def test_dry_run_prints_the_commands_it_would_run(cloud, local_repo, case):
  script, args, env = DRY_RUN_CASES[case]
  env = {**env, "WORKDIR": WORKDIR, "LOCAL_DIR": str(local_repo)}
  dry = cloud.run(script, "--dry-run", *args, **env)
  assert cloud.calls() == []  # nothing ran
  assert not (cloud.root / "fetched").exists()
  again = cloud.run(script, *args, DRY_RUN="1", **env)
  assert _stable(again.stdout) == _stable(dry.stdout)
  real = cloud.run(script, *args, **env)

  printed = [cmd[1:] for cmd in _printed_commands(_stable(dry.stdout)) if cmd[0] == "gcloud"]
  # The real run echoes each command on stderr the same way.
  echoed = [cmd[1:] for cmd in _printed_commands(_stable(real.stderr)) if cmd[0] == "gcloud"]
  recorded = [shlex.split(_stable(shlex.join(call))) for call in cloud.calls()]
  assert recorded, "no gcloud call"
  assert printed == recorded
  assert echoed == recorded


def _stable(text: str) -> str:
  """Text with what differs between two runs of setup.sh replaced: the temporary directory of
  the tarball and the snapshot commit of the working tree (its hash holds a time stamp)."""
  text = re.sub(r"/[^ ']*/k15\.tar\.gz", "TMP/k15.tar.gz", text)
  return re.sub(r"\b[0-9a-f]{40}\b", "COMMIT", text)


# ---------------------------------------------------------------------------------------------
# setup.sh, run.sh, logs.sh, delete.sh against simulated workers.

def _setup_two_workers(cloud, local_repo):
  cloud.add_workers(2)
  return cloud.run("setup.sh", LOCAL_DIR=str(local_repo))


def test_setup_copies_the_working_tree_and_installs(cloud, local_repo):
  done = _setup_two_workers(cloud, local_repo)
  scp, ssh = cloud.calls()
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert scp[4].endswith("/k15.tar.gz") and scp[5:] == [f"{NAME}:k15.tar.gz", "--worker=all",
                                                          *WHERE]
  assert ssh[:8] == ["compute", "tpus", "tpu-vm", "ssh", NAME, "--worker=all", *WHERE]
  assert "pip install --quiet -e '.[tpu]' gcsfs" in ssh[8]
  assert "1 untracked file(s)" in done.stderr
  for home in cloud.workers:
    code = home / "k15"
    assert (code / "README.md").read_text() == "edited, not committed\n"
    assert (code / "launch" / "worker.sh").is_file()
    assert not (code / "scratch.txt").exists()
    assert sorted(p.name for p in home.iterdir()) == [
        "k15", "k15_venv", "pip.log", "python3.log"]  # no tarball or staging directory left
    assert f"{code}: install --quiet -e .[tpu] gcsfs" in (home / "pip.log").read_text()
    assert "-m uv venv --seed --python 3.11" in (home / "python3.log").read_text()

  # Again after an edit: the code is replaced and the virtual environment kept.
  (local_repo / "README.md").write_text("second edit\n")
  (cloud.workers[0] / "k15_venv" / "marker").write_text("")
  cloud.run("setup.sh", LOCAL_DIR=str(local_repo))
  for home in cloud.workers:
    assert (home / "k15" / "README.md").read_text() == "second edit\n"
    assert (home / "python3.log").read_text().count("uv venv") == 1
  assert (cloud.workers[0] / "k15_venv" / "marker").exists()


def test_setup_clones_repo_url(cloud):
  cloud.run("setup.sh", REPO_URL="https://github.com/me/k15.git", BRANCH="rl-v2")
  (ssh,) = cloud.calls()
  command = ssh[-1]
  assert ssh[:-1] == ["compute", "tpus", "tpu-vm", "ssh", NAME, "--worker=all", *WHERE]
  assert command.startswith(
      "--command=rm -rf k15.new && "
      "git clone --depth=1 --branch=rl-v2 https://github.com/me/k15.git k15.new && "
      "rm -rf k15 && mv k15.new k15 && cd k15 && ")
  assert command.endswith("pip install --quiet -e '.[tpu]' gcsfs")


def _log(home: pathlib.Path, run: str = "exp1") -> pathlib.Path:
  return home / "k15_logs" / run / f"worker-{home.name.split('-')[1]}.log"


def _k15_main_report(log: pathlib.Path) -> dict:
  (line,) = [l for l in log.read_text().splitlines() if l.startswith("K15_MAIN ")]
  return json.loads(line[len("K15_MAIN "):])


def test_run_on_all_workers_then_fetch_logs(cloud, local_repo):
  _setup_two_workers(cloud, local_repo)
  cloud.clear()
  extra = ["--config=configs/tiny_cpu.py", "--config.note=it's a test", "--config.rl.steps=3"]
  done = cloud.run("run.sh", *extra, WORKDIR=WORKDIR)
  (ssh,) = cloud.calls()
  assert ssh[:8] == ["compute", "tpus", "tpu-vm", "ssh", NAME, "--worker=all", *WHERE]
  assert ssh[8].startswith("--command=cd k15 && K15_DISTRIBUTED=1 LIBTPU_INIT_ARGS='--xla_")
  assert " bash launch/worker.sh start exp1 -- python -m k15.main " in ssh[8]
  assert "warning" not in done.stderr

  for home in cloud.workers:
    log = _log(home)
    _wait_for(lambda: log.exists() and "exited with status 0" in log.read_text(), log)
    report = _k15_main_report(log)
    assert report == {
        "argv": ["-m", "k15.main", *extra, f"--config.compilation_cache_dir={WORKDIR}/xla_cache",
                 f"--workdir={WORKDIR}"],
        "K15_DISTRIBUTED": "1",
        "LIBTPU_INIT_ARGS": " ".join(OVERLAP_FLAGS),
        "cwd": str(home / "k15"),
        "VIRTUAL_ENV": str(home / "k15_venv"),
    }

  cloud.clear()
  cloud.run("logs.sh", "--fetch=fetched", WORKDIR=WORKDIR)
  assert cloud.calls() == [["compute", "tpus", "tpu-vm", "scp", "--recurse",
                            f"{NAME}:k15_logs/exp1", "fetched", "--worker=all", *WHERE]]
  fetched = cloud.root / "fetched" / "exp1"
  assert sorted(p.name for p in fetched.glob("*.log")) == ["worker-0.log", "worker-1.log"]
  for home in cloud.workers:
    assert (fetched / _log(home).name).read_text() == _log(home).read_text()


def test_run_is_refused_while_running_then_restarted_and_stopped(cloud, local_repo):
  _setup_two_workers(cloud, local_repo)
  for home in cloud.workers:
    (home / "hold").write_text("")  # the stand-in k15.main keeps running
  env = {"WORKDIR": "gs://b/exp2"}
  pid_files = [home / "k15_logs" / "exp2" / f"worker-{i}.pid"
               for i, home in enumerate(cloud.workers)]

  cloud.run("run.sh", "--config.seed=1", **env)
  _wait_for(lambda: all(p.exists() for p in pid_files), "pid files")
  first = [int(p.read_text()) for p in pid_files]

  again = cloud.run("run.sh", "--config.seed=1", ok=False, **env)
  assert again.returncode != 0
  assert "already running" in again.stderr and "--restart" in again.stderr

  # A relaunch (as after a crash) stops the old processes and appends to the same logs.
  cloud.run("run.sh", "--restart", "--config.seed=2", **env)
  _wait_for(lambda: all(p.exists() and int(p.read_text()) not in first for p in pid_files),
            "new pid files")
  second = [int(p.read_text()) for p in pid_files]
  for pid in first:
    _wait_for(lambda: not _alive(pid), f"old run {pid} to end")

  cloud.clear()
  cloud.run("run.sh", "--stop", **env)
  assert cloud.calls() == [["compute", "tpus", "tpu-vm", "ssh", NAME, "--worker=all", *WHERE,
                            "--command=cd k15 && bash launch/worker.sh stop exp2"]]
  for pid in second:
    _wait_for(lambda: not _alive(pid), f"run {pid} to stop")
  for home in cloud.workers:
    text = _log(home, "exp2").read_text()
    assert text.count(" starts in ") == 2 and "stopped" in text
    assert "--config.seed=2" in text
  assert not any(p.exists() for p in pid_files)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (ended, not yet reaped) counts as ended.
  stat = pathlib.Path(f"/proc/{pid}/stat")
  return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_run_attached_streams_output_and_keeps_logs(cloud, local_repo):
  _setup_two_workers(cloud, local_repo)
  done = cloud.run("run.sh", "--attach", "--config.seed=3", WORKDIR=WORKDIR)
  streamed = [json.loads(l[len("K15_MAIN "):]) for l in done.stdout.splitlines()
              if l.startswith("K15_MAIN ")]
  assert sorted(r["cwd"] for r in streamed) == [str(h / "k15") for h in cloud.workers]
  for home in cloud.workers:
    assert _k15_main_report(_log(home))["argv"][-3::2] == ["--config.seed=3",
                                                           f"--workdir={WORKDIR}"]
    assert not (_log(home).parent / _log(home).name.replace(".log", ".pid")).exists()


def test_run_refuses_workdir_flag_and_warns_on_local_workdir(cloud):
  done = cloud.run("run.sh", "--workdir=/tmp/x", ok=False, WORKDIR=WORKDIR)
  assert done.returncode != 0 and "WORKDIR" in done.stderr
  done = cloud.run("run.sh", "--dry-run", WORKDIR="/home/me/k15_run")
  assert "warning" in done.stderr and "gs://" in done.stderr
  assert "--workdir=/home/me/k15_run" in done.stdout


# The XLA TPU flags run.sh sets by default (launch/README.md says what each does).
OVERLAP_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)


def _dry_run_remote(cloud, *args, **env) -> tuple[dict[str, str], list[str]]:
  """run.sh --dry-run: the environment assignments and the k15.main command of its ssh call."""
  done = cloud.run("run.sh", "--dry-run", *args, **env)
  (ssh,) = [cmd for cmd in _printed_commands(done.stdout) if cmd[:5] == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  (command,) = [a for a in ssh if a.startswith("--command=")]
  words = shlex.split(command[len("--command="):])
  start = words.index("bash")
  assignments = dict(w.split("=", 1) for w in words[words.index("&&") + 1:start])
  return assignments, words[words.index("--", start) + 1:]


def test_run_sets_compilation_cache_and_libtpu_flags(cloud):
  env, command = _dry_run_remote(cloud, "--config=c.py", WORKDIR=WORKDIR + "/")
  assert env == {"K15_DISTRIBUTED": "1", "LIBTPU_INIT_ARGS": " ".join(OVERLAP_FLAGS)}
  assert command == ["python", "-m", "k15.main", "--config=c.py",
                     f"--config.compilation_cache_dir={WORKDIR}/xla_cache",
                     f"--workdir={WORKDIR}/"]
  # The user's own choices win; "" turns either off.
  env, command = _dry_run_remote(cloud, "--config=c.py", WORKDIR=WORKDIR,
                                 COMPILATION_CACHE_DIR="gs://b/shared_cache",
                                 LIBTPU_INIT_ARGS="--xla_tpu_scoped_vmem_limit_kib=65536")
  assert env["LIBTPU_INIT_ARGS"] == "--xla_tpu_scoped_vmem_limit_kib=65536"
  assert "--config.compilation_cache_dir=gs://b/shared_cache" in command
  env, command = _dry_run_remote(cloud, "--config.compilation_cache_dir=/mnt/c", WORKDIR=WORKDIR,
                                 LIBTPU_INIT_ARGS="")
  assert env == {"K15_DISTRIBUTED": "1"}
  assert [a for a in command if "compilation_cache_dir" in a] == [
      "--config.compilation_cache_dir=/mnt/c"]
  _, command = _dry_run_remote(cloud, WORKDIR=WORKDIR, COMPILATION_CACHE_DIR="")
  assert not [a for a in command if "compilation_cache_dir" in a]


def test_run_name_from_env_and_validated(cloud):
  done = cloud.run("run.sh", "--dry-run", WORKDIR=WORKDIR + "/", RUN_NAME="my-run.2")
  assert "worker.sh start my-run.2 --" in done.stdout
  done = cloud.run("run.sh", "--dry-run", WORKDIR=WORKDIR, RUN_NAME="a b", ok=False)
  assert done.returncode != 0 and "RUN_NAME" in done.stderr


def test_logs_streams_one_worker(cloud):
  cloud.run("logs.sh", "--worker=3", "--lines=50", RUN_NAME="exp9")
  assert cloud.calls() == [["compute", "tpus", "tpu-vm", "ssh", NAME, "--worker=3", *WHERE,
                            "--command=tail -n 50 -F k15_logs/exp9/worker-*.log"]]
  done = cloud.run("logs.sh", "--worker=x", RUN_NAME="exp9", ok=False)
  assert done.returncode != 0 and "--worker" in done.stderr


@pytest.mark.parametrize("env, expected", [
    ({}, ["compute", "tpus", "tpu-vm", "delete", NAME, *WHERE, "--quiet"]),
    ({"QUEUED": "1"},
     ["compute", "tpus", "queued-resources", "delete", NAME, *WHERE, "--force", "--quiet"]),
])
def test_delete(cloud, env, expected):
  cloud.run("delete.sh", **env)
  assert cloud.calls() == [expected]


# ---------------------------------------------------------------------------------------------
# Hygiene.

def test_scripts_are_executable():
  for script in [*SCRIPTS, "worker.sh"]:
    assert os.access(LAUNCH / script, os.X_OK), script
    assert (LAUNCH / script).read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in (LAUNCH / script).read_text()


def test_shellcheck_is_clean(shellcheck):
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) == 7
  done = subprocess.run([shellcheck, "--external-sources", *scripts], cwd=REPO,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stdout + done.stderr
