"""Tests for k15.data.tasks: determinism, disjoint splits, correct demonstrations, grading."""

import collections
import re
import statistics

import pytest

from k15.data import prompts
from k15.data import tasks

ARITHMETIC_LEVELS = [1, 2, 3, 4, 5, 6, 7, 8]
COUNTDOWN_LEVELS = [2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def arithmetic():
  return tasks.generate("arithmetic", 480, seed=0, difficulties=ARITHMETIC_LEVELS,
                        ops=("+", "-", "*"))


@pytest.fixture(scope="module")
def countdown():
  return tasks.generate("countdown", 250, seed=0, difficulties=COUNTDOWN_LEVELS)


@pytest.mark.parametrize("family,levels", [("arithmetic", [2, 5]), ("countdown", [3, 5])])
def test_deterministic_from_seed(family, levels):
  a = tasks.generate(family, 30, seed=7, difficulties=levels)
  b = tasks.generate(family, 30, seed=7, difficulties=levels)
  c = tasks.generate(family, 30, seed=8, difficulties=levels)
  assert a == b
  assert [p.prompt for p in a] != [p.prompt for p in c]
  assert [p.difficulty for p in a] == [levels[i % len(levels)] for i in range(30)]
  assert len({p.id for p in a}) == 30


@pytest.mark.parametrize("family,levels", [("arithmetic", [2, 3]), ("countdown", [3, 4])])
def test_train_and_eval_are_disjoint(family, levels):
  train = tasks.generate(family, 1500, seed=0, difficulties=levels, split="train")
  evals = tasks.generate(family, 100, seed=0, difficulties=levels, split="eval")
  train_keys = {p.meta["key"] for p in train}
  eval_keys = [p.meta["key"] for p in evals]
  assert len(set(eval_keys)) == len(eval_keys)  # eval defaults to unique problems
  assert not train_keys & set(eval_keys)
  # Disjoint by construction: the split is a function of the problem alone, whatever the seed.
  assert all(tasks.split_of(k) == "eval" for k in eval_keys)
  other_seed = tasks.generate(family, 300, seed=123, difficulties=levels, split="train")
  assert not {p.meta["key"] for p in other_seed} & set(eval_keys)
  # Commutative duplicates share a key: 925 + 4738 is the same problem as 4738 + 925.
  if family == "arithmetic":
    assert tasks._arithmetic_key(925, "+", 4738) == tasks._arithmetic_key(4738, "+", 925)


def test_arithmetic_demonstrations_are_correct(arithmetic):
  ops = collections.Counter(p.meta["op"] for p in arithmetic)
  assert set(ops) == {"+", "-", "*"}
  for p in arithmetic:
    a, op, b = p.meta["a"], p.meta["op"], p.meta["b"]
    assert p.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
    assert tasks.grade(p, p.long_cot) == 1.0, p.long_cot
    assert tasks.grade(p, p.short_cot) == 1.0
    assert p.prompt == f"What is {a} {op} {b}?"
    # Every step of the working is true arithmetic, and the last partial result is the answer.
    steps = re.findall(r"^(\d+)([+*-])(\d+)[+-](\d+)=(\d+), (?:carry|borrow) (\d)",
                       p.long_cot, flags=re.M)
    assert len(steps) == len(str(a))
    for x, o, y, c, s, c_out in steps:
      x, y, c, s, c_out = map(int, (x, y, c, s, c_out))
      if o == "-":  # "13-9-1=3, borrow 1": the top digit was lent 10
        assert s == x - y - c and c_out == (x >= 10)
      else:
        assert s == (x + y + c if o == "+" else x * y + c) and c_out == s // 10
    partials = re.findall(r"so far (\d+)", p.long_cot)
    assert int(partials[-1]) == int(p.answer)
    assert re.search(r"^check: \d+[-+/]\d+=\d+ ok$", p.long_cot, flags=re.M)


def test_subtraction_borrows_correctly():
  (p,) = [p for p in tasks.generate("arithmetic", 200, seed=3, difficulties=[4], ops=("-",))
          if "borrow 1" in p.long_cot][:1]
  for top, y, borrow, d in re.findall(r"^(\d+)-(\d)-(\d)=(\d),", p.long_cot, flags=re.M):
    assert int(top) - int(y) - int(borrow) == int(d)
  assert tasks.grade(p, p.long_cot) == 1.0


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_carry_slip_makes_careless_demonstrations(op):
  n = 300
  clean = tasks.generate("arithmetic", n, seed=5, difficulties=[3, 4], ops=(op,))
  careless = tasks.generate("arithmetic", n, seed=5, difficulties=[3, 4], ops=(op,),
                            carry_slip=0.6)
  # The same problems and reference answers; only the demonstrations change.
  assert [p.prompt for p in careless] == [p.prompt for p in clean]
  assert [p.answer for p in careless] == [p.answer for p in clean]
  word = "borrow" if op == "-" else "carry"
  due = forgotten = wrong = 0
  for p in careless:
    for x, y, c, s, c_out in re.findall(rf"^(\d+)[-+*](\d+)[-+](\d)=(\d+), {word} (\d)",
                                        p.long_cot, flags=re.M):
      x, y, c, s, c_out = map(int, (x, y, c, s, c_out))
      owed = int(x >= 10) if op == "-" else s // 10
      assert c_out in (0, owed)  # a slip drops a due carry; it never makes one up
      due += owed > 0
      forgotten += owed > 0 and c_out == 0
    shown = prompts.last_boxed(p.long_cot)
    # The working is self-consistent: the box repeats the last partial result, the short
    # demonstration gives the same (wrong or right) answer, and a slip makes it wrong.
    assert int(shown) == int(re.findall(r"so far (\d+)", p.long_cot)[-1]) or op == "-"
    assert p.short_cot == f"\\boxed{{{shown}}}"
    wrong += tasks.grade(p, p.long_cot) == 0.0
  assert due > 200 and abs(forgotten / due - 0.6) < 0.08
  slipped = sum(" 0, so far" in p.long_cot for p in careless)  # loose upper bound
  assert 0.3 * n < wrong <= slipped
  assert all(tasks.grade(p, p.long_cot) == 1.0 for p in clean)
  with pytest.raises(ValueError, match="carry_slip"):
    tasks.generate("arithmetic", 2, seed=0, difficulties=[2], carry_slip=1.5)


def test_recheck_adds_redundant_lines_only():
  clean = tasks.generate("arithmetic", 200, seed=6, difficulties=[3, 4], ops=("+", "-", "*"))
  verbose = tasks.generate("arithmetic", 200, seed=6, difficulties=[3, 4], ops=("+", "-", "*"),
                           recheck=0.75)
  columns = rechecks = 0
  for c, v in zip(clean, verbose):
    assert c.prompt == v.prompt and c.short_cot == v.short_cot
    lines = v.long_cot.split("\n")
    # Dropping the recheck lines gives back the plain demonstration, so they carry nothing new.
    assert "\n".join(l for l in lines if not l.startswith("recheck ")) == c.long_cot
    for prev, line in zip(lines, lines[1:]):
      if line.startswith("recheck "):
        work, value = re.match(r"recheck (\S+) is (\d+),", line).groups()
        assert prev.startswith(f"{work}={value},")
    columns += len(re.findall(r", (?:carry|borrow) \d, so far", v.long_cot))
    rechecks += sum(l.startswith("recheck ") for l in lines)
    assert tasks.grade(v, v.long_cot) == 1.0
  assert abs(rechecks / columns - 0.75) < 0.06


def test_countdown_demonstrations_are_correct(countdown):
  assert {p.difficulty for p in countdown} == set(COUNTDOWN_LEVELS)
  backtracked = 0
  for p in countdown:
    numbers, target = p.meta["numbers"], p.meta["target"]
    assert len(numbers) == p.difficulty and p.answer == str(target)
    assert tasks.grade(p, p.long_cot) == 1.0, p.long_cot
    assert tasks.grade(p, p.short_cot) == 1.0
    assert tasks.verify_countdown(prompts.last_boxed(p.long_cot), numbers, target)
    for x, op, y, z in re.findall(r"try (\d+)([-+*/])(\d+)=(\d+)", p.long_cot):
      x, y, z = int(x), int(y), int(z)
      assert z == {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op] and (op != "/" or
                                                                               x % y == 0)
    assert p.long_cot.count(" yes") == 1
    backtracked += "back to" in p.long_cot
    # No solution uses fewer than min(difficulty, 4) numbers: more numbers, deeper search.
    assert target not in tasks._reachable(numbers, min(p.difficulty, 4) - 1)
  assert backtracked >= len(countdown) // 10  # the search really has dead ends


def test_wrong_answers_grade_zero(arithmetic, countdown):
  p = arithmetic[10]
  right = int(p.answer)
  assert tasks.grade(p, f"\\boxed{{{right + 1}}}") == 0.0
  assert tasks.grade(p, f"{right}") == 0.0  # no box
  assert tasks.grade(p, f"\\boxed{{{right}}} then \\boxed{{{right - 1}}}") == 0.0  # last counts
  assert tasks.grade(p, f"\\boxed{{{right}.5}}") == 0.0
  assert tasks.grade(p, f"\\boxed{{ {right} }}") == 1.0
  q = countdown[5]
  assert tasks.grade(q, "\\boxed{" + q.answer + "}") == 0.0  # the target is not an expression
  assert tasks.grade(q, "no answer") == 0.0
  assert tasks.grade(q, q.long_cot + "\n\\boxed{1+1}") == 0.0


@pytest.mark.parametrize("expression,ok", [
    ("7*3+5-2", True),
    ("(7+5)*2", True),
    ("7×3+5−2", True),  # typographic operators
    ("7*3+5-2=24", True),
    ("7*3+5-2=25", False),
    ("7*3+3", False),  # 3 used twice
    ("7*3+5-2+0", False),  # 0 not given
    ("7*3+5", False),  # wrong target (26)
    ("(7*3+5)/2-1", False),  # 26/2=13, 13-1=12: wrong target
    ("(7+5)/5*10", False),  # 12/5 is not an integer division; 10 not given either
    ("7/2*2*3+3", False),
    ("7-7", False),
    ("-2+26", False),  # unary minus and 26 not given
    ("2**3*3", False),
    ("__import__('os')", False),
    ("", False),
])
def test_verify_countdown(expression, ok):
  assert tasks.verify_countdown(expression, [7, 3, 5, 2], 24) is ok


def test_verify_countdown_reasons():
  assert "exact" in tasks.countdown_error("(3+4)/2*7", [3, 4, 2, 7], 24)
  assert "beyond" in tasks.countdown_error("3*3*3", [3, 3, 1], 27)
  assert tasks.countdown_error("3*3*3", [3, 3, 3], 27) is None
  assert "exact" in tasks.countdown_error("5/0", [5, 0], 1)


def test_lengths_grow_with_difficulty_and_respect_the_cap(arithmetic, countdown):
  by_level = collections.defaultdict(list)
  for p in arithmetic:
    by_level[p.difficulty].append(tasks.approx_tokens(p.long_cot))
  means = [statistics.mean(by_level[d]) for d in ARITHMETIC_LEVELS]
  assert means == sorted(means)
  assert 30 <= means[0] and means[1] <= 150
  for p in arithmetic + countdown:
    assert tasks.approx_tokens(p.long_cot) <= tasks.DEFAULT_MAX_COT_TOKENS
    assert tasks.approx_tokens(p.short_cot) < tasks.approx_tokens(p.long_cot)
  small = tasks.generate("countdown", 40, seed=0, difficulties=[4, 5], max_cot_tokens=170)
  assert max(tasks.approx_tokens(p.long_cot) for p in small) <= 170
  with pytest.raises(ValueError, match="max_cot_tokens=100"):
    tasks.generate("arithmetic", 5, seed=0, difficulties=[6], max_cot_tokens=100)


def test_bad_arguments():
  with pytest.raises(ValueError, match="'chess'"):
    tasks.generate("chess", 1, seed=0, difficulties=[1])
  with pytest.raises(ValueError, match="'test'"):
    tasks.generate("arithmetic", 1, seed=0, difficulties=[1], split="test")
  with pytest.raises(ValueError, match="max_numbr"):
    tasks.generate("countdown", 1, seed=0, difficulties=[3], max_numbr=9)
  with pytest.raises(ValueError, match="ops"):
    tasks.generate("arithmetic", 1, seed=0, difficulties=[2], ops=("/",))
  with pytest.raises(ValueError, match="2..6"):
    tasks.generate("countdown", 1, seed=0, difficulties=[9])
  # Only ~45 distinct one-digit additions exist, ~5 of them in eval.
  with pytest.raises(ValueError, match="difficulty 1"):
    tasks.generate("arithmetic", 30, seed=0, difficulties=[1], split="eval")


def test_jsonl_round_trip_and_grading_records(tmp_path, arithmetic, countdown):
  problems = arithmetic[:20] + countdown[:20]
  path = tmp_path / "problems.jsonl"
  assert tasks.write_jsonl(problems, path) == 40
  records, skipped = prompts.load_jsonl(path)
  assert skipped == 0 and len(records) == 40
  assert [tasks.from_record(r) for r in records] == problems
  for record, problem in zip(records, problems):
    assert record.domain == problem.family and record.difficulty == problem.difficulty
    assert f"level:{problem.difficulty}" in record.tags
    assert tasks.grade(record, problem.long_cot) == 1.0
  tasks.write_jsonl(problems, tmp_path / "bare.jsonl", with_cot=False)
  bare, _ = prompts.load_jsonl(tmp_path / "bare.jsonl")
  assert "long_cot" not in bare[0].meta
  with pytest.raises(ValueError, match="long_cot"):
    tasks.from_record(bare[0])
