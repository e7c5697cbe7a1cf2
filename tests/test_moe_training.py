"""Mixture-of-experts training: the router's load-balancing loss in the SFT and RL losses
(model.router_aux_weight), and the tiny MoE reproduction config."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from k15 import sft, update
from k15.model import transformer
from k15.rl import trainer


def _cfg(**kw):
  return transformer.ModelConfig(**{**dict(
      vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, tie_embeddings=False, num_experts=4, experts_per_token=2, moe_mlp_dim=16),
      **kw})


def _batch(R=4, T=16, seed=0):
  """Left-padded rows (segment id 0 on the padding), as the SFT packer and the RL batch have."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 64, (R, T)).astype(np.int32)
  seg = np.ones((R, T), np.int32)
  seg[0, :5] = 0
  seg[2, :3] = 0
  pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
  mask = seg.copy()
  mask[:, :T // 2] = 0  # the "response" half
  return dict(tokens=jnp.asarray(tokens), positions=jnp.asarray(pos),
              segment_ids=jnp.asarray(seg), loss_mask=jnp.asarray(mask),
              mask=jnp.asarray(mask, jnp.float32),
              ref_logp=jnp.asarray(rng.normal(-3.0, 0.5, (R, T)), jnp.float32),
              rewards=jnp.asarray(rng.integers(0, 2, (R // 2, 2)), jnp.float32),
              sample_weight=jnp.ones((R // 2, 2), jnp.float32))


def _with_weight(model, w):
  """The same parameters under a config with router_aux_weight w."""
  graphdef, state = nnx.split(model)
  other = transformer.Transformer(dataclasses.replace(model.cfg, router_aux_weight=w),
                                  rngs=nnx.Rngs(0))
  nnx.update(other, state)
  return other


def _direct_aux(model, batch):
  """transformers' load-balancing loss straight from the model's routing, real tokens only."""
  _, routing = model(batch["tokens"], batch["positions"], batch["segment_ids"],
                     return_routing=True)
  return transformer.load_balancing_loss(routing["router_logits"], model.cfg.experts_per_token,
                                         batch["segment_ids"] > 0)


def _rl_loss():
  rl_cfg = ml_collections.ConfigDict(dict(loss="pmd", tau=0.1, clip_eps=0.2))
  return trainer.make_loss_fn(rl_cfg, k=2)


def _router_grad(loss_fn, model, batch):
  grads = nnx.grad(lambda m: loss_fn(m, batch)[0])(model)
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
  routers = [np.asarray(x) for path, x in leaves if "router" in jax.tree_util.keystr(path)]
  assert len(routers) == 2  # one per MoE layer
  return np.stack(routers)


@pytest.mark.parametrize("logits_chunk", [0, 4])  # whole-row logits, and the head in tiles
@pytest.mark.parametrize("which", ["sft", "rl"])
def test_router_aux_loss_is_added_with_its_weight_and_reaches_the_router(which, logits_chunk):
  loss_fn = sft.sft_loss if which == "sft" else _rl_loss()
  w = 0.3
  model0 = transformer.Transformer(_cfg(logits_chunk=logits_chunk), rngs=nnx.Rngs(1))
  model_w = _with_weight(model0, w)
  batch = _batch()
  loss0, m0 = loss_fn(model0, batch)
  loss_w, m_w = loss_fn(model_w, batch)
  aux = float(_direct_aux(model0, batch))
  assert aux > 1.0  # top-2 of 4 experts: 2 when perfectly balanced, never below 1
  # Reported at any weight, added only with its weight.
  np.testing.assert_allclose(float(m0["router_aux_loss"]), aux, rtol=1e-6)
  np.testing.assert_allclose(float(m_w["router_aux_loss"]), aux, rtol=1e-6)
  np.testing.assert_allclose(float(loss_w), float(loss0) + w * aux, rtol=1e-6, atol=1e-6)
  # The gradient difference at the router is exactly w x the aux loss's own gradient.
  g0, g_w = _router_grad(loss_fn, model0, batch), _router_grad(loss_fn, model_w, batch)
  g_aux = _router_grad(lambda m, b: (_direct_aux(m, b), None), model0, batch)
  assert np.abs(g_aux).max() > 1e-4
  np.testing.assert_allclose(g_w - g0, w * g_aux, atol=1e-6)


def test_dense_model_losses_have_no_router_term():
  model = transformer.Transformer(_cfg(num_experts=0, router_aux_weight=0.5), rngs=nnx.Rngs(1))
  batch = _batch()
  loss, metrics = sft.sft_loss(model, batch)
  assert "router_aux_loss" not in metrics
  logp = update.token_logprobs(model, batch["tokens"], batch["positions"], batch["segment_ids"])
  m = batch["loss_mask"] > 0
  assert float(loss) == float(-jnp.where(m, logp, 0.0).sum() / m.sum())
  _, rl_metrics = _rl_loss()(model, batch)
  assert "router_aux_loss" not in rl_metrics


def test_all_dense_layers_listed_means_no_router_term():
  model = transformer.Transformer(_cfg(moe_dense_layers=(0, 1), router_aux_weight=0.5),
                                  rngs=nnx.Rngs(1))
  _, metrics = sft.sft_loss(model, _batch())
  assert "router_aux_loss" not in metrics


# ---------------------------------------------------------------------------------------------
# configs/tiny_moe_cpu.py
# ---------------------------------------------------------------------------------------------

def _flat(c, prefix=""):
  out = {}
  for k, v in c.items():
    if hasattr(v, "items"):
      out.update(_flat(v, prefix + k + "."))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize("arg", [None, "runlocal=True"])
def test_tiny_moe_config_is_tiny_cpu_with_experts(arg):
  from configs import tiny_cpu, tiny_moe_cpu  # pylint: disable=g-import-not-at-top
  dense, moe = _flat(tiny_cpu.get_config(arg)), _flat(tiny_moe_cpu.get_config(arg))
  assert set(dense) == set(moe)
  changed = {k for k in dense if dense[k] != moe[k]}
  assert changed == {"model.num_experts", "model.moe_mlp_dim", "model.router_aux_weight"}
  # Half-width experts at top-2: a token's active MLP width is tiny_cpu's.
  assert moe["model.moe_mlp_dim"] * moe["model.experts_per_token"] == dense["model.mlp_dim"]


@pytest.mark.slow  # 1.5-3 minutes on a shared 2-core machine
def test_tiny_moe_pipeline_runs_end_to_end(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run([sys.executable, "-m", "k15.main",
                      "--config=configs/tiny_moe_cpu.py:runlocal=True", f"--workdir={tmp_path}"],
                     cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  for name in ("sft", "rl"):
    assert results[name]["n"] == 16 and 0.0 <= results[name]["accuracy"] <= 1.0
  # Both trainers ran the MoE policy: every step reports its router's load-balancing loss.
  for stage, prefix in (("sft", "sft/"), ("rl", "train/")):
    lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
    steps = [row for row in map(json.loads, lines) if prefix + "loss" in row]
    assert steps, stage
    for row in steps:
      assert np.isfinite(row[prefix + "router_aux_loss"]) and row[prefix + "router_aux_loss"] > 0.5
