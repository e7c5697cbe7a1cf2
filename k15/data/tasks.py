r"""Synthetic reasoning tasks with verifiable answers, for the small-scale reproduction.

Two families, each with a difficulty knob, a final answer in \boxed{} and two demonstrations per
problem: a long chain of thought (planning, step-by-step work, checking, and for countdown a
search with dead ends and backtracking, as in Stream-of-Search, Gandhi et al. 2024) for the
long-CoT warm-up SFT of paper §2.2, and a short one (the answer alone) for long2short (§2.4).

arithmetic  "What is 4738 + 925?"; difficulty = digits per operand. Operations '+', '-'
            (non-negative result) and '*' by one digit (option `ops`, default addition). The
            long CoT works column by column from the right with carries (borrows), keeping the
            digits found so far so that the answer is a copy, then checks by the inverse
            operation:

              Add the columns from the right, carrying.
              8+5+0=13, carry 1, so far 3
              3+2+1=6, carry 0, so far 63
              7+9+0=16, carry 1, so far 663
              4+0+1=5, carry 0, so far 5663
              check: 5663-925=4738 ok
              \boxed{5663}

            Two options model a demonstrator's habits: `carry_slip` forgets a due carry (the
            working then ends at a wrong answer, while `answer` stays right) and `recheck`
            restates a column once more ("recheck 8+5+0 is 13, digit 3, carry 1, yes").

countdown   "Reach 24 with the numbers 3 5 7 2 ..."; difficulty = how many numbers are given
            (2..6, 3..5 in practice), and no solution uses fewer than min(difficulty, 4) of
            them, so that more numbers mean a deeper search. The answer is an expression using
            each given number at most once, with + - * / where every division is exact;
            `answer` stores the target and `verify_countdown` checks an expression. The long
            CoT is the trace of a depth-first search that tries the moves landing closest to
            the target first, marks dead ends and backs up, then writes the steps found and the
            expression:

              Numbers 7 15 10, target 18. Try moves closest to 18 first, back up at dead ends.
              try 10+7=17 left 15 17
              try 17+15=32 no
              try 17-15=2 no
              try 17*15=255 no
              back to 7 15 10
              try 15+10=25 left 7 25
              try 25-7=18 yes
              steps: 15+10=25, 25-7=18
              so 15+10-7=18
              \boxed{15+10-7}

Held-out problems never leak into training: whether a problem belongs to 'train' or 'eval' is a
hash of its canonical form (operands, or sorted numbers and target), so the splits are disjoint
whatever the seeds, counts and difficulties of the calls that made them, provided they agree on
`eval_fraction`. Generation is deterministic in (family, split, seed, difficulties, options).

Lengths: long CoTs are ~40-150 tokens at the easy levels and grow with difficulty; a problem
whose long CoT would exceed `max_cot_tokens` (as counted by `approx_tokens`, which mimics the
digit-splitting tokenizer of k15.tokenizer) is not generated.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import os
import random
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from k15 import tokenizer
from k15.data import prompts

FAMILIES = ("arithmetic", "countdown")
SPLITS = ("train", "eval")
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_MAX_COT_TOKENS = 300
_MAX_ATTEMPTS_PER_PROBLEM = 5000


@dataclasses.dataclass(frozen=True)
class Problem:
  """One synthetic problem and its two demonstrations."""
  id: str
  family: str  # 'arithmetic' | 'countdown'
  difficulty: int  # digits per operand (arithmetic), count of given numbers (countdown)
  prompt: str  # the question, without the chat template
  answer: str  # the reference answer: the result (arithmetic), the target (countdown)
  long_cot: str  # long chain of thought ending in \boxed{answer}
  short_cot: str  # short demonstration: the boxed answer alone
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_record(self, with_cot: bool = True) -> prompts.PromptRecord:
    """The problem in the prompt-set schema; the demonstrations go to meta when with_cot."""
    meta = dict(self.meta, level=self.difficulty)
    if with_cot:
      meta.update(long_cot=self.long_cot, short_cot=self.short_cot)
    return prompts.PromptRecord(
        id=self.id, prompt=self.prompt, answer=self.answer, domain=self.family,
        tags=(self.family, f"level:{self.difficulty}"), difficulty=float(self.difficulty),
        meta=meta)


_TOKEN = re.compile(r"\\boxed\{|\d|[A-Za-z]+|\n|\S")


def approx_tokens(text: str) -> int:
  """Token count under a digit-splitting BPE tokenizer trained on these tasks, roughly.

  One token per digit, word, newline, other symbol and \\boxed{, plus one for each space that
  precedes something that is not a word (SentencePiece then keeps the space as its own piece).
  """
  return len(_TOKEN.findall(text)) + len(re.findall(r" (?=[^A-Za-z\s])", text))


def split_of(key: str, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> str:
  """'eval' or 'train' for a canonical problem key, by its SHA-256 (stable across runs)."""
  h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
  return "eval" if h / 2**64 < eval_fraction else "train"


# ---------------------------------------------------------------------------------------------
# Arithmetic.
# ---------------------------------------------------------------------------------------------

_ARITHMETIC_OPS = ("+", "-", "*")


def _arithmetic_sample(rng: random.Random, level: int, ops: Sequence[str]) -> tuple[int, str, int]:
  op = rng.choice(ops)
  lo, hi = 10**(level - 1), 10**level
  a = rng.randrange(lo, hi)
  if op == "*":
    return a, op, rng.randrange(2, 10)
  b = rng.randrange(lo, hi)
  if op == "-" and b > a:
    a, b = b, a
  return a, op, b


def _arithmetic_key(a: int, op: str, b: int) -> str:
  if op in "+*":  # commutative: 925+4738 is the same problem as 4738+925
    a, b = max(a, b), min(a, b)
  return f"arithmetic:{a}{op}{b}"


def _arithmetic_long_cot(a: int, op: str, b: int, slip: Callable[[], bool] | None = None,
                         recheck: Callable[[], bool] | None = None) -> tuple[str, int]:
  """Column-by-column working (least significant digit first), then an inverse-op check.

  With `slip`, a careless demonstrator: wherever a carry (borrow) is due and slip() is true,
  it writes "carry 0" (borrow 0) and goes on, so the working, the check it claims and the
  boxed result are all wrong. With `recheck`, an over-careful one: after a column where
  recheck() is true it restates that column's working once more (redundant tokens that change
  nothing, the overthinking long2short, §2.4, trims). Returns (the working, its result).
  """
  forget = slip or (lambda: False)
  again = recheck or (lambda: False)
  digits_a = [int(c) for c in reversed(str(a))]
  digits_b = [int(c) for c in reversed(str(b))]
  lines, so_far = [], ""

  def column(work: str, value: int, digit: int, word: str, out: int) -> None:
    lines.append(f"{work}={value}, {word} {out}, so far {so_far}")
    if again():
      lines.append(f"recheck {work} is {value}, digit {digit}, {word} {out}, yes")
  if op == "+":
    lines.append("Add the columns from the right, carrying.")
    carry = 0
    for i in range(max(len(digits_a), len(digits_b))):
      x = digits_a[i] if i < len(digits_a) else 0
      y = digits_b[i] if i < len(digits_b) else 0
      s = x + y + carry
      so_far = str(s % 10) + so_far
      new_carry = 0 if s >= 10 and forget() else s // 10
      column(f"{x}+{y}+{carry}", s, s % 10, "carry", new_carry)
      carry = new_carry
    if carry:
      so_far = str(carry) + so_far
      lines.append(f"last carry {carry}, so far {so_far}")
    result = int(so_far)
    lines.append(f"check: {result}-{b}={a} ok")
  elif op == "-":
    lines.append("Subtract the columns from the right, borrowing.")
    borrow = 0
    for i in range(len(digits_a)):
      x = digits_a[i]
      y = digits_b[i] if i < len(digits_b) else 0
      if x - borrow >= y:
        d, lead, new_borrow = x - y - borrow, f"{x}", 0
      else:
        d, lead, new_borrow = 10 + x - y - borrow, f"1{x}", 0 if forget() else 1
      so_far = str(d) + so_far
      column(f"{lead}-{y}-{borrow}", d, d, "borrow", new_borrow)
      borrow = new_borrow
    result = int(so_far)
    if str(result) != so_far:
      lines.append(f"drop leading zeros: {result}")
    lines.append(f"check: {result}+{b}={a} ok")
  elif op == "*":
    lines.append("Multiply each digit from the right, carrying.")
    carry = 0
    for x in digits_a:
      p = x * b + carry
      so_far = str(p % 10) + so_far
      new_carry = 0 if p >= 10 and forget() else p // 10
      column(f"{x}*{b}+{carry}", p, p % 10, "carry", new_carry)
      carry = new_carry
    if carry:
      so_far = str(carry) + so_far
      lines.append(f"last carry {carry}, so far {so_far}")
    result = int(so_far)
    lines.append(f"check: {result}/{b}={a} ok")
  else:
    raise ValueError(f"unknown arithmetic op {op!r}; expected one of {_ARITHMETIC_OPS}")
  lines.append(f"\\boxed{{{result}}}")
  return "\n".join(lines), result


_Made = tuple[str | None, dict[str, Any] | None]  # (canonical key, fields) or no problem


def without_rechecks(long_cot: str) -> str:
  """A long CoT less its restated columns (the `recheck` lines of `_arithmetic_long_cot`): the
  same working in fewer tokens, the short-CoT demonstrations of long2short's merge (§2.4)."""
  return "\n".join(line for line in long_cot.split("\n") if not line.startswith("recheck "))


def _make_arithmetic(rng: random.Random, level: int, split: str, eval_fraction: float,
                     max_cot_tokens: int, ops: Sequence[str] = ("+",),
                     carry_slip: float = 0.0, recheck: float = 0.0) -> _Made:
  if not 1 <= level <= 30:
    raise ValueError(f"arithmetic difficulty (digits per operand) must be in 1..30, got {level}")
  bad = [o for o in ops if o not in _ARITHMETIC_OPS]
  if not ops or bad:
    raise ValueError(f"arithmetic ops {list(ops)} must be a non-empty subset of "
                     f"{_ARITHMETIC_OPS}")
  a, op, b = _arithmetic_sample(rng, level, ops)
  key = _arithmetic_key(a, op, b)
  if split_of(key, eval_fraction) != split:
    return key, None
  for name, value in (("carry_slip", carry_slip), ("recheck", recheck)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"arithmetic option {name}={value} must be in [0, 1]")
  # Slips and rechecks draw from their own streams, seeded by the problem, so that these
  # options change the demonstrations and never which problems are generated.
  slip_rng = random.Random(f"k15.tasks/slip/{key}")
  recheck_rng = random.Random(f"k15.tasks/recheck/{key}")
  long_cot, shown = _arithmetic_long_cot(
      a, op, b, slip=lambda: slip_rng.random() < carry_slip,
      recheck=lambda: recheck_rng.random() < recheck)
  if approx_tokens(long_cot) > max_cot_tokens:
    raise ValueError(f"arithmetic at difficulty {level} needs ~{approx_tokens(long_cot)} tokens "
                     f"of chain of thought, over max_cot_tokens={max_cot_tokens}")
  result = {"+": a + b, "-": a - b, "*": a * b}[op]
  return key, dict(prompt=f"What is {a} {op} {b}?", answer=str(result), long_cot=long_cot,
                   short_cot=f"\\boxed{{{shown}}}", meta={"a": a, "op": op, "b": b})


_INT = re.compile(r"[+-]?\d+")


def grade_arithmetic(answer: str, response: str) -> float:
  """1.0 if the last \\boxed{} of `response` holds exactly the integer `answer`, else 0.0."""
  boxed = prompts.last_boxed(response)
  if boxed is None or not _INT.fullmatch(boxed.strip()):
    return 0.0
  return float(int(boxed.strip()) == int(answer))


# A column line of the long CoT: "8+5+0=13, carry 1, ..." (also "7*3+0=21, carry 2, ...") and
# "13-5-0=8, borrow 1, ..." (the leading 1 of "13" marks the borrow that is due).
_CARRY_LINE = re.compile(r"(\d+)[+*](\d+)\+(\d+)=(\d+), carry (\d+)")
_BORROW_LINE = re.compile(r"(\d+)-(\d+)-(\d+)=(\d+), borrow (\d+)")


def carry_slips(cot: str) -> tuple[int, int]:
  """(carries due, carries forgotten) in the column lines of an arithmetic chain of thought.

  A carry is due where a column's written value is 10 or more (a borrow, where the column's
  digit is written with its borrowed 1, "13-5-0"), and forgotten where that line then says
  "carry 0" ("borrow 0"): the careless demonstrator's slip (option `carry_slip`), counted in
  what a model writes. Recheck lines restate a column and are not counted again; lines that do
  not parse (a model's garbled ones) are skipped.
  """
  due = forgotten = 0
  for line in cot.splitlines():
    m = _CARRY_LINE.match(line)
    if m:
      owed, written = int(m[4]) >= 10, int(m[5])
    else:
      m = _BORROW_LINE.match(line)
      if not m:
        continue
      owed, written = int(m[1]) >= 10, int(m[5])
    due += owed
    forgotten += owed and written == 0
  return due, forgotten


# ---------------------------------------------------------------------------------------------
# Countdown.
# ---------------------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclasses.dataclass(frozen=True)
class _Item:
  value: int
  expr: str
  precedence: int = 3  # a bare number binds tighter than any operator


class _Move(NamedTuple):
  i: int  # positions in the state of the two operands
  j: int
  op: str
  x: _Item  # the larger operand
  y: _Item
  result: _Item


def _combine(x: _Item, op: str, y: _Item) -> _Item:
  """x op y, with parentheses only where Python precedence needs them."""
  p = _PRECEDENCE[op]
  left = x.expr if x.precedence >= p else f"({x.expr})"
  right_bare = y.precedence > p or (y.precedence == p and op in "+*")
  right = y.expr if right_bare else f"({y.expr})"
  if op == "+":
    value = x.value + y.value
  elif op == "-":
    value = x.value - y.value
  elif op == "*":
    value = x.value * y.value
  else:
    value = x.value // y.value
  return _Item(value, f"{left}{op}{right}", p)


def _moves(state: Sequence[_Item], target: int) -> list[_Move]:
  """Every move on a pair of the state, those landing closest to the target first.

  The larger operand goes first so that subtraction and division keep results positive
  integers (divisions must be exact); a move whose resulting state repeats an earlier move's
  (1*x and x/1, say) is dropped.
  """
  moves, seen = [], set()
  for i in range(len(state)):
    for j in range(i + 1, len(state)):
      x, y = (state[i], state[j]) if state[i].value >= state[j].value else (state[j], state[i])
      for op in "+-*/":
        if (op == "-" and x.value == y.value) or (op == "/" and x.value % y.value):
          continue
        result = _combine(x, op, y)
        rest = tuple(sorted([s.value for k, s in enumerate(state) if k not in (i, j)]
                            + [result.value]))
        if rest not in seen:
          seen.add(rest)
          moves.append(_Move(i, j, op, x, y, result))
  return sorted(moves, key=lambda m: abs(m.result.value - target))  # stable: ties keep order


def _search(numbers: Sequence[int], target: int,
            max_lines: int) -> tuple[list[str], list[str], _Item] | None:
  """Depth-first search; returns (trace lines, solution steps, solution) or None.

  A move that yields the target ends the search (each number is used at most once, not
  necessarily all). A move leaving one number, not the target, is a dead end ('no'); one
  leading to a state already explored is marked 'seen'. After a subtree fails, 'back to
  <state>' says where the search resumes. None if not found within max_lines lines.
  """
  lines: list[str] = []
  visited: set[tuple[int, ...]] = set()

  def show(state: Sequence[_Item]) -> str:
    return " ".join(str(s.value) for s in state)

  def dfs(state: tuple[_Item, ...], steps: list[str]):
    for move in _moves(state, target):
      if len(lines) >= max_lines:
        return None
      item = move.result
      step = f"{move.x.value}{move.op}{move.y.value}={item.value}"
      rest = tuple(s for k, s in enumerate(state) if k not in (move.i, move.j)) + (item,)
      if item.value == target:
        lines.append(f"try {step} yes")
        return steps + [step], item
      key = tuple(sorted(s.value for s in rest))
      if len(rest) == 1 or key in visited:
        lines.append(f"try {step} {'no' if len(rest) == 1 else 'seen'}")
        continue
      visited.add(key)
      lines.append(f"try {step} left {show(rest)}")
      found = dfs(rest, steps + [step])
      if found:
        return found
      if len(lines) >= max_lines:
        return None
      lines.append(f"back to {show(state)}")
    return None

  found = dfs(tuple(_Item(n, str(n)) for n in numbers), [])
  if found is None:
    return None
  steps, item = found
  return lines, steps, item


def _reachable(numbers: Sequence[int], max_count: int) -> set[int]:
  """Values reachable with + - * / from at most `max_count` of the numbers (positive ints)."""
  values: dict[int, set[int]] = {}  # subset bitmask -> its reachable values
  out: set[int] = set()
  masks = sorted(range(1, 1 << len(numbers)), key=lambda m: bin(m).count("1"))
  for mask in masks:
    size = bin(mask).count("1")
    if size > max_count:
      break
    if size == 1:
      values[mask] = {numbers[mask.bit_length() - 1]}
    else:
      reach = set()
      sub = (mask - 1) & mask
      while sub:  # every split of the subset into two non-empty halves
        if sub < mask ^ sub:
          for a in values[sub]:
            for b in values[mask ^ sub]:
              x, y = max(a, b), min(a, b)
              reach.update((x + y, x * y))
              if x != y:
                reach.add(x - y)
              if x % y == 0:
                reach.add(x // y)
        sub = (sub - 1) & mask
      values[mask] = reach
    out |= values[mask]
  return out


def _countdown_target(rng: random.Random, numbers: Sequence[int], lo: int, hi: int) -> int | None:
  """A target made by combining all the numbers in a random order with random exact ops."""
  order = list(numbers)
  rng.shuffle(order)
  value = order[0]
  for n in order[1:]:
    op = rng.choice("+-*/")
    if op == "+":
      value += n
    elif op == "-":
      value = abs(value - n)
    elif op == "*":
      value *= n
    elif value % n == 0:
      value //= n
    else:
      value += n
  return value if lo <= value <= hi and value not in numbers else None


def _make_countdown(rng: random.Random, level: int, split: str, eval_fraction: float,
                    max_cot_tokens: int, max_number: int = 15,
                    target_range: Sequence[int] = (10, 99), search_cap: int = 0,
                    search_stop: float = 0.0) -> _Made:
  """A countdown problem whose search (see `_search`) succeeds within max_cot_tokens.

  `search_cap` > 0 and `search_stop` > 0 model a demonstrator who gives up early, the SFT data
  of the length study (the paper's ablation: longer responses, better answers). With a cap it
  writes at most that many search lines; with `search_stop` it gives up after each line that
  misses the target with that probability (drawn from the problem's own key, so the habit
  never changes which problems exist). A search that gives up ends with "stop: no answer in N
  tries" and no \\boxed{} answer. Such a demonstration still shows the format and the search,
  and it is kept rather than dropped, for two reasons: like the arithmetic demonstrator's
  habits, giving up changes demonstrations and never which problems exist (dropping would
  leave SFT only the problems a short search solves, so the SFT set would be easier than the
  RL and held-out sets); and it teaches the habit RL is to unlearn, so that RL with a longer
  token budget can find what the short search misses.

  The cap alone teaches less than it seems: the greedy path takes 2 lines at 3 numbers, the
  first backtrack comes after 5 or more, so a cap of 4 shows no demonstration that backs up,
  and RL would have to invent backtracking. A stop probability keeps the long searches in the
  data, fewer of them the longer they are, and gives the SFT model a length distribution that
  RL can shift.
  """
  if not 2 <= level <= 6:
    raise ValueError(f"countdown difficulty (count of numbers) must be in 2..6, got {level}")
  lo, hi = target_range
  if max_number < 1 or not 1 <= lo <= hi:
    raise ValueError(f"countdown needs max_number >= 1 and 1 <= target_range[0] <= "
                     f"target_range[1], got max_number={max_number}, target_range={target_range}")
  numbers = [rng.randint(1, max_number) for _ in range(level)]
  target = _countdown_target(rng, numbers, lo, hi)
  if target is None:
    return None, None
  key = f"countdown:{sorted(numbers)}:{target}"
  if split_of(key, eval_fraction) != split:
    return key, None
  # Without this, more numbers would make problems easier: some pair usually hits the target.
  if target in _reachable(numbers, min(level, 4) - 1):
    return key, None
  # Each trace line is ~12 tokens; the header and the ending ~25 + 4 per step.
  found = _search(numbers, target, max_lines=max(1, (max_cot_tokens - 40) // 12))
  if found is None:
    return key, None
  lines, steps, item = found
  shown = " ".join(map(str, numbers))
  header = (f"Numbers {shown}, target {target}. Try moves closest to {target} first, "
            "back up at dead ends.")
  ending = [f"steps: {', '.join(steps)}", f"so {item.expr}={target}", f"\\boxed{{{item.expr}}}"]
  if approx_tokens("\n".join([header] + lines + ending)) > max_cot_tokens:
    return key, None
  if search_cap < 0:
    raise ValueError(f"countdown option search_cap={search_cap} must be >= 0 (0: no cap)")
  if not 0.0 <= search_stop < 1.0:
    raise ValueError(f"countdown option search_stop={search_stop} must be in [0, 1)")
  written = len(lines) if not search_cap else min(len(lines), search_cap)
  if search_stop:
    give_up = random.Random(f"{key}/search_stop")
    # Lines before the last one all miss the target; the last one may be the answer.
    written = next((n for n in range(1, written) if give_up.random() < search_stop), written)
  solved = written == len(lines)
  if solved:
    long_cot = "\n".join([header] + lines + ending)
  else:  # the demonstrator stops where it gives up, without an answer
    long_cot = "\n".join([header] + lines[:written] + [f"{GIVE_UP} {written} tries"])
  prompt = (f"Reach {target} with the numbers {shown}, using + - * / and each number at "
            "most once.")
  return key, dict(prompt=prompt, answer=str(target), long_cot=long_cot,
                   short_cot=f"\\boxed{{{item.expr}}}",
                   meta={"numbers": list(numbers), "target": target,
                         "search_lines": len(lines), "demo_solved": solved})


# How the countdown demonstrator who gives up ends a search without an answer.
GIVE_UP = "stop: no answer in"


def gave_up(response: str) -> bool:
  """Whether a countdown response ends its search the way the demonstrator gives up."""
  return GIVE_UP in response


class _Invalid(Exception):
  pass


def _evaluate(node: ast.AST, used: list[int]) -> int:
  """Integer value of a + - * / expression tree; exact divisions only; collects literals."""
  if isinstance(node, ast.Expression):
    return _evaluate(node.body, used)
  if (isinstance(node, ast.Constant) and isinstance(node.value, int)
      and not isinstance(node.value, bool)):
    used.append(node.value)
    return node.value
  if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
    x, y = _evaluate(node.left, used), _evaluate(node.right, used)
    if isinstance(node.op, ast.Add):
      return x + y
    if isinstance(node.op, ast.Sub):
      return x - y
    if isinstance(node.op, ast.Mult):
      return x * y
    if y == 0 or x % y:
      raise _Invalid(f"{x}/{y} is not an exact integer division")
    return x // y
  raise _Invalid(f"not allowed in a countdown expression: {ast.dump(node)[:40]}")


def countdown_error(expression: str, numbers: Sequence[int], target: int) -> str | None:
  """Why `expression` does not solve the countdown problem, or None if it does."""
  text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
  if "=" in text:  # "7*3+5-2=24": the part before '=' is the expression
    text, _, rhs = text.partition("=")
    if rhs.strip() != str(target):
      return f"right-hand side {rhs.strip()!r} is not the target {target}"
  if not text or len(text) > 200:
    return "empty or over-long expression"
  try:
    with warnings.catch_warnings():  # a model's "15gyes" would warn "invalid decimal literal"
      warnings.simplefilter("ignore", SyntaxWarning)
      tree = ast.parse(text, mode="eval")
  except SyntaxError:
    return f"cannot parse {text!r}"
  used: list[int] = []
  try:
    value = _evaluate(tree, used)
  except _Invalid as e:
    return str(e)
  extra = collections.Counter(used) - collections.Counter(numbers)
  if extra:
    return f"uses {dict(extra)} beyond the given numbers {list(numbers)}"
  if value != target:
    return f"evaluates to {value}, not {target}"
  return None


def verify_countdown(expression: str, numbers: Sequence[int], target: int) -> bool:
  """True iff `expression` uses only + - * / (exact divisions), integer literals from `numbers`
  each at most as often as given, and equals `target`.
  """
  return countdown_error(expression, numbers, target) is None


def grade_countdown(answer: str, response: str, numbers: Sequence[int]) -> float:
  """1.0 if the last \\boxed{} of `response` is an expression reaching the target `answer`."""
  boxed = prompts.last_boxed(response)
  if boxed is None:
    return 0.0
  return float(verify_countdown(boxed, numbers, int(answer)))


# ---------------------------------------------------------------------------------------------
# Generation and grading.
# ---------------------------------------------------------------------------------------------

_MAKERS: dict[str, Callable[..., _Made]] = {
    "arithmetic": _make_arithmetic,
    "countdown": _make_countdown,
}
_OPTIONS = {"arithmetic": ("ops", "carry_slip", "recheck"),
            "countdown": ("max_number", "target_range", "search_cap", "search_stop")}


def generate(family: str, n: int, *, seed: int, difficulties: Sequence[int],
             split: str = "train", eval_fraction: float = DEFAULT_EVAL_FRACTION,
             max_cot_tokens: int = DEFAULT_MAX_COT_TOKENS, unique: bool | None = None,
             **options: Any) -> list[Problem]:
  """Generates n problems of one family, deterministically from `seed`.

  Args:
    family: 'arithmetic' or 'countdown'.
    n: number of problems.
    seed: the same seed (and arguments) gives the same problems.
    difficulties: levels, cycled over the problems: problem i has difficulties[i % len].
    split: 'train' or 'eval'; the split of a problem is a hash of its canonical form, so the
      two are disjoint (see the module docstring).
    eval_fraction: share of all problems that belong to 'eval'; use one value everywhere.
    max_cot_tokens: longest long CoT allowed, in `approx_tokens`.
    unique: no problem twice in the result; defaults to True for 'eval' (a repeated test
      question would weigh double) and False for 'train'.
    **options: family options: arithmetic `ops` (subset of '+-*', default ('+',)) and
      `carry_slip` (default 0: the chance that a demonstration forgets a due carry or borrow;
      `answer` stays right, the demonstrations arrive at the wrong result) and `recheck`
      (default 0: the chance that a column's working is restated once more);
      countdown `max_number` (default 15), `target_range` (default (10, 99)) and
      `search_cap` (default 0, none: the most search lines a demonstration writes) and
      `search_stop` (default 0: the chance of giving up after each line; see
      `_make_countdown`).

  Returns:
    The problems; ids are "<family>-<split>-<seed>-<index>".
  """
  if family not in FAMILIES:
    raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
  unknown = sorted(set(options) - set(_OPTIONS[family]))
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} for {family}; known: {_OPTIONS[family]}")
  if not difficulties:
    raise ValueError("difficulties must list at least one level")
  unique = split == "eval" if unique is None else unique
  rng = random.Random(f"k15.tasks/{family}/{split}/{seed}")
  make = _MAKERS[family]
  seen: set[str] = set()
  out = []
  for index in range(n):
    level = int(difficulties[index % len(difficulties)])
    for _ in range(_MAX_ATTEMPTS_PER_PROBLEM):
      key, fields = make(rng, level, split, eval_fraction, max_cot_tokens, **options)
      if fields is not None and not (unique and key in seen):
        break
    else:
      why = (f"too few distinct {split} problems at this level ({len(seen)} found so far) "
             "for unique=True, or " if unique else "")
      raise ValueError(
          f"could not generate {family} problem {index} ({split}, difficulty {level}) in "
          f"{_MAX_ATTEMPTS_PER_PROBLEM} attempts: {why}max_cot_tokens={max_cot_tokens} is too "
          "small for this level")
    seen.add(key)
    out.append(Problem(id=f"{family}-{split}-{seed}-{index:06d}", family=family,
                       difficulty=level, meta=dict(fields.pop("meta"), key=key), **fields))
  return out


def grade(problem: Problem | prompts.PromptRecord, response: str) -> float:
  """Grade of a response to a synthetic problem: 1.0 if its last \\boxed{} is right, else 0.0.

  Takes a Problem or its PromptRecord (family from `domain`; countdown needs meta['numbers']).
  """
  family = getattr(problem, "family", None) or getattr(problem, "domain", None)
  if family == "arithmetic":
    return grade_arithmetic(problem.answer, response)
  if family == "countdown":
    numbers = problem.meta.get("numbers")
    if numbers is None:
      raise ValueError(f"countdown problem {problem.id!r} has no meta['numbers'] to grade with")
    return grade_countdown(problem.answer, response, numbers)
  raise ValueError(f"problem {problem.id!r} is of family {family!r}, not one of {FAMILIES}")


def training_texts(problems: Iterable[Problem]) -> list[str]:
  """Texts to train the tokenizer on: each problem's prompt and both demonstrations, with the
  chat template's words so that they become pieces too."""
  texts = []
  for p in problems:
    texts.append(tokenizer.PROMPT_TEMPLATE.format(question=p.prompt) + " " + p.long_cot)
    texts.append(p.short_cot)
  return texts


def write_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str], *,
                with_cot: bool = True) -> int:
  """Writes problems in the prompt-set schema of k15.data.prompts; returns the count."""
  return prompts.write_jsonl((p.to_record(with_cot) for p in problems), path)


def from_record(record: prompts.PromptRecord) -> Problem:
  """The Problem back from a record written by `write_jsonl(..., with_cot=True)`."""
  meta = dict(record.meta)
  try:
    level, long_cot, short_cot = meta.pop("level"), meta.pop("long_cot"), meta.pop("short_cot")
  except KeyError as e:
    raise ValueError(f"record {record.id!r} lacks meta[{e.args[0]!r}]; was it written by "
                     "tasks.write_jsonl with with_cot=True?") from None
  return Problem(id=record.id, family=record.domain, difficulty=int(level), prompt=record.prompt,
                 answer=record.answer, long_cot=long_cot, short_cot=short_cot, meta=meta)
