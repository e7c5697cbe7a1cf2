r"""How far the sampler's log-probs are from the trainer's reference pass, in bfloat16.

PMD's regulariser uses S - S_ref, sequence log-probs summed over a whole response (k1.5
§2.3.2), so a per-token gap that is harmless alone adds up over a long chain of thought. The
trainer therefore computes S_ref with its own forward pass (k15.rl.trainer); this script
measures what the sampler's log-probs would have put into S_ref instead.

Model: the tiny reproduction's (configs/tiny_cpu.py: 4 layers, embed 128, vocab 384), random
weights or, with --checkpoint, the params of a k15 checkpoint directory (e.g. a pipeline run's
DIR/sft/sft_checkpoints), computed in --dtype (default bfloat16; logits are float32 in both
programs). Workload: --rows responses of --new_tokens tokens (default 4 x 4096) to a short
prompt, temperature 1, top_p 1, EOS disabled, drawn by `sampler.generate` (KV-cache prefill and
decode). Then, on those same tokens:

  trainer   k15.rl.trainer.make_reference_fn (the loss's forward, teacher-forced, chunked head)
            in the same dtype;
  float32   the same pass with the weights and activations in float32 (the "true" pi_i);

and per token the mean and max |sampler - trainer|, and per response |sum_t (sampler -
trainer)| over all its tokens, the error the sampler's log-probs would put into S_ref (the
same for trainer vs float32, the bf16 rounding of the trainer's own pass). One JAX device.

    nice -n 10 python benchmarks/logprob_gap.py [--checkpoint=DIR] [--json=PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from k15.model import transformer
from k15.rl import trainer as trainer_lib
from k15.sampling import sampler


def gaps(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
  d = a.astype(np.float64) - b.astype(np.float64)                       # [R, N]
  return {"token_abs_mean": float(np.abs(d).mean()), "token_abs_max": float(np.abs(d).max()),
          "seq_abs_sum_mean": float(np.abs(d.sum(-1)).mean()),
          "seq_abs_sum_max": float(np.abs(d.sum(-1)).max())}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", type=int, default=4)
  ap.add_argument("--new_tokens", type=int, default=4096)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--checkpoint", default="", help="k15 checkpoint directory with params")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  base = transformer.ModelConfig.from_config(tiny_cpu.get_config().model)
  models = {}
  for name, dtype in (("sampled", args.dtype), ("float32", "float32")):
    cfg = dataclasses.replace(base, dtype=dtype)
    model = transformer.Transformer(cfg, rngs=nnx.Rngs(args.seed))
    if args.checkpoint:
      from k15 import checkpoint  # pylint: disable=g-import-not-at-top
      model = checkpoint.restore_params(model, args.checkpoint)
    models[name] = model

  prompt = [int(t) for t in np.random.default_rng(args.seed).integers(1, base.vocab_size, 8)]
  t0 = time.perf_counter()
  res = sampler.generate(models["sampled"], [prompt], max_new_tokens=args.new_tokens,
                         eos_id=None, temperature=1.0, top_p=1.0, seed=args.seed,
                         num_samples=args.rows)
  t_sample = time.perf_counter() - t0
  N, P = args.new_tokens, len(prompt)
  assert (res.lengths == N).all(), res.lengths
  tokens = np.concatenate([np.tile(prompt, (args.rows, 1)), res.tokens], axis=1).astype(np.int32)
  batch = {"tokens": tokens,
           "positions": np.broadcast_to(np.arange(P + N, dtype=np.int32), tokens.shape),
           "segment_ids": np.ones_like(tokens)}
  ref = {}
  for name, model in models.items():
    graphdef, params = nnx.split(model)
    # The log-prob of response token t sits at row position P + t (0 at position 0).
    ref[name] = np.asarray(jax.block_until_ready(
        trainer_lib.make_reference_fn(graphdef)(params, batch)))[:, P:]
  result = {
      "model": f"tiny_cpu ({'checkpoint ' + args.checkpoint if args.checkpoint else 'random'})",
      "dtype": args.dtype, "rows": args.rows, "new_tokens": N, "sample_s": t_sample,
      "mean_logprob": float(res.logprobs.mean()),
      "sampler_vs_trainer": gaps(res.logprobs, ref["sampled"]),
      "sampler_vs_float32": gaps(res.logprobs, ref["float32"]),
      "trainer_vs_float32": gaps(ref["sampled"], ref["float32"]),
  }
  print(f"{args.rows} x {N} tokens, {args.dtype}, {result['model']}, mean log-prob "
        f"{result['mean_logprob']:.3f}")
  print(f"{'pair':22s} {'|d| mean/token':>15s} {'|d| max/token':>14s} "
        f"{'|sum d| mean/seq':>17s} {'|sum d| max/seq':>16s}")
  for key in ("sampler_vs_trainer", "sampler_vs_float32", "trainer_vs_float32"):
    g = result[key]
    print(f"{key:22s} {g['token_abs_mean']:15.2e} {g['token_abs_max']:14.2e} "
          f"{g['seq_abs_sum_mean']:17.3f} {g['seq_abs_sum_max']:16.3f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
