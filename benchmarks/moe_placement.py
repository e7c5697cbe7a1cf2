r"""Expert placement planned from known routing: tokens per device with and without the plan.

    python benchmarks/moe_placement.py --routing=/tmp/k15_moe/rl/moe_routing.jsonl \
        [--devices=2,4] [--spare=0,1] [--expert_bytes=EMBED,MOE_MLP] [--json=out.json]

Reads the tokens per expert and MoE layer that the RL trainer records for every training
batch (WORKDIR/rl/moe_routing.jsonl, a mixture-of-experts run) or, without --routing, draws
skewed synthetic routing (Zipf). For each number of expert-parallel devices and spare slots it
plans every step's placement from the previous one (k15.moe_placement.evaluate, per MoE layer)
and prints max/mean tokens per device under the identity layout (the 'expert' mesh axis) and
under the plan, the time to plan a step and the expert weights moved per step (reordered
experts and the step's replicas; bfloat16 weights of the given shapes).
"""

import argparse
import json

import numpy as np

from k15 import moe_placement


def load(path: str) -> np.ndarray:
  """moe_routing.jsonl -> counts [steps, layers, experts]."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f"{path}: no routing recorded")
  return np.asarray([r["counts"] for r in rows], np.float64)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--routing", default="", help="moe_routing.jsonl of an RL run")
  ap.add_argument("--devices", default="2,4")
  ap.add_argument("--spare", default="0,1")
  ap.add_argument("--expert_bytes", default="128,192",
                  help="EMBED,MOE_MLP of an expert (tiny_moe_cpu: 128,192; Qwen3-30B-A3B: "
                       "2048,768)")
  ap.add_argument("--synthetic_experts", type=int, default=128)
  ap.add_argument("--json", default="")
  args = ap.parse_args()
  if args.routing:
    counts = load(args.routing)
    source = args.routing
  else:
    rng = np.random.default_rng(0)
    counts = np.stack([[rng.zipf(1.4, args.synthetic_experts) for _ in range(4)]
                       for _ in range(16)]).astype(np.float64)
    source = f"synthetic Zipf(1.4), {args.synthetic_experts} experts"
  steps, layers, E = counts.shape
  per_expert = moe_placement.expert_bytes(*map(int, args.expert_bytes.split(",")))
  print(f"routing: {source}: {steps} steps x {layers} MoE layers x {E} experts; "
        f"expert weights {per_expert / 1e6:.2f} MB (bf16)")
  print(f"{'devices':>7} {'spare':>5} {'max/mean identity':>17} {'max/mean planned':>16} "
        f"{'plan ms':>8} {'moved experts/step':>18} {'moved MB/step':>13}")
  out = []
  for D in map(int, args.devices.split(",")):
    if E % D:
      continue
    for spare in map(int, args.spare.split(",")):
      per_layer = [moe_placement.evaluate(counts[:, l], D, spare_slots=spare,
                                          bytes_per_expert=per_expert) for l in range(layers)]
      row = {k: float(np.mean([r[k] for r in per_layer])) for k in per_layer[0]}
      # Every layer is planned: a step moves the sum over layers.
      row["moved_experts_per_step"] *= layers
      row["moved_bytes_per_step"] *= layers
      row.update(devices=D, spare_slots=spare)
      out.append(row)
      print(f"{D:>7} {spare:>5} {row['max_over_mean_identity']:>17.3f} "
            f"{row['max_over_mean_planned']:>16.3f} {row['plan_ms']:>8.2f} "
            f"{row['moved_experts_per_step']:>18.1f} {row['moved_bytes_per_step'] / 1e6:>13.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"source": source, "rows": out}, f, indent=2)


if __name__ == "__main__":
  main()
