"""DPO for long2short (§2.4): pairs from the long model's samples, the loss, and its training.

Pairs, as the paper builds them: the shortest correct response is the positive; the negatives
are the *longer* responses: the wrong ones longer than the positive, and the correct ones over
1.5x its length. A wrong response shorter than the positive is no negative: preferring the
positive over it would push toward length, the opposite of what long2short wants.

The reference log-probs are computed once, before the first update, from the starting model:
the same numbers a frozen copy would give, without a second model in memory.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import parallel, train_loop, update
from k15 import tokenizer as tokenizer_lib
from k15.long2short import merge as merge_lib
from k15.long2short import rejection
from k15.model import transformer

Example = rejection.Example
Pair = tuple[Example, Example]  # (chosen, rejected)
DPO_LENGTH_RATIO = 1.5  # §2.4: correct responses longer than 1.5x the positive are negatives


def build_dpo_pairs(groups: Sequence[rejection.Group]) -> list[Pair]:
  """(chosen, rejected) examples per §2.4 (module docstring).

  chosen: the group's shortest correct response (the first of equal lengths). rejected: each
  wrong response longer than it, and each correct response longer than 1.5x it. A group with
  no correct response gives no pairs.
  """
  pairs = []
  for g in groups:
    c = rejection.shortest_correct(g)
    if c is None:
      continue
    chosen = (list(g.prompt), list(g.responses[c]))
    n = len(g.responses[c])
    for j, (resp, ok) in enumerate(zip(g.responses, g.correct)):
      if j != c and len(resp) > (DPO_LENGTH_RATIO * n if ok else n):
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


def _fits(pair: Pair, seq_len: int) -> bool:
  return all(len(prompt) + len(response) <= seq_len for prompt, response in pair)


def make_dpo_arrays(pairs: Sequence[Pair], seq_len: int,
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
                       pairs: Sequence[Pair], *, seq_len: int,
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


def train_dpo(model: transformer.Transformer, pairs: Sequence[Pair],
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

  with merge_lib.mesh_context(mesh):
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
    optimizer = update.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, decay="constant",
        grad_clip=c.grad_clip)))
    shardings = _batch_shardings(B, T, mesh)
    beta = float(c.beta)
    state = train_loop.prepare(model, optimizer, lambda m, b: dpo_batch_loss(m, b, beta), mesh,
                               batch_shardings=shardings)
    step, history, _ = train_loop.resume(state, checkpointer, "DPO", c.steps)

    # --- loop -------------------------------------------------------------------------------
    def next_batch(step):
      idx = _batch_indices(step, B, num, c.seed)
      arrays, _ = make_dpo_arrays([kept[i] for i in idx], T, pad_id)
      arrays["ref_logp"] = ref_logp[idx]
      return _put(arrays, shardings)

    try:
      step = train_loop.run(
          state, next_batch, step=step, num_steps=c.steps, history=history, desc="dpo",
          shown={"acc": "dpo/accuracy"}, workdir=workdir, checkpointer=checkpointer,
          checkpoint_every=c.checkpoint_every, progress=progress)
    finally:
      if checkpointer is not None:
        checkpointer.close()
    if history:
      logging.info("DPO: %d pairs, %d steps, loss %.4f -> %.4f", num, step, history[0],
                   history[-1])
  return state.model(), history

