"""A decoder-only transformer of the Llama / Qwen2 / Qwen3 family (dense or mixture-of-experts), in
Flax NNX.

One module serves training (full sequences, optionally packed with segment ids) and sampling
(prefill and single-token decode against a KV cache), so the sampler's log-probs and the
trainer's log-probs come from the same code.

Einsum letters:
  B batch          T query length     S key length (cache length when decoding)
  D embed          N query heads      K key/value heads     H head dim
  F MLP hidden     V vocab            E experts             R rows routed (tokens x top-k)

Every parameter carries logical axis names as the `axes` metadata of its nnx.Param
('vocab', 'embed', 'q_heads', 'kv_heads', 'head_dim', 'mlp', 'norm', 'expert'); k15.parallel maps them
onto mesh axes with the rules in the config. Activations are constrained by name
('batch', 'length', 'act_embed', ...) at the few places that fix the layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
  # RoPE scaling as transformers' `rope_scaling` entries, (key, value) pairs (a dict is accepted and
  # stored sorted, so the config stays hashable): () is plain RoPE; rope_type 'llama3' (factor,
  # low_freq_factor, high_freq_factor, original_max_position_embeddings) or 'yarn' (factor,
  # original_max_position_embeddings, optional beta_fast, beta_slow, attention_factor, mscale,
  # mscale_all_dim, truncate).
  rope_scaling: tuple = ()
  norm_eps: float = 1e-6           # RMSNorm epsilon
  tie_embeddings: bool = True      # output head shares the token embedding
  qkv_bias: bool = False           # Qwen2 has q/k/v biases, Llama does not
  qk_norm: bool = False            # Qwen3: RMSNorm of each q and k head before RoPE
  num_experts: int = 0             # E; 0 = a dense MLP in every layer (Qwen3-MoE: 128)
  experts_per_token: int = 2       # top-k experts that process each token
  moe_mlp_dim: int = 0             # SwiGLU hidden width of each expert
  norm_topk_prob: bool = True      # renormalise the top-k router probabilities to sum to 1
  moe_dense_layers: tuple = ()     # indices of layers that keep a dense MLP of width mlp_dim
  moe_dispatch: str = "dense"      # 'dense' (one-hot, every expert on every token) | 'ragged'
  # Weight of `load_balancing_loss` in the SFT and RL losses (transformers' router_aux_loss_coef,
  # kept here, beside the experts it balances, so both losses read one key; 0 = reported only).
  router_aux_weight: float = 0.0
  param_dtype: str = "float32"     # storage dtype of the weights
  dtype: str = "float32"           # compute dtype (bfloat16 on TPU); logits are always float32
  attention_impl: str = "reference"  # 'reference' | 'flash' | 'splash' (k15.model.attention)
  attention_block_size: int = 512  # key/query block of the flash-style attention
  remat: str = "none"              # 'none' | 'full' | 'dots': rematerialization of each block
  logits_chunk: int = 0            # log-probs: head in tiles of this many tokens (0: whole rows)
  # Layers under one scan (parameters and KV cache stacked on a leading 'layers' axis): one
  # compiled layer body, so compile time stays flat in depth. A model whose layers differ (MoE
  # with `moe_dense_layers`) runs the Python loop instead (`scan_fallback`).
  scan_layers: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads}")
    if self.logits_chunk < 0:
      raise ValueError(f"model.logits_chunk={self.logits_chunk} must be >= 0 (0: whole rows)")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat={self.remat!r}; expected 'none', 'full' or 'dots'")
    to_dtype(self.param_dtype)
    to_dtype(self.dtype)
    scaling = self.rope_scaling
    if hasattr(scaling, "items"):
      scaling = scaling.items()
    object.__setattr__(self, "rope_scaling", tuple(sorted((str(k), v) for k, v in scaling)))
    object.__setattr__(self, "moe_dense_layers", tuple(int(i) for i in self.moe_dense_layers))
    check_rope_scaling(dict(self.rope_scaling))
    if self.num_experts:
      if not 0 < self.experts_per_token <= self.num_experts:
        raise ValueError(f"model.experts_per_token={self.experts_per_token} must be in "
                         f"[1, model.num_experts={self.num_experts}]")
      if self.moe_mlp_dim <= 0:
        raise ValueError(f"model.num_experts={self.num_experts} needs model.moe_mlp_dim > 0")
    if self.moe_dispatch not in ("dense", "ragged"):
      raise ValueError(f"model.moe_dispatch={self.moe_dispatch!r}; expected 'dense' or 'ragged'")

  @property
  def scan_fallback(self) -> str:
    """Why `scan_layers` is not honoured ('' when it is, or when it is off)."""
    if self.scan_layers and self.num_experts and self.moe_dense_layers:
      return (f"model.moe_dense_layers={self.moe_dense_layers}: dense and MoE layers have "
              "different parameters, which one scanned layer body cannot hold; the layers run "
              "as a Python loop")
    return ""

  @property
  def scanned(self) -> bool:
    """The layers run under one scan with stacked parameters and a stacked KV cache."""
    return self.scan_layers and not self.scan_fallback

  def is_moe_layer(self, i: int) -> bool:
    return self.num_experts > 0 and i not in self.moe_dense_layers

  @property
  def family(self) -> str:
    """The transformers architecture these hyperparameters describe (see k15.model.hf)."""
    if self.num_experts:
      return "qwen3_moe"
    if self.qk_norm:
      return "qwen3"
    return "qwen2" if self.qkv_bias else "llama"

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
    per_layer = D * (N + 2 * K) * H + N * H * D + 2 * D
    if self.qkv_bias:
      per_layer += (N + 2 * K) * H
    if self.qk_norm:
      per_layer += 2 * H
    mlp = sum(self.num_experts * (3 * D * self.moe_mlp_dim + D) if self.is_moe_layer(i)
              else 3 * D * F for i in range(self.num_layers))
    return V * D * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + mlp + D


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


ROPE_TYPES = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_YARN_OPTIONAL = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
                  "truncate")


def check_rope_scaling(scaling: dict) -> None:
  """Refuses a RoPE scaling k15 does not compute, naming it and the supported ones."""
  if not scaling:
    return
  rope_type = scaling.get("rope_type")
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope_type {rope_type!r} is not supported; k15 computes plain RoPE "
                     f"('default') and the scalings {sorted(ROPE_TYPES)}")
  missing = [k for k in ROPE_TYPES[rope_type] if scaling.get(k) is None]
  if missing:
    raise ValueError(f"rope_type {rope_type!r} needs {missing} (got {scaling})")
  known = set(ROPE_TYPES[rope_type]) | {"rope_type"}
  if rope_type == "yarn":
    known |= set(_YARN_OPTIONAL)
  unknown = sorted(set(scaling) - known)
  if unknown:
    raise ValueError(f"rope_type {rope_type!r}: unknown keys {unknown}; known: {sorted(known)}")


def _scaled_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[Array, float]:
  """Inverse frequencies [H/2] and cos/sin factor of a scaled RoPE, as transformers computes them
  (modeling_rope_utils: `_compute_llama3_parameters`, `_compute_yarn_parameters`)."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  factor = float(scaling["factor"])
  original = float(scaling["original_max_position_embeddings"])
  if scaling["rope_type"] == "llama3":
    # Wavelengths shorter than original / high_freq_factor keep their frequency, those longer than
    # original / low_freq_factor are slowed by `factor`, and the band between is interpolated.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    inv_freq = 1.0 / (theta ** exponents)
    wavelen = 2 * math.pi / inv_freq
    slowed = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * slowed / factor + smooth * slowed
    medium = ~(wavelen < original / high) & ~(wavelen > original / low)
    return jnp.where(medium, smoothed, slowed), 1.0

  # YaRN: dimensions that turn fewer than beta_slow times over the original context are
  # interpolated (divided by `factor`), those that turn more than beta_fast times keep their
  # frequency, with a linear ramp between; cos and sin are scaled by the attention factor.
  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = scaling.get("attention_factor")
  if attention_factor is None:
    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
  beta_fast = scaling.get("beta_fast") or 32
  beta_slow = scaling.get("beta_slow") or 1

  def correction_dim(rotations):
    return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if scaling.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001
  pos_freqs = theta ** exponents
  ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
  keep = 1 - ramp
  inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
  return inv_freq, float(attention_factor)


def rope_angles(positions: Array, head_dim: int, theta: float,
                scaling: tuple | dict = ()) -> tuple[Array, Array]:
  """(cos, sin) of the rotary angles at `positions` [B, T], each float32 [B, T, 1, H/2].

  scaling: `ModelConfig.rope_scaling`; a YaRN scaling's attention factor multiplies cos and sin,
  which scales q . k by its square as transformers does.
  """
  scaling = dict(scaling)
  factor = 1.0
  if scaling:
    check_rope_scaling(scaling)
    inv_freq, factor = _scaled_inv_freq(head_dim, theta, scaling)
  else:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, T, H/2]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  return cos, sin


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
    if cfg.qk_norm:
      self.q_norm = RMSNorm(H, cfg.norm_eps, pdt, rngs=rngs)
      self.k_norm = RMSNorm(H, cfg.norm_eps, pdt, rngs=rngs)

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
      angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q, k, v = self.project(x, angles)

    new_kv = None
    if cache is not None:
      # Write this step's keys/values in place at slot cache_index of this layer's cache (a
      # decode step touches one slot per row and head, not the whole cache).
      new_k = jnp.einsum("BTKH->BKHT", k).astype(cache["k"].dtype)
      new_v = jnp.einsum("BTKH->BKTH", v).astype(cache["v"].dtype)
      new_kv = (jax.lax.dynamic_update_slice(cache["k"], new_k, (0, 0, 0, cache_index)),
                jax.lax.dynamic_update_slice(cache["v"], new_v, (0, 0, cache_index, 0)))
    if cache is None or starts_cache(cache_index):
      # Without a cache, or filling one from slot 0 (a prefill): the tokens attend to one
      # another only, with as many keys as queries, the shape the splash kernel takes
      # (attending over the cache's S slots would give the same values, S - T of them masked).
      kv_k, kv_v, kv_seg, kv_pos, kv_layout, k_layout = k, v, segment_ids, positions, "BSKH", None
    else:
      # Attend over the whole cache as it lies: kv heads before length, so each (row, head)'s
      # values are one contiguous [S, H] matrix and its keys one [H, S] matrix (`init_cache`).
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
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
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


class MoE(nnx.Module):
  """Mixture of SwiGLU experts (Qwen3-MoE): a softmax router picks the top-k experts of each token
  and the output is their gate-weighted sum. No token is dropped (no capacity limit).

  Experts are stacked on a leading 'expert' axis, which the sharding rules place on the 'expert'
  mesh axis: each device then runs its own experts and the weighted sum over experts is reduced
  across that axis. Two dispatches compute the same thing (`ModelConfig.moe_dispatch`):
  'dense' runs every expert on every token and weights by a one-hot combine matrix (E / k times
  the FLOPs, but plain einsums); 'ragged' sorts the token x top-k rows by expert and runs
  grouped matmuls (`jax.lax.ragged_dot`), only the chosen experts' FLOPs.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F, E = cfg.embed_dim, cfg.moe_mlp_dim, cfg.num_experts
    pdt = to_dtype(cfg.param_dtype)
    self.cfg = cfg
    self.router = _param(rngs, (D, E), ("embed", None), pdt, D ** -0.5)
    self.gate = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), pdt, D ** -0.5)
    self.up = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), pdt, D ** -0.5)
    self.down = _param(rngs, (E, F, D), ("expert", "mlp", "embed"), pdt, F ** -0.5)

  def route(self, x: Array, expert_ids: Array | None = None) -> tuple[Array, Array, Array]:
    """-> (router logits [B, T, E] float32, expert ids [B, T, k] int32, weights [B, T, k]).

    expert_ids: route by these (replay) instead of the router's own top-k; the weights are still
    the router's probabilities at those experts, so gradients reach the router either way. A
    token whose first id is negative (nothing recorded: padding, or a response's last token,
    which the sampler never feeds back) takes the router's own top-k.
    """
    cfg = self.cfg
    logits = jnp.einsum("BTD,DE->BTE", x, self.router[...].astype(x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, own = _top_k(probs, cfg.experts_per_token)
    if expert_ids is not None:
      expert_ids = expert_ids.astype(jnp.int32)
      expert_ids = jnp.where(expert_ids[..., :1] >= 0, expert_ids, own)
      weights = jnp.take_along_axis(probs, expert_ids, axis=-1)
    else:
      expert_ids = own
    if cfg.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits.astype(jnp.float32), expert_ids.astype(jnp.int32), weights.astype(x.dtype)

  def __call__(self, x: Array, expert_ids: Array | None = None):
    """-> (y [B, T, D], router logits [B, T, E], expert ids [B, T, k])."""
    dt = x.dtype
    logits, expert_ids, weights = self.route(x, expert_ids)
    gate, up, down = (w[...].astype(dt) for w in (self.gate, self.up, self.down))
    if self.cfg.moe_dispatch == "dense":
      combine = jnp.einsum("BTKE,BTK->BTE", jax.nn.one_hot(expert_ids, self.cfg.num_experts,
                                                           dtype=dt), weights)
      g = jnp.einsum("BTD,EDF->BTEF", x, gate)
      u = jnp.einsum("BTD,EDF->BTEF", x, up)
      h = parallel.constrain(jax.nn.silu(g) * u * combine[..., None],
                             ("batch", "length", "act_expert", "act_mlp"))
      y = jnp.einsum("BTEF,EFD->BTD", h, down)
    else:
      y = _ragged_experts(x, expert_ids, weights, gate, up, down)
    return y, logits, expert_ids


def expert_id_dtype(cfg: ModelConfig):
  """The compact integer type in which recorded expert ids travel (routing replay): int8 up to
  127 experts, else int16; -1 marks a token with nothing recorded."""
  return jnp.int8 if cfg.num_experts <= 127 else jnp.int16


def _top_k(probs: Array, k: int) -> tuple[Array, Array]:
  """`jax.lax.top_k` over the last axis as k rounds of argmax: elementwise ops and reductions
  along E, which stay local to each device's tokens, where XLA:CPU's TopK all-gathers a
  batch-sharded input. Ties go to the lower expert id."""
  values, ids = [], []
  for _ in range(k):
    i = jnp.argmax(probs, axis=-1)
    values.append(jnp.take_along_axis(probs, i[..., None], axis=-1)[..., 0])
    ids.append(i)
    probs = jnp.where(jax.nn.one_hot(i, probs.shape[-1], dtype=jnp.bool_), -jnp.inf, probs)
  return jnp.stack(values, axis=-1), jnp.stack(ids, axis=-1).astype(jnp.int32)


def _ragged_experts(x, expert_ids, weights, gate, up, down):
  """Sorted dispatch: the R = B*T*k (token, expert) rows grouped by expert through
  `jax.lax.ragged_dot`, then put back in token order and summed over each token's k experts.

  Under a mesh this runs per device (`jax.shard_map`): each device sorts only its own tokens
  (a global sort would gather the batch) and runs only its own experts, the ones its slice of
  the 'expert' axis holds; a psum over that axis adds the experts' contributions.
  """
  mesh = parallel.active_mesh()
  if mesh is None:
    return _ragged_local(x, expert_ids, weights, gate, up, down, expert_axes=None)
  E = gate.shape[0]
  ep = parallel.logical_to_spec(("expert",), (E,), mesh)[0]
  rows = parallel.logical_to_spec(("batch", "length", None), x.shape, mesh)
  ids_spec = parallel.logical_to_spec(("batch", "length", None), expert_ids.shape, mesh)
  w_spec = jax.sharding.PartitionSpec(ep, None, None)

  def local(*args):
    with parallel.without_mesh():
      return _ragged_local(*args, expert_axes=ep)

  # check_vma=False: with the checks on, jax 0.10 returned wrong gradients for x and the router
  # here (tests/test_families.py compares them with one device's).
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, ids_spec, ids_spec) + (w_spec,) * 3,
                       out_specs=rows, check_vma=False)(x, expert_ids, weights, gate, up, down)


def _ragged_local(x, expert_ids, weights, gate, up, down, *, expert_axes):
  B, T, D = x.shape
  k = expert_ids.shape[-1]
  E = gate.shape[0]                                                      # experts held here
  flat_ids = expert_ids.reshape(-1)                                      # [R]
  if expert_axes is not None:
    # This device holds experts [first, first + E); rows routed elsewhere sort last (group E)
    # and get no matmul.
    flat_ids = flat_ids - jax.lax.axis_index(expert_axes) * E
    flat_ids = jnp.where((flat_ids >= 0) & (flat_ids < E), flat_ids, E)
  order = jnp.argsort(flat_ids, stable=True)                             # rows sorted by expert
  sizes = jnp.bincount(flat_ids, length=E + 1)[:E].astype(jnp.int32)     # [E]
  xs = jnp.take(x.reshape(B * T, D), order // k, axis=0)                 # [R, D]
  g = jax.lax.ragged_dot(xs, gate, sizes)                                # [R, F]
  u = jax.lax.ragged_dot(xs, up, sizes)
  out = jax.lax.ragged_dot(jax.nn.silu(g) * u, down, sizes)              # [R, D]
  w = jnp.take(weights.reshape(-1), order)
  out = jnp.where((jnp.take(flat_ids, order) < E)[:, None], out * w[:, None], 0)
  out = jnp.take(out, jnp.argsort(order), axis=0)                        # back to token order
  y = out.reshape(B, T, k, D).sum(axis=2)
  return y if expert_axes is None else jax.lax.psum(y, expert_axes)


def load_balancing_loss(router_logits, top_k: int, mask: Array | None = None) -> Array:
  """The auxiliary load-balancing loss of transformers' Qwen3-MoE (`load_balancing_loss_func`,
  Switch Transformer eqs. 4-6): E * sum_e f_e * P_e, where f_e is the number of top-k picks of
  expert e and P_e its summed router probability, both pooled over all MoE layers and divided by
  the number of (layer, token) rows. router_logits: one [B, T, E] (or [N, E]) array per MoE
  layer; mask [B, T]: 1 for real tokens (padding is left out), as transformers' attention_mask.
  """
  E = router_logits[0].shape[-1]
  counts = jnp.zeros((E,), jnp.float32)
  prob_sum = jnp.zeros((E,), jnp.float32)
  rows = jnp.float32(0)
  w = None if mask is None else mask.reshape(-1).astype(jnp.float32)
  for logits in router_logits:
    probs = jax.nn.softmax(logits.reshape(-1, E).astype(jnp.float32), axis=-1)     # [N, E]
    picked = jax.nn.one_hot(_top_k(probs, top_k)[1], E, dtype=jnp.float32)  # [N, k, E]
    if w is None:
      counts = counts + picked.sum(axis=(0, 1))
      prob_sum = prob_sum + probs.sum(axis=0)
      rows = rows + probs.shape[0]
    else:
      counts = counts + jnp.einsum("NKE,N->E", picked, w)
      prob_sum = prob_sum + jnp.einsum("NE,N->E", probs, w)
      rows = rows + w.sum()
  return jnp.sum((counts / rows) * (prob_sum / rows)) * E


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
    pdt = to_dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pdt, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pdt, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids, cache=None, cache_index=None, angles=None,
               expert_ids=None):
    """-> (x, new_kv, routing): routing is None for a dense MLP, else (router logits, expert ids)."""
    h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, cache, cache_index, angles)
    x, routing = self.feed_forward(x + h, expert_ids)
    return parallel.constrain(x, ("batch", "length", "act_embed")), new_kv, routing

  def feed_forward(self, x, expert_ids=None):
    """x + MLP(norm(x)) -> (x, routing): routing as in `__call__`.

    Also used on its own by decode loops that run attention elsewhere (the sampler's paged cache).
    """
    if isinstance(self.mlp, MoE):
      y, logits, ids = self.mlp(self.mlp_norm(x), expert_ids)
      return x + y, (logits, ids)
    return x + self.mlp(self.mlp_norm(x)), None


class Transformer(nnx.Module):
  """`logits = model(tokens)`: int32 [B, T] -> float32 [B, T, V].

  Optional `positions` and `segment_ids` ([B, T] int32) support packed sequences and left
  padding: segment id 0 marks padding, and a token attends to earlier positions of its own
  segment only. With `cache` (from `init_cache`) and `cache_index` the call writes this
  step's keys/values into the cache at that slot and returns `(logits, cache)`; a call at
  slot 0 (a Python int: a prefill) starts the cache, attending to its own tokens only. `angles`
  may pass `rope_angles(positions, ...)` computed ahead (the sampler computes a whole
  generation's before its decode loop, which otherwise evaluates sin and cos in every layer
  of every step). `hidden=True` returns the final norm's output [B, T, D] instead of the
  logits (k15.model.logprobs applies the head in tiles).

  Mixture-of-experts models: `return_routing=True` appends {"router_logits": one float32
  [B, T, E] per MoE layer, "expert_ids": one int32 [B, T, k] per MoE layer} to the outputs
  (with `hidden=True` too, for the losses that add `load_balancing_loss`), and
  `expert_ids` (the same tuple) routes each MoE layer by the given experts instead of its own
  top-k (routing replay), with gate weights from this model's router at those experts.
  A scanned model (`ModelConfig.scanned`) also takes `expert_ids` as one stacked [L, B, T, k]
  array and returns the same per-layer tuples.

  Layers: `layers` is a list of Blocks, or with `scan_layers` one Block whose parameters are
  stacked on a leading 'layers' axis; `block(i)` gives layer i either way.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = to_dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pdt,
                        cfg.embed_dim ** -0.5)
    if cfg.scan_fallback:
      logging.warning("model.scan_layers: %s", cfg.scan_fallback)
    if cfg.scanned:
      self.layers = _stacked_blocks(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs, moe=cfg.is_moe_layer(i))
                              for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, pdt, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), pdt,
                            cfg.embed_dim ** -0.5)

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None, cache: dict | None = None,
               cache_index: Array | int | None = None,
               angles: tuple[Array, Array] | None = None,
               expert_ids: tuple[Array, ...] | None = None, return_routing: bool = False,
               hidden: bool = False):
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
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    if expert_ids is not None and len(expert_ids) != len(moe_layers):
      raise ValueError(f"expert_ids has {len(expert_ids)} arrays; the model has "
                       f"{len(moe_layers)} MoE layers")
    replay = {} if expert_ids is None or cfg.scanned else dict(zip(moe_layers, expert_ids))

    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)                 # [B, T, D]
    x = parallel.constrain(x, ("batch", "length", "act_embed"))

    if angles is None:
      angles = rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    new_k, new_v, routing = [], [], []
    if cfg.scanned:
      x, new_cache, routing = self._scan_layers(x, positions, segment_ids, cache, cache_index,
                                                angles, expert_ids)
      if cache is not None:
        new_k, new_v = new_cache
    for i, block in enumerate(() if cfg.scanned else self.layers):
      if cache is not None:
        layer_cache = dict(cache, k=cache["k"][i], v=cache["v"][i])
        x, (k, v), route = block(x, positions, segment_ids, layer_cache, cache_index, angles,
                                 replay.get(i))
        new_k.append(k)
        new_v.append(v)
      elif cfg.remat != "none":
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                  if cfg.remat == "dots" else None)
        x, _, route = nnx.remat(
            lambda blk, x, pos, seg, ang, ids: blk(x, pos, seg, angles=ang, expert_ids=ids),
            policy=policy)(block, x, positions, segment_ids, angles, replay.get(i))
      else:
        x, _, route = block(x, positions, segment_ids, angles=angles, expert_ids=replay.get(i))
      if route is not None:
        routing.append(route)

    # Per MoE layer, in layer order: the router logits (for `load_balancing_loss`) and the
    # chosen experts (to replay through `expert_ids`).
    routed = (({"router_logits": tuple(r[0] for r in routing),
                "expert_ids": tuple(r[1] for r in routing)},) if return_routing else ())
    if hidden:  # The final-norm output [B, T, D], for a caller that applies the head in tiles.
      x = self.final_norm(x)
      return (x,) + routed if routed else x
    logits = self.logits(x)
    if cache is not None and not cfg.scanned:
      new_k, new_v = tuple(new_k), tuple(new_v)
    out = (logits,) if cache is None else (logits, dict(cache, k=new_k, v=new_v))
    out += routed
    return out[0] if len(out) == 1 else out

  def _scan_layers(self, x, positions, segment_ids, cache, cache_index, angles, expert_ids):
    """The stacked layers under `jax.lax.scan`: one traced and compiled layer body.

    -> (x, (k, v) stacked caches or None, routing as the loop's: one (router logits, expert
    ids) per layer for a MoE model). The remat policy wraps the body, so the backward pass
    keeps only each layer's input (for 'full').

    The stacked KV cache is scanned over as an input (each layer reads its own [B, K, H, S]
    slice), not carried: XLA:TPU copies a carried buffer once, so a decode step held two whole
    caches. Each layer attends over its slice with this call's keys and values written in (a
    copy of one layer's slice), as the unscanned loop's layers do, and hands back
      - when the call writes a few slots (decode, 2T <= S): only those T slots, which one
        `dynamic_update_slice` after the scan writes into the stacked cache, in place when the
        caller donates it, so the step holds one cache;
      - when it writes most of the cache (the sampler's prefill of `init_cache`'s zeros,
        2T > S): the whole updated slice; the stacked outputs are the new cache.
    """
    cfg = self.cfg
    graphdef, params = nnx.split(self.layers)
    if expert_ids is not None and not isinstance(expert_ids, jax.Array):
      expert_ids = jnp.stack(expert_ids)                                  # [L, B, T, k]
    T = x.shape[1]
    whole = cache is not None and 2 * T > cache["segment_ids"].shape[1]

    def layer(x, xs):
      p, ids, kv = xs
      block = nnx.merge(graphdef, p)
      # The layer's slices laid out as the cache lies (kv heads over 'tensor' when they
      # divide it), going in and, whole, coming out: left free, the partitioner re-lays out the
      # whole stacked cache outside the scan into a second one (with 2 kv heads on 4 tensor
      # shards: each shard's own head going in, an all-gather of every layer's coming out).
      lay_out = lambda kv: tuple(parallel.constrain(c, CACHE_AXES[n]) for c, n in zip(kv, "kv"))
      layer_cache = None if kv is None else dict(cache, **dict(zip("kv", lay_out(kv))))
      x, new_kv, route = block(x, positions, segment_ids, layer_cache, cache_index, angles, ids)
      if new_kv is not None and whole:
        new_kv = lay_out(new_kv)
      elif new_kv is not None:  # This call's slots: [B, K, H, T], [B, K, T, H].
        new_kv = (jax.lax.dynamic_slice_in_dim(new_kv[0], cache_index, T, axis=3),
                  jax.lax.dynamic_slice_in_dim(new_kv[1], cache_index, T, axis=2))
      return x, (new_kv, route)

    if cache is None and cfg.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                if cfg.remat == "dots" else None)
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    kv = None if cache is None else (cache["k"], cache["v"])
    x, (new_kv, route) = jax.lax.scan(layer, x, (params, expert_ids, kv))
    if new_kv is not None and not whole:  # [L, B, K, H, T], [L, B, K, T, H] into the cache.
      new_kv = (jax.lax.dynamic_update_slice(cache["k"], new_kv[0], (0, 0, 0, 0, cache_index)),
                jax.lax.dynamic_update_slice(cache["v"], new_kv[1], (0, 0, 0, cache_index, 0)))
    if new_kv is not None:
      new_kv = tuple(parallel.constrain(c, cache_axes(n, c)) for c, n in zip(new_kv, "kv"))
    routing = [] if route is None else [(route[0][i], route[1][i])
                                        for i in range(cfg.num_layers)]
    return x, new_kv, routing

  def block(self, i: int) -> Block:
    """Layer i as a Block (of the stacked parameters when scanned: a slice of each)."""
    if not self.cfg.scanned:
      return self.layers[i]
    graphdef, params = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))

  def logits(self, x: Array) -> Array:
    """The last block's output [B, T, D] -> float32 logits [B, T, V] (final norm, head)."""
    x = self.final_norm(x)
    # Logits and everything after them (softmax, log-probs) in float32.
    head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    logits = jnp.einsum("BTD,DV->BTV", x.astype(jnp.float32), head.astype(jnp.float32))
    return parallel.constrain(logits, ("batch", "length", "act_vocab"))


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters carry a leading 'layers' axis of size L (each layer with its
  own random init), for `Transformer._scan_layers`."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers)
  def create(rngs):
    return Block(cfg, rngs=rngs, moe=cfg.num_experts > 0)

  blocks = create(rngs)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Param):
      var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
  return blocks


def starts_cache(cache_index: Array | int | None) -> bool:
  """Whether a call with this cache_index fills the cache from its first slot (statically 0):
  such a call starts the cache, so nothing written there before is attended to."""
  return isinstance(cache_index, int) and not isinstance(cache_index, bool) and cache_index == 0


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
  """An empty KV cache: every slot has segment id 0, so nothing in it is attended to.

  k: one [B, K, H, S] array per layer; v: one [B, K, S, H] array per layer (tuples of L);
  segment_ids, positions: [B, S]. One array per layer, rather than one stacked [L, ...] array,
  and kv heads before length: a decode step then updates each layer's arrays in place and
  attention reads them as they lie, where slicing a layer out of a stacked cache made XLA copy
  and re-lay it out every step (38% of a CPU decode step at 32 rows x 320 slots). Keys are
  stored transposed so that a step's scores are a plain [G, H] x [H, S] product per row and
  kv head (XLA:CPU computed q . k against [S, H] keys about 2x slower). A scanned model
  (`ModelConfig.scanned`) keeps one stacked [L, B, K, H, S] / [L, B, K, S, H] array instead: the
  layer scan reads each layer's slice, and the step's slots are written in place after it.
  """
  dtype = to_dtype(dtype or cfg.dtype)
  K, H, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
  if cfg.scanned:  # One [L, ...] array each, scanned over by the layers.
    return {
        "k": jnp.zeros((L, batch, K, H, length), dtype),
        "v": jnp.zeros((L, batch, K, length, H), dtype),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
        "positions": jnp.zeros((batch, length), jnp.int32),
    }
  return {
      "k": tuple(jnp.zeros((batch, K, H, length), dtype) for _ in range(L)),
      "v": tuple(jnp.zeros((batch, K, length, H), dtype) for _ in range(L)),
      "segment_ids": jnp.zeros((batch, length), jnp.int32),
      "positions": jnp.zeros((batch, length), jnp.int32),
  }


# Logical axes of `init_cache`'s arrays (for "k" and "v": of each layer's array; a scanned
# model's stacked arrays have 'layers' in front, see `cache_axes`).
CACHE_AXES = {
    "k": ("batch", "kv_heads", "head_dim", "cache_length"),
    "v": ("batch", "kv_heads", "cache_length", "head_dim"),
    "segment_ids": ("batch", "cache_length"),
    "positions": ("batch", "cache_length"),
}


def cache_axes(name: str, array) -> tuple:
  """The logical axes of cache array `name`, with 'layers' in front for a stacked one."""
  axes = CACHE_AXES[name]
  return ("layers",) * (array.ndim - len(axes)) + axes
