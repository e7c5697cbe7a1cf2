"""Hugging Face checkpoints (Llama, Qwen2, Qwen3, Qwen3-MoE) to and from k15, tensor by tensor.

`load(path)` reads config.json and the *.safetensors shards of a checkpoint directory into a
k15 Transformer placed on the active mesh. Each shard file is memory-mapped; every device's
slice of every parameter is cut from the mapped file by `jax.make_array_from_callback`, so
the host never holds a second full copy of the weights, and on a pod each host reads only the
slices its own devices hold.

`save(model, path)` writes config.json and safetensors shards (with an index when there are
several) that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Layouts: transformers stores a projection as [out_features, in_features]; k15 stores einsum
kernels with named head axes, e.g. q as [D, N, H], and stacks a layer's experts on one axis where
transformers writes one tensor per expert. The converters below are views (reshape
and transpose of the mapped array), so only the requested slice is ever read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from k15 import parallel
from k15.model import transformer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
_ARCH_OF = {family: arch for arch, family in ARCHITECTURES.items()}

_ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint directory that k15 cannot read; the message names the file and tensor."""


# ---------------------------------------------------------------------------------------------
# safetensors, read and written directly: memory-mapped reads give per-slice access, and bf16
# round-trips through ml_dtypes.
# ---------------------------------------------------------------------------------------------

def read_safetensors_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
  return header, 8 + n


def open_safetensors(path: str) -> dict[str, np.ndarray]:
  """Name -> read-only memory-mapped array, for every tensor of one safetensors file."""
  header, start = read_safetensors_header(path)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != count * np.dtype(dtype).itemsize:
      raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape "
                            f"{shape} and dtype {info['dtype']}")
    out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, arr in tensors.items():
    nbytes = arr.size * arr.dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in tensors.values():
      f.write(np.ascontiguousarray(arr).tobytes())
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

def _rope_scaling(hf: dict, rope: dict, source: str) -> dict:
  """transformers' rope parameters -> `ModelConfig.rope_scaling` (empty for plain RoPE), with
  the defaults transformers fills in (`standardize_rope_params`, `_compute_yarn_parameters`)."""
  rope_type = rope.get("rope_type", rope.get("type"))
  if rope_type in (None, "default"):
    return {}
  if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{source}: partial_rotary_factor={rope['partial_rotary_factor']} is "
                          "not supported")
  scaling = {k: v for k, v in rope.items()
             if k not in ("type", "rope_theta", "partial_rotary_factor") and v is not None}
  scaling["rope_type"] = rope_type
  if rope_type in transformer.ROPE_TYPES:
    # Phi-3-style configs keep the pretraining length at the top level; it then wins.
    original = hf.get("original_max_position_embeddings") or scaling.get(
        "original_max_position_embeddings") or hf.get("max_position_embeddings")
    scaling["original_max_position_embeddings"] = original
    if rope_type == "yarn" and scaling.get("factor") is None and original:
      scaling["factor"] = hf["max_position_embeddings"] / original
  try:
    transformer.check_rope_scaling(scaling)
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e
  return scaling


def config_from_hf(hf: dict, source: str = "config.json") -> transformer.ModelConfig:
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in ARCHITECTURES), None)
  if arch is None:
    arch = _ARCH_OF.get(hf.get("model_type"))
  if arch is None:
    raise CheckpointError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r};"
                          f" k15 reads {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[arch]
  # transformers 4.x writes rope_theta / rope_scaling; 5.x writes rope_parameters.
  rope = dict(hf.get("rope_scaling") or {})
  rope.update(hf.get("rope_parameters") or {})
  rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = _rope_scaling(hf, rope, source)
  if family != "qwen2" and hf.get("attention_bias"):
    raise CheckpointError(f"{source}: {arch} with attention_bias=true (biases on q/k/v and o) is "
                          "not supported; Qwen2's q/k/v biases are")
  if hf.get("mlp_bias"):
    raise CheckpointError(f"{source}: mlp_bias=true is not supported")
  if family != "llama" and hf.get("use_sliding_window"):
    raise CheckpointError(f"{source}: use_sliding_window=true is not supported")
  moe = {}
  try:
    if family == "qwen3_moe":
      num_experts = hf.get("num_experts", hf.get("num_local_experts"))
      step = int(hf.get("decoder_sparse_step", 1))
      dense = set(hf.get("mlp_only_layers") or ())
      moe = dict(num_experts=num_experts, experts_per_token=hf["num_experts_per_tok"],
                 moe_mlp_dim=hf["moe_intermediate_size"],
                 norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                 moe_dense_layers=tuple(i for i in range(hf["num_hidden_layers"])
                                        if i in dense or (i + 1) % step))
    n_heads = hf["num_attention_heads"]
    return transformer.ModelConfig(
        vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        mlp_dim=hf["intermediate_size"], rope_theta=rope_theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2", qk_norm=family in ("qwen3", "qwen3_moe"), **moe)
  except KeyError as e:
    raise CheckpointError(f"{source}: missing key {e.args[0]!r}") from e


def position_limit(hf: dict, source: str = "config.json") -> tuple[int, str]:
  """(the longest sequence, prompt + response, that a checkpoint supports; how config.json gives it).

  Past `max_position_embeddings` RoPE turns to angles the model never saw in training, and its
  output degrades without any error, so k15 refuses such lengths. YaRN `rope_scaling` (the way
  Qwen2.5's model cards extend the context) stretches the usable range to
  original_max_position_embeddings x factor. 0: config.json names no limit.
  """
  limit = int(hf.get("max_position_embeddings") or 0)
  why = f"max_position_embeddings={limit}"
  scaling = dict(config_from_hf(hf, source).rope_scaling)
  if scaling.get("rope_type") == "yarn":
    original, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    if int(original * factor) > limit:
      limit = int(original * factor)
      why = (f"YaRN rope_scaling: original_max_position_embeddings={original} x "
             f"factor={factor}")
  return limit, why


def check_positions(hf: dict, length: int, what: str, source: str = "config.json") -> None:
  """Raises when `length` positions (`what` says where the length comes from) are past the
  checkpoint's limit (`position_limit`), naming both and how to extend the context."""
  limit, why = position_limit(hf, source)
  if not limit or length <= limit:
    return
  original = dict(config_from_hf(hf, source).rope_scaling).get(
      "original_max_position_embeddings") or int(hf["max_position_embeddings"])
  factor = float(2 ** math.ceil(math.log2(length / original)))
  raise CheckpointError(
      f"{source}: {what} = {length} positions, past the {limit} the checkpoint supports "
      f"({why}); shorten them, or extend the context with YaRN: in config.json set "
      f'"rope_scaling": {{"type": "yarn", "factor": {factor}, '
      f'"original_max_position_embeddings": {original}}} (factor >= {length}/{original})'
      + (", the same keys in its rope_parameters" if hf.get("rope_parameters") else ""))


def config_to_hf(cfg: transformer.ModelConfig, family: str, dtype: str) -> dict:
  scaling = dict(cfg.rope_scaling)
  out = {
      "architectures": [_ARCH_OF[family]], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.mlp_dim, "rope_theta": cfg.rope_theta,
      "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu", "max_position_embeddings": 32768, "torch_dtype": dtype,
      # Both spellings, for transformers 4.x (rope_scaling) and 5.x (rope_parameters).
      "rope_scaling": scaling or None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **scaling},
  }
  if family == "llama":
    out["attention_bias"] = False
    out["mlp_bias"] = False
  else:
    out["use_sliding_window"] = False
  if family in ("qwen3", "qwen3_moe"):
    out["attention_bias"] = False
  if family == "qwen3_moe":
    out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=cfg.moe_mlp_dim, norm_topk_prob=cfg.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=list(cfg.moe_dense_layers))
  return out


# ---------------------------------------------------------------------------------------------
# Parameter name and layout mapping. Each entry: k15 path -> (HF name, view HF->k15, view k15->HF)
# ---------------------------------------------------------------------------------------------

def _mapping(cfg: transformer.ModelConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
  D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  ident = lambda w: w
  transpose = lambda w: w.T
  m: dict[tuple, tuple[str, Callable, Callable]] = {
      ("embed",): ("model.embed_tokens.weight", ident, ident),
      ("final_norm", "scale"): ("model.norm.weight", ident, ident),
  }
  if not cfg.tie_embeddings:
    m[("lm_head",)] = ("lm_head.weight", transpose, transpose)
  for i in range(cfg.num_layers):
    hf = f"model.layers.{i}."
    # [n*H, D] (out, in) <-> [D, n, H]
    def qkv(n):
      return (lambda w: w.reshape(n, H, D).transpose(2, 0, 1),
              lambda w: w.transpose(1, 2, 0).reshape(n * H, D))
    layer = {
        ("attn", "q"): ("self_attn.q_proj.weight", *qkv(N)),
        ("attn", "k"): ("self_attn.k_proj.weight", *qkv(K)),
        ("attn", "v"): ("self_attn.v_proj.weight", *qkv(K)),
        # [D, N*H] <-> [N, H, D]
        ("attn", "o"): ("self_attn.o_proj.weight",
                        lambda w: w.reshape(D, N, H).transpose(1, 2, 0),
                        lambda w: w.transpose(2, 0, 1).reshape(D, N * H)),
        ("mlp", "gate"): ("mlp.gate_proj.weight", transpose, transpose),
        ("mlp", "up"): ("mlp.up_proj.weight", transpose, transpose),
        ("mlp", "down"): ("mlp.down_proj.weight", transpose, transpose),
        ("attn_norm", "scale"): ("input_layernorm.weight", ident, ident),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", ident, ident),
    }
    if cfg.qk_norm:
      layer[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", ident, ident)
      layer[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", ident, ident)
    if cfg.is_moe_layer(i):
      # transformers writes one tensor per expert: [F, D] gate/up and [D, F] down (out, in).
      E = cfg.num_experts
      layer[("mlp", "router")] = ("mlp.gate.weight", transpose, transpose)
      for name in ("gate", "up", "down"):
        layer[("mlp", name)] = (tuple(f"mlp.experts.{e}.{name}_proj.weight" for e in range(E)),
                                lambda ws: _Stacked([w.T for w in ws]),
                                lambda w: [x.T for x in w])
    if cfg.qkv_bias:
      for name, n in (("q", N), ("k", K), ("v", K)):
        layer[("attn", f"{name}_bias")] = (f"self_attn.{name}_proj.bias",
                                           lambda w, n=n: w.reshape(n, H),
                                           lambda w, n=n: w.reshape(n * H))
    for path, val in layer.items():
      names = hf + val[0] if isinstance(val[0], str) else tuple(hf + n for n in val[0])
      m[("layers", i) + path] = (names,) + val[1:]
  if cfg.scanned:
    # Stacked layers: one k15 array from the L per-layer tensors, read lazily like the experts.
    L = cfg.num_layers
    for path in [p[2:] for p in m if p[:2] == ("layers", 0)]:
      per_layer = [m.pop(("layers", i) + path) for i in range(L)]
      _, to_k15, to_hf = per_layer[0]
      m[("layers",) + path] = (tuple(v[0] for v in per_layer),
                               lambda ws, f=to_k15: _Stacked([f(w) for w in ws]),
                               lambda w, f=to_hf, L=L: [f(w[i]) for i in range(L)])
  return m


class _Stacked:
  """A lazy np.stack of per-expert views: indexing reads only the requested slice of each."""

  def __init__(self, parts):
    self.parts = parts

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    idx = idx or (slice(None),)
    rest = idx[1:]
    return np.stack([np.asarray(self.parts[e][rest]) for e in range(len(self.parts))[idx[0]]])


def _index_checkpoint(path: str) -> dict[str, str]:
  """HF tensor name -> the shard file that holds it."""
  index_file = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index_file):
    with open(index_file) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index_file}: no weight_map")
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files (k15 does not read .bin checkpoints)")
  out = {}
  for fname in files:
    full = os.path.join(path, fname)
    header, _ = read_safetensors_header(full)
    out.update({k: full for k in header if k != "__metadata__"})
  return out


def load(path: str, dtype=jnp.float32, *, mesh=None, rules=None,
         config_overrides: dict | None = None) -> transformer.Transformer:
  """Loads a Llama / Qwen2 / Qwen3 / Qwen3-MoE checkpoint directory into a k15 Transformer on
  the mesh.

  dtype is the parameter dtype; compute dtype and attention implementation can be set through
  `config_overrides` (e.g. {'dtype': 'bfloat16', 'attention_impl': 'flash'}).
  """
  mesh = mesh or parallel.active_mesh()
  if mesh is None:
    mesh = parallel.make_mesh({"data": -1})
  config_file = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory")
  if not os.path.exists(config_file):
    raise CheckpointError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
  with open(config_file) as f:
    hf_cfg = json.load(f)
  cfg = config_from_hf(hf_cfg, config_file)
  overrides = dict(config_overrides or {})
  overrides["param_dtype"] = jnp.dtype(dtype).name
  cfg = transformer.ModelConfig(**{**cfg.__dict__, **overrides})

  location = _index_checkpoint(path)
  opened: dict[str, dict[str, np.ndarray]] = {}

  def hf_tensor(name: str) -> np.ndarray:
    if name not in location:
      raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
    file = location[name]
    if file not in opened:
      if not os.path.exists(file):
        raise CheckpointError(f"{file}: shard file listed in the index does not exist")
      opened[file] = open_safetensors(file)
    if name not in opened[file]:
      raise CheckpointError(f"{file}: tensor {name!r} is missing from this shard")
    return opened[file][name]

  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  shardings = parallel.state_shardings(abstract_state, mesh, rules)
  mapping = _mapping(cfg)
  flat = nnx.to_flat_state(abstract_state)
  flat_shard = dict(nnx.to_flat_state(shardings))
  np_dtype = np.dtype(jnp.dtype(dtype))
  values = []
  for key, var in flat:
    if key not in mapping:
      raise CheckpointError(f"k15 parameter {'/'.join(map(str, key))} has no checkpoint mapping")
    hf_names, to_k15, to_hf = mapping[key]
    # hf_names: one name, or (nested) tuples of names that stack into one k15 array (experts,
    # and the layers of a scanned model); `raw` has the same structure.
    want = jax.tree.leaves(jax.eval_shape(to_hf, jax.ShapeDtypeStruct(var.shape, np.float32)))
    raw = jax.tree.map(hf_tensor, hf_names)
    for hf_name, r, w in zip(jax.tree.leaves(hf_names), jax.tree.leaves(raw), want):
      if tuple(r.shape) != tuple(w.shape):
        raise CheckpointError(f"{location[hf_name]}: tensor {hf_name!r} has shape "
                              f"{tuple(r.shape)}, but config.json implies {tuple(w.shape)}")
    view = to_k15(raw)
    sharding = flat_shard[key].value
    arr = jax.make_array_from_callback(
        var.shape, sharding, lambda idx, v=view: np.asarray(v[idx], dtype=np_dtype))
    values.append((key, var.replace(value=arr)))
  state = nnx.from_flat_state(values)
  return nnx.merge(graphdef, state)


def _host_array(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _PerLayer:
  """A stacked [L, ...] device array whose `[i]` gathers layer i alone to the host."""

  def __init__(self, value: jax.Array):
    self.value = value

  def __getitem__(self, i: int) -> np.ndarray:
    return _host_array(self.value[i])


def save(model: transformer.Transformer, path: str, *, family: str | None = None,
         dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `model` as a transformers checkpoint (config.json + safetensors shards).

  family: 'llama', 'qwen2', 'qwen3' or 'qwen3_moe'; by default the one the model config describes
  (`ModelConfig.family`: experts -> qwen3_moe, q/k norms -> qwen3, q/k/v biases -> qwen2, else
  llama), and a family that contradicts it is refused. dtype: 'float32' | 'bfloat16' |
  'float16', default the parameter dtype. Parameters are gathered to the host one at a time;
  only process 0 writes.
  """
  cfg = model.cfg
  if family is not None and family not in _ARCH_OF:
    raise ValueError(f"family={family!r}; expected one of {sorted(_ARCH_OF)}")
  if family is not None and family != cfg.family:
    raise ValueError(f"family={family!r}, but the model config describes {cfg.family!r} "
                     f"(qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm}, "
                     f"num_experts={cfg.num_experts}); Qwen2 has q/k/v biases and Llama has none")
  family = cfg.family
  dtype = dtype or cfg.param_dtype
  np_dtype = np.dtype(transformer.to_dtype(dtype))
  write = jax.process_index() == 0
  if write:
    os.makedirs(path, exist_ok=True)
  mapping = _mapping(cfg)
  state = nnx.state(model, nnx.Param)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, var in nnx.to_flat_state(state):
    hf_names, _, to_hf = mapping[key]
    # A scanned model's stacked parameter comes to the host one layer at a time.
    value = (_PerLayer(var.value) if cfg.scanned and key[0] == "layers"
             else _host_array(var.value))
    arrs = to_hf(value)
    for hf_name, arr in zip(jax.tree.leaves(hf_names), jax.tree.leaves(arrs)):
      arr = np.ascontiguousarray(arr).astype(np_dtype)
      if size and size + arr.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][hf_name] = arr
      size += arr.nbytes
  if not write:
    return
  names = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
           if len(shards) > 1 else ["model.safetensors"])
  weight_map = {}
  for fname, tensors in zip(names, shards):
    write_safetensors(os.path.join(path, fname), tensors)
    weight_map.update({k: fname for k in tensors})
  if len(shards) > 1:
    total = sum(a.nbytes for s in shards for a in s.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg, family, dtype), f, indent=2)
  logging.info("wrote %d tensors to %s", len(weight_map), path)
