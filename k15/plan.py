r"""Per-chip memory and step-time plan of a config, without allocating the model (issue 7 §3).

    python -m k15.plan --config=configs/qwen25_1p5b_v5e.py [--config.rl.max_new_tokens=8192]
        [--chip=v5e] [--num_chips=8] [--mfu=0.4] [--peak_tflops=197] [--batch=8]
        [--seq_len=9216] [--prompt_len=1024] [--strict]
        [--logits_chunk=2048] [--prefill_logits=last]     # what-ifs, see below

Prints, for one chip: parameters, optimizer state, gradients, train-step activations and logits,
the sampler's KV cache and transients, the peak of the training phase and of the sampling
phase against the chip's HBM, and the expected train-step time at the given MFU. A config
whose peak exceeds the HBM gets a line 'WARNING: ... does not fit' (exit code 0, or 1 with
--strict). `plan(config, batch, seq_len, chip)` is the same as a library call returning a dict.

Sharding. Parameter bytes are exact: the abstract model (`nnx.eval_shape`) gives every
parameter's shape and logical axes, and `parallel.logical_to_spec` with the config's rules on an
`AbstractMesh` of the config's shape gives its shard. Adam moments are laid out like their
parameters (`update.init_optimizer_state`); gradients likewise. An activation term is divided
by the mesh axes its logical axes map to ('batch' -> data x fsdp, 'length' -> sequence,
'act_mlp'/'act_q_heads'/'act_vocab' -> tensor, ...), with the same divisibility rule, so two kv
heads on a 4-way tensor axis count as replicated, as they are.

Activation model. Letters: B rows, T tokens per row (S = T keys), D width, N / K query /
kv heads, H head dim, F MLP width, V vocab, L layers; b = bytes of the compute dtype
(`model.dtype`), 4 = float32. Per layer and token, what the backward pass needs kept (JAX's
saved residuals, `jax.ad_checkpoint.print_saved_residuals`, after XLA fusion):

  remat 'none':  norms 2 x (f32 input, normalized and scaled outputs)     4bD + 8D
                 q after RoPE, attention output / k after RoPE, v         2bNH + 2bKH
                 SwiGLU: gate, up, sigmoid(gate), silu(gate), product     5bF
                 RoPE sin/cos                                             8H
                 reference attention: f32 scores, exp, probabilities      (12 [+ b]) N S
                 (the [B, N, T, S] matrix; + b for the cast probabilities if b < 4);
                 flash: one f32 log-sum-exp per query and head            4N
                 weights cast to the compute dtype or all-gathered over fsdp, kept for the
                 backward's dx = dy W^T: one copy per layer in dtype b, sharded by tensor only
  remat 'full':  the layer input (bD) per layer, plus one layer's 'none' set (recomputed
                 during that layer's backward) including its gathered weights
  remat 'dots':  layer input, q/k/v projections, attention projection, gate and up outputs:
                 b(2D + NH + 2KH + 2F) and the gathered weights per layer, plus one layer's
                 'none' set less those matmul outputs

Once per step: the embedding lookup (bD) and final norm (8D + 2bD) per token, and the head:
float32 logits with log_softmax, the cotangents of the log-probs and of the logits, and the
copy that feeds the two matmuls of the head's gradient: 5 x 4V per token (XLA:CPU keeps five
[B, T, V] float32 buffers live at the head's backward). With `model.logits_chunk` the head runs
in tiles recomputed one by one in the backward pass, and three buffers of one tile are live
(XLA:CPU, tests/test_plan.py). Flash attention adds a transient of
one layer's f32 dq (4NH per token) and a few [B, N, block, block] score blocks.

Gradients are parameter-shaped (param dtype); the backward phase holds them with the
activations (conservative: early in the backward few exist yet), the update phase holds about
2.25x their size (gradients, the clipped gradients and the Adam update before it is written in
place into the donated buffers; measured on XLA:CPU). Train peak = params + optimizer state +
max(gradients + activations + logits, 2.25 x gradients).

Sampling: one `rollout` call runs one `sampler.generate` over the trajectories continued
from the replay buffer (one row each, prefilled with prompt + partial response, since the
policy changed) and the new prompts (k rows each), all padded to the longest sequence's
bucket. Worst case (every response spends its whole budget): C = (ceil(max_new_tokens /
segment_budget) - 1) x prompts_per_iteration x k continued rows (capped by rl.max_continued
if the config has it), R = C + prompts x k rows and U = C + prompts sequences (powers of two
per batch shard), prompt bucket P = pow2(prompt + max_new_tokens - segment_budget), cache
length S = P + pow2(segment_budget). The KV cache is a k and a v array [R, K, S, H] per layer
in the compute dtype. The sampler's prefill keeps only the cache of the first P-1 prompt tokens
(XLA drops their logits) and runs the last token as a one-token step, so it holds [U, 1, V]
logits (`--prefill_logits=all` shows the cost of logits at every position), plus its own
[U, P] cache and one layer's intermediates. Decode holds the [R, V] logits and [R, N, 1, S]
scores (a single query takes the reference path while S <= block^2).
Sampling peak = params + optimizer state (the trainer keeps it between iterations) + KV cache
+ max(prefill transient, decode transient).

Checked (tests/test_plan.py) against XLA's memory analysis of the compiled train step for a
3.3M-parameter model on 8 x 256 tokens: within 1% (remat none, 1 device and a 2x2x2 mesh),
7% (flash), 3% (remat full over scanned layers), 11% (dots over scanned layers).

On a TPU chip (any `chip` but 'cpu') the activation terms are XLA:TPU's, which keeps far less
than XLA:CPU: it fuses each layer's elementwise work into its matmuls, splash attention keeps
its scores in VMEM, and the layer scan pins one layer's recomputation to its backward step.
Per token of a chip, in [T, D] arrays of the compute dtype (`_tpu_activations`):
  train step (remat 'full'): gradients (twice with microbatches) + L stacked layer inputs +
    one layer's backward (TPU_LAYER_BACKWARD_D [T, D] and _F [T, F] arrays) + the head: the
    final norm's float32 output, its tiled copy and two float32 [C, V] arrays of one tile
  reference pass: the larger of the embedding lookup (the table's rows for every token of the
    step, sliced by the FSDP shards of the embedding, twice in the parameter dtype) and the
    head's forward (the same head arrays)
  prefill: its cache and the embedding lookup's arrays (as the reference pass's); the decode
    steps: one cache, updated in place (static and paged alike)
Compared with k15.aot's compiled programs (tests/test_aot.py; docs/scaling.md, programs'
buffers without code): within 20% for the train step, the reference pass, the prefill and
both decode steps of the 1.5B config and of a shrunk one on v5e-8; not yet on the 7B config's
v5p-64, whose forward passes hold more (the plan is 25-60% under there). XLA:TPU counts its
VMEM scratch (up to ~0.1 GiB) among the temporaries; the plan does not.

Step time = model FLOPs / (chips x peak FLOP/s x MFU), model FLOPs = 6 x (matmul params) x
tokens + 6 B T^2 N H L (causal attention, forward and backward, useful half of the scores).
MFU counts model FLOPs only, so a remat policy's recomputation shows up as a lower MFU, not as
more FLOPs here.

Mixture of experts (the section at `_moe_plan`): expert and router weights and their Adam
moments are in the parameter totals (exact, as above: experts on the 'expert' axis) and broken
out; a uniform MoE stack counts no dense SwiGLU; each MoE layer adds its dispatch's buffers per
token (router, the k routed rows of the sorted 'ragged' dispatch, or the [E, F] arrays of the
one-hot 'dense' one), the replayed expert ids in the batch and the sampler's routing record;
FLOPs count the k routed experts.

Note (XLA scheduling): the 'full' and 'dots' figures assume the compiler recomputes a layer
right before that layer's backward. XLA:CPU's scheduler hoists the recomputation of an
unrolled Python loop of layers (the model's `for block in self.layers`) and so keeps almost
every layer's intermediates at once; a `lax.scan` over layers pins the order. See jax-ml/jax
issue 20763 for the same effect of the GPU latency-hiding scheduler.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from k15 import parallel, update
from k15 import config as k15_config
from k15.model import transformer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float              # memory per chip
  peak_tflops: float | None   # dense bf16 peak per chip; None: measure or pass --peak_tflops
  hbm_gbps: float | None      # memory bandwidth, for the decode-step lower bound


def _host_ram_gib() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


# Public spec sheets (cloud.google.com/tpu/docs/system-architecture-tpu-vm), per chip.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32, 275, 1228),
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
    "cpu": Chip("CPU host", _host_ram_gib(), None, None),
}


def accelerator_chips(accelerator_type: str) -> tuple[str, int]:
  """'v5p-64' -> ('v5p', 32): v4 and v5p names count TensorCores (2 per chip), v5e and v6e chips."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator_type.strip())
  if not m:
    raise ValueError(f"accelerator type {accelerator_type!r} is not like v4-8, v5litepod-8, "
                     f"v5p-64 or v6e-8")
  family, n = m.group(1), int(m.group(2))
  if family in ("v4", "v5p"):
    return family, max(1, n // 2)
  return ("v5e" if family == "v5litepod" else family), n


def _pow2(n: int) -> int:
  """The sampler's default bucket for lengths: the next power of two, at least 16."""
  return max(16, 1 << max(0, int(n) - 1).bit_length())


def _itemsize(dtype: str) -> int:
  return jnp.dtype(transformer.to_dtype(dtype)).itemsize


class _Sharder:
  """Divisors of logical-axis arrays on an abstract mesh of the config's shape."""

  def __init__(self, mesh_sizes: dict[str, int], rules):
    self.mesh = AbstractMesh(tuple(mesh_sizes[a] for a in parallel.MESH_AXES),
                             parallel.MESH_AXES)
    self.rules = parallel.rules_from_config(rules)

  def spec(self, axes, shape) -> P:
    return parallel.logical_to_spec(axes, shape, self.mesh, self.rules)

  def divisor(self, axes, shape) -> int:
    out = 1
    for entry in self.spec(axes, shape):
      for a in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
        out *= self.mesh.shape[a]
    return out

  def per_chip(self, axes, shape, bytes_per_element: float) -> float:
    return math.prod(shape) * bytes_per_element / self.divisor(axes, shape)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_bytes(leaf, sharding) -> float:
  value = leaf.get_value() if _is_var(leaf) else leaf
  if sharding is None or not value.shape:
    return float(value.dtype.itemsize * math.prod(value.shape))
  if _is_var(sharding):
    sharding = sharding.get_value()
  return float(value.dtype.itemsize * math.prod(sharding.shard_shape(value.shape)))


def _param_memory(cfg: transformer.ModelConfig, sh: _Sharder, optimizer):
  """Per-chip bytes of params, optimizer state, and per-layer weights as the backward keeps them."""
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)

  def sharding_of(v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    return v.replace(value=NamedSharding(sh.mesh, sh.spec(axes, v.shape)))

  shardings = jax.tree.map(sharding_of, state, is_leaf=_is_var)
  leaves = jax.tree.leaves(state, is_leaf=_is_var)
  shard_leaves = jax.tree.leaves(shardings, is_leaf=_is_var)
  params = sum(_leaf_bytes(v, s) for v, s in zip(leaves, shard_leaves))

  abstract_opt = jax.eval_shape(optimizer.init, state)
  replicated = NamedSharding(sh.mesh, P())
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, shardings,
      transform_non_params=lambda _: replicated, is_leaf=_is_var)
  opt_leaves = jax.tree.leaves(abstract_opt, is_leaf=_is_var)
  opt_shard_leaves = jax.tree.leaves(opt_shardings, is_leaf=lambda x: _is_var(x) or isinstance(
      x, NamedSharding))
  opt = sum(_leaf_bytes(v, s) for v, s in zip(opt_leaves, opt_shard_leaves))

  # One layer's weights as the forward uses them: cast to the compute dtype and, where FSDP
  # shards them, all-gathered, i.e. sharded only by the remaining (tensor) axes. A copy exists
  # only where the cast or the gather does something.
  b = _itemsize(cfg.dtype)
  layer_copy = 0.0
  block = jax.tree.leaves(nnx.split(abstract.block(0) if not cfg.scanned else abstract.layers)[1],
                          is_leaf=_is_var)
  gather_axes = ("data", "fsdp")
  for v in block:
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    shape = v.shape
    if cfg.scanned:  # stacked [L, ...]: one layer's slice
      axes, shape = axes[1:], shape[1:]
    spec = sh.spec(axes, shape)
    kept, gathered = 1, False
    for entry in spec:
      for a in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
        if a in gather_axes:
          gathered = True
        else:
          kept *= sh.mesh.shape[a]
    if gathered or v.get_value().dtype.itemsize != b:
      layer_copy += math.prod(shape) * b / kept
  return params, opt, layer_copy


def _matmul_params(cfg: transformer.ModelConfig) -> int:
  """Parameters that take part in a matmul per token (the embedding lookup and the experts a
  token is not routed to do not)."""
  n = cfg.num_params() - _inactive_expert_params(cfg)
  if not cfg.tie_embeddings:
    n -= cfg.vocab_size * cfg.embed_dim
  return n


def train_flops(cfg: transformer.ModelConfig, rows: int, seq_len: int) -> float:
  """Model FLOPs of one train step (forward + backward) on rows x seq_len tokens.

  6 x matmul params x tokens, plus causal attention: QK^T and PV are 2 x 2 B T S N H in the
  forward, half of it under the causal mask, times 3 for forward and backward.
  """
  tokens = rows * seq_len
  attention = 6 * rows * seq_len * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return float(6 * _matmul_params(cfg) * tokens + attention)


def _activations(cfg: transformer.ModelConfig, sh: _Sharder, B: int, T: int,
                 layer_copy: float, logits_chunk: int = 0) -> dict[str, float]:
  """Per-chip bytes live at the start of the train step's backward (see the module docstring)."""
  D, N, K, H, F, V, L = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.mlp_dim, cfg.vocab_size, cfg.num_layers)
  b = _itemsize(cfg.dtype)
  S = T
  tok = ("batch", "length")
  d = lambda coef: sh.per_chip(tok + ("act_embed",), (B, T, D), coef)       # coef bytes per D
  nh = lambda coef: sh.per_chip(tok + ("act_q_heads", "head_dim"), (B, T, N, H), coef)
  kh = lambda coef: sh.per_chip(tok + ("act_kv_heads", "head_dim"), (B, T, K, H), coef)
  f = lambda coef: sh.per_chip(tok + ("act_mlp",), (B, T, F), coef)
  per_tok = lambda coef: sh.per_chip(tok, (B, T), coef)
  flash = cfg.attention_impl in ("flash", "splash") and T * S > cfg.attention_block_size ** 2
  if flash:
    scores = sh.per_chip(("batch", "act_q_heads", "length"), (B, N, T), 4)
  else:
    scores = sh.per_chip(("batch", "act_q_heads", "length", None), (B, N, T, S),
                         12 + (b if b < 4 else 0))

  full_layer = (d(4 * b + 8) + nh(2 * b) + kh(2 * b) + f(5 * b) + per_tok(8 * H) + scores
                + layer_copy)
  if cfg.remat == "none":
    saved = L * full_layer
    transient = 0.0
  elif cfg.remat == "full":
    saved = L * d(b)
    transient = full_layer
  else:  # dots: the saved matmul outputs need no recomputation in the layer's backward
    dots = d(b) + nh(b) + kh(2 * b) + f(2 * b)
    saved = L * (d(b) + dots + layer_copy)
    transient = full_layer - dots
  if flash:
    blk = min(cfg.attention_block_size, T)
    transient += nh(4) + 4 * sh.per_chip(("batch", "act_q_heads", None, None),
                                         (B, N, blk, blk), 4)
  once = d(b) + d(8 + 2 * b)                                    # embedding output, final norm
  rows_t = min(T, logits_chunk) if logits_chunk else T
  # Whole rows: five float32 [B, T, V] buffers at the head's backward. In tiles
  # (k15.model.logprobs), three of one tile: its recomputed logits, their exp and the cotangent.
  copies = 5 if rows_t >= T else 3
  tile = sh.per_chip(tok + ("act_vocab",), (B, rows_t, V), 4)
  return {"saved": saved + once, "recompute": transient, "logits": copies * tile,
          "logits_tile": tile}


# XLA:TPU's buffers, per token of a chip, in units of one [T, D] array of the compute dtype
# (see `_tpu_activations`): measured on the compile-only programs of k15.aot (docs/scaling.md).
TPU_LAYER_BACKWARD_D = 10   # one layer's backward under remat: its [T, D] tensors and cotangents
TPU_LAYER_BACKWARD_F = 3    # ... and the SwiGLU's gate, up and product, [T, F / tensor] each


def _tpu_activations(cfg: transformer.ModelConfig, sh: _Sharder, B: int, T: int,
                     logits_chunk: int) -> dict[str, float]:
  """Per-chip bytes of the train step's and reference pass's temporaries on XLA:TPU.

  XLA:TPU fuses each layer's elementwise work (norms, RoPE, SwiGLU) into its matmuls and
  splash attention keeps its scores in VMEM, so what lives in HBM is a handful of [T, D]
  streams, not the per-op intermediates XLA:CPU materializes (`_activations`):

  - saved: what the backward needs kept per layer, as JAX's remat policy decides (the same
    sets as on CPU): remat 'full' keeps each layer's input, [T, D] in the compute dtype, in
    the scan's stacked residual; 'dots' adds the matmul outputs, 'none' everything.
  - layer backward: one layer recomputed and differentiated at a time: the layer's [T, D]
    tensors (input, norms, attention output, residual sums, MLP output) and their
    cotangents, several of them in float32 (the norms and the residual stream's cotangent):
    TPU_LAYER_BACKWARD_D [T, D] arrays of the compute dtype; and the SwiGLU's gate and up
    projections and their product, TPU_LAYER_BACKWARD_F [T, F] arrays (F split over tensor).
    Attention adds no [T, S] term: splash keeps its score blocks in VMEM.
  - head (k15.model.logprobs): the final norm's float32 output and its bfloat16 tiled copy,
    and two [C, V] float32 arrays of one tile (the logits and their cotangent in the
    backward, the logits and their exponentials in the forward).
  - embedding: the lookup gathers, for every row of the step, the table's rows sliced by the
    FSDP shards of the embedding dimension, in the parameter dtype, then re-lays them out by
    rows: two [rows x T, D / fsdp] arrays, before the first layer (the reference pass's peak
    when the head's tile is small).
  """
  D, L, V = cfg.embed_dim, cfg.num_layers, cfg.vocab_size
  b, p = _itemsize(cfg.dtype), _itemsize(cfg.param_dtype)
  tok = ("batch", "length")
  d = lambda coef: sh.per_chip(tok + ("act_embed",), (B, T, D), coef)
  if cfg.remat == "full":
    saved = L * d(b)
  else:  # the sets of `_activations`, which JAX's policy decides, not the compiler
    cpu = _activations(cfg, sh, B, T, 0.0, logits_chunk)
    saved = cpu["saved"] - d(b) - d(8 + 2 * b)
  rows_t = min(T, logits_chunk) if logits_chunk else T
  tile = sh.per_chip(tok + ("act_vocab",), (B, rows_t, V), 4)
  head = d(4) + d(b) + 2 * tile
  embedding = 2 * sh.per_chip((None, None, "embed"), (B, T, D), p) + d(b)
  f = sh.per_chip(tok + ("act_mlp",), (B, T, cfg.mlp_dim), b)
  layer_backward = TPU_LAYER_BACKWARD_D * d(b) + TPU_LAYER_BACKWARD_F * f
  return {"saved": saved, "recompute": layer_backward, "logits": head, "logits_tile": tile,
          "embedding": embedding, "reference": max(embedding, head)}


def _sampling(cfg: transformer.ModelConfig, sh: _Sharder, rl: Any, prompt_len: int,
              prefill_logits: str, tpu: bool = False) -> dict[str, Any]:
  """Per-chip bytes of one `rollout` call (k15.sampling.rollout), and its shapes.

  One `sampler.generate` call takes the continued trajectories of the replay buffer (one row
  each, prefilled with prompt + partial response) and the new prompts (k rows each), padded to
  one prompt bucket: the longest sequence's.

  On XLA:TPU (`tpu`) the decode steps hold one cache, updated in place (the layer scan reads
  the stacked cache as its input, see `Transformer._scan_layers`), and the prefill's
  temporaries are those of the embedding lookup before the first layer (`_tpu_activations`),
  its layer fused down to a few [T, D] and [T, F] streams (measured on k15.aot's programs).
  """
  b = _itemsize(cfg.dtype)
  L, K, H, N, V = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads, cfg.vocab_size
  shards = sh.divisor(("batch",), (sh.mesh.size,))  # the batch axes, each dividing the size
  # The sampler pads rows to a power of two per batch shard.
  bucket_rows = lambda n: shards * (1 << max(0, -(-n // shards) - 1).bit_length())
  new_rows = rl.prompts_per_iteration * rl.samples_per_prompt
  seg = min(rl.segment_budget or rl.max_new_tokens, rl.max_new_tokens)
  segments = -(-rl.max_new_tokens // seg)
  # Worst case: every trajectory spends its whole budget, so the buffer holds the rows of the
  # last segments - 1 iterations (all of them are continued unless rl.max_continued caps it).
  continued = (segments - 1) * new_rows
  if rl.get("max_continued", None) is not None:
    continued = min(continued, rl.max_continued)
  U = bucket_rows(continued + rl.prompts_per_iteration)
  R = bucket_rows(continued + new_rows)
  P = _pow2(prompt_len + rl.max_new_tokens - seg) if continued else _pow2(prompt_len)
  S = P + _pow2(seg)
  tok = ("batch", "length")

  def cache(rows, length):  # k and v of every layer
    return L * (sh.per_chip(transformer.CACHE_AXES["k"], (rows, K, H, length), b)
                + sh.per_chip(transformer.CACHE_AXES["v"], (rows, K, length, H), b))

  # Prefill of the U sequences: their cache, the logits, one layer's forward intermediates.
  logits = sh.per_chip(tok + ("act_vocab",), (U, P if prefill_logits == "all" else 1, V), 4)
  flash = cfg.attention_impl in ("flash", "splash") and P * P > cfg.attention_block_size ** 2
  scores = 0.0 if flash else sh.per_chip(("batch", "act_q_heads", "length", None),
                                         (U, N, P, P), 12)
  layer = (sh.per_chip(tok + ("act_embed",), (U, P, cfg.embed_dim), 4 * b)
           + sh.per_chip(tok + ("act_mlp",), (U, P, cfg.mlp_dim), 3 * b) + scores)
  decode = (sh.per_chip(("batch", "act_vocab"), (R, V), 3 * 4)
            + sh.per_chip(("batch", "act_q_heads", None), (R, N, S), 12))
  prefill = cache(U, P) + logits + layer
  paged = decode
  if tpu:
    prefill = cache(U, P) + logits + _tpu_activations(cfg, sh, U, P, 0)["embedding"]
  return {"rows": R, "new_rows": new_rows, "continued_rows": continued, "sequences": U,
          "prompt_bucket": P, "cache_length": S, "kv_cache": cache(R, S),
          "prefill": prefill, "prefill_logits": logits,
          "prefill_logits_mode": prefill_logits, "decode": decode, "decode_paged": paged}


# --- Mixture of experts (Qwen3-MoE, k15.model.transformer.MoE) ---------------------------------
# Letters as above, and E experts, k experts per token, Fe an expert's SwiGLU width, Lm MoE
# layers. The dense terms above count no SwiGLU for a model whose every layer is MoE
# (`_without_unused_mlp`); these add the experts' own.


def _moe_layers(cfg: transformer.ModelConfig) -> int:
  return sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))


def _without_unused_mlp(cfg: transformer.ModelConfig) -> transformer.ModelConfig:
  """cfg with mlp_dim 0 when no layer has a dense MLP (a uniform MoE stack: model.mlp_dim
  describes no parameter then), so the dense activation and prefill terms count no SwiGLU. With
  `moe_dense_layers` they keep one in every layer (an upper bound)."""
  if cfg.num_experts and _moe_layers(cfg) == cfg.num_layers:
    return dataclasses.replace(cfg, mlp_dim=0)
  return cfg


def _inactive_expert_params(cfg: transformer.ModelConfig) -> int:
  """Expert weights a token does not use: (E - k) experts of each MoE layer (FLOPs count the
  k chosen ones, as the 'ragged' dispatch computes; 'dense' runs all E, E / k times more)."""
  if not cfg.num_experts:
    return 0
  return (_moe_layers(cfg) * (cfg.num_experts - cfg.experts_per_token) * 3 * cfg.embed_dim
          * cfg.moe_mlp_dim)


def _moe_param_memory(cfg: transformer.ModelConfig, sh: _Sharder) -> dict[str, float]:
  """Per-chip bytes of the experts' and routers' weights as laid out by the rules (the experts
  on 'expert', their width on 'fsdp'/'tensor'), their Adam moments (two param-shaped copies
  in the param dtype, laid out alike), and one layer's experts as the dispatch reads them.

  These are part of `_param_memory`'s totals, broken out. 'ragged' runs per device under
  `jax.shard_map` with each device's experts whole ([E / expert, D, Fe], gathered over the
  other axes); 'dense' reads them cast to the compute dtype, still split over the non-FSDP axes.
  """
  D, E, Fe, Lm = cfg.embed_dim, cfg.num_experts, cfg.moe_mlp_dim, _moe_layers(cfg)
  p, b = _itemsize(cfg.param_dtype), _itemsize(cfg.dtype)
  expert_axes, router_axes = ("expert", "embed", "mlp"), ("embed", None)
  experts = Lm * 3 * sh.per_chip(expert_axes, (E, D, Fe), p)
  router = Lm * sh.per_chip(router_axes, (D, E), p)
  if cfg.moe_dispatch == "ragged":
    gathered = 3 * sh.per_chip(("expert", None, None), (E, D, Fe), b)
  else:
    kept = 1
    for entry in sh.spec(expert_axes, (E, D, Fe)):
      for a in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
        kept *= 1 if a in ("data", "fsdp") else sh.mesh.shape[a]
    gathered = 3 * E * D * Fe * b / kept
  return {"experts": experts, "router": router, "opt_state": 2 * (experts + router),
          "gathered_layer": gathered}


def _moe_token_bytes(cfg: transformer.ModelConfig, backward: bool) -> tuple[float, float]:
  """(bytes per token per MoE layer replicated over the expert axis, bytes per token and
  expert (dense dispatch; split over the expert and tensor axes)) of one layer's dispatch.

  Router (both): float32 logits, probabilities and the top-k rounds' masked copy, 12E.
  'ragged', per token's k rows: the gathered inputs, the expert outputs, their weighted and
  unsorted copies (b(3D) each row), gate, up and their SwiGLU product (3b Fe), the sort order,
  its inverse and the ids (int32, 12); the backward adds the cotangents of the inputs, outputs
  and the three SwiGLU arrays, b(2D + 3Fe) per row. 'dense', per token and expert: gate, up,
  SiLU and the combined product (4b Fe), 3b Fe more in the backward, plus the [E] combine row.
  """
  D, E, Fe, k = cfg.embed_dim, cfg.num_experts, cfg.moe_mlp_dim, cfg.experts_per_token
  b = _itemsize(cfg.dtype)
  router = 12 * E
  if cfg.moe_dispatch == "ragged":
    per_row = b * (3 * D + 3 * Fe) + 12 + (b * (2 * D + 3 * Fe) if backward else 0)
    return router + k * per_row, 0.0
  per_expert = b * (4 * Fe + (3 * Fe if backward else 0)) + b
  return router, per_expert


def _moe_dispatch(cfg: transformer.ModelConfig, sh: _Sharder, B: int, T: int,
                  backward: bool) -> float:
  """Per-chip bytes of one MoE layer's dispatch on B x T tokens (`_moe_token_bytes`). The
  tokens are those of the chip's batch shard: 'ragged' runs each device's experts on all of
  them."""
  tok, per_expert = _moe_token_bytes(cfg, backward)
  out = sh.per_chip(("batch", "length"), (B, T), tok)
  if per_expert:
    out += sh.per_chip(("batch", "length", "act_expert"), (B, T, cfg.num_experts), per_expert)
  return out


def _moe_routing_bytes(cfg: transformer.ModelConfig, sh: _Sharder, rows: int,
                       tokens: int) -> float:
  """Recorded expert ids [rows, tokens, Lm, k] (routing replay) per chip, in
  `transformer.expert_id_dtype`, split over the batch axes."""
  itemsize = jnp.dtype(transformer.expert_id_dtype(cfg)).itemsize
  shape = (rows, tokens, _moe_layers(cfg), cfg.experts_per_token)
  return sh.per_chip(("batch", None, None, None), shape, itemsize)


def _moe_plan(cfg: transformer.ModelConfig, sh: _Sharder, B: int, T: int, rows: int,
              replay: bool) -> dict[str, float]:
  """The MoE terms of the train step and the reference pass (per chip).

  saved / recompute: added to the activations as the remat policy keeps them (every MoE layer's
  forward set for 'none' and 'dots', whose saved matmul outputs are most of it; one layer's
  forward and backward for 'full'). layer_forward: one layer's forward set (the reference pass).
  batch: the replayed expert ids of the step's rows (rl.routing_replay).
  """
  forward = _moe_dispatch(cfg, sh, B, T, backward=False)
  both = _moe_dispatch(cfg, sh, B, T, backward=True)
  if cfg.remat == "full":
    saved, recompute = 0.0, both
  else:
    saved, recompute = _moe_layers(cfg) * forward, both - forward
  return {**_moe_param_memory(cfg, sh), "saved": saved, "recompute": recompute,
          "layer_forward": forward,
          "batch": _moe_routing_bytes(cfg, sh, rows, T) if replay else 0.0}


def _moe_sampling(cfg: transformer.ModelConfig, sh: _Sharder, smp: dict) -> dict[str, float]:
  """The MoE terms of one rollout call: the prefill's dispatch on its U x P tokens (forward) and
  the prompts' recorded experts [U, P, Lm, k]; decode's dispatch on R tokens and the response
  record [R, S - P, Lm, k] that the sampler carries through its loop (k15.sampling.sampler)."""
  U, P, R, S = smp["sequences"], smp["prompt_bucket"], smp["rows"], smp["cache_length"]
  record = _moe_routing_bytes(cfg, sh, R, S - P)
  return {"prefill": (_moe_dispatch(cfg, sh, U, P, backward=False)
                      + _moe_routing_bytes(cfg, sh, U, P) + record),
          "decode": _moe_dispatch(cfg, sh, R, 1, backward=False) + record,
          "routing_record": record}


def _default_shapes(config, prompt_len: int) -> tuple[int, int, int]:
  """(rows per gradient step, tokens per row, microbatches) from the rl or smoke block."""
  if "rl" in config:
    rl = config.rl
    rows = rl.minibatch_groups * rl.samples_per_prompt
    multiple = max(1, rl.get("length_bucket", 1))
    T = -(-(prompt_len + rl.max_new_tokens) // multiple) * multiple
    return rows, T, max(1, rl.get("microbatches", 1))
  if "smoke" in config:
    return config.smoke.batch, config.smoke.length, 1
  raise ValueError("config has neither an `rl` nor a `smoke` block; pass batch= and seq_len=")


def plan(config: Any, batch: int | None = None, seq_len: int | None = None,
         chip: str | None = None, *, num_chips: int | None = None, mfu: float = 0.4,
         peak_tflops: float | None = None, prompt_len: int | None = None,
         logits_chunk: int = 0, prefill_logits: str = "last") -> dict[str, Any]:
  """Memory per chip (bytes) and expected step time of `config`'s train step and sampler.

  Args:
    config: an ml-collections config with `model`, `mesh`, `sharding_rules` and optionally
      `optimizer`, `rl`, `smoke`, `accelerator_type`.
    batch: rows per gradient step (default: rl.minibatch_groups x k, else smoke.batch); the
      activations are those of one microbatch (rl.microbatches).
    seq_len: tokens per row (default: prompt + rl.max_new_tokens, else smoke.length).
    chip: 'v4' | 'v5e' | 'v5p' | 'v6e' | 'cpu'; default from config.accelerator_type, else cpu.
    num_chips: devices of the mesh; default from config.accelerator_type, else the mesh's
      product when it has no -1 axis, else the local device count.
    mfu: model FLOP utilization assumed for the step time.
    peak_tflops: peak per chip; defaults to the chip table (none for cpu: no step time).
    prompt_len: prompt tokens (default config.rl.max_prompt_length if set, else 1024).
    logits_chunk: what-if: compute the head and log-probs in chunks of this many tokens
      (0 = the config's model.logits_chunk, as k15.update.token_logprobs does).
    prefill_logits: 'last': the sampler's prefill computes logits for the last prompt position
      only (as k15.sampling does); 'all': what-if it computed them at every position.
  """
  if prefill_logits not in ("all", "last"):
    raise ValueError(f"prefill_logits={prefill_logits!r}; expected 'all' or 'last'")
  accel = config.get("accelerator_type", "") or ""
  accel_chip, accel_n = accelerator_chips(accel) if accel else (None, None)
  chip = chip or accel_chip or "cpu"
  if chip not in CHIPS:
    raise ValueError(f"chip={chip!r}; expected one of {sorted(CHIPS)}")
  if num_chips is None:
    num_chips = accel_n
  if num_chips is None:
    sizes = dict(config.mesh.items())
    num_chips = (math.prod(sizes.values()) if -1 not in sizes.values()
                 else len(jax.devices()))
  try:
    mesh_sizes = parallel.mesh_shape(config.mesh, num_chips)
  except ValueError as e:
    raise ValueError(f"{e} (k15.plan: pass num_chips / --num_chips, or set "
                     f"config.accelerator_type, e.g. 'v5p-64')") from e
  sh = _Sharder(mesh_sizes, config.get("sharding_rules"))

  # A uniform MoE stack: model.mlp_dim sizes nothing, so the dense terms count no SwiGLU.
  cfg = _without_unused_mlp(transformer.ModelConfig.from_config(config.model))
  opt_cfg = config.optimizer if "optimizer" in config else k15_config.optimizer_block()
  optimizer = update.make_optimizer(opt_cfg)
  if prompt_len is None:
    prompt_len = (config.rl.get("max_prompt_length", 0) if "rl" in config else 0) or 1024
  rows, T, microbatches = _default_shapes(config, prompt_len)
  rows, T = batch or rows, seq_len or T
  if rows % microbatches:
    raise ValueError(f"batch={rows} rows is not divisible by rl.microbatches={microbatches}")
  Bm = rows // microbatches

  params, opt, layer_copy = _param_memory(cfg, sh, optimizer)
  grads = params  # parameter-shaped, in the param dtype, laid out like the params
  if microbatches > 1:
    grads *= 2  # the scan's accumulator next to one microbatch's gradients
  # XLA:CPU and XLA:TPU keep different buffers (see `_tpu_activations`); `chip` says which.
  tpu = chip != "cpu"
  chunk = logits_chunk or cfg.logits_chunk
  act = (_tpu_activations(cfg, sh, Bm, T, chunk) if tpu
         else _activations(cfg, sh, Bm, T, layer_copy, chunk))
  batch_bytes = sh.per_chip(("batch", None), (rows, T), 20)  # tokens, positions, ids, mask, logp
  moe = (_moe_plan(cfg, sh, Bm, T, rows, "rl" in config and config.rl.get("routing_replay", False))
         if cfg.num_experts else {})
  if moe:  # the experts' dispatch, and the replayed routing in the batch
    act = dict(act, saved=act["saved"] + moe["saved"],
               recompute=act["recompute"] + moe["recompute"])
    batch_bytes += moe["batch"]
  activations = act["saved"] + act["recompute"]
  backward = grads + activations + act["logits"]
  update_phase = 2.25 * params
  train_peak = params + opt + batch_bytes + max(backward, update_phase)

  # The reference pass (forward only): params, the batch, one layer's intermediates next to
  # the residual stream, and one tile's logits with their exp (2 of the copies above).
  # On TPU the larger of the embedding lookup and the head (`_tpu_activations`).
  if tpu:
    ref_logprobs = params + batch_bytes + act["reference"]
  else:
    one_layer = _activations(dataclasses.replace(cfg, remat="full"), sh, Bm, T, layer_copy,
                             chunk)
    ref_logprobs = params + batch_bytes + one_layer["recompute"] + 2 * one_layer["logits_tile"]
  ref_logprobs += moe.get("layer_forward", 0.0)

  out: dict[str, Any] = {
      "chip": chip, "chip_name": CHIPS[chip].name, "num_chips": num_chips,
      "hbm_bytes": CHIPS[chip].hbm_gib * GiB, "mesh": mesh_sizes,
      "model": {"params": cfg.num_params(), "param_dtype": cfg.param_dtype,
                "dtype": cfg.dtype, "remat": cfg.remat, "attention_impl": cfg.attention_impl},
      "train": {"rows": rows, "seq_len": T, "microbatches": microbatches,
                "params": params, "opt_state": opt, "grads": grads, "batch": batch_bytes,
                "activations": activations, "activations_saved": act["saved"],
                "activations_recompute": act["recompute"], "logits": act["logits"],
                "update_phase": update_phase, "peak": train_peak},
      "ref_logprobs": ref_logprobs,
  }
  if moe:
    out["moe"] = {key: moe[key] for key in ("experts", "router", "opt_state", "gathered_layer",
                                            "layer_forward", "batch")}
    out["moe"]["dispatch"] = moe["saved"] + moe["recompute"]
  if "rl" in config:
    smp = _sampling(cfg, sh, config.rl, prompt_len, prefill_logits, tpu)
    if moe:
      moe_smp = _moe_sampling(cfg, sh, smp)
      smp.update(prefill=smp["prefill"] + moe_smp["prefill"],
                 decode=smp["decode"] + moe_smp["decode"],
                 decode_paged=smp["decode_paged"] + moe_smp["decode"],
                 routing_record=moe_smp["routing_record"])
    # With the optimizer reset each iteration its moments exist only while training
    # (k15.rl.trainer creates them after sampling and drops them after the last update).
    resident_opt = 0.0 if config.rl.get("reset_optimizer", False) else opt
    smp["opt_state"] = resident_opt
    smp["peak"] = params + resident_opt + smp["kv_cache"] + max(smp["prefill"], smp["decode"])
    out["sampling"] = smp
  peak = max(out["train"]["peak"], out.get("sampling", {}).get("peak", 0.0))
  out["peak"] = peak
  out["fits"] = peak <= out["hbm_bytes"]

  # Step time at the given MFU.
  tokens = rows * T
  flops = train_flops(cfg, rows, T)
  peak_tflops = peak_tflops or CHIPS[chip].peak_tflops
  out["train"]["flops"] = float(flops)
  out["train"]["tokens"] = tokens
  out["mfu"] = mfu
  out["peak_tflops"] = peak_tflops
  if peak_tflops:
    step_s = flops / (num_chips * peak_tflops * 1e12 * mfu)
    out["train"]["step_s"] = step_s
    out["train"]["tokens_per_s_per_chip"] = tokens / step_s / num_chips
    if "rl" in config:
      rl = config.rl
      steps = -(-rl.prompts_per_iteration // rl.minibatch_groups) * rl.num_passes
      out["train"]["steps_per_iteration"] = steps
      out["train"]["iteration_train_s"] = steps * step_s
  if "sampling" in out and CHIPS[chip].hbm_gbps:
    # A decode step reads every weight (compute dtype) and the whole cache at least once.
    read = params * _itemsize(cfg.dtype) / _itemsize(cfg.param_dtype) + out["sampling"]["kv_cache"]
    out["sampling"]["decode_step_s_min"] = read / (CHIPS[chip].hbm_gbps * 1e9)
  return out


def format_plan(p: dict[str, Any]) -> str:
  """A readable table of `plan(...)`'s result."""
  g = lambda x: f"{x / GiB:9.2f} GiB"
  m, t = p["model"], p["train"]
  lines = [
      f"{p['chip_name']} x {p['num_chips']}  mesh {p['mesh']}  HBM {g(p['hbm_bytes']).strip()}"
      f" per chip",
      f"model: {m['params'] / 1e9:.3f}B params, param_dtype={m['param_dtype']}, "
      f"dtype={m['dtype']}, remat={m['remat']}, attention={m['attention_impl']}",
      "",
      f"train step: {t['rows']} rows x {t['seq_len']} tokens, {t['microbatches']} microbatch(es)"
      "   (per chip)",
      f"  parameters            {g(t['params'])}",
      f"  optimizer state       {g(t['opt_state'])}",
      f"  gradients             {g(t['grads'])}",
      f"  batch                 {g(t['batch'])}",
      f"  activations (saved)   {g(t['activations_saved'])}",
      f"  activations (1 layer) {g(t['activations_recompute'])}",
      f"  head (log-probs)      {g(t['logits'])}",
      f"  update phase          {g(t['update_phase'])}",
      f"  peak                  {g(t['peak'])}",
  ]
  if "moe" in p:
    mo = p["moe"]
    lines += [
        "  mixture of experts (included above):",
        f"    expert weights      {g(mo['experts'])}   (router {g(mo['router']).strip()})",
        f"    their Adam moments  {g(mo['opt_state'])}",
        f"    1 layer's experts   {g(mo['gathered_layer'])}   (as the dispatch reads them)",
        f"    dispatch            {g(mo['dispatch'])}   (1 layer forward: "
        f"{g(mo['layer_forward']).strip()})",
        f"    replayed routing    {g(mo['batch'])}   (in the batch)",
    ]
  if "sampling" in p:
    s = p["sampling"]
    lines += [
        "",
        f"sampling (one rollout call, worst case): {s['rows']} rows ({s['new_rows']} new + "
        f"{s['continued_rows']} continued), {s['sequences']} sequences prefilled at "
        f"{s['prompt_bucket']} tokens, cache length {s['cache_length']}   (per chip)",
        f"  KV cache              {g(s['kv_cache'])}",
        f"  prefill transient     {g(s['prefill'])}   (of which logits at "
        f"{s['prefill_logits_mode']} positions {g(s['prefill_logits']).strip()})",
        f"  decode transient      {g(s['decode'])}",
    ] + ([f"  routing record        {g(s['routing_record'])}   (in both transients: each "
          f"token's experts, for replay)"] if "routing_record" in s else []) + [
        f"  peak                  {g(s['peak'])}   (params + optimizer state + cache + "
        f"transient)",
    ]
    if "decode_step_s_min" in s:
      lines.append(f"  decode step >= {s['decode_step_s_min'] * 1e3:.1f} ms (weights + cache "
                   f"read once from HBM)")
  lines.append("")
  if "step_s" in t:
    lines.append(f"expected train step at MFU {p['mfu']:.2f} of {p['peak_tflops']:g} TFLOP/s: "
                 f"{t['step_s']:.3f} s ({t['flops'] / 1e15:.2f} PFLOP, "
                 f"{t['tokens_per_s_per_chip']:,.0f} tokens/s/chip)")
    if "iteration_train_s" in t:
      lines.append(f"  {t['steps_per_iteration']} steps per RL iteration: "
                   f"{t['iteration_train_s']:.1f} s of training")
  else:
    lines.append(f"train step: {t['flops'] / 1e12:.2f} TFLOP (pass --peak_tflops for a time)")
  if m["remat"] != "none":
    lines.append(f"note: remat={m['remat']} figures assume each layer is recomputed right "
                 "before its backward (see the module docstring on XLA scheduling)")
  verdict = "fits" if p["fits"] else "does not fit"
  lines.append(f"peak {g(p['peak']).strip()} of {g(p['hbm_bytes']).strip()}: {verdict}")
  if not p["fits"]:
    lines.append(f"WARNING: the config does not fit: peak {g(p['peak']).strip()} per chip > "
                 f"{p['chip_name']} HBM {g(p['hbm_bytes']).strip()}")
  return "\n".join(lines)


def _measure_cpu_tflops() -> float:
  """float32 matmul FLOP/s of this host (a 2048^2 jnp.dot, best of 3)."""
  import time  # pylint: disable=g-import-not-at-top
  n = 2048
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e12


def main(argv=None) -> int:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  cfg_flag = config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py",
                                             "ml-collections config file[:args]",
                                             lock_config=True)
  chip = flags.DEFINE_enum("chip", None, sorted(CHIPS), "Chip; default from "
                           "config.accelerator_type, else cpu.")
  num_chips = flags.DEFINE_integer("num_chips", None, "Devices of the mesh; default from "
                                   "config.accelerator_type.")
  batch = flags.DEFINE_integer("batch", None, "Rows per gradient step.")
  seq_len = flags.DEFINE_integer("seq_len", None, "Tokens per row.")
  prompt_len = flags.DEFINE_integer("prompt_len", None, "Prompt tokens (RL configs).")
  mfu = flags.DEFINE_float("mfu", 0.4, "Model FLOP utilization for the step time.")
  peak = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per chip (default: chip "
                            "table; cpu: measured float32 matmul).")
  chunk = flags.DEFINE_integer("logits_chunk", 0, "What-if: head and log-probs in chunks of "
                               "this many tokens (0 = the config's model.logits_chunk).")
  prefill = flags.DEFINE_enum("prefill_logits", "last", ["all", "last"], "'last' (k15.sampling) "
                              "= the sampler's prefill computes the last position's logits "
                              "only; 'all' shows the cost of logits at every position.")
  strict = flags.DEFINE_bool("strict", False, "Exit with code 1 when the config does not fit.")

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    config = cfg_flag.value
    chosen = chip.value or (accelerator_chips(config.accelerator_type)[0]
                            if config.get("accelerator_type", "") else "cpu")
    peak_tflops = peak.value
    if peak_tflops is None and chosen == "cpu":
      peak_tflops = _measure_cpu_tflops()
    p = plan(config, batch.value, seq_len.value, chosen, num_chips=num_chips.value,
             mfu=mfu.value, peak_tflops=peak_tflops, prompt_len=prompt_len.value,
             logits_chunk=chunk.value, prefill_logits=prefill.value)
    print(format_plan(p))
    if strict.value and not p["fits"]:
      sys.exit(1)

  app.run(run, argv=argv)
  return 0


if __name__ == "__main__":
  main()
