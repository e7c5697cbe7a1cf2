r"""The tiny reproduction's RL stage, timed by phase: where an RL iteration's time goes.

Runs the default config's data, tokenizer, SFT and curation stages (each reused when finished in
the workdir; copy them from a finished default run to start RL from its SFT model) and then its
RL stage, with timers around the trainer's sampling, the reference pass and each train step
(blocked until ready), and JAX's compile events. Per iteration it prints the wall time, those
phases, the compile seconds, and the training figures (reward, accuracy, mean response length,
batch digest, loss) that two arms must share when a change is to keep the run's results.

  cp -r FINISHED_RUN/{data,sft,tokenizer.model} SRC/
  python -m benchmarks.rl_stage --src=SRC --workdir=/tmp/rl_a --iterations=6 \
      --set="rl.batching='auto'"
  python -m benchmarks.rl_stage --src=SRC --workdir=/tmp/rl_b --iterations=6 \
      --set="rl.batching='static'"
"""

import argparse
import ast
import collections
import json
import os
import shutil
import time

import jax

from k15 import config as k15_config
from k15 import parallel, pipeline
from k15.rl import stage
from k15.rl import trainer as trainer_lib


def _timed(phase: dict, key: str, fn, block: bool = False):
  def wrapped(*args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    if block:
      jax.block_until_ready(out)
    phase[key] += time.perf_counter() - t
    return out
  return wrapped


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/tiny_cpu.py", help="PATH[:ARG]")
  parser.add_argument("--src", default="", help="a workdir whose stages to copy first")
  parser.add_argument("--workdir", required=True, help="emptied first")
  parser.add_argument("--iterations", type=int, default=4)
  parser.add_argument("--set", action="append", default=[],
                      help="config override key=python-literal, e.g. rl.batching='static'")
  parser.add_argument("--out", default="", help="JSON of the rows (default WORKDIR/timing.json)")
  args = parser.parse_args(argv)

  config = k15_config.from_file(args.config)  # e.g. configs/tiny_cpu.py:runlocal=True
  config.rl.iterations = args.iterations
  for item in args.set:
    key, _, value = item.partition("=")
    *path, last = key.split(".")
    node = config
    for name in path:
      node = node[name]
    node[last] = ast.literal_eval(value)
  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  if args.src:
    shutil.copytree(args.src, args.workdir)

  compile_s = collections.Counter()
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: compile_s.update({event: duration})
      if "backend_compile" in event else None)
  phase = collections.defaultdict(float)
  cls = trainer_lib.RLTrainer
  cls._collect = _timed(phase, "sample_s", cls._collect)
  cls._reference_logprobs = _timed(phase, "reference_s", cls._reference_logprobs)
  train_step = cls._train_step
  cls._train_step = lambda self, n: _timed(phase, "train_steps_s", train_step(self, n), True)
  step, rows = cls.step, []

  def timed_step(self):
    phase.clear()
    before, t = sum(compile_s.values()), time.perf_counter()
    m = step(self)
    rows.append({"iteration": self.iteration, "wall_s": time.perf_counter() - t, **phase,
                 "compile_s": sum(compile_s.values()) - before,
                 "reward": m.get("rl/reward"), "accuracy": m.get("rl/accuracy"),
                 "length_mean": m.get("rl/response_length_mean"), "loss": m.get("train/loss"),
                 "batch_hash": m["rl/batch_hash"], "load": os.getloadavg()[0]})
    print(json.dumps({k: round(v, 4) if isinstance(v, float) and k != "batch_hash" else v
                      for k, v in rows[-1].items()}), flush=True)
    return m
  cls.step = timed_step

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    _, tok, sft_model, records = pipeline.base_stages(config, args.workdir, mesh)
    t = time.perf_counter()
    stage.rl_stage(config, sft_model, records, tok, mesh, os.path.join(args.workdir, "rl"))
  total = time.perf_counter() - t
  print(f"RL stage {total:.1f} s for {args.iterations} iterations; load average now "
        f"{os.getloadavg()[0]:.2f}")
  out = args.out or os.path.join(args.workdir, "timing.json")
  with open(out, "w") as f:
    json.dump({"overrides": args.set, "rl_stage_s": total, "rows": rows}, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
