r"""Qwen2.5-7B on a v5p-64 slice (32 chips, 8 hosts of 4): FSDP across the slice, 4-way tensor.

Mode `rl` (the default): long-CoT PMD RL from a Hugging Face checkpoint on MATH-format prompts
with the math verifier, evaluated every 20 iterations, exported to W/export/final:

    python -m k15.main --config=configs/qwen25_7b_v5p.py --workdir=gs://BUCKET/k15/qwen7b \
        --config.model_path=/data/Qwen2.5-Math-7B-Instruct \
        --config.data.train=/data/math/train.jsonl --config.data.eval=/data/math500/test.jsonl \
        --config.data.format=math --config.reward=math --config.rl.iterations=1000

Launch it on every host with launch/run.sh (see launch/README.md); the checkpoint and the data
must be on each host's local disk. The architecture comes from the checkpoint's config.json.
The keys are the same as configs/tiny_cpu.py; `:runlocal=True` shrinks it to a CPU-sized model
with the same structure (`--config.model_path=` a tiny checkpoint, as for
configs/qwen25_1p5b_v5e.py).
"""

from k15 import config as k15_config


def get_config(arg=None):
  arg = k15_config.parse_arg(arg, runlocal=False)
  c = k15_config.add_run_blocks(k15_config.base(mode="rl"))
  c.distributed = True
  # Qwen2.5-7B (config.json of the released checkpoint).
  c.model = k15_config.model_block(
      vocab_size=152_064, embed_dim=3584, num_layers=28, num_heads=28, num_kv_heads=4,
      head_dim=128, mlp_dim=18_944, rope_theta=1_000_000.0, norm_eps=1e-6,
      tie_embeddings=False, qkv_bias=True, param_dtype="float32", dtype="bfloat16",
      attention_impl="splash", attention_block_size=512, remat="full",
      logits_chunk=1024,  # log-probs with the head in 1024-token tiles (k15.model.logprobs)
      scan_layers=True)   # one compiled layer body; remat 'full' is kept per layer under scan
  c.model_path = ""  # a Hugging Face checkpoint directory; empty = random init
  # 32 chips: 8-way FSDP x 4-way tensor (28 query and 4 kv heads both split 4 ways).
  c.mesh = k15_config.mesh_block(data=1, fsdp=-1, tensor=4)
  c.smoke = dict(batch=32, length=2048)
  c.accelerator_type = "v5p-64"  # read by k15.plan
  c.optimizer = k15_config.optimizer_block(learning_rate=1e-6, weight_decay=0.01, grad_clip=1.0)
  c.rl = k15_config.rl_block(
      iterations=1000,
      # k = 8 per group (§2.3.2 baseline). 14 prompts: the most whose rollout keeps the prefill
      # at 128 sequences (14 new + up to 112 continued rows, 45.2 GiB per chip compiled) and the
      # decode step at 256 rows (24.5 GiB); 15 would prefill 256 sequences, 88.2 GiB of 95: too
      # close (docs/scaling.md).
      prompts_per_iteration=14, samples_per_prompt=8,
      max_new_tokens=32_768,       # long CoT
      segment_budget=16_384,       # partial rollouts (§2.6): two segments at most
      preemption_check_tokens=1024,  # a spot VM's ~30 s notice is heard within a 1k-token piece
      repeat_ngram=20, loss="pmd", tau=0.1,
      minibatch_groups=2, microbatches=2, length_bucket=1024,
      length_weight=1.0, length_warmup_iterations=50, repeat_penalty=1.0, eval_every=20)
  c.data.format = "math"
  c.reward = "math"
  c.evaluate.update(num_samples=4, temperature=1.0, max_new_tokens=32_768, batch_size=32)
  c.export.dtype = "bfloat16"
  if arg.runlocal:
    c.distributed = False
    k15_config.shrink_real_scale(c)
  return c
