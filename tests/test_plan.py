"""k15.plan: memory figures against the compiled train step, and the real-scale configs.

The compiled figures come from XLA's own buffer assignment of the real train step
(`update.make_train_step(...).lower(...).compile().memory_analysis()`): its arguments are the
parameters, optimizer state and batch, its temporaries the gradients, activations and logits.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from k15 import parallel, plan, update
from k15 import config as k15_config
from k15.model import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Activations and parameters both matter at this size: 3.3M params (52 MB with Adam) against
# ~300 MB of activations for 8 x 256 tokens without remat.
MODEL = dict(vocab_size=512, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=64, mlp_dim=768, attention_impl="reference", attention_block_size=64)
B, T = 8, 256


def _config(mesh: dict, **model):
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  c = tiny_cpu.get_config()
  c.model.update(dict(MODEL, **model))
  c.mesh = k15_config.mesh_block(**mesh)
  c.optimizer = k15_config.optimizer_block()
  return c


def _compiled_bytes(config, num_devices: int) -> float:
  """Arguments + temporaries of the compiled train step, per device."""
  cfg = transformer.ModelConfig.from_config(config.model)
  mesh = parallel.make_mesh(config.mesh, jax.devices()[:num_devices])
  with parallel.use_mesh(mesh, config.sharding_rules):
    abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    param_sh = parallel.state_shardings(params)
    optimizer = update.make_optimizer(config.optimizer)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_abstract, param_sh,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def loss_fn(model, batch):
      return -jnp.mean(update.token_logprobs(model, batch["tokens"])), {}

    batch_sh = {"tokens": parallel.sharding(("batch", None), (B, T))}
    step = update.make_train_step(graphdef, loss_fn, optimizer, param_shardings=param_sh,
                                  opt_shardings=opt_sh, batch_shardings=batch_sh)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    ma = step.lower(params, opt_abstract, {"tokens": tokens}).compile().memory_analysis()
  return ma.argument_size_in_bytes + ma.temp_size_in_bytes


def _predicted(config, num_devices: int) -> float:
  p = plan.plan(config, B, T, "cpu", num_chips=num_devices)
  # The test batch is the token ids only; the plan counts an RL batch of five arrays.
  return p["train"]["peak"] - p["train"]["batch"] + B * T * 4 / num_devices


@pytest.mark.parametrize("mesh,devices,model", [
    ({"data": 1}, 1, {"remat": "none"}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, {"remat": "none"}),
    ({"data": 1}, 1, {"remat": "none", "attention_impl": "flash"}),
])
def test_memory_matches_compiled_train_step(mesh, devices, model):
  config = _config(mesh, **model)
  measured = _compiled_bytes(config, devices)
  predicted = _predicted(config, devices)
  assert abs(predicted - measured) <= 0.2 * measured, (predicted / 2**20, measured / 2**20)


@pytest.mark.parametrize("mesh,devices", [
    ({"data": 1}, 1),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8),
])
def test_remat_full_matches_compiled_train_step_with_scanned_layers(mesh, devices):
  # The model's unrolled layer loop does not get remat's saving from XLA:CPU, whose scheduler
  # recomputes every layer before the first backward (1 device: 350 MiB compiled against
  # 374 MiB without remat); the plan gives what remat is for, which the layers under
  # `model.scan_layers` get: the scan pins each layer's recomputation to its own backward step.
  config = _config(mesh, remat="full", scan_layers=True)
  measured = _compiled_bytes(config, devices)
  predicted = _predicted(config, devices)
  assert abs(predicted - measured) <= 0.2 * measured, (predicted / 2**20, measured / 2**20)
  # The saving is real: under half of the (separately checked) figure without remat.
  assert measured < 0.5 * _predicted(_config(mesh, remat="none"), devices)


def test_parameter_bytes_follow_the_sharding_rules():
  config = _config({"fsdp": 2, "tensor": 4})
  p = plan.plan(config, B, T, "cpu", num_chips=8)
  cfg = transformer.ModelConfig.from_config(config.model)
  # Every weight splits 8 ways except the norms (replicated) and k/v, whose 2 heads do not
  # divide a tensor axis of 4 (sharded over fsdp only).
  D, K, H, L = cfg.embed_dim, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
  norms = (2 * L + 1) * D
  kv = L * 2 * D * K * H
  expected = 4 * ((cfg.num_params() - norms - kv) / 8 + norms + kv / 2)
  assert p["train"]["params"] == pytest.approx(expected)
  # Adam: two moments like the params plus two int32 counts (adam, schedule).
  assert p["train"]["opt_state"] == pytest.approx(2 * expected + 8)


def test_qwen7b_fits_its_v5p_slice_and_not_one_v5e_chip():
  from configs import qwen25_7b_v5p  # pylint: disable=g-import-not-at-top
  config = qwen25_7b_v5p.get_config()
  on_v5p = plan.plan(config, chip="v5p", num_chips=32)
  assert on_v5p["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 4,
                            "sequence": 1}
  assert on_v5p["fits"], plan.format_plan(on_v5p)
  # 7.6B float32 parameters are ~28 GiB on their own.
  config.mesh = k15_config.mesh_block(data=1)
  on_v5e = plan.plan(config, chip="v5e", num_chips=1)
  assert not on_v5e["fits"]
  assert on_v5e["train"]["params"] == pytest.approx(4 * on_v5e["model"]["params"])
  assert "WARNING" in plan.format_plan(on_v5e) and "does not fit" in plan.format_plan(on_v5e)


def test_qwen1p5b_plan_on_v5e8():
  from configs import qwen25_1p5b_v5e  # pylint: disable=g-import-not-at-top
  config = qwen25_1p5b_v5e.get_config()
  p = plan.plan(config)
  assert p["chip"] == "v5e" and p["num_chips"] == 8
  assert p["model"]["params"] == pytest.approx(1.54e9, rel=0.01)
  assert p["fits"], plan.format_plan(p)
  assert p["train"]["seq_len"] >= config.rl.max_new_tokens
  assert p["sampling"]["rows"] >= config.rl.prompts_per_iteration * config.rl.samples_per_prompt
  assert p["train"]["step_s"] > 0
  # Were the prefill to compute [rows, 8192, 151936] float32 logits at every position (as
  # the sampler's first version did), that alone would not fit.
  all_logits = plan.plan(config, prefill_logits="all")
  assert not all_logits["fits"]
  assert all_logits["sampling"]["prefill_logits"] > 16 * plan.GiB > all_logits["train"]["peak"]


def test_sampling_follows_the_rollout_shapes():
  config = _config({"data": 2, "tensor": 4})
  config.rl = k15_config.rl_block(prompts_per_iteration=3, samples_per_prompt=4,
                                  max_new_tokens=300, segment_budget=100)
  s = plan.plan(config, chip="cpu", num_chips=8, prompt_len=40, prefill_logits="all")["sampling"]
  # 12 new rows; up to two more segments' worth (24 rows) continued from the buffer; rows
  # padded to a power of two per batch shard (2): 64.
  assert (s["new_rows"], s["continued_rows"], s["rows"], s["sequences"]) == (12, 24, 64, 32)
  # Prompt bucket: 40 + 300 - 100 -> 256; new-token bucket 128.
  assert (s["prompt_bucket"], s["cache_length"]) == (256, 384)
  cfg = transformer.ModelConfig.from_config(config.model)
  # 2 kv heads do not divide the 4-way tensor axis: the cache splits over the 2 batch shards.
  kv = 2 * cfg.num_layers * 64 * 384 * cfg.num_kv_heads * cfg.head_dim * 4 / 2
  assert s["kv_cache"] == pytest.approx(kv)
  assert s["prefill_logits"] == pytest.approx(32 * 256 * cfg.vocab_size * 4 / 8)
  config.rl.segment_budget = 0  # no partial rollouts: nothing continues
  s = plan.plan(config, chip="cpu", num_chips=8, prompt_len=40, prefill_logits="all")["sampling"]
  assert (s["continued_rows"], s["rows"], s["prompt_bucket"], s["cache_length"]) == (
      0, 16, 64, 64 + 512)


def test_step_time_scales_with_mfu_and_chips():
  config = _config({"data": 1})
  a = plan.plan(config, B, T, "v5e", num_chips=1, mfu=0.4)
  b = plan.plan(config, B, T, "v5e", num_chips=1, mfu=0.2)
  assert b["train"]["step_s"] == pytest.approx(2 * a["train"]["step_s"])
  cfg = transformer.ModelConfig.from_config(config.model)
  flops = 6 * cfg.num_params() * B * T + 6 * B * T * T * cfg.num_heads * cfg.head_dim * 4
  assert a["train"]["flops"] == pytest.approx(flops)


def test_accelerator_names():
  assert plan.accelerator_chips("v5p-64") == ("v5p", 32)
  assert plan.accelerator_chips("v4-8") == ("v4", 4)
  assert plan.accelerator_chips("v5litepod-8") == ("v5e", 8)
  assert plan.accelerator_chips("v6e-16") == ("v6e", 16)
  with pytest.raises(ValueError, match="v5x-8"):
    plan.accelerator_chips("v5x-8")


def test_cli_warns_and_strict_exits_nonzero():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "k15.plan", "--config=configs/qwen25_7b_v5p.py",
          "--config.mesh.fsdp=1", "--config.mesh.tensor=1", "--chip=v5e", "--num_chips=1",
          "--peak_tflops=197"]
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "WARNING" in r.stdout and "does not fit" in r.stdout
  assert "optimizer state" in r.stdout and "expected train step" in r.stdout
  r = subprocess.run(args + ["--strict"], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 1


def test_chunked_logits_term_matches_the_compiled_head_backward():
  # The head's backward in tiles (k15.model.logprobs) against the plan's tile copies: the
  # head dominates here (4 x 256 x 8192 float32 per tile, against 2 MiB of hidden states).
  from k15.model import logprobs  # pylint: disable=g-import-not-at-top
  rows, length, D, V, chunk = 4, 2048, 64, 8192, 256
  f = lambda x, h, t: jnp.sum(logprobs.chunked_logprobs(x, h, t, chunk)[0])
  compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(
      jax.ShapeDtypeStruct((rows, length, D), jnp.float32),
      jax.ShapeDtypeStruct((D, V), jnp.float32),
      jax.ShapeDtypeStruct((rows, length), jnp.int32)).compile()
  measured = compiled.memory_analysis().temp_size_in_bytes
  config = _config({"data": 1}, vocab_size=V, logits_chunk=chunk)
  predicted = plan.plan(config, rows, length, "cpu", num_chips=1)["train"]["logits"]
  assert abs(predicted - measured) <= 0.2 * measured, (predicted / 2**20, measured / 2**20)
