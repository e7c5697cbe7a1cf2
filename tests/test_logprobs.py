"""Chunked log-probs (k15.model.logprobs) == whole-row log-softmax, values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15 import parallel
from k15.model import logprobs, transformer

CFG = transformer.ModelConfig(vocab_size=97, embed_dim=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=64)


def _data(b=4, t=23, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (b, t)), jnp.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, 15:] = 2            # two packed segments
  seg[2, 19:] = 0            # right padding
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    for i in range(1, t):
      pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
  w = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
  return tokens, jnp.asarray(pos), jnp.asarray(seg), w


def _value_and_grads(model, chunk, tokens, pos, seg, w):
  graphdef, params = nnx.split(model)

  def f(params):
    lp, ent = logprobs.token_logprobs_and_entropy(nnx.merge(graphdef, params), tokens, pos, seg,
                                                  chunk=chunk)
    return jnp.sum(w * lp) + 0.3 * jnp.sum(w * ent), (lp, ent)

  (_, (lp, ent)), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return lp, ent, grads


def _full_reference(model, tokens, pos, seg):
  """log_softmax of the whole-row logits, written out here independently of the module."""
  logits = model(tokens, positions=pos, segment_ids=seg)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.pad(picked, ((0, 0), (1, 0))), jnp.pad(ent, ((0, 0), (1, 0)))


@pytest.mark.parametrize("tie,chunk", [(True, 5), (False, 8)])
def test_chunked_equals_full_log_softmax_and_gradients(tie, chunk):
  # 22 predicted positions: chunk 5 leaves a partial last tile, chunk 8 too (3 tiles).
  model = transformer.Transformer(dataclasses.replace(CFG, tie_embeddings=tie),
                                  rngs=nnx.Rngs(1))
  tokens, pos, seg, w = _data()
  lp_ref, ent_ref = _full_reference(model, tokens, pos, seg)
  lp, ent, grads = _value_and_grads(model, chunk, tokens, pos, seg, w)
  _, _, grads_full = _value_and_grads(model, 0, tokens, pos, seg, w)
  np.testing.assert_allclose(lp, lp_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(ent, ent_ref, atol=1e-5, rtol=0)
  assert float(jnp.abs(ent).min()) == 0.0 and float(ent[:, 1:].min()) > 0.1
  for (path, g), (_, g_full) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree_util.tree_leaves_with_path(grads_full)):
    scale = max(1.0, float(jnp.abs(g_full).max()))
    np.testing.assert_allclose(g, g_full, atol=1e-5 * scale, rtol=0, err_msg=str(path))


def test_one_tile_is_the_whole_row_computation_bit_for_bit():
  # chunk >= the 22 predicted positions runs the whole-row code: identical to chunk 0.
  model = transformer.Transformer(CFG, rngs=nnx.Rngs(2))
  tokens, pos, seg, w = _data()
  lp0, ent0, g0 = _value_and_grads(model, 0, tokens, pos, seg, w)
  lp1, ent1, g1 = _value_and_grads(model, 22, tokens, pos, seg, w)
  assert np.array_equal(lp0, lp1) and np.array_equal(ent0, ent1)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))


def test_chunked_on_a_mesh_with_the_vocab_split():
  # Vocab over a 2-way tensor axis, rows over 4-way data: same values as unsharded.
  cfg = dataclasses.replace(CFG, vocab_size=96, logits_chunk=8)
  tokens, pos, seg, w = _data()
  tokens = tokens % 96
  mesh = parallel.make_mesh(dict(data=4, tensor=2))
  with parallel.use_mesh(mesh):
    model = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(3)), mesh)
    lp, _, _ = _value_and_grads(model, None, tokens, pos, seg, w)
  lp_ref, _ = _full_reference(nnx.merge(*nnx.split(model)), tokens, pos, seg)
  np.testing.assert_allclose(lp, lp_ref, atol=1e-5, rtol=0)


def test_chunked_backward_holds_no_whole_row_logits():
  # At 2 x 256 tokens and an 8192 vocab the whole-row logits are 16 MiB; the compiled backward
  # with 8-token tiles (0.5 MiB of logits each, a few copies live at once) must need far less
  # temporary memory than the whole-row one.
  cfg = dataclasses.replace(CFG, vocab_size=8192, num_layers=1)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(4))
  graphdef, params = nnx.split(model)
  tokens = jnp.zeros((2, 256), jnp.int32)

  def temp_bytes(chunk):
    def f(params):
      lp, _ = logprobs.token_logprobs_and_entropy(nnx.merge(graphdef, params), tokens,
                                                  chunk=chunk)
      return jnp.sum(lp)
    compiled = jax.jit(jax.grad(f)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole, tiled = temp_bytes(0), temp_bytes(8)
  logits_bytes = 2 * 256 * 8192 * 4
  assert whole >= logits_bytes, whole
  # Less than one whole-row logits array in all (the rest is parameter-sized gradients).
  assert tiled < logits_bytes and tiled < whole / 4, (tiled, whole)
