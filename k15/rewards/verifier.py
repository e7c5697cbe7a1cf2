r"""The verifiable reward of a prompt set, by name: `config.reward` = math | code | task.

  math  k15.rewards.math on the response's last \boxed{} against the record's answer
        (GSM8K's number after ####, MATH's boxed answer), in the grader's worker processes
  code  k15.rewards.code: the last fenced code block run in the bubblewrap sandbox on the
        record's stdin/stdout tests or asserts; 1 when all pass, or the passed share with
        `reward_options.code_fraction`
  task  k15.data.tasks.grade: the synthetic arithmetic and countdown tasks

`make_grader(name, options)` returns grade(records, texts) -> float32 rewards [n] in [0, 1],
the one function RL rewards, evaluation and curation all call. Each reward also names the
instruction its prompts are wrapped in, so that a model is asked for what the grader reads.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Callable, Sequence

import numpy as np

from k15 import hf_tokenizer
from k15.data import prompts as prompts_lib

GradeBatch = Callable[[Sequence[prompts_lib.PromptRecord], Sequence[str]], np.ndarray]

REWARDS = ("math", "code", "task")

# The user message around a question ("{question}" is replaced), per reward.
INSTRUCTIONS = {
    "math": hf_tokenizer.BOXED_INSTRUCTION,
    "code": ("{question}\nWrite a complete Python 3 solution (standard library only) and put "
             "it in a single ```python code block at the end of your answer."),
    "task": "{question}",
}


def check_name(name: str) -> None:
  if name not in REWARDS:
    raise ValueError(f"unknown reward {name!r}; known rewards: {list(REWARDS)}")


def _math(options: Any) -> GradeBatch:
  from k15.rewards import math as math_reward  # pylint: disable=g-import-not-at-top

  def grade(records, texts):
    return math_reward.grade_batch(list(texts), [r.answer for r in records],
                                   timeout_s=options.math_timeout_s)
  return grade


def _code(options: Any) -> GradeBatch:
  from k15.rewards import code as code_reward  # pylint: disable=g-import-not-at-top

  def one(record, text):
    meta = record.meta
    if "tests" not in meta and "asserts" not in meta:
      raise ValueError(f"record {record.id!r} has no tests for the code reward (data.format="
                       "code writes meta['tests'] or meta['asserts'])")
    return code_reward.grade_response(
        text, tests=meta.get("tests"), asserts=meta.get("asserts"),
        fraction=options.code_fraction, timeout_s=options.code_timeout_s,
        memory_mb=options.code_memory_mb)

  def grade(records, texts):
    # Each program runs in its own sandbox process; threads only wait on them.
    workers = max(1, min(len(texts), options.code_workers or (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      return np.asarray(list(pool.map(one, records, texts)), np.float32)
  return grade


def _task(options: Any) -> GradeBatch:
  del options
  from k15.data import tasks  # pylint: disable=g-import-not-at-top

  def grade(records, texts):
    return np.asarray([tasks.grade(r, t) for r, t in zip(records, texts)], np.float32)
  return grade


def make_grader(name: str, options: Any) -> GradeBatch:
  """grade(records, texts) -> float32 [n] for reward `name`; options: config.reward_options."""
  check_name(name)
  return {"math": _math, "code": _code, "task": _task}[name](options)
