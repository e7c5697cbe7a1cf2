r"""Attention forward+backward time and memory vs sequence length: reference vs flash.

Shape: B=1, N=8 query heads, K=2 kv heads, H=64, one causal segment of T tokens (T = S), float32
by default. For each length and implementation the jitted forward and forward+backward
(gradients w.r.t. q, k, v) are compiled; memory comes from the compiled program's
`memory_analysis()` (temp = scratch buffers, peak = temp + arguments + outputs), time is the
best of --repeats runs after one warm-up (best, not mean, because CI and dev machines are shared).
Where the reference's compiled forward+backward would need more than --max_gib it is not run and
its time reads 'oom-skipped'.

Run by hand from the repository root (not part of the tests):

  python -m benchmarks.attention                          # 1k .. 32k, writes the JSON below
  python -m benchmarks.attention --lengths=1024,4096 --out=/tmp/attn.json

It prints one progress line per row, then the table, and writes JSON to --out
(default benchmarks/results/attention.json; results are not committed).

GFLOP/s counts useful causal FLOPs: forward 2 * 2 * B * N * H * T^2 / 2, forward+backward 3.5x
that (flash recomputes the scores in its backward); the reference computes the full T x S matrix,
so its useful rate is at most half its raw rate.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from k15.model import attention

_MIB = 2**20


def _programs(impl: str, block_size: int):
  """Jitted forward and forward+backward of attention on one causal segment."""

  def out_sum(q, k, v, seg, pos):
    out = attention.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                           kv_positions=pos, impl=impl, block_size=block_size)
    return jnp.sum(out.astype(jnp.float32))

  fwd = jax.jit(out_sum)
  fwd_bwd = jax.jit(jax.grad(out_sum, argnums=(0, 1, 2)))
  return fwd, fwd_bwd


def _memory(compiled) -> dict[str, float]:
  ma = compiled.memory_analysis()
  peak = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
          - ma.alias_size_in_bytes)
  return {"temp_mib": ma.temp_size_in_bytes / _MIB, "peak_mib": peak / _MIB}


def _best_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Warm-up.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def benchmark(lengths, impls, *, batch=1, heads=8, kv_heads=2, head_dim=64, dtype="float32",
              block_size=512, repeats=3, max_gib=8.0, log=print) -> list[dict]:
  """One row per (length, impl) with times in seconds and compiled memory in MiB."""
  rows = []
  for t in lengths:
    rng = np.random.default_rng(t)
    q = jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, t, kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, t, kv_heads, head_dim)), dtype)
    seg = jnp.ones((batch, t), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
    args = (q, k, v, seg, pos)
    flops_fwd = 2 * 2 * batch * heads * head_dim * t * t / 2
    for impl in impls:
      fwd, fwd_bwd = _programs(impl, block_size)
      start = time.perf_counter()
      fwd_c, fwd_bwd_c = fwd.lower(*args).compile(), fwd_bwd.lower(*args).compile()
      row = {"length": t, "impl": impl, "compile_s": time.perf_counter() - start}
      mem_fwd, mem_fwd_bwd = _memory(fwd_c), _memory(fwd_bwd_c)
      row.update(fwd_temp_mib=mem_fwd["temp_mib"], fwd_bwd_temp_mib=mem_fwd_bwd["temp_mib"],
                 fwd_bwd_peak_mib=mem_fwd_bwd["peak_mib"])
      if mem_fwd_bwd["peak_mib"] > max_gib * 1024:
        row.update(status="oom-skipped", fwd_s=None, fwd_bwd_s=None, fwd_bwd_gflops=None)
      else:
        row.update(status="ok", fwd_s=_best_time(fwd_c, args, repeats),
                   fwd_bwd_s=_best_time(fwd_bwd_c, args, repeats))
        row["fwd_bwd_gflops"] = 3.5 * flops_fwd / row["fwd_bwd_s"] / 1e9
      log(f"  done {_format_row(row)}", flush=True)
      rows.append(row)
  return rows


_HEADER = (f"{'length':>7} {'impl':>9} {'fwd ms':>10} {'fwd+bwd ms':>11} {'GFLOP/s':>8} "
           f"{'fwd temp MiB':>13} {'f+b temp MiB':>13} {'f+b peak MiB':>13}")


def _format_row(row: dict) -> str:
  if row["status"] == "ok":
    times = (f"{row['fwd_s'] * 1e3:10.1f} {row['fwd_bwd_s'] * 1e3:11.1f} "
             f"{row['fwd_bwd_gflops']:8.1f}")
  else:
    times = f"{row['status']:>10} {row['status']:>11} {'-':>8}"
  return (f"{row['length']:>7} {row['impl']:>9} {times} {row['fwd_temp_mib']:13.1f} "
          f"{row['fwd_bwd_temp_mib']:13.1f} {row['fwd_bwd_peak_mib']:13.1f}")


def format_table(rows: list[dict]) -> str:
  return "\n".join([_HEADER] + [_format_row(r) for r in rows])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768",
                      help="comma-separated sequence lengths (T = S)")
  parser.add_argument("--impls", default="reference,flash", help="comma-separated impls")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8, help="query heads N")
  parser.add_argument("--kv_heads", type=int, default=2, help="key/value heads K")
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--block_size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
  parser.add_argument("--max_gib", type=float, default=8.0,
                      help="skip (oom-skipped) programs whose compiled peak exceeds this")
  parser.add_argument("--out", default="benchmarks/results/attention.json")
  args = parser.parse_args()

  lengths = [int(x) for x in args.lengths.split(",")]
  impls = args.impls.split(",")
  config = {k: v for k, v in vars(args).items() if k != "out"}
  device = str(jax.devices()[0])
  print(f"attention benchmark on {device} ({jax.device_count()} devices, {os.cpu_count()} CPUs),"
        f" jax {jax.__version__}: B={args.batch} N={args.heads} "
        f"K={args.kv_heads} H={args.head_dim} {args.dtype}, causal, block {args.block_size}",
        flush=True)
  rows = benchmark(lengths, impls, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                   head_dim=args.head_dim, dtype=args.dtype, block_size=args.block_size,
                   repeats=args.repeats, max_gib=args.max_gib)
  print(format_table(rows))
  if os.path.dirname(args.out):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"config": config, "device": device, "jax": jax.__version__, "rows": rows}, f,
              indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
