"""The code sandbox: honest programs pass, hostile ones are contained or failed.

For every hostile program: the call returns within timeout + 2 s, the test process lives on, no
process of the sandbox is left running and nothing is written outside the sandbox.
"""

import os
import socket
import textwrap
import threading
import time
import uuid

import pytest

from k15.rewards import code

TIMEOUT_S = 1.0

# Without bubblewrap every test here skips, naming the package (or fails under K15_REQUIRE_TOOLS=1).
pytestmark = pytest.mark.usefixtures("sandbox")


def _leftovers(marker: str) -> list[str]:
  """Processes that came from a sandbox: its uid range, its program path or the test's marker."""
  found = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
      with open(f"/proc/{name}/status", "rb") as f:
        uid = next(int(l.split()[1]) for l in f if l.startswith(b"Uid:"))
    except (OSError, StopIteration):
      continue
    if (marker in cmdline or "/prog/main.py" in cmdline
        or code._UID_BASE <= uid <= code._UID_BASE + code._NUM_UIDS):
      found.append(f"{name} uid={uid} {cmdline}")
  return found


def _run_hostile(program: str, tests, marker: str, **kwargs) -> code.TestResult:
  start = time.monotonic()
  result = code.run_tests(textwrap.dedent(program), tests, timeout_s=TIMEOUT_S, **kwargs)
  elapsed = time.monotonic() - start
  assert elapsed < len(tests) * (TIMEOUT_S + 2.0), elapsed
  assert not _leftovers(marker), _leftovers(marker)
  return result


@pytest.fixture
def marker():
  return f"k15marker{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# Honest programs.
# ------------------------------------------------------------------------------------------------


def test_honest_programs_pass():
  add = "a, b = map(int, input().split())\nprint(a + b)\n"
  result = code.run_tests(add, [("1 2\n", "3\n"), ("-5 5", "0"), ("10 20\n", "30")])
  assert (result.passed, result.total) == (3, 3)
  assert result.all_passed
  assert [t.status for t in result.tests] == ["ok"] * 3


def test_wrong_answer_is_wrong_not_crash():
  result = code.run_tests("print(int(input()) + 1)", [("1", "2"), ("1", "3")])
  assert result.passed == 1 and result.total == 2
  assert [t.status for t in result.tests] == ["ok", "wrong"]
  assert result.tests[1].exit_code == 0


def test_reads_all_stdin_and_writes_many_lines():
  program = textwrap.dedent("""
      import sys
      nums = [int(x) for x in sys.stdin.read().split()]
      for x in nums:
        print(x * x, end='   \\n')  # trailing spaces are ignored
      """)
  nums = list(range(20000))
  stdin = " ".join(map(str, nums))
  expected = "\n".join(str(x * x) for x in nums) + "\n\n"
  result = code.run_tests(program, [(stdin, expected)])
  assert result.passed == 1, result.tests[0]


def test_may_use_its_own_directory_and_stdlib():
  program = textwrap.dedent("""
      import json, os, tempfile, collections, itertools, math
      with open('scratch.txt', 'w') as f:
        f.write('hello')
      with tempfile.NamedTemporaryFile('w', dir='.', delete=False) as f:
        f.write('x')
      print(open('scratch.txt').read(), math.comb(5, 2), json.dumps([1]))
      """)
  result = code.run_tests(program, [("", "hello 10 [1]")])
  assert result.passed == 1, result.tests[0]


def test_threads_fork_and_subprocess_work():
  program = textwrap.dedent("""
      import os, subprocess, sys, threading
      out = []
      t = threading.Thread(target=lambda: out.append('thread'))
      t.start()
      t.join()
      pid = os.fork()
      if pid == 0:
        os._exit(7)
      out.append(f'fork {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}')
      out.append(subprocess.run([sys.executable, '-c', 'print(5)'], capture_output=True,
                                text=True).stdout.strip())
      print(' '.join(out))
      """)
  result = code.run_tests(program, [("", "thread fork 7 5")])
  assert result.passed == 1, result.tests[0]


def test_concurrent_calls_from_threads():
  results = []

  def work(i):
    results.append(code.run_tests(f"print(int(input()) * {i})", [("3", str(3 * i))] * 2))

  threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert len(results) == 4
  assert all(r.passed == 2 for r in results), [r.tests for r in results]


# ------------------------------------------------------------------------------------------------
# Hostile programs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("program", [
    "while True:\n  pass\n",
    "import time\ntime.sleep(1000)\n",
    "import signal, time\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass\n",
])
def test_busy_loop_and_sleep_time_out(program, marker):
  result = _run_hostile(program, [("", "1")], marker)
  assert result.passed == 0
  assert result.tests[0].status == "timeout"


def test_fork_bomb_is_contained(marker):
  program = """
      import os
      while True:
        try:
          os.fork()
        except OSError:
          pass
      """
  result = _run_hostile(program, [("", "1")], marker)
  assert result.passed == 0
  assert result.tests[0].status in ("timeout", "crash")


def test_fork_count_is_limited(marker):
  program = """
      import os, time
      n = 0
      for _ in range(300):
        try:
          if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
          n += 1
        except OSError:
          pass
      print(n)
      """
  result = _run_hostile(program, [("", "")], marker, max_processes=8)
  assert result.tests[0].status == "wrong"
  assert int(result.tests[0].stdout) < 8


def test_daemonized_child_does_not_survive(marker):
  program = f"""
      import subprocess, sys
      subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'],
                       start_new_session=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
      print('ok')
      """
  result = _run_hostile(program, [("", "ok")], marker)
  assert result.passed == 1  # legal program: it just must not leave its child behind


@pytest.mark.parametrize("program", [
    "x = bytearray(1 << 40)\n",
    "a = []\nwhile True:\n  a.append(bytearray(10 << 20))\n",
    "x = 'y' * (1 << 33)\n",
])
def test_memory_bomb_fails(program, marker):
  result = _run_hostile(program, [("", "1")], marker, memory_mb=128)
  assert result.passed == 0
  assert result.tests[0].status == "memory", result.tests[0]


def test_output_flood_is_cut(marker):
  result = _run_hostile("while True:\n  print('y' * 10000)\n", [("", "y")], marker,
                        max_output_bytes=1 << 16)
  assert result.passed == 0
  assert result.tests[0].status == "output_limit"


def test_stderr_flood_does_not_hang(marker):
  program = "import sys\nwhile True:\n  sys.stderr.write('z' * 10000)\n"
  result = _run_hostile(program, [("", "1")], marker)
  assert result.passed == 0
  assert result.tests[0].status == "timeout"
  assert len(result.tests[0].stderr) <= code._STDERR_KEEP


def test_cannot_write_outside(tmp_path, marker):
  targets = [tmp_path / f"{marker}-a", f"/tmp/{marker}-b", f"/dev/shm/{marker}-c",
             f"/prog/{marker}-d", f"/{marker}-e", f"/usr/{marker}-f",
             os.path.expanduser(f"~/{marker}-g")]
  program = f"""
      import os
      ok = 0
      for path in {[str(t) for t in targets]!r}:
        try:
          os.makedirs(os.path.dirname(path), exist_ok=True)
          with open(path, 'w') as f:
            f.write('pwned')
          ok += 1
        except OSError:
          pass
      print('wrote', ok)
      """
  result = _run_hostile(program, [("", "wrote 0")], marker)
  assert result.tests[0].status in ("ok", "wrong")
  for target in targets:
    assert not os.path.exists(target), target
  assert not any(marker in name for name in os.listdir("/tmp"))
  assert not any(marker in name for name in os.listdir(tmp_path))


def test_cannot_read_host_files(tmp_path, marker):
  secret = tmp_path / "secret.txt"
  secret.write_text(marker)
  secret.chmod(0o644)
  program = f"""
      for path in [{str(secret)!r}, '/etc/hostname', '/etc/passwd']:
        try:
          print(open(path).read())
        except OSError as e:
          print('denied', type(e).__name__)
      """
  result = _run_hostile(program, [("", marker)], marker)
  assert result.passed == 0
  assert marker not in result.tests[0].stdout
  assert "root:" not in result.tests[0].stdout


def test_no_network_to_the_host(marker):
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.bind(("127.0.0.1", 0))
  server.listen(8)
  server.settimeout(0.5)
  port = server.getsockname()[1]
  program = f"""
      import socket
      for host in ['127.0.0.1', 'localhost', '0.0.0.0']:
        try:
          s = socket.create_connection((host, {port}), timeout=0.5)
          s.sendall(b'{marker}')
          print('connected')
        except OSError as e:
          print('blocked', type(e).__name__)
      """
  try:
    result = _run_hostile(program, [("", "connected\nconnected\nconnected")], marker)
    with pytest.raises(socket.timeout):
      conn, _ = server.accept()
      conn.close()
  finally:
    server.close()
  assert result.passed == 0
  assert "connected" not in result.tests[0].stdout.replace("blocked", "")


def test_no_namespaces_of_its_own(marker):
  # As "root" of a user namespace of its own, a program could mount unbounded tmpfs and more.
  program = """
      import ctypes, subprocess
      libc = ctypes.CDLL(None, use_errno=True)
      print(libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
      r = subprocess.run(['unshare', '-Urm', 'sh', '-c', 'mount -t tmpfs none /work; echo in'],
                         capture_output=True, text=True)
      print(r.returncode, r.stdout.strip())
      """
  result = _run_hostile(program, [("", "0 0\n0 in")], marker)
  assert result.passed == 0
  assert result.tests[0].stdout.split() == ["-1", "1", "1"]  # EPERM, and unshare(1) failed


@pytest.mark.parametrize("program", [
    "import os\nos.kill(os.getppid(), 9)\nprint('alive')\n",
    "import os\nos.killpg(os.getpgid(0), 9)\nprint('alive')\n",
    "import os\nos.kill(-1, 9)\nprint('alive')\n",
    "import os\nos.kill({test_pid}, 9)\nprint('alive')\n",
    "import os, signal\nfor p in range(1, 40000):\n  try: os.kill(p, signal.SIGTERM)\n"
    "  except OSError: pass\nprint('alive')\n",
])
def test_cannot_kill_the_caller(program, marker):
  parent_before = os.getppid()
  result = _run_hostile(program.format(test_pid=os.getpid()), [("", "dead")], marker)
  assert result.passed == 0
  assert os.getppid() == parent_before  # our own parent (pytest's shell) is untouched too
  # The caller lives on and can still use the sandbox.
  assert code.run_tests("print(2 + 2)", [("", "4")]).passed == 1


def test_parent_environment_is_not_visible(monkeypatch, marker):
  monkeypatch.setenv("K15_TEST_SECRET", marker)
  program = """
      import os
      print(sorted(os.environ))
      print(os.environ.get('K15_TEST_SECRET'))
      for p in ['/proc/1/environ', '/proc/self/environ']:
        try:
          print(open(p, 'rb').read())
        except OSError as e:
          print('denied', p)
      """
  result = _run_hostile(program, [("", marker)], marker)
  assert result.passed == 0
  assert marker not in result.tests[0].stdout
  assert "K15_TEST_SECRET" not in result.tests[0].stdout


@pytest.mark.parametrize("program", [
    "print(42)\nimport sys\nsys.exit(1)\n",
    "print(42)\nraise ValueError('after the answer')\n",
    "import os, sys\nprint(42)\nsys.stdout.flush()\nos._exit(3)\n",
    "import os, sys\nprint(42)\nsys.stdout.flush()\nos.kill(os.getpid(), 9)\n",
])
def test_right_answer_then_crash_fails(program, marker):
  result = _run_hostile(program, [("", "42")], marker)
  assert result.passed == 0
  assert result.tests[0].status == "crash"
  assert result.tests[0].stdout.strip() == "42"


def test_missing_isolation_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(code, "_ISOLATION", None)
  monkeypatch.setattr(code.shutil, "which", lambda name: None)
  with pytest.raises(code.SandboxUnavailableError, match="bwrap"):
    code.run_tests("print(1)", [("", "1")])


def test_bad_tests_argument_is_a_clear_error():
  with pytest.raises(TypeError, match="test 1"):
    code.run_tests("print(1)", [("", "1"), ("only stdin",)])
