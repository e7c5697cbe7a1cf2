r"""Partial rollouts: the two rules for early finishers (rl.early_finishers), side by side.

With partial rollouts (k1.5 §2.6) a group trains once all k samples have finished, so a sample
that finished in an earlier iteration than the group's last (an early finisher, usually a short
one) has no token of the current policy. 'train' puts all its tokens in the loss against pi_i's
reference log-probs; 'exclude' takes it out of the loss and the group baseline
(k15.rl.trainer). The rule before either trained none of its tokens but kept its reward in the
baseline: a silent bias toward the samples that finish last.

Task (a tiny random transformer, vocab 16, learns from scratch): a response is correct when it
ends by itself (token 5, EOS) within 8 new tokens and contains token 7; sampled 2 new tokens
per iteration (rl.segment_budget=2), so one response spans up to 4 iterations. Short correct
answers finish first, the case where the rule matters. PMD, tau 0.05, 8 prompts x 8 samples.
Prints per rule and seed the task reward of the first and last 5 iterations, the share of
early finishers among trained samples and the mean response length; --json writes them.

    nice -n 10 python benchmarks/partial_rollouts.py --rules=train,exclude --seeds=0,1
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
from flax import nnx

from k15 import config as k15_config
from k15 import parallel
from k15.model import transformer
from k15.rl import trainer as trainer_lib

VOCAB, EOS, TARGET = 16, 5, 7


def _config(rule: str, seed: int, iterations: int):
  c = k15_config.base(mode="rl", seed=seed)
  c.model = k15_config.model_block(vocab_size=VOCAB, embed_dim=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.optimizer = k15_config.optimizer_block(learning_rate=3e-3)
  c.rl = k15_config.rl_block(
      iterations=iterations, prompts_per_iteration=8, samples_per_prompt=8, max_new_tokens=8,
      segment_budget=2, loss="pmd", tau=0.05, minibatch_groups=4, length_bucket=16,
      early_finishers=rule)
  c.rl.sampling.mode = "uniform"
  c.checkpoint = k15_config.checkpoint_block(every=1000, keep=1)
  return c


def _reward(ids, responses):
  out = []
  for r in responses:
    r = np.asarray(r)
    out.append(float(r.size > 0 and r[-1] == EOS and TARGET in r[:-1]))
  return np.array(out, np.float32)


def run(rule: str, seed: int, iterations: int) -> dict:
  config = _config(rule, seed, iterations)
  mesh = parallel.make_mesh({"data": -1})
  early = []
  build = trainer_lib.build_batch

  def counting_build(*a, **kw):
    b = build(*a, **kw)
    real = b["segment_ids"].sum(-1) > 0
    early.append(float(((b["current"].sum(-1) == 0) & real).sum() / max(real.sum(), 1)))
    return b

  trainer_lib.build_batch = counting_build
  try:
    with parallel.use_mesh(mesh), tempfile.TemporaryDirectory() as workdir:
      cfg = transformer.ModelConfig.from_config(config.model)
      model = parallel.create_sharded(
          lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)
      prompts = [trainer_lib.Prompt(tokens=[1 + i % 5, 2 + i % 3, 3]) for i in range(16)]
      trainer = trainer_lib.RLTrainer(config, model, prompts, _reward, mesh=mesh,
                                      workdir=workdir, eos_id=EOS)
      history = trainer.train(progress=True)
  finally:
    trainer_lib.build_batch = build
  task = [m["rl/task_reward"] for m in history if "rl/task_reward" in m]
  length = [m["rl/response_length_mean"] for m in history if "rl/response_length_mean" in m]
  return {"rule": rule, "seed": seed, "first5": float(np.mean(task[:5])),
          "last5": float(np.mean(task[-5:])), "early_share": float(np.mean(early)),
          "length_last5": float(np.mean(length[-5:])), "task_reward": task}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rules", default="train,exclude")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--iterations", type=int, default=30)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  results = [run(rule, int(s), args.iterations) for rule in args.rules.split(",")
             for s in args.seeds.split(",")]
  print(f"{'rule':8s} {'seed':>4s} {'reward first 5':>14s} {'reward last 5':>13s} "
        f"{'early share':>11s} {'length last 5':>13s}")
  for r in results:
    print(f"{r['rule']:8s} {r['seed']:4d} {r['first5']:14.3f} {r['last5']:13.3f} "
          f"{r['early_share']:11.3f} {r['length_last5']:13.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
