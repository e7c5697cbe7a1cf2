r"""Train-step model FLOP/s against this machine's own matmul FLOP/s, and the layout switch.

Issue 7 §4. The train step is k15's own (`update.make_train_step`: forward, backward, AdamW with
clipping, jitted with explicit shardings and buffer donation) on a ~100M-parameter model
(D=768, 12 layers, 12 heads of 64, SwiGLU 2304, vocab 8192, tied embeddings: 98.3M params) with
1024-token rows, float32, on one device. Model FLOPs per step come from `k15.plan.train_flops`
(6 x matmul params x tokens + causal attention); remat's recomputation is not counted, so it
shows as a lower ratio. The denominator is a large float32 `jnp.dot` (4096^2 by default)
measured in the same run, before every train-step row and at the end; the largest is used.
Goal: ratio >= 40%.

The layout switch moves the parameters between the training layout (FSDP over all devices)
and sampling layouts (2-way data x 4-way tensor; fully replicated) with `jax.device_put` to
the other shardings, and back; each time is the best of --repeats after a warm-up.

Run by hand from the repository root (not part of the tests):

  python -m benchmarks.train_step                                  # all rows, JSON to /tmp
  python -m benchmarks.train_step --batch=4 --remat=none --impls=flash --out=/tmp/ts.json

It prints one line per row, then the tables, and writes JSON to --out
(default /tmp/k15_train_step.json). Rows whose compiled peak memory exceeds --max_gib are not
run ('oom-skipped'). Times are the best of --repeats steps after one warm-up step, since the
machine may be shared.
"""

import argparse
import json
import os
import sys
import time

# The layout switch needs several devices; on a CPU host fake 8 before jax is imported.
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top

from k15 import config as k15_config  # pylint: disable=g-import-not-at-top
from k15 import parallel, plan, update  # pylint: disable=g-import-not-at-top
from k15.model import transformer  # pylint: disable=g-import-not-at-top

_GIB = 2**30

MODEL = dict(vocab_size=8192, embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=12,
             head_dim=64, mlp_dim=2304, tie_embeddings=True, param_dtype="float32",
             dtype="float32", attention_block_size=256)


def _best(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_flops(n: int = 4096, repeats: int = 3, device=None) -> float:
  """float32 FLOP/s of an n x n x n `jnp.dot` on one device (best of `repeats`)."""
  device = device or jax.devices()[0]
  x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32),
                     device)
  y = jax.device_put(jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jnp.float32),
                     device)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(x, y))
  return 2 * n**3 / _best(lambda: dot(x, y), repeats)


def _loss_fn(model, batch):
  logp = update.token_logprobs(model, batch["tokens"])                      # [B, T]
  return -jnp.mean(logp[:, 1:]), {}


def train_step_row(cfg: transformer.ModelConfig, batch: int, seq_len: int, *, repeats: int,
                   max_gib: float, device=None) -> dict:
  """Compiles and times k15's train step on one device; model FLOP/s and compiled memory."""
  device = device or jax.devices()[0]
  mesh = parallel.make_mesh({"data": 1}, [device])
  row = {"remat": cfg.remat, "attention": cfg.attention_impl, "batch": batch,
         "seq_len": seq_len, "params": cfg.num_params()}
  with parallel.use_mesh(mesh):
    model = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    del model
    param_sh = parallel.state_shardings(params)
    optimizer = update.make_optimizer(k15_config.optimizer_block(learning_rate=1e-4))
    opt_state, opt_sh = update.init_optimizer_state(optimizer, params, param_sh, mesh)
    batch_sh = {"tokens": parallel.sharding(("batch", None), (batch, seq_len))}
    step = update.make_train_step(graphdef, _loss_fn, optimizer, param_shardings=param_sh,
                                  opt_shardings=opt_sh, batch_shardings=batch_sh, donate=True)
    tokens = jax.device_put(jax.random.randint(jax.random.key(0), (batch, seq_len), 0,
                                               cfg.vocab_size, jnp.int32), batch_sh["tokens"])
    data = {"tokens": tokens}
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, data).compile()
    row["compile_s"] = time.perf_counter() - start
    ma = compiled.memory_analysis()
    row["compiled_peak_gib"] = (ma.argument_size_in_bytes + ma.temp_size_in_bytes) / _GIB
    row["flops"] = plan.train_flops(cfg, batch, seq_len)
    if row["compiled_peak_gib"] > max_gib:
      row["status"] = "oom-skipped"
      return row

    state = {"params": params, "opt": opt_state}

    def one_step():
      state["params"], state["opt"], metrics = compiled(state["params"], state["opt"], data)
      return metrics["loss"]

    loss0 = float(one_step())  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      loss = jax.block_until_ready(one_step())
      times.append(time.perf_counter() - start)
    # The loss falls over the steps: the step trains, it is not optimized away.
    row.update(status="ok", step_s=min(times), step_s_mean=float(np.mean(times)),
               loss_first=loss0, loss_last=float(loss))
    row["tflops"] = row["flops"] / row["step_s"] / 1e12
  return row


def layout_switch(cfg: transformer.ModelConfig, repeats: int) -> list[dict]:
  """Times jax.device_put of the parameters: FSDP (training) <-> sampling layouts."""
  devices = jax.devices()
  n = len(devices)
  train_mesh = parallel.make_mesh({"fsdp": n}, devices)
  tensor = 4 if n % 4 == 0 else 1
  layouts = {"data2xtensor4" if tensor == 4 else "data": parallel.make_mesh(
      {"data": n // tensor, "tensor": tensor}, devices)}
  layouts["replicated"] = None
  with parallel.use_mesh(train_mesh):
    model = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(model)
    train_sh = jax.tree.leaves(parallel.state_shardings(state))
  leaves = jax.tree.leaves(state)
  nbytes = sum(x.nbytes for x in leaves)
  rows = []
  for name, mesh in layouts.items():
    if mesh is None:
      rep = jax.sharding.NamedSharding(train_mesh, jax.sharding.PartitionSpec())
      sample_sh = [rep] * len(leaves)
    else:
      with parallel.use_mesh(mesh):
        sample_sh = jax.tree.leaves(parallel.state_shardings(state))
    to_sample = lambda: jax.device_put(leaves, sample_sh)
    sampled = jax.block_until_ready(to_sample())  # warm-up (and the arrays to go back from)
    to_train = lambda: jax.device_put(sampled, train_sh)
    jax.block_until_ready(to_train())
    per_device = sum(x.addressable_shards[0].data.nbytes for x in sampled)
    rows.append({"layout": name, "devices": n, "param_bytes": nbytes,
                 "sampling_bytes_per_device": per_device,
                 "train_to_sample_s": _best(to_sample, repeats),
                 "sample_to_train_s": _best(to_train, repeats)})
    del sampled
  return rows


def format_tables(result: dict) -> str:
  peak = result["matmul_tflops"]
  lines = [f"{'remat':>6} {'attention':>10} {'B x T':>10} {'step s':>8} {'TFLOP/s':>8} "
           f"{'ratio':>7} {'compiled GiB':>12} {'compile s':>9}"]
  for r in result["rows"]:
    if r["status"] == "ok":
      perf = f"{r['step_s']:8.2f} {r['tflops']:8.4f} {r['tflops'] / peak:7.1%}"
    else:
      perf = f"{r['status']:>8} {'-':>8} {'-':>7}"
    lines.append(f"{r['remat']:>6} {r['attention']:>10} {r['batch']:>4} x{r['seq_len']:>5} "
                 f"{perf} {r['compiled_peak_gib']:12.2f} {r['compile_s']:9.1f}")
  all_ = ", ".join(f"{m:.4f}" for m in result["matmul_tflops_all"])
  lines.append(f"matmul {result['matmul_n']}^2 float32 TFLOP/s: {all_}; the ratio uses the "
               f"largest, {peak:.4f}")
  lines.append("")
  lines.append(f"{'layout switch':>16} {'MiB/device':>11} {'train->sample s':>16} "
               f"{'sample->train s':>16}")
  for r in result["layout"]:
    lines.append(f"{'fsdp<->' + r['layout']:>16} {r['sampling_bytes_per_device'] / 2**20:11.1f} "
                 f"{r['train_to_sample_s']:16.4f} {r['sample_to_train_s']:16.4f}")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4, help="rows per step")
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--remat", default="none,full", help="comma-separated remat policies")
  parser.add_argument("--impls", default="reference,flash", help="comma-separated attention")
  parser.add_argument("--repeats", type=int, default=2, help="timed steps after one warm-up")
  parser.add_argument("--matmul_n", type=int, default=4096)
  parser.add_argument("--max_gib", type=float, default=10.0,
                      help="skip rows whose compiled peak memory exceeds this")
  parser.add_argument("--skip_layout", action="store_true")
  parser.add_argument("--out", default="/tmp/k15_train_step.json")
  args = parser.parse_args()

  device = jax.devices()[0]
  print(f"train-step benchmark on {device} ({jax.device_count()} devices, {os.cpu_count()} "
        f"CPUs), jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True)
  # The matmul rate is measured before every row and at the end, and the ratio uses the
  # largest: on a shared machine that is the conservative denominator.
  matmuls = []

  def measure_matmul():
    matmuls.append(matmul_flops(args.matmul_n, device=device))
    print(f"  matmul {args.matmul_n}^2 float32: {matmuls[-1] / 1e12:.4f} TFLOP/s", flush=True)

  rows = []
  for remat in args.remat.split(","):
    for impl in args.impls.split(","):
      measure_matmul()
      cfg = transformer.ModelConfig(**MODEL, remat=remat, attention_impl=impl)
      row = train_step_row(cfg, args.batch, args.seq_len, repeats=args.repeats,
                           max_gib=args.max_gib, device=device)
      print(f"  {remat:>5} {impl:>9}: " + (
          f"{row['step_s']:.2f} s/step, {row['tflops']:.4f} TFLOP/s, "
          f"{row['tflops'] * 1e12 / matmuls[-1]:.1%} of the last matmul"
          if row["status"] == "ok" else row["status"])
          + f" (compiled peak {row['compiled_peak_gib']:.2f} GiB)", flush=True)
      rows.append(row)
  measure_matmul()
  layout = [] if args.skip_layout else layout_switch(
      transformer.ModelConfig(**MODEL), args.repeats)
  result = {"config": vars(args), "model": MODEL, "device": str(device),
            "devices": jax.device_count(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "matmul_n": args.matmul_n,
            "matmul_tflops_all": [m / 1e12 for m in matmuls],
            "matmul_tflops": max(matmuls) / 1e12, "rows": rows, "layout": layout}
  for r in rows:
    if r["status"] == "ok":
      r["ratio"] = r["tflops"] / result["matmul_tflops"]
  print(format_tables(result))
  best = max((r["ratio"] for r in rows if r["status"] == "ok"), default=0.0)
  print(f"best ratio {best:.1%} (goal >= 40%)")
  if os.path.dirname(args.out):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
