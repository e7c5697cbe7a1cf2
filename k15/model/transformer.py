"""A decoder-only transformer of the Llama / Qwen2 family, in Flax NNX.

One module serves training (full sequences, optionally packed with segment ids) and sampling
(prefill and single-token decode against a KV cache), so the sampler's log-probs and the
trainer's log-probs come from the same code.

Einsum letters:
  B batch          T query length     S key length (cache length when decoding)
  D embed          N query heads      K key/value heads     H head dim
  F MLP hidden     V vocab

Every parameter carries logical axis names as the `axes` metadata of its nnx.Param
('vocab', 'embed', 'q_heads', 'kv_heads', 'head_dim', 'mlp', 'norm'); k15.parallel maps them
onto mesh axes with the rules in the config. Activations are constrained by name
('batch', 'length', 'act_embed', ...) at the few places that fix the layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from k15 import parallel
from k15.model import attention

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str | jnp.dtype) -> jnp.dtype:
  """'bfloat16' -> jnp.bfloat16; dtypes pass through."""
  if isinstance(name, str):
    if name not in _DTYPES:
      raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the transformer; the names follow the config's `model` block."""
  vocab_size: int = 512            # V
  embed_dim: int = 128             # D, model width
  num_layers: int = 2
  num_heads: int = 4               # N, query heads
  num_kv_heads: int = 2            # K, key/value heads; N % K == 0 (GQA)
  head_dim: int = 32               # H; need not equal D // N
  mlp_dim: int = 256               # F, SwiGLU hidden width
  rope_theta: float = 10_000.0     # RoPE base (Qwen2.5: 1e6, paper §2.6 uses 1e6 too)
  norm_eps: float = 1e-6           # RMSNorm epsilon
  tie_embeddings: bool = True      # output head shares the token embedding
  qkv_bias: bool = False           # Qwen2 has q/k/v biases, Llama does not
  param_dtype: str = "float32"     # storage dtype of the weights
  dtype: str = "float32"           # compute dtype (bfloat16 on TPU); logits are always float32
  attention_impl: str = "reference"  # 'reference' | 'flash' | 'splash' (k15.model.attention)
  attention_block_size: int = 512  # key/query block of the flash-style attention
  remat: str = "none"              # 'none' | 'full' | 'dots': rematerialization of each block

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat={self.remat!r}; expected 'none', 'full' or 'dots'")
    to_dtype(self.param_dtype)
    to_dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg: Any) -> "ModelConfig":
    """Builds from an ml_collections ConfigDict (or dict); unknown keys are an error."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
    return cls(**d)

  def num_params(self) -> int:
    D, N, K, H, F, V = (self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim,
                        self.mlp_dim, self.vocab_size)
    per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
    if self.qkv_bias:
      per_layer += (N + 2 * K) * H
    return V * D * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + D


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None, init: str = "normal"):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init="ones")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    # Normalize in float32 and cast back before the scale, as transformers' Llama/Qwen2 do.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_angles(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """(cos, sin) of the rotary angles at `positions` [B, T], each float32 [B, T, 1, H/2]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, T, H/2]
  return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def rope(x: Array, angles: tuple[Array, Array]) -> Array:
  """Rotary embedding, 'rotate half' layout (the layout of Llama/Qwen2 checkpoints).

  x: [B, T, n, H]; angles: `rope_angles(positions, H, theta)`.
  """
  cos, sin = angles
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = to_dtype(cfg.param_dtype)
    self.cfg = cfg
    self.q = _param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), pdt, D ** -0.5)
    self.k = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt, D ** -0.5)
    self.v = _param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pdt, D ** -0.5)
    self.o = _param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), pdt, (N * H) ** -0.5)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (N, H), ("q_heads", "head_dim"), pdt, init="zeros")
      self.k_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), pdt, init="zeros")
      self.v_bias = _param(rngs, (K, H), ("kv_heads", "head_dim"), pdt, init="zeros")

  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, angles=None):
    """-> (y [B, T, D], None or this layer's updated (k, v) cache).

    angles: `rope_angles(positions, ...)` if computed ahead (the model computes them once for
    all layers). cache: None, or this layer's {"k": [B, K, H, S],
    "v": [B, K, S, H], "segment_ids", "positions": [B, S]} with segment ids and positions
    already holding this step's tokens at cache_index.
    """
    cfg = self.cfg
    dt = x.dtype
    if angles is None:
      angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    q, k, v = self.project(x, angles)

    if cache is None:
      kv_k, kv_v, kv_seg, kv_pos, kv_layout, k_layout = k, v, segment_ids, positions, "BSKH", None
      new_kv = None
    else:
      # Write this step's keys/values in place at slot cache_index of this layer's cache (a
      # decode step touches one slot per row and head, not the whole cache), then attend over
      # the whole cache as it lies: kv heads before length, so each (row, head)'s values are one
      # contiguous [S, H] matrix and its keys one [H, S] matrix (see `init_cache`).
      new_kv = (
          jax.lax.dynamic_update_slice(cache["k"], jnp.einsum("BTKH->BKHT", k).astype(
              cache["k"].dtype), (0, 0, 0, cache_index)),
          jax.lax.dynamic_update_slice(cache["v"], jnp.einsum("BTKH->BKTH", v).astype(
              cache["v"].dtype), (0, 0, cache_index, 0)))
      kv_k, kv_v = (c.astype(dt) for c in new_kv)
      kv_seg, kv_pos, kv_layout, k_layout = (cache["segment_ids"], cache["positions"], "BKSH",
                                             "BKHS")

    out = attention.attend(
        q, kv_k, kv_v, q_segment_ids=segment_ids, kv_segment_ids=kv_seg,
        q_positions=positions, kv_positions=kv_pos, impl=cfg.attention_impl,
        block_size=cfg.attention_block_size, kv_layout=kv_layout, k_layout=k_layout)  # [B,T,N,H]
    return self.output(out), new_kv

  def project(self, x: Array, angles: tuple[Array, Array]) -> tuple[Array, Array, Array]:
    """x [B, T, D] -> rotated q [B, T, N, H], rotated k and v [B, T, K, H].

    Also used on its own by decode loops that keep keys and values elsewhere (the sampler's
    paged cache).
    """
    cfg = self.cfg
    dt = x.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q[...].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k[...].astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v[...].astype(dt))
    if cfg.qkv_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    q = rope(q, angles)
    k = rope(k, angles)
    q = parallel.constrain(q, ("batch", "length", "act_q_heads", "head_dim"))
    k = parallel.constrain(k, ("batch", "length", "act_kv_heads", "head_dim"))
    return q, k, v

  def output(self, out: Array) -> Array:
    """The attention output [B, T, N, H] -> [B, T, D]."""
    # One contraction over the N * H concatenated heads: as "BTNH,NHD->BTD", XLA:CPU re-laid
    # out the [N, H, D] weight (a copy of it every decode step) to contract H-major.
    B, T, N, H = out.shape
    return jnp.einsum("BTF,FD->BTD", out.reshape(B, T, N * H),
                      self.o[...].reshape(N * H, -1).astype(out.dtype))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F = cfg.embed_dim, cfg.mlp_dim
    pdt = to_dtype(cfg.param_dtype)
    self.gate = _param(rngs, (D, F), ("embed", "mlp"), pdt, D ** -0.5)
    self.up = _param(rngs, (D, F), ("embed", "mlp"), pdt, D ** -0.5)
    self.down = _param(rngs, (F, D), ("mlp", "embed"), pdt, F ** -0.5)

  def __call__(self, x):
    dt = x.dtype
    g = jnp.einsum("BTD,DF->BTF", x, self.gate[...].astype(dt))
    u = jnp.einsum("BTD,DF->BTF", x, self.up[...].astype(dt))
    h = parallel.constrain(jax.nn.silu(g) * u, ("batch", "length", "act_mlp"))
    return jnp.einsum("BTF,FD->BTD", h, self.down[...].astype(dt))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = to_dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pdt, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pdt, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, angles=None):
    h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, cache, cache_index, angles)
    x = x + h
    x = x + self.mlp(self.mlp_norm(x))
    return parallel.constrain(x, ("batch", "length", "act_embed")), new_kv


class Transformer(nnx.Module):
  """`logits = model(tokens)`: int32 [B, T] -> float32 [B, T, V].

  Optional `positions` and `segment_ids` ([B, T] int32) support packed sequences and left
  padding: segment id 0 marks padding, and a token attends to earlier positions of its own
  segment only. With `cache` (from `init_cache`) and `cache_index` the call writes this
  step's keys/values into the cache at that slot and returns `(logits, cache)`. `angles`
  may pass `rope_angles(positions, ...)` computed ahead (the sampler computes a whole
  generation's before its decode loop, which otherwise evaluates sin and cos in every layer
  of every step).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = to_dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pdt,
                        cfg.embed_dim ** -0.5)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), pdt,
                            cfg.embed_dim ** -0.5)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, cache: dict | None = None,
               cache_index: Array | int | None = None,
               angles: tuple[Array, Array] | None = None):
    cfg = self.cfg
    dt = to_dtype(cfg.dtype)
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    if cache is not None:
      if cache_index is None:
        raise ValueError("cache_index is required when a cache is given")
      cache = dict(cache)
      cache["segment_ids"] = jax.lax.dynamic_update_slice_in_dim(
          cache["segment_ids"], segment_ids.astype(jnp.int32), cache_index, axis=1)
      cache["positions"] = jax.lax.dynamic_update_slice_in_dim(
          cache["positions"], positions.astype(jnp.int32), cache_index, axis=1)

    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)                 # [B, T, D]
    x = parallel.constrain(x, ("batch", "length", "act_embed"))

    if angles is None:
      angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
    new_k, new_v = [], []
    for i, block in enumerate(self.layers):
      if cache is not None:
        layer_cache = dict(cache, k=cache["k"][i], v=cache["v"][i])
        x, (k, v) = block(x, positions, segment_ids, layer_cache, cache_index, angles)
        new_k.append(k)
        new_v.append(v)
      elif cfg.remat != "none":
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                  if cfg.remat == "dots" else None)
        x, _ = nnx.remat(lambda blk, x, pos, seg, ang: blk(x, pos, seg, angles=ang),
                         policy=policy)(block, x, positions, segment_ids, angles)
      else:
        x, _ = block(x, positions, segment_ids, angles=angles)

    logits = self.logits(x)
    if cache is None:
      return logits
    return logits, dict(cache, k=tuple(new_k), v=tuple(new_v))

  def logits(self, x: Array) -> Array:
    """The last block's output [B, T, D] -> float32 logits [B, T, V] (final norm, head)."""
    x = self.final_norm(x)
    # Logits and everything after them (softmax, log-probs) in float32.
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("BTD,DV->BTV", x.astype(jnp.float32), head.astype(jnp.float32))
    return parallel.constrain(logits, ("batch", "length", "act_vocab"))


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty KV cache: every slot has segment id 0, so nothing in it is attended to.

  k: one [B, K, H, S] array per layer; v: one [B, K, S, H] array per layer (tuples of L);
  segment_ids, positions: [B, S]. One array per layer, rather than one stacked [L, ...] array,
  and kv heads before length: a decode step then updates each layer's arrays in place and
  attention reads them as they lie, where slicing a layer out of a stacked cache made XLA copy
  and re-lay it out every step (38% of a CPU decode step at 32 rows x 320 slots). Keys are
  stored transposed so that a step's scores are a plain [G, H] x [H, S] product per row and
  kv head (XLA:CPU computed q . k against [S, H] keys about 2x slower).
  """
  dtype = to_dtype(dtype or cfg.dtype)
  K, H, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
  return {
      "k": tuple(jnp.zeros((batch, K, H, length), dtype) for _ in range(L)),
      "v": tuple(jnp.zeros((batch, K, length, H), dtype) for _ in range(L)),
      "segment_ids": jnp.zeros((batch, length), jnp.int32),
      "positions": jnp.zeros((batch, length), jnp.int32),
  }


# Logical axes of `init_cache`'s arrays (for "k" and "v": of each layer's array).
CACHE_AXES = {
    "k": ("batch", "kv_heads", "head_dim", "cache_length"),
    "v": ("batch", "kv_heads", "cache_length", "head_dim"),
    "segment_ids": ("batch", "cache_length"),
    "positions": ("batch", "cache_length"),
}
