"""Layers under one scan (`model.scan_layers`): the same function as the Python loop of layers.

Each case builds an unscanned model, stacks its parameters into a scanned one, and compares
logits, gradients, routing, KV-cache decoding, the sampler and the Hugging Face round trip.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15.model import hf
from k15.model import transformer

BASE = dict(vocab_size=64, embed_dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
            mlp_dim=48)
KINDS = {
    "qwen2": dict(qkv_bias=True),
    "llama3": dict(tie_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "qwen3": dict(qk_norm=True),
    "qwen3_moe": dict(qk_norm=True, num_experts=4, experts_per_token=2, moe_mlp_dim=16),
}


def _pair(kind, **kw):
  """(unscanned model, scanned model with the same parameters)."""
  cfg = transformer.ModelConfig(**BASE, **KINDS[kind], **kw)
  loop = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  scanned = stack(loop)
  return loop, scanned


def stack(loop):
  """The scanned model holding `loop`'s parameters, layer i at index i of each stacked one."""
  cfg = dataclasses.replace(loop.cfg, scan_layers=True)
  assert cfg.scanned
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(1))
  loop_flat = {path: v.value for path, v in nnx.to_flat_state(nnx.state(loop))}

  def value(path):
    if path[0] != "layers":
      return loop_flat[path]
    return jnp.stack([loop_flat[("layers", i) + path[1:]] for i in range(cfg.num_layers)])

  nnx.update(model, nnx.from_flat_state([(path, v.replace(value=value(path)))
                                         for path, v in nnx.to_flat_state(nnx.state(model))]))
  return model


def _tokens(B=2, T=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (B, T), 0, BASE["vocab_size"])


@pytest.mark.parametrize("kind,remat", [(k, "none") for k in sorted(KINDS)] + [("qwen2", "full")])
def test_scanned_logits_and_gradients_equal_loop(kind, remat):
  loop, scanned = _pair(kind, remat=remat)
  tokens = _tokens()
  seg = jnp.array([[1] * 12, [0, 0] + [1] * 5 + [2] * 5], jnp.int32)   # padding and packing

  def loss(model):
    out = model(tokens, segment_ids=seg, return_routing=loop.cfg.num_experts > 0)
    logits = out[0] if isinstance(out, tuple) else out
    aux = (transformer.load_balancing_loss(out[1]["router_logits"], 2)
           if isinstance(out, tuple) else 0.0)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (seg > 0)) + aux, logits

  (l_loop, logits_loop), g_loop = nnx.value_and_grad(loss, has_aux=True)(loop)
  (l_scan, logits_scan), g_scan = nnx.value_and_grad(loss, has_aux=True)(scanned)
  np.testing.assert_allclose(logits_scan, logits_loop, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(l_scan, l_loop, atol=1e-6, rtol=1e-6)
  _assert_same_params(g_scan, g_loop, atol=1e-5)


def _assert_same_params(scanned_state, loop_state, atol):
  """A scanned model's (or gradient's) state equals the loop model's, layer by layer."""
  loop_flat = {path: v.value for path, v in nnx.to_flat_state(loop_state)}
  n = 0
  for path, v in nnx.to_flat_state(scanned_state):
    if path[0] == "layers":
      for i in range(v.value.shape[0]):
        np.testing.assert_allclose(v.value[i], loop_flat[("layers", i) + path[1:]], atol=atol,
                                   rtol=atol, err_msg=str(path))
        n += 1
    else:
      np.testing.assert_allclose(v.value, loop_flat[path], atol=atol, rtol=atol,
                                 err_msg=str(path))
      n += 1
  assert n == len(loop_flat)
