"""Long2short: the long-CoT model's accuracy at a shorter chain of thought (paper §2.4, Fig. 7).

The paper's four methods (five variants, as in its Fig. 7) turn the long-CoT RL model ("long")
into one that answers in fewer tokens; each is evaluated on the held-out problems for accuracy
and mean response tokens:

  merge         weighted average of the long model and a short-CoT model, leaf by leaf on the
                devices, in the parameters' own sharding                       (`merge`)
  merge_rs      shortest rejection sampling (below) from the merged model
  shortest_rs   sample n responses per prompt, keep the shortest correct one, SFT on them
                                                               (`shortest_rejection_sampling`)
  dpo           positive = the shortest correct response; negatives = the wrong responses and the
                correct ones longer than 1.5x the positive; DPO against the frozen starting
                model                                     (`build_dpo_pairs`, `train_dpo`)
  rl            RL from the long model (or, with `rl.init`, another method's model) with the
                length penalty on from the first iteration and a smaller rollout budget
                                                                               (`long2short_rl`)

Mode `long2short` (`run`) expects a finished `pipeline` in the workdir and adds:

  DIR/long2short/short/      SFT of the short-CoT model (answer-only demonstrations)
  DIR/long2short/groups_{long,merge}.json   n sampled responses per prompt (ids, correct)
  DIR/long2short/{merge_rs,shortest_rs}/   their SFT checkpoints (with rs.rounds > 1, also
                             groups_shortest_rs.json, shortest_rs_round2/, ...: round r samples
                             from round r - 1's model)
  DIR/long2short/dpo/        DPO checkpoints and metrics
  DIR/long2short/rl/         long2short RL checkpoints and metrics
  DIR/long2short.json        per model: accuracy, mean tokens, token efficiency, vs long
  DIR/long2short.png         accuracy vs mean tokens, one point per model (Fig. 7)

Every stage reuses its output on a rerun; a rerun with a different `long2short` or `evaluate`
block is refused (delete DIR/long2short* to start over).

Decisions this file makes (the paper leaves them open):
- A response counts as correct when the grader accepts it *and* it ended with a stop token, the
  rule RL and evaluation use too (k15.rewards.finish): a response cut at the token budget would
  teach a model not to stop.
- The short model is SFT on the answer-only demonstrations (`meta['short_cot']`), starting by
  default from the pipeline's long-CoT SFT checkpoint (`short.init='sft'`): the long model is
  that checkpoint plus RL, so the merge averages two fine-tunes of one parent, as the paper's
  long and short models share their base. `short.init='long'` fine-tunes the long model.
- Merge weights must sum to 1 (within 1e-6); they are never silently renormalized, as a typo
  in a config would otherwise change the model quietly. Negative weights (extrapolation) are
  allowed.
- DPO's reference log-probs are computed once, before the first update, from the starting
  model: the same numbers a frozen copy would give, without a second model in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import config as k15_config
from k15 import evaluate as evaluate_lib
from k15 import metrics as metrics_lib
from k15 import parallel, pipeline, sampling, sft, update
from k15 import tokenizer as tokenizer_lib
from k15.data import prompts as prompts_lib
from k15.data import tasks
from k15.model import build, transformer
from k15.rewards import finish as finish_lib
from k15.sampling import text

Example = tuple[list[int], list[int]]  # (prompt ids, response ids incl. eos)
GradeFn = Callable[[Any, str], float]
METHODS = k15_config.LONG2SHORT_METHODS
LABELS = {"long": "long (RL)", "short": "short (SFT)", "merge": "merge",
          "merge_rs": "merge + shortest RS", "shortest_rs": "shortest RS", "dpo": "DPO",
          "rl": "long2short RL"}
PROMPT_SETS = {"rl_pool": "rl_pool.jsonl", "rl_prompts": "rl_prompts.jsonl", "sft": "sft.jsonl"}
RL_INITS = ("long", "merge", "merge_rs", "shortest_rs", "dpo")  # where long2short RL may start
DPO_LENGTH_RATIO = 1.5  # §2.4: correct responses longer than 1.5x the positive are negatives


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[k15 long2short {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. Model merging.
# ---------------------------------------------------------------------------------------------

def _path_name(path) -> str:
  # An nnx Variable flattens to its `.value`; the parameter's name is the path above it.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def merge(states: Sequence[Any], weights: Sequence[float]) -> Any:
  """The weighted average sum_i weights[i] * states[i], leaf by leaf; same pytree as states[0].

  states: nnx.State objects (`nnx.split(model)[1]`) or any parameter pytrees of one structure.
  weights: one per state, summing to 1 (within 1e-6; see the module docstring).

  Runs as one jitted program whose out_shardings are states[0]'s shardings: each device
  averages its own shards, so no host ever holds a whole model. A state laid out differently
  is first moved device-to-device to states[0]'s layout. Floating leaves are averaged in
  float32 (at least) and cast back to states[0]'s dtype, so a state merged with itself under
  weights (1.0,) or (0.5, 0.5) is returned bit for bit; non-floating leaves (counters, keys)
  are taken from states[0].
  """
  states, weights = list(states), [float(w) for w in weights]
  if not states:
    raise ValueError("merge: no states")
  if len(weights) != len(states):
    raise ValueError(f"merge: {len(states)} states but {len(weights)} weights {weights}")
  if not all(math.isfinite(w) for w in weights):
    raise ValueError(f"merge: weights {weights} must be finite")
  if abs(sum(weights) - 1.0) > 1e-6:
    raise ValueError(f"merge: weights {weights} sum to {sum(weights)}, not 1; give weights that "
                     "sum to 1 (they are not renormalized)")

  flat = [jax.tree_util.tree_flatten_with_path(s) for s in states]
  first_paths = [_path_name(p) for p, _ in flat[0][0]]
  first_leaves = [x for _, x in flat[0][0]]
  treedef = flat[0][1]
  for i, (leaves, tdef) in enumerate(flat[1:], start=1):
    paths = [_path_name(p) for p, _ in leaves]
    if tdef != treedef or paths != first_paths:
      missing = sorted(set(first_paths) - set(paths))
      extra = sorted(set(paths) - set(first_paths))
      raise ValueError(f"merge: state {i} has a different structure from state 0; parameters "
                       f"only in state 0: {missing[:5]}, only in state {i}: {extra[:5]}")
    for name, a, (_, b) in zip(first_paths, first_leaves, leaves):
      if _shape(a) != _shape(b):
        raise ValueError(f"merge: parameter {name!r} has shape {_shape(a)} in state 0 "
                         f"but {_shape(b)} in state {i}")

  # Host leaves (numpy) of states[0] go to the default device; the result lives there.
  first_leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in first_leaves]
  shardings = [x.sharding for x in first_leaves]
  columns = []  # per state, its leaves in states[0]'s layout
  for leaves, _ in flat:
    col = []
    for (_, x), s in zip(leaves, shardings):
      if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)):
        x = jax.device_put(x, s)  # device to device (never through a host) for jax arrays
      col.append(x)
    columns.append(col)
  average = _averager(len(columns), tuple(x.dtype for x in first_leaves), tuple(shardings))
  merged = average(columns, jnp.asarray(weights, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, merged)


@functools.lru_cache(maxsize=16)
def _averager(num_states: int, dtypes: tuple, shardings: tuple):
  """The jitted weighted average of `num_states` leaf lists (cached: one compile per layout)."""

  def average(columns, w):
    out = []
    for j, dtype in enumerate(dtypes):
      if not jnp.issubdtype(dtype, jnp.floating):
        out.append(columns[0][j])
        continue
      acc_dtype = jnp.promote_types(dtype, jnp.float32)
      acc = w[0] * columns[0][j].astype(acc_dtype)
      for i in range(1, num_states):
        acc = acc + w[i] * columns[i][j].astype(acc_dtype)
      out.append(acc.astype(dtype))
    return out

  return jax.jit(average, out_shardings=list(shardings))


def merge_checkpoints(model_template: transformer.Transformer, dirs: Sequence[str],
                      weights: Sequence[float], mesh: jax.sharding.Mesh, *,
                      steps: Sequence[int | None] | None = None) -> transformer.Transformer:
  """`merge` of the params of several k15 checkpoints (SFT or RL), as a model.

  dirs: checkpoint directories (those holding the step subdirectories, e.g.
  `DIR/sft/sft_checkpoints`, `DIR/rl/checkpoints`); steps: one per dir (default the latest).
  Each is restored into model_template's layout (`ckpt_lib.restore_params`) and the result has that
  layout too. All restored models are held on the devices at once (len(dirs) model copies).
  """
  dirs = list(dirs)
  steps = list(steps) if steps is not None else [None] * len(dirs)
  if not dirs or len(steps) != len(dirs):
    raise ValueError(f"merge_checkpoints: {len(dirs)} dirs and {len(steps)} steps")
  if len(weights) != len(dirs):
    raise ValueError(f"merge_checkpoints: {len(dirs)} dirs but {len(weights)} weights")
  with _mesh_context(mesh):
    graphdef = nnx.graphdef(model_template)
    states = [nnx.state(ckpt_lib.restore_params(model_template, d, step=s))
              for d, s in zip(dirs, steps)]
    return nnx.merge(graphdef, merge(states, weights))


def _mesh_context(mesh):
  return (contextlib.nullcontext() if parallel.active_mesh() is mesh
          else parallel.use_mesh(mesh))


# ---------------------------------------------------------------------------------------------
# 2. Sampling groups, shortest rejection sampling.
# ---------------------------------------------------------------------------------------------

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


def sample_groups(model: transformer.Transformer, problems: Sequence[Any], *,
                  tokenizer: tokenizer_lib.Tokenizer, grade_fn: GradeFn, n: int = 8,
                  temperature: float = 1.0, max_new_tokens: int, seed: int = 0,
                  batch_size: int = 32) -> list[Group]:
  """n responses per problem (`problem.prompt` is the question), graded; one Group per problem.

  A response is correct when it ended with a stop token and grade_fn(problem, text) > 0.5 (the
  rule of k15.rewards.finish, as in RL and evaluation). Sample j of
  problem i draws from row seed i * n + j, so the groups do not depend on batch_size.
  """
  groups = []
  for i, prompt, responses in text.sample_text(
      model, tokenizer, [p.prompt for p in problems], num_samples=n, batch_size=batch_size,
      max_new_tokens=max_new_tokens, seed=seed, temperature=temperature):
    groups.append(Group(
        prompt=[int(t) for t in prompt], responses=[[int(t) for t in r.ids] for r in responses],
        correct=[finish_lib.has_final_answer(r.finish_reason)
                 and float(grade_fn(problems[i], r.text)) > 0.5 for r in responses],
        problem_id=str(getattr(problems[i], "id", i))))
  return groups


def shortest_correct(group: Group) -> int | None:
  """Index of the shortest correct response (the first of equal lengths), or None."""
  best = None
  for j, (resp, ok) in enumerate(zip(group.responses, group.correct)):
    if ok and (best is None or len(resp) < len(group.responses[best])):
      best = j
  return best


def select_shortest(groups: Sequence[Group]) -> tuple[list[Example], dict[str, Any]]:
  """(prompt, shortest correct response) per group with one; and counts."""
  examples, chosen_len, all_len = [], [], []
  for g in groups:
    all_len += [len(r) for r in g.responses]
    j = shortest_correct(g)
    if j is not None:
      examples.append((list(g.prompt), list(g.responses[j])))
      chosen_len.append(len(g.responses[j]))
  stats = {"problems": len(groups), "kept": len(examples),
           "skipped_no_correct": len(groups) - len(examples),
           "mean_chosen_tokens": float(np.mean(chosen_len)) if chosen_len else None,
           "mean_sampled_tokens": float(np.mean(all_len)) if all_len else None}
  return examples, stats


def shortest_rejection_sampling(policy_model: transformer.Transformer, problems: Sequence[Any],
                                *, tokenizer: tokenizer_lib.Tokenizer, grade_fn: GradeFn,
                                n: int = 8, temperature: float = 1.0, max_new_tokens: int,
                                seed: int = 0, batch_size: int = 32, return_stats: bool = False):
  """§2.4: n samples per problem, the shortest correct one kept; SFT examples for `sft.train_sft`.

  Problems with no correct response are skipped and counted. Returns the list of
  (prompt ids, response ids incl. eos), or (list, stats) with `return_stats`: stats has
  problems, kept, skipped_no_correct, mean_chosen_tokens, mean_sampled_tokens.
  """
  groups = sample_groups(policy_model, problems, tokenizer=tokenizer, grade_fn=grade_fn, n=n,
                         temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                         batch_size=batch_size)
  examples, stats = select_shortest(groups)
  logging.info("shortest rejection sampling: %s", stats)
  return (examples, stats) if return_stats else examples


# ---------------------------------------------------------------------------------------------
# 3. DPO.
# ---------------------------------------------------------------------------------------------

def build_dpo_pairs(groups: Sequence[Group]) -> list[tuple[Example, Example]]:
  """(chosen, rejected) examples per §2.4.

  chosen: the group's shortest correct response (the first of equal lengths). rejected: each
  wrong response, and each correct response longer than 1.5x the chosen one; other correct
  responses give no pair. A group with no correct response gives no pairs.
  """
  pairs = []
  for g in groups:
    c = shortest_correct(g)
    if c is None:
      continue
    chosen = (list(g.prompt), list(g.responses[c]))
    limit = DPO_LENGTH_RATIO * len(g.responses[c])
    for j, (resp, ok) in enumerate(zip(g.responses, g.correct)):
      if j != c and (not ok or len(resp) > limit):
        pairs.append((chosen, (list(g.prompt), list(resp))))
  return pairs


@jax.jit
def dpo_loss(policy_chosen_logp: jax.Array, policy_rejected_logp: jax.Array,
             ref_chosen_logp: jax.Array, ref_rejected_logp: jax.Array,
             beta: float | jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean of -log sigmoid(beta * ((pc - rc) - (pr - rr))) over pairs; inputs are [B] sequence
  log-probs (sums over response tokens) of the policy and the reference."""
  chosen = beta * (policy_chosen_logp - ref_chosen_logp)                         # [B]
  rejected = beta * (policy_rejected_logp - ref_rejected_logp)                   # [B]
  margin = chosen - rejected
  loss = -jax.nn.log_sigmoid(margin).mean()
  sg = jax.lax.stop_gradient
  return loss, {"dpo/accuracy": sg((margin > 0).astype(jnp.float32).mean()),
                "dpo/margin": sg(margin.mean()), "dpo/chosen_reward": sg(chosen.mean()),
                "dpo/rejected_reward": sg(rejected.mean()),
                "dpo/chosen_logp": sg(policy_chosen_logp.mean()),
                "dpo/rejected_logp": sg(policy_rejected_logp.mean())}


def _sequence_logprobs(model: transformer.Transformer, batch: dict[str, jax.Array]) -> jax.Array:
  """[B, 2] sums of log p(token) over the masked (response) tokens of the [B, 2, T] rows."""
  B, two, T = batch["tokens"].shape
  logp = update.token_logprobs(model, batch["tokens"].reshape(B * two, T), None,
                               batch["segment_ids"].reshape(B * two, T))        # [2B, T]
  mask = batch["mask"].reshape(B * two, T) > 0
  return jnp.where(mask, logp, 0.0).sum(axis=-1).reshape(B, two)


@functools.partial(jax.jit, static_argnums=0)
def _sequence_logprobs_jit(graphdef, params, batch):
  return _sequence_logprobs(nnx.merge(graphdef, params), batch)


def dpo_batch_loss(model: transformer.Transformer, batch: dict[str, jax.Array],
                   beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO loss of a [B, 2, T] batch (`make_dpo_arrays` + `ref_logp` [B, 2]).

  Index 0 of the second axis is the chosen response, 1 the rejected one.
  """
  logp = _sequence_logprobs(model, batch)                                         # [B, 2]
  ref = batch["ref_logp"]
  return dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], beta)


def _fits(pair: tuple[Example, Example], seq_len: int) -> bool:
  return all(len(prompt) + len(response) <= seq_len for prompt, response in pair)


def make_dpo_arrays(pairs: Sequence[tuple[Example, Example]], seq_len: int,
                    pad_id: int = tokenizer_lib.PAD_ID) -> tuple[dict[str, np.ndarray], int]:
  """Pairs as [P, 2, seq_len] arrays (tokens, segment_ids, mask); returns (arrays, dropped).

  Each row is prompt + response, left-aligned; mask marks the response tokens (the log-probs
  summed into the sequence log-prob). A pair with a side over seq_len is dropped and counted.
  """
  kept = [p for p in pairs if _fits(p, seq_len)]
  P = len(kept)
  tokens = np.full((P, 2, seq_len), pad_id, np.int32)
  segment_ids = np.zeros((P, 2, seq_len), np.int32)
  mask = np.zeros((P, 2, seq_len), np.float32)
  for i, pair in enumerate(kept):
    for j, (prompt, response) in enumerate(pair):
      if not prompt or not response:
        raise ValueError(f"DPO pair {i}: {'chosen' if j == 0 else 'rejected'} has an empty "
                         f"{'prompt' if not prompt else 'response'}")
      n = len(prompt) + len(response)
      tokens[i, j, :n] = list(prompt) + list(response)
      segment_ids[i, j, :n] = 1
      mask[i, j, len(prompt):n] = 1.0
  return {"tokens": tokens, "segment_ids": segment_ids, "mask": mask}, len(pairs) - P


def _batch_shardings(B: int, T: int, mesh) -> dict[str, jax.sharding.NamedSharding]:
  return {"tokens": parallel.sharding(("batch", None, "length"), (B, 2, T), mesh),
          "segment_ids": parallel.sharding(("batch", None, "length"), (B, 2, T), mesh),
          "mask": parallel.sharding(("batch", None, "length"), (B, 2, T), mesh),
          "ref_logp": parallel.sharding(("batch", None), (B, 2), mesh)}


def _put(arrays: dict[str, np.ndarray], shardings) -> dict[str, jax.Array]:
  # Every host holds the same full arrays; each places the shards of its own devices.
  return {k: parallel.host_to_global(v, shardings[k]) for k, v in arrays.items()}


def reference_logprobs(model: transformer.Transformer,
                       pairs: Sequence[tuple[Example, Example]], *, seq_len: int,
                       batch_size: int, mesh, pad_id: int = tokenizer_lib.PAD_ID) -> np.ndarray:
  """[P, 2] sequence log-probs (chosen, rejected) of the pairs under `model`.

  With the starting model, these are the frozen DPO reference's. Every pair must fit seq_len.
  Arrays are built one batch at a time, so host memory does not grow with the pair count.
  """
  P = len(pairs)
  shardings = _batch_shardings(batch_size, seq_len, mesh)
  graphdef, params = nnx.split(model)
  out = np.zeros((P, 2), np.float32)
  for start in range(0, P, batch_size):
    # The last batch is filled with copies of pair 0 (dropped): one compiled shape.
    idx = np.arange(start, start + batch_size)
    arrays, dropped = make_dpo_arrays([pairs[i] if i < P else pairs[0] for i in idx], seq_len,
                                      pad_id)
    if dropped:
      raise ValueError(f"reference_logprobs: a pair in {start}..{start + batch_size - 1} is "
                       f"longer than seq_len={seq_len}")
    got = parallel.global_to_host(
        _sequence_logprobs_jit(graphdef, params, _put(arrays, shardings)))
    n = min(batch_size, P - start)
    out[start:start + n] = got[:n]
  return out


def _batch_indices(step: int, batch_size: int, num: int, seed: int) -> np.ndarray:
  """The pairs of optimizer step `step`: a stream of per-epoch permutations, cut in batches.

  A pure function of (step, seed), so a resumed run sees the same batches.
  """
  pos = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs = pos // num
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(num)
    sel = epochs == e
    out[sel] = perm[pos[sel] % num]
  return out


def train_dpo(model: transformer.Transformer, pairs: Sequence[tuple[Example, Example]],
              config: Any, mesh: jax.sharding.Mesh, *, pad_id: int = tokenizer_lib.PAD_ID,
              workdir: str | None = None, progress: bool = True,
              ) -> tuple[transformer.Transformer, list[float]]:
  """DPO from `model` on (chosen, rejected) example pairs; returns (model, loss per step).

  config: the `long2short.dpo` block: beta, steps, batch_size (pairs per step), seq_len,
  learning_rate, warmup_steps, grad_clip, seed, checkpoint_every. The reference is the input
  model (its sequence log-probs are computed before the first update); the input model is
  left as it was. With a `workdir`, params, optimizer state and the loss history are saved to
  `<workdir>/checkpoints` every checkpoint_every steps and at the end, and a rerun continues
  from there (the batches are a function of the step and seed, so a resumed run is the same).
  """
  c = config
  if c.steps < 1 or c.batch_size < 1:
    raise ValueError(f"dpo.steps={c.steps} and dpo.batch_size={c.batch_size} must be >= 1")
  kept = [p for p in pairs if _fits(p, c.seq_len)]
  num, dropped = len(kept), len(pairs) - len(kept)
  if dropped:
    logging.warning("DPO: dropped %d of %d pairs longer than dpo.seq_len=%d", dropped,
                    len(pairs), c.seq_len)
  if num == 0:
    raise ValueError(f"DPO has no pairs to train on ({len(pairs)} given, {dropped} over "
                     f"dpo.seq_len={c.seq_len})")
  B, T = c.batch_size, c.seq_len

  with _mesh_context(mesh):
    checkpointer = None
    if workdir:
      checkpointer = ckpt_lib.Checkpointer(workdir, save_every=c.checkpoint_every, keep=2)
      if checkpointer.latest_step() == c.steps:  # finished: the saved model, nothing to compile
        _, meta = checkpointer.restore(c.steps)
        checkpointer.close()
        logging.info("DPO: reusing the finished run in %s", checkpointer.directory)
        return (ckpt_lib.restore_params(model, str(checkpointer.directory), step=c.steps),
                [float(x) for x in meta["history"]])

    # --- reference: the starting model's sequence log-probs, once --------------------------
    ref_logp = reference_logprobs(model, kept, seq_len=T, batch_size=B, mesh=mesh,
                                  pad_id=pad_id)                                  # [P, 2]

    # --- model, optimizer, update step ----------------------------------------------------
    graphdef, params = nnx.split(model)
    param_shardings = parallel.state_shardings(params, mesh)
    # A copy: the step donates its inputs, and the caller's model stays usable.
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)(params)
    optimizer = update.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, decay="constant",
        grad_clip=c.grad_clip)))
    opt_state, opt_shardings = update.init_optimizer_state(optimizer, params, param_shardings,
                                                           mesh)
    shardings = _batch_shardings(B, T, mesh)
    beta = float(c.beta)
    step_fn = update.make_train_step(
        graphdef, lambda m, b: dpo_batch_loss(m, b, beta), optimizer,
        param_shardings=param_shardings, opt_shardings=opt_shardings, batch_shardings=shardings)

    # --- resume -----------------------------------------------------------------------------
    step, history = 0, []
    if checkpointer is not None:
      latest = checkpointer.latest_step()
      if latest is not None:
        restored, meta = checkpointer.restore(latest, abstract_arrays=ckpt_lib.abstract(
            {"params": params, "opt_state": opt_state},
            {"params": param_shardings, "opt_state": opt_shardings}))
        params, opt_state = restored["params"], restored["opt_state"]
        step, history = int(meta["step"]), [float(x) for x in meta["history"]]
        logging.info("DPO: resumed from step %d of %d", step, c.steps)

    # --- loop -------------------------------------------------------------------------------
    bar = metrics_lib.progress(c.steps, desc="dpo", enabled=None if progress else False)
    bar.update(step)
    writer = metrics_lib.MetricWriter(workdir) if workdir else None
    pending = None  # the previous step's metrics, fetched after the next step is dispatched

    record = lambda m: metrics_lib.record_step(m, history, bar, writer, "dpo",
                                               {"acc": "dpo/accuracy"})

    while step < c.steps:
      idx = _batch_indices(step, B, num, c.seed)
      arrays, _ = make_dpo_arrays([kept[i] for i in idx], T, pad_id)
      arrays["ref_logp"] = ref_logp[idx]
      batch = _put(arrays, shardings)
      params, opt_state, metrics = step_fn(params, opt_state, batch)
      step += 1
      if pending is not None:
        record(pending)
      pending = (step, metrics)
      if checkpointer is not None and (step % c.checkpoint_every == 0 or step == c.steps):
        record(pending)  # the history in the checkpoint is complete
        pending = None
        checkpointer.save(step, arrays={"params": params, "opt_state": opt_state},
                          meta={"step": step, "history": history}, force=step == c.steps)
    if pending is not None:
      record(pending)
    bar.close()
    if writer is not None:
      writer.close()
    if checkpointer is not None:
      checkpointer.close()
    if history:
      logging.info("DPO: %d pairs, %d steps, loss %.4f -> %.4f", num, step, history[0],
                   history[-1])
  return nnx.merge(graphdef, params), history


# ---------------------------------------------------------------------------------------------
# 4. Long2short RL.
# ---------------------------------------------------------------------------------------------

def long2short_config(config: Any) -> ml_collections.ConfigDict:
  """A copy of `config` whose `rl` block is long2short RL's (the input is left unchanged)."""
  l2s = config.long2short.rl
  if not l2s.length_weight > 0:
    raise ValueError(f"long2short.rl.length_weight={l2s.length_weight}: long2short RL needs "
                     "the length penalty (a weight > 0)")
  if l2s.iterations < 1 or l2s.max_new_tokens < 1:
    raise ValueError(f"long2short.rl.iterations={l2s.iterations} and max_new_tokens="
                     f"{l2s.max_new_tokens} must be >= 1")
  if l2s.max_new_tokens >= config.rl.max_new_tokens:
    logging.warning("long2short.rl.max_new_tokens=%d is not below rl.max_new_tokens=%d: the "
                    "rollout budget is not reduced", l2s.max_new_tokens, config.rl.max_new_tokens)
  cfg = config.copy_and_resolve_references()
  cfg.rl.iterations = int(l2s.iterations)
  cfg.rl.max_new_tokens = int(l2s.max_new_tokens)
  cfg.rl.length_weight = float(l2s.length_weight)
  cfg.rl.length_warmup_iterations = 0
  if cfg.rl.segment_budget > cfg.rl.max_new_tokens:
    cfg.rl.segment_budget = cfg.rl.max_new_tokens
  return cfg


def long2short_rl(config: Any, model: transformer.Transformer,
                  records: Sequence[prompts_lib.PromptRecord], tok: tokenizer_lib.Tokenizer,
                  mesh: jax.sharding.Mesh, workdir: str) -> transformer.Transformer:
  """§2.4 long2short RL: `pipeline.rl_stage` from `model` under `long2short_config(config)`.

  Resumes from `<workdir>/checkpoints` like any RL run.
  """
  return pipeline.rl_stage(long2short_config(config), model, list(records), tok, mesh, workdir)


# ---------------------------------------------------------------------------------------------
# 5. Mode `long2short`.
# ---------------------------------------------------------------------------------------------

def _finetune_config(config_sft: Any, steps: int,
                     learning_rate: float) -> ml_collections.ConfigDict:
  """config.sft for a short fine-tune: `steps` steps, warm-up 10%, cosine to lr / 10."""
  c = config_sft.copy_and_resolve_references()
  c.steps = int(steps)
  c.optimizer.learning_rate = float(learning_rate)
  c.optimizer.end_learning_rate = float(learning_rate) / 10
  c.optimizer.warmup_steps = max(1, int(steps) // 10)
  c.optimizer.decay_steps = 0  # train_sft fills in the steps after the warm-up
  return c


def token_efficiency(accuracy: float, mean_tokens: float) -> float:
  """Accuracy (0..1) per 1k response tokens."""
  return float(accuracy) / max(float(mean_tokens), 1e-9) * 1000.0


def _atomic_json(obj: Any, path: str) -> None:
  tmp = f"{path}.tmp{jax.process_index()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)


def _require_pipeline(workdir: str) -> dict[str, str]:
  """The pipeline outputs mode `long2short` reads; an error lists any that are missing."""
  paths = {"tokenizer": os.path.join(workdir, tokenizer_lib.MODEL_FILENAME),
           "sft_checkpoints": os.path.join(workdir, "sft", sft.CHECKPOINT_SUBDIR),
           "rl_checkpoints": os.path.join(workdir, "rl", "checkpoints"),
           "eval": os.path.join(workdir, "data", "eval.jsonl")}
  paths.update({name: os.path.join(workdir, "data", f) for name, f in PROMPT_SETS.items()})
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f"mode 'long2short' needs a finished pipeline in {workdir} (run "
                            f"--config.mode=pipeline first); missing: {missing}")
  return paths


def _label(name: str, r: dict[str, Any]) -> str:
  init = r.get("init", "long")
  return LABELS.get(name, name) + ("" if init == "long" else f" (from {LABELS.get(init, init)})")


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """One row per model: accuracy, mean tokens, both against `long`, token efficiency."""
  long = results.get("long")
  header = ["model", "accuracy %", "mean tokens", "tokens vs long", "acc - long (pts)",
            "acc per 1k tokens"]
  rows = []
  for name, r in results.items():
    if "accuracy" not in r:
      rows.append([_label(name, r), "-", "-", "-", "-", r.get("skipped", "-")])
      continue
    vs_tok = vs_acc = "-"
    if long and name != "long":
      vs_tok = f"{100 * (r['mean_tokens'] / long['mean_tokens'] - 1):+.1f}%"
      vs_acc = f"{100 * (r['accuracy'] - long['accuracy']):+.1f}"
    rows.append([_label(name, r), f"{100 * r['accuracy']:.1f}",
                 f"{r['mean_tokens']:.1f}", vs_tok, vs_acc, f"{r['token_efficiency']:.2f}"])
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  fmt = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                              for i, (cell, w) in enumerate(zip(row, widths)))
  return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
  """Accuracy against mean response tokens, one labelled point per model (Fig. 7's layout)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name, r in results.items():
    if "accuracy" not in r:
      continue
    x, y = r["mean_tokens"], 100 * r["accuracy"]
    ax.scatter([x], [y], s=70 if name == "long" else 40, marker="*" if name == "long" else "o",
               zorder=3)
    ax.annotate(_label(name, r), (x, y), textcoords="offset points", xytext=(5, 4),
                fontsize=8)
  ax.set_xlabel("mean response tokens (held-out)")
  ax.set_ylabel("accuracy % (pass@1)")
  ax.set_title("long2short: accuracy vs response length")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Mode `long2short`: the four methods of §2.4 from a finished pipeline in `workdir`."""
  if not workdir:
    raise ValueError("mode 'long2short' needs --workdir (a finished pipeline's)")
  c = config.long2short
  unknown = sorted(set(c.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"long2short.methods has unknown {unknown}; known: {list(METHODS)}")
  if c.prompt_set not in PROMPT_SETS:
    raise ValueError(f"long2short.prompt_set={c.prompt_set!r}; expected one of "
                     f"{sorted(PROMPT_SETS)}")
  if c.short.init not in ("sft", "long"):
    raise ValueError(f"long2short.short.init={c.short.init!r}; expected 'sft' or 'long'")
  if not (isinstance(c.rs.rounds, int) and c.rs.rounds >= 1):
    raise ValueError(f"long2short.rs.rounds={c.rs.rounds!r}; expected an int >= 1")
  if c.rl.init not in RL_INITS:
    raise ValueError(f"long2short.rl.init={c.rl.init!r}; expected one of {list(RL_INITS)}")
  paths = _require_pipeline(workdir)
  out_dir = os.path.join(workdir, "long2short")
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(workdir, "long2short.json")

  # What the stored results were made with; a rerun must match (the methods may change).
  fingerprint = json.loads(json.dumps({
      "long2short": {k: v for k, v in c.to_dict().items() if k != "methods"},
      "evaluate": config.evaluate.to_dict(), "seed": config.seed}, default=str))
  results: dict[str, Any] = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      stored = json.load(f)
    if stored.get("config") != fingerprint:
      raise ValueError(f"{json_path} was made with another long2short/evaluate config; delete "
                       f"it and {out_dir} to start over, or use the same config")
    results = stored.get("results", {})

  tok = tokenizer_lib.Tokenizer.load(paths["tokenizer"])
  eval_records = prompts_lib.load_jsonl(paths["eval"])[0]
  prompt_records = prompts_lib.load_jsonl(paths[c.prompt_set])[0]
  if c.num_prompts:
    prompt_records = prompt_records[:c.num_prompts]
  ev = config.evaluate
  rs_budget = c.rs.max_new_tokens or config.rl.max_new_tokens

  def save():
    _atomic_json({"config": fingerprint, "results": results}, json_path)

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    template = build.build_model(config, mesh)
    cache: dict[str, Any] = {}

    def model_of(name):  # built on first use: a finished run needs none of them
      if name not in cache:
        cache[name] = build(name)
      return cache[name]

    def groups_of(source, model=None):
      """n responses per prompt from model `source` (or `model`, filed under `source`)."""
      path = os.path.join(out_dir, f"groups_{source}.json")
      if os.path.exists(path):
        with open(path) as f:
          return [Group.from_json(g) for g in json.load(f)]
      _log(f"sampling {c.rs.samples} responses for each of {len(prompt_records)} prompts "
           f"from the {source} model")
      groups = sample_groups(model_of(source) if model is None else model, prompt_records,
                             tokenizer=tok, grade_fn=tasks.grade, n=c.rs.samples,
                             temperature=c.rs.temperature, max_new_tokens=rs_budget,
                             seed=config.seed, batch_size=ev.batch_size)
      _atomic_json([g.to_json() for g in groups], path)  # every host: its own copy
      return groups

    def rs_sft(source, name):
      # Round 1 fine-tunes `source` on its own shortest correct samples; round r > 1 samples
      # from round r - 1's model and fine-tunes that (stats: the last round's). A later round
      # with no correct sample ends the rounds with the model before it.
      m, stats, tag = model_of(source), {}, source
      for r in range(1, c.rs.rounds + 1):
        groups = groups_of(tag, m)  # samples of the model this round starts from
        tag = name if r == 1 else f"{name}_round{r}"
        examples, stats = select_shortest(groups)
        _log(f"{tag}: {stats}")
        if not examples and r == 1:
          return None, dict(stats, skipped="no correct samples")
        if not examples:  # keep the previous round's model
          return m, dict(stats, rounds=r - 1, stopped=f"round {r}: no correct samples")
        cfg = _finetune_config(config.sft, c.rs.sft_steps, c.rs.learning_rate)
        m, _ = sft.train_sft(m, examples, cfg, mesh=mesh, workdir=os.path.join(out_dir, tag),
                             pad_id=tok.pad_id)
      return m, dict(stats, rounds=c.rs.rounds)

    def build(name):
      if name == "long":
        return ckpt_lib.restore_params(template, paths["rl_checkpoints"])
      if name == "sft":
        return ckpt_lib.restore_params(template, paths["sft_checkpoints"])
      if name == "short":
        examples = [tok.render_example(r.prompt, r.meta["short_cot"])
                    for r in prompts_lib.load_jsonl(paths["sft"])[0]]
        _log(f"short model: SFT from the {c.short.init} model on {len(examples)} short-CoT "
             "examples")
        cfg = _finetune_config(config.sft, c.short.steps, c.short.learning_rate)
        m, _ = sft.train_sft(model_of(c.short.init), examples, cfg, mesh=mesh,
                             workdir=os.path.join(out_dir, "short"), pad_id=tok.pad_id)
        cache.pop("sft", None)
        return m
      if name == "merge":
        long, short = model_of("long"), model_of("short")
        _log(f"merging long and short with weights {tuple(c.merge_weights)}")
        return nnx.merge(nnx.graphdef(long),
                         merge([nnx.state(long), nnx.state(short)], c.merge_weights))
      if name == "merge_rs":
        return rs_sft("merge", "merge_rs")
      if name == "shortest_rs":
        return rs_sft("long", "shortest_rs")
      if name == "dpo":
        pairs = build_dpo_pairs(groups_of("long"))
        _log(f"DPO on {len(pairs)} pairs")
        if not pairs:
          return None, {"pairs": 0, "skipped": "no DPO pairs"}
        m, _ = train_dpo(model_of("long"), pairs, c.dpo, mesh, pad_id=tok.pad_id,
                         workdir=os.path.join(out_dir, "dpo"))
        return m, {"pairs": len(pairs)}
      if name == "rl":
        records = prompts_lib.load_jsonl(paths["rl_prompts"])[0]
        _log(f"long2short RL from the {c.rl.init} model: {c.rl.iterations} iterations, "
             f"budget {c.rl.max_new_tokens} tokens, length_weight {c.rl.length_weight}")
        start = model_of(c.rl.init)
        if isinstance(start, tuple):  # a method's (model, stats)
          start = start[0]
        if start is None:
          return None, {"skipped": f"its init, {c.rl.init}, trained nothing"}
        return (long2short_rl(config, start, records, tok, mesh, os.path.join(out_dir, "rl")),
                {"init": c.rl.init})
      raise ValueError(f"unknown model {name!r}")

    names = ["long"]
    if {"merge", "merge_rs"} & set(c.methods):
      names += ["short"]
    names += [m for m in METHODS if m in c.methods]
    for name in names:
      if name in results:
        continue
      built = model_of(name)
      extra: dict[str, Any] = {}
      if isinstance(built, tuple):
        built, extra = built
        cache[name] = built
      if built is None:  # nothing to train on; `extra` says why
        results[name] = extra
        save()
        continue
      _log(f"evaluating {name} on {len(eval_records)} held-out problems")
      r = evaluate_lib.evaluate(
          built, eval_records, tokenizer=tok, grade_fn=tasks.grade, num_samples=ev.num_samples,
          temperature=ev.temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens,
          seed=config.seed, batch_size=ev.batch_size)
      r.pop("per_problem", None)
      r["token_efficiency"] = token_efficiency(r["accuracy"], r["mean_tokens"])
      r.update(extra)
      results[name] = r
      save()
      if name not in ("long", "short", "merge", c.rl.init):  # no later method starts from it
        cache.pop(name, None)

  long = results["long"]
  for name, r in results.items():
    if name != "long" and "accuracy" in r:
      r["tokens_vs_long"] = r["mean_tokens"] / long["mean_tokens"]
      r["accuracy_vs_long"] = r["accuracy"] - long["accuracy"]
      # The bar: >= 30% fewer tokens for <= 3 points of accuracy.
      r["meets_target"] = bool(r["tokens_vs_long"] <= 0.7 and r["accuracy_vs_long"] >= -0.03)
  save()
  if jax.process_index() == 0:
    print(format_table(results))
    met = [_label(n, r) for n, r in results.items() if r.get("meets_target")]
    print(f"methods with >= 30% fewer tokens at <= 3 points below long: {met or 'none'}")
    plot(results, os.path.join(workdir, "long2short.png"))
  return results
