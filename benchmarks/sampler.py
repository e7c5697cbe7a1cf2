r"""k15's sampler vs transformers' `generate`, same architecture and weights, side by side.

Model: a random transformers LlamaForCausalLM (vocab 512, hidden 256, 4 layers, 8 query / 2 kv
heads of dim 32, SwiGLU intermediate 688 = 8/3 * 256 rounded to a multiple of 16, untied head),
written with save_pretrained and loaded into k15 with `k15.model.hf.load`, so both run the same
float32 weights. Workload: batch 32 x 64-token prompts, 256 new tokens, plain sampling
(temperature 1, no top-k/top-p), EOS disabled so both produce exactly 256 tokens per row.

transformers runs on the CPU under torch.no_grad() with its default attention (sdpa) and
dynamic KV cache, twice: with torch's default thread count and with one thread (on a small
model and a shared machine one thread is often much faster, as OpenMP workers spin and wait on
each other); the speed-up is quoted against the faster of the two. k15 runs its compiled
prefill + while_loop decode on the default JAX backend with XLA's default threading.
Both are warmed up first (k15: compilation); each time is the best of --repeats runs (best,
not mean: dev machines are shared). Timed k15 runs use seeds different from the warm-up.

The last column relates the sampler to the machine: a large float32 jnp.dot is timed in the same
run, and the sampler's useful FLOPs are
  2 * (non-embedding params incl. the LM head) * (prompt + new tokens processed)
  + attention: 4 * N * H * (visible context) per token and layer,
i.e. what an ideal implementation must compute (the decode loop also computes attention over
masked cache slots, which is not counted).

Run from the repository root (not part of the tests):

  python -m benchmarks.sampler                       # writes benchmarks/results/sampler.json
  python -m benchmarks.sampler --repeats=1 --torch_threads=1 --out=/tmp/sampler.json
"""

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from k15.model import hf
from k15.sampling import sampler

ARCH = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _best(fn, repeats: int) -> float:
  best = float("inf")
  for i in range(repeats):
    t0 = time.perf_counter()
    fn(i)
    best = min(best, time.perf_counter() - t0)
  return best


def _matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  t = _best(lambda _: jax.block_until_ready(dot(a, b)), repeats)
  return 2 * n ** 3 / t


def _sampler_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
  D, N, K, H, F, V, L = (cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.mlp_dim, cfg.vocab_size, cfg.num_layers)
  per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F
  dense = L * per_layer + D * V
  tokens = prompt_len + new_tokens - 1  # the last sampled token is never fed back
  # Token i (0-based) attends to i + 1 positions.
  ctx = tokens * (tokens + 1) / 2
  return batch * (2 * dense * tokens + L * 4 * N * H * ctx)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--torch_threads", default="",
                      help="comma-separated torch thread counts to time (default: torch's "
                           "default and 1)")
  parser.add_argument("--out", default="benchmarks/results/sampler.json")
  args = parser.parse_args(argv)

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH)).float().eval()
  rng = np.random.RandomState(0)
  prompts = rng.randint(0, ARCH["vocab_size"], (args.batch, args.prompt_len))
  new = args.batch * args.new_tokens

  with tempfile.TemporaryDirectory() as tmp:
    ref.save_pretrained(tmp, safe_serialization=True)
    model = hf.load(tmp, jnp.float32)
  cfg = model.cfg

  rows = {}
  load_before = f"{os.getloadavg()[0]:.2f}"
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); torch threads "
        f"{torch.get_num_threads()}")

  def k15_run(seed):
    res = sampler.generate(model, list(prompts), max_new_tokens=args.new_tokens, eos_id=None,
                           temperature=1.0, seed=seed)
    assert res.lengths.min() == args.new_tokens
    return res

  t0 = time.perf_counter()
  k15_run(12345)
  compile_s = time.perf_counter() - t0
  k15_s = _best(k15_run, args.repeats)
  rows["k15"] = {"seconds": k15_s, "tokens_per_s": new / k15_s, "first_call_s": compile_s}

  if not args.skip_transformers:
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def hf_run(seed):
      torch.manual_seed(seed)
      with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, pad_token_id=0)
      assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
      return out

    # torch's default (one thread per core) and one thread: on a small model and a busy
    # machine the single thread is often faster, and the comparison uses the faster of the two.
    default_threads = torch.get_num_threads()
    counts = ([int(t) for t in args.torch_threads.split(",")] if args.torch_threads
              else sorted({default_threads, 1}, reverse=True))
    for threads in counts:
      torch.set_num_threads(threads)
      hf_run(0)  # warm-up
      hf_s = _best(hf_run, args.repeats)
      rows[f"transformers ({threads} thr)"] = {"seconds": hf_s, "tokens_per_s": new / hf_s,
                                               "torch_threads": threads}
    torch.set_num_threads(default_threads)

  peak = _matmul_flops()
  flops = _sampler_flops(cfg, args.batch, args.prompt_len, args.new_tokens)
  for r in rows.values():
    r["gflops"] = flops / r["seconds"] / 1e9
    r["share_of_matmul_peak"] = flops / r["seconds"] / peak
  hf_rows = [r for name, r in rows.items() if name.startswith("transformers")]
  base = max((r["tokens_per_s"] for r in hf_rows), default=None)

  print(f"\nbatch {args.batch} x {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
        f"sampling at temperature 1; params {cfg.num_params():,}; "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3 jnp.dot)\n")
  print(f"{'sampler':<22}{'seconds':>9}{'new tok/s':>11}{'GFLOP/s':>9}{'% of peak':>11}"
        f"{'vs best transformers':>22}")
  for name, r in rows.items():
    ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
    print(f"{name:<22}{r['seconds']:>9.3f}{r['tokens_per_s']:>11.0f}{r['gflops']:>9.2f}"
          f"{100 * r['share_of_matmul_peak']:>10.1f}%{ratio:>22}")
  print(f"\nk15 first call (compile + run): {rows['k15']['first_call_s']:.1f} s; "
        f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f}")

  result = {
      "arch": {k: v for k, v in ARCH.items() if v is not None},
      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "backend": jax.default_backend(), "matmul_peak_flops": peak,
      "sampler_useful_flops": flops, "rows": rows,
      "speedup_vs_best_transformers": (rows["k15"]["tokens_per_s"] / base) if base else None,
      "load_average_before": float(load_before),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
