"""The shared train step: microbatching equals one big batch; non-finite steps are skipped."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from k15 import parallel, update
from k15.model import transformer

CFG = transformer.ModelConfig(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=8, mlp_dim=32)
OPT = ml_collections.ConfigDict(dict(learning_rate=1e-2, grad_clip=0.0))


def _loss(model, batch):
  logp = update.token_logprobs(model, batch["tokens"])
  return -jnp.mean(logp[:, 1:]) * batch["scale"][0], {"logp": jnp.mean(logp)}


def _setup(mesh):
  model = parallel.create_sharded(lambda: transformer.Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
  graphdef, params = nnx.split(model)
  ps = parallel.state_shardings(params, mesh)
  opt = update.make_optimizer(OPT)
  opt_state, osh = update.init_optimizer_state(opt, params, ps, mesh)
  return graphdef, params, ps, opt, opt_state, osh


def _batch(scale=1.0):
  toks = np.random.RandomState(0).randint(0, 32, (8, 12)).astype(np.int32)
  return {"tokens": jnp.asarray(toks), "scale": jnp.full((8,), scale, jnp.float32)}


def test_microbatches_match_one_batch_and_shardings_hold():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    results = []
    for mb in (1, 4):
      graphdef, params, ps, opt, opt_state, osh = _setup(mesh)
      step = update.make_train_step(graphdef, _loss, opt, microbatches=mb, param_shardings=ps,
                                    opt_shardings=osh, donate=False)
      new_params, new_opt, m = step(params, opt_state, _batch())
      results.append((new_params, float(m["loss"])))
      q = new_params["layers"][0]["attn"]["q"][...]
      assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
      mu = jax.tree.leaves(new_opt)[1]
      assert not mu.sharding.is_fully_replicated or mu.ndim < 2
  (p1, l1), (p4, l4) = results
  assert abs(l1 - l4) < 1e-5
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_non_finite_loss_skips_the_update_and_training_goes_on():
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    graphdef, params, ps, opt, opt_state, osh = _setup(mesh)
    step = update.make_train_step(graphdef, _loss, opt, param_shardings=ps, opt_shardings=osh,
                                  donate=False)
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    params2, opt2, m = step(params, opt_state, _batch(scale=np.nan))
    assert float(m["skipped"]) == 1.0
    for a, b in zip(before, jax.tree.leaves(params2)):
      np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt2)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params3, _, m = step(params2, opt2, _batch())
    assert float(m["skipped"]) == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params3))
    assert any(not np.array_equal(a, np.asarray(b))
               for a, b in zip(before, jax.tree.leaves(params3)))


def _group_loss(model, batch):
  # A per-group loss like PMD's: each row's advantage is its reward minus its group's mean.
  logp = update.token_logprobs(model, batch["tokens"])[:, 1:].sum(-1)        # [G * k]
  r = batch["rewards"]                                                         # [G, k]
  adv = (r - r.mean(axis=1, keepdims=True)).reshape(-1)
  return -jnp.mean(adv * logp), {}


def _group_batch():
  rng = np.random.RandomState(1)
  return {"tokens": jnp.asarray(rng.randint(0, 32, (8, 12)).astype(np.int32)),
          "rewards": jnp.asarray(rng.rand(4, 2).astype(np.float32))}     # G = 4 groups of k = 2


def test_microbatches_split_group_arrays_with_their_rows_or_refuse():
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    graphdef, params, ps, opt, opt_state, osh = _setup(mesh)
    out = {}
    for mb in (1, 2, 4):
      step = update.make_train_step(graphdef, _group_loss, opt, microbatches=mb,
                                    param_shardings=ps, opt_shardings=osh, donate=False)
      out[mb] = step(params, opt_state, _group_batch())
    for mb in (2, 4):
      assert abs(float(out[mb][2]["loss"]) - float(out[1][2]["loss"])) < 1e-6
      for a, b in zip(jax.tree.leaves(out[mb][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # 8 microbatches of 4 groups would split groups: refused, naming the group-level entry.
    step = update.make_train_step(graphdef, _group_loss, opt, microbatches=8,
                                  param_shardings=ps, opt_shardings=osh, donate=False)
    with pytest.raises(ValueError, match=r"microbatches=8.*'rewards': \(4, 2\)"):
      step(params, opt_state, _group_batch())
