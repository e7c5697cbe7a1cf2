r"""Qwen2.5-1.5B on a v5e-8 (v5litepod-8: 8 chips x 16 GiB, one host): long-CoT RL at 16k tokens.

Mode `rl` (the default): PMD RL from a Hugging Face checkpoint on MATH-format prompts, rewarded
by the math verifier on the last \boxed{}, evaluated on a held-out set every 20 iterations, the
final policy exported as a Hugging Face checkpoint to W/export/final:

    python -m k15.plan --config=configs/qwen25_1p5b_v5e.py
    python -m k15.main --config=configs/qwen25_1p5b_v5e.py --workdir=gs://BUCKET/k15/qwen1p5b \
        --config.model_path=/data/Qwen2.5-Math-1.5B-Instruct \
        --config.data.train=/data/math/train.jsonl --config.data.eval=/data/math500/test.jsonl \
        --config.data.format=math --config.reward=math --config.rl.iterations=1000

(`hf download Qwen/Qwen2.5-Math-1.5B-Instruct --local-dir /data/Qwen2.5-Math-1.5B-Instruct`;
MATH as JSONL of {problem, solution, level, type}.) GSM8K instead: `--config.data.format=gsm8k`
with its train/test JSONL. The architecture comes from the checkpoint's config.json; the
`model` keys below size the plan and keep the dtypes, attention and remat. `--config.mode=smoke`
runs one forward pass instead.

`python -m k15.aot --config=configs/qwen25_1p5b_v5e.py` compiles every program of an iteration
for the v5e-8 slice and prints XLA's memory per chip against 16 GiB (docs/scaling.md): a train
step of 8 rows x 17408 tokens in 12.9 GiB, the prefill of 16 rows (8 new + 8 continued) at
16384 tokens in 7.9 GiB, a static decode step in 11.4 GiB (the layer scan's carried KV cache
is copied: two caches); `k15.plan` is within 10% of each. The KV cache is replicated over the
tensor axis (2 kv heads) and a continuation is prefilled whole, which is why an iteration
starts one prompt: two would put 21.8 GiB on a chip in the static decode step.

The keys are those of configs/qwen25_7b_v5p.py and configs/tiny_cpu.py. `:runlocal=True` runs
the same mode on a CPU with a tiny checkpoint (tests/test_rl_mode.py writes one):

    python -m k15.main --config=configs/qwen25_1p5b_v5e.py:runlocal=True --workdir=/tmp/k15_rl \
        --config.model_path=TINY_CKPT --config.data.train=TRAIN.jsonl \
        --config.data.eval=EVAL.jsonl --config.data.format=gsm8k --config.reward=math
"""

from k15 import config as k15_config


def get_config(arg=None):
  arg = k15_config.parse_arg(arg, runlocal=False)
  c = k15_config.add_run_blocks(k15_config.base(mode="rl"))
  c.accelerator_type = "v5litepod-8"  # read by k15.plan (chip type and count)
  c.distributed = False  # one host: its 8 chips are local devices
  # Qwen2.5-1.5B (config.json of the released checkpoint).
  c.model = k15_config.model_block(
      vocab_size=151_936, embed_dim=1536, num_layers=28, num_heads=12, num_kv_heads=2,
      head_dim=128, mlp_dim=8960, rope_theta=1_000_000.0, norm_eps=1e-6,
      tie_embeddings=True, qkv_bias=True,
      # float32 master weights for Adam (1.5B x (4 + 8) bytes = 18 GiB over 8 chips), bfloat16
      # matmuls; splash attention keeps memory linear in the 9k-token rows; 'full' remat keeps
      # one bfloat16 [T, D] input per layer instead of ~70 KiB per token per layer.
      param_dtype="float32", dtype="bfloat16", attention_impl="splash",
      attention_block_size=512, remat="full",
      logits_chunk=1024,  # log-probs with the head in 1024-token tiles (k15.model.logprobs)
      scan_layers=True)   # one compiled layer body; remat 'full' is kept per layer under scan
  c.model_path = ""  # a Hugging Face checkpoint directory; empty = random init
  # 2-way FSDP x 4-way tensor. Tensor parallelism is what makes a long row fit: the head's
  # float32 [T, V=151936] logits (and their log-softmax and gradients, 5 copies) dominate the
  # step, and 'act_vocab' splits them over the tensor axis. 4 divides the 12 query heads, the
  # 8960 MLP width and the vocab; the 2 kv heads stay replicated. Pure FSDP over 8 chips
  # would leave a whole row's logits on one chip (26 GiB at 9k tokens).
  c.mesh = k15_config.mesh_block(data=1, fsdp=2, tensor=4)
  c.smoke = dict(batch=8, length=2048)
  c.optimizer = k15_config.optimizer_block(
      learning_rate=1e-6, warmup_steps=0, decay="constant", b1=0.9, b2=0.95,
      weight_decay=0.01, grad_clip=1.0)
  c.rl = k15_config.rl_block(
      iterations=1000,
      prompts_per_iteration=1,     # 8 new rows (+ <= 8 continued): what one rollout holds
      samples_per_prompt=8,        # k: group size for the PMD mean-reward baseline (§2.3.2)
      # Long CoT: 16k new tokens, from `python -m k15.aot` (docs/scaling.md): every program of
      # an iteration fits 16 GiB per chip (train step 12.9 GiB, decode 11.4 GiB) with one
      # prompt per iteration; two would double the rows (16 new + 16 continued) and not fit.
      max_new_tokens=16384,
      # Partial rollouts (§2.6.2): at most 8192 new tokens per sequence per iteration, so an
      # iteration's sampling time is bounded and long responses continue from the buffer. Two
      # segments, not more: every segment of a response adds its rows to later rollouts.
      segment_budget=8192,
      # A spot VM gets ~30 s after its notice: sampling stops between pieces of 1024 new tokens
      # (each piece after the first re-prefills its unfinished rows) and the last iteration is
      # what the checkpoint keeps.
      preemption_check_tokens=1024,
      temperature=1.0, top_p=1.0,
      repeat_ngram=20,             # stop a response that repeats a 20-gram (§2.6.2)
      loss="pmd", tau=0.1,
      num_passes=1,
      minibatch_groups=1,          # one group (8 rows of up to 17408 tokens) per gradient step,
      microbatches=1,              # a microbatch holds whole groups (their mean reward is the
                                   # baseline), so 1 group per step means 1 microbatch
      length_bucket=1024,
      reset_optimizer=True,
      length_weight=1.0,           # length penalty (§2.3.3) after a warm-up without it
      length_warmup_iterations=50,
      repeat_penalty=1.0,
      eval_every=20,
  )
  c.checkpoint = k15_config.checkpoint_block(every=10, keep=3)
  c.data.format = "math"
  c.reward = "math"
  # pass@1 over 4 samples at the training temperature, and the greedy accuracy.
  c.evaluate.update(num_samples=4, temperature=1.0, max_new_tokens=16384, batch_size=16)
  c.export.dtype = "bfloat16"
  if arg.runlocal:
    c.accelerator_type = ""
    k15_config.shrink_real_scale(c)
  return c
