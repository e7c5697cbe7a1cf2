r"""k15's sampler vs transformers' `generate`, same architecture and weights, side by side.

Model: a random transformers LlamaForCausalLM (vocab 512, hidden 256, 4 layers, 8 query / 2 kv
heads of dim 32, SwiGLU intermediate 688 = 8/3 * 256 rounded to a multiple of 16, untied head),
written with save_pretrained and loaded into k15 with `k15.model.hf.load`, so both run the same
float32 weights. Workload: batch 32 x 64-token prompts, 256 new tokens, plain sampling
(temperature 1, no top-k/top-p), EOS disabled so both produce exactly 256 tokens per row.

transformers runs on the CPU under torch.no_grad() with its default attention (sdpa) and
dynamic KV cache, twice: with torch's default thread count and with one thread (on a small
model and a shared machine one thread is often much faster, as OpenMP workers spin and wait on
each other); the speed-up is quoted against the faster of the two.

k15 runs its compiled prefill + while_loop decode twice: on one JAX device (on CPU, XLA spreads
each op over the cores), and data-parallel over all devices under a mesh {'data': devices}, where
each device samples its share of the rows in its own loop (on CPU all devices read one host
copy of the weights, `parallel.share_cpu_replicas`). On CPU the script exposes one JAX device
per core (XLA_FLAGS=--xla_force_host_platform_device_count=<cores>, set before jax
starts unless XLA_FLAGS already sets a count); with one accelerator only the first row runs.
Both libraries are warmed up first (k15: compilation). The runs of all rows are interleaved,
--repeats rounds, and each row's time is its best run (best, not mean: dev machines are shared,
and interleaving spreads slow spells over all rows). Timed k15 runs use seeds different from
the warm-up.

The "% of peak" column relates a sampler to the machine: a large float32 jnp.dot is timed in the same
run, and the sampler's useful FLOPs are
  2 * (non-embedding params incl. the LM head) * (prompt + new tokens processed)
  + attention: 4 * N * H * (visible context) per token and layer,
i.e. what an ideal implementation must compute (the decode loop also computes attention over
masked cache slots, which is not counted).

Workload `longtail` (--workload=longtail): long-CoT responses have a long tail of lengths (k1.5
§2.6), and a static batch runs until its longest row ends. The same random Llama, in which the
last 4 of the 512 token ids end a response (EOS list); as the random model's next-token
distribution is close to uniform, a row ends with probability about 4/512 per token, so response
lengths are close to geometric with mean ~128 (the stop ids' logits are not biased; the measured
mean and longest length are printed). 32 random 64-token prompts x 8 samples (256 rows),
temperature 1, limit 1024 new tokens. k15 runs data-parallel on a mesh {'data': 2} of 2 CPU
devices, twice: the static path (`continuous=False`: one batch decoded until every row has
finished) and continuous batching (`continuous=True`: a fixed number of slots, refilled from
the queue of (prompt, sample) rows as rows finish, over a paged KV cache). Both use the same
seed and per-row RNG, so they sample the same rows, up to float32 ties: their attention adds up
in a different order, so where a row's uniform falls within rounding (~1e-7) of a boundary of
its CDF the two may draw neighbouring tokens, and that row goes its own way from there (about
one row in a run of 34k tokens). The check (`_compare_rows`) prints how many rows are
identical and, for the others, whether the first difference is such a tie (against the float64
CDF of the transformers model); any other difference is a divergence and makes it False.
transformers' `generate` runs
the same batch with the same EOS list (one torch thread; its rows are its own draws). The
measure is useful new tokens/s: the sum of the real response lengths (EOS included) over the
wall time. KV memory: the KV cache each path allocates (static: rows x (prompt + limit) slots
at its largest phase; continuous: the block pool) and, for continuous, the most blocks in use
at once; transformers' is its dynamic cache at the end (rows x (prompt + longest)). The k15
paths first run once with another seed (compilation); then every sampler runs --repeats
rounds (default 1 for this workload), interleaved, and its best time counts.

Prefill designs (--prefill_designs=batch1,batch8,chunk16,chunk64): continuous batching
prefills a prompt inside its loop when its first sample takes a slot, either whole in batches
of Q prompts between two decode steps (`prefill_batch=Q`, 'batchQ'; a batch runs Q prompts even
when fewer are new) or in chunks of n tokens that go through the model together with the
slots' decode step (`prefill_chunk=n`, 'chunkN'). The flag runs only these continuous designs,
side by side on the chosen workload (same seed, so the same rows up to float32 ties, checked
against the first design as above), and prints each design's useful new tokens/s and its ratio
to the first design and the best chunked / best batched ratio. Workloads: `longtail` (above,
64-token prompts: prefill is a small share) and `longprompt` (--workload=longprompt: where
prefill matters: 64 random prompts of 512-1024 tokens, uniform, padded to 1024, x 4 samples,
the same stop ids, limit 1024, 2 devices data-parallel). Each design first runs once on the
same shapes with every prompt but the first cut to one token and one new token (compilation,
a short run), then --repeats rounds (default 1), interleaved; the best counts.

Run from the repository root (not part of the tests):

  python -m benchmarks.sampler                       # writes benchmarks/results/sampler.json
  python -m benchmarks.sampler --repeats=1 --torch_threads=1 --out=/tmp/sampler.json
  python -m benchmarks.sampler --workload=longtail   # writes benchmarks/results/sampler_longtail.json
  python -m benchmarks.sampler --workload=longprompt --prefill_designs=batch1,batch8,chunk16,chunk64
      # writes benchmarks/results/sampler_prefill_longprompt.json
"""

import argparse
import contextlib
import json
import os
import tempfile
import time

# One CPU device per core, before jax starts (see the docstring).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={len(os.sched_getaffinity(0))}").strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from k15 import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from k15.model import hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from k15.sampling import sampler  # pylint: disable=g-import-not-at-top,wrong-import-position

ARCH = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _timed(fn, arg) -> float:
  t0 = time.perf_counter()
  fn(arg)
  return time.perf_counter() - t0


def _interleaved_times(fns: dict, repeats: int) -> dict:
  """Every fn's times over `repeats` rounds, one call of every fn per round."""
  times = {name: [] for name in fns}
  for i in range(repeats):
    for name, fn in fns.items():
      times[name].append(_timed(fn, i))
  return times


def _spread(times: list) -> dict:
  """Best (the figure the tables use), median and the spread of a row's timed runs."""
  return {"seconds": min(times), "seconds_median": float(np.median(times)),
          "seconds_max": max(times), "seconds_all": times}


def _matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  t = min(_timed(lambda _: jax.block_until_ready(dot(a, b)), None) for _ in range(repeats))
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


# The longtail workload (see the docstring).
LONGTAIL = dict(prompts=32, samples=8, prompt_len=64, limit=1024, devices=2)
STOP_IDS = tuple(range(ARCH["vocab_size"] - 4, ARCH["vocab_size"]))


def _kv_bytes_per_token(cfg) -> int:
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, float32


def _compare_rows(a, b, prompts, seed: int, ref, tie: float = 1e-5) -> dict:
  """Whether two samplers' rows (SampleResults, same seed and row seeds) are the same rows.

  At temperature 1 a row's token t inverts its CDF at one uniform (`sampler.row_uniforms`);
  the static and the continuous paths compute the same probabilities up to float32 rounding
  (their attention adds up in a different order), so where a uniform lies within that
  rounding of a CDF boundary they may draw neighbouring tokens, and the row then goes its own
  way (the later draws see a different context). That is not a divergence. A row counts as
  the same when it is identical (tokens, lengths, log-probs within 1e-4), or when its first
  difference is a different token after agreeing log-probs and its uniform lies within `tie`
  of the float64 CDF boundary between the two tokens (computed with `ref` in float64 on the
  shared prefix). Returns identical (count), ties [(row, t, token a, token b, u - boundary)],
  diverged (rows) and same (no row diverged).
  """
  import copy  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  u = sampler.row_uniforms(seed, np.arange(len(a.tokens)), a.tokens.shape[1])
  ref64 = None
  identical, ties, diverged = 0, [], []
  for r in range(len(a.tokens)):
    lp_differs = np.abs(a.logprobs[r] - b.logprobs[r]) > 1e-4
    differs = (a.tokens[r] != b.tokens[r]) | lp_differs
    if not differs.any():
      same_end = a.lengths[r] == b.lengths[r] and a.finish_reason[r] == b.finish_reason[r]
      identical += int(same_end)
      diverged += [] if same_end else [r]
      continue
    t = int(np.argmax(differs))
    lo, hi = sorted((int(a.tokens[r, t]), int(b.tokens[r, t])))
    if lo == hi or t >= min(a.lengths[r], b.lengths[r]):
      diverged.append(r)
      continue
    if ref64 is None:
      ref64 = copy.deepcopy(ref).double()
    ids = torch.tensor(np.concatenate([prompts[r], a.tokens[r, :t]])[None], dtype=torch.long)
    with torch.no_grad():
      probs = torch.softmax(ref64(ids).logits[0, -1], -1).numpy()
    cdf = np.cumsum(probs)
    # The tokens between the two drawn ones hold no probability (no top-k / top-p here), so
    # the two draws straddle one boundary, cdf[lo] (up to those empty tokens).
    gap = float(u[r, t] - cdf[lo])
    if abs(gap) < tie and cdf[hi - 1] - cdf[lo] < tie:
      ties.append((r, t, int(a.tokens[r, t]), int(b.tokens[r, t]), gap))
    else:
      diverged.append(r)
  return {"identical": identical, "ties": ties, "diverged": diverged, "same": not diverged}


# The longprompt workload: prefill matters (see the docstring).
LONGPROMPT = dict(prompts=64, samples=4, prompt_len=(512, 1024), limit=1024, devices=2)


def _workload_prompts(w: dict) -> list:
  """The workload's random prompts (seed 0): w['prompt_len'] tokens, or (lo, hi) uniform."""
  rng = np.random.RandomState(0)
  if isinstance(w["prompt_len"], int):
    return list(rng.randint(0, ARCH["vocab_size"] - 4, (w["prompts"], w["prompt_len"])))
  lo, hi = w["prompt_len"]
  return [rng.randint(0, ARCH["vocab_size"] - 4, (n,))
          for n in rng.randint(lo, hi + 1, w["prompts"])]


def _data_parallel(model, w: dict, workload: str):
  """A mesh {'data': w['devices']} and the model's parameters replicated on it."""
  if jax.device_count() < w["devices"]:
    raise SystemExit(f"the {workload} workload needs {w['devices']} devices, found "
                     f"{jax.device_count()}")
  mesh = parallel.make_mesh({"data": w["devices"]}, devices=jax.devices()[:w["devices"]])
  state = nnx.state(model)
  with parallel.use_mesh(mesh):
    placed = nnx.merge(nnx.graphdef(model), jax.device_put(state, parallel.state_shardings(state)))
  return mesh, placed


def _design(name: str) -> dict:
  """'batchQ' -> prefill_batch=Q; 'chunkN' -> prefill_chunk=N (generate's arguments)."""
  for prefix, key in (("batch", "prefill_batch"), ("chunk", "prefill_chunk")):
    if name.startswith(prefix) and name[len(prefix):].isdigit():
      return {key: int(name[len(prefix):])}
  raise SystemExit(f"--prefill_designs: {name!r} is not batchQ or chunkN (e.g. batch8, chunk64)")


def _prefill_designs(args, ref, model):
  """Continuous batching's prefill designs side by side on one workload (see the docstring)."""
  w = LONGTAIL if args.workload == "longtail" else LONGPROMPT
  designs = {name: _design(name) for name in args.prefill_designs.split(",")}
  prompts = _workload_prompts(w)
  lo, hi = min(map(len, prompts)), max(map(len, prompts))
  mesh, placed = _data_parallel(model, w, args.workload)
  print(f"backend {jax.default_backend()}, k15 continuous on {w['devices']} devices (data); "
        f"{w['prompts']} prompts of {lo}-{hi} tokens x {w['samples']} samples, limit "
        f"{w['limit']}, stop ids {list(STOP_IDS)}; designs {list(designs)}")
  rows, runs, results, seeds = {}, {}, {}, {}

  def runner(name, kw):
    def run(seed, limits=w["limit"], prompts=prompts):
      t0 = time.perf_counter()
      with parallel.use_mesh(mesh):
        res = sampler.generate(placed, prompts, max_new_tokens=limits, eos_id=list(STOP_IDS),
                               temperature=1.0, seed=seed, num_samples=w["samples"],
                               continuous=True, **kw)
      results[name], seeds[name] = res, seed
      print(f"  {name}, seed {seed}: {time.perf_counter() - t0:.1f} s, "
            f"{int(res.lengths.sum())} new tokens", flush=True)
      return res
    return run

  for name, kw in designs.items():
    run = runner(name, kw)
    # The same program (the same buckets: the first prompt whole with the limit, the others
    # one token with one new token), on a short run.
    short = [w["limit"]] + [1] * (len(prompts) - 1)
    stubs = prompts[:1] + [p[:1] for p in prompts[1:]]
    rows[name] = {"first_call_s": _timed(lambda _, run=run: run(12345, short, stubs), None), **kw}
    runs[name] = lambda i, run=run: run(1000 + i)
  for name, times in _interleaved_times(runs, args.repeats or 1).items():
    lengths = results[name].lengths
    rows[name].update(_spread(times), useful_tokens=int(lengths.sum()),
                      mean_length=float(lengths.mean()), max_length=int(lengths.max()),
                      tokens_per_s=float(lengths.sum()) / min(times),
                      kv_peak_bytes=results[name].stats["kv_peak_bytes"])
  first = next(iter(designs))
  row_prompts = [p for p in prompts for _ in range(w["samples"])]
  for name in list(designs)[1:]:
    check = _compare_rows(results[first], results[name], row_prompts, seeds[first], ref)
    rows[name].update(same_rows_as_first=check["same"], rows_identical_to_first=check["identical"],
                      rows_split_at_a_tie=check["ties"])
    print(f"{name} vs {first}: {check['identical']} of {len(row_prompts)} rows identical, "
          f"{len(check['ties'])} split at a float32 tie, diverged {check['diverged']}")
  base = rows[first]["tokens_per_s"]
  print(f"\n{'design':<10}{'seconds':>9}{'median':>8}{'max':>8}{'useful tok':>12}{'mean len':>10}"
        f"{'max len':>9}{'tok/s':>9}{'KV peak':>9}{f'vs {first}':>12}{'first call s':>14}")
  for name, r in rows.items():
    r["vs_first"] = r["tokens_per_s"] / base
    print(f"{name:<10}{r['seconds']:>9.2f}{r['seconds_median']:>8.2f}{r['seconds_max']:>8.2f}"
          f"{r['useful_tokens']:>12}{r['mean_length']:>10.1f}{r['max_length']:>9}"
          f"{r['tokens_per_s']:>9.0f}{r['kv_peak_bytes'] / 2**20:>9.1f}{r['vs_first']:>11.2f}x"
          f"{r['first_call_s']:>14.1f}")
  best = {kind: max((r["tokens_per_s"], n) for n, r in rows.items() if n.startswith(kind))
          for kind in ("chunk", "batch") if any(n.startswith(kind) for n in rows)}
  ratio = None
  if len(best) == 2:
    ratio = best["chunk"][0] / best["batch"][0]
    print(f"best chunked ({best['chunk'][1]}) / best batched ({best['batch'][1]}): {ratio:.2f}x")
  print(f"load average now {os.getloadavg()[0]:.2f}")
  return {"workload": args.workload, **w, "stop_ids": list(STOP_IDS), "rows": rows,
          "chunked_over_batched": ratio}


def _longtail(args, ref, model):
  """Static path vs continuous batching vs transformers on long-tailed response lengths."""
  import torch  # pylint: disable=g-import-not-at-top
  w = LONGTAIL
  paths = args.paths.split(",")
  prompts = np.stack(_workload_prompts(w))
  per_token = _kv_bytes_per_token(model.cfg)
  mesh, placed = _data_parallel(model, w, "longtail")
  print(f"backend {jax.default_backend()}, k15 on {w['devices']} devices (data), torch threads 1; "
        f"{w['prompts']} prompts x {w['samples']} samples, prompt {w['prompt_len']}, limit "
        f"{w['limit']}, stop ids {list(STOP_IDS)}")

  rows, runs, results, seeds = {}, {}, {}, {}

  def k15_runner(name, continuous):
    def run(seed):
      with parallel.use_mesh(mesh):
        res = sampler.generate(placed, list(prompts), max_new_tokens=w["limit"],
                               eos_id=list(STOP_IDS), temperature=1.0, seed=seed,
                               num_samples=w["samples"], continuous=continuous)
      results[name], seeds[name] = res, seed
      return res
    return run

  for name, continuous in (("k15 static", False), ("k15 continuous", True)):
    if name.split()[1] not in paths:
      continue
    run = k15_runner(name, continuous)
    rows[name] = {"first_call_s": _timed(run, 12345)}
    runs[name] = lambda i, run=run: run(1000 + i)

  if "transformers" in paths:
    ids = torch.tensor(np.repeat(prompts, w["samples"], axis=0), dtype=torch.long)

    def hf_run(seed):
      torch.set_num_threads(1)
      torch.manual_seed(seed)
      with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=w["limit"],
                           eos_token_id=list(STOP_IDS), pad_token_id=0)
      new = out[:, w["prompt_len"]:].numpy()
      stop = np.isin(new, STOP_IDS)
      # A row's length runs to its first stop id, included (k15 counts the EOS token too).
      lengths = np.where(stop.any(1), stop.argmax(1) + 1, new.shape[1])
      results["transformers"] = lengths
      return lengths
    runs["transformers (1 thr)"] = hf_run
    rows["transformers (1 thr)"] = {"torch_threads": 1}

  for name, times in _interleaved_times(runs, args.repeats or 1).items():
    seconds = min(times)
    rows[name].update(_spread(times))
    if name.startswith("transformers"):
      lengths = results["transformers"]
      kv = lengths.size * (w["prompt_len"] + int(lengths.max())) * per_token
      rows[name].update(kv_bytes=kv)
    else:
      res = results[name]
      lengths = res.lengths
      rows[name].update(kv_bytes=res.stats["kv_bytes"],
                        kv_peak_bytes=res.stats.get("kv_peak_bytes"))
    rows[name].update(useful_tokens=int(lengths.sum()),
                      mean_length=float(lengths.mean()), max_length=int(lengths.max()),
                      tokens_per_s=float(lengths.sum()) / seconds)
  if "k15 static" in results and "k15 continuous" in results:
    check = _compare_rows(results["k15 static"], results["k15 continuous"],
                          np.repeat(prompts, w["samples"], axis=0), seeds["k15 static"], ref)
    assert seeds["k15 static"] == seeds["k15 continuous"], seeds
    ties = ", ".join(f"row {r} at token {t} ({a} vs {b}, u {gap:+.1e} from the boundary)"
                     for r, t, a, b, gap in check["ties"])
    print(f"static and continuous: {check['identical']} of {len(prompts) * w['samples']} rows "
          f"identical; split at a float32 tie: {len(check['ties'])}{': ' + ties if ties else ''}; "
          f"diverged otherwise: {check['diverged']}. Same rows up to ties: {check['same']}")
    rows["k15 continuous"]["same_rows_as_static"] = check["same"]
    rows["k15 continuous"]["rows_identical_to_static"] = check["identical"]
    rows["k15 continuous"]["rows_split_at_a_tie"] = check["ties"]

  print(f"\n{'sampler':<24}{'seconds':>9}{'median':>8}{'max':>8}{'useful tok':>12}{'mean len':>10}{'max len':>9}"
        f"{'tok/s':>9}{'KV MiB':>9}{'KV peak':>9}{'vs static':>11}{'vs transf.':>12}")
  static = rows.get("k15 static", {}).get("tokens_per_s")
  hf_tps = rows.get("transformers (1 thr)", {}).get("tokens_per_s")
  for name, r in rows.items():
    peak = r.get("kv_peak_bytes")
    vs_s = f"{r['tokens_per_s'] / static:.2f}x" if static else "-"
    vs_h = f"{r['tokens_per_s'] / hf_tps:.2f}x" if hf_tps else "-"
    r.update(vs_static=r["tokens_per_s"] / static if static else None,
             vs_transformers=r["tokens_per_s"] / hf_tps if hf_tps else None)
    print(f"{name:<24}{r['seconds']:>9.2f}{r['seconds_median']:>8.2f}{r['seconds_max']:>8.2f}"
          f"{r['useful_tokens']:>12}{r['mean_length']:>10.1f}"
          f"{r['max_length']:>9}{r['tokens_per_s']:>9.0f}{r['kv_bytes'] / 2**20:>9.1f}"
          f"{(f'{peak / 2**20:.1f}' if peak else '-'):>9}{vs_s:>11}{vs_h:>12}")
  first = ", ".join(f"{name} {r['first_call_s']:.1f} s" for name, r in rows.items()
                    if "first_call_s" in r)
  print(f"k15 first call (compile + run): {first}; load average now {os.getloadavg()[0]:.2f}")
  return {"workload": "longtail", **w, "stop_ids": list(STOP_IDS), "rows": rows}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workload", default="uniform",
                      choices=("uniform", "longtail", "longprompt"))
  parser.add_argument("--paths", default="static,continuous,transformers",
                      help="longtail: which samplers to run (comma-separated)")
  parser.add_argument("--prefill_designs", default="",
                      help="longtail / longprompt: compare continuous batching's prefill designs "
                           "instead, e.g. batch1,batch8,chunk16,chunk64 (see the docstring)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timed rounds (default 5; longtail: 1)")
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--torch_threads", default="",
                      help="comma-separated torch thread counts to time (default: torch's "
                           "default and 1)")
  parser.add_argument("--out", default="",
                      help="default benchmarks/results/sampler.json (longtail: "
                           "sampler_longtail.json)")
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
  if args.prefill_designs or args.workload == "longprompt":
    if not args.prefill_designs or args.workload == "uniform":
      raise SystemExit("--prefill_designs goes with --workload=longtail or longprompt")
    result = _prefill_designs(args, ref, model)
    out = args.out or f"benchmarks/results/sampler_prefill_{args.workload}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return
  if args.workload == "longtail":
    result = _longtail(args, ref, model)
    out = args.out or "benchmarks/results/sampler_longtail.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return
  args.repeats = args.repeats or 5
  args.out = args.out or "benchmarks/results/sampler.json"

  rows, runs = {}, {}
  load_before = f"{os.getloadavg()[0]:.2f}"
  devices = jax.device_count()
  print(f"backend {jax.default_backend()}, {devices} device(s); torch threads "
        f"{torch.get_num_threads()}")

  def k15_runner(mesh, continuous=False):
    placed = model
    if mesh is not None:  # parameters replicated on every device once, as training would
      state = nnx.state(model)
      with parallel.use_mesh(mesh):
        placed = nnx.merge(nnx.graphdef(model),
                           jax.device_put(state, parallel.state_shardings(state)))

    def run(seed):
      with parallel.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        res = sampler.generate(placed, list(prompts), max_new_tokens=args.new_tokens,
                               eos_id=None, temperature=1.0, seed=seed, continuous=continuous)
      assert res.lengths.min() == args.new_tokens
      kv[continuous] = res.stats["kv_bytes"]
      return res
    return run

  k15_rows = {"k15 (1 device)": (None, False)}
  if devices > 1:
    k15_rows[f"k15 (data x{devices})"] = (parallel.make_mesh({"data": devices}), False)
    k15_rows[f"k15 continuous (data x{devices})"] = (k15_rows[f"k15 (data x{devices})"][0], True)
  kv = {}
  for name, (mesh, continuous) in k15_rows.items():
    run = k15_runner(mesh, continuous)
    rows[name] = {"first_call_s": _timed(run, 12345), "devices": 1 if mesh is None else devices}
    rows[name]["kv_bytes"] = kv[continuous]
    runs[name] = lambda i, run=run: run(1000 + i)

  if not args.skip_transformers:
    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    def hf_runner(threads):
      def run(seed):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        with torch.no_grad():
          out = ref.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape
        return out
      return run

    # torch's default (one thread per core) and one thread: on a small model and a busy
    # machine the single thread is often faster, and the comparison uses the faster of the two.
    default_threads = torch.get_num_threads()
    counts = ([int(t) for t in args.torch_threads.split(",")] if args.torch_threads
              else sorted({default_threads, 1}, reverse=True))
    for threads in counts:
      name = f"transformers ({threads} thr)"
      runs[name] = hf_runner(threads)
      runs[name](0)  # warm-up
      rows[name] = {"torch_threads": threads}

  for name, times in _interleaved_times(runs, args.repeats).items():
    rows[name].update(_spread(times), tokens_per_s=new / min(times))
  if not args.skip_transformers:
    torch.set_num_threads(default_threads)

  peak = _matmul_flops()
  flops = _sampler_flops(cfg, args.batch, args.prompt_len, args.new_tokens)
  for r in rows.values():
    r["gflops"] = flops / r["seconds"] / 1e9
    r["share_of_matmul_peak"] = flops / r["seconds"] / peak
  base = max((r["tokens_per_s"] for name, r in rows.items() if name.startswith("transformers")),
             default=None)
  best_k15 = max(r["tokens_per_s"] for name, r in rows.items() if name.startswith("k15"))

  print(f"\nbatch {args.batch} x {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
        f"sampling at temperature 1; params {cfg.num_params():,}; "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3 jnp.dot)\n")
  print(f"{'sampler':<34}{'seconds':>9}{'median':>8}{'max':>8}{'KV MiB':>8}{'new tok/s':>11}{'GFLOP/s':>9}{'% of peak':>11}"
        f"{'vs best transformers':>22}")
  for name, r in rows.items():
    ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
    kv_mib = f"{r['kv_bytes'] / 2**20:.1f}" if "kv_bytes" in r else "-"
    print(f"{name:<34}{r['seconds']:>9.3f}{r['seconds_median']:>8.3f}{r['seconds_max']:>8.3f}"
          f"{kv_mib:>8}{r['tokens_per_s']:>11.0f}{r['gflops']:>9.2f}"
          f"{100 * r['share_of_matmul_peak']:>10.1f}%{ratio:>22}")
  first = ", ".join(f"{name} {r['first_call_s']:.1f} s" for name, r in rows.items()
                    if "first_call_s" in r)
  if base:
    print(f"\nbest k15 / best transformers: {best_k15 / base:.2f}x")
  print(f"k15 first call (compile + run): {first}; "
        f"load average before/after: {load_before} / {os.getloadavg()[0]:.2f}")

  result = {
      "arch": {k: v for k, v in ARCH.items() if v is not None},
      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "backend": jax.default_backend(), "matmul_peak_flops": peak,
      "sampler_useful_flops": flops, "rows": rows,
      "devices": devices,
      "speedup_vs_best_transformers": (best_k15 / base) if base else None,
      "load_average_before": float(load_before),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
