"""The sampler: prefill of left-padded prompts, then a KV-cache decode loop, in one jitted program.

RL spends most of its time here (k1.5 §2.6). The log-probs the sampler reports are the ones the
policy-mirror-descent loss compares with the trainer's (§2.3.2), so the sampler calls the very
same `Transformer` as the trainer and reports the log-prob of each token under the distribution
it was drawn from.

Layout of one call (letters: U unique sequences to prefill, B rows = samples, P padded prompt
length, N padded number of new tokens, V vocab, W repeat window):

  cache slot   0 ........ P-1 | P ........ P+N-1
  row b        pad.. prompt_b | new tokens of row b (slot P+t holds token t, position len_b+t)

Prompts are left-padded to P (padding has segment id 0 and is never attended to); real tokens
have segment id 1 and positions 0..len-1, so a padded prompt computes what it would alone (up to
float summation order). The U unique prompts are prefilled once, and each of the B sample rows
takes a copy of its prompt's cache (`row_source`), so the k samples of a prompt share its
prefill. Then `lax.while_loop`s sample one token per row per step until every row has finished
(EOS, its token limit, or a detected repeat): no Python per token, no host round-trip. The
decode runs in a few phases whose cache grows (P + N/J, P + 2N/J, ... slots), so early steps
do not stream the whole padded cache through attention.

With `continuous=True` the rows do not decode as one batch: a fixed number of slots decode
together, and when a row ends its slot takes the next (prompt, sample) row of the queue in the
same loop iteration, until every row is done (`_program_continuous`), with keys and values in
a paged KV cache (`k15.sampling.paged`: a pool of fixed-size blocks and per-row block tables,
the samples of a prompt sharing its blocks). A prompt is prefilled inside the loop when its
first sample takes a slot (whole prompts in batches between two decode steps, or, with
`prefill_chunk`, in chunks of tokens that ride along with the decode steps), and its blocks
return to the pool with its last sample, so the pool is sized by tokens in flight
(`kv_tokens`), not by all prompts plus rows x limit. Long-CoT
lengths are long-tailed (§2.6), and a static batch runs until its longest row ends while the
finished rows keep their slots and cache; continuous batching spends its steps on unfinished
rows. It samples the same rows (up to float summation order). By default (`use_continuous`) it
runs where it can save steps: more rows than slots, and rows that can end early.

Static shapes are bucketed (P to a power of two or a given bucket list; U and B to powers of
two that the mesh's batch axes divide; N to a power of two; eos ids to 4), so a run compiles a
handful of programs. Sampling parameters that change per call (temperature, top_p, eos ids,
seeds, limits) are traced arrays; only top_k, whether top-p is on, the repeat n-gram and
window and the number of decode phases are static.

Randomness: row b draws its t-th response token by inverting the CDF at one uniform from the
key fold_in(fold_in(PRNGKey(seed), row_seed[b]), response_offset[b] + t), so a row's draws do
not depend on the batch it is in, its padding, or (for partial rollouts,
k15.sampling.rollout) on how its response was split into segments. All of a call's uniforms
are drawn before the decode loop.

Under `parallel.use_mesh(mesh)` the batch (and the cache's batch axis) is sharded over the
'batch' rule's mesh axes and the cache's heads over 'tensor' (`transformer.CACHE_AXES`), using
the same parameter arrays as training (at most a `jax.device_put` to the active rules' layout,
a no-op when they already agree; on CPU devices the replicated arrays are then re-made to share
one host buffer, `parallel.share_cpu_replicas`). When the mesh only splits rows (every axis of
size > 1 is a batch axis and no parameter is split over it: data parallelism, e.g. one CPU
device per core), each device prefills the prompts of its own rows and runs its own decode
loops (`jax.shard_map`, no collective); otherwise the whole call is one SPMD program. Both give
the same tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from k15 import parallel
from k15.model import transformer
from k15.sampling import paged

Array = jax.Array


class FinishReason(enum.IntEnum):
  """Why a sequence stopped; `SampleResult.finish_reason` holds these codes."""
  EOS = 1     # sampled an end-of-sequence token (it is included in the response)
  LENGTH = 2  # reached its token limit (max_new_tokens)
  REPEAT = 3  # its last n tokens repeat an earlier n-gram of the response (§2.6)
  BUDGET = 4  # partial rollouts only: spent this iteration's budget, continues later (§2.6)


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """What `generate` returns, as host numpy arrays; rows are prompt-major.

  Row order: prompt 0's samples, then prompt 1's, ... With num_samples = k, row i * k + j is
  sample j of prompt i.
  """
  tokens: np.ndarray         # int32 [R, max_new_tokens]; pad_id after the end
  logprobs: np.ndarray       # float32 [R, max_new_tokens]; 0 after the end
  lengths: np.ndarray        # int32 [R]; number of new tokens (an EOS token counts)
  finish_reason: np.ndarray  # int32 [R]; FinishReason codes
  # kv_bytes: the KV cache the program allocated; with continuous batching also
  # kv_peak_bytes, the most of it (whole blocks) in use at once.
  stats: dict = dataclasses.field(default_factory=dict, compare=False)
  # Mixture-of-experts models only (None otherwise): the experts each token was routed to,
  # per MoE layer, in `transformer.expert_id_dtype` (-1: not routed). expert_ids
  # [R, max_new_tokens, L, k]: response token t's routing when it was fed back to draw token
  # t + 1 (a row's last token is never fed back: -1); prompt_expert_ids [U, longest prompt,
  # L, k]: the prefill's routing of prompt u's tokens, from index 0. Routing replay
  # (k15.rl.trainer) trains on these.
  expert_ids: np.ndarray | None = dataclasses.field(default=None, compare=False)
  prompt_expert_ids: np.ndarray | None = dataclasses.field(default=None, compare=False)

  def reasons(self) -> list[str]:
    """Finish reasons by name, e.g. ['EOS', 'LENGTH']."""
    return [FinishReason(int(r)).name for r in self.finish_reason]


# ---------------------------------------------------------------------------------------------
# Pure pieces of one decode step (jittable, tested directly).
# ---------------------------------------------------------------------------------------------

_NEG_INF = -jnp.inf


def filter_logits(logits: Array, top_k: int = 0, top_p: Array | float | None = None) -> Array:
  """Top-k then top-p (nucleus) truncation: dropped tokens get -inf logits.

  logits: [B, V] float32 (already divided by the temperature). top_k: static; 0 keeps all.
  top_p: None (off) or a scalar in (0, 1]; keeps the smallest set of most likely tokens whose
  probability (renormalized after top-k) reaches top_p. A token is kept iff its logit is >=
  the smallest kept logit, so ties at the threshold are all kept.
  """
  V = logits.shape[-1]
  if top_k and top_k < V:
    top, _ = jax.lax.top_k(logits, top_k)                            # [B, k], descending
  elif top_p is not None:
    top = -jnp.sort(-logits, axis=-1)                                # [B, V], descending
  else:
    return logits
  threshold = top[:, -1:]                                            # k-th largest logit
  if top_p is not None:
    probs = jax.nn.softmax(top, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                      # mass of better tokens
    num_kept = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(top, num_kept - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, _NEG_INF)


def repeat_detected(history: Array, ngram: int) -> Array:
  """Whether each row's last `ngram` tokens already occurred earlier in `history`.

  history: int32 [B, W], the row's most recent response tokens, newest last, -1 where the
  response is shorter than W. Occurrences may overlap the last n-gram (a loop of period p <
  n repeats too). Costs B * W * n comparisons per call. Returns bool [B].
  """
  W = history.shape[1]
  if not 0 < ngram < W:
    raise ValueError(f"repeat_ngram={ngram} must be in [1, repeat_window={W})")
  last = history[:, W - ngram:]                                      # [B, n]
  starts = jnp.arange(W - ngram)[:, None] + jnp.arange(ngram)[None]  # [W-n, n]
  windows = history[:, starts]                                       # [B, W-n, n]
  match = jnp.all((windows == last[:, None]) & (windows >= 0), axis=-1)
  return jnp.any(match, axis=-1) & jnp.all(last >= 0, axis=-1)


def _first_argmax(x: Array) -> Array:
  """jnp.argmax over the last axis (the first maximum), as two plain reductions.

  jnp.argmax lowers to one (value, index) reduction that XLA:CPU does not vectorize. With the
  argmax of `_choose`'s clamp written the same way, a decode step's sampling ops at 32 x 512
  logits went from ~200 to ~90 us on CPU.
  """
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == x.max(axis=-1, keepdims=True), iota, x.shape[-1]), axis=-1)


def _choose(logits, uniforms, temperature, top_p, *, top_k, use_top_p):
  """One token per row and its log-prob under the distribution it was drawn from.

  Sampling inverts the CDF with one uniform per row: a few microseconds per step, where
  Gumbel-max (jax.random.categorical) needs V random numbers per row and costs ~100x more on
  CPU. The float32 cumulative sum perturbs token probabilities by ~sqrt(V) * 1e-7 relative;
  the reported log-prob is the exact log-softmax of the chosen token.
  Greedy (temperature 0) reports the untempered, untruncated policy log-prob of the argmax.
  """
  greedy = temperature <= 0
  scaled = logits / jnp.where(greedy, 1.0, temperature)
  masked = filter_logits(scaled, top_k, top_p if use_top_p else None)
  probs = jax.nn.softmax(masked, axis=-1)                             # [B, V], 0 where dropped
  cdf = jnp.cumsum(probs, axis=-1)
  u = uniforms * cdf[:, -1]
  drawn = jnp.sum(cdf <= u[:, None], axis=-1)
  # Rounding can put u at cdf[-1]: never go past the last token that has probability.
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, probs.shape, 1)
  drawn = jnp.minimum(drawn, jnp.max(jnp.where(probs > 0, vocab_ids, 0), axis=-1))
  drawn_lp = jnp.take_along_axis(jax.nn.log_softmax(masked, axis=-1), drawn[:, None], -1)[:, 0]
  greedy_tok = _first_argmax(logits)
  greedy_lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), greedy_tok[:, None],
                                  -1)[:, 0]
  tok = jnp.where(greedy, greedy_tok, drawn).astype(jnp.int32)
  return tok, jnp.where(greedy, greedy_lp, drawn_lp)


# ---------------------------------------------------------------------------------------------
# The compiled program.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything that fixes a compiled program besides the array shapes."""
  steps: int            # N, the new-token capacity
  top_k: int
  use_top_p: bool
  repeat_ngram: int     # 0: off
  repeat_window: int    # W
  phases: int           # decode phases, each with a longer cache (see `_phase_bounds`)
  layout: Any           # the active mesh and rules (None without a mesh), hashable
  row_axes: tuple = ()  # mesh axes each device samples its own rows over (`_row_axes`)
  split_params: bool = False  # row_axes of a mesh that splits parameters (`_entry`)
  slots: int = 0        # continuous batching: rows decoded at once (per device); 0: static
  block_size: int = 16  # continuous batching: tokens per block of the paged KV cache
  paged_impl: str = "gather"  # 'gather' (any backend) or 'tpu' (Pallas paged attention)
  pool_blocks: int = 0  # continuous batching: blocks in the pool (per device), scratch included
  prefill_batch: int = 8  # continuous batching: prompts prefilled together in the loop
  prefill_chunk: int = 0  # continuous batching: > 0 prefills in chunks of so many tokens


def _phase_bounds(steps: int, phases: int) -> list[int]:
  """Ends of the decode phases: `phases` equal parts of `steps`, in multiples of 8 slots."""
  bounds = sorted({min(steps, -(-steps * (j + 1) // phases // 8) * 8) for j in range(phases)})
  return [b for b in bounds if b > 0]


def default_phases(steps: int) -> int:
  """One phase below 128 new tokens, then one per 64 up to 8: the saving grows with the
  generation length, the compile time with the number of phases. (CPU, 32 x 256 new tokens
  after 64-token prompts: 1, 2, 4, 8 phases took 1.62, 1.48, 1.47, 1.44 s, and 5, 7, 8, 11 s
  to compile and run once, on a shared 2-core machine.)"""
  return int(min(8, steps // 64)) if steps >= 128 else 1


def default_slots(rows: int) -> int:
  """Continuous batching's slots per device: at most 32 rows decode at once.

  Fewer slots make a step cheaper but the queue longer. On the longtail workload of
  benchmarks/sampler.py (2 CPU devices, 128 rows each), 32 slots sampled faster than 16 or 64.
  """
  return min(rows, 32)


def use_continuous(rows: int, slots: int, *, early_stop: bool, same_limits: bool) -> bool:
  """`generate`'s default: continuous batching iff a slot can take a second row (more rows
  per device than slots) and rows can end at different steps (an EOS list or a repeat check,
  or different limits).

  Otherwise it cannot save a decode step, and the static path's contiguous cache is cheaper
  per step: on the uniform workload of benchmarks/sampler.py (16 rows per device, every row
  to its limit) continuous batching was slower (see benchmarks/README.md).
  """
  return rows > slots and (early_stop or not same_limits)


def _map_cache(fn, cache: dict) -> dict:
  """fn(array, its logical axes) on every cache array, each layer's k and v included."""
  return {name: jax.tree.map(lambda a, name=name: fn(a, transformer.cache_axes(name, a)), val)
          for name, val in cache.items()}


def _constrain_cache(cache: dict) -> dict:
  return _map_cache(parallel.constrain, cache)


def _records_routing(cfg: transformer.ModelConfig) -> bool:
  return any(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def _stack_routing(routing: dict, cfg: transformer.ModelConfig) -> Array:
  """A model call's routing -> expert ids [B, T, L, k] (L MoE layers), in the compact type."""
  return jnp.stack(routing["expert_ids"], axis=2).astype(transformer.expert_id_dtype(cfg))


def _prefill(model, x: dict) -> tuple[Array, dict] | tuple[Array, dict, Array]:
  """The U left-padded prompts -> (logits of their first new token [U, V], their KV cache).

  All but the last prompt token first, keeping only the cache, so that XLA drops their
  [U, P - 1, V] logits (tens of GB at a real vocabulary and prompt length); then the last token
  alone gives the logits of the first new token. A mixture of experts appends the prompts'
  expert ids [U, P, L, k] (-1 at padding).
  """
  U, P = x["tokens"].shape
  routing = _records_routing(model.cfg)
  kw = dict(return_routing=True) if routing else {}
  cache = _constrain_cache(transformer.init_cache(model.cfg, U, P))
  ids = []
  if P > 1:
    _, cache, *r = model(x["tokens"][:, :-1], positions=x["positions"][:, :-1],
                         segment_ids=x["segment_ids"][:, :-1], cache=cache, cache_index=0, **kw)
    ids += [_stack_routing(r[0], model.cfg)] if routing else []
  logits, cache, *r = model(x["tokens"][:, -1:], positions=x["positions"][:, -1:],
                            segment_ids=x["segment_ids"][:, -1:], cache=cache,
                            cache_index=P - 1, **kw)
  if not routing:
    return logits[:, 0], cache
  ids = jnp.concatenate(ids + [_stack_routing(r[0], model.cfg)], axis=1)    # [U, P, L, k]
  ids = jnp.where((x["segment_ids"] > 0)[:, :, None, None], ids, -1).astype(ids.dtype)
  return logits[:, 0], cache, ids


def _uniforms(x: dict, steps: int) -> Array:
  """[B, N] uniforms: the t-th of row b for its response token t (see the module docstring).

  Drawn before the decode loop: the decode step then has no RNG ops (in the loop body,
  threefry was ~230 of a CPU step's ~400 ops).
  """
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(
      jax.random.PRNGKey(x["seed"]), x["row_seeds"])                # [B, 2]
  return jax.vmap(lambda key, offset: jax.vmap(
      lambda t: jax.random.uniform(jax.random.fold_in(key, offset + t), (), jnp.float32))(
          jnp.arange(steps)))(row_keys, x["response_offset"])


def row_uniforms(seed: int, row_seeds: Sequence[int], steps: int,
                 response_offset: Sequence[int] | None = None) -> np.ndarray:
  """[R, steps] float32: the uniform at which row r of `generate(..., seed=seed,
  row_seeds=row_seeds)` inverts its CDF for response token t (`_choose`: the first token whose
  cumulative probability exceeds u times the total).

  For checks that recompute a draw. Two programs that sample the same rows but add up the
  same logits in a different order (the static and the continuous paths' attention) give
  probabilities that differ by float32 rounding, so they draw different tokens where u lies
  within that rounding (~1e-7) of a CDF boundary, and the rows go their own ways from there:
  at temperature > 0 "the same rows" holds up to such ties.
  """
  seeds = np.asarray(row_seeds, np.int64).reshape(-1) % (1 << 31)
  offset = np.zeros_like(seeds) if response_offset is None else np.asarray(response_offset)
  x = {"seed": jnp.int32(seed % (1 << 31)), "row_seeds": jnp.asarray(seeds, jnp.int32),
       "response_offset": jnp.asarray(offset, jnp.int32)}
  return np.asarray(jax.jit(_uniforms, static_argnums=1)(x, int(steps)))


def _stops(x: dict, static: _Static, active, tok, t_next, limits, history):
  """(is_eos, is_repeat, is_length, new history) of rows that drew `tok` as token t_next - 1.

  The stop rules, in this order of precedence: an eos id, a repeated n-gram, the row's limit.
  """
  is_eos = active & jnp.any(tok[:, None] == x["eos"][None], axis=-1)
  is_repeat = jnp.zeros_like(active)
  if static.repeat_ngram:
    hist = jnp.concatenate([history[:, 1:], tok[:, None]], axis=1)
    history = jnp.where(active[:, None], hist, history)
    is_repeat = active & ~is_eos & repeat_detected(history, static.repeat_ngram)
  is_length = active & ~is_eos & ~is_repeat & (t_next >= limits)
  return is_eos, is_repeat, is_length, history


def _reason(is_eos, is_repeat, is_length, old):
  return jnp.select([is_eos, is_repeat, is_length],
                    [int(FinishReason.EOS), int(FinishReason.REPEAT), int(FinishReason.LENGTH)],
                    old).astype(jnp.int32)


def _row_outputs(B: int, N: int, pad_id) -> dict:
  """The per-row outputs both decode loops fill: tokens and log-probs [B, N], lengths, reasons."""
  return {
      "tokens": jnp.full((B, N), pad_id, jnp.int32),
      "logprobs": jnp.zeros((B, N), jnp.float32),
      "lengths": jnp.zeros((B,), jnp.int32),
      "reason": jnp.zeros((B,), jnp.int32),
  }


def _routing_outputs(cfg: transformer.ModelConfig, B: int, N: int) -> Array:
  """Recorded expert ids of B rows x N tokens (response, or prompt slots), -1 until a token
  is routed."""
  L = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  return jnp.full((B, N, L, cfg.experts_per_token), -1, transformer.expert_id_dtype(cfg))


def _program(state, x: dict, *, graphdef, static: _Static) -> dict:
  """Prefill + decode loop. x holds the bucketed inputs built by `generate`."""
  if static.slots:
    return _program_continuous(state, x, graphdef=graphdef, static=static)
  U, P = x["tokens"].shape
  B, N = x["row_source"].shape[0], static.steps
  model = nnx.merge(graphdef, state)
  routing = _records_routing(model.cfg)

  logits, cache, *prompt_ids = _prefill(model, x)
  last = jnp.take(logits, x["row_source"], axis=0)                   # [B, V]

  # Each sample row continues its prompt's cache; slots P.. will hold the new tokens.
  def grow(cache, extra):
    return _constrain_cache(_map_cache(
        lambda a, axes: jnp.pad(a, [(0, extra) if ax == "cache_length" else (0, 0)
                                    for ax in axes]), cache))
  cache = _map_cache(lambda a, axes: jnp.take(a, x["row_source"], axis=axes.index("batch")),
                     cache)
  bounds = _phase_bounds(N, static.phases)
  cache = grow(cache, bounds[0])
  last = parallel.constrain(last, ("batch", "act_vocab"))

  start_pos = jnp.take(x["lengths"], x["row_source"])               # [B] first new position
  uniforms = _uniforms(x, N)
  limits = x["limits"]

  def sample(carry, logits, t):
    """Chooses token t of every unfinished row and updates the bookkeeping."""
    u = jax.lax.dynamic_index_in_dim(uniforms, t, axis=1, keepdims=False)
    tok, lp = _choose(logits, u, x["temperature"], x["top_p"], top_k=static.top_k,
                      use_top_p=static.use_top_p)
    active = ~carry["done"]
    tok = jnp.where(active, tok, x["pad_id"])
    lp = jnp.where(active, lp, 0.0)
    out = dict(carry)
    out["tokens"] = jax.lax.dynamic_update_slice(carry["tokens"], tok[:, None], (0, t))
    out["logprobs"] = jax.lax.dynamic_update_slice(carry["logprobs"], lp[:, None], (0, t))
    out["lengths"] = jnp.where(active, t + 1, carry["lengths"])
    is_eos, is_repeat, is_length, hist = _stops(x, static, active, tok, t + 1, limits,
                                                carry.get("history"))
    if static.repeat_ngram:
      out["history"] = hist
    out["reason"] = _reason(is_eos, is_repeat, is_length, carry["reason"])
    out["done"] = carry["done"] | is_eos | is_repeat | is_length
    out["last_token"] = tok
    return out

  carry = {
      **_row_outputs(B, N, x["pad_id"]),
      "done": limits <= 0,  # bucket padding rows
      "last_token": jnp.zeros((B,), jnp.int32),
  }
  if routing:
    carry["expert_ids"] = _routing_outputs(model.cfg, B, N)
  if static.repeat_ngram:
    carry["history"] = x["history"]
  carry = sample(carry, last, 0)

  # The rotary angles of every step's token, computed once here: in the loop, XLA evaluates
  # sin and cos inside each layer's query and key fusions.
  cfg = model.cfg
  step_angles = transformer.rope_angles(start_pos[:, None] + jnp.arange(N) - 1, cfg.head_dim,
                                        cfg.rope_theta, cfg.rope_scaling)  # 2 x [B, N, 1, H/2]

  def body(c):
    t, carry, cache = c
    # Feed token t-1 (at slot P+t-1) to get the logits of token t.
    tok = carry["last_token"][:, None]
    pos = (start_pos + t - 1)[:, None]
    angles = tuple(jax.lax.dynamic_slice_in_dim(a, t, 1, axis=1) for a in step_angles)
    logits, cache, *r = nnx.merge(graphdef, state)(
        tok, positions=pos, segment_ids=jnp.ones_like(tok), cache=cache,
        cache_index=P + t - 1, angles=angles, return_routing=routing)
    cache = _constrain_cache(cache)
    if routing:  # token t-1's experts, recorded at its response index
      carry = dict(carry, expert_ids=jax.lax.dynamic_update_slice(
          carry["expert_ids"], _stack_routing(r[0], cfg), (0, t - 1, 0, 0)))
    return t + 1, sample(carry, logits[:, 0], t), cache

  # Decode in J phases with a growing cache: a step's attention reads (and computes over)
  # P + its phase's end slots, not P + N, which saves up to (J - 1) / 2J of the attention work
  # of long generations (memory-bound on CPU) for one cache copy and one compiled loop body
  # per phase.
  t = jnp.int32(1)
  for j, end in enumerate(bounds):
    if j:
      cache = grow(cache, end - bounds[j - 1])
    t, carry, cache = jax.lax.while_loop(
        lambda c, end=end: (c[0] < end) & ~jnp.all(c[1]["done"]), body, (t, carry, cache))
  out = {k: parallel.constrain(carry[k], ("batch",) + (None,) * (carry[k].ndim - 1))
         for k in ("tokens", "logprobs", "lengths", "reason") + (("expert_ids",) * routing)}
  if routing:
    out["prompt_expert_ids"] = prompt_ids[0]
  return out


def _program_continuous(state, x: dict, *, graphdef, static: _Static) -> dict:
  """Continuous batching over a paged KV cache (`k15.sampling.paged`), prefill included.

  S = static.slots slots decode together. The rows (prompt-major (prompt, sample) pairs, the
  queue) enter the slots in order: whenever a row ends (EOS, its limit, a repeat), its slot
  returns the row's blocks to the free list and takes the next row of the queue in the same
  loop iteration, until every row is done. A prompt is prefilled inside the loop when its
  first sample enters a slot (batches of static.prefill_batch prompts, between two decode
  steps), its keys and values go straight into pool blocks that its samples share, and those
  blocks return to the free list when its last sample ends; a slot that takes a row samples
  its first token from its prompt's logits (its decode starts at the next iteration). So the
  pool holds only the prompts in flight, not all U.

  Admission: a row enters only when the pool can hold its worst case (its own blocks up to
  its limit, plus its prompt's blocks if the prompt is new) on top of what the rows and
  prompts in flight have reserved; otherwise it waits (and the rows behind it, FIFO) until
  rows end. `generate` refuses a pool that cannot hold some row alone, so the loop always
  progresses; a pool smaller than S worst-case rows just runs fewer rows at once. A row draws
  the same uniforms as in the static path (`_uniforms`), so it samples the same tokens whatever
  slot it runs in and whenever it starts. A mixture of experts records, as the static path
  does, each prompt's prefill routing (per prefill slot, left-padded) when its batch is
  prefilled and each fed-back token's from the paged decode step.

  Chunked prefill (static.prefill_chunk = CH > 0) instead of prefill batches: one prompt at a
  time is in prefill, and each loop iteration feeds its next CH tokens through the model
  together with the slots' decode step (`paged.decode_step`'s chunk: the same projections
  and MLP, the chunk attending to the prompt's blocks written so far and causally within
  itself), writing their keys and values into the prompt's blocks. A prompt's prefill starts
  when the last one's is done and the pool can hold it and its first row, both reserved then
  (`start_prefill`: also while the last prompt's rows still wait for slots, where that cannot
  deadlock); when its last chunk is done, its rows take slots (the next iteration) and sample
  their first token from that chunk's last logits. A chunk holds one prompt's tokens: a
  prompt's last chunk runs partly empty. The slots' step keeps its kernel; the chunk's
  attention is the gather path on every backend (`paged`).

  Prefill batches are the default (prefill_chunk=0), chunks the measured alternative: on CPU,
  side by side on the short- and the long-prompt workloads of benchmarks/sampler.py
  (benchmarks/README.md), chunked prefill came out about even with batches of one prompt,
  not clearly ahead on either, so nothing justified a change of default or a rule. A CPU step
  costs about its tokens, so a chunk does not ride along for free as on an accelerator whose
  decode step is bound by memory traffic (where chunks should gain; not measured), and a
  dense prefill does the same tokens in a few large matmuls. Steps with and without a chunk
  run in loops of their own: a conditional around the step made XLA:CPU copy the pool every
  iteration, and so did a second scatter into the pool after the slots' attention.

  Per-slot letters: S slots, M block-table width, C block size, NB pool blocks, Q prefill
  batch, PB blocks of the padded prompt length, CH prefill chunk.
  """
  U, P = x["tokens"].shape
  B, N, S, C = x["row_source"].shape[0], static.steps, static.slots, static.block_size
  NB, Q = static.pool_blocks, min(static.prefill_batch, U)
  CH = static.prefill_chunk
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  routing = _records_routing(cfg)
  K, H = cfg.num_kv_heads, cfg.head_dim
  PB = -(-P // C)
  M = -(-(P + N) // C) + 1
  usable = NB - 1                                                    # block 0 is scratch

  lengths, limits, row_source = x["lengths"], x["limits"], x["row_source"]
  queue = jnp.sum(limits > 0)                                        # bucket padding rows last
  prompt_blocks = -(-lengths // C)                                   # [U]
  samples = jnp.zeros((U,), jnp.int32).at[row_source].add((limits > 0).astype(jnp.int32))
  plen_row = lengths[row_source]
  own_row = _own_blocks(plen_row, limits, C)                         # [B] worst case
  first_row = jnp.full((U,), B, jnp.int32).at[jnp.where(limits > 0, row_source, U)].min(
      jnp.arange(B, dtype=jnp.int32), mode="drop")                   # [U]; B: no row

  def everywhere(n):
    """n (an int32 scalar) maxed over the batch shards when they must run in step: with
    parameters split over other axes, every control-flow decision that encloses a collective
    (the decode loop, a refill, a prefill) is taken by all batch shards together."""
    return jax.lax.pmax(n, static.row_axes) if static.split_params else n

  uniforms = _uniforms(x, N)                                         # [B, N]
  buckets = tuple(paged.column_buckets(M, C))
  chunk_buckets = tuple(paged.column_buckets(PB, C))
  # Slots attend in groups of 4 of similar length (`paged.slot_groups`).
  num_groups = S // 4 if S % 4 == 0 else 1
  cols = jnp.arange(M)[None]                                         # [1, M]
  slot_ids = jnp.arange(S)

  def to_blocks(a, take_idx, key_major):                             # -> [K, Q*PB, C, H]
    # Prompts right-aligned to logical tokens 0..len-1 (the prefill cache holds them
    # left-padded at slots P-len..P-1), padded to PB whole blocks.
    if key_major:                                                    # k: [Q, K, H, P]
      a = jnp.swapaxes(jnp.take_along_axis(a, take_idx[:, None, None], axis=3), 2, 3)
    else:                                                            # v: [Q, K, P, H]
      a = jnp.take_along_axis(a, take_idx[:, None, :, None], axis=2)
    a = a.reshape(Q, K, PB, C, H)
    return jnp.swapaxes(a, 0, 1).reshape(K, Q * PB, C, H)

  def prefill(c, end):
    """Prefills prompts pf .. pf + Q - 1 (those below `end`) into blocks off the free list."""
    idx = c["pf"] + jnp.arange(Q)
    valid = idx < end
    idx_c = jnp.minimum(idx, U - 1)
    logits, cache, *prompt_ids = _prefill(model, {k: x[k][idx_c] for k in (
        "tokens", "positions", "segment_ids")})
    ids, top = paged.pop_many(c["free"], c["top"], jnp.where(valid, prompt_blocks[idx_c], 0),
                              PB)
    take_idx = (jnp.arange(PB * C)[None] + P - lengths[idx_c][:, None]) % P   # [Q, PB*C]
    flat = ids.reshape(-1)                                           # SCRATCH past a prompt
    c = dict(c, top=top, pf=jnp.minimum(c["pf"] + Q, end))
    c["pool"] = {
        name: tuple(p.at[:, flat].set(to_blocks(a, take_idx, name == "k").astype(p.dtype))
                    for p, a in zip(c["pool"][name], cache[name]))
        for name in ("k", "v")}
    dest = jnp.where(valid, idx, U)                                  # U: dropped
    c["ptable"] = c["ptable"].at[dest].set(ids, mode="drop")
    c["plogits"] = c["plogits"].at[dest].set(logits, mode="drop")
    c["refs"] = c["refs"].at[dest].set(samples[idx_c], mode="drop")
    if routing:  # left-padded like the prefill slots' tokens, as in the static program
      c["prompt_expert_ids"] = c["prompt_expert_ids"].at[dest].set(prompt_ids[0], mode="drop")
    return c

  def refill(c):
    """Empty slots take the next rows of the queue that the pool can hold, in slot order."""
    empty = ~c["active"]
    rank = jnp.cumsum(empty) - 1
    row = c["next"] + rank
    cand = empty & (row < queue)
    row = jnp.minimum(row, B - 1)
    src = row_source[row]
    if CH:
      # Chunked prefill: only rows whose prompt is prefilled; a prompt's first row holds its
      # reservation already, made when the prompt's prefill started (`start_prefill`).
      cand &= src < c["pd"]
      need = jnp.where(cand & (row != c["reserved"]), own_row[row], 0)
    else:
      # Candidates are consecutive rows; a prompt not yet prefilled is new at its first one.
      new_prompt = cand & (src >= c["pf"]) & ((rank == 0) | (src != row_source[
          jnp.maximum(row - 1, 0)]))
      need = jnp.where(cand, own_row[row] + jnp.where(new_prompt, prompt_blocks[src], 0), 0)
    take = cand & (jnp.cumsum(need) <= usable - c["committed"])
    c = dict(c, committed=c["committed"] + jnp.sum(jnp.where(take, need, 0)),
             next=c["next"] + jnp.sum(take, dtype=jnp.int32))
    if CH:
      c["reserved"] = jnp.where(jnp.any(take & (row == c["reserved"])), -1, c["reserved"])
    else:
      end = jnp.maximum(c["pf"], jnp.max(jnp.where(take, src + 1, 0)))
      batches = everywhere(-(-(end - c["pf"]) // Q))
      c = jax.lax.fori_loop(0, batches, lambda _, c: prefill(c, end), c)

    row = jnp.where(take, row, 0)
    src = row_source[row]
    plen = lengths[src]
    full = plen // C
    partial = plen % C != 0
    copy, c["top"] = paged.pop(c["free"], c["top"], take & partial)
    # Each sample gets its own copy of its prompt's partly filled last block (copy on write).
    ptable = jnp.pad(c["ptable"][src], [(0, 0), (0, M - PB)])      # [S, M]
    last_block = jnp.where(take & partial, ptable[slot_ids, full], paged.SCRATCH)
    c["pool"] = {name: tuple(p.at[:, copy].set(p[:, last_block]) for p in c["pool"][name])
                 for name in ("k", "v")}
    table = jnp.where(cols < full[:, None], ptable,
                      jnp.where((cols == full[:, None]) & partial[:, None], copy[:, None],
                                paged.SCRATCH))
    c["table"] = jnp.where(take[:, None], table, c["table"])
    c["row"] = jnp.where(take, row, c["row"])
    c["plen"] = jnp.where(take, plen, c["plen"])
    c["ctx"] = jnp.where(take, plen, c["ctx"])
    c["t"] = jnp.where(take, 0, c["t"])
    c["logits"] = jnp.where(take[:, None], c["plogits"][src], c["logits"])
    if static.repeat_ngram:
      c["history"] = jnp.where(take[:, None], x["history"][row], c["history"])
    c["active"] = c["active"] | take
    return start_prefill(c) if CH else c

  def start_prefill(c):
    """Chunked prefill: the next prompt's prefill starts (its blocks off the free list) when no
    other prompt is in prefill and the pool can hold the prompt and its first row, which are
    reserved now (the row takes a slot when the prompt's last chunk is done), and either its
    first row is the queue's head (every earlier row has a slot) or the head's rows are the
    previous prompt's, waiting for slots, and the pool could hold both prompts, this first
    row and one of those rows once every running row has ended (so the rows ahead can always
    enter: no deadlock). The second case prefills the next prompt while the last one's rows
    wait for slots, so that the slots do not wait for the prefill."""
    p = c["pf"]
    pc = jnp.minimum(p, U - 1)
    head = jnp.minimum(c["next"], B - 1)
    first = first_row[pc]
    first_c = jnp.minimum(first, B - 1)
    need = prompt_blocks[pc] + own_row[first_c]
    h = row_source[head]
    ahead = (h == p - 1) & (prompt_blocks[h] + need + own_row[head] <= usable)
    go = ((c["next"] < queue) & (p < U) & (first < B) & (c["pf"] == c["pd"])
          & ((first == c["next"]) | ahead) & (need <= usable - c["committed"]))
    ids, c["top"] = paged.pop_many(c["free"], c["top"],
                                   jnp.where(go, prompt_blocks[pc], 0)[None], PB)
    dest = jnp.where(go, pc, U)                                      # U: dropped
    c["ptable"] = c["ptable"].at[dest].set(ids[0], mode="drop")
    c["refs"] = c["refs"].at[dest].set(samples[pc], mode="drop")
    c["committed"] = c["committed"] + jnp.where(go, need, 0)
    c["pf"] = c["pf"] + go.astype(jnp.int32)
    c["reserved"] = jnp.where(go, first, c["reserved"])
    return c

  def chunk_of(c):
    """Chunked prefill: the next CH tokens of the prompt in prefill (prompt pd, tokens
    pdone..), as `paged.decode_step` takes them; past the prompt's end (or with no prompt in
    prefill) they write to the scratch block and attend to nothing."""
    p = jnp.minimum(c["pd"], U - 1)
    plen = lengths[p]
    pos = c["pdone"] + jnp.arange(CH)                                # [CH]
    valid = (c["pf"] > c["pd"]) & (pos < plen)
    ptable = c["ptable"][p]                                          # [PB]
    return {
        # The prompt's tokens are left-padded to P (as for the static prefill).
        "tokens": x["tokens"][p, jnp.clip(P - plen + pos, 0, P - 1)],
        "positions": pos,
        "table": ptable,
        "block": jnp.where(valid, ptable[jnp.minimum(pos // C, PB - 1)], paged.SCRATCH),
        "offset": pos % C,
        "lengths": jnp.where(valid, pos + 1, 0),
        "width": jnp.sum(jnp.asarray(chunk_buckets) * C < jnp.minimum(c["pdone"] + CH, plen)),
        "last": jnp.clip(plen - 1 - c["pdone"], 0, CH - 1),
    }, p, plen, valid

  def body(c, chunked=False):
    active, row, t = c["active"], c["row"], c["t"]
    # Token t of every active slot's row, from the logits its slot holds.
    u = uniforms[row, jnp.minimum(t, N - 1)]
    tok, lp = _choose(c["logits"], u, x["temperature"], x["top_p"], top_k=static.top_k,
                      use_top_p=static.use_top_p)
    out_row = jnp.where(active, row, B)                              # B: dropped
    c = dict(c)
    c["tokens"] = c["tokens"].at[out_row, t].set(tok, mode="drop")
    c["logprobs"] = c["logprobs"].at[out_row, t].set(lp, mode="drop")
    c["lengths"] = c["lengths"].at[out_row].set(t + 1, mode="drop")
    is_eos, is_repeat, is_length, c["history"] = _stops(
        x, static, active, tok, t + 1, limits[row], c.get("history"))
    finished = is_eos | is_repeat | is_length
    c["reason"] = c["reason"].at[jnp.where(finished, row, B)].set(
        _reason(is_eos, is_repeat, is_length, 0), mode="drop")
    if not static.repeat_ngram:
      del c["history"]
    cont = active & ~finished
    c["t"] = t + 1

    def release_and_refill(c):
      # Finished rows return the blocks they own (from their copy of the prompt's last block
      # on) and their reservations; a prompt whose last sample ended returns its blocks; then
      # the slots take the next rows.
      first = c["plen"] // C
      owned = jnp.where(finished, -(-c["ctx"] // C) - first, 0)
      c = dict(c)
      c["free"], c["top"] = paged.push(c["free"], c["top"], c["table"], first, owned)
      refs = c["refs"].at[jnp.where(finished, row_source[row], U)].add(-1, mode="drop")
      released = (refs == 0) & (c["refs"] > 0)
      freed = jnp.where(released, prompt_blocks, 0)
      c["free"], c["top"] = paged.push(c["free"], c["top"], c["ptable"], jnp.zeros_like(freed),
                                       freed)
      c["refs"] = refs
      c["committed"] = (c["committed"] - jnp.sum(jnp.where(finished, own_row[row], 0))
                        - jnp.sum(freed))
      c["active"] = cont
      return refill(c)

    # Most steps end no row (a slot is only ever empty once the queue is, or the pool is
    # full): skip the bookkeeping then.
    # (Chunked prefill: also when the last step finished a prompt's prefill, so that its rows
    # take slots.)
    wake = jnp.any(finished) | c["wake"] if CH else jnp.any(finished)
    c = jax.lax.cond(everywhere(wake.astype(jnp.int32)) > 0, release_and_refill,
                     lambda c: c, c)
    # Feed token t of the continuing rows at logical position ctx (a new block when it starts
    # one); the rows that just entered a slot already hold their first logits.
    ctx = c["ctx"]
    need = cont & (ctx % C == 0)
    new_block, c["top"] = paged.pop(c["free"], c["top"], need)
    table = jnp.where((cols == (ctx // C)[:, None]) & need[:, None], new_block[:, None],
                      c["table"])
    block = jnp.where(cont, table[slot_ids, jnp.minimum(ctx // C, M - 1)], paged.SCRATCH)
    seen = jnp.where(cont, ctx + 1, 0)
    step = functools.partial(
        paged.decode_step, model, tok, ctx, tables=table, write_block=block, write_offset=ctx % C,
        lengths=seen, buckets=buckets, num_groups=num_groups, impl=static.paged_impl,
        return_routing=routing)
    if not chunked:
      logits, c["pool"], *ids = step(pool=c["pool"])
      if CH:
        c["wake"] = jnp.bool_(False)
    else:
      # Chunked prefill: the prompt in prefill's next CH tokens go through the model with the
      # slots' tokens.
      chunk, p, plen, valid = chunk_of(c)
      logits, plogits, c["pool"], *ids = step(pool=c["pool"], chunk=chunk,
                                              chunk_buckets=chunk_buckets)
      pending = c["pf"] > c["pd"]
      done = pending & (c["pdone"] + CH >= plen)                    # its last chunk
      c["plogits"] = c["plogits"].at[jnp.where(done, p, U)].set(plogits, mode="drop")
      if routing:  # the prompt's routing, left-padded as in the static program
        c["prompt_expert_ids"] = c["prompt_expert_ids"].at[
            p, jnp.where(valid, P - plen + chunk["positions"], P)].set(ids[0][S:], mode="drop")
        ids = [ids[0][:S]]
      c["pd"] = c["pd"] + done.astype(jnp.int32)
      c["pdone"] = jnp.where(done, 0, c["pdone"] + jnp.where(pending, CH, 0))
      c["wake"] = done
    if routing:  # the experts of token t of the rows that continue
      c["expert_ids"] = c["expert_ids"].at[jnp.where(cont, row, B), t].set(ids[0], mode="drop")
    c["table"] = table
    c["logits"] = jnp.where(cont[:, None], logits, c["logits"])
    c["ctx"] = jnp.where(cont, ctx + 1, ctx)
    c["peak"] = jnp.maximum(c["peak"], usable - c["top"])
    return c

  c = {
      **_row_outputs(B, N, x["pad_id"]),
      "pool": paged.init_pool(cfg, NB, C),
      "free": jnp.arange(1, NB, dtype=jnp.int32),
      "top": jnp.int32(usable),
      "committed": jnp.int32(0),
      "next": jnp.int32(0),
      "pf": jnp.int32(0),
      "peak": jnp.int32(0),
      "ptable": jnp.zeros((U, PB), jnp.int32),
      "plogits": jnp.zeros((U, cfg.vocab_size), jnp.float32),
      "refs": jnp.zeros((U,), jnp.int32),
      "active": jnp.zeros((S,), bool),
      "row": jnp.zeros((S,), jnp.int32),
      "t": jnp.zeros((S,), jnp.int32),
      "ctx": jnp.zeros((S,), jnp.int32),
      "plen": jnp.zeros((S,), jnp.int32),
      "table": jnp.zeros((S, M), jnp.int32),
      "logits": jnp.zeros((S, cfg.vocab_size), jnp.float32),
  }
  if static.repeat_ngram:
    c["history"] = jnp.zeros((S, static.repeat_window), jnp.int32)
  if CH:
    c.update(pd=jnp.int32(0), pdone=jnp.int32(0), wake=jnp.bool_(False),
             reserved=jnp.int32(-1))
  if routing:
    c["expert_ids"] = _routing_outputs(cfg, B, N)
    c["prompt_expert_ids"] = _routing_outputs(cfg, U, P)
  c = refill(c)

  def running(c):
    busy = jnp.any(c["active"])
    if CH:  # a prompt in prefill, or one whose rows have yet to take slots
      busy |= (c["pf"] > c["pd"]) | c["wake"]
    return everywhere(busy.astype(jnp.int32)) > 0

  if not CH:
    c = jax.lax.while_loop(running, body, c)
  else:
    # Chunked prefill: decode steps while no prompt is in prefill, steps with a chunk while one
    # is, each in its own loop (a conditional around the step made XLA:CPU copy the pool every
    # iteration).
    def pending(c):
      return everywhere((c["pf"] > c["pd"]).astype(jnp.int32)) > 0

    def phases(c):
      c = jax.lax.while_loop(lambda c: running(c) & ~pending(c), body, c)
      return jax.lax.while_loop(lambda c: running(c) & pending(c),
                                functools.partial(body, chunked=True), c)

    c = jax.lax.while_loop(running, phases, c)
  out = {k: c[k] for k in ("tokens", "logprobs", "lengths", "reason")
         + ("expert_ids", "prompt_expert_ids") * routing}
  out["peak_blocks"] = c["peak"][None]                               # blocks in use at most
  return out


def _own_blocks(prompt_len, limit, block_size):
  """The most blocks a row of `limit` new tokens after a `prompt_len`-token prompt holds of
  its own: from its copy of the prompt's last block (or its first new block) on."""
  return (prompt_len + limit) // block_size - prompt_len // block_size + 1


# Inputs with one entry per prefill sequence or per sample row (split over the batch axes);
# the others are scalars or the eos list, the same on every device.
_ROW_INPUTS = ("tokens", "positions", "segment_ids", "lengths", "row_source", "limits",
               "response_offset", "row_seeds", "history")


def _entry(state, x: dict, *, graphdef, static: _Static) -> dict:
  """`_program` as one SPMD program, or, with `static.row_axes`, once per device on its rows.

  The per-device form (`jax.shard_map` over the row axes) has no collective at all: each device
  prefills the prompts its own rows need and runs its own decode loops, which stop when its
  own rows have finished. The SPMD form checks "all rows done" across devices every step, an
  all-reduce that keeps the devices in lockstep (on a 2-core CPU with one device per core, the
  per-device form sampled 7-11% faster).
  """
  if not static.row_axes:
    return _program(state, x, graphdef=graphdef, static=static)
  rows = PartitionSpec(static.row_axes)

  def local(state, x):
    with parallel.without_mesh():  # no sharding constraints inside: everything here is local
      return _program(state, x, graphdef=graphdef, static=static)

  # Continuous batching on a mesh that splits parameters (fsdp, tensor): each batch shard runs
  # its own slots and pool as above, on parameters gathered over the batch axes and still split
  # over the others, which stay SPMD inside (data parallel across batch shards, tensor
  # parallel within).
  manual = {"axis_names": frozenset(static.row_axes)} if static.split_params else {}
  return jax.shard_map(local, mesh=parallel.active_mesh(),
                       in_specs=(PartitionSpec(),
                                 {k: rows if k in _ROW_INPUTS else PartitionSpec() for k in x}),
                       out_specs=rows, check_vma=False, **manual)(state, x)


_run = jax.jit(_entry, static_argnames=("graphdef", "static"))


def compiled_programs() -> int:
  """How many sampler programs are compiled (jit cache entries); for tests and benchmarks."""
  return _run._cache_size()  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# Host side: validation, bucketing, layout.
# ---------------------------------------------------------------------------------------------

def _next_pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
  """The padded prompt length for a longest prompt of n tokens.

  Default buckets: powers of two from 16. With `buckets`, the smallest one >= n.
  """
  if buckets is None:
    return _next_pow2(n, 16)
  fits = [b for b in sorted(buckets) if b >= n]
  if not fits:
    raise ValueError(f"a prompt of {n} tokens is longer than the largest prompt bucket "
                     f"{max(buckets)} (prompt_buckets={list(buckets)})")
  return fits[0]


def _batch_axes() -> tuple[str, ...]:
  """The active mesh's axes (of size > 1) that split the 'batch' axis; () without a mesh."""
  mesh = parallel.active_mesh()
  if mesh is None:
    return ()
  spec = parallel.logical_to_spec(("batch",), None, mesh)[0]
  return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def _batch_shards() -> int:
  """How many ways the active mesh splits the 'batch' axis (1 without a mesh)."""
  mesh = parallel.active_mesh()
  return math.prod(mesh.shape[a] for a in _batch_axes())


def _row_axes(state_shardings) -> tuple[str, ...]:
  """The batch's mesh axes when each device can sample its rows alone, else ().

  That is when every mesh axis of size > 1 splits the batch and no parameter is split over
  any of them (pure data parallelism, e.g. one CPU device per core, or the 'data' axis of a
  small model): then the parameters are whole on every device and rows need nothing from
  other devices. Meshes that shard parameters (fsdp, tensor) run one SPMD program.
  """
  mesh = parallel.active_mesh()
  axes = _batch_axes()
  if not axes or {a for a, n in mesh.shape.items() if n > 1} != set(axes):
    return ()
  # Every mesh axis left is a batch axis, and specs name no axis of size 1: a parameter whose
  # spec names any axis is split over the rows' devices.
  if any(entry is not None for sharding in jax.tree.leaves(state_shardings)
         for entry in sharding.spec):
    return ()
  return axes


def _prefill_slots(row_source: np.ndarray, U: int, Rb: int, shards: int,
                   local: bool) -> tuple[list[int], np.ndarray]:
  """Which prompt each prefill slot holds (-1: padding) and each row's slot.

  SPMD (`local` False): slot u holds prompt u, padded to a power of two per batch shard; a row
  may copy the cache of a prompt on another device (XLA gathers it). Per-device (`local`): the
  rows are split into `shards` equal blocks and block d's slots hold just the prompts of its
  own rows (a prompt whose samples straddle two blocks is prefilled on both), so every row's
  slot is on its own device; row_source then counts from the start of its block.
  """
  R = row_source.size
  rows = np.zeros((Rb,), np.int32)
  if not local:
    rows[:R] = row_source
    return list(range(U)) + [-1] * (_bucket_batch(U) - U), rows
  per = Rb // shards
  needed = [sorted(set(row_source[d * per:(d + 1) * per].tolist())) for d in range(shards)]
  width = _next_pow2(max(len(n) for n in needed))
  slots = []
  for d, prompts in enumerate(needed):
    index = {u: j for j, u in enumerate(prompts)}
    block = row_source[d * per:(d + 1) * per]
    rows[d * per:d * per + block.size] = [index[u] for u in block]
    slots += prompts + [-1] * (width - len(prompts))
  return slots, rows


def _bucket_batch(n: int) -> int:
  shards = _batch_shards()
  return shards * _next_pow2(-(-n // shards))


def _layout_key():
  """Hashable fingerprint of the active mesh and of how the rules place the sampler's axes."""
  mesh = parallel.active_mesh()
  if mesh is None:
    return None
  names = ("batch", "length", "cache_length", "kv_heads", "act_embed", "act_mlp", "act_q_heads",
           "act_kv_heads", "act_vocab", "head_dim")
  return (mesh, tuple(parallel.logical_to_spec((n,), None, mesh) for n in names))


def _as_list(value, n: int, name: str) -> list[int]:
  if isinstance(value, (int, np.integer)):
    return [int(value)] * n
  out = [int(v) for v in value]
  if len(out) != n:
    raise ValueError(f"{name} has {len(out)} entries but there are {n} prompts")
  return out


def _put(value: np.ndarray, axes: tuple) -> Array:
  mesh = parallel.active_mesh()
  if mesh is None:
    return jnp.asarray(value)
  # Every host builds the same inputs; each places only its own devices' slices.
  return parallel.host_to_global(value, parallel.sharding(axes, value.shape, mesh))


def _to_host(x: Array) -> np.ndarray:
  # The whole result on every host (an all-gather when rows live on several hosts).
  return parallel.global_to_host(x)


def generate(
    model: transformer.Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    eos_id: int | Sequence[int] | None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    num_samples: int | Sequence[int] = 1,
    repeat_ngram: int = 0,
    repeat_window: int = 512,
    prompt_buckets: Sequence[int] | None = None,
    pad_id: int = 0,
    response_prefix: Sequence[int] | None = None,
    row_seeds: Sequence[int] | None = None,
    decode_phases: int | None = None,
    continuous: bool | None = None,
    slots: int | None = None,
    block_size: int = 16,
    kv_tokens: int | None = None,
    prefill_batch: int = 8,
    prefill_chunk: int = 0,
) -> SampleResult:
  """Samples continuations of `prompts` with `model`, in one compiled program.

  Args:
    model: the policy (its parameters are used where they are; under `parallel.use_mesh` they
      are placed in the active layout first, a no-op when already there).
    prompts: token-id lists of any lengths >= 1.
    max_new_tokens: new-token limit, one for all prompts or one per prompt.
    eos_id: end-of-sequence id(s); None never stops early.
    temperature: 0 is greedy (and reports the untempered policy log-prob of the argmax).
    top_p, top_k: nucleus / top-k truncation of the tempered distribution (1.0 / 0: off).
    seed: base seed; row r draws from fold_in(PRNGKey(seed), row_seeds[r]).
    num_samples: samples per prompt (one for all, or one per prompt); they share the prefill.
    repeat_ngram: n > 0 stops a row, reason REPEAT, when its last n tokens already occurred
      within its last `repeat_window` response tokens.
    repeat_window: W, see above (static; changing it recompiles).
    prompt_buckets: allowed padded prompt lengths (default powers of two from 16).
    pad_id: written after each row's end.
    response_prefix: per prompt, how many of its trailing tokens are an earlier part of the
      response (partial rollouts): repeat detection sees them, and the RNG counts response
      positions from there, so a continued response draws what an uninterrupted one would.
    row_seeds: per output row (default 0, 1, 2, ...).
    decode_phases: decode with a cache that grows in this many steps (static; default
      `default_phases(bucketed max_new_tokens)`). Does not change the result.
    continuous: continuous batching over a paged KV cache (`_program_continuous`): `slots`
      rows decode at once and a finished row's slot takes the next row at once, so a long row
      does not hold up the others. Samples the same rows as the static path (False: one batch
      of all rows, decoded until its last row ends), up to float summation order. Without a
      mesh, on a mesh that only splits rows (each device then runs its own slots over its own
      rows), or on one that splits parameters (each batch shard runs its own slots, on the
      parameters gathered over the batch axes and split over the others). None (default):
      `use_continuous`'s rule, continuous only where it can save steps.
    slots: rows decoded at once per device (default `default_slots`); static.
    block_size: tokens per block of the paged KV cache; static.
    kv_tokens: the paged pool's size in tokens, per device (default: enough for `slots` rows
      of the longest limit, each with its own prompt); static. A row enters a slot only when
      the pool can hold its prompt and limit on top of the rows in flight, so a smaller pool
      runs fewer rows at once; one that cannot hold some row alone is refused (ValueError).
    prefill_batch: prompts prefilled together inside the continuous loop; static.
    prefill_chunk: 0 (default): continuous batching prefills a prompt whole, in batches of
      `prefill_batch` prompts between two decode steps; n > 0: in chunks of n tokens that go
      through the model together with the slots' decode step (`_program_continuous`, which
      says why 0 is the default); static. The same rows either way, up to float summation
      order.

  Returns:
    SampleResult with R = sum of num_samples rows, prompt-major.
  """
  cfg: transformer.ModelConfig = model.cfg
  V = cfg.vocab_size
  if not prompts:
    raise ValueError("generate: prompts is empty")
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  for i, p in enumerate(prompts):
    if p.size == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if p.min() < 0 or p.max() >= V:
      bad = int(p[(p < 0) | (p >= V)][0])
      raise ValueError(f"prompt {i} has token id {bad} outside the vocabulary [0, {V})")
  U = len(prompts)
  limits_u = _as_list(max_new_tokens, U, "max_new_tokens")
  counts = _as_list(num_samples, U, "num_samples")
  prefix_u = _as_list(response_prefix if response_prefix is not None else 0, U,
                      "response_prefix")
  for name, vals, lo in (("max_new_tokens", limits_u, 1), ("num_samples", counts, 1),
                         ("response_prefix", prefix_u, 0)):
    for i, v in enumerate(vals):
      if v < lo:
        raise ValueError(f"{name}={v} for prompt {i}; it must be >= {lo}")
  for i, (k, p) in enumerate(zip(prefix_u, prompts)):
    if k > p.size:
      raise ValueError(f"response_prefix={k} for prompt {i} is longer than the prompt ({p.size})")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  if not 0 <= top_k:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 disables it)")
  if repeat_ngram < 0 or (repeat_ngram and repeat_ngram >= repeat_window):
    raise ValueError(f"repeat_ngram={repeat_ngram} must be 0 (off) or in [1, repeat_window="
                     f"{repeat_window})")
  if eos_id is None:
    eos = []
  elif isinstance(eos_id, (int, np.integer)):
    eos = [int(eos_id)]
  else:
    eos = [int(e) for e in eos_id]
  for e in eos:
    if not 0 <= e < V:
      raise ValueError(f"eos_id {e} is outside the vocabulary [0, {V})")
  if not 0 <= pad_id < V:
    raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {V})")

  R = sum(counts)
  row_source = np.repeat(np.arange(U), counts)
  if row_seeds is None:
    row_seeds = np.arange(R)
  row_seeds = np.asarray(row_seeds, np.int64).reshape(-1)
  if row_seeds.size != R:
    raise ValueError(f"row_seeds has {row_seeds.size} entries but there are {R} rows")

  graphdef, state = nnx.split(model)
  shardings = None
  if parallel.active_mesh() is not None:
    shardings = parallel.state_shardings(state)
    state = jax.device_put(state, shardings)
    # On CPU, one copy of each replicated weight for all devices: less memory traffic.
    state = parallel.share_cpu_replicas(state)
  row_axes = _row_axes(shardings) if shardings is not None else ()

  # Buckets.
  P = bucket_length(max(p.size for p in prompts), prompt_buckets)
  Rb = _bucket_batch(R)
  N = _next_pow2(max(limits_u), 8)
  if slots is not None and slots < 1:
    raise ValueError(f"slots={slots} must be >= 1")
  shards = _batch_shards()
  tpu = jax.default_backend() == "tpu"
  if prefill_chunk < 0:
    raise ValueError(f"prefill_chunk={prefill_chunk} must be >= 0 (0: prefill in batches)")
  if prefill_chunk and continuous is False:
    raise ValueError(f"prefill_chunk={prefill_chunk} applies to continuous batching only, but "
                     "this call asks for the static path (continuous=False)")
  if continuous is None:
    continuous = use_continuous(Rb // shards, slots or default_slots(Rb // shards),
                                early_stop=bool(eos) or repeat_ngram > 0,
                                same_limits=len(set(limits_u)) == 1)
    # On TPU a mesh that splits parameters would decode through the gather path (below).
    continuous &= not (tpu and parallel.active_mesh() is not None and not row_axes)
  # Continuous batching on a mesh that splits parameters: per batch shard as well (`_entry`).
  split_params = bool(continuous and not row_axes and _batch_axes())
  if split_params:
    row_axes = _batch_axes()
  slots_u, slot_of_row = _prefill_slots(row_source, U, Rb, shards, bool(row_axes))

  tokens = np.full((len(slots_u), P), pad_id, np.int32)
  positions = np.zeros((len(slots_u), P), np.int32)
  segment_ids = np.zeros((len(slots_u), P), np.int32)
  lengths = np.ones((len(slots_u),), np.int32)
  for i, u in enumerate(slots_u):
    if u < 0:
      continue
    p = prompts[u]
    tokens[i, P - p.size:] = p
    positions[i, P - p.size:] = np.arange(p.size)
    segment_ids[i, P - p.size:] = 1
    lengths[i] = p.size

  def rows(values, fill, dtype):
    out = np.full((Rb,), fill, dtype)
    out[:R] = values
    return out

  x = {
      "tokens": _put(tokens, ("batch", "length")),
      "positions": _put(positions, ("batch", "length")),
      "segment_ids": _put(segment_ids, ("batch", "length")),
      "lengths": _put(lengths, ("batch",)),
      "row_source": _put(slot_of_row, ("batch",)),
      "limits": _put(rows(np.asarray(limits_u)[row_source], 0, np.int32), ("batch",)),
      "response_offset": _put(rows(np.asarray(prefix_u)[row_source], 0, np.int32), ("batch",)),
      "row_seeds": _put(rows(row_seeds % (1 << 31), 0, np.int32), ("batch",)),
      "seed": np.asarray(seed % (1 << 31), np.int32),
      "temperature": np.asarray(temperature, np.float32),
      "top_p": np.asarray(top_p, np.float32),
      # Padded with -1 (never sampled) to a power of two, so eos=None and one or a few ids
      # share a program.
      "eos": np.asarray(eos + [-1] * (_next_pow2(len(eos), 4) - len(eos)), np.int32),
      "pad_id": np.asarray(pad_id, np.int32),
  }
  if repeat_ngram:
    W = repeat_window
    history = np.full((Rb, W), -1, np.int32)
    for r, u in enumerate(row_source):
      tail = prompts[u][prompts[u].size - prefix_u[u]:][-W:]
      if tail.size:
        history[r, W - tail.size:] = tail
    x["history"] = _put(history, ("batch", None))
  local_rows = Rb // shards if row_axes else Rb
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1")
  if prefill_batch < 1:
    raise ValueError(f"prefill_batch={prefill_batch} must be >= 1")
  S = min(local_rows, slots or default_slots(local_rows)) if continuous else 0
  C = int(block_size)
  pool_blocks = 0
  if S:
    if kv_tokens is None:
      pool_blocks = 1 + S * (-(-P // C) + int(_own_blocks(P, N, C)))
    else:
      pool_blocks = 1 + int(kv_tokens) // C
      plen = np.asarray([p.size for p in prompts])
      need = -(-plen // C) + _own_blocks(plen, np.asarray(limits_u), C)
      worst = int(np.argmax(need))
      if need[worst] > pool_blocks - 1:
        raise ValueError(
            f"kv_tokens={kv_tokens} ({pool_blocks - 1} blocks of {C} tokens) cannot hold prompt "
            f"{worst} ({plen[worst]} tokens) with max_new_tokens={limits_u[worst]}: it needs "
            f"{int(need[worst]) * C} tokens of blocks")
  static = _Static(steps=N, top_k=int(top_k) if top_k < V else 0,
                   use_top_p=top_p < 1.0, repeat_ngram=int(repeat_ngram),
                   repeat_window=int(repeat_window) if repeat_ngram else 0,
                   phases=int(decode_phases or default_phases(N)),
                   layout=_layout_key(), row_axes=row_axes, split_params=split_params, slots=S,
                   block_size=C if S else 16,
                   # The Pallas kernel is not partitioned over the axes left SPMD inside a
                   # batch shard (tensor): split_params runs the gather path.
                   paged_impl="tpu" if S and tpu and not split_params else "gather",
                   pool_blocks=pool_blocks, prefill_batch=int(prefill_batch) if S else 8,
                   prefill_chunk=int(prefill_chunk) if S else 0)
  out = _run(state, x, graphdef=graphdef, static=static)
  width = max(limits_u)
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(
      transformer.to_dtype(cfg.dtype)).itemsize
  if S:
    shards = shards if row_axes else 1
    stats = {"kv_bytes": shards * pool_blocks * C * per_token,
             "kv_peak_bytes": int(_to_host(out["peak_blocks"]).sum()) * C * per_token}
  else:
    stats = {"kv_bytes": Rb * (P + _phase_bounds(N, static.phases)[-1]) * per_token}
  routed = {}
  lengths = _to_host(out["lengths"])[:R]
  if "expert_ids" in out:
    # Prompt u's prefill routing from the first prefill slot that holds it, left-aligned.
    slot_ids = _to_host(out["prompt_expert_ids"])                     # [slots, P, L, k]
    first = {}
    for i, u in enumerate(slots_u):
      first.setdefault(u, i)
    longest = max(p.size for p in prompts)
    prompt_ids = np.full((U, longest) + slot_ids.shape[2:], -1, slot_ids.dtype)
    for u, p in enumerate(prompts):
      prompt_ids[u, :p.size] = slot_ids[first[u], P - p.size:]
    # A row's last token is never fed back (the static loop feeds the ended rows on with the
    # others, the continuous one does not): -1 from there on, the same on both paths.
    expert_ids = _to_host(out["expert_ids"])[:R, :width]
    fed = np.arange(width)[None] < (lengths - 1)[:, None]                 # [R, width]
    routed = {"expert_ids": np.where(fed[:, :, None, None], expert_ids, -1).astype(
                  expert_ids.dtype),
              "prompt_expert_ids": prompt_ids}
  return SampleResult(
      tokens=_to_host(out["tokens"])[:R, :width],
      logprobs=_to_host(out["logprobs"])[:R, :width],
      lengths=lengths,
      finish_reason=_to_host(out["reason"])[:R], stats=stats, **routed)
