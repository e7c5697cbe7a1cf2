"""A paged KV cache for the sampler's continuous batching: a pool of fixed-size token blocks.

A row's keys and values live in blocks of `block_size` tokens anywhere in one pool, listed in
order by the row's block table; its logical token i sits in block table[i // block_size] at
offset i % block_size. Rows of any length share the pool, a row holds only the blocks it has
filled, and a finished row's blocks go back to the free list for the next row. The k samples of
a prompt share the prompt's full blocks (written once, by the prefill) and each gets its own
copy of the prompt's last, partly filled block, where its response continues (copy on write).

Letters: S slots (rows decoded together), K kv heads, G query heads per kv head (N = K * G),
H head dim, M blocks per table (the table's width), C block size, NB blocks in the pool,
T = M' * C keys read by a step (M' <= M table columns), Q query tokens of a prefill chunk.

Pool layout, per layer: k and v [K, NB, C, H], the layout of the TPU paged-attention kernel
(jax.experimental.pallas.ops.tpu.paged_attention), so both paths read the same arrays. Block 0
is a scratch block: slots with nothing to write write there, and tables point there past a
row's end, so every gather index is valid.

On CPU (and as the reference) a step gathers its slots' blocks with their tables and attends
with one masked softmax, like `attention.attend`'s reference path; it reads the first M' table
columns, where M' is the smallest of a few sizes (powers of two) that covers the longest row
in the step, so short rows do not pay for the table's full width. On TPU the Pallas kernel reads
each row's own blocks only.

Chunked prefill (`decode_step(..., chunk=...)`): Q tokens of one prompt go through the model
with the slots' tokens, their keys and values written into the prompt's blocks and their
queries attending to the prompt's tokens up to their own positions (`attend_chunk`: one gather
of the prompt's blocks for the Q queries). That path is the gather path on every backend; there
is no TPU kernel for it (the slots' decode attention keeps the Pallas kernel).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from k15 import parallel
from k15.model import transformer

Array = jax.Array

SCRATCH = 0     # the pool's scratch block (see the module docstring)
_NEG = -1e30    # as attention._NEG: a finite -inf, so a masked score never makes a NaN


def init_pool(cfg: transformer.ModelConfig, num_blocks: int, block_size: int, dtype=None):
  """{'k', 'v'}: one zero [K, NB, C, H] array per layer."""
  dtype = transformer.to_dtype(dtype or cfg.dtype)
  shape = (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
  return {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
          for name in ("k", "v")}


def write(pool_layer: Array, new: Array, block: Array, offset: Array) -> Array:
  """pool_layer [K, NB, C, H] with new [S, K, H] written at (block[s], offset[s])."""
  return pool_layer.at[:, block, offset].set(jnp.swapaxes(new, 0, 1).astype(pool_layer.dtype))


def column_buckets(width: int, block_size: int, minimum_tokens: int = 64) -> list[int]:
  """Table widths a step may read: powers of two from `minimum_tokens`, and the full width."""
  out, n = [], max(1, minimum_tokens // block_size)
  while n < width:
    out.append(n)
    n *= 2
  return out + [width]


def _attend(q: Array, k: Array, v: Array, lengths: Array, scale: float, *, kv: str) -> Array:
  """Query s of q [S, N, H] over the first lengths[s] of T gathered keys and values: each
  query's own (kv 'KSTH': k, v [K, S, T, H]) or shared ones (kv 'KTH': [K, T, H])."""
  S, N, H = q.shape
  K, T = k.shape[0], k.shape[-2]
  qg = jnp.swapaxes(q.reshape(S, K, N // K, H), 0, 1)                  # [K, S, G, H]
  s = jnp.einsum(f"KSGH,{kv}->KSGT", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32) * scale
  mask = (jnp.arange(T)[None] < lengths[:, None])[None, :, None]      # [1, S, 1, T]
  s = jnp.where(mask, s, _NEG)
  m = s.max(axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = p.sum(axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  out = jnp.einsum(f"KSGT,{kv}->KSGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return jnp.swapaxes(out, 0, 1).reshape(S, N, H).astype(q.dtype)


def attend_gather(q: Array, k_pool: Array, v_pool: Array, tables: Array, lengths: Array,
                  *, columns: int, scale: float) -> Array:
  """Attention of one query token per slot over its first lengths[s] logical tokens.

  q [S, N, H]; k_pool, v_pool [K, NB, C, H]; tables int32 [S, M]; lengths int32 [S] (>= 1 for
  a real slot, 0 gives zeros). Reads table columns [0, columns). Returns [S, N, H] in q.dtype.
  """
  K, _, C, H = k_pool.shape
  S = q.shape[0]
  cols = tables[:, :columns]                                           # [S, M']
  k = k_pool[:, cols].reshape(K, S, columns * C, H)                    # [K, S, T, H]
  v = v_pool[:, cols].reshape(K, S, columns * C, H)
  return _attend(q, k, v, lengths, scale, kv="KSTH")


def attend_chunk(q: Array, k_pool: Array, v_pool: Array, table: Array, lengths: Array,
                 *, columns: int, scale: float) -> Array:
  """Attention of Q query tokens of one sequence: query j over its first lengths[j] tokens.

  q [Q, N, H]; table int32 [M] (the sequence's blocks); lengths int32 [Q] (0 gives zeros).
  What `attend_gather` computes with every query as a slot of the same table, but the table's
  first `columns` blocks are gathered once for all Q queries. Returns [Q, N, H] in q.dtype.
  """
  K, _, C, H = k_pool.shape
  k = k_pool[:, table[:columns]].reshape(K, columns * C, H)            # [K, T, H]
  v = v_pool[:, table[:columns]].reshape(K, columns * C, H)
  return _attend(q, k, v, lengths, scale, kv="KTH")


def attend_tpu(q: Array, k_pool: Array, v_pool: Array, tables: Array, lengths: Array,
               *, scale: float, pages_per_compute_block: int = 8) -> Array:
  """The same as `attend_gather` through the Pallas TPU paged-attention kernel."""
  from jax.experimental.pallas.ops.tpu import paged_attention  # pylint: disable=g-import-not-at-top
  # The kernel reads a table in chunks of pages_per_compute_block columns: pad it with scratch
  # columns (never read below a row's length) to whole chunks.
  M = tables.shape[1]
  tables = jnp.pad(tables, [(0, 0), (0, -M % pages_per_compute_block)],
                   constant_values=SCRATCH)
  # The kernel does not scale the scores: scale the queries instead.
  out = paged_attention.paged_attention(
      (q.astype(jnp.float32) * scale).astype(q.dtype), k_pool, v_pool, lengths, tables,
      pages_per_compute_block=pages_per_compute_block)
  return out.astype(q.dtype)


def _grouped_gather(q, k_pool, v_pool, tables, lengths, groups, *, buckets, scale):
  """`attend_gather` in groups of slots of similar length, each reading its own table width.

  groups: (slot ids [g, S/g], sorted by length; the bucket index of each group). Long-tailed
  lengths put the few long rows in one group, so the others read far fewer blocks.
  """
  order, index = groups
  branches = [functools.partial(attend_gather, columns=c, scale=scale) for c in buckets]
  out = jnp.zeros_like(q)
  for g in range(order.shape[0]):
    ids = order[g]
    part = jax.lax.switch(index[g], branches, q[ids], k_pool, v_pool, tables[ids], lengths[ids])
    out = out.at[ids].set(part)
  return out


def slot_groups(lengths: Array, num_groups: int, buckets: tuple[int, ...], block_size: int):
  """Slots sorted by length into `num_groups` equal groups, and each group's bucket index."""
  order = jnp.argsort(lengths).reshape(num_groups, -1)
  longest = jnp.max(lengths[order], axis=1)
  index = jnp.sum(jnp.asarray(buckets)[None] * block_size < longest[:, None], axis=1)
  return order, index


def pool_specs(cfg: transformer.ModelConfig, mesh) -> dict:
  """How a pool and its slots lie on an SPMD mesh (`decode_step` under `parallel.use_mesh`).

  The slots and the pool's blocks are split over the 'batch' rule's mesh axes (data, fsdp):
  each batch shard has its own slots and its own blocks, numbered from 0 (its scratch block) in
  its tables. The kv heads are split over the 'kv_heads' axis (tensor) when it divides them,
  and the query heads with them; otherwise pool and queries are whole on every tensor shard
  (each computes all heads of its slots' attention, as the static cache then is replicated
  too). Returns PartitionSpecs: 'pool' [K, NB, C, H], 'heads' [S, N or K, H], 'slots' [S, ...].
  """
  batch = parallel.logical_to_spec(("batch",), None, mesh)[0]
  # Query head n uses kv head n // G: contiguous chunks of both heads line up.
  heads = parallel.logical_to_spec(("kv_heads",), (cfg.num_kv_heads,), mesh)[0]
  return {"pool": PartitionSpec(heads, batch, None, None),
          "heads": PartitionSpec(batch, heads, None),
          "slots": PartitionSpec(batch)}


def _write_attend(q, k, v, k_pool, v_pool, tables, write_block, write_offset, lengths, *,
                  buckets, num_groups, scale, impl):
  """One layer's paged step for the slots of one batch shard: writes k, v [S (+ Q), K, H] (a
  prefill chunk's too), then attends for the S slots' queries q [S, N, H]."""
  k_pool = write(k_pool, k, write_block, write_offset)
  v_pool = write(v_pool, v, write_block, write_offset)
  if impl == "tpu":
    out = attend_tpu(q, k_pool, v_pool, tables, lengths, scale=scale)
  else:
    C = k_pool.shape[2]
    groups = slot_groups(lengths, num_groups, buckets, C)
    out = _grouped_gather(q, k_pool, v_pool, tables, lengths, groups, buckets=buckets,
                          scale=scale)
  return out, k_pool, v_pool


def _attend_chunk_width(q, k_pool, v_pool, table, lengths, width, *, buckets, scale):
  """`attend_chunk` reading the first buckets[width] table columns."""
  branches = [functools.partial(attend_chunk, columns=c, scale=scale) for c in buckets]
  return jax.lax.switch(width, branches, q, k_pool, v_pool, table, lengths)


def decode_step(model: transformer.Transformer, tokens: Array, positions: Array, pool: dict,
                tables: Array, write_block: Array, write_offset: Array, lengths: Array,
                *, buckets: tuple[int, ...], num_groups: int = 1, impl: str = "gather",
                return_routing: bool = False, chunk: dict | None = None,
                chunk_buckets: tuple[int, ...] = ()):
  """One token per slot through `model`, keys and values in the paged pool.

  tokens, positions [S]: the slots' current tokens and their positions; their keys and values
  are written at (write_block, write_offset) before attending, so lengths [S] counts them.
  buckets: the table widths (in blocks) a group of slots may read (`attend_gather`);
  num_groups: groups of slots of similar length that read their own width (`slot_groups`).
  Under `parallel.use_mesh` (an SPMD program) the pool and the slots are laid out as
  `pool_specs` says, block ids count within each batch shard, and each layer's write and
  attention run per shard (`jax.shard_map`); the projections and the MLP stay SPMD.

  chunk (chunked prefill): Q tokens of one prompt that go through the model with the slots'
  tokens, in the same projections and MLP: 'tokens', 'positions' [Q]; 'table' [MP], the
  prompt's blocks; 'block', 'offset' [Q], where each token's key and value go (SCRATCH past
  the prompt); 'lengths' [Q], the tokens each attends to (position + 1, 0 past the prompt);
  'width', the index in chunk_buckets of the table width to read; 'last', the index of the
  token whose logits are returned. Each layer writes the slots' and the chunk's keys and
  values in one scatter (a second one after the slots' attention has read the pool made
  XLA:CPU copy the pool every step), then the slots attend and the chunk attends
  (`attend_chunk`), so a chunk token sees the prompt's earlier chunks and its own chunk up to
  itself (no slot reads a prompt in prefill). Under a mesh the pool must not be split over
  batch shards (one prompt's blocks lie in one shard).

  Returns (float32 logits [S, V], updated pool); with a chunk, the logits of its 'last' token
  [V] after the slots' logits; and with `return_routing` (a mixture of experts) the tokens'
  expert ids [S (+ Q), L, k] in `transformer.expert_id_dtype` (L MoE layers), slots first.
  """
  cfg = model.cfg
  dt = transformer.to_dtype(cfg.dtype)
  scale = cfg.head_dim ** -0.5
  step = functools.partial(_write_attend, buckets=buckets, scale=scale, impl=impl,
                           num_groups=num_groups)
  chunk_attend = functools.partial(_attend_chunk_width, buckets=chunk_buckets, scale=scale)
  mesh = parallel.active_mesh()
  if mesh is not None:
    sp = pool_specs(cfg, mesh)
    num_groups_local = num_groups
    shards = math.prod(mesh.shape[a] for a in _names(sp["slots"][0]))
    if tables.shape[0] // shards % max(num_groups, 1):
      num_groups_local = 1
    local = functools.partial(_write_attend, buckets=buckets, scale=scale, impl=impl,
                              num_groups=num_groups_local)
    step = jax.shard_map(
        local, mesh=mesh,
        in_specs=(sp["heads"], sp["heads"], sp["heads"], sp["pool"], sp["pool"],
                  PartitionSpec(sp["slots"][0], None), sp["slots"], sp["slots"], sp["slots"]),
        out_specs=(sp["heads"], sp["pool"], sp["pool"]), check_vma=False)
    if chunk is not None:
      if shards > 1:
        raise ValueError(
            "chunked prefill (prefill_chunk > 0) in one SPMD program needs a pool that is not "
            f"split over batch shards; this mesh splits it {shards} ways (run each batch shard "
            "its own loop, or use prefill_chunk=0)")
      chunk_attend = jax.shard_map(
          chunk_attend, mesh=mesh,
          in_specs=(sp["heads"], sp["pool"], sp["pool"]) + (PartitionSpec(),) * 3,
          out_specs=sp["heads"], check_vma=False)
  S = tokens.shape[0]
  if chunk is not None:
    tokens = jnp.concatenate([tokens, chunk["tokens"]])
    positions = jnp.concatenate([positions, chunk["positions"]])
    write_block = jnp.concatenate([write_block, chunk["block"]])
    write_offset = jnp.concatenate([write_offset, chunk["offset"]])
  x = jnp.take(model.embed[...], tokens[:, None], axis=0).astype(dt)   # [S (+ Q), 1, D]
  angles = transformer.rope_angles(positions[:, None], cfg.head_dim, cfg.rope_theta,
                                     cfg.rope_scaling)
  new_k, new_v, ids = [], [], []
  for i in range(cfg.num_layers):
    block = model.block(i)
    q, k, v = block.attn.project(block.attn_norm(x), angles)          # [S (+ Q), 1, *, H]
    # (With a chunk: the slots' and the chunk's keys and values, written together.)
    out, k_pool, v_pool = step(q[:S, 0], k[:, 0], v[:, 0], pool["k"][i], pool["v"][i],
                               tables, write_block, write_offset, lengths)
    if chunk is not None:
      out_c = chunk_attend(q[S:, 0], k_pool, v_pool, chunk["table"], chunk["lengths"],
                           chunk["width"])
      out = jnp.concatenate([out, out_c])
    x = x + block.attn.output(out[:, None])
    x, routing = block.feed_forward(x)
    if routing is not None:
      ids.append(routing[1][:, 0])                                     # [S (+ Q), k]
    new_k.append(k_pool)
    new_v.append(v_pool)
  pool = {"k": tuple(new_k), "v": tuple(new_v)}
  if chunk is None:
    out = (model.logits(x)[:, 0], pool)
  else:  # the slots' logits and the chunk's last token's only
    last = jax.lax.dynamic_index_in_dim(x, S + chunk["last"], axis=0)  # [1, 1, D]
    logits = model.logits(jnp.concatenate([x[:S], last]))[:, 0]
    out = (logits[:S], logits[S], pool)
  if return_routing:
    out += (jnp.stack(ids, axis=1).astype(transformer.expert_id_dtype(cfg)),)
  return out


def _names(entry) -> tuple:
  return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def pop(free: Array, top: Array, need: Array) -> tuple[Array, Array]:
  """Takes one block off the free stack for every slot with need[s].

  free int32 [F] (blocks free[0:top]); need bool [S]. Returns (block per slot, SCRATCH where
  not needed; new top). The caller sizes the pool so that the stack never runs dry.
  """
  rank = jnp.cumsum(need) - 1
  ids = jnp.take(free, jnp.clip(top - 1 - rank, 0, free.shape[0] - 1))
  return jnp.where(need, ids, SCRATCH), top - jnp.sum(need, dtype=top.dtype)


def pop_many(free: Array, top: Array, count: Array, width: int) -> tuple[Array, Array]:
  """Takes count[q] blocks off the free stack for every q: ([Q, width] ids, SCRATCH past
  count[q]; new top). count [Q] <= width."""
  j = jnp.arange(width)[None]
  rank = (jnp.cumsum(count) - count)[:, None] + j                      # [Q, width]
  ids = jnp.take(free, jnp.clip(top - 1 - rank, 0, free.shape[0] - 1))
  return jnp.where(j < count[:, None], ids, SCRATCH), top - jnp.sum(count, dtype=top.dtype)


def push(free: Array, top: Array, tables: Array, first: Array, count: Array):
  """Returns blocks tables[s, first[s] : first[s] + count[s]] of every slot to the free stack."""
  S, M = tables.shape
  j = jnp.arange(M)[None]
  owned = (j >= first[:, None]) & (j < (first + count)[:, None])      # [S, M]
  dest = top + jnp.cumsum(owned.reshape(-1)) - 1
  dest = jnp.where(owned.reshape(-1), dest, free.shape[0])             # out of range: dropped
  free = free.at[dest].set(tables.reshape(-1), mode="drop")
  return free, top + jnp.sum(owned, dtype=top.dtype)
