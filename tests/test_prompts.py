"""Tests for k15.data.prompts: schema, readers, and the §2.1 curation on constructed sets."""

import collections
import json
import logging

import pytest

from k15.data import prompts


def _record(i, prompt=None, answer=None, difficulty=None, **kw):
  return prompts.PromptRecord(id=f"p{i}", prompt=prompt or f"What is {i} + {i}?",
                              answer=str(2 * i) if answer is None else answer, domain="math",
                              difficulty=difficulty, **kw)


def _write(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return path


GOOD = {"id": "a", "prompt": "What is 2+2?", "answer": "4", "domain": "math", "tags": ["x"],
        "difficulty": 0.5}


# ---------------------------------------------------------------------------------------------
# Schema and readers.
# ---------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
  records = [_record(1, difficulty=0.2, tags=("gsm8k",)),
             _record(2, pass_rate=0.7, difficulty=0.3, meta={"numbers": [1, 2]})]
  path = tmp_path / "sub" / "p.jsonl"
  assert prompts.write_jsonl(records, path) == 2
  loaded, skipped = prompts.load_jsonl(path)
  assert loaded == records and skipped == 0


@pytest.mark.parametrize("bad_line,message", [
    ("{not json", "invalid JSON"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "missing key(s) ['answer']"),
    (dict(GOOD, tags="algebra"), "'tags' must be a list of strings"),
    (dict(GOOD, difficulty="hard"), "'difficulty' must be a finite number or null"),
    (dict(GOOD, prompt=""), "'prompt' must be a non-empty string"),
    (dict(GOOD, answer=[4]), "'answer' must be a string"),
    (dict(GOOD, difficulity=0.3), "unknown key(s) ['difficulity']"),
    (dict(GOOD, pass_rate=1.5), "'pass_rate' must lie in [0, 1]"),
    ("[1, 2]", "expected a JSON object"),
    (GOOD, "duplicate id 'a' (first on line 1)"),
])
def test_schema_errors_name_file_and_line(tmp_path, bad_line, message):
  path = _write(tmp_path / "bad.jsonl", [GOOD, "", bad_line])
  with pytest.raises(prompts.PromptFormatError) as e:
    prompts.load_jsonl(path)
  assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_skip_counts_and_logs_malformed_lines(tmp_path, caplog):
  lines = [GOOD, "{oops", dict(GOOD, id="b"), dict(GOOD, id="c", tags=3), "   ",
           dict(GOOD, id="d", answer=7), {"id": "e"}]
  path = _write(tmp_path / "mixed.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    records, skipped = prompts.load_jsonl(path, on_error="skip")
  assert [r.id for r in records] == ["a", "b", "d"]
  assert records[2].answer == "7"  # an integer answer is accepted as its string
  assert skipped == 3
  assert "skipped 3 malformed line(s)" in caplog.text and f"{path}:2:" in caplog.text
  with pytest.raises(ValueError, match="on_error"):
    prompts.load_jsonl(path, on_error="ignore")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    prompts.load_jsonl(tmp_path / "missing.jsonl")


def test_gsm8k_reader(tmp_path):
  path = _write(tmp_path / "gsm8k.jsonl", [
      {"question": "Tom has 40 apples and buys 2. How many?", "answer": "40+2=42\n#### 42"},
      {"question": "A farm sells 1,234 eggs.", "answer": "So it sells\n#### 1,234"},
  ])
  records, _ = prompts.load_prompts(path)  # auto-detected
  assert [r.answer for r in records] == ["42", "1234"]
  assert records[0].prompt.startswith("Tom") and records[0].id == "gsm8k-1"
  assert records[1].tags == ("gsm8k",) and records[1].difficulty is None
  bad = _write(tmp_path / "bad_gsm8k.jsonl", [{"question": "Q?", "answer": "no marker"}])
  with pytest.raises(prompts.PromptFormatError, match=r"bad_gsm8k.jsonl:1: .*####"):
    prompts.load_prompts(bad, "gsm8k")


def test_math_reader(tmp_path):
  path = _write(tmp_path / "math.jsonl", [
      {"problem": "Compute $\\frac{1}{2}+0$.", "level": "Level 3", "type": "Algebra",
       "solution": "We get $\\boxed{1}$ first, then $\\boxed{\\frac{1}{2}}$."},
      {"problem": "Find x.", "level": 5, "subject": "Geometry", "answer": "7",
       "unique_id": "test/geometry/1.json", "solution": "So $x = \\boxed{7}$."},
      {"problem": "Find y.", "level": "Level ?", "type": "Algebra",
       "solution": "Thus y is \\boxed 9."},
  ])
  records, skipped = prompts.load_prompts(path, "auto")
  assert skipped == 0
  assert [r.answer for r in records] == ["\\frac{1}{2}", "7", "9"]
  assert records[0].difficulty == 0.5 and set(records[0].tags) >= {"Algebra", "level:3"}
  assert records[1].id == "test/geometry/1.json" and records[1].difficulty == 1.0
  assert "Geometry" in records[1].tags
  assert records[2].difficulty is None and records[2].id == "math-3"
  bad = _write(tmp_path / "bad_math.jsonl", [{"problem": "P", "solution": "no box"}])
  with pytest.raises(prompts.PromptFormatError, match=r"bad_math.jsonl:1: .*boxed"):
    prompts.load_prompts(bad)
  unknown = _write(tmp_path / "unknown.jsonl", [{"text": "hi"}])
  with pytest.raises(prompts.PromptFormatError, match=r"unknown.jsonl:1: .*\['text'\]"):
    prompts.load_prompts(unknown)


@pytest.mark.parametrize("text,boxed", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("\\fbox{x}", "x"),
    ("\\boxed{unclosed", None),
    ("none here", None),
    ("\\boxed{1} and \\boxed 5", "5"),
])
def test_last_boxed(text, boxed):
  assert prompts.last_boxed(text) == boxed


# ---------------------------------------------------------------------------------------------
# Curation.
# ---------------------------------------------------------------------------------------------

UNEVALUABLE = {
    "Which of the following is prime? (A) 4 (B) 6 (C) 7": "multiple-choice",
    "What is 2+2?\n(A) 3\n(B) 4": "multiple-choice",
    "Pick one.\nA. 12\nB. 13\nC. 14": "multiple-choice",
    "True or false: 7 is prime.": "true/false",
    "Is 9 prime? Answer true/false.": "true/false",
    "Prove that there are infinitely many primes.": "proof",
    "Show that n^2 - n is even for every integer n.": "proof",
    "Let p be prime. prove it has two divisors.": "proof",
}
EVALUABLE = [
    "What is 3 + 4?",
    "A shop improves sales by 10 units a day. How many after 3 days?",  # 'improves' is no proof
    "Find the value of x if 2x = 10.",
    "Alice and Bob (B) share 12 apples equally. How many does each get?",
]


def test_is_unevaluable():
  for i, (prompt, reason) in enumerate(UNEVALUABLE.items()):
    record = _record(i, prompt=prompt)
    assert prompts.is_unevaluable(record) and prompts.unevaluable_reason(record) == reason
  for i, prompt in enumerate(EVALUABLE):
    assert not prompts.is_unevaluable(_record(i, prompt=prompt)), prompt
  assert prompts.unevaluable_reason(_record(1, answer="False")) == "true/false"
  assert prompts.unevaluable_reason(_record(1, answer=" ")) == "no answer"


def _grade(record, response):
  return float(prompts.last_boxed(response) == record.answer)


def test_filter_hackable():
  records = [_record(i) for i in range(12)]
  calls = []

  def answer_fn(batch, n):  # a fake model that guesses the answer to i % 3 == 0 on try i // 3
    calls.append((len(batch), n))
    out = []
    for p in batch:
      i = int(p.split()[2])
      answers = ["\\boxed{-1}"] * n
      if i % 3 == 0 and i // 3 < n:
        answers[i // 3] = f"\\boxed{{{2 * i}}}"
      out.append(answers)
    return out

  kept, dropped = prompts.filter_hackable(records, answer_fn, _grade, n=8, batch_size=5)
  assert [r.id for r in dropped] == ["p0", "p3", "p6", "p9"]
  assert len(kept) == 8 and calls == [(5, 8), (5, 8), (2, 8)]
  kept, dropped = prompts.filter_hackable(records, answer_fn, _grade, n=2)  # p6, p9 need more
  assert [r.id for r in dropped] == ["p0", "p3"]
  with pytest.raises(ValueError, match="expected 8 per prompt"):
    prompts.filter_hackable(records, lambda batch, n: [["x"]] * len(batch), _grade)


def test_label_difficulty_from_known_pass_rates():
  pass_rates = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
  records = [_record(i) for i in range(len(pass_rates))]
  temperatures = []

  def sample_fn(batch, n, temperature):
    temperatures.append(temperature)
    out = []
    for p in batch:
      i = int(p.split()[2])
      k = round(pass_rates[i] * n)
      out.append([f"\\boxed{{{2 * i}}}"] * k + ["\\boxed{wrong}"] * (n - k))
    return out

  labelled = prompts.label_difficulty(records, sample_fn, _grade, n=10, temperature=1.2)
  assert temperatures == [1.2]
  assert [r.pass_rate for r in labelled] == pass_rates
  assert [r.difficulty for r in labelled] == pytest.approx([1 - p for p in pass_rates])
  assert [r.id for r in labelled] == [r.id for r in records]


def _with_difficulties(counts):
  """Records with difficulty spread inside buckets easy [0, 1/3), medium, hard [2/3, 1]."""
  records, i = [], 0
  for lo, count in zip((0.0, 0.4, 0.7), counts):
    for k in range(count):
      records.append(_record(i, difficulty=lo + 0.25 * k / max(count, 1)))
      i += 1
  return records


def test_balance_hits_the_mix():
  mix = {"easy": 0.3, "medium": 0.4, "hard": 0.3}
  records = _with_difficulties((100, 50, 10))
  out = prompts.balance(records, mix, (1 / 3, 2 / 3), seed=0)
  counts = collections.Counter(prompts.bucket_of(r.difficulty, list(mix), (1 / 3, 2 / 3))
                               for r in out)
  # hard (10 prompts at 0.3) limits the total to 33: 10 easy, 13 medium, 10 hard.
  assert counts == {"easy": 10, "medium": 13, "hard": 10}
  assert [r.id for r in out] == [r.id for r in records if r in out]  # input order kept
  assert out == prompts.balance(records, mix, (1 / 3, 2 / 3), seed=0)
  assert out != prompts.balance(records, mix, (1 / 3, 2 / 3), seed=1)
  # Plenty of everything: shares match within rounding.
  big = prompts.balance(_with_difficulties((300, 400, 300)), {"easy": 1, "medium": 2, "hard": 1},
                        seed=0)
  big_counts = collections.Counter(prompts.bucket_of(r.difficulty, list(mix), (1 / 3, 2 / 3))
                                   for r in big)
  assert big_counts == {"easy": 200, "medium": 400, "hard": 200}
  # An empty bucket is left out of the mix: easy and medium split 3:4, and 8 = 3 + 5 is the
  # largest total whose rounded quotas fit (3.43 -> 3 easy, 4.57 -> 5 medium).
  out = prompts.balance(_with_difficulties((5, 5, 0)), mix, seed=0)
  counts = collections.Counter(prompts.bucket_of(r.difficulty, list(mix), (1 / 3, 2 / 3))
                               for r in out)
  assert counts == {"easy": 3, "medium": 5}


def test_balance_names_the_bucket_that_caps_a_small_result(caplog):
  # A model that solves nearly everything: 3 hard prompts cap a 30/40/30 mix at 10 of 160.
  mix = {"easy": 0.3, "medium": 0.4, "hard": 0.3}
  with caplog.at_level(logging.WARNING):
    out = prompts.balance(_with_difficulties((120, 37, 3)), mix, (1 / 3, 2 / 3), seed=0)
  assert len(out) == 10
  assert "kept 10 of 160 prompts; bucket 'hard' holds 3" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    out = prompts.balance(_with_difficulties((300, 400, 300)),
                          {"easy": 1, "medium": 2, "hard": 1}, (1 / 3, 2 / 3), seed=0)
  assert len(out) == 800 and "kept" not in caplog.text  # most of the set kept: no warning


def test_balance_errors():
  with pytest.raises(ValueError, match="run label_difficulty first"):
    prompts.balance([_record(1)], prompts.DEFAULT_MIX)
  with pytest.raises(ValueError, match="bucket_edges"):
    prompts.balance([_record(1, difficulty=0.1)], prompts.DEFAULT_MIX, (0.5,))
  with pytest.raises(ValueError, match="non-negative"):
    prompts.balance([_record(1, difficulty=0.1)], {"easy": -1, "hard": 1}, (0.5,))


def test_curate_chains_the_steps_and_reports():
  records = [_record(i) for i in range(60)]
  records += [_record(100 + i, prompt=p) for i, p in enumerate(UNEVALUABLE)]
  records += [_record(200, prompt=records[0].prompt)]  # duplicate prompt

  def answer_fn(batch, n):  # knows the answers to multiples of 10 without thinking
    return [[f"\\boxed{{{2 * int(p.split()[2])}}}" if int(p.split()[2]) % 10 == 0 else "?"] * n
            for p in batch]

  def sample_fn(batch, n, temperature):  # pass rate (i % 5) / 4: 0, .25, .5, .75, 1
    out = []
    for p in batch:
      i = int(p.split()[2])
      k = round((i % 5) / 4 * n)
      out.append([f"\\boxed{{{2 * i}}}"] * k + ["?"] * (n - k))
    return out

  out, report = prompts.curate(records, grade_fn=_grade, answer_fn=answer_fn,
                               sample_fn=sample_fn, difficulty_n=8,
                               mix={"easy": 1, "medium": 1, "hard": 1}, seed=0)
  assert report["input"] == 69 and report["dropped_duplicate"] == 1
  assert report["dropped_unevaluable"] == 8
  assert report["unevaluable_reasons"] == {"multiple-choice": 3, "true/false": 2, "proof": 3}
  assert report["dropped_hackable"] == 6  # 0, 10, ..., 50
  assert report["labelled"] == 54
  # 54 prompts: pass rates 1, .75 -> easy; .5 -> medium; .25, 0 -> hard. Medium (i % 5 == 2,
  # 12 prompts after the hackable ones left) caps each bucket at 12.
  assert report["buckets"] == {"easy": 12, "medium": 12, "hard": 12}
  assert report["output"] == len(out) == 36
  assert report["dropped_balance"] == 54 - 36
  assert report["skipped_steps"] == []
  assert all(r.pass_rate is not None for r in out)

  out, report = prompts.curate(records)  # no model: only the rule-based steps
  assert len(out) == 60 and report["skipped_steps"] == ["hackable", "label_difficulty", "balance"]
  with pytest.raises(ValueError, match="grade_fn"):
    prompts.curate(records, answer_fn=answer_fn)


def test_balance_renormalizes_over_non_empty_buckets():
  recs = [prompts.PromptRecord(id=str(i), prompt=f"q{i}", answer="1", domain="d",
                               difficulty=0.5 if i < 4 else 0.9) for i in range(10)]
  kept = prompts.balance(recs, {"easy": 0.3, "medium": 0.4, "hard": 0.3})
  # No easy prompts: medium and hard split 4:3, and medium has only 4.
  assert sorted(r.difficulty for r in kept) == [0.5] * 4 + [0.9] * 3
