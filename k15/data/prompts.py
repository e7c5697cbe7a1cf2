"""The RL prompt set: its JSONL schema, readers for real formats, and its curation (paper §2.1).

One prompt per line, as a JSON object:

  id          str, unique within the file
  prompt      str, the question shown to the policy
  answer      str (an int is accepted and converted), the reference final answer
  domain      str, e.g. "math", "arithmetic", "countdown"
  tags        list[str], optional (default []), for diversity: source, subject, "level:3"
  difficulty  float or null, optional (default null); higher = harder. After
              `label_difficulty` it is 1 - pass rate of the SFT model, in [0, 1].
  pass_rate   float or null, optional: the pass rate `label_difficulty` measured
  meta        object, optional: anything a grader or the SFT stage needs (e.g. a countdown
              problem's numbers, the synthetic tasks' chains of thought)

Any other key is an error (a misspelt `difficulty` would otherwise vanish silently). A
malformed line either raises an error naming the file and line, or is skipped and counted
(`on_error='skip'`); it is never dropped silently. Blank lines are not records and are ignored.

Curation follows §2.1: drop prompts that cannot be graded by a final-answer check
(multiple-choice, true/false, proofs), drop "hackable" prompts the model answers correctly
without a chain of thought within 8 tries, label difficulty by the SFT model's pass rate over 10
samples at a high temperature, and balance difficulty buckets to a configured mix. The model is
only ever reached through callables passed in (the sampler lives elsewhere), so all of this runs
against fake models in tests.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import random
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from etils import epath

from k15 import storage
from k15.rewards import math as math_reward

Grader = Callable[["PromptRecord", str], float]
# answer_fn(prompts, n) -> n responses per prompt, produced WITHOUT a chain of thought.
AnswerFn = Callable[[list[str], int], list[list[str]]]
# sample_fn(prompts, n, temperature) -> n sampled responses per prompt.
SampleFn = Callable[[list[str], int, float], list[list[str]]]

REQUIRED_KEYS = ("id", "prompt", "answer", "domain")
OPTIONAL_KEYS = ("tags", "difficulty", "pass_rate", "meta")
FORMATS = ("auto", "k15", "gsm8k", "math", "code")
DEFAULT_MIX = {"easy": 0.3, "medium": 0.4, "hard": 0.3}
DEFAULT_BUCKET_EDGES = (1 / 3, 2 / 3)


class PromptFormatError(ValueError):
  """A line of a prompt file does not follow its format; the message names file and line."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One RL prompt (see the module docstring for the meaning of each field)."""
  id: str
  prompt: str
  answer: str
  domain: str
  tags: tuple[str, ...] = ()
  difficulty: float | None = None
  pass_rate: float | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """The record as a JSON-ready dict in the k15 schema."""
    out = {"id": self.id, "prompt": self.prompt, "answer": self.answer, "domain": self.domain,
           "tags": list(self.tags), "difficulty": self.difficulty}
    if self.pass_rate is not None:
      out["pass_rate"] = self.pass_rate
    if self.meta:
      out["meta"] = dict(self.meta)
    return out


# ---------------------------------------------------------------------------------------------
# Final answers in \boxed{}.
# ---------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
  r"""Content of the last \boxed{...} (or \fbox{...}) in `text`, nested braces kept.

  Returns None when there is none or the last one is never closed. `\boxed 5` (no braces, as
  some MATH solutions write it) gives "5" when no braced box follows it.
  """
  starts = [m.end() for m in _BOXED.finditer(text)]
  bare = [m for m in re.finditer(r"\\boxed +([^\s${}]+)", text)]
  if bare and (not starts or bare[-1].start() > starts[-1]):
    return bare[-1].group(1).rstrip(".,;")
  # The braced form: the same extraction the math grader uses.
  return math_reward.extract_boxed(text)


# ---------------------------------------------------------------------------------------------
# Reading and writing.
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def record_from_json(obj: Any) -> PromptRecord:
  """Validates one decoded k15-schema object; raises ValueError naming the offending key."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in REQUIRED_KEYS if k not in obj]
  if missing:
    raise ValueError(f"missing key(s) {missing}")
  unknown = sorted(set(obj) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown}; known: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
  for key in ("id", "prompt", "domain"):
    if not isinstance(obj[key], str) or not obj[key].strip():
      raise ValueError(f"key '{key}' must be a non-empty string, got {obj[key]!r}")
  answer = obj["answer"]
  if isinstance(answer, int) and not isinstance(answer, bool):
    answer = str(answer)
  if not isinstance(answer, str):
    raise ValueError(f"key 'answer' must be a string, got {answer!r}")
  tags = obj.get("tags", [])
  if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
    raise ValueError(f"key 'tags' must be a list of strings, got {tags!r}")
  for key in ("difficulty", "pass_rate"):
    value = obj.get(key)
    if value is not None and not _is_number(value):
      raise ValueError(f"key '{key}' must be a finite number or null, got {value!r}")
  pass_rate = obj.get("pass_rate")
  if pass_rate is not None and not 0 <= pass_rate <= 1:
    raise ValueError(f"key 'pass_rate' must lie in [0, 1], got {pass_rate!r}")
  meta = obj.get("meta", {})
  if not isinstance(meta, dict):
    raise ValueError(f"key 'meta' must be an object, got {meta!r}")
  difficulty = obj.get("difficulty")
  return PromptRecord(
      id=obj["id"], prompt=obj["prompt"], answer=answer, domain=obj["domain"], tags=tuple(tags),
      difficulty=None if difficulty is None else float(difficulty),
      pass_rate=None if pass_rate is None else float(pass_rate), meta=meta)


def _require(obj: Any, keys: Sequence[str]) -> None:
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in keys if k not in obj]
  if missing:
    raise ValueError(f"missing key(s) {missing}; this format needs {list(keys)}")


def _gsm8k_record(obj: Any, default_id: str) -> PromptRecord:
  """GSM8K: {question, answer: "reasoning ... #### 42"}; the answer is what follows ####."""
  _require(obj, ("question", "answer"))
  question, solution = obj["question"], obj["answer"]
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"key 'question' must be a non-empty string, got {question!r}")
  if not isinstance(solution, str) or "####" not in solution:
    raise ValueError(f"key 'answer' must be a string containing '#### <answer>', got {solution!r}")
  answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
  if not answer:
    raise ValueError("nothing after '####' in key 'answer'")
  return PromptRecord(id=str(obj.get("id", default_id)), prompt=question.strip(), answer=answer,
                      domain="math", tags=("gsm8k",), difficulty=None,
                      meta={"solution": solution})


def _math_level(level: Any) -> int | None:
  if isinstance(level, int) and not isinstance(level, bool):
    return level
  if isinstance(level, str):
    m = re.fullmatch(r"\s*(?:level\s*)?(\d+)\s*", level, flags=re.IGNORECASE)
    if m:
      return int(m.group(1))
  return None  # "Level ?" occurs in MATH; unknown level, unknown difficulty.


def _math_record(obj: Any, default_id: str) -> PromptRecord:
  r"""MATH: {problem, solution with \boxed{}, level?, type?/subject?, answer?, unique_id?}.

  The answer is the `answer` key where present (MATH-500 has one), else the last \boxed{} of the
  solution. 'Level k' (k = 1..5) becomes the tag 'level:k' and difficulty (k - 1) / 4, so MATH's
  own levels land on the same [0, 1] scale as pass-rate difficulty until relabelled.
  """
  _require(obj, ("problem", "solution"))
  problem, solution = obj["problem"], obj["solution"]
  if not isinstance(problem, str) or not problem.strip():
    raise ValueError(f"key 'problem' must be a non-empty string, got {problem!r}")
  if not isinstance(solution, str):
    raise ValueError(f"key 'solution' must be a string, got {solution!r}")
  answer = obj.get("answer")
  if not isinstance(answer, str) or not answer.strip():
    answer = last_boxed(solution)
  if answer is None or not answer.strip():
    raise ValueError("no \\boxed{...} answer in key 'solution' (and no 'answer' key)")
  tags = ["math"]
  subject = obj.get("type", obj.get("subject"))
  if isinstance(subject, str) and subject:
    tags.append(subject)
  level = _math_level(obj.get("level"))
  difficulty = None
  if level is not None:
    tags.append(f"level:{level}")
    if 1 <= level <= 5:
      difficulty = (level - 1) / 4
  return PromptRecord(id=str(obj.get("unique_id", obj.get("id", default_id))),
                      prompt=problem.strip(), answer=answer.strip(), domain="math",
                      tags=tuple(tags), difficulty=difficulty, meta={"solution": solution})


def _code_record(obj: Any, default_id: str) -> PromptRecord:
  """Code: {prompt, tests, id?, tags?}; tests are [{input, output}, ...] stdin/stdout pairs or
  a string of Python asserts on a function the program defines (k15.rewards.code)."""
  _require(obj, ("prompt", "tests"))
  prompt, tests = obj["prompt"], obj["tests"]
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f"key 'prompt' must be a non-empty string, got {prompt!r}")
  if isinstance(tests, str):
    if not tests.strip():
      raise ValueError("key 'tests' is an empty string of asserts")
    meta: dict[str, Any] = {"asserts": tests}
  elif isinstance(tests, list) and tests:
    pairs = []
    for i, t in enumerate(tests):
      if (not isinstance(t, dict) or not isinstance(t.get("input"), str)
          or not isinstance(t.get("output"), str)):
        raise ValueError(f"key 'tests' item {i} must be an object with string 'input' and "
                         f"'output', got {t!r:.200}")
      pairs.append([t["input"], t["output"]])
    meta = {"tests": pairs}
  else:
    raise ValueError("key 'tests' must be a non-empty list of {input, output} objects or a "
                     f"string of asserts, got {tests!r:.200}")
  tags = obj.get("tags", [])
  if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
    raise ValueError(f"key 'tags' must be a list of strings, got {tags!r}")
  return PromptRecord(id=str(obj.get("id", default_id)), prompt=prompt.strip(), answer="",
                      domain="code", tags=("code", *tags), meta=meta)


def _detect_format(obj: Any, path: str, line_no: int) -> str:
  # One distinctive key each, so that a line missing some other key still gets its own error.
  keys = set(obj) if isinstance(obj, dict) else set()
  if "tests" in keys:
    return "code"
  if "prompt" in keys:
    return "k15"
  if "problem" in keys:
    return "math"
  if "question" in keys:
    return "gsm8k"
  raise PromptFormatError(
      f"{path}:{line_no}: cannot detect the format from keys {sorted(keys)}; expected k15 "
      "(id, prompt, answer, domain, ...), gsm8k (question, answer), math (problem, solution) or "
      "code (prompt, tests)")


def detect_format(line: str, path: str, line_no: int) -> str | None:
  """The format of a file whose first line that parses as JSON is `line`; None when it does
  not parse (the caller tries the next line); PromptFormatError when its keys fit none."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError:
    return None
  return _detect_format(obj, path, line_no)


def parse_line(line: str, format: str,  # pylint: disable=redefined-builtin
               default_id: str) -> PromptRecord:
  """One line of a prompt file in `format` (not 'auto') as a record; ValueError says what is
  wrong with it (the caller adds file and line). `default_id` names a record without an id."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
  if format == "k15":
    return record_from_json(obj)
  if format == "gsm8k":
    return _gsm8k_record(obj, default_id)
  if format == "code":
    return _code_record(obj, default_id)
  return _math_record(obj, default_id)


def load_prompts(path: str | os.PathLike[str],
                 format: str = "auto",  # pylint: disable=redefined-builtin
                 *, on_error: str = "raise") -> tuple[list[PromptRecord], int]:
  """Reads a JSONL prompt file in the k15, GSM8K, MATH or code format.

  Args:
    path: the JSONL file.
    format: 'k15', 'gsm8k', 'math', 'code', or 'auto': decided by the first line that parses
      as JSON, from its key 'tests' (code), 'prompt' (k15), 'problem' (math) or 'question'
      (gsm8k).
    on_error: 'raise' (a PromptFormatError naming file and line) or 'skip' (skip malformed
      lines, count them and log a warning with the first few reasons).

  Returns:
    (records, number of skipped lines). Records without an 'id' get "<file stem>-<line>".
  """
  if format not in FORMATS:
    raise ValueError(f"unknown prompt format {format!r}; expected one of {FORMATS}")
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  path = os.fspath(path)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"prompt file not found: {path}")
  stem = os.path.splitext(os.path.basename(path))[0]
  records: list[PromptRecord] = []
  errors: list[str] = []
  first_line_of_id: dict[str, int] = {}
  with epath.Path(path).open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        if format == "auto":
          # Stays 'auto' only for a line that is not JSON, which parse_line then refuses.
          format = detect_format(line, path, line_no) or "auto"
        record = parse_line(line, format, f"{stem}-{line_no}")
        if record.id in first_line_of_id:
          raise ValueError(f"duplicate id {record.id!r} (first on line "
                           f"{first_line_of_id[record.id]})")
      except PromptFormatError:
        raise
      except ValueError as e:
        message = f"{path}:{line_no}: {e}"
        if on_error == "raise":
          raise PromptFormatError(message) from None
        errors.append(message)
        continue
      first_line_of_id[record.id] = line_no
      records.append(record)
  if errors:
    logging.warning("skipped %d malformed line(s) of %s, e.g.:\n  %s", len(errors), path,
                    "\n  ".join(errors[:5]))
  return records, len(errors)


def load_jsonl(path: str | os.PathLike[str], *,
               on_error: str = "raise") -> tuple[list[PromptRecord], int]:
  """Reads a k15-schema JSONL file; returns (records, number of skipped malformed lines)."""
  return load_prompts(path, "k15", on_error=on_error)


def write_jsonl(records: Iterable[PromptRecord], path: str | os.PathLike[str]) -> int:
  """Writes records in the k15 schema (atomically: a partial file never appears); returns count."""
  lines = [json.dumps(record.to_json(), ensure_ascii=False) + "\n" for record in records]
  storage.write_text(path, "".join(lines))
  return len(lines)


# ---------------------------------------------------------------------------------------------
# Curation (§2.1).
# ---------------------------------------------------------------------------------------------

_MULTIPLE_CHOICE = (
    re.compile(r"\bwhich of the following\b", re.IGNORECASE),
    re.compile(r"\banswer choices\b", re.IGNORECASE),
    # Two lettered options, "(A) ... (B)" or "A) ... B)" / "A. ... B." at line starts.
    re.compile(r"\(A\).*?\(B\)", re.DOTALL),
    re.compile(r"(?:^|\n)\s*A[.):]\s.*?\n\s*B[.):]\s", re.DOTALL),
)
_TRUE_FALSE = (
    re.compile(r"\btrue\s+or\s+false\b", re.IGNORECASE),
    re.compile(r"\btrue\s*/\s*false\b", re.IGNORECASE),
)
_PROOF = (
    re.compile(r"\bprove\b", re.IGNORECASE),
    re.compile(r"\bshow that\b", re.IGNORECASE),
)


def unevaluable_reason(record: PromptRecord) -> str | None:
  """Why a final-answer check cannot grade this prompt (§2.1), or None if it can.

  Multiple-choice and true/false questions are excluded because a guess is right too often for
  the reward to mean anything; proofs because no final answer captures them.
  """
  if record.domain == "code":
    return None if record.meta.get("tests") or record.meta.get("asserts") else "no tests"
  if not record.answer.strip():
    return "no answer"
  if any(p.search(record.prompt) for p in _MULTIPLE_CHOICE):
    return "multiple-choice"
  if (any(p.search(record.prompt) for p in _TRUE_FALSE)
      or record.answer.strip().lower() in ("true", "false")):
    return "true/false"
  if any(p.search(record.prompt) for p in _PROOF):
    return "proof"
  return None


def is_unevaluable(record: PromptRecord) -> bool:
  """True for multiple-choice, true/false and proof questions, and empty answers."""
  return unevaluable_reason(record) is not None


def _responses(fn: Callable[..., list[list[str]]], records: Sequence[PromptRecord], n: int,
               batch_size: int | None, *args: Any) -> list[list[str]]:
  """Calls fn(prompts, n, *args) in batches and checks it returned n responses per prompt."""
  out: list[list[str]] = []
  step = batch_size or max(len(records), 1)
  for start in range(0, len(records), step):
    batch = records[start:start + step]
    got = fn([r.prompt for r in batch], n, *args)
    if len(got) != len(batch) or any(len(g) != n for g in got):
      shape = [len(g) for g in got]
      raise ValueError(f"{getattr(fn, '__name__', fn)} returned response counts {shape} for "
                       f"{len(batch)} prompts; expected {n} per prompt")
    out.extend(got)
  return out


def _correct(grade: float) -> bool:
  # Grades are 0/1 (or -1/1); anything above one half counts as a correct answer.
  return grade > 0.5


def filter_hackable(records: Sequence[PromptRecord], answer_fn: AnswerFn, grade_fn: Grader, *,
                    n: int = 8, batch_size: int | None = None
                    ) -> tuple[list[PromptRecord], list[PromptRecord]]:
  """Drops prompts the model answers correctly without a chain of thought (§2.1).

  `answer_fn(prompts, n)` must return n answers per prompt produced WITHOUT reasoning (for
  example a sampler forced to write "\\boxed{" at once, with a few tokens of budget). A prompt
  is hackable if any of its n answers grades correct: the reward could then be collected by
  guessing, which teaches nothing about reasoning.

  Returns:
    (kept, dropped), each in input order.
  """
  answers = _responses(answer_fn, records, n, batch_size)
  kept, dropped = [], []
  for record, responses in zip(records, answers):
    hackable = any(_correct(grade_fn(record, r)) for r in responses)
    (dropped if hackable else kept).append(record)
  return kept, dropped


def label_difficulty(records: Sequence[PromptRecord], sample_fn: SampleFn, grade_fn: Grader, *,
                     n: int = 10, temperature: float = 1.0,
                     batch_size: int | None = None) -> list[PromptRecord]:
  """Labels difficulty by the SFT model's pass rate over n samples at high temperature (§2.1).

  difficulty = 1 - pass_rate, in [0, 1]: HIGHER IS HARDER (0 = solved every time, 1 = never).
  The pass rate is kept in `pass_rate`. `sample_fn(prompts, n, temperature)` returns n sampled
  responses per prompt; `grade_fn(record, response)` their grades.
  """
  samples = _responses(sample_fn, records, n, batch_size, temperature)
  out = []
  for record, responses in zip(records, samples):
    pass_rate = sum(_correct(grade_fn(record, r)) for r in responses) / n
    out.append(dataclasses.replace(record, pass_rate=pass_rate, difficulty=1.0 - pass_rate))
  return out


def bucket_of(difficulty: float, names: Sequence[str], edges: Sequence[float]) -> str:
  """The bucket of a difficulty: names[i] holds edges[i-1] <= difficulty < edges[i]."""
  i = 0
  while i < len(edges) and difficulty >= edges[i]:
    i += 1
  return names[i]


def balance(records: Sequence[PromptRecord], mix: Mapping[str, float],
            bucket_edges: Sequence[float] = DEFAULT_BUCKET_EDGES, *,
            seed: int = 0) -> list[PromptRecord]:
  """Subsamples difficulty buckets to the ratios of `mix`, keeping as many prompts as possible.

  Args:
    records: labelled records (difficulty must not be None).
    mix: bucket name -> share, from easiest to hardest, e.g. {'easy': .3, 'medium': .4,
      'hard': .3}; shares are normalized. A bucket with share 0 is dropped entirely.
    bucket_edges: len(mix) - 1 increasing boundaries; see `bucket_of`.
    seed: which prompts of an over-full bucket are kept is a seeded choice, so deterministic.

  Returns:
    The kept records in input order. The total is the largest N for which every bucket holds
    round(N * share) prompts (largest-remainder rounding). A bucket with a positive share but
    no prompts at all (a model that solves nothing has no 'easy' prompts) is left out and the
    mix renormalized over the others, with a warning, rather than emptying the result.
  """
  names = list(mix)
  edges = list(bucket_edges)
  if len(edges) != len(names) - 1 or edges != sorted(edges):
    raise ValueError(f"bucket_edges {edges} must be {len(names) - 1} increasing numbers for "
                     f"the {len(names)} buckets {names}")
  if any(not _is_number(s) or s < 0 for s in mix.values()) or sum(mix.values()) <= 0:
    raise ValueError(f"mix shares must be non-negative numbers with a positive sum: {dict(mix)}")
  total_share = sum(mix.values())
  shares = {k: v / total_share for k, v in mix.items()}
  by_bucket: dict[str, list[int]] = {k: [] for k in names}
  for i, record in enumerate(records):
    if record.difficulty is None:
      raise ValueError(f"record {record.id!r} has no difficulty; run label_difficulty first")
    by_bucket[bucket_of(record.difficulty, names, edges)].append(i)

  def quotas(total: int) -> dict[str, int]:
    exact = {k: total * shares[k] for k in names}
    q = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(names, key=lambda k: (-(exact[k] - q[k]), names.index(k)))
    for k in by_remainder[:total - sum(q.values())]:
      q[k] += 1
    return q

  empty = [k for k in names if shares[k] > 0 and not by_bucket[k]]
  if empty and len(empty) < sum(1 for k in names if shares[k] > 0):
    logging.warning("balance: buckets %s are empty; renormalizing the mix over the others", empty)
    rest = sum(shares[k] for k in names if k not in empty)
    shares = {k: 0.0 if k in empty else shares[k] / rest for k in names}

  # The bucket with the fewest prompts for its share caps the total.
  limit = min((k for k in names if shares[k] > 0), key=lambda k: len(by_bucket[k]) / shares[k])
  total = math.floor(len(by_bucket[limit]) / shares[limit] + 1e-9)
  while total > 0 and any(q > len(by_bucket[k]) for k, q in quotas(total).items()):
    total -= 1  # rounding can ask one too many of a bucket; step down until all fit.
  if total == 0 and records:
    logging.warning("balance: a bucket with a positive share is empty (%s); nothing kept",
                    {k: len(v) for k, v in by_bucket.items()})
  elif records and total < len(records) / 2:
    # A model that solves most prompts leaves its hardest bucket nearly empty, and the mix
    # then caps the whole set at a few prompts, which RL then sees over and over.
    logging.warning("balance: kept %d of %d prompts; bucket %r holds %d, limiting the mix %s "
                    "(bucket sizes %s)", total, len(records), limit, len(by_bucket[limit]),
                    dict(mix), {k: len(v) for k, v in by_bucket.items()})
  rng = random.Random(f"k15.balance/{seed}")
  keep: set[int] = set()
  for k, q in quotas(total).items():
    keep.update(rng.sample(by_bucket[k], q))
  return [r for i, r in enumerate(records) if i in keep]


def curate(records: Sequence[PromptRecord], *, grade_fn: Grader | None = None,
           answer_fn: AnswerFn | None = None, sample_fn: SampleFn | None = None,
           hackable_n: int = 8, difficulty_n: int = 10, temperature: float = 1.0,
           mix: Mapping[str, float] | None = None,
           bucket_edges: Sequence[float] = DEFAULT_BUCKET_EDGES, seed: int = 0,
           batch_size: int | None = None) -> tuple[list[PromptRecord], dict[str, Any]]:
  """The §2.1 pipeline: dedupe, unevaluable, hackable, difficulty labels, balance.

  Steps whose callables are not given are skipped (and reported as skipped): without answer_fn
  no hackable filter, without sample_fn no relabelling (existing difficulties are balanced),
  without mix no balancing.

  Returns:
    (curated records, report) where report holds the input and output counts, how many each
    step dropped ('duplicate', 'unevaluable' with a per-reason breakdown, 'hackable',
    'balance'), the final bucket sizes and the steps skipped.
  """
  if (answer_fn or sample_fn) and grade_fn is None:
    raise ValueError("curate needs grade_fn to grade the answers of answer_fn / sample_fn")
  report: dict[str, Any] = {"input": len(records), "skipped_steps": []}
  seen, unique = set(), []
  for r in records:
    if r.prompt not in seen:
      seen.add(r.prompt)
      unique.append(r)
  report["dropped_duplicate"] = len(records) - len(unique)

  reasons = collections.Counter()
  evaluable = []
  for r in unique:
    reason = unevaluable_reason(r)
    if reason is None:
      evaluable.append(r)
    else:
      reasons[reason] += 1
  report["dropped_unevaluable"] = sum(reasons.values())
  report["unevaluable_reasons"] = dict(reasons)
  out = evaluable

  if answer_fn is not None:
    out, dropped = filter_hackable(out, answer_fn, grade_fn, n=hackable_n, batch_size=batch_size)
    report["dropped_hackable"] = len(dropped)
  else:
    report["skipped_steps"].append("hackable")

  if sample_fn is not None:
    out = label_difficulty(out, sample_fn, grade_fn, n=difficulty_n, temperature=temperature,
                           batch_size=batch_size)
    report["labelled"] = len(out)
  else:
    report["skipped_steps"].append("label_difficulty")

  names = list(mix) if mix else list(DEFAULT_MIX)
  if mix:
    before = len(out)
    out = balance(out, mix, bucket_edges, seed=seed)
    report["dropped_balance"] = before - len(out)
  else:
    report["skipped_steps"].append("balance")
  if len(names) == len(bucket_edges) + 1 and all(r.difficulty is not None for r in out):
    report["buckets"] = dict(collections.Counter(
        bucket_of(r.difficulty, names, bucket_edges) for r in out))
  report["output"] = len(out)
  return out, report
