"""The k1.5 RL iteration (paper §2.3.2, §2.6) on one set of sharded parameters.

One iteration:
  draw prompts (curriculum / prioritized, k15.data.samplers)
  -> k samples each with the KV-cache sampler, partial rollouts on (k15.sampling.rollout)
  -> rewards: task verifier + length penalty + repeat penalty (k15.rewards)
  -> ref_logp = pi_i's log-probs of every packed row, from the trainer's own forward pass
  -> several jitted minibatch steps of the chosen loss (k15.rl.loss) on the same params
  -> pi_{i+1} is the next reference; the optimizer state is reset at the start of each
     iteration, as the paper does (config rl.reset_optimizer), the learning-rate schedule's
     step excepted (it counts the run's optimizer steps, `carry_schedule_step`)
  -> metrics, checkpoint.

The reference pi_i (rl.reference='trainer'). PMD's regulariser is tau (S - S_ref)^2 with S the
sequence log-prob under the parameters being trained and S_ref the same under pi_i (§2.3.2).
S_ref is computed by the same jitted code as S (k15.update.logprobs_and_router_aux: the same
chunked head, dtypes and expert routing) on the same parameters before the first update, so
S - S_ref is 0 exactly on the iteration's first minibatch and measures the update alone after
it. That first minibatch needs no pass: its own forward, before the update, is pi_i's, and the
loss takes S_ref from it (batch key ref_self), so with one minibatch per iteration and one pass
the reference pass never runs. The sampler's own log-probs differ from pi_i's by its kernels
(KV cache, decode attention), bf16 rounding, and by temperature and top-p, which change the
distribution it draws from.
Temperature and top-p are handled one way: pi_i is the untempered, untruncated policy, the same
model the loss evaluates for S, so the two sides of the log-ratio are one distribution; the
sampler's (tempered, truncated) log-probs are a diagnostic only (rl/sampler_ref_abs_diff_mean
and _max per token, rl/sampler_ref_seq_abs_diff per sequence, on the tokens it sampled this
iteration). With temperature != 1 or top_p < 1 the samples come from a tempered pi_i, an
off-policy correction the paper does not make and neither does k15. rl.reference='sampler'
keeps the sampler's log-probs as the reference (no extra forward pass, biased as above).

Groups and partial rollouts: a prompt's k samples form its group, and the PMD baseline is
the group's mean reward, so a group is trained on once all k of its samples have finished.
Samples that finished while others of their group are still in the replay buffer wait in
`pending`, which the checkpoint saves with the buffer. Of a sample that spans iterations only
the current segment enters the loss (§2.6: "only the current segment is on-policy"), unless
rl.loss_on_old_segments. A sample that finished in an earlier iteration than its group's last
(an early finisher, often a short one) has no current segment; rl.early_finishers decides
what happens to it, so that no sample sits in the group baseline without a gradient (which
would bias training toward the long samples that finish last):
  'train' (default): all its tokens enter the loss. They were drawn by an older policy, but
     S_ref is pi_i's own log-prob of them, so the regulariser pulls the update toward pi_i on
     them exactly as on the on-policy samples; the off-policy part is only that the sample was
     drawn from pi_{i-1} (one or a few updates away), the paper's own approximation for the
     older segments it keeps.
  'exclude': sample weight 0: out of the loss and out of its group's mean and normaliser, as
     if it had never been drawn (the group's baseline is the mean of the samples that train).
docs/rl_notes.md compares the two on a run with partial rollouts on.

Optimizer state. With rl.reset_optimizer (the paper's rule) Adam's moments are created after
sampling, just before the first update, and dropped after the last one, so they never share
the devices with the sampler's KV cache; between iterations (and in the checkpoint) only the
learning-rate schedule's step count is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import metrics as metrics_lib
from k15 import parallel, update
from k15.data import samplers
from k15.model import logprobs as logprobs_lib
from k15.model import transformer
from k15.rewards import finish as finish_lib
from k15.rewards import length as length_lib
from k15.rl import loss as loss_lib
from k15 import sampling

# reward_fn(prompt_indices [n], responses: n token arrays) -> task rewards [n] in [0, 1]
RewardFn = Callable[[Sequence[int], Sequence[np.ndarray]], np.ndarray]


GROUP_KEYS = ("rewards", "sample_weight", "ref_self")  # [G, k]; the others are [G*k, T]
REFERENCES = ("trainer", "sampler")
# config.rl.batching -> sampling.generate's `continuous` (None: its default rule).
BATCHING = {"auto": None, "static": False, "continuous": True}
EARLY_FINISHERS = ("train", "exclude")


def _bucket(n: int, multiple: int) -> int:
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


def build_batch(groups: list[list[sampling.Trajectory]], rewards: np.ndarray, *,
                num_groups: int, length: int, version: int, loss_on_old_segments: bool,
                mask_truncated: bool, drop_equal_reward_groups: bool,
                early_finishers: str = "train") -> dict[str, np.ndarray]:
  """Packs finished groups into fixed-shape training arrays.

  Rows are prompt + response, left-aligned, right-padded to `length`; padding groups (up to
  `num_groups`) get sample_weight 0. mask[t] = 1 where token t is a response token whose
  log-prob enters the loss; ref_logp[t] is the log-prob the sampler reported for token t (the
  trainer replaces it by its own reference pass, see the module docstring); current[t] = 1
  where token t was sampled by policy `version` (the trainer's diagnostics, not a loss input).
  A sample without a token of `version` (an early finisher, see the module docstring) trains
  on all its tokens ('train') or gets sample_weight 0 ('exclude'). ref_self [G, k] is 0 here;
  the trainer sets it to 1 on the rows whose reference is their own forward pass (the loss
  then ignores their ref_logp, see `make_loss_fn`).
  Trajectories of a mixture of experts add expert_ids [rows, length, MoE layers, top-k]: the
  sampler's routing of every token, prompt and response (`Trajectory.expert_ids`), -1 where
  nothing is recorded (padding, a response's last token), for routing replay.
  """
  if early_finishers not in EARLY_FINISHERS:
    raise ValueError(f"config.rl.early_finishers={early_finishers!r}; expected one of "
                     f"{EARLY_FINISHERS}")
  k = len(groups[0])
  G = num_groups
  tokens = np.zeros((G * k, length), np.int32)
  positions = np.zeros((G * k, length), np.int32)
  segment_ids = np.zeros((G * k, length), np.int32)
  mask = np.zeros((G * k, length), np.float32)
  current = np.zeros((G * k, length), np.float32)
  ref_logp = np.zeros((G * k, length), np.float32)
  r = np.zeros((G, k), np.float32)
  weight = np.zeros((G, k), np.float32)
  routed = next((t.expert_ids for g in groups for t in g if t.expert_ids is not None), None)
  if routed is not None:
    expert_ids = np.full((G * k, length) + routed.shape[1:], -1, routed.dtype)
  for g, group in enumerate(groups):
    equal = np.all(rewards[g] == rewards[g][0])
    for j, traj in enumerate(group):
      row = g * k + j
      p, resp = traj.prompt, traj.tokens
      n = min(len(p) + len(resp), length)
      seq = np.concatenate([p, resp])[:n]
      tokens[row, :n] = seq
      positions[row, :n] = np.arange(n)
      segment_ids[row, :n] = 1
      resp_slice = slice(len(p), n)
      cur = (traj.versions[:n - len(p)] == version).astype(np.float32)
      early = not traj.on_policy_mask(version).any()
      m = np.ones(n - len(p), np.float32)
      if not loss_on_old_segments and not (early and early_finishers == "train"):
        m *= cur
      mask[row, resp_slice] = m
      current[row, resp_slice] = cur
      ref_logp[row, resp_slice] = traj.logprobs[:n - len(p)]
      if routed is not None and traj.expert_ids is not None:
        expert_ids[row, :n] = traj.expert_ids[:n]
      r[g, j] = rewards[g, j]
      truncated = traj.finish_reason == sampling.FinishReason.LENGTH
      excluded = (mask_truncated and truncated) or (early and early_finishers == "exclude")
      weight[g, j] = 0.0 if excluded else 1.0
    if drop_equal_reward_groups and equal:
      weight[g] = 0.0
  batch = {"tokens": tokens, "positions": positions, "segment_ids": segment_ids, "mask": mask,
           "ref_logp": ref_logp, "rewards": r, "sample_weight": weight, "current": current,
           "ref_self": np.zeros((G, k), np.float32)}
  if routed is not None:
    batch["expert_ids"] = expert_ids
  return batch


def sampler_gap(sampler_logp: np.ndarray, ref_logp: np.ndarray,
                current: np.ndarray) -> dict[str, float]:
  """How far the sampler's log-probs are from the reference pass's, on the current tokens.

  All [R, T]; `current` selects the tokens the policy of this iteration sampled (older
  segments were sampled by another policy, so their gap is not the sampler's). Per token: the
  mean and max of |sampler - reference|; per sequence: the mean over rows of |sum_t (sampler -
  reference)|, the error it would put in S_ref.
  """
  d = (sampler_logp - ref_logp) * current
  rows = current.sum(-1) > 0
  n = max(float(current.sum()), 1.0)
  return {"rl/sampler_ref_abs_diff_mean": float(np.abs(d).sum() / n),
          "rl/sampler_ref_abs_diff_max": float(np.abs(d).max()) if d.size else 0.0,
          "rl/sampler_ref_seq_abs_diff": (float(np.abs(d.sum(-1))[rows].mean())
                                          if rows.any() else 0.0)}


def carry_schedule_step(fresh: Any, old: Any) -> Any:
  """`fresh` optimizer state with the learning-rate schedule's step count taken from `old`.

  The paper resets the optimizer at the start of each iteration (§2.3.2): Adam's moments and
  its bias-correction count start over. The learning-rate schedule (warm-up, decay over
  optimizer.decay_steps) is the run's, not the iteration's: without this its count would
  restart too, and a warm-up would rerun every iteration. Its step is the number of optimizer
  steps taken in the whole run.
  """
  return with_schedule_counts(fresh, schedule_counts(old))


def _is_schedule(x) -> bool:
  return isinstance(x, optax.ScaleByScheduleState)


def schedule_counts(opt_state: Any) -> list[Any]:
  """The step counts of the learning-rate schedules in `opt_state`, in tree order."""
  return [x.count for x in jax.tree.leaves(opt_state, is_leaf=_is_schedule) if _is_schedule(x)]


def with_schedule_counts(opt_state: Any, counts: list[Any]) -> Any:
  """`opt_state` with its schedules' step counts replaced by `counts` (`schedule_counts`)."""
  it = iter(counts)
  return jax.tree.map(lambda x: x._replace(count=next(it)) if _is_schedule(x) else x,
                      opt_state, is_leaf=_is_schedule)


def _zero_schedule_counts(abstract_opt_state: Any, opt_shardings: Any) -> list[jax.Array]:
  """Zero schedule counts laid out as in the optimizer state: nothing else of it is created."""
  counts = schedule_counts(abstract_opt_state)
  shardings = schedule_counts(jax.tree.map(
      lambda a, sh: sh, abstract_opt_state, opt_shardings,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)))
  return [jax.device_put(np.zeros(c.shape, c.dtype), sh) for c, sh in zip(counts, shardings)]


def make_loss_fn(rl_cfg: Any, k: int):
  """loss(model, batch) for the configured objective, on [G*k, T] rows viewed as [G, k, T]."""
  name = rl_cfg.loss

  def loss_fn(model, batch):
    # Log-probs and entropies with the head in tiles (model.logits_chunk), never [R, T, V];
    # routed by the sampler's experts with rl.routing_replay (the batch then has expert_ids).
    logp, ent, aux = update.logprobs_and_router_aux(
        model, batch["tokens"], batch["positions"], batch["segment_ids"],
        batch.get("expert_ids") if rl_cfg.get("routing_replay") else None)     # [R, T] each
    R, T = logp.shape
    shape = (R // k, k, T)
    ref = batch["ref_logp"]
    if "ref_self" in batch:
      # Rows trained before any update of the iteration take pi_i's log-probs from this very
      # forward pass: the value the reference pass would give, without running it.
      own = batch["ref_self"].reshape(R, 1) > 0
      ref = jnp.where(own, jax.lax.stop_gradient(logp), ref)
    loss, metrics = loss_lib.compute_loss(
        name, logp.reshape(shape), ref.reshape(shape),
        batch["mask"].reshape(shape), batch["rewards"], tau=rl_cfg.tau,
        clip_eps=rl_cfg.clip_eps, sample_weight=batch["sample_weight"])
    # Mean token entropy of the policy on the response tokens (a diagnostic, no gradient).
    ent = ent[:, 1:]                                                           # [R, T-1]
    m = batch["mask"][:, 1:]
    metrics["entropy"] = jax.lax.stop_gradient(jnp.sum(ent * m) / jnp.maximum(m.sum(), 1.0))
    # A mixture of experts adds model.router_aux_weight x the load-balancing loss.
    return update.add_router_aux(model, loss, metrics, aux)

  return loss_fn


def make_reference_fn(graphdef: nnx.GraphDef, param_shardings: Any = None):
  """ref(params, batch) -> log pi(token) [R, T] float32: PMD's reference pass.

  The loss's forward (`make_loss_fn`) without the loss: the same `logprobs_and_router_aux`
  call on the same batch entries (MoE expert ids replayed when the batch holds them, that is
  with rl.routing_replay), so that at equal parameters the two give the same log-probs and
  S - S_ref starts at 0.
  """

  def ref(params, batch):
    logp, _, _ = update.logprobs_and_router_aux(
        nnx.merge(graphdef, params), batch["tokens"], batch["positions"],
        batch["segment_ids"], batch.get("expert_ids"))
    return logp

  return jax.jit(ref, in_shardings=(param_shardings, None))


def routing_mismatch(model: transformer.Transformer, batch: dict) -> dict[str, jax.Array]:
  """How far the trainer's forward is from the sampler's, on a batch with recorded routing.

  Sums (the caller divides them over the whole batch): `choices`, the recorded (token, MoE
  layer, slot) choices, and `differ`, those of them that the trainer's own router does not pick
  for that token and layer (its top-k as a set); over the loss tokens (mask), `tokens` and the
  summed |trainer - sampler| log-prob gap with the trainer's own routing (`gap`) and with the
  sampler's replayed (`gap_replay`), and their largest values (`gap_max`, `gap_replay_max`).
  Run under the parameters that sampled the batch, so that only numerics and routing separate
  the two log-probs.
  """
  tokens, positions, segment_ids = batch["tokens"], batch["positions"], batch["segment_ids"]
  recorded = batch["expert_ids"].astype(jnp.int32)                        # [R, T, L, k]
  own_logp, _, routing = logprobs_lib.token_logprobs_and_entropy(
      model, tokens, positions, segment_ids, return_routing=True)
  replay_logp = logprobs_lib.token_logprobs_and_entropy(
      model, tokens, positions, segment_ids, expert_ids=update.replay_ids(recorded))[0]
  own = jnp.stack(routing["expert_ids"], axis=2)                          # [R, T, L, k]
  valid = (recorded[..., 0] >= 0) & (segment_ids > 0)[:, :, None]          # [R, T, L]
  missing = ~jnp.any(recorded[..., :, None] == own[..., None, :], axis=-1)  # [R, T, L, k]
  m = batch["mask"]
  gap = jnp.abs(own_logp - batch["ref_logp"]) * m
  gap_replay = jnp.abs(replay_logp - batch["ref_logp"]) * m
  return {"choices": jnp.sum(valid) * recorded.shape[-1],
          "differ": jnp.sum(missing & valid[..., None]), "tokens": jnp.sum(m),
          "gap": jnp.sum(gap), "gap_replay": jnp.sum(gap_replay),
          "gap_max": jnp.max(gap), "gap_replay_max": jnp.max(gap_replay)}


def expert_counts(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
  """Recorded routing [..., L, k] -> tokens per expert [L, E] (-1 entries are not counted)."""
  ids = expert_ids.reshape(-1, *expert_ids.shape[-2:]).astype(np.int64)   # [N, L, k]
  return np.stack([np.bincount(ids[:, l][ids[:, l] >= 0], minlength=num_experts)
                   for l in range(ids.shape[1])])


def data_seed(config: Any) -> int:
  """The seed of the prompt order: config.data.seed, or config.seed when that is -1.

  Separate from config.seed (the sampling and minibatch seed), so that ablation arms can draw
  the same prompts and differ only in what they study.
  """
  data = config.get("data")
  seed = data.get("seed", -1) if data is not None else -1
  return config.seed if seed < 0 else seed


@dataclasses.dataclass
class Prompt:
  """A prompt as the trainer sees it: token ids, difficulty label and curation pass rate.

  difficulty: higher is harder (k15.data.samplers); pass_rate: the curation's (§2.1), which
  rl.sampling.success_prior_samples can start the success-rate table from. Either may be None.
  """
  tokens: list[int]
  difficulty: Any = None
  pass_rate: float | None = None


@runtime_checkable
class PromptSet(Protocol):
  """The trainer's prompts: labels of every prompt, and the tokens of the ones drawn.

  k15.data.prompt_file.PromptFile is one (a file each host reads its share of); `PromptList`
  holds them in memory. `tokens` must return the same lists on every host.
  """
  difficulties: Sequence[Any]
  pass_rates: Sequence[float | None]

  def __len__(self) -> int: ...

  def tokens(self, ids: Sequence[int]) -> list[list[int]]: ...


class PromptList:
  """A PromptSet of in-memory `Prompt`s (the tiny pipeline's, the tests')."""

  def __init__(self, prompts: Sequence[Prompt]):
    self._prompts = list(prompts)
    self.difficulties = [p.difficulty for p in self._prompts]
    self.pass_rates = [p.pass_rate for p in self._prompts]

  def __len__(self) -> int:
    return len(self._prompts)

  def tokens(self, ids: Sequence[int]) -> list[list[int]]:
    return [self._prompts[int(i)].tokens for i in ids]


class RLTrainer:
  """Runs RL iterations on `model` (sharded on `mesh`) over `prompts`.

  reward_fn(prompt_indices, response_token_arrays) -> task rewards in [0, 1]; a reward above
  0.5 counts as correct for the success-rate table and the length penalty.
  """

  def __init__(self, config: Any, model: transformer.Transformer,
               prompts: Sequence[Prompt] | PromptSet, reward_fn: RewardFn, *, mesh,
               workdir: str, eos_id: int | Sequence[int] | None, pad_id: int = 0):
    self.config, self.rl = config, config.rl
    loss_lib.check_config(self.rl)
    self.mesh, self.workdir = mesh, workdir
    self.prompts = prompts if isinstance(prompts, PromptSet) else PromptList(prompts)
    self.reward_fn = reward_fn
    self.eos_id, self.pad_id = eos_id, pad_id
    self.graphdef, params = nnx.split(model)
    # The train step donates its params; copy them so the caller's model stays usable (the
    # pipeline evaluates the SFT model after RL).
    self.params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
    self.param_shardings = parallel.state_shardings(self.params, mesh)
    self.optimizer = update.make_optimizer(config.optimizer)
    self.reference = self.rl.get("reference", "trainer")
    self.early_finishers = self.rl.get("early_finishers", "train")
    if self.reference not in REFERENCES:
      raise ValueError(f"config.rl.reference={self.reference!r}; expected one of {REFERENCES}")
    if self.early_finishers not in EARLY_FINISHERS:
      raise ValueError(f"config.rl.early_finishers={self.early_finishers!r}; expected one of "
                       f"{EARLY_FINISHERS}")
    self.batching = self.rl.get("batching", "auto")
    if self.batching not in BATCHING:
      raise ValueError(f"config.rl.batching={self.batching!r}; expected one of "
                       f"{tuple(BATCHING)}")
    if (self.reference == "sampler" and self.rl.segment_budget
        and (self.early_finishers == "train" or self.rl.loss_on_old_segments)):
      # Older segments carry the log-probs of the policy that sampled them, not pi_i's.
      raise ValueError(
          "config.rl.reference='sampler' with partial rollouts (rl.segment_budget > 0) cannot "
          "train on tokens of older policies (rl.early_finishers='train' or "
          "rl.loss_on_old_segments): their sampler log-probs are not pi_i's; use "
          "rl.reference='trainer' or rl.early_finishers='exclude'")
    # With the optimizer reset every iteration the moments live only while training (created
    # in `_train`, dropped after it); between iterations only the schedule's step count stays.
    self.opt_shardings = update.optimizer_shardings(self.optimizer, self.params,
                                                    self.param_shardings, mesh)
    if self.rl.reset_optimizer:
      self.opt_state = None
      self.schedule_counts = _zero_schedule_counts(
          jax.eval_shape(self.optimizer.init, self.params), self.opt_shardings)
    else:
      self.opt_state = jax.jit(self.optimizer.init,
                               out_shardings=self.opt_shardings)(self.params)
    self.k = self.rl.samples_per_prompt
    if self.rl.minibatch_groups % self.rl.microbatches:
      # A group's rewards give its baseline (the PMD mean reward, §2.3.2), so a microbatch holds
      # whole groups: splitting [G, k] rewards 4 ways with G = 1 cannot work.
      raise ValueError(
          f"config.rl.microbatches={self.rl.microbatches} does not divide "
          f"config.rl.minibatch_groups={self.rl.minibatch_groups}: a microbatch holds whole "
          f"groups (the group's mean reward is its baseline); set rl.microbatches to a divisor "
          f"of rl.minibatch_groups")
    self.peak_flops = metrics_lib.peak_flops(mesh.devices.flat)
    self._steps: dict[int, Any] = {}
    self._ref_fn = None
    self._mismatch = None  # the jitted `routing_mismatch`, built on first use

    self.sampler = samplers.make_sampler(
        self.rl.sampling,
        list(self.prompts.difficulties) if self.rl.sampling.get("curriculum") else None,
        num_prompts=len(self.prompts), pass_rates=list(self.prompts.pass_rates),
        seed=data_seed(config))
    self.success = self.sampler.success_rates
    self.buffer = sampling.ReplayBuffer()
    self.pending: dict[str, list[dict]] = {}   # group id -> finished samples (as dicts)
    self.iteration = 0
    self.preempted = False  # set when train() stopped early on SIGTERM (after saving)
    # Preemption checks so far, iterations' and sampling pieces' alike: every process makes the
    # same calls in the same order, so the count is the step JAX's preemption service agrees on.
    self._stop_checks = 0
    self.rng = jax.random.key(config.seed)
    self.checkpointer = ckpt_lib.Checkpointer(
        workdir, save_every=config.checkpoint.every, keep=config.checkpoint.keep)
    self.writer = metrics_lib.MetricWriter(workdir)

  # --- checkpoint ----------------------------------------------------------------------------

  def _arrays(self):
    # With the optimizer reset every iteration its moments are not kept between iterations,
    # nor saved: only the schedule's step counts are.
    opt = ({"schedule_counts": self.schedule_counts} if self.rl.reset_optimizer
           else {"opt_state": self.opt_state})
    return {"params": self.params, **opt, "success_rates": self.success.state_dict()}

  def _meta(self):
    return {"iteration": self.iteration, "buffer": self.buffer.state_dict(),
            "pending": self.pending}

  def save(self, force: bool = False):
    self.checkpointer.save(self.iteration, arrays=self._arrays(), meta=self._meta(),
                           force=force)

  def maybe_restore(self) -> bool:
    step = self.checkpointer.latest_step()
    if step is None:
      return False
    target = {key: ckpt_lib.abstract(v) for key, v in self._arrays().items()
              if key != "success_rates"}
    target["success_rates"] = self.success.state_dict()  # numpy: restored onto the host
    arrays, meta = self.checkpointer.restore(step, abstract_arrays=target)
    self.params = arrays["params"]
    if self.rl.reset_optimizer:
      self.schedule_counts = arrays["schedule_counts"]
    else:
      self.opt_state = arrays["opt_state"]
    self.success.load_state_dict(arrays["success_rates"])
    self.iteration = int(meta["iteration"])
    self.buffer.load_state_dict(meta["buffer"])
    self.pending = {k: list(v) for k, v in meta["pending"].items()}
    logging.info("resumed from iteration %d", self.iteration)
    return True

  # --- one iteration ---------------------------------------------------------------------------

  def _train_step(self, num_rows: int):
    if num_rows not in self._steps:
      mb = self.rl.microbatches
      self._steps[num_rows] = update.make_train_step(
          self.graphdef, make_loss_fn(self.rl, self.k), self.optimizer, microbatches=mb,
          param_shardings=self.param_shardings, opt_shardings=self.opt_shardings)
    return self._steps[num_rows]

  def _rows(self, groups: np.ndarray) -> np.ndarray:
    """The batch rows [len(groups) * k] of `groups`, each group's k samples in order."""
    return (np.asarray(groups)[:, None] * self.k + np.arange(self.k)).reshape(-1)

  def _place(self, batch: dict[str, np.ndarray], groups: np.ndarray,
             keys: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """The entries `keys` (default all) of `groups`' rows of `batch`, as global device arrays."""
    rows = self._rows(groups)
    out = {}
    for key in (batch.keys() if keys is None else keys):
      v = batch[key][groups] if key in GROUP_KEYS else batch[key][rows]
      # Every host built the same batch; each places only the rows its devices hold.
      out[key] = parallel.host_to_global(v, parallel.sharding(("batch", None), v.shape,
                                                              self.mesh))
    return out

  def _reference_logprobs(self, batch: dict[str, np.ndarray],
                          groups: np.ndarray | None = None) -> np.ndarray:
    """pi_i's log-probs [G*k, T] of the rows of `groups` (default all), before any update.

    Run in the train step's microbatch shapes, one microbatch of groups at a time, so that its
    memory is a forward pass of one microbatch and it compiles to the loss's own forward. The
    rows of other groups keep batch["ref_logp"]'s values.
    """
    if self._ref_fn is None:
      self._ref_fn = make_reference_fn(self.graphdef, self.param_shardings)
    keys = [key for key in ("tokens", "positions", "segment_ids", "expert_ids") if key in batch]
    G = batch["rewards"].shape[0]
    groups = np.arange(G) if groups is None else np.asarray(groups)
    step = self.rl.minibatch_groups // self.rl.microbatches
    if len(groups) % step:
      raise ValueError(f"{len(groups)} groups for the reference pass: not whole microbatches "
                       f"of {step}")
    out = [self._ref_fn(self.params, self._place(batch, groups[s:s + step], keys))
           for s in range(0, len(groups), step)]
    ref = batch["ref_logp"].copy()
    if out:
      ref[self._rows(groups)] = np.concatenate(parallel.global_to_host(out), axis=0)
    return ref

  def _collect(self, it: int):
    """Sampling: new prompts this iteration plus continuations from the replay buffer."""
    rl = self.rl
    ids = self.sampler.sample(it, rl.prompts_per_iteration)
    model = nnx.merge(self.graphdef, self.params)
    finished, self.buffer = sampling.rollout(
        model, list(zip((int(i) for i in ids), self.prompts.tokens(ids))),
        num_samples=self.k, max_new_tokens=rl.max_new_tokens,
        segment_budget=rl.segment_budget or rl.max_new_tokens, buffer=self.buffer,
        policy_version=it, seed=int(jax.random.randint(
            jax.random.fold_in(self.rng, it), (), 0, 2**31 - 1)),
        eos_id=self.eos_id, temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
        repeat_ngram=rl.repeat_ngram, continuous=BATCHING[self.batching],
        check_every=rl.preemption_check_tokens,
        stop_check=self._should_stop if rl.preemption_check_tokens else None)
    return ids, finished

  def _should_stop(self) -> bool:
    self._stop_checks += 1
    return self.checkpointer.should_stop(self._stop_checks)

  def _routing_metrics(self, batch: dict) -> dict[str, float]:
    """`routing_mismatch` over the batch under the sampling params (before any update)."""
    if self._mismatch is None:
      graphdef = self.graphdef
      self._mismatch = jax.jit(lambda params, mb: routing_mismatch(nnx.merge(graphdef, params),
                                                                   mb))
    rows = self.rl.minibatch_groups * self.k
    keys = ("tokens", "positions", "segment_ids", "mask", "ref_logp", "expert_ids")
    sums = []
    for s in range(0, batch["tokens"].shape[0], rows):
      mb = {key: parallel.host_to_global(
          batch[key][s:s + rows], parallel.sharding(("batch", None), batch[key][s:s + rows].shape,
                                                    self.mesh)) for key in keys}
      sums.append(self._mismatch(self.params, mb))
    sums = parallel.global_to_host(sums)
    total = {key: float(np.sum([m[key] for m in sums])) for key in sums[0]}
    tokens = max(total["tokens"], 1.0)
    return {
        "moe/routing_disagreement": total["differ"] / max(total["choices"], 1.0),
        "moe/logp_gap": total["gap"] / tokens,
        "moe/logp_gap_replay": total["gap_replay"] / tokens,
        "moe/logp_gap_max": float(np.max([m["gap_max"] for m in sums])),
        "moe/logp_gap_replay_max": float(np.max([m["gap_replay_max"] for m in sums])),
    }

  def _record_routing(self, batch: dict) -> None:
    """Appends the batch's tokens per expert and MoE layer to WORKDIR/moe_routing.jsonl: the
    routing known before the step, from which expert placement can be planned (k15.moe_placement,
    benchmarks/moe_placement.py)."""
    if jax.process_index():
      return
    counts = expert_counts(batch["expert_ids"], self.config.model.num_experts)
    with open(f"{self.workdir}/moe_routing.jsonl", "a") as f:
      f.write(json.dumps({"iteration": self.iteration, "counts": counts.tolist()}) + "\n")

  def _ready_groups(self, finished):
    for traj in finished:
      # A group is a prompt's k samples started in the same iteration (versions[0]).
      gid = f"{traj.prompt_id}:{int(traj.versions[0])}"
      self.pending.setdefault(gid, []).append(traj.to_dict())
    ready = []
    for gid in sorted(self.pending):
      # A prompt drawn twice in one iteration (a pool smaller than the batch) has 2k samples
      # under one id. Each trajectory has its own seed, so any k of them are k independent
      # samples of pi_i for that prompt: a group. Take them k at a time, in arrival order.
      samples = self.pending.pop(gid)
      while len(samples) >= self.k:
        group = sorted(samples[:self.k], key=lambda d: d["sample_index"])
        ready.append([sampling.Trajectory.from_dict(d) for d in group])
        samples = samples[self.k:]
      if samples:
        self.pending[gid] = samples
    return ready

  def step(self) -> dict[str, float]:
    """Runs one iteration and returns its metrics."""
    rl, it = self.rl, self.iteration
    t0 = time.perf_counter()
    ids, finished = self._collect(it)
    t_sample = time.perf_counter() - t0
    groups = self._ready_groups(finished)
    sampled_tokens = sum(int(np.sum(t.versions == it)) for t in finished)

    metrics: dict[str, float] = {"rl/groups_trained": len(groups),
                                 "rl/buffer_size": len(self.buffer),
                                 "rl/sampled_tokens": sampled_tokens}
    if groups:
      flat = [t for g in groups for t in g]
      # Each host grades its share of the responses; every host then holds all the rewards.
      task = parallel.gather_host_shares(
          lambda a, b: self.reward_fn([t.prompt_id for t in flat[a:b]],
                                      [t.tokens for t in flat[a:b]]), len(flat))
      task = task.reshape(len(groups), self.k)
      # A response that did not end by itself has no final answer (k15.rewards.finish).
      task = finish_lib.final_score(
          task, np.array([[t.finish_reason for t in g] for g in groups]),
          stops=self.eos_id is not None)
      lengths = np.array([[t.length for t in g] for g in groups], np.float32)
      repeated = np.array([[t.finish_reason == sampling.FinishReason.REPEAT for t in g]
                           for g in groups])
      rewards = np.asarray(length_lib.combined_reward(
          task, lengths, repeated, iteration=it, length_weight=rl.length_weight,
          length_warmup_iterations=rl.length_warmup_iterations,
          repeat_penalty=rl.repeat_penalty, correct=task > 0.5), np.float32)
      self.success.update(np.array([g[0].prompt_id for g in groups]), task > 0.5)

      # Shapes bucketed so a run compiles a handful of train steps.
      G = _bucket(len(groups), rl.minibatch_groups)
      longest = max(len(t.prompt) + t.length for t in flat)
      T = _bucket(longest, rl.length_bucket)
      batch = build_batch(groups, rewards, num_groups=G, length=T, version=it,
                          loss_on_old_segments=rl.loss_on_old_segments,
                          mask_truncated=rl.mask_truncated,
                          drop_equal_reward_groups=rl.dynamic_sampling,
                          early_finishers=self.early_finishers)
      current = batch.pop("current")
      if "expert_ids" in batch:
        self._record_routing(batch)
        if rl.get("routing_metrics", True):
          metrics.update(self._routing_metrics(batch))
      if not rl.get("routing_replay"):  # the loss routes by itself: leave them on the host
        batch.pop("expert_ids", None)
      orders = [np.random.default_rng([self.config.seed, it, p]).permutation(G)
                for p in range(rl.num_passes)]
      t1 = time.perf_counter()
      if self.reference == "trainer":
        # The first minibatch trains on pi_i itself, so its forward pass is its reference
        # (ref_self, see make_loss_fn); the reference pass covers the other groups. With
        # several passes every group is trained again after updates and needs the pass.
        own = orders[0][:rl.minibatch_groups] if rl.num_passes == 1 else orders[0][:0]
        batch["ref_self"][own] = 1.0
        others = np.setdiff1d(np.arange(G), own)
        sampler_logp = batch["ref_logp"]
        batch["ref_logp"] = self._reference_logprobs(batch, others)
        if len(others):  # the sampler's gap is measured on the rows the pass covered
          measured = batch["ref_self"].reshape(-1, 1) == 0
          metrics.update(sampler_gap(sampler_logp, batch["ref_logp"], current * measured))
        metrics["perf/reference_s"] = time.perf_counter() - t1
      if rl.reset_optimizer:
        # Moments created now, after sampling; dropped after the last update (module docstring).
        fresh = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(self.params)
        self.opt_state = with_schedule_counts(fresh, self.schedule_counts)
      rows = rl.minibatch_groups * self.k
      step_fn = self._train_step(rows)
      step_metrics = []
      for order in orders:
        for s in range(0, G, rl.minibatch_groups):
          mb = self._place(batch, order[s:s + rl.minibatch_groups])
          self.params, self.opt_state, m = step_fn(self.params, self.opt_state, mb)
          step_metrics.append(m)
      if rl.reset_optimizer:
        self.schedule_counts = schedule_counts(self.opt_state)
        self.opt_state = None
      step_metrics = parallel.global_to_host(step_metrics)
      t_train = time.perf_counter() - t1
      trained_tokens = float(batch["mask"].sum()) * rl.num_passes
      for key in step_metrics[0]:
        metrics["train/" + key] = float(np.mean([m[key] for m in step_metrics]))
      metrics["train/skipped_steps"] = float(np.sum([m["skipped"] for m in step_metrics]))
      metrics.update({
          "rl/reward": float(rewards.mean()),
          "rl/accuracy": float((task > 0.5).mean()),
          "rl/task_reward": float(task.mean()),
          "perf/train_tokens_per_s": trained_tokens / max(t_train, 1e-9),
      })
      # MFU of the train step over the tokens it really processes (prompt + response rows);
      # left out where the devices' peak is unknown (CPU).
      if self.peak_flops:
        seq_tokens = sum(len(t.prompt) + t.length for t in flat) * rl.num_passes
        flops = seq_tokens * metrics_lib.model_flops_per_token(self.config.model, T,
                                                               training=True)
        metrics["perf/train_mfu"] = metrics_lib.mfu(flops / max(t_train, 1e-9), self.peak_flops)
      metrics.update(metrics_lib.response_length_stats(
          lengths.reshape(-1),
          np.array([t.finish_reason == sampling.FinishReason.LENGTH for t in flat]),
          repeated.reshape(-1)))
    metrics["perf/sample_tokens_per_s"] = sampled_tokens / max(t_sample, 1e-9)
    if self.peak_flops:
      metrics["perf/sample_mfu"] = metrics_lib.mfu(
          metrics["perf/sample_tokens_per_s"] * metrics_lib.model_flops_per_token(
              self.config.model, self.rl.max_new_tokens, training=False), self.peak_flops)
    metrics["perf/sample_s"] = t_sample
    metrics["rl/batch_hash"] = self._batch_hash(ids, groups, task if groups else None)
    self.iteration += 1
    return metrics

  def _batch_hash(self, ids, groups, task) -> float:
    """A 48-bit digest (exact as a float) of the iteration's prompt ids and task rewards.

    Every host must draw the same prompts and hold the same rewards (each builds the whole
    batch and places its own rows; the rewards are graded a share per host and gathered); with
    several processes the digests are compared here, so a host that diverged stops the run
    instead of training on a batch the others do not have.
    """
    h = hashlib.sha256(np.asarray(ids, np.int64).tobytes())
    if groups:
      h.update(np.asarray([t.prompt_id for g in groups for t in g], np.int64).tobytes())
      h.update(np.asarray(task, np.float32).tobytes())
    digest = int.from_bytes(h.digest()[:6], "little")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      every = np.asarray(multihost_utils.process_allgather(
          np.asarray([digest >> 24, digest & 0xFFFFFF], np.int32)))
      if not (every == every[0]).all():
        raise RuntimeError(f"RL iteration {self.iteration}: the hosts hold different prompts "
                           f"or rewards (digests {every.tolist()}); every host must draw the "
                           "same prompts and responses")
    return float(digest)

  def train(self, num_iterations: int | None = None, progress: bool | None = None,
            after_iteration: Callable[["RLTrainer"], dict[str, float] | None] | None = None,
            stop_when: Callable[[dict[str, float]], bool] | None = None):
    """Runs until rl.iterations (or num_iterations more); saves, and stops on preemption.

    after_iteration(trainer), if given, runs after each iteration (e.g. an evaluation of the
    current policy); the metrics it returns are written with the iteration's own.
    stop_when(metrics), if given, ends training (with a checkpoint) after the first iteration
    it returns True for (e.g. a budget of sampled tokens spent).
    """
    self.maybe_restore()
    end = self.rl.iterations if num_iterations is None else self.iteration + num_iterations
    history = []
    self.checkpointer.install_preemption_handler()
    bar = metrics_lib.progress(end - self.iteration, desc="rl", enabled=progress)
    try:
      while self.iteration < end:
        try:
          m = self.step()
        except sampling.SamplingInterrupted:
          # Nothing of this iteration was kept: the state is the last iteration's, saved as is.
          self.preempted = True
          self.save(force=True)
          logging.warning("preempted while sampling iteration %d: saved iteration %d and "
                          "stopping", self.iteration + 1, self.iteration)
          break
        if after_iteration is not None:
          m.update(after_iteration(self) or {})
        history.append(m)
        self.writer.write_scalars(self.iteration, m)
        bar.update(1)
        bar.set_postfix(reward=f"{m.get('rl/reward', float('nan')):.3f}",
                        len=f"{m.get('rl/response_length_mean', float('nan')):.0f}")
        if self._should_stop():
          self.preempted = True
          self.save(force=True)
          logging.warning("preempted: saved iteration %d and stopping", self.iteration)
          break
        stop = stop_when is not None and stop_when(m)
        self.save(force=self.iteration == end or stop)
        if stop:
          break
    finally:
      bar.close()
      self.checkpointer.close()
      self.writer.flush()
    return history
