"""Partial rollouts with a replay buffer (k1.5 §2.6), on top of `sampler.generate`.

Long chains of thought make a synchronous iteration wait for its longest response. The paper
caps the output tokens each sequence may produce per iteration (`segment_budget`): a sequence
that has not finished when its budget is spent is saved, with everything it has produced so
far, to a replay buffer, and continues in a later iteration by prefilling prompt + partial
response as one sequence and decoding on from there. Only the segment produced by the current
policy is on-policy; every response token therefore records the policy version (iteration)
that produced it, so the trainer can leave older segments out of the loss (`Trajectory.versions`).
The log-probs of older segments are kept exactly as they were reported when sampled.

Repeat detection (the n-gram check of `sampler.generate`) sees the whole response, earlier
segments included, so a loop that spans a segment boundary is caught when it would have been
in an uninterrupted rollout; such a response finishes with reason REPEAT, for a reward penalty.

A trajectory keeps its own RNG seed for its whole life and the sampler keys each draw by the
response position, so how a response is split into segments does not change what is drawn.

Preemption: a spot VM gets about 30 seconds between its notice and its end, and one
iteration's sampling at long-CoT lengths takes minutes. With `stop_check` and `check_every`,
`rollout` decodes its segment in pieces of `check_every` tokens, each continuing the unfinished
rows exactly as a later iteration would (so the result does not change), and asks `stop_check`
between pieces; when it answers yes, `rollout` puts the buffer back as it found it and raises
`SamplingInterrupted`, and the caller saves the state it had before the iteration began.

The buffer is plain data: `ReplayBuffer.state_dict()` is JSON-serializable (lists of ints and
floats), for the checkpoint.

Mixture-of-experts policies: a trajectory also carries the experts that routed each of its
tokens, prompt and response (`Trajectory.expert_ids`), for routing replay in the trainer. Every
segment overwrites the routing of the prompt and the earlier response with its own prefill's
and appends its decode's: the current segment was drawn under exactly that routing, and the
log-probs of older segments come from an older policy either way.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from k15.model import transformer
from k15.sampling import sampler

FinishReason = sampler.FinishReason

_STATE_VERSION = 1


@dataclasses.dataclass
class Trajectory:
  """One response to one prompt, possibly produced over several iterations.

  Arrays have one entry per response token; `finish_reason` is BUDGET while it is unfinished.
  """
  prompt_id: Hashable        # the caller's id of the prompt (JSON-able: int or str)
  prompt: np.ndarray         # int32 [prompt length]
  sample_index: int          # j of the k samples of its prompt (its group position)
  seed: int                  # RNG stream of this trajectory, fixed for its whole life
  tokens: np.ndarray         # int32 [n] response so far
  logprobs: np.ndarray       # float32 [n] as reported by the sampler when each was drawn
  versions: np.ndarray       # int32 [n] policy version (iteration) that produced each token
  finish_reason: int = int(FinishReason.BUDGET)
  # Mixture of experts: int8/int16 [prompt length + n, MoE layers, top-k], the experts the
  # sampler routed each token to (-1: not routed, e.g. the last token); None for a dense model.
  expert_ids: np.ndarray | None = None

  @property
  def length(self) -> int:
    return int(self.tokens.size)

  @property
  def finished(self) -> bool:
    return self.finish_reason != FinishReason.BUDGET

  @property
  def num_segments(self) -> int:
    """How many iterations contributed tokens (changes of version along the response)."""
    if self.versions.size == 0:
      return 0
    return int(1 + np.count_nonzero(np.diff(self.versions)))

  def on_policy_mask(self, policy_version: int) -> np.ndarray:
    """bool [n]: the tokens produced by `policy_version` (the current segment)."""
    return self.versions == policy_version

  def to_dict(self) -> dict[str, Any]:
    return {
        "prompt_id": self.prompt_id, "prompt": self.prompt.tolist(),
        "sample_index": int(self.sample_index), "seed": int(self.seed),
        "tokens": self.tokens.tolist(),
        # float32 -> Python float is exact, and JSON writes floats with repr, so the round
        # trip returns the same float32 values.
        "logprobs": self.logprobs.astype(np.float64).tolist(),
        "versions": self.versions.tolist(), "finish_reason": int(self.finish_reason),
        "expert_ids": _pack(self.expert_ids),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any], where: str = "trajectory") -> "Trajectory":
    try:
      out = cls(prompt_id=d["prompt_id"], prompt=np.asarray(d["prompt"], np.int32),
                sample_index=int(d["sample_index"]), seed=int(d["seed"]),
                tokens=np.asarray(d["tokens"], np.int32),
                logprobs=np.asarray(d["logprobs"], np.float32),
                versions=np.asarray(d["versions"], np.int32),
                finish_reason=int(d["finish_reason"]),
                expert_ids=_unpack(d.get("expert_ids"), where))
    except KeyError as e:
      raise ValueError(f"{where}: missing key {e.args[0]!r}") from e
    if not out.tokens.size == out.logprobs.size == out.versions.size:
      raise ValueError(f"{where}: tokens, logprobs and versions have different lengths "
                       f"({out.tokens.size}, {out.logprobs.size}, {out.versions.size})")
    if out.expert_ids is not None and len(out.expert_ids) != out.prompt.size + out.length:
      raise ValueError(f"{where}: expert_ids has {len(out.expert_ids)} tokens; prompt + response "
                       f"have {out.prompt.size + out.length}")
    return out


def _pack(ids: np.ndarray | None) -> dict | None:
  """Expert ids as JSON: dtype, shape and base64 bytes (a few bytes a token, where a list of
  ints would take ~3 characters per id at 48 layers x top-8)."""
  if ids is None:
    return None
  return {"dtype": ids.dtype.name, "shape": list(ids.shape),
          "data": base64.b64encode(np.ascontiguousarray(ids).tobytes()).decode("ascii")}


def _unpack(d: dict | None, where: str) -> np.ndarray | None:
  if d is None:
    return None
  try:
    return np.frombuffer(base64.b64decode(d["data"]), np.dtype(d["dtype"])).reshape(d["shape"])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: unreadable expert_ids {str(d)[:80]!r}: {e}") from e


class SamplingInterrupted(Exception):
  """`rollout` stopped between decode pieces because `stop_check` said so; nothing changed."""


class ReplayBuffer:
  """Unfinished trajectories waiting for their next segment (§2.6); plain data."""

  def __init__(self, trajectories: Sequence[Trajectory] = ()):
    self.trajectories: list[Trajectory] = list(trajectories)

  def __len__(self) -> int:
    return len(self.trajectories)

  def add(self, trajectories: Sequence[Trajectory]) -> None:
    for t in trajectories:
      if t.finished:
        raise ValueError(f"trajectory of prompt {t.prompt_id!r} sample {t.sample_index} is "
                         f"finished ({FinishReason(t.finish_reason).name}); the buffer holds "
                         "unfinished ones only")
    self.trajectories.extend(trajectories)

  def take(self, n: int | None = None) -> list[Trajectory]:
    """Removes and returns the n oldest trajectories (all by default)."""
    n = len(self.trajectories) if n is None else n
    out, self.trajectories = self.trajectories[:n], self.trajectories[n:]
    return out

  def state_dict(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION,
            "trajectories": [t.to_dict() for t in self.trajectories]}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"replay buffer state has version {state.get('version')!r}; this code "
                       f"reads version {_STATE_VERSION}")
    self.trajectories = [Trajectory.from_dict(d, f"replay buffer trajectory {i}")
                         for i, d in enumerate(state["trajectories"])]


def rollout(
    model: transformer.Transformer,
    prompts: Sequence[tuple[Hashable, Sequence[int]]],
    *,
    num_samples: int,
    max_new_tokens: int,
    segment_budget: int,
    buffer: ReplayBuffer | None,
    policy_version: int,
    seed: int,
    eos_id: int | Sequence[int] | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repeat_ngram: int = 0,
    repeat_window: int = 512,
    max_continued: int | None = None,
    prompt_buckets: Sequence[int] | None = None,
    pad_id: int = 0,
    continuous: bool | None = None,
    stop_check: Callable[[], bool] | None = None,
    check_every: int = 0,
) -> tuple[list[Trajectory], ReplayBuffer]:
  """One iteration of partial rollouts: continue buffered trajectories, start new prompts.

  Args:
    model: the current policy (version `policy_version`).
    prompts: new (prompt_id, tokens) pairs; each gets `num_samples` trajectories.
    num_samples: k, samples per new prompt.
    max_new_tokens: total response budget of a trajectory over all its segments.
    segment_budget: most tokens a trajectory may produce in this iteration.
    buffer: unfinished trajectories from earlier iterations (None: an empty one).
    policy_version: recorded per produced token.
    seed: seeds the new trajectories (continued ones keep theirs).
    eos_id, temperature, top_p, top_k, repeat_ngram, repeat_window, prompt_buckets, pad_id: as
      in `sampler.generate` (prompt_buckets bound prompt + partial response).
    max_continued: continue at most this many buffered trajectories (oldest first); None: all.
    continuous: sample with continuous batching (`sampler.generate`; None: its default rule);
      the same trajectories.
    stop_check: asked between decode pieces of `check_every` tokens (module docstring); True
      raises SamplingInterrupted with `buffer` as it was. Every process of a multi-host run
      must get the same answers (e.g. `Checkpointer.should_stop`).
    check_every: tokens per decode piece when `stop_check` is given; 0, or not less than
      segment_budget: one piece, never asked.

  Returns:
    (finished trajectories: continued ones first, then new ones, prompt-major; the buffer, now
    holding the trajectories that spent their budget unfinished, reason BUDGET).
  """
  if segment_budget < 1:
    raise ValueError(f"segment_budget={segment_budget} must be >= 1")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples} must be >= 1")
  buffer = ReplayBuffer() if buffer is None else buffer
  if stop_check is not None and 0 < check_every < segment_budget:
    return _rollout_in_pieces(
        model, prompts, buffer=buffer, max_continued=max_continued, stop_check=stop_check,
        check_every=check_every, segment_budget=segment_budget,
        kwargs=dict(num_samples=num_samples, max_new_tokens=max_new_tokens,
                    policy_version=policy_version, seed=seed, eos_id=eos_id,
                    temperature=temperature, top_p=top_p, top_k=top_k,
                    repeat_ngram=repeat_ngram, repeat_window=repeat_window,
                    prompt_buckets=prompt_buckets, pad_id=pad_id, continuous=continuous))
  continued = buffer.take(max_continued)
  for t in continued:
    if t.length >= max_new_tokens:
      raise ValueError(f"buffered trajectory of prompt {t.prompt_id!r} sample {t.sample_index} "
                       f"already has {t.length} tokens >= max_new_tokens={max_new_tokens}")

  rng = np.random.default_rng(seed)
  fresh = []
  for prompt_id, tokens in prompts:
    seeds = rng.integers(0, 1 << 31, num_samples)
    for j in range(num_samples):
      fresh.append(Trajectory(
          prompt_id=prompt_id, prompt=np.asarray(tokens, np.int32).reshape(-1), sample_index=j,
          seed=int(seeds[j]), tokens=np.zeros((0,), np.int32),
          logprobs=np.zeros((0,), np.float32), versions=np.zeros((0,), np.int32)))
  if not continued and not fresh:
    return [], buffer

  # Generation inputs: each continued trajectory is one sequence (prompt + partial response,
  # prefilled as one segment); each new prompt is one sequence with num_samples rows.
  sequences, counts, prefixes, limits, row_seeds = [], [], [], [], []
  for t in continued:
    sequences.append(np.concatenate([t.prompt, t.tokens]))
    counts.append(1)
    prefixes.append(t.length)
    limits.append(min(segment_budget, max_new_tokens - t.length))
    row_seeds.append(t.seed)
  for i in range(0, len(fresh), num_samples):
    sequences.append(fresh[i].prompt)
    counts.append(num_samples)
    prefixes.append(0)
    limits.append(min(segment_budget, max_new_tokens))
    row_seeds.extend(t.seed for t in fresh[i:i + num_samples])

  res = sampler.generate(
      model, sequences, max_new_tokens=limits, eos_id=eos_id, temperature=temperature,
      top_p=top_p, top_k=top_k, seed=0, num_samples=counts, repeat_ngram=repeat_ngram,
      repeat_window=repeat_window, prompt_buckets=prompt_buckets, pad_id=pad_id,
      response_prefix=prefixes, row_seeds=row_seeds, continuous=continuous)

  finished, unfinished = [], []
  seq_of_row = np.repeat(np.arange(len(sequences)), counts)
  for r, t in enumerate(continued + fresh):
    n = int(res.lengths[r])
    if res.expert_ids is not None:  # this segment's prefill, then its decode (module docstring)
      seq = sequences[seq_of_row[r]]
      t.expert_ids = np.concatenate([res.prompt_expert_ids[seq_of_row[r], :seq.size],
                                     res.expert_ids[r, :n]])
    t.tokens = np.concatenate([t.tokens, res.tokens[r, :n]])
    t.logprobs = np.concatenate([t.logprobs, res.logprobs[r, :n]])
    t.versions = np.concatenate([t.versions, np.full((n,), policy_version, np.int32)])
    reason = int(res.finish_reason[r])
    if reason == FinishReason.LENGTH and t.length < max_new_tokens:
      reason = int(FinishReason.BUDGET)  # the segment budget, not the total, ran out
    t.finish_reason = reason
    (finished if t.finished else unfinished).append(t)
  buffer.add(unfinished)
  return finished, buffer


def _rollout_in_pieces(model, prompts, *, buffer: ReplayBuffer, max_continued: int | None,
                       stop_check: Callable[[], bool], check_every: int, segment_budget: int,
                       kwargs: dict) -> tuple[list[Trajectory], ReplayBuffer]:
  """`rollout`'s segment decoded `check_every` tokens at a time, `stop_check` asked between.

  Each piece after the first continues the rows still going, as the next iteration would
  (prompt + response so far prefilled, same seed, RNG keyed by response position), so the
  trajectories are those of one piece; they come back in `rollout`'s order.
  """
  saved = buffer.state_dict()
  pending = buffer.take(max_continued)
  taken = {id(t): i for i, t in enumerate(pending)}
  position = {pid: i for i, (pid, _) in enumerate(prompts)}

  def rollout_order(t):  # continued ones in the buffer's order, then new ones prompt-major
    return (0, taken[id(t)], 0) if id(t) in taken else (1, position[t.prompt_id], t.sample_index)

  finished, spent, new = [], 0, prompts
  try:
    while True:
      budget = min(check_every, segment_budget - spent)
      done, rest = rollout(model, new, buffer=ReplayBuffer(pending), segment_budget=budget,
                           **kwargs)
      finished += done
      new, spent, pending = [], spent + budget, rest.take()
      if not pending or spent >= segment_budget:
        break
      if stop_check():
        raise SamplingInterrupted(f"stopped after {spent} of {segment_budget} tokens")
  except SamplingInterrupted:
    buffer.load_state_dict(saved)
    raise
  buffer.add(sorted(pending, key=rollout_order))
  return sorted(finished, key=rollout_order), buffer
