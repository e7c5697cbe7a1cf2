"""Shortest rejection sampling (§2.4): n responses per prompt, the shortest correct one kept.

A response counts as correct when the grader accepts it *and* it ended with a stop token, the
rule RL and evaluation use too (k15.rewards.finish): a response cut at the token budget would
teach a model not to stop. The same sampled groups feed DPO's pairs (k15.long2short.dpo).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from k15.rewards import finish as finish_lib
from k15.sampling import text

Example = tuple[list[int], list[int]]  # (prompt ids, response ids incl. eos)
GradeFn = Callable[[Any, str], float]


@dataclasses.dataclass
class Group:
  """A prompt's sampled responses: response ids (eos included when it ended) and correctness."""
  prompt: list[int]
  responses: list[list[int]]
  correct: list[bool]
  problem_id: str = ""

  def __post_init__(self):
    if len(self.responses) != len(self.correct):
      raise ValueError(f"group {self.problem_id!r}: {len(self.responses)} responses but "
                       f"{len(self.correct)} correct flags")

  def to_json(self) -> dict[str, Any]:
    return {"problem_id": self.problem_id, "prompt": [int(t) for t in self.prompt],
            "responses": [[int(t) for t in r] for r in self.responses],
            "correct": [bool(c) for c in self.correct]}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Group":
    return cls(prompt=list(d["prompt"]), responses=[list(r) for r in d["responses"]],
               correct=list(d["correct"]), problem_id=d.get("problem_id", ""))


def sampled_tokens(groups: Sequence[Group]) -> int:
  """Response tokens the groups cost to sample (what the methods are compared at)."""
  return sum(len(r) for g in groups for r in g.responses)


def sample_groups(model: Any, problems: Sequence[Any], *, tokenizer: Any, grade_fn: GradeFn,
                  n: int = 8, temperature: float = 1.0, max_new_tokens: int, seed: int = 0,
                  batch_size: int = 32, token_budget: int = 0) -> list[Group]:
  """n responses per problem (`problem.prompt` is the question), graded; one Group per problem.

  Sample j of problem i draws from row seed i * n + j (k15.sampling.text), so the groups do
  not depend on batch_size. token_budget > 0: sampling stops at the first batch boundary
  where the groups so far hold at least that many response tokens (the later problems get
  no group), so a budget-capped run is a prefix of an uncapped one.
  """
  groups, spent = [], 0
  for i, prompt, responses in text.sample_text(
      model, tokenizer, [p.prompt for p in problems], num_samples=n, batch_size=batch_size,
      max_new_tokens=max_new_tokens, seed=seed, temperature=temperature):
    groups.append(Group(
        prompt=[int(t) for t in prompt], responses=[[int(t) for t in r.ids] for r in responses],
        correct=[finish_lib.has_final_answer(r.finish_reason)
                 and float(grade_fn(problems[i], r.text)) > 0.5 for r in responses],
        problem_id=str(getattr(problems[i], "id", i))))
    spent += sampled_tokens(groups[-1:])
    if token_budget > 0 and spent >= token_budget and (i + 1) % batch_size == 0:
      break
  return groups


def shortest_correct(group: Group) -> int | None:
  """Index of the shortest correct response (the first of equal lengths), or None."""
  best = None
  for j, (resp, ok) in enumerate(zip(group.responses, group.correct)):
    if ok and (best is None or len(resp) < len(group.responses[best])):
      best = j
  return best


@dataclasses.dataclass(frozen=True)
class Selection:
  """What `select_shortest` kept of a set of groups."""
  examples: list[Example]             # (prompt, shortest correct response) per kept group
  problems: int
  kept: int
  mean_chosen_tokens: float | None    # over the kept responses
  mean_sampled_tokens: float | None   # over every sampled response
  sampled_tokens: int                 # their sum

  @property
  def skipped_no_correct(self) -> int:
    return self.problems - self.kept

  def stats(self) -> dict[str, Any]:
    return {"problems": self.problems, "kept": self.kept,
            "skipped_no_correct": self.skipped_no_correct,
            "mean_chosen_tokens": self.mean_chosen_tokens,
            "mean_sampled_tokens": self.mean_sampled_tokens,
            "sampled_tokens": self.sampled_tokens}


def select_shortest(groups: Sequence[Group]) -> Selection:
  """(prompt, shortest correct response) per group with one, and the counts."""
  examples, chosen_len, all_len = [], [], []
  for g in groups:
    all_len += [len(r) for r in g.responses]
    j = shortest_correct(g)
    if j is not None:
      examples.append((list(g.prompt), list(g.responses[j])))
      chosen_len.append(len(g.responses[j]))
  return Selection(
      examples=examples, problems=len(groups), kept=len(examples),
      mean_chosen_tokens=float(np.mean(chosen_len)) if chosen_len else None,
      mean_sampled_tokens=float(np.mean(all_len)) if all_len else None,
      sampled_tokens=int(sum(all_len)))


def shortest_rejection_sampling(policy_model: Any, problems: Sequence[Any], *, tokenizer: Any,
                                grade_fn: GradeFn, n: int = 8, temperature: float = 1.0,
                                max_new_tokens: int, seed: int = 0, batch_size: int = 32,
                                token_budget: int = 0) -> Selection:
  """§2.4: n samples per problem, the shortest correct one kept: SFT examples for
  `sft.train_sft` (`Selection.examples`). Problems with no correct response are skipped and
  counted."""
  groups = sample_groups(policy_model, problems, tokenizer=tokenizer, grade_fn=grade_fn, n=n,
                         temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                         batch_size=batch_size, token_budget=token_budget)
  selection = select_shortest(groups)
  logging.info("shortest rejection sampling: %s", selection.stats())
  return selection
