"""Prompt samplers for RL: curriculum and prioritized sampling (k1.5 §2.3.4).

Which prompts an RL iteration trains on:

* Prioritized sampling: each prompt i has a tracked success rate s_i (`SuccessRates`, updated
  from every iteration's per-sample correctness) and is drawn with probability proportional to
  1 - s_i, so prompts the model already solves are rarely sampled again.
* Curriculum sampling: each prompt has a difficulty label. Numeric difficulties follow the one
  convention of k15, HIGHER IS HARDER: `k15.data.prompts` labels a prompt 1 - pass rate of the
  SFT model over 10 high-temperature answers (k1.5 §2.1), in [0, 1]; a level (1..5) works too.
  String labels ('easy', 'hard', ...) are matched as they are. A schedule says which
  difficulties are allowed from which iteration on (the paper's ablation: the whole set as
  warm-up, then only hard problems from iteration 24).

The two combine: the curriculum restricts the candidate pool, prioritized weights choose within
it ('uniform' weighting draws uniformly from the pool). `make_sampler(config, difficulties)`
builds a `PromptSampler` from config.

Determinism and checkpoints: the draw at iteration n uses a numpy Generator seeded with
(seed, n), so it depends only on the seed, the iteration and the current success-rate table.
No RNG state is carried between iterations; `state_dict()` holds the success-rate table (and
the seed, checked on restore), and the iteration lives in the trainer's checkpoint or in the
grain iterator's state (`SampledPromptDataset`). Restoring both reproduces every later draw.

Curriculum schedules. A schedule is a list of stages (start_iteration, allowed), sorted by
start, the first starting at 0; a stage holds until the next one starts. `allowed` is one of

  None or 'all'          every prompt
  'hard' or 5            one label
  ('medium', 'hard')     a set of labels (list, tuple or set)
  {'min': a, 'max': b}   numeric difficulty in [a, b], either bound optional

The bucket names 'easy', 'medium' and 'hard' also select numeric difficulties in [0, 1], by the
buckets curation balances (`k15.data.prompts.bucket_of`: easy < 1/3 <= medium < 2/3 <= hard),
so '0:all,20:hard' trains on the prompts the SFT model solved least often. Bucket names on
difficulties outside [0, 1] (levels) are an error: use a range ('3..') there.

or the same as one string, handy on the command line (--config.data.sampler.curriculum=...):

  '0:all,24:hard'        the paper's ablation
  '0:..2,10:..4,20:all'  easy to hard by level (ranges 'lo..hi', either side optional)
  '0:easy|medium,30:hard' label sets separated by '|'; a bare token is one label ('5' = level 5)
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from k15.data import prompts

SAMPLER_MODES = ("uniform", "prioritized")
BUCKETS = tuple(prompts.DEFAULT_MIX)  # ('easy', 'medium', 'hard'), easiest first

# ---------------------------------------------------------------------------------------------
# Success rates.
# ---------------------------------------------------------------------------------------------


class SuccessRates:
  """Per-prompt tracked success rate s_i in [0, 1].

  decay=None (default) keeps the running mean over every sample observed so far; a prompt never
  observed has s_i = `initial` (default 0.0: never solved, so highest priority). decay in
  [0, 1) keeps an exponential moving average over iterations instead, starting from `initial`:
  s_i <- decay * s_i + (1 - decay) * (this update's success rate of prompt i), which follows a
  policy that keeps improving (decay=0 keeps only the latest iteration).
  """

  def __init__(self, num_prompts: int, *, decay: float | None = None, initial: float = 0.0):
    if num_prompts <= 0:
      raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    if decay is not None and not 0.0 <= decay < 1.0:
      raise ValueError(f"success-rate decay must be None or in [0, 1), got {decay}")
    if not 0.0 <= initial <= 1.0:
      raise ValueError(f"initial success rate must be in [0, 1], got {initial}")
    self.num_prompts = int(num_prompts)
    self.decay = decay
    self.initial = float(initial)
    self.rates = np.full(self.num_prompts, self.initial, np.float64)  # [N] s_i
    self.counts = np.zeros(self.num_prompts, np.int64)  # [N] samples observed

  def __len__(self) -> int:
    return self.num_prompts

  def update(self, ids: Any, rewards: Any) -> None:
    """Folds in one iteration's results.

    Args:
      ids: [B] prompt indices (repeats allowed).
      rewards: [B] or [B, k] per-sample success in [0, 1] (correctness, not the shaped reward
        with length penalties).
    """
    ids = np.asarray(ids, np.int64).reshape(-1)
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim == 1:
      rewards = rewards[:, None]
    if rewards.ndim != 2 or rewards.shape[0] != ids.shape[0]:
      raise ValueError(f"rewards must be [B] or [B, k] with B = len(ids) = {ids.shape[0]}, "
                       f"got shape {rewards.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_prompts):
      bad = ids[(ids < 0) | (ids >= self.num_prompts)][0]
      raise ValueError(f"prompt id {bad} out of range [0, {self.num_prompts})")
    if not np.all((rewards >= 0) & (rewards <= 1)):
      bad = rewards[~((rewards >= 0) & (rewards <= 1))].reshape(-1)[0]
      raise ValueError(f"success values must be in [0, 1] (pass correctness), got {bad}")
    # Sum per prompt first so repeated ids within a batch count once per sample.
    total = np.zeros(self.num_prompts, np.float64)
    n = np.zeros(self.num_prompts, np.int64)
    np.add.at(total, ids, rewards.sum(axis=1))
    np.add.at(n, ids, rewards.shape[1])
    seen = n > 0
    if self.decay is None:
      old = np.where(self.counts > 0, self.rates * self.counts, 0.0)
      self.rates[seen] = (old[seen] + total[seen]) / (self.counts[seen] + n[seen])
    else:
      batch_rate = total[seen] / n[seen]
      self.rates[seen] = self.decay * self.rates[seen] + (1 - self.decay) * batch_rate
    self.counts += n

  def start_from(self, pass_rates: Sequence[float | None], samples: int) -> None:
    """Starts each prompt's rate at a measured pass rate, counted as `samples` observed samples.

    For the curation pass rates (k1.5 §2.1: 10 samples of the SFT model), so prioritized
    sampling does not begin by treating every prompt as never solved. With the running mean the
    prior weighs as `samples` samples and RL's own results take over as they accumulate; with a
    decay it is the starting value. Prompts whose pass rate is None keep `initial`.
    """
    if len(pass_rates) != self.num_prompts:
      raise ValueError(f"{len(pass_rates)} pass rates for {self.num_prompts} prompts")
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
      raise ValueError(f"prior samples must be an int >= 1, got {samples!r}")
    known = np.array([r is not None for r in pass_rates])
    rates = np.array([np.nan if r is None else float(r) for r in pass_rates], np.float64)
    if not np.all((rates[known] >= 0) & (rates[known] <= 1)):
      raise ValueError(f"pass rates must be in [0, 1], got {rates[known].min():g}.."
                       f"{rates[known].max():g}")
    self.rates[known] = rates[known]
    self.counts[known] = samples

  def state_dict(self) -> dict[str, np.ndarray]:
    return {"rates": self.rates.copy(), "counts": self.counts.copy()}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores from `state_dict()` output (numpy arrays or lists, e.g. after JSON)."""
    for key in ("rates", "counts"):
      if key not in state:
        raise ValueError(f"success-rate state has no key {key!r} (keys: {sorted(state)})")
      shape = np.shape(state[key])
      if shape != (self.num_prompts,):
        raise ValueError(f"success-rate state {key!r} has shape {shape}, expected "
                         f"({self.num_prompts},): was it saved for another prompt set?")
    self.rates = np.array(state["rates"], np.float64)
    self.counts = np.array(state["counts"], np.int64)


# ---------------------------------------------------------------------------------------------
# Curriculum schedule.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """One curriculum stage: from iteration `start`, only prompts whose label passes."""
  start: int
  labels: tuple[Any, ...] | None = None  # allowed labels; None: no label restriction
  low: float | None = None  # inclusive numeric bounds; None: unbounded
  high: float | None = None

  def allows(self, difficulties: np.ndarray) -> np.ndarray:
    """[N] labels -> [N] bool."""
    ok = np.ones(difficulties.shape, bool)
    numeric = difficulties.dtype.kind in "biuf"
    if self.labels is not None:
      if numeric:
        ok &= self._allows_numeric(difficulties.astype(np.float64))
      else:
        ok &= np.isin(difficulties.astype(str), [str(x) for x in self.labels])
    if self.low is not None or self.high is not None:
      if not numeric:
        raise ValueError(f"curriculum stage at iteration {self.start}: a difficulty range "
                         f"needs numeric difficulties, got labels of dtype {difficulties.dtype}")
      d = difficulties.astype(np.float64)
      if self.low is not None:
        ok &= d >= self.low
      if self.high is not None:
        ok &= d <= self.high
    return ok

  def _allows_numeric(self, d: np.ndarray) -> np.ndarray:
    """Labels on numeric difficulties: numbers match exactly, bucket names by bucket."""
    buckets = [str(x) for x in self.labels if str(x) in BUCKETS]
    try:
      numbers = [float(x) for x in self.labels if str(x) not in BUCKETS]
    except ValueError:
      raise ValueError(f"curriculum stage at iteration {self.start}: labels {self.labels} are "
                       f"neither numbers nor bucket names {BUCKETS}, but the difficulties are "
                       "numeric") from None
    ok = np.isin(d, numbers)
    if buckets:
      if d.size and not (d.min() >= 0.0 and d.max() <= 1.0):
        raise ValueError(
            f"curriculum stage at iteration {self.start}: bucket names {buckets} need "
            f"difficulties in [0, 1] (1 - pass rate), these span {d.min():g}..{d.max():g}; "
            "use a numeric range such as '3..' instead")
      names = np.array([prompts.bucket_of(x, BUCKETS, prompts.DEFAULT_BUCKET_EDGES) for x in d])
      ok |= np.isin(names, buckets)
    return ok


def _parse_spec(start: int, spec: Any) -> Stage:
  """One stage's `allowed` value (see the module docstring) -> Stage."""
  if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
    return Stage(start)
  if isinstance(spec, str):
    spec = spec.strip()
    if ".." in spec:
      lo, hi = (part.strip() for part in spec.split("..", 1))
      try:
        return Stage(start, low=float(lo) if lo else None, high=float(hi) if hi else None)
      except ValueError:
        raise ValueError(f"curriculum stage at iteration {start}: bad range {spec!r} "
                         "(expected 'lo..hi' with numbers, either side optional)") from None
    return Stage(start, labels=tuple(x.strip() for x in spec.split("|")))
  if isinstance(spec, (bool, np.bool_)):
    raise ValueError(f"curriculum stage at iteration {start}: bad allowed value {spec!r}")
  if isinstance(spec, (int, float, np.integer, np.floating)):
    return Stage(start, labels=(spec,))
  if isinstance(spec, Mapping):
    unknown = set(spec) - {"min", "max"}
    if unknown:
      raise ValueError(f"curriculum stage at iteration {start}: unknown keys {sorted(unknown)} "
                       "(valid: 'min', 'max')")
    low, high = spec.get("min"), spec.get("max")
    return Stage(start, low=None if low is None else float(low),
                 high=None if high is None else float(high))
  if isinstance(spec, (list, tuple, set, frozenset)):
    return Stage(start, labels=tuple(sorted(spec, key=str)))
  raise ValueError(f"curriculum stage at iteration {start}: bad allowed value {spec!r}")


def parse_schedule(schedule: Any) -> tuple[Stage, ...]:
  """A schedule (string or sequence of (start, allowed)) -> stages; () means no curriculum."""
  if schedule is None or (isinstance(schedule, str) and not schedule.strip()):
    return ()
  if isinstance(schedule, str):
    pairs = []
    for item in schedule.split(","):
      if ":" not in item:
        raise ValueError(f"curriculum schedule {schedule!r}: item {item!r} is not "
                         "'start:allowed'")
      start, spec = item.split(":", 1)
      try:
        pairs.append((int(start), spec))
      except ValueError:
        raise ValueError(f"curriculum schedule {schedule!r}: start {start!r} of item "
                         f"{item!r} is not an integer") from None
  else:
    pairs = list(schedule)
  stages = []
  for i, pair in enumerate(pairs):
    if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
      raise ValueError(f"curriculum stage {i}: expected (start_iteration, allowed), got {pair!r}")
    start, spec = pair
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
      raise ValueError(f"curriculum stage {i}: start iteration must be an int >= 0, got {start!r}")
    if i == 0 and start != 0:
      raise ValueError(f"curriculum stage 0 must start at iteration 0, got {start}")
    if stages and start <= stages[-1].start:
      raise ValueError(f"curriculum stage {i}: start {start} is not after the previous "
                       f"stage's start {stages[-1].start}")
    stages.append(_parse_spec(int(start), spec))
  return tuple(stages)


# ---------------------------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------------------------


class PromptSampler:
  """Draws each iteration's batch of prompt indices.

  The candidate pool at iteration n is every prompt, or the prompts the curriculum allows at n.
  Within the pool, each draw picks prompt i with probability proportional to its weight:
  1 for 'uniform', max(1 - s_i, epsilon) for 'prioritized' (epsilon = 0 follows the paper;
  a small epsilon keeps solved prompts appearing now and then). If every weight in the pool is
  0 (all solved), the draw is uniform. A batch holds no repeated prompt: it is drawn without
  replacement (successive draws proportional to weight, via Gumbel top-k); prompts of weight 0
  only fill a batch that the positive-weight prompts can't, and only a batch larger than the
  whole pool repeats prompts (in whole extra rounds over the pool).
  """

  def __init__(
      self,
      num_prompts: int,
      *,
      mode: str = "uniform",
      success_rates: SuccessRates | None = None,
      difficulties: Any = None,
      schedule: Any = None,
      seed: int = 0,
      epsilon: float = 0.0,
  ):
    if mode not in SAMPLER_MODES:
      raise ValueError(f"unknown sampler mode {mode!r}; valid: {', '.join(SAMPLER_MODES)}")
    if num_prompts <= 0:
      raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"sampler seed must be an int >= 0, got {seed!r}")
    if not 0.0 <= epsilon <= 1.0:
      raise ValueError(f"sampler epsilon must be in [0, 1], got {epsilon}")
    self.num_prompts = int(num_prompts)
    self.mode = mode
    self.seed = int(seed)
    self.epsilon = float(epsilon)
    if success_rates is None:
      success_rates = SuccessRates(self.num_prompts)
    if len(success_rates) != self.num_prompts:
      raise ValueError(f"success_rates tracks {len(success_rates)} prompts, the sampler has "
                       f"{self.num_prompts}")
    self.success_rates = success_rates
    self.stages = parse_schedule(schedule)
    self.difficulties = None
    self._pools: list[np.ndarray] = []
    if self.stages:
      if difficulties is None:
        raise ValueError("a curriculum schedule needs difficulties (one label per prompt)")
      self.difficulties = np.asarray(difficulties)
      if self.difficulties.shape != (self.num_prompts,):
        raise ValueError(f"difficulties has shape {self.difficulties.shape}, expected "
                         f"({self.num_prompts},)")
      for stage in self.stages:
        pool = np.flatnonzero(stage.allows(self.difficulties))
        if pool.size == 0:
          raise ValueError(f"curriculum stage at iteration {stage.start} allows no prompt: "
                           f"{stage} (labels present: {np.unique(self.difficulties)[:20]})")
        self._pools.append(pool)

  def stage(self, iteration: int) -> Stage | None:
    """The curriculum stage in force at `iteration` (None without a curriculum)."""
    if not self.stages:
      return None
    return self.stages[self._stage_index(iteration)]

  def _stage_index(self, iteration: int) -> int:
    starts = [s.start for s in self.stages]
    return int(np.searchsorted(starts, iteration, side="right")) - 1

  def candidates(self, iteration: int) -> np.ndarray:
    """[M] indices of the prompts the curriculum allows at `iteration`."""
    if not self.stages:
      return np.arange(self.num_prompts)
    return self._pools[self._stage_index(iteration)]

  def _pool_weights(self, pool: np.ndarray) -> np.ndarray:
    if self.mode == "uniform":
      return np.ones(pool.shape, np.float64)
    w = np.maximum(1.0 - self.success_rates.rates[pool], self.epsilon)
    if not np.any(w > 0):
      return np.ones(pool.shape, np.float64)
    return w

  def probabilities(self, iteration: int) -> np.ndarray:
    """[N] probability of each prompt for a single draw at `iteration` (0 outside the pool)."""
    pool = self.candidates(iteration)
    w = self._pool_weights(pool)
    p = np.zeros(self.num_prompts, np.float64)
    p[pool] = w / w.sum()
    return p

  def sample(self, iteration: int, batch_size: int) -> np.ndarray:
    """[batch_size] int64 prompt indices for `iteration`; deterministic given the state."""
    if isinstance(iteration, bool) or not isinstance(iteration, (int, np.integer)) \
        or iteration < 0:
      raise ValueError(f"iteration must be an int >= 0, got {iteration!r}")
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng([self.seed, int(iteration)])
    pool = self.candidates(iteration)
    with np.errstate(divide="ignore"):
      log_w = np.log(self._pool_weights(pool))  # -inf for weight 0
    out = []
    remaining = batch_size
    while remaining > 0:
      n = min(remaining, pool.size)
      # Gumbel top-k: sorting log w + Gumbel noise = successive draws proportional to w without
      # replacement. The uniform tiebreak orders weight-0 prompts (all at -inf) at random.
      keys = log_w + rng.gumbel(size=pool.size)
      tiebreak = rng.random(pool.size)
      order = np.lexsort((tiebreak, -keys))
      out.append(pool[order[:n]])
      remaining -= n
    return np.concatenate(out).astype(np.int64)

  def state_dict(self) -> dict[str, Any]:
    return {"seed": self.seed, "success_rates": self.success_rates.state_dict()}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"sampler state was saved with seed {int(state['seed'])}, this sampler "
                       f"has seed {self.seed}; resuming with another seed changes every draw")
    self.success_rates.load_state_dict(state["success_rates"])


class PrioritizedSampler(PromptSampler):
  """Prioritized sampling over all prompts: P(i) proportional to max(1 - s_i, epsilon)."""

  def __init__(self, num_prompts: int, success_rates: SuccessRates | None = None,
               seed: int = 0, *, epsilon: float = 0.0):
    super().__init__(num_prompts, mode="prioritized", success_rates=success_rates, seed=seed,
                     epsilon=epsilon)


class CurriculumSampler(PromptSampler):
  """Curriculum sampling: uniform over the prompts whose difficulty the schedule allows."""

  def __init__(self, difficulties: Any, schedule: Any, seed: int = 0):
    super().__init__(len(difficulties), difficulties=difficulties, schedule=schedule, seed=seed)


_CONFIG_KEYS = ("mode", "curriculum", "seed", "epsilon", "success_decay", "success_initial",
                "success_prior_samples")


def make_sampler(
    config: Mapping[str, Any] | Any = None,
    difficulties: Any = None,
    *,
    num_prompts: int | None = None,
    success_rates: SuccessRates | None = None,
    pass_rates: Sequence[float | None] | None = None,
    **overrides: Any,
) -> PromptSampler:
  """Builds a PromptSampler from config (a dict or ml_collections.ConfigDict) and/or kwargs.

  Config keys (all optional):
    mode: 'uniform' (default) or 'prioritized'.
    curriculum: a schedule (module docstring); None or '' for none. Needs `difficulties`.
    seed: int >= 0 (default 0).
    epsilon: floor on prioritized weights (default 0.0).
    success_decay: SuccessRates decay (default None: running mean).
    success_initial: success rate of never-seen prompts (default 0.0).
    success_prior_samples: 0 (default) or n >= 1: start each prompt's success rate from its
      curation pass rate (`pass_rates`), counted as n observed samples (`SuccessRates.start_from`).

  Args:
    config: the sampler's config section.
    difficulties: [N] difficulty label per prompt; sets N.
    num_prompts: N when no difficulties are given.
    success_rates: an existing table to share (otherwise one is made from config).
    pass_rates: [N] curation pass rate per prompt (None where unknown), for
      success_prior_samples.
    **overrides: config keys, taking precedence over `config`.
  """
  if config is None:
    cfg = {}
  elif hasattr(config, "to_dict"):
    cfg = dict(config.to_dict())
  else:
    cfg = dict(config)
  cfg.update(overrides)
  unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
  if unknown:
    raise ValueError(f"unknown sampler config keys {unknown}; valid: {', '.join(_CONFIG_KEYS)}")
  if difficulties is not None:
    if num_prompts is not None and num_prompts != len(difficulties):
      raise ValueError(f"num_prompts={num_prompts} but {len(difficulties)} difficulties given")
    num_prompts = len(difficulties)
  if num_prompts is None:
    if success_rates is None:
      raise ValueError("make_sampler needs difficulties, num_prompts or success_rates")
    num_prompts = len(success_rates)
  if success_rates is None:
    success_rates = SuccessRates(num_prompts, decay=cfg.get("success_decay"),
                                 initial=cfg.get("success_initial", 0.0))
  prior = cfg.get("success_prior_samples", 0)
  if prior:
    if pass_rates is None or all(r is None for r in pass_rates):
      raise ValueError(f"sampling.success_prior_samples={prior} starts success rates from the "
                       "prompts' curation pass rates, but no prompt has one (curation skipped?)")
    success_rates.start_from(pass_rates, prior)
  return PromptSampler(
      num_prompts,
      mode=cfg.get("mode", "uniform"),
      success_rates=success_rates,
      difficulties=difficulties,
      schedule=cfg.get("curriculum"),
      seed=cfg.get("seed", 0),
      epsilon=cfg.get("epsilon", 0.0),
  )


# ---------------------------------------------------------------------------------------------
# grain adapter.
# ---------------------------------------------------------------------------------------------


class SampledPromptDataset(grain.IterDataset):
  """A grain IterDataset yielding one batch of prompt records per RL iteration.

  Element n (iteration start_iteration + n) is a dict
    {'iteration': int, 'indices': [B] int64 prompt indices, 'records': [records[i] ...]}
  drawn by `sampler.sample(iteration, batch_size)`. Chain `.map(...)` for tokenisation. The
  iterator's state is {'iteration': int} (JSON, as grain checkpointing expects); save the
  sampler's `state_dict()` beside it. Draws read the success-rate table when they happen, so
  don't prefetch ahead of it: batch i must be drawn after the update from iteration i - 1.

  Args:
    records: random-access prompt records (a list, or a grain.MapDataset), one per prompt.
    sampler: the PromptSampler; records[i] is prompt i.
    batch_size: prompts per iteration.
    start_iteration: the first iteration's number.
    num_iterations: stop after this many batches (None: never stop).
  """

  def __init__(self, records: Sequence[Any] | grain.MapDataset, sampler: PromptSampler,
               batch_size: int, *, start_iteration: int = 0,
               num_iterations: int | None = None):
    super().__init__()
    if len(records) != sampler.num_prompts:
      raise ValueError(f"{len(records)} records but the sampler has {sampler.num_prompts} "
                       "prompts")
    self.records = records
    self.sampler = sampler
    self.batch_size = int(batch_size)
    self.start_iteration = int(start_iteration)
    self.num_iterations = num_iterations

  def __iter__(self) -> grain.DatasetIterator:
    return _SampledPromptIterator(self)

  def __str__(self) -> str:
    return (f"SampledPromptDataset(num_prompts={self.sampler.num_prompts}, "
            f"batch_size={self.batch_size}, mode={self.sampler.mode!r})")


class _SampledPromptIterator(grain.DatasetIterator):

  def __init__(self, ds: SampledPromptDataset):
    super().__init__()
    self._ds = ds
    self._iteration = ds.start_iteration

  def __next__(self) -> dict[str, Any]:
    self._assert_not_closed()
    ds = self._ds
    if (ds.num_iterations is not None
        and self._iteration >= ds.start_iteration + ds.num_iterations):
      raise StopIteration
    indices = ds.sampler.sample(self._iteration, ds.batch_size)
    batch = {"iteration": self._iteration, "indices": indices,
             "records": [ds.records[int(i)] for i in indices]}
    self._iteration += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"iteration": self._iteration}

  def set_state(self, state: dict[str, Any]) -> None:
    if "iteration" not in state:
      raise ValueError(f"sampled-prompt iterator state has no 'iteration' key: {state}")
    self._iteration = int(state["iteration"])
