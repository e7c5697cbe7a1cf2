"""Attention with interchangeable implementations: reference, flash-style, TPU splash.

One function, `attend`, serves training on packed sequences, prefill of left-padded prompts and
single-token decode against a KV cache, because visibility is defined by segment ids and
positions rather than by array indices:

  key s is visible to query t  iff  kv_segment_ids[s] == q_segment_ids[t] != 0
                                and kv_positions[s] <= q_positions[t].

Long chain-of-thought RL (k1.5 §2.6, rollouts and training at up to 128k tokens) needs attention
whose memory grows linearly with length; "flash" provides that in plain JAX on every backend,
"splash" uses the Pallas kernel that ships with JAX on TPU.

Einsum letters:
  B batch, T query length, S key length, N query heads, K key/value heads, G = N // K query heads
  per kv head (grouped-query attention: query head n = k * G + g uses kv head k), H head dim,
  Q / C a query / key block, n the block index leading blocked arrays ([nq, B, Q, ...]).
"""

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from k15 import parallel

IMPLS = ("reference", "flash", "splash")
KV_LAYOUTS = ("BSKH", "BKSH")
K_LAYOUTS = KV_LAYOUTS + ("BKHS",)  # keys may also lie transposed, as the KV cache holds them

# A finite stand-in for -inf: exp(_NEG - _NEG) is 1, not NaN, so rows that see no key stay finite
# (their weights are zeroed by the mask, never by underflow alone).
_NEG = -1e30
_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    impl: str = "reference",
    block_size: int = 512,
    scale: float | None = None,
    kv_layout: str = "BSKH",
    k_layout: str | None = None,
) -> jax.Array:
  """Grouped-query attention with segment ids and position-based causality.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, with N % K == 0 (query head n uses kv head n // (N // K)); laid out
      as `k_layout` says.
    v: values, shaped like k.
    q_segment_ids: int32 [B, T]; 0 marks padding, which attends to nothing.
    kv_segment_ids: int32 [B, S]; 0 marks padding, which is never attended to.
    q_positions: int32 [B, T].
    kv_positions: int32 [B, S].
    impl: "reference" (einsum + mask, materializes [B, N, T, S] scores), "flash" (blockwise online
      softmax, O(T + S) memory in forward and backward; falls back to the reference when
      T * S <= block_size ** 2, e.g. single-token decode, where the score matrix is no larger than
      one block), or "splash" (TPU only, Pallas splash-attention kernel). Splash applies
      causality by index, which equals causality by position for self-attention (queries and
      keys are the same tokens) whose positions increase along the row within each segment, e.g.
      by 1 as in packed training rows and left-padded prompts; the caller must ensure that. When
      T != S (decode, chunked prefill against a cache) "splash" runs "flash" instead.
    block_size: query and key block length for "flash" and "splash" (a multiple of 128 for splash).
    scale: score scale; defaults to H ** -0.5.
    kv_layout: "BSKH", or "BKSH" (heads first, as the KV cache of
      k15.model.transformer.init_cache holds the values) for v, and for k unless k_layout says
      otherwise. The reference consumes every layout as it lies, which is what a decode step
      runs; "flash" and "splash" transpose to "BSKH" first, a copy that only a long query
      against a cache (chunked prefill) pays.
    k_layout: the keys' layout if it differs from kv_layout: one of those, or "BKHS", keys
      transposed, as the KV cache holds them. A decode step's scores q . k are then a plain
      [G, H] x [H, S] product per row and kv head; against [S, H] keys XLA:CPU computes them
      as [S, H] x [H, G], with G (e.g. 4) output columns: 68 vs 31 us per layer of a 16-row
      step against 320 cache-resident slots on one core.

  Returns:
    [B, T, N, H] in q.dtype. A query that sees no key returns zeros, with finite gradients.
  """
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"Unknown attention kv_layout={kv_layout!r}; valid: {', '.join(KV_LAYOUTS)}.")
  k_layout = k_layout or kv_layout
  if k_layout not in K_LAYOUTS:
    raise ValueError(f"Unknown attention k_layout={k_layout!r}; valid: {', '.join(K_LAYOUTS)}.")
  _check_inputs(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, kv_layout,
                k_layout)
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl={impl!r}; valid names: {', '.join(IMPLS)}.")
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"attention block_size must be a positive int, got {block_size!r}.")
  if scale is None:
    scale = q.shape[-1] ** -0.5
  scale = float(scale)
  seg_pos = (q_segment_ids, kv_segment_ids, q_positions, kv_positions)

  t, s = q.shape[1], kv_segment_ids.shape[1]
  if impl == "splash":
    platform = _platform()
    if platform != "tpu":
      raise ValueError(
          f"attention impl='splash' needs a TPU (Pallas TPU kernel), but the devices of the "
          f"mesh (or, without one, the JAX backend) are {platform!r}; use impl='flash' or "
          f"'reference'.")
    if t != s:
      impl = "flash"  # Decode / chunked prefill: splash's index causality does not apply.

  if impl == "reference" or (impl == "flash" and t * s <= block_size**2):
    return _reference(q, k, v, *seg_pos, scale=scale, kv_layout=kv_layout, k_layout=k_layout)
  k, v = jnp.einsum(f"{k_layout}->BSKH", k), jnp.einsum(f"{kv_layout}->BSKH", v)
  if impl == "splash":
    return _splash(q, k, v, q_segment_ids, kv_segment_ids, scale=scale, block_size=block_size)
  return _flash_padded(q, k, v, *seg_pos, scale=scale, block_size=block_size)


def _platform() -> str:
  """The platform the attention will run on: that of the active mesh's devices.

  Not `jax.default_backend()`: a program compiled ahead of time for TPU devices (k15.aot, on
  libtpu's compile-only devices) is traced on a host whose default backend is the CPU.
  """
  mesh = parallel.active_mesh()
  if mesh is not None:
    return mesh.devices.flat[0].platform
  return jax.default_backend()


def _check_inputs(q, k, v, q_seg, kv_seg, q_pos, kv_pos, kv_layout, k_layout) -> None:
  """Raises ValueError naming the argument whose shape or dtype does not fit."""
  if q.ndim != 4:
    raise ValueError(f"attention q must be [B, T, N, H], got shape {q.shape}.")
  b, t, n, h = q.shape
  dims = {}
  for name, x, layout, arg in (("k", k, k_layout, "k_layout"), ("v", v, kv_layout, "kv_layout")):
    if x.ndim != 4:
      raise ValueError(f"attention {name} must be [{', '.join(layout)}] ({arg}={layout!r}), got "
                       f"shape {x.shape}.")
    dims[name] = dict(zip(layout, x.shape))
  if dims["k"] != dims["v"]:
    raise ValueError(f"attention k {k.shape} [{', '.join(k_layout)}] and v {v.shape} "
                     f"[{', '.join(kv_layout)}] disagree in size.")
  kb, kh, s, kd = (dims["k"][a] for a in "BKSH")
  if kb != b or kd != h:
    raise ValueError(f"attention k {k.shape} [{', '.join(k_layout)}] does not match q {q.shape} "
                     f"in batch or head dim.")
  if n % kh:
    raise ValueError(f"attention needs query heads N={n} divisible by kv heads K={kh} (GQA).")
  for name, x, want in (("q_segment_ids", q_seg, (b, t)), ("kv_segment_ids", kv_seg, (b, s)),
                        ("q_positions", q_pos, (b, t)), ("kv_positions", kv_pos, (b, s))):
    if x.shape != tuple(want):
      raise ValueError(f"attention {name} must have shape {tuple(want)}, got {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"attention {name} must be an integer array, got dtype {x.dtype}.")


def _visible(q_seg, q_pos, kv_seg, kv_pos) -> jax.Array:
  """[B, Q], [B, C] ids and positions -> bool [B, Q, C]: which key each query may see."""
  same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
  return same & (kv_pos[:, None, :] <= q_pos[:, :, None])


# ----------------------------------------------------------------------------------------------
# Reference.


def _reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, scale, kv_layout, k_layout):
  b, t, n, h = q.shape
  kh = k.shape[k_layout.index("K")]
  # GQA by splitting query heads into [K, G], so k and v are never repeated.
  g = n // kh
  qg = q.reshape(b, t, kh, g, h)
  # Scores and softmax in float32 whatever the input dtype.
  if k_layout == "BKHS":
    # Each (row, kv head) is one [G * T, H] x [H, S] product. Written with a separate T axis,
    # XLA:CPU swapped the operands into a transposed [S, H] x [H, G] product that its fast
    # kernels do not take (5x slower).
    qm = jnp.einsum("BTKGH->BKGTH", qg).reshape(b, kh, g * t, h)
    s = jnp.einsum("BKMH,BKHS->BKMS", qm, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, kh, g, t, -1) * scale
  else:
    s = jnp.einsum(f"BTKGH,{k_layout}->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  mask = _visible(q_seg, q_pos, kv_seg, kv_pos)[:, None, None]  # [B, 1, 1, T, S]
  s = jnp.where(mask, s, _NEG)
  m = lax.stop_gradient(s.max(axis=-1, keepdims=True))  # Softmax is invariant to the shift.
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  l = p.sum(axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)  # A row with no visible key is all zeros.
  # Heads-first output, transposed after: asked for "BTKGH" directly, XLA:CPU lays the dot out
  # as v^T p and runs it 2.4x slower (0.47 vs 1.12 ms per layer of a 32-row decode step against
  # 320 cache slots; training's forward and backward are no slower).
  out = jnp.einsum(f"BKGTS,{kv_layout}->BKGTH", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return jnp.einsum("BKGTH->BTKGH", out).reshape(b, t, n, h).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Flash-style: online softmax over key blocks (forward), FlashAttention-2 recomputation (backward).


def _flash_padded(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, scale, block_size):
  """Pads T and S to whole blocks (padding has segment id 0) and runs `_flash`."""
  t, s = q.shape[1], k.shape[1]
  bq, bk = _block_length(t, block_size), _block_length(s, block_size)
  pad_t, pad_s = -t % bq, -s % bk

  def pad(x, n):
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))

  out = _flash(pad(q, pad_t), pad(k, pad_s), pad(v, pad_s), pad(q_seg, pad_t), pad(kv_seg, pad_s),
               pad(q_pos, pad_t), pad(kv_pos, pad_s), scale, bq, bk)
  return out[:, :t]


def _block_length(length: int, block_size: int) -> int:
  """The shortest block (at most block_size) that covers `length` in as few blocks as block_size.

  Padding a 600-token sequence to two blocks of 304 rather than 512 halves the wasted work, and a
  short query (decode, T=1) gets a block of its own length.
  """
  num_blocks = -(-length // block_size)
  block = -(-length // num_blocks)
  if num_blocks > 1:
    block = min(block_size, -(-block // 8) * 8)  # Whole sublanes (8 rows) on TPU and GPU.
  return block


def _to_blocks(x, size):
  """[B, L, ...] -> [L // size, B, size, ...]: the block index leads, for scan and indexing."""
  x = x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _from_blocks(x):
  """Inverse of `_to_blocks`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _block_summary(seg, pos, size):
  """Per block and batch row: (min, max) nonzero segment id, (min, max) position of real tokens.

  Used to skip block pairs that cannot contain a visible (query, key) pair, which saves about
  half the work for causal attention. The test is conservative: it never skips a needed block.
  """
  seg, pos = _to_blocks(seg, size), _to_blocks(pos, size)  # [nb, B, size]
  real = seg != 0
  return (jnp.where(real, seg, _INT_MAX).min(-1), jnp.where(real, seg, _INT_MIN).max(-1),
          jnp.where(real, pos, _INT_MAX).min(-1), jnp.where(real, pos, _INT_MIN).max(-1))


def _may_see(q_sum, kv_sum) -> jax.Array:
  """Whether some query of a query block may see some key of a key block, in any batch row."""
  q_seg_min, q_seg_max, _, q_pos_max = q_sum
  kv_seg_min, kv_seg_max, kv_pos_min, _ = kv_sum
  overlap = jnp.maximum(q_seg_min, kv_seg_min) <= jnp.minimum(q_seg_max, kv_seg_max)
  return jnp.any(overlap & (kv_pos_min <= q_pos_max))


def _split_heads(q, kh):
  """[B, T, N, H] -> [B, T, K, G, H]."""
  b, t, n, h = q.shape
  return q.reshape(b, t, kh, n // kh, h)


def _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk):
  """Padded inputs -> (out [B, T, N, H] in q.dtype, log-sum-exp [nq, B, K, G, Q] float32)."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  qb = _to_blocks(_split_heads(q, kh), bq)  # [nq, B, Q, K, G, H]
  kb, vb = _to_blocks(k, bk), _to_blocks(v, bk)  # [nk, B, C, K, H]
  q_segb, q_posb = _to_blocks(q_seg, bq), _to_blocks(q_pos, bq)  # [nq, B, Q]
  kv_segb, kv_posb = _to_blocks(kv_seg, bk), _to_blocks(kv_pos, bk)  # [nk, B, C]
  q_sum, kv_sum = _block_summary(q_seg, q_pos, bq), _block_summary(kv_seg, kv_pos, bk)
  nk = kb.shape[0]

  def query_block(xs):
    qi, qsi, qpi, qsum = xs

    def key_block(j, carry):
      def compute(carry):
        o, m, l = carry  # [B, K, G, Q, H], [B, K, G, Q], [B, K, G, Q]
        s = jnp.einsum("BQKGH,BCKH->BKGQC", qi, kb[j], preferred_element_type=jnp.float32)
        mask = _visible(qsi, qpi, kv_segb[j], kv_posb[j])[:, None, None]  # [B, 1, 1, Q, C]
        s = jnp.where(mask, s * scale, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)  # Rescales what was accumulated under the old maximum.
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("BKGQC,BCKH->BKGQH", p.astype(v.dtype), vb[j],
                        preferred_element_type=jnp.float32)
        return alpha[..., None] * o + pv, m_new, l

      kv_sum_j = jax.tree.map(lambda x: x[j], kv_sum)
      return lax.cond(_may_see(qsum, kv_sum_j), compute, lambda c: c, carry)

    init = (jnp.zeros((b, kh, g, bq, h), jnp.float32), jnp.full((b, kh, g, bq), _NEG, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32))
    o, m, l = lax.fori_loop(0, nk, key_block, init)
    seen = l > 0.0
    o = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return jnp.einsum("BKGQH->BQKGH", o).astype(q.dtype), lse

  ob, lse = lax.map(query_block, (qb, q_segb, q_posb, q_sum))
  return _from_blocks(ob).reshape(b, t, n, h), lse


def _flash_backward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse, dout, scale, bq, bk):
  """FlashAttention-2 backward: one pass over key blocks, recomputing probabilities from lse.

  The outer scan runs over key blocks and accumulates dk, dv for its block; the inner loop runs
  over query blocks and adds each block's share into a [T]-sized dq carried through the scan.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qb = _to_blocks(_split_heads(q, kh), bq)  # [nq, B, Q, K, G, H]
  dob = _to_blocks(_split_heads(dout, kh), bq)
  ob = _to_blocks(_split_heads(out, kh), bq)
  # D_t = sum_h dout * out, the softmax-Jacobian correction: dS = P * (dP - D).
  dd = jnp.einsum("nBQKGH,nBQKGH->nBKGQ", dob.astype(jnp.float32), ob.astype(jnp.float32))
  q_segb, q_posb = _to_blocks(q_seg, bq), _to_blocks(q_pos, bq)
  q_sum, kv_sum = _block_summary(q_seg, q_pos, bq), _block_summary(kv_seg, kv_pos, bk)
  xs = (_to_blocks(k, bk), _to_blocks(v, bk), _to_blocks(kv_seg, bk), _to_blocks(kv_pos, bk),
        kv_sum)
  nq = qb.shape[0]

  def key_block(dq, xs):
    kj, vj, ksj, kpj, kv_sum_j = xs

    def query_block(i, carry):
      def compute(carry):
        dq, dk, dv = carry
        qi, doi = qb[i], dob[i]
        s = jnp.einsum("BQKGH,BCKH->BKGQC", qi, kj, preferred_element_type=jnp.float32)
        mask = _visible(q_segb[i], q_posb[i], ksj, kpj)[:, None, None]
        p = jnp.where(mask, jnp.exp(s * scale - lse[i][..., None]), 0.0)  # [B, K, G, Q, C]
        dv = dv + jnp.einsum("BKGQC,BQKGH->BCKH", p.astype(dout.dtype), doi,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("BQKGH,BCKH->BKGQC", doi, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - dd[i][..., None]) * scale
        dk = dk + jnp.einsum("BKGQC,BQKGH->BCKH", ds.astype(q.dtype), qi,
                             preferred_element_type=jnp.float32)
        dqi = jnp.einsum("BKGQC,BCKH->BQKGH", ds.astype(k.dtype), kj,
                         preferred_element_type=jnp.float32)
        return dq.at[i].add(dqi), dk, dv

      q_sum_i = jax.tree.map(lambda x: x[i], q_sum)
      return lax.cond(_may_see(q_sum_i, kv_sum_j), compute, lambda c: c, carry)

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dq, dk, dv = lax.fori_loop(0, nq, query_block, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), xs)
  dq = _from_blocks(dq).reshape(b, t, n, h).astype(q.dtype)
  return dq, _from_blocks(dk).astype(k.dtype), _from_blocks(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk):
  """Flash attention on inputs padded to whole blocks of bq queries and bk keys."""
  return _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk):
  out, lse = _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, scale, bq, bk)
  # Only O(T + S) residuals: the inputs, the output and one log-sum-exp per query and head.
  return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _flash_bwd(scale, bq, bk, res, dout):
  q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
  dq, dk, dv = _flash_backward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse, dout,
                               scale, bq, bk)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Splash (TPU Pallas kernel shipped with JAX).


# The Pallas TPU modules are imported where used, so that importing this file never depends on
# them.


def _splash_kernel(num_heads: int, length: int, block: int, interpret: bool):
  """The causal splash kernel for [N, L, H] queries, [K, L, H] keys.

  Built anew at every call: the kernel holds its mask tables as arrays, which are tracers when
  it is built under a trace (inside shard_map); a cached kernel would leak them into the next.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, q_seg, kv_seg, *, scale, block_size, interpret=False):
  """Causal splash attention by index, with GQA and segment ids. Needs T == S.

  Under `parallel.use_mesh` the kernel runs inside `jax.shard_map` over the batch and head axes
  of the mesh (XLA cannot partition a Mosaic kernel by itself), each device building it for its
  own rows and heads. The length axis is gathered: every query of a row needs all its keys.
  `interpret=True` runs the Pallas kernel in the interpreter, which lets tests check this wrapper
  off TPU; `attend` itself refuses meshes of non-TPU devices.
  """
  mesh = parallel.active_mesh()
  local = functools.partial(_splash_local, scale=scale, block_size=block_size,
                            interpret=interpret)
  if mesh is None or mesh.size == 1:
    return local(q, k, v, q_seg, kv_seg)
  spec = parallel.logical_to_spec(("batch", None, "act_q_heads", None), q.shape, mesh)
  batch_axes, head_axes = spec[0], spec[2]
  shards = math.prod(mesh.shape[a] for a in _axes(head_axes))
  kh = k.shape[2]
  if kh % shards:
    # Fewer kv heads than head shards (2 kv heads on a tensor axis of 4): repeat each kv head r
    # times, the fewest that split evenly. Query head n used kv head n // G; with K * r kv heads
    # it uses n // (G / r), a copy of the same head, so each shard holds the kv heads of its
    # own query heads. r divides G whenever the query heads split over the shards.
    k, v = (jnp.repeat(x, shards // math.gcd(kh, shards), axis=2) for x in (k, v))
  heads = P(batch_axes, None, head_axes, None)
  rows = P(batch_axes, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows, rows),
                       out_specs=heads, check_vma=False)(q, k, v, q_seg, kv_seg)


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, 'tensor' or ('data', 'fsdp')) as a tuple of mesh axes."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _splash_local(q, k, v, q_seg, kv_seg, *, scale, block_size, interpret):
  """`_splash` on one device's arrays: the kernel is built for the heads it is given."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  b, t, n, h = q.shape
  # Splash computes key blocks in lanes of 128; pad the length to whole blocks (segment id 0).
  block = min(block_size, -(-t // 128) * 128)
  if block % 128:
    raise ValueError(f"attention impl='splash' needs block_size a multiple of 128, got "
                     f"{block_size}.")
  pad = -t % block
  length = t + pad

  def to_heads_first(x):  # [B, T, N, H] -> [B, N, T', H]
    return jnp.einsum("BTNH->BNTH", jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]))

  # The kernel takes no scale; fold it into q in float32 before casting back.
  qs = to_heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
  ks, vs = to_heads_first(k), to_heads_first(v)
  q_seg_p = jnp.pad(q_seg, [(0, 0), (0, pad)])
  kv_seg_p = jnp.pad(kv_seg, [(0, 0), (0, pad)])
  kernel = _splash_kernel(n, length, block, interpret)

  def one_row(qr, kr, vr, qsr, ksr):
    return kernel(qr, kr, vr, segment_ids=splash.SegmentIds(q=qsr, kv=ksr))

  out = jax.vmap(one_row)(qs, ks, vs, q_seg_p, kv_seg_p)  # [B, N, T', H]
  out = jnp.einsum("BNTH->BTNH", out)[:, :t]
  # Splash lets padding (segment 0) attend to padding; our contract is zeros for padding queries.
  return jnp.where((q_seg != 0)[:, :, None, None], out, 0).astype(q.dtype)
