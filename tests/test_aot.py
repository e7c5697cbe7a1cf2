"""k15.aot: a small model's RL train step compiled for a v5e-8 slice with libtpu's compile-only
devices (no TPU needed), through splash attention under shard_map, the scanned layers (the
config keeps model.scan_layers) and the chunked log-probs,
with k15.plan's figures beside XLA's."""

import pytest

pytest.importorskip("libtpu", reason="k15.aot needs libtpu: pip install -e .[tpu]")

from configs import qwen25_1p5b_v5e  # pylint: disable=g-import-not-at-top,wrong-import-position
from k15 import aot  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config():
  # The 1.5B config's structure (2-way FSDP x 4-way tensor on a v5e-8, bfloat16, remat full,
  # splash, 2 kv heads repeated over the 4 tensor shards), shrunk; the activations of 8 rows x
  # 2048 tokens dominate its memory, as they do at full size.
  c = qwen25_1p5b_v5e.get_config("runlocal=True")
  c.accelerator_type = "v5litepod-8"
  c.mesh.update(data=1, fsdp=2, tensor=4)
  c.model.update(vocab_size=4096, embed_dim=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=128, mlp_dim=512, dtype="bfloat16", attention_impl="splash",
                 attention_block_size=512, remat="full", logits_chunk=512)
  c.rl.update(max_new_tokens=1792, segment_budget=1792, minibatch_groups=2, microbatches=1,
              length_bucket=256, prompts_per_iteration=2, samples_per_prompt=4)
  c.rl.max_prompt_length = 256
  return c


def test_topology_names():
  assert aot.topology_name("v5e-8") == ("v5e", 8, "v5e:2x4")
  assert aot.topology_name("v5litepod-8") == ("v5e", 8, "v5e:2x4")
  assert aot.topology_name("v5p-64") == ("v5p", 32, "v5p:2x4x4")  # v5p names count cores
  assert aot.topology_name("v5e:4x4") == ("v5e", 16, "v5e:4x4")
  with pytest.raises(ValueError, match="no known topology for 'v5e-12'"):
    aot.topology_name("v5e-12")


@pytest.mark.slow  # one TPU compile: ~20 s on an idle 2-core host, minutes on a busy one
def test_train_step_compiles_for_v5e8_beside_the_plan():
  result = aot.compile_programs(_config(), programs=("train",))
  assert result["topology"] == "v5e:2x4" and result["hbm_bytes"] == 16 * aot.GiB
  (train,) = result["programs"]
  assert train.name == "train" and train.shapes.startswith("8 rows x 2048 tokens")
  # XLA counts the matmuls of a real TPU program (forward + backward of 8 x 2048 tokens:
  # at least 6 x 0.7M matmul params x 16k tokens over 8 chips).
  assert train.flops > 6 * 0.7e6 * 8 * 2048 / 8
  # k15.plan's parameters, optimizer state and batch are exact: XLA's arguments within 20%.
  t = result["plan"]["train"]
  args = t["params"] + t["opt_state"] + t["batch"]
  assert abs(args - train.memory["arguments"]) <= 0.2 * train.memory["arguments"], (
      args, train.memory)
  # Its activation model was measured on XLA:CPU, which keeps more than XLA:TPU (6-8x at this
  # size): on TPU the plan is an upper bound, not yet a 20% estimate.
  data = train.total - train.memory["code"]  # k15.plan models buffers, not program code
  assert train.plan_bytes >= data, (train.plan_bytes, train.memory)
  row = aot.to_json(result)["programs"][0]
  assert row["fits"] and set(row) >= {"name", "memory_gib", "fits", "flops", "bytes",
                                      "compile_s", "plan_gib"}


@pytest.mark.slow  # two TPU compiles
def test_paged_decode_compiles_for_v5e8_beside_the_static_decode():
  # Continuous batching's decode step on the 2-way FSDP x 4-way tensor mesh: the block pool
  # split over fsdp (2 kv heads do not split over 4 tensor shards: whole on each), donated,
  # the Pallas paged-attention kernel per shard; no more memory than the static cache's step.
  c = _config()
  result = aot.compile_programs(c, programs=("decode", "decode_paged"))
  decode, paged_step = result["programs"]
  s = result["plan"]["sampling"]
  blocks = 2 * (1 + s["rows"] // 2 * -(-s["cache_length"] // 16))
  pool_per_chip = 2 * 2 * 2 * blocks * 16 * 128 * 2 // 2  # k, v; 2 layers; 2 kv heads; bf16
  assert paged_step.memory["aliased"] >= pool_per_chip, (pool_per_chip, paged_step.memory)
  assert paged_step.total <= decode.total, (paged_step.memory, decode.memory)
  assert aot.to_json(result)["programs"][1]["fits"]


def _moe_config():
  # configs/qwen3_30b_a3b_v5p.py's structure (FSDP x expert axes, the heads and vocab also on
  # the expert axis, ragged dispatch, routing replay, bfloat16, remat full, splash, scanned
  # layers), shrunk to 2 layers of 16 experts on a v5p-16 (8 chips: 2-way FSDP x 4-way expert).
  from configs import qwen3_30b_a3b_v5p  # pylint: disable=g-import-not-at-top
  c = qwen3_30b_a3b_v5p.get_config()
  c.accelerator_type = "v5p-16"
  c.model.update(vocab_size=4096, embed_dim=256, num_layers=2, num_heads=8, num_kv_heads=4,
                 head_dim=128, num_experts=16, experts_per_token=4, moe_mlp_dim=256,
                 logits_chunk=512)
  c.rl.update(max_new_tokens=1792, segment_budget=1792, minibatch_groups=2, microbatches=1,
              length_bucket=256, prompts_per_iteration=2, samples_per_prompt=4)
  c.rl.max_prompt_length = 256
  return c


@pytest.mark.slow  # two TPU compiles of a MoE model: ~2 min on an idle 2-core host, 8 on a busy one
def test_moe_programs_compile_for_v5p_beside_the_plan():
  result = aot.compile_programs(_moe_config(), programs=("train", "decode"))
  assert result["topology"] == "v5p:2x2x2"
  assert result["mesh"] == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1, "sequence": 1}
  train, decode = result["programs"]
  p = result["plan"]
  # k15.plan's parameters and Adam state (experts split over the expert axis, their width over
  # FSDP) and the batch (with the replayed expert ids) against XLA's arguments: within 20%.
  t = p["train"]
  args = t["params"] + t["opt_state"] + t["batch"]
  assert abs(args - train.memory["arguments"]) <= 0.2 * train.memory["arguments"], (
      args, train.memory)
  moe = p["moe"]["experts"] + p["moe"]["router"] + p["moe"]["opt_state"] + p["moe"]["batch"]
  assert moe > 0.5 * train.memory["arguments"]
  # XLA counts at least the routed experts' matmuls (forward + backward, 4 of 16 experts in
  # 2 layers, 8 x 2048 tokens over 8 chips).
  assert train.flops > 6 * 2 * 4 * 3 * 256 * 256 * 8 * 2048 / 8
  # Decode carries the routing record (donated) beside the KV cache.
  assert decode.memory["aliased"] >= p["sampling"]["routing_record"]
  assert all(row["fits"] for row in aot.to_json(result)["programs"])
