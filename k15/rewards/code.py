"""Code sandbox: runs a model-written Python program on test cases (paper §2.6, "code sandbox").

`run_tests(program, tests)` runs `program` once per (stdin, expected stdout) pair. A test passes
only when the program exits 0 AND its output equals the expected output up to trailing whitespace
on each line and blank lines at the start and end (printing the right answer, then crashing,
fails).

Isolation mechanism (k1.5 uses crun containers; k15 uses bubblewrap, Debian package `bubblewrap`):
- Namespaces, via `bwrap`: new pid, network (loopback only, nothing reaches the host), ipc, uts
  and mount namespaces; `--new-session` (no terminal injection); `--die-with-parent`.
- File system: a fresh root with read-only binds of /usr (and /bin, /lib, /lib64 links) and of the
  Python installation, /proc and a minimal /dev of the sandbox's own; the program and its inputs
  in a fresh host temp dir bound read-only at /prog (deleted after the call); the only writable
  place is /work, a size-limited tmpfs that vanishes with the sandbox. The host's /etc, /root,
  /home, /tmp and the caller's files are not visible.
- Identity: run as root (CI, TPU VMs via sudo), bwrap keeps only CAP_SETUID/CAP_SETGID/
  CAP_SETPCAP, and `setpriv` drops to an unprivileged uid that no other process uses (one per
  concurrent sandbox, from a reserved range), with no capabilities, an empty bounding set,
  no supplementary groups and no_new_privs. That uid cannot signal or write anything of the
  caller's, and RLIMIT_NPROC applies to it (root ignores RLIMIT_NPROC, so this matters for fork
  bombs). Run as a normal user, bwrap makes an unprivileged user namespace instead (the caller's
  own uid, nested user namespaces disabled) and RLIMIT_NPROC counts per namespace.
- Seccomp (a small BPF filter handed to bwrap): no unshare, setns or clone with namespace flags,
  so the program cannot make a user namespace of its own and be "root" in it; other syscall ABIs
  (i386, x32) are refused. Threads, fork and subprocess work as usual.
- Limits, via `prlimit` inside the sandbox: RLIMIT_CPU, RLIMIT_AS (memory_mb), RLIMIT_NPROC,
  RLIMIT_FSIZE, RLIMIT_NOFILE, no core files. The caller enforces wall time (SIGKILL of bwrap's
  process group; --die-with-parent and the pid namespace take every sandboxed process with it)
  and reads at most a bounded number of output bytes, killing the sandbox beyond them.
- Environment: empty (`--clearenv`, then PATH/HOME/LANG only); `python -I -S -B`: no user site,
  no site-packages, no PYTHON* variables, no .pyc writes.
- Afterwards every process still owned by the sandbox's uid is SIGKILLed (belt and braces: the
  pid namespace has already taken them).

When bubblewrap is missing or cannot make namespaces here, the first call raises
SandboxUnavailableError saying what failed; programs never run unsandboxed.
"""

import dataclasses
import os
import re
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Literal, Sequence

Status = Literal["ok", "wrong", "timeout", "crash", "memory", "output_limit"]

# Unprivileged uids for sandboxes run by root: one per concurrent sandbox so that RLIMIT_NPROC
# (counted per uid) and the final kill-by-uid never touch another sandbox or a real user.
_UID_BASE = 2_000_100_000
_NUM_UIDS = 256
_TMPFS_MB = 64  # size of the writable /work
_STDERR_KEEP = 4096  # bytes of stderr kept for diagnostics; the rest is read and dropped
_SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxUnavailableError(RuntimeError):
  """This machine cannot isolate programs the way run_tests requires."""


@dataclasses.dataclass(frozen=True)
class TestCaseResult:
  status: Status  # ok | wrong | timeout | crash | memory | output_limit
  exit_code: int | None  # None when the sandbox was killed by the caller
  wall_s: float
  stdout: str  # first bytes of the program's output (for debugging)
  stderr: str  # last bytes of the program's stderr (for debugging)


@dataclasses.dataclass(frozen=True)
class TestResult:
  passed: int
  total: int
  tests: list[TestCaseResult]

  @property
  def all_passed(self) -> bool:
    return self.total > 0 and self.passed == self.total


# ------------------------------------------------------------------------------------------------
# The sandbox command.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Isolation:
  bwrap: str
  setpriv: str | None  # None when not root: an unprivileged user namespace does the job
  prlimit: str
  python: str
  ro_binds: tuple[str, ...]  # bwrap arguments for the read-only root file system
  seccomp: bytes | None  # BPF filter (None: unknown architecture, namespaces not filtered)


_ISOLATION: _Isolation | SandboxUnavailableError | None = None
_ISOLATION_LOCK = threading.Lock()


def _root_fs_args(python: str) -> list[str]:
  """bwrap arguments making a read-only root with /usr and the Python installation."""
  args = ["--ro-bind", "/usr", "/usr"]
  for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
    if os.path.islink(top):  # merged-/usr systems: /lib -> usr/lib
      args += ["--symlink", os.readlink(top), top]
    elif os.path.isdir(top):
      args += ["--ro-bind", top, top]
  prefixes = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python))}
  for prefix in sorted(prefixes):
    if prefix == "/usr" or prefix.startswith("/usr/") or prefix == "/":
      continue
    # Parent directories made by bwrap must be traversable by the sandbox's uid (e.g. /root is
    # 0700 on the host, pyenv installs under it).
    parts = prefix.strip("/").split("/")
    for i in range(1, len(parts)):
      args += ["--perms", "0755", "--dir", "/" + "/".join(parts[:i])]
    args += ["--ro-bind", prefix, prefix]
  return args


def _find_isolation() -> _Isolation:
  missing = [name for name in ("bwrap", "prlimit") if shutil.which(name) is None]
  root = os.geteuid() == 0
  if root and shutil.which("setpriv") is None:
    missing.append("setpriv")
  if missing:
    raise SandboxUnavailableError(
        f"k15.rewards.code: {', '.join(missing)} not found on PATH; the code sandbox needs "
        "bubblewrap and util-linux (Debian: apt-get install -y bubblewrap util-linux). "
        "Refusing to run untrusted programs without isolation.")
  python = os.path.realpath(sys.executable)
  iso = _Isolation(
      bwrap=shutil.which("bwrap"),
      setpriv=shutil.which("setpriv") if root else None,
      prlimit=shutil.which("prlimit"),
      python=python,
      ro_binds=tuple(_root_fs_args(python)),
      seccomp=_seccomp_filter(os.uname().machine))
  # Probe once: namespaces may be forbidden (containers without CAP_SYS_ADMIN, kernels or
  # AppArmor policies without unprivileged user namespaces).
  with tempfile.TemporaryDirectory(prefix="k15-sandbox-probe-") as d:
    os.chmod(d, 0o755)
    cmd = _command(iso, d, _UID_BASE + _NUM_UIDS, timeout_s=5.0, memory_mb=256,
                   max_processes=4, argv=["-c", "import sys; sys.stdout.write('k15-ok')"])
    proc = _spawn(cmd, iso.seccomp, stdin=subprocess.DEVNULL)
    try:
      stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired as e:
      _kill(proc)
      proc.communicate()
      raise SandboxUnavailableError("k15.rewards.code: the sandbox probe hung for 30 s") from e
    if proc.returncode != 0 or stdout != b"k15-ok":
      raise SandboxUnavailableError(
          "k15.rewards.code: bubblewrap could not start a sandbox here (exit code "
          f"{proc.returncode}, stderr: {stderr.decode(errors='replace').strip()!r}). It needs "
          "root, or unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 / "
          "user.max_user_namespaces > 0). Refusing to run untrusted programs without isolation.")
  return iso


def _isolation() -> _Isolation:
  global _ISOLATION
  with _ISOLATION_LOCK:
    if _ISOLATION is None:
      try:
        _ISOLATION = _find_isolation()
      except SandboxUnavailableError as e:
        _ISOLATION = e
    if isinstance(_ISOLATION, SandboxUnavailableError):
      raise _ISOLATION
    return _ISOLATION


def isolation_mechanism() -> str:
  """One line saying how run_tests isolates programs here (raises if it cannot)."""
  iso = _isolation()
  who = ("setpriv to a reserved unprivileged uid" if iso.setpriv
         else "unprivileged user namespace")
  seccomp = "seccomp: no new namespaces" if iso.seccomp else "no seccomp filter (unknown arch)"
  return (f"bubblewrap ({iso.bwrap}: pid, net, ipc, uts, mount namespaces), {who}, {seccomp}, "
          f"prlimit rlimits, python {iso.python} -I -S")


def _command(iso: _Isolation, prog_dir: str, uid: int, *, timeout_s: float, memory_mb: int,
              max_processes: int, argv: list[str], fsize_mb: int = 16) -> list[str]:
  cmd = [iso.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
         "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
  if iso.setpriv:
    # Privileged mode: bwrap drops every capability but these, which setpriv needs to switch uid
    # and empty the bounding set; setpriv then drops them all.
    cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
  else:
    cmd += ["--unshare-user", "--disable-userns"]
  cmd += list(iso.ro_binds)
  cmd += ["--ro-bind", prog_dir, "/prog",
          "--size", str(_TMPFS_MB << 20), "--perms", "1777", "--tmpfs", "/work", "--chdir", "/work",
          "--proc", "/proc", "--dev", "/dev",
          "--clearenv", "--setenv", "PATH", _SANDBOX_PATH, "--setenv", "HOME", "/work",
          "--setenv", "LANG", "C.UTF-8"]
  if iso.setpriv:
    cmd += [iso.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all"]
  cpu_s = int(timeout_s) + 1
  cmd += [iso.prlimit, f"--cpu={cpu_s}:{cpu_s + 1}", f"--as={memory_mb << 20}",
          f"--nproc={max_processes}", f"--fsize={fsize_mb << 20}", "--nofile=64", "--core=0",
          "--", iso.python, "-I", "-S", "-B", "-X", "utf8"] + argv
  return cmd


# ------------------------------------------------------------------------------------------------
# Seccomp: no new namespaces inside the sandbox.
# ------------------------------------------------------------------------------------------------

# Without this, the sandboxed uid could make its own user namespace (allowed to any user on most
# kernels), be "root" there and, e.g., mount tmpfs file systems that no RLIMIT bounds. bwrap's
# --disable-userns only exists with --unshare-user, which the root mode cannot use (the uid map
# would point at root, and root ignores RLIMIT_NPROC). So a classic BPF filter, loaded by bwrap
# (--seccomp FD) just before the program starts, refuses unshare, setns and clone with a
# namespace flag, answers clone3 with ENOSYS (glibc then falls back to clone) and refuses other
# syscall ABIs (i386 int 0x80, x32), whose numbers the filter does not check.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # name -> number, per architecture
    "x86_64": {"clone": 56, "unshare": 272, "setns": 308, "clone3": 435},
    "aarch64": {"clone": 220, "unshare": 97, "setns": 268, "clone3": 435},
}
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (CLONE_NEWTIME = 0x80
# shares clone()'s exit-signal byte and is only honoured by unshare and clone3, refused anyway).
_CLONE_NEW_MASK = 0x7E020000


def _seccomp_filter(machine: str) -> bytes | None:
  """The filter as an array of struct sock_filter, or None on an architecture without one."""
  if machine not in _AUDIT_ARCH:
    return None
  nr = _SYSCALLS[machine]
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..|K, BPF_RET
  allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
  # (code, jump-if-true label, jump-if-false label, k); labels are resolved below.
  prog = [
      (ld, None, None, 4),  # seccomp_data.arch
      (jeq, "nr", "enosys", _AUDIT_ARCH[machine]),
      ("nr", ld, None, None, 0),  # seccomp_data.nr
      (jge, "enosys", None, 0x40000000),  # x32 syscalls on x86_64
      (jeq, "eperm", None, nr["unshare"]),
      (jeq, "eperm", None, nr["setns"]),
      (jeq, "enosys", None, nr["clone3"]),
      (jeq, None, "allow", nr["clone"]),
      (ld, None, None, 16),  # low 32 bits of args[0]: clone's flags
      (jset, "eperm", "allow", _CLONE_NEW_MASK),
      ("allow", ret, None, None, allow),
      ("eperm", ret, None, None, eperm),
      ("enosys", ret, None, None, enosys),
  ]
  labels, insns = {}, []
  for i, insn in enumerate(prog):
    if isinstance(insn[0], str):
      labels[insn[0]] = i
      insn = insn[1:]
    insns.append(insn)
  out = b""
  for i, (code, jt, jf, k) in enumerate(insns):
    # A jump's offsets count from the next instruction; None means fall through.
    jt = 0 if jt is None else labels[jt] - i - 1
    jf = 0 if jf is None else labels[jf] - i - 1
    out += struct.pack("=HBBI", code, jt, jf, k)
  return out


# ------------------------------------------------------------------------------------------------
# Uid slots and clean-up.
# ------------------------------------------------------------------------------------------------


_UID_LOCK = threading.Condition()
_FREE_UIDS = list(range(_UID_BASE + _NUM_UIDS - 1, _UID_BASE - 1, -1))


def _take_uid() -> int:
  with _UID_LOCK:
    while not _FREE_UIDS:
      _UID_LOCK.wait()
    return _FREE_UIDS.pop()


def _give_uid(uid: int) -> None:
  with _UID_LOCK:
    _FREE_UIDS.append(uid)
    _UID_LOCK.notify()


def _pids_of_uid(uid: int) -> list[int]:
  pids = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status", "rb") as f:
        for line in f:
          if line.startswith(b"Uid:"):
            if int(line.split()[1]) == uid:
              pids.append(int(name))
            break
    except (FileNotFoundError, ProcessLookupError, PermissionError):
      continue
  return pids


def _kill_uid(uid: int) -> None:
  """SIGKILLs whatever still runs as uid, until nothing does (at most ~1 s)."""
  for _ in range(100):
    pids = _pids_of_uid(uid)
    if not pids:
      return
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# Running one test.
# ------------------------------------------------------------------------------------------------


def _normalize(text: str) -> str:
  lines = text.replace("\r\n", "\n").split("\n")
  return "\n".join(line.rstrip() for line in lines).strip("\n")


def _spawn(cmd: list[str], seccomp: bytes | None, **kwargs) -> subprocess.Popen:
  """Starts bwrap in its own process group, handing it the seccomp filter through a pipe."""
  if seccomp is None:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={"PATH": _SANDBOX_PATH}, **kwargs)
  read_fd, write_fd = os.pipe()
  try:
    os.write(write_fd, seccomp)  # ~100 bytes: fits the pipe buffer, never blocks
    os.close(write_fd)
    write_fd = -1
    cmd = cmd[:1] + ["--seccomp", str(read_fd)] + cmd[1:]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={"PATH": _SANDBOX_PATH},
                            pass_fds=(read_fd,), **kwargs)
  finally:
    os.close(read_fd)
    if write_fd >= 0:
      os.close(write_fd)


def _kill(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # bwrap leads its own process group (start_new_session)
  except ProcessLookupError:
    pass


def _run_one(cmd: list[str], seccomp: bytes | None, stdin_path: str, expected: str, *,
             timeout_s: float, max_output_bytes: int) -> TestCaseResult:
  start = time.monotonic()
  deadline = start + timeout_s
  out = bytearray()
  err = bytearray()
  killed_for: Status | None = None
  with open(stdin_path, "rb") as stdin:
    proc = _spawn(cmd, seccomp, stdin=stdin)
  try:
    with selectors.DefaultSelector() as sel:
      sel.register(proc.stdout, selectors.EVENT_READ, out)
      sel.register(proc.stderr, selectors.EVENT_READ, err)
      open_streams = 2
      while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
          killed_for = "timeout"
          break
        for key, _ in sel.select(left):
          chunk = os.read(key.fd, 1 << 16)
          if not chunk:
            sel.unregister(key.fileobj)
            open_streams -= 1
          elif key.data is out:
            out += chunk
          else:
            err += chunk
            del err[:-_STDERR_KEEP]  # keep the tail only; a stderr flood just costs time
        if len(out) > max_output_bytes:
          killed_for = "output_limit"
          break
      if killed_for is None:
        # Both pipes closed: the program is done (or closed them and idles: wait, within time).
        try:
          proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
          killed_for = "timeout"
  finally:
    if killed_for is not None or proc.poll() is None:
      _kill(proc)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
  wall = time.monotonic() - start
  stdout = bytes(out[:max_output_bytes]).decode("utf-8", errors="replace")
  stderr = bytes(err).decode("utf-8", errors="replace")
  code = None if killed_for else proc.returncode

  if killed_for:
    status = killed_for
  elif code == 0:
    status = "ok" if _normalize(stdout) == _normalize(expected) else "wrong"
  elif "MemoryError" in stderr:
    status = "memory"
  elif code == 128 + signal.SIGXCPU:  # RLIMIT_CPU (bwrap reports a signal as 128 + number)
    status = "timeout"
  else:
    status = "crash"
  return TestCaseResult(status=status, exit_code=code, wall_s=wall, stdout=stdout[:4096],
                        stderr=stderr)


def run_tests(program: str, tests: Sequence[tuple[str, str]], *, timeout_s: float = 2.0,
              memory_mb: int = 256, max_processes: int = 16,
              max_output_bytes: int = 1 << 20) -> TestResult:
  """Runs a Python program on (stdin, expected stdout) pairs, each in a fresh sandbox.

  Args:
    program: Python 3 source (standard library only: site-packages are not importable).
    tests: (stdin text, expected stdout text) pairs.
    timeout_s: wall-clock limit per test (the CPU-time limit is one second more).
    memory_mb: address-space limit per process.
    max_processes: process (and thread) limit inside the sandbox.
    max_output_bytes: stdout beyond max(this, 2 x expected + 1 KiB) kills the test
      (`output_limit`).

  Returns:
    TestResult with .passed, .total and .tests[i].status in ok | wrong | timeout | crash |
    memory | output_limit. Thread-safe: concurrent calls use separate sandboxes and uids.

  Raises:
    SandboxUnavailableError: when this machine cannot isolate the program (never runs it bare).
  """
  if timeout_s <= 0:
    raise ValueError(f"run_tests: timeout_s must be > 0, got {timeout_s}")
  if memory_mb < 32:
    raise ValueError(f"run_tests: memory_mb must be >= 32 (Python needs it to start), "
                     f"got {memory_mb}")
  if max_processes < 1:
    raise ValueError(f"run_tests: max_processes must be >= 1, got {max_processes}")
  for i, test in enumerate(tests):
    if (not isinstance(test, (tuple, list)) or len(test) != 2
        or not all(isinstance(s, str) for s in test)):
      raise TypeError(f"run_tests: test {i} is not a (stdin, expected stdout) pair of str: "
                      f"{test!r:.200}")
  iso = _isolation()
  uid = _take_uid()
  prog_dir = tempfile.mkdtemp(prefix="k15-sandbox-")
  try:
    os.chmod(prog_dir, 0o755)  # the sandbox's uid reads it through the read-only bind
    main_py = os.path.join(prog_dir, "main.py")
    with open(main_py, "w", encoding="utf-8") as f:
      f.write(program)
    os.chmod(main_py, 0o644)
    cmd = _command(iso, prog_dir, uid, timeout_s=timeout_s, memory_mb=memory_mb,
                   max_processes=max_processes, argv=["/prog/main.py"])
    results = []
    for i, (stdin_text, expected) in enumerate(tests):
      # Inputs stay on the host side; the program gets an already-open read-only stdin.
      stdin_path = os.path.join(prog_dir, f"stdin-{i}")
      with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(stdin_text)
      limit = max(max_output_bytes, 2 * len(expected.encode("utf-8")) + 1024)
      results.append(_run_one(cmd, iso.seccomp, stdin_path, expected, timeout_s=timeout_s,
                              max_output_bytes=limit))
      os.unlink(stdin_path)
  finally:
    if iso.setpriv:
      _kill_uid(uid)
    _give_uid(uid)
    shutil.rmtree(prog_dir, ignore_errors=True)
  return TestResult(passed=sum(r.status == "ok" for r in results), total=len(results),
                    tests=results)


# ------------------------------------------------------------------------------------------------
# From a model's response to a reward.
# ------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str) -> str | None:
  """The body of the last complete fenced code block (```python ... ```), or None.

  The last one, as math grades the last \\boxed{}: a response that drafts and then corrects
  its program is graded on the correction. An unclosed fence (a response cut off mid-program)
  is no program.
  """
  blocks = _FENCE.findall(text)
  return blocks[-1] if blocks else None


def assert_program(solution: str, asserts: str, marker: str) -> str:
  """A program that runs `solution`, then `asserts`, then prints `marker` (and only that).

  The solution's own output is swallowed, so the test is the asserts: the program prints the
  marker only when the solution and every assert ran to the end, which an early `sys.exit(0)`
  never does. Callers draw the marker at random per call, so a response cannot print it itself.
  """
  return ("import contextlib as _k15_c, io as _k15_io, sys as _k15_sys\n"
          "_k15_stdout = _k15_sys.stdout\n"
          "with _k15_c.redirect_stdout(_k15_io.StringIO()):\n"
          f"  exec(compile({solution!r}, 'solution.py', 'exec'), globals())\n"
          f"  exec(compile({asserts!r}, 'tests.py', 'exec'), globals())\n"
          f"_k15_stdout.write({marker!r} + '\\n')\n")


def grade_response(response: str, tests: Sequence[tuple[str, str]] | None = None,
                   asserts: str | None = None, *, fraction: bool = False,
                   **run_kwargs) -> float:
  """The code reward: 1.0 when the last code block passes every test, else 0.0.

  `tests` are (stdin, expected stdout) pairs; `asserts` is Python code that checks a function
  the program defines (exactly one of the two). fraction=True rewards the share of passed
  stdin/stdout tests instead (a set of asserts is one test). No code block scores 0.
  """
  if (tests is None) == (asserts is None):
    raise ValueError("grade_response takes exactly one of tests and asserts")
  program = last_code_block(response)
  if program is None or not program.strip():
    return 0.0
  if asserts is not None:
    marker = "k15-asserts-passed-" + secrets.token_hex(16)
    result = run_tests(assert_program(program, asserts, marker), [("", marker + "\n")],
                       **run_kwargs)
  else:
    if not tests:
      raise ValueError("grade_response: no tests to run")
    result = run_tests(program, [tuple(t) for t in tests], **run_kwargs)
  if result.all_passed:
    return 1.0
  return result.passed / result.total if fraction else 0.0
