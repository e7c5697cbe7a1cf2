r"""Compile time of the 1.5B config's TPU train step against depth, layers scanned or looped.

    python -m benchmarks.scan_compile [--layers=4,8] [--tokens=1024] [--json=PATH]

Compiles `k15.aot`'s train program of configs/qwen25_1p5b_v5e.py for its v5e-8 slice (libtpu's
compile-only devices, no TPU needed) with `model.num_layers` set to each depth, with
`model.scan_layers` off and on, at short rows (prompt + `--tokens` new tokens) so that the
compile, not the shapes, is what grows with depth. Prints one line per compile and a table.
"""

import argparse
import json
import time

from configs import qwen25_1p5b_v5e
from k15 import aot


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", default="4,8")
  ap.add_argument("--tokens", type=int, default=1024)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  rows = []
  for layers in [int(x) for x in args.layers.split(",")]:
    for scan in (True, False):
      c = qwen25_1p5b_v5e.get_config()
      c.model.update(num_layers=layers, scan_layers=scan)
      c.rl.update(max_new_tokens=args.tokens, segment_budget=args.tokens)
      t0, cpu0 = time.perf_counter(), time.process_time()
      (prog,) = aot.compile_programs(c, programs=("train",))["programs"]
      # CPU seconds of this process (all threads) as well as wall time: on a shared host the
      # wall time measures the other processes as much as the compile.
      row = {"layers": layers, "scan": scan, "compile_s": prog.compile_s,
             "lower_and_compile_s": time.perf_counter() - t0,
             "lower_and_compile_cpu_s": time.process_time() - cpu0, "memory_gib": prog.total / aot.GiB,
             "temp_gib": prog.memory["temporaries"] / aot.GiB,
             "plan_gib": prog.plan_bytes / aot.GiB,
             "shapes": prog.shapes}
      print(json.dumps(row), flush=True)
      rows.append(row)
  print(f"{'layers':>6s} {'scan':>5s} {'compile s':>10s} {'memory GiB':>11s} {'temp GiB':>9s} "
        f"{'plan GiB':>9s}")
  for r in rows:
    print(f"{r['layers']:6d} {str(r['scan']):>5s} {r['compile_s']:10.1f} {r['memory_gib']:11.2f} "
          f"{r['temp_gib']:9.2f} {r['plan_gib']:9.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
