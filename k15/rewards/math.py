"""Math answer grader: the verifiable reward of k1.5's math prompts (paper §2.3, §2.6).

`grade(response, answer)` is 1.0 when the response's final answer is mathematically equivalent to
the reference answer and 0.0 otherwise. Equivalence is decided by math-verify (`math_verify.parse`
and `math_verify.verify`: fractions, decimals, LaTeX such as \\frac, \\dfrac and \\sqrt, sets,
tuples, intervals, units and percent signs). By default only the LAST \\boxed{...} of the response
is graded, so a model cannot collect reward by mentioning many candidate numbers; a response
without a complete \\boxed{} scores 0.

References are graded as the public sets store them. Before math-verify sees them, the reference
and the prediction get the same rewrites (`normalize`), each for a notation that
math-verify would otherwise misread:
- `\\$` (an escaped dollar, MATH's currency sign, `\\$18.90`) is dropped. Left in, a reference
  without `$...$` delimiters reads as having none and every response scored 0.
- Upright constants (`\\mathrm{e}`, `{\\rm e}`, `\\operatorname{i}`, `\\text{e}`) become `e` and
  `i`. math-verify's normaliser turns `\\mathrm{..}` into `\\text{..}`, which it strips like a
  unit, so `2\\mathrm{e}` became `2` and accepted `\\boxed{2}`.
- A thin space between digit groups (`1\\,000`, `1\\;000`, `1~000`, `1\\ 000`) is dropped, as a
  thousands separator: math-verify reads `1\\,000` as the product 1*000 = 0.
- A repeating decimal (`0.\\overline{3}`, `0.1\\overline{6}`) becomes the fraction it denotes
  (`\\frac{1}{3}`, `\\frac{1}{6}`); math-verify cannot read `\\overline` and rejected every answer.
Only notation is rewritten; no comparison is loosened, so a wrong answer stays wrong.

Whether a response that was cut off counts at all is decided by `k15.rewards.finish`, the one
rule that RL rewards, evaluation and long2short share.

Why a process pool: sympy can run for ever on inputs such as `9^{9^{9^9}}`, and math-verify's own
time limit uses `signal.alarm`, which only works in the main thread (RL stacks that grade from
worker threads then silently score every answer 0). Here math-verify runs with its timeouts
disabled inside long-lived worker processes (fresh interpreters, never forks of the caller), and
the caller enforces a hard wall-clock limit: a worker that overruns is SIGKILLed, its item scores
0.0, and a fresh worker replaces it. So `grade` and `grade_batch` work from any thread.
"""

import atexit
import concurrent.futures
import fractions
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

import numpy as np

# A worker must import sympy and math-verify before its first item; on a loaded 2-core machine
# that takes a few seconds. Its start-up does not count against an item's time limit.
_STARTUP_TIMEOUT_S = 120.0
_PARENT_PID_ENV = "K15_GRADER_PARENT_PID"


# ------------------------------------------------------------------------------------------------
# Answer extraction (runs in the caller: linear in the response length, never slow).
# ------------------------------------------------------------------------------------------------


def _match_brace(text: str, open_idx: int) -> int | None:
  """Index of the `}` closing the `{` at open_idx, or None when the text ends first.

  Escaped braces (`\\{`, `\\}`, as in `\\boxed{\\{1, 2\\}}`) do not count.
  """
  depth = 0
  i = open_idx
  n = len(text)
  while i < n:
    c = text[i]
    if c == "\\":
      i += 2  # skip the escaped character, whatever it is
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return i
    i += 1
  return None


def extract_boxed(text: str) -> str | None:
  """Contents of the last top-level `\\boxed{...}` (or `\\fbox{...}`) of text, else None.

  Nested braces are matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; a box inside a box
  belongs to the outer one. When the last box is never closed (a truncated response) the result
  is None: an unfinished answer is no answer.
  """
  last = None
  pos = 0
  while True:
    starts = [i for i in (text.find("\\boxed", pos), text.find("\\fbox", pos)) if i >= 0]
    if not starts:
      return last
    start = min(starts)
    j = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while j < len(text) and text[j].isspace():
      j += 1
    if j >= len(text) or text[j] != "{":
      pos = j  # `\boxed` without an argument, e.g. prose about the command
      continue
    end = _match_brace(text, j)
    if end is None:
      return None
    last = text[j + 1:end]
    pos = end + 1


_ESCAPED_DOLLAR = re.compile(r"\\\$")
# \mathrm{e}, \mathit{e}, \operatorname{e}, \text{e}, \textrm{e}, {\rm e} (and i): the letter alone.
_UPRIGHT_CONSTANT = re.compile(
    r"\\(?:mathrm|mathit|operatorname|textrm|text)\s*\{\s*([ei])\s*\}|\{\s*\\rm\s+([ei])\s*\}")
# int part, non-repeating decimals, repeating decimals: 0.1\overline{6}
_REPEATING_DECIMAL = re.compile(r"(\d*)\.(\d*)\\overline\s*\{(\d+)\}")
# A thin or explicit space between a digit and a group of exactly three digits.
_DIGIT_GROUP_SPACE = re.compile(r"(?<=\d)(?:\\[,;:]|\\ |~|\\thinspace\s*)(?=\d{3}(?!\d))")


def normalize(text: str) -> str:
  """The notation rewrites applied to reference and prediction alike (see the module docstring).

  `\\$18.90` -> `18.90`, `2\\mathrm{e}` -> `2e`, `1\\,000` -> `1000`,
  `0.1\\overline{6}` -> `\\frac{1}{6}`.
  """
  text = _ESCAPED_DOLLAR.sub("", text)
  text = _UPRIGHT_CONSTANT.sub(_constant_letter, text)
  text = _DIGIT_GROUP_SPACE.sub("", text)
  return _REPEATING_DECIMAL.sub(_repeating_fraction, text)


def _repeating_fraction(m: re.Match) -> str:
  whole, fixed, repeat = m.group(1), m.group(2), m.group(3)
  # x = whole.fixed(repeat)(repeat)...: (fixed+repeat - fixed) / (10^|fixed| (10^|repeat| - 1))
  den = 10 ** len(fixed) * (10 ** len(repeat) - 1)
  value = fractions.Fraction(int(whole or 0)) + fractions.Fraction(
      int(fixed + repeat) - int(fixed or 0), den)
  return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _constant_letter(m: re.Match) -> str:
  letter = m.group(1) or m.group(2)
  # After a command name (`\cdot\mathrm{e}`) the letter needs a space, or it would extend it.
  before = m.string[m.start() - 1] if m.start() else ""
  return " " + letter if before.isalpha() else letter


# ------------------------------------------------------------------------------------------------
# The worker process.
# ------------------------------------------------------------------------------------------------


def _worker_main() -> None:
  """Loop of a grading worker: one JSON request per stdin line, one JSON reply per stdout line."""
  # Die with the parent even when stuck inside sympy (no Python code runs then, so no watchdog
  # thread could notice). The parent spawns from one long-lived thread; see _Spawner.
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass
  if os.getppid() != int(os.environ.get(_PARENT_PID_ENV, os.getppid())):
    os._exit(0)  # the parent died before prctl took effect

  # The protocol owns the original stdout; stray prints from libraries go to /dev/null.
  proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)

  import logging  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)
  warnings.simplefilter("ignore")
  import math_verify  # pylint: disable=g-import-not-at-top

  # After a successful start, stderr noise (sympy warnings) is dropped too; import errors above
  # still reach the caller's stderr.
  os.dup2(devnull, 2)

  def parse(text: str):
    # parsing_timeout=None / timeout_seconds=None: no signal.alarm; the parent kills us instead.
    return math_verify.parse(text, parsing_timeout=None)

  gold_cache: dict[str, list] = {}  # k responses of a group share one reference answer
  proto.write(json.dumps({"ready": True}) + "\n")
  proto.flush()
  for line in sys.stdin:
    req = json.loads(line)
    score = 0.0
    try:
      gold = gold_cache.get(req["gold"])
      if gold is None:
        gold = parse(req["gold"])
        if len(gold_cache) > 1024:
          gold_cache.clear()
        gold_cache[req["gold"]] = gold
      pred = parse(req["pred"])
      if gold and pred and math_verify.verify(gold, pred, timeout_seconds=None):
        score = 1.0
    except Exception:  # pylint: disable=broad-except
      score = 0.0  # an answer that breaks the parser is not a correct answer
    proto.write(json.dumps({"id": req["id"], "score": score}) + "\n")
    proto.flush()


# ------------------------------------------------------------------------------------------------
# The pool.
# ------------------------------------------------------------------------------------------------


class _Spawner:
  """Starts worker processes from one long-lived daemon thread.

  Linux delivers PR_SET_PDEATHSIG when the *thread* that forked the child exits, so workers must
  not be forked by short-lived caller threads, or they would die with them.
  """

  def __init__(self):
    self._requests: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._loop, name="k15-grader-spawner", daemon=True)
    self._thread.start()

  def _loop(self) -> None:
    while True:
      future = self._requests.get()
      if not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(_popen_worker())
      except BaseException as e:  # pylint: disable=broad-except
        future.set_exception(e)

  def spawn(self) -> subprocess.Popen:
    future = concurrent.futures.Future()
    self._requests.put(future)
    return future.result()


def _popen_worker() -> subprocess.Popen:
  # The worker imports this module; make sure it finds the same k15 as the caller.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  env[_PARENT_PID_ENV] = str(os.getpid())
  return subprocess.Popen(
      [sys.executable, "-c", "from k15.rewards.math import _worker_main; _worker_main()"],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True)


class _Worker:
  """One grading process and the read side of its line protocol."""

  def __init__(self, proc: subprocess.Popen):
    self.proc = proc
    self.fd = proc.stdout.fileno()
    self.ready = False
    self.started = time.monotonic()
    self._buf = b""

  def send(self, req: dict) -> None:
    self.proc.stdin.write((json.dumps(req) + "\n").encode("utf-8"))
    self.proc.stdin.flush()

  def read_messages(self) -> list[dict] | None:
    """Complete messages available now (call after select); None at end of file (it died)."""
    chunk = os.read(self.fd, 1 << 16)
    if not chunk:
      return None
    self._buf += chunk
    *lines, self._buf = self._buf.split(b"\n")
    return [json.loads(line) for line in lines if line]

  def alive(self) -> bool:
    return self.proc.poll() is None

  def kill(self) -> None:
    try:
      self.proc.kill()
    except ProcessLookupError:
      pass
    self.proc.wait()
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except OSError:
        pass


class _Pool:
  """Long-lived grading workers, lent out to callers; thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self._idle: list[_Worker] = []
    self._spawner: _Spawner | None = None

  def new_worker(self) -> _Worker:
    with self._lock:
      if self._spawner is None:
        self._spawner = _Spawner()
      spawner = self._spawner
    return _Worker(spawner.spawn())

  def acquire(self, n: int) -> list[_Worker]:
    with self._lock:
      got = []
      while self._idle and len(got) < n:
        w = self._idle.pop()
        if w.alive():
          got.append(w)
        else:
          w.kill()
    return got + [self.new_worker() for _ in range(n - len(got))]

  def release(self, workers: Sequence[_Worker]) -> None:
    with self._lock:
      for w in workers:
        if w.alive():
          self._idle.append(w)
        else:
          w.kill()

  def shutdown(self) -> None:
    with self._lock:
      idle, self._idle = self._idle, []
    for w in idle:
      w.kill()


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def shutdown() -> None:
  """Kills the idle grading workers (they restart on the next call)."""
  _POOL.shutdown()


def _default_workers() -> int:
  return max(1, min(8, os.cpu_count() or 1))


def _run(requests: list[tuple[int, str, str]], timeout_s: float,
         num_workers: int) -> dict[int, float]:
  """Grades (id, pred, gold) requests on the pool; ids that time out or crash score 0."""
  scores: dict[int, float] = {}
  if not requests:
    return scores
  todo = list(reversed(requests))
  workers = _POOL.acquire(min(num_workers, len(requests)))
  busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (request id, deadline)
  try:
    while todo or busy:
      for w in workers:
        if todo and w.ready and w not in busy:
          rid, pred, gold = todo.pop()
          try:
            w.send({"id": rid, "pred": pred, "gold": gold})
            busy[w] = (rid, time.monotonic() + timeout_s)
          except (BrokenPipeError, OSError):
            scores[rid] = 0.0  # the worker died between items; replaced below

      now = time.monotonic()
      deadlines = [d for _, d in busy.values()]
      deadlines += [w.started + _STARTUP_TIMEOUT_S for w in workers if not w.ready]
      wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
      # poll, not select: a big training process may hold file descriptors above 1024.
      poller = select.poll()
      for w in workers:
        poller.register(w.fd, select.POLLIN)
      readable = {fd for fd, _ in poller.poll(wait_s * 1000)}

      replace: list[_Worker] = []
      for w in workers:
        if w.fd in readable:
          msgs = w.read_messages()
          if msgs is None:  # died: a crash while grading scores 0, like a timeout
            if w in busy:
              scores[busy.pop(w)[0]] = 0.0
            elif not w.ready:
              raise RuntimeError(
                  "k15.rewards.math: a grading worker exited during start-up with code "
                  f"{w.proc.wait()} (is math-verify installed for {sys.executable}? its stderr "
                  "is above)")
            replace.append(w)
            continue
          for msg in msgs:
            if msg.get("ready"):
              w.ready = True
            elif w in busy and busy[w][0] == msg["id"]:
              scores[busy.pop(w)[0]] = float(msg["score"])

      now = time.monotonic()
      for w in workers:
        if w in busy and now >= busy[w][1]:
          scores[busy.pop(w)[0]] = 0.0  # over the wall-clock limit: kill it, item scores 0
          replace.append(w)
        elif not w.ready and now >= w.started + _STARTUP_TIMEOUT_S:
          raise RuntimeError(
              f"k15.rewards.math: a grading worker did not start within {_STARTUP_TIMEOUT_S} s")
      for w in replace:
        w.kill()
        workers[workers.index(w)] = _POOL.new_worker()
  except BaseException:
    for w in busy:
      w.kill()  # mid-item: its reply would confuse the next caller
    raise
  finally:
    _POOL.release([w for w in workers if w not in busy])
  return scores


def _gold_text(answer: str) -> str:
  # A bare reference answer ("1/2", "\frac{1}{2}") is read as the contents of a box; one that
  # already carries its own delimiters is parsed as written.
  if "\\boxed" in answer or "$" in answer:
    return answer
  return "\\boxed{" + answer + "}"


def grade_batch(responses: Sequence[str], answers: Sequence[str], *, timeout_s: float = 5.0,
                num_workers: int | None = None, boxed_only: bool = True) -> np.ndarray:
  """Grades responses[i] against answers[i] in parallel worker processes.

  Args:
    responses: model outputs.
    answers: reference answers, one per response (plain, LaTeX or already boxed).
    timeout_s: hard wall-clock limit per item; an item over it scores 0.0 and its worker is
      killed and replaced.
    num_workers: worker processes to use (default: CPU count, at most 8).
    boxed_only: grade only the last \\boxed{} (a response without one scores 0). When False,
      math-verify's own extraction picks the answer (boxed, "final answer is" lines, last
      expression).

  Returns:
    float32 array [len(responses)] of 1.0 / 0.0. Safe to call from any thread.
  """
  if len(responses) != len(answers):
    raise ValueError(
        f"grade_batch: {len(responses)} responses but {len(answers)} answers; need one each")
  if timeout_s <= 0:
    raise ValueError(f"grade_batch: timeout_s must be > 0, got {timeout_s}")
  num_workers = _default_workers() if num_workers is None else num_workers
  if num_workers < 1:
    raise ValueError(f"grade_batch: num_workers must be >= 1, got {num_workers}")

  out = np.zeros(len(responses), np.float32)
  requests = []
  for i, (response, answer) in enumerate(zip(responses, answers)):
    if not isinstance(response, str) or not isinstance(answer, str):
      raise TypeError(f"grade_batch: item {i} is not a (str, str) pair: "
                      f"{type(response).__name__}, {type(answer).__name__}")
    if boxed_only:
      boxed = extract_boxed(response)
      if boxed is None or not boxed.strip():
        continue
      if boxed.strip() == answer.strip():
        out[i] = 1.0  # identical text needs no sympy
        continue
      pred = "\\boxed{" + normalize(boxed) + "}"
    else:
      pred = normalize(response)
    requests.append((i, pred, _gold_text(normalize(answer.strip()))))
  for i, score in _run(requests, timeout_s, num_workers).items():
    out[i] = score
  return out


def grade(response: str, answer: str, *, timeout_s: float = 5.0, boxed_only: bool = True) -> float:
  """1.0 when response's final answer equals answer mathematically, else 0.0.

  See grade_batch; this grades one item on one pooled worker, within timeout_s wall-clock seconds.
  """
  return float(grade_batch([response], [answer], timeout_s=timeout_s, num_workers=1,
                           boxed_only=boxed_only)[0])
