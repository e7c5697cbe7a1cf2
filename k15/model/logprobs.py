"""Token log-probs and entropies without a [rows, T, vocab] logits array.

The trainer needs log p(token) of every sampled token and, as a diagnostic, the policy's
entropy. Computed from whole-row logits, a 33k-token row at a 152k vocabulary holds 20 GB of
float32 logits per copy, and the backward pass keeps several copies (k15.plan counts five).
Here the head is applied in tiles of `model.logits_chunk` tokens under `lax.scan`: each tile's
logits live only while its log-sum-exp, picked log-prob and entropy are taken, and
`jax.checkpoint` recomputes them tile by tile in the backward pass, so the peak is one tile's
logits and their cotangent, whatever the length.

With `logits_chunk` 0, or at least the row length, one tile covers the row and the function
runs the whole-row computation it replaces, op for op, so results are unchanged bit for bit.

Einsum letters: B rows, T tokens, C tokens of a tile, n the tile index, D embed, V vocab.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from k15 import parallel


def token_logprobs_and_entropy(model, tokens: jax.Array, positions: jax.Array | None = None,
                               segment_ids: jax.Array | None = None,
                               chunk: int | None = None,
                               return_routing: bool = False,
                               expert_ids: tuple[jax.Array, ...] | None = None
                               ) -> tuple[jax.Array, ...]:
  """(log p(tokens[:, t] | tokens[:, <t]), entropy of p(. | tokens[:, <t])): [B, T] float32 each.

  Both are 0 at t = 0 (no prediction precedes the first token). `chunk` defaults to the model's
  `logits_chunk`. The entropy is returned with its gradient; callers that log it as a
  diagnostic stop it. `return_routing=True` appends the model's routing dict (router logits and
  expert ids per MoE layer, see Transformer) from the same forward pass; `expert_ids` (one
  [B, T, k] array per MoE layer) routes by recorded experts (routing replay, see Transformer).
  """
  chunk = model.cfg.logits_chunk if chunk is None else chunk
  T = tokens.shape[1]
  kw = dict(positions=positions, segment_ids=segment_ids)
  if return_routing:
    kw["return_routing"] = True
  if expert_ids is not None:
    kw["expert_ids"] = expert_ids
  routed = ()
  if not chunk or chunk >= T - 1:
    logits = model(tokens, **kw)                                             # [B, T, V] f32
    if return_routing:
      logits, *routed = logits
    logp_all = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)                  # [B, T-1]
  else:
    x = model(tokens, hidden=True, **kw)                                     # [B, T, D]
    if return_routing:
      x, *routed = x
    cfg = model.cfg
    head = model.embed[...].T if cfg.tie_embeddings else model.lm_head[...]      # [D, V]
    picked, ent = chunked_logprobs(x[:, :-1], head, tokens[:, 1:], chunk)
  pad = lambda a: jnp.pad(a, ((0, 0), (1, 0)))
  return (pad(picked), pad(ent), *routed)


def chunked_logprobs(x: jax.Array, head: jax.Array, targets: jax.Array,
                     chunk: int) -> tuple[jax.Array, jax.Array]:
  """(log softmax(x @ head)[target], entropy) per token, [B, T] float32, in tiles of `chunk`.

  x: [B, T, D] final-norm outputs; head: [D, V]; targets: int [B, T], the token each position
  predicts. Logits and everything after them in float32, as in the model.
  """
  B, T, D = x.shape
  n = -(-T // chunk)
  pad = n * chunk - T  # Padded positions compute a throwaway log-prob of token 0.
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  xs = jnp.swapaxes(x.reshape(B, n, chunk, D), 0, 1)                       # [n, B, C, D]
  ts = jnp.swapaxes(targets.reshape(B, n, chunk), 0, 1)                    # [n, B, C]

  @jax.checkpoint
  def tile(head, xc, tc):
    logits = jnp.einsum("BCD,DV->BCV", xc.astype(jnp.float32), head.astype(jnp.float32))
    logits = parallel.constrain(logits, ("batch", "length", "act_vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)                                # [B, C]
    # A select and a sum rather than a gather: with the vocab split over devices each one
    # picks from its own slice, and one all-reduce adds them.
    hit = lax.broadcasted_iota(jnp.int32, logits.shape, 2) == tc[..., None]
    picked = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1) - lse
    p = jnp.exp(logits - lse[..., None])
    ent = lse - jnp.sum(p * logits, axis=-1)                               # H = lse - E_p[logit]
    return picked, ent

  _, (picked, ent) = lax.scan(lambda c, xt: (c, tile(head, *xt)), None, (xs, ts))
  unblock = lambda a: jnp.swapaxes(a, 0, 1).reshape(B, n * chunk)[:, :T]
  return unblock(picked), unblock(ent)
