"""k15.plan's mixture-of-experts terms and configs/qwen3_30b_a3b_v5p.py.

The parameter and optimizer terms are checked against XLA's argument bytes of a compiled MoE
train step on the 8-device CPU mesh with an expert axis (tests/test_aot.py compiles the same
path for TPU); the config against the released checkpoint's config.json.
"""

import jax
import pytest

from configs import qwen3_30b_a3b_v5p, tiny_cpu
from k15 import aot, parallel, plan, update
from k15.model import hf, transformer
from k15.rl import trainer

# Qwen/Qwen3-30B-A3B's config.json (the architecture keys, as released).
RELEASED = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "moe_intermediate_size": 768, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rope_theta": 1000000.0, "rope_scaling": None,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "attention_bias": False,
    "max_position_embeddings": 40960, "router_aux_loss_coef": 0.001,
}


def test_config_is_the_released_architecture():
  c = qwen3_30b_a3b_v5p.get_config()
  ours = transformer.ModelConfig.from_config(c.model)
  released = hf.config_from_hf(RELEASED)
  for field in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "qkv_bias",
                "qk_norm", "num_experts", "experts_per_token", "moe_mlp_dim", "norm_topk_prob",
                "moe_dense_layers"):
    assert getattr(ours, field) == getattr(released, field), field
  assert c.model.router_aux_weight == RELEASED["router_aux_loss_coef"]
  # The published sizes: 30.5B parameters, 3.3B of them active per token.
  assert ours.num_params() == pytest.approx(30.5e9, rel=0.01)
  active = plan._matmul_params(ours) + ours.vocab_size * ours.embed_dim  # + the input embedding
  assert active == pytest.approx(3.3e9, rel=0.03)
  # The trained rows fit the checkpoint's positions.
  assert 1024 + c.rl.max_new_tokens <= RELEASED["max_position_embeddings"]
  assert c.model.scan_layers and c.model.moe_dispatch == "ragged" and c.rl.routing_replay


def test_config_keys_and_shrink():
  # Every key of the tiny config exists here (paths of dict keys down to the leaves).
  paths = lambda c: {tuple(p.key for p in path if hasattr(p, "key"))
                     for path, _ in jax.tree_util.tree_flatten_with_path(c.to_dict())[0]}
  assert paths(tiny_cpu.get_config()) <= paths(qwen3_30b_a3b_v5p.get_config())
  small = qwen3_30b_a3b_v5p.get_config("runlocal=True")
  assert small.model.num_layers == 2 and small.model.num_experts == 8 and not small.distributed
  assert small.model.moe_dispatch == "ragged" and small.rl.routing_replay


def test_plan_splits_the_experts_over_the_expert_axis():
  c = qwen3_30b_a3b_v5p.get_config()
  p = plan.plan(c)
  assert p["num_chips"] == 32 and p["mesh"]["fsdp"] == 8 and p["mesh"]["expert"] == 4
  E, D, F, L = 128, 2048, 768, 48
  # float32 experts split 32 ways (experts over 'expert', their width over 'fsdp').
  assert p["moe"]["experts"] == pytest.approx(L * 3 * E * D * F * 4 / 32)
  assert p["moe"]["opt_state"] == pytest.approx(2 * (p["moe"]["experts"] + p["moe"]["router"]))
  # They are most of the parameters, which stay exact (nnx.eval_shape + the rules).
  assert 0.9 * p["train"]["params"] < p["moe"]["experts"] < p["train"]["params"]
  # The ragged dispatch reads each device's 32 experts whole, in bfloat16.
  assert p["moe"]["gathered_layer"] == pytest.approx(3 * E // 4 * D * F * 2)
  # model.mlp_dim sizes no parameter of a uniform MoE stack, so it changes nothing.
  c.model.mlp_dim = 1
  assert plan.plan(c)["train"]["peak"] == pytest.approx(p["train"]["peak"])
  # Train FLOPs count the 8 routed experts of 128.
  dense = plan.train_flops(transformer.ModelConfig.from_config(
      dict(c.model, num_experts=0, mlp_dim=8 * F)), 1, 1024)
  assert plan.train_flops(transformer.ModelConfig.from_config(c.model), 1, 1024) == (
      pytest.approx(dense + 6 * 1024 * L * D * E, rel=1e-3))  # + the router
  # The whole config fits a v5p chip by the plan.
  assert p["fits"], plan.format_plan(p)
  assert "expert weights" in plan.format_plan(p)


def _small_moe(mesh: dict):
  c = qwen3_30b_a3b_v5p.get_config("runlocal=True")
  c.model.update(vocab_size=512, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=32, num_experts=16, experts_per_token=4, moe_mlp_dim=256,
                 scan_layers=True, remat="full")
  c.mesh.update(data=1, **mesh)
  c.rl.update(max_new_tokens=96, minibatch_groups=2, samples_per_prompt=4, microbatches=1,
              length_bucket=32)
  c.rl.max_prompt_length = 32
  return c


def _compiled_arguments(config) -> tuple[int, dict]:
  """Arguments of the compiled RL train step (params, Adam state, batch with expert ids) per
  device, laid out as k15.aot lays them out, and the plan."""
  cfg = transformer.ModelConfig.from_config(config.model)
  mesh = parallel.make_mesh(config.mesh, jax.devices())
  graphdef, params, optimizer, opt, param_sh, opt_sh = aot.abstract_state(config, cfg, mesh)
  p = plan.plan(config, chip="cpu", num_chips=8)
  R, T, k = p["train"]["rows"], p["train"]["seq_len"], config.rl.samples_per_prompt
  with parallel.use_mesh(mesh, config.sharding_rules):
    batch = aot.train_batch(cfg, mesh, R, T, k, replay=True)
    step = update.make_train_step(graphdef, trainer.make_loss_fn(config.rl, k), optimizer,
                                  param_shardings=param_sh, opt_shardings=opt_sh)
    ma = step.lower(params, opt, batch).compile().memory_analysis()
  return ma.argument_size_in_bytes, p


@pytest.mark.slow  # one CPU compile of a MoE train step each: ~45 s on a busy 2-core host
@pytest.mark.parametrize("mesh", [{"fsdp": 2, "expert": 4}, {"fsdp": 8}])
def test_moe_parameter_and_optimizer_bytes_match_the_compiled_step(mesh):
  config = _small_moe(mesh)
  measured, p = _compiled_arguments(config)
  t = p["train"]
  predicted = t["params"] + t["opt_state"] + t["batch"]
  assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)
  # The experts and their Adam moments are most of it.
  moe = p["moe"]["experts"] + p["moe"]["router"] + p["moe"]["opt_state"]
  assert moe > 0.5 * measured
  assert p["moe"]["batch"] > 0  # the replayed expert ids travel in the batch
