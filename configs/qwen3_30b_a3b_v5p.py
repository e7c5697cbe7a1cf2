r"""Qwen3-30B-A3B (mixture of experts) on a v5p-64 slice (32 chips, 8 hosts): 8-way FSDP x 4-way
expert parallelism, routing replay on, long-CoT RL at 32k new tokens.

Mode `rl` (the default): long-CoT PMD RL from a Hugging Face checkpoint on MATH-format prompts
with the math verifier, evaluated every 20 iterations, exported to W/export/final:

    python -m k15.aot --config=configs/qwen3_30b_a3b_v5p.py      # memory per chip (docs/moe.md)
    python -m k15.main --config=configs/qwen3_30b_a3b_v5p.py --workdir=gs://BUCKET/k15/qwen30b \
        --config.model_path=/data/Qwen3-30B-A3B \
        --config.data.train=/data/math/train.jsonl --config.data.eval=/data/math500/test.jsonl \
        --config.data.format=math --config.reward=math --config.rl.iterations=1000

Launch it on every host with launch/run.sh (see launch/README.md); the checkpoint and the data
must be on each host's local disk. The architecture comes from the checkpoint's config.json
(`Qwen3MoeForCausalLM`: 48 layers, every one a MoE layer of 128 experts, top-8 with the top-8
probabilities renormalised, q/k norms per head, no q/k/v bias, untied head); the `model` keys
below size the plan and keep the dtypes, attention, remat, dispatch and scan.

Layout. 30.5B parameters, of which the experts are 29.0B (3 x 2048 x 768 per expert, 128 per
layer) and 3.3B are active per token. The experts split 4 ways over the 'expert' mesh axis (32
per device) and their width 8 ways over 'fsdp'; float32 master weights and Adam moments are
then 10.7 GiB per chip. Outside the MoE layers the 'expert' axis is this config's tensor axis
(the rules below put heads, vocab and MLP width on ('tensor', 'expert')): 32 query and 4 kv heads
split 4 ways, so no chip repeats another's attention. Tokens are split over 'fsdp' only: the
sorted ('ragged') dispatch runs each device's own experts on the tokens of its batch shard and
sums the experts' outputs over the 'expert' axis (`transformer._ragged_experts`).

Dispatch: 'ragged' (grouped matmuls through `jax.lax.ragged_dot`, XLA:TPU's native ragged dot).
At 128 experts and top-8 the one-hot 'dense' form would run every expert on every token: 16x
the routed experts' FLOPs, 181 against 18 GFLOP of matmuls per trained token, for
buffers of about the same size ([tokens, 32 experts, 768] per device against the ragged form's
8 routed rows of width 2048 per token). benchmarks/moe_dispatch.py compares the two.

Routing replay is on (docs/moe.md): the sampler records every token's 8 experts in each of the
48 layers (int16, 768 bytes per token) and the trainer routes by them.

The keys are those of configs/qwen25_7b_v5p.py. `:runlocal=True` shrinks it to a CPU-sized MoE
model with the same structure (`--config.model_path=` a tiny checkpoint).
"""

from k15 import config as k15_config
from k15 import parallel

# Tensor-parallel logical axes that this config also splits over the 'expert' mesh axis.
_TENSOR_NAMES = ("vocab", "q_heads", "kv_heads", "mlp", "act_mlp", "act_q_heads",
                 "act_kv_heads", "act_vocab")


def sharding_rules():
  """k15.parallel's rules with the tensor-parallel names on ('tensor', 'expert'): the expert
  weights take 'expert' first (their 'expert' axis), so their 'mlp' width stays whole."""
  return tuple((name, ("tensor", "expert")) if name in _TENSOR_NAMES else (name, target)
               for name, target in parallel.DEFAULT_RULES)


def get_config(arg=None):
  arg = k15_config.parse_arg(arg, runlocal=False)
  c = k15_config.add_run_blocks(k15_config.base(mode="rl"))
  c.distributed = True
  # Qwen3-30B-A3B (config.json of the released checkpoint).
  c.model = k15_config.model_block(
      vocab_size=151_936, embed_dim=2048, num_layers=48, num_heads=32, num_kv_heads=4,
      head_dim=128, mlp_dim=6144, rope_theta=1_000_000.0, norm_eps=1e-6,
      tie_embeddings=False, qkv_bias=False, qk_norm=True,
      num_experts=128, experts_per_token=8, moe_mlp_dim=768, norm_topk_prob=True,
      moe_dispatch="ragged",  # grouped matmuls of the chosen experts only (see above)
      router_aux_weight=0.001,  # the checkpoint's router_aux_loss_coef
      param_dtype="float32", dtype="bfloat16", attention_impl="splash",
      attention_block_size=512, remat="full",
      logits_chunk=1024,  # log-probs with the head in 1024-token tiles (k15.model.logprobs)
      scan_layers=True)   # one compiled layer body; remat 'full' is kept per layer under scan
  c.model_path = ""  # a Hugging Face checkpoint directory; empty = random init
  # 32 chips: 8-way FSDP x 4-way expert (which is also the tensor axis, see the docstring).
  c.mesh = k15_config.mesh_block(data=1, fsdp=-1, expert=4)
  c.sharding_rules = sharding_rules()
  c.smoke = dict(batch=32, length=2048)
  c.accelerator_type = "v5p-64"  # read by k15.plan
  c.optimizer = k15_config.optimizer_block(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0)
  c.rl = k15_config.rl_block(
      iterations=1000,
      # 4 prompts: a rollout prefills up to 64 sequences (32 continued + 4 new, 8 per batch
      # shard) at 32768 tokens; the ragged dispatch holds each token's 8 expert rows of the
      # MoE layer being prefilled (docs/moe.md), which at 8 prompts (128 sequences) the plan
      # puts past 95 GiB.
      prompts_per_iteration=4, samples_per_prompt=8,  # k = 8 per group (§2.3.2 baseline)
      max_new_tokens=32_768,       # long CoT
      segment_budget=16_384,       # partial rollouts (§2.6): two segments at most
      repeat_ngram=20, loss="pmd", tau=0.1,
      minibatch_groups=2, microbatches=2, length_bucket=1024,
      length_weight=1.0, length_warmup_iterations=50, repeat_penalty=1.0, eval_every=20,
      routing_replay=True)         # the trainer routes by the sampler's experts (docs/moe.md)
  c.data.format = "math"
  c.reward = "math"
  c.evaluate.update(num_samples=4, temperature=1.0, max_new_tokens=32_768, batch_size=32)
  c.export.dtype = "bfloat16"
  if arg.runlocal:
    c.distributed = False
    k15_config.shrink_real_scale(c)
    # The same MoE structure at CPU size: 8 experts, top-2, every expert on every device.
    c.model.update(num_experts=8, experts_per_token=2, moe_mlp_dim=32)
  return c
