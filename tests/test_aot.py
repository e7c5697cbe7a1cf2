"""k15.aot: a small model's RL programs compiled for a v5e-8 slice with libtpu's compile-only
devices (no TPU needed), through splash attention under shard_map, the scanned layers (the
config keeps model.scan_layers) and the chunked log-probs, with k15.plan's figures beside XLA's.

k15.plan models buffers: its figure is compared with XLA's arguments + outputs + temporaries -
aliased, without the generated code (a few MiB here)."""

import pytest

pytest.importorskip("libtpu", reason="k15.aot needs libtpu: pip install -e .[tpu]")

from configs import qwen25_1p5b_v5e  # pylint: disable=g-import-not-at-top,wrong-import-position
from k15 import aot  # pylint: disable=g-import-not-at-top,wrong-import-position


def _config():
  # The 1.5B config's structure (2-way FSDP x 4-way tensor on a v5e-8, bfloat16, remat full,
  # splash, 2 kv heads repeated over the 4 tensor shards, 1024-token log-prob tiles), shrunk in
  # depth, width and vocabulary but not in length: 8 rows x 16384 tokens, so that the
  # activations (GiBs per chip) dwarf the ~0.1 GiB of VMEM scratch XLA:TPU counts among its
  # temporaries, as at full size. Compile time does not grow with the shapes.
  c = qwen25_1p5b_v5e.get_config("runlocal=True")
  c.accelerator_type = "v5litepod-8"
  c.mesh.update(data=1, fsdp=2, tensor=4)
  c.model.update(vocab_size=32768, embed_dim=1024, num_layers=4, num_heads=8, num_kv_heads=2,
                 head_dim=128, mlp_dim=2816, dtype="bfloat16", attention_impl="splash",
                 attention_block_size=512, remat="full", logits_chunk=1024)
  # Two 8064-token segments: the rollout prefills 8 new + 8 continued rows at 16384 tokens.
  c.rl.update(max_new_tokens=16128, segment_budget=8064, minibatch_groups=2, microbatches=1,
              length_bucket=256, prompts_per_iteration=2, samples_per_prompt=4)
  c.rl.max_prompt_length = 256
  return c


def _buffers(program) -> int:
  """XLA's memory per chip without the program's code: what k15.plan predicts."""
  return program.total - program.memory["code"]


def test_topology_names():
  assert aot.topology_name("v5e-8") == ("v5e", 8, "v5e:2x4")
  assert aot.topology_name("v5litepod-8") == ("v5e", 8, "v5e:2x4")
  assert aot.topology_name("v5p-64") == ("v5p", 32, "v5p:2x4x4")  # v5p names count cores
  assert aot.topology_name("v5e:4x4") == ("v5e", 16, "v5e:4x4")
  with pytest.raises(ValueError, match="no known topology for 'v5e-12'"):
    aot.topology_name("v5e-12")


@pytest.mark.slow  # two TPU compiles: ~1 min each on an idle 2-core host, far more when busy
def test_train_step_and_reference_pass_compile_for_v5e8_within_20pc_of_the_plan():
  result = aot.compile_programs(_config(), programs=("train", "ref_logprobs"))
  assert result["topology"] == "v5e:2x4" and result["hbm_bytes"] == 16 * aot.GiB
  train, ref = result["programs"]
  assert train.name == "train" and train.shapes.startswith("8 rows x 16384 tokens")
  # XLA counts the matmuls of a real TPU program, each scan's body once: at least one layer's
  # forward and backward (6 x 11.3M params x 65536 tokens per chip, over 4 tensor shards).
  assert train.flops > 6 * 11.3e6 * 65536 / 4
  # k15.plan's parameters, optimizer state and batch are exact: XLA's arguments within 20%.
  t = result["plan"]["train"]
  args = t["params"] + t["opt_state"] + t["batch"]
  assert abs(args - train.memory["arguments"]) <= 0.2 * train.memory["arguments"], (
      args, train.memory)
  # The whole step (gradients, the scan's stacked layer inputs, one layer's backward, the
  # head's tile) and the forward-only reference pass: k15.plan within 20% of XLA:TPU.
  for program in (train, ref):
    assert abs(program.plan_bytes - _buffers(program)) <= 0.2 * _buffers(program), (
        program.name, program.plan_bytes / aot.GiB, program.memory)
  assert any(k.startswith("splash") for k in train.kernels), train.kernels
  row = aot.to_json(result)["programs"][0]
  assert row["fits"] and set(row) >= {"name", "memory_gib", "fits", "flops", "bytes",
                                      "compile_s", "plan_gib"}


@pytest.mark.slow  # three TPU compiles
def test_sampler_programs_compile_for_v5e8_within_20pc_of_the_plan():
  # The prefill of one rollout call, the static decode step and continuous batching's paged
  # decode step on the 2-way FSDP x 4-way tensor mesh. The paged step's block pool is split
  # over fsdp (2 kv heads do not split over 4 tensor shards: whole on each), donated, read by
  # the Pallas paged-attention kernel per shard. The static step's layer scan reads the
  # stacked cache as its input and the step's slots are written after it, in place: one cache
  # (carried through the scan, XLA:TPU copied it, and the step held two).
  c = _config()
  result = aot.compile_programs(c, programs=("prefill", "decode", "decode_paged"))
  prefill, decode, paged_step = result["programs"]
  s = result["plan"]["sampling"]
  L, K, H = c.model.num_layers, c.model.num_kv_heads, c.model.head_dim
  blocks = 2 * (1 + s["rows"] // 2 * -(-s["cache_length"] // 16))
  pool_per_chip = 2 * L * K * blocks * 16 * H * 2 // 2  # k, v; bf16; split over 2 fsdp shards
  assert paged_step.memory["aliased"] >= pool_per_chip, (pool_per_chip, paged_step.memory)
  assert decode.memory["aliased"] >= s["kv_cache"], (s["kv_cache"], decode.memory)
  assert decode.memory["temporaries"] < 0.5 * s["kv_cache"], (s["kv_cache"], decode.memory)
  # The prefill attends over its own tokens with the splash kernel (under shard_map).
  assert any(k.startswith("splash") for k in prefill.kernels), prefill.kernels
  for program in (prefill, decode, paged_step):
    assert abs(program.plan_bytes - _buffers(program)) <= 0.2 * _buffers(program), (
        program.name, program.plan_bytes / aot.GiB, program.memory)


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
