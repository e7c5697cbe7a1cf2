r"""A paired-seed study of RL arms: what a sceptical reader needs to believe an ablation.

    python -m k15.study --config=configs/tiny_cpu.py --study=negative_gradients --seeds=4 \
        --workdir=/tmp/k15_study [--arms=pmd,rest] [--config.rl.iterations=40 ...]

SFT and curation run once (k15.pipeline.base_stages in W/base); then every arm of the study
runs RL from that SFT model on those curated prompts for each seed pair s. Within pair s all
arms share the RL sampling seed (config.seed + s) and the prompt-order seed (config.data.seed,
the same number), so they differ only in the study's overrides and a paired difference
cancels the luck of the draw. An arm that overrides what the base stages read (pipeline.*,
sft.*, model.*, e.g. rl_lift's demonstrator) gets its own base, W/base-<overrides>.

Every model (each base's SFT model once, each arm x seed RL model) is evaluated on one larger
held-out set (config.study: eval_problems per family, eval_samples at temperature T, the same
evaluation seed for every model): pass@1 (mean correctness over the samples), pass@k from the
same samples (the unbiased estimator), greedy accuracy, mean response tokens.

Workdir layout (rerunning the command skips finished runs; an interrupted RL run resumes from
its checkpoint):

  W/eval.jsonl                     the held-out problems
  W/base[-KEY]/                    data, tokenizer, SFT, curation (k15.pipeline's layout)
  W/base[-KEY]/eval_sft.json       the SFT model's evaluation (per problem too)
  W/runs/ARM/seedS/rl/             RL checkpoints and metrics
  W/runs/ARM/seedS/eval.json       the RL model's evaluation; its presence marks the run done
  W/study.json, W/study.md         per arm: mean and 95% t interval over seeds; per paired
                                   difference vs the first arm: t interval over seed pairs and
                                   a bootstrap interval over seeds x problems; RL - SFT per arm
  W/study.png                      per-arm means with their intervals

`--study=long2short` (`run_long2short_study`) pairs differently: per seed pair, one long RL
model from the shared SFT model, then each long2short method (k15.long2short) from it, every
method at `long2short.token_budget` sampled tokens; its arms are `long` and the methods.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

# The studies: arm name -> config overrides (dotted keys). The first arm is the reference of
# the paired differences. '{mid}' in a string value becomes rl.iterations // 2.
STUDIES: dict[str, dict[str, dict[str, Any]]] = {
    # §2.3: PMD's negative gradients vs ReST (correct samples only) vs REINFORCE (PMD at
    # tau = 0, k15.rl.loss.reinforce_loss) vs GRPO.
    "negative_gradients": {
        "pmd": {"rl.loss": "pmd"},
        "rest": {"rl.loss": "rest"},
        "reinforce": {"rl.loss": "reinforce"},
        "grpo": {"rl.loss": "grpo"},
    },
    # §2.3.4: prioritized (P ∝ 1 - s_i) vs uniform vs a curriculum (all prompts, then the hard
    # bucket only from mid-training); the curriculum arm samples uniformly within its stage.
    "sampling": {
        "prioritized": {"rl.sampling.mode": "prioritized"},
        "uniform": {"rl.sampling.mode": "uniform"},
        "curriculum": {"rl.sampling.mode": "uniform", "rl.sampling.curriculum": "0:all,{mid}:hard"},
    },
    # What RL does to a careless demonstrator's SFT model and to a clean one (own bases).
    "rl_lift": {
        "careless": {"pipeline.sft_carry_slip": 0.6},
        "clean": {"pipeline.sft_carry_slip": 0.0},
    },
}

# The long2short study's base: the README's long2short demonstrator, who forgets no carries and
# restates 75% of the columns (redundant tokens for the methods to trim).
LONG2SHORT_BASE = {"pipeline.sft_carry_slip": 0.0, "pipeline.sft_recheck": 0.75}

# Overrides under these keys change what the base stages (data, tokenizer, SFT, curation) make;
# curation samples up to rl.max_new_tokens tokens.
BASE_PREFIXES = ("pipeline.", "sft.", "model.", "rl.max_new_tokens", "seed")
METRICS = ("pass1", "greedy", "pass_k", "mean_tokens")
LEVEL = 0.95


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------

def _t_central(t: float, df: int) -> float:
  """P(|T| <= t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4, exact)."""
  theta = math.atan(t / math.sqrt(df))
  s, c2 = math.sin(theta), math.cos(theta) ** 2
  if df % 2:  # odd: (2/pi) (theta + sin theta (cos theta + 2/3 cos^3 theta + ...))
    total = term = math.cos(theta) if df > 1 else 0.0
    for k in range(3, df - 1, 2):
      term *= c2 * (k - 1) / k
      total += term
    return 2 / math.pi * (theta + s * total)
  total = term = 1.0  # even: sin theta (1 + 1/2 cos^2 theta + 1.3/2.4 cos^4 theta + ...)
  for k in range(2, df - 1, 2):
    term *= c2 * (k - 1) / k
    total += term
  return s * total


def t_quantile(level: float, df: int) -> float:
  """The t with P(|T| <= t) = level: the half-width of a two-sided interval in standard errors."""
  if not 0 < level < 1 or df < 1:
    raise ValueError(f"t_quantile: level={level} must be in (0, 1) and df={df} >= 1")
  hi = 1.0
  while _t_central(hi, df) < level:
    hi *= 2
  lo = 0.0
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
  return (lo + hi) / 2


def t_interval(x: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
  """Mean and its two-sided t interval over the values (seeds); lo/hi None with < 2 values."""
  x = np.asarray(x, np.float64)
  if x.size == 0:
    raise ValueError("t_interval: no values")
  mean = float(x.mean())
  if x.size < 2:
    return {"mean": mean, "lo": None, "hi": None, "n": int(x.size)}
  half = t_quantile(level, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(x.size)}


def paired_difference(a: Sequence[float], b: Sequence[float],
                      level: float = LEVEL) -> dict[str, Any]:
  """a - b paired by seed: the t interval of the per-pair differences."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired_difference: {a.shape} vs {b.shape} values; pairs must match")
  return t_interval(a - b, level)


def bootstrap_interval(diff: np.ndarray, *, samples: int, seed: int,
                       level: float = LEVEL) -> tuple[float, float]:
  """Percentile interval of the mean of diff [seeds, problems], resampling both axes.

  Seeds and problems are each drawn with replacement (a crossed two-way bootstrap), so the
  interval carries both the seed-to-seed and the problem-to-problem variation.
  """
  diff = np.asarray(diff, np.float64)
  if diff.ndim != 2 or 0 in diff.shape:
    raise ValueError(f"bootstrap_interval: expected [seeds, problems], got shape {diff.shape}")
  rng = np.random.default_rng(seed)
  s, p = diff.shape
  means = np.empty(samples)
  for start in range(0, samples, 256):
    n = min(256, samples - start)
    si = rng.integers(s, size=(n, s))
    pi = rng.integers(p, size=(n, p))
    means[start:start + n] = diff[si[:, :, None], pi[:, None, :]].mean(axis=(1, 2))
  tail = 100 * (1 - level) / 2
  return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def pass_at_k(correct: np.ndarray, n: int, k: int) -> np.ndarray:
  """Unbiased pass@k per problem from `correct` successes of `n` samples (k <= n)."""
  if not 1 <= k <= n:
    raise ValueError(f"pass@k needs 1 <= k={k} <= n={n} samples (config.study.pass_k)")
  c = np.rint(np.asarray(correct)).astype(int)
  return np.array([1.0 - math.comb(n - ci, k) / math.comb(n, k) for ci in c])


# ---------------------------------------------------------------------------------------------
# Arms, bases and seeds.
# ---------------------------------------------------------------------------------------------

def study_arms(config: Any, study: str, only: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
  """The study's arms (in table order, `only` keeping a subset), '{mid}' filled in."""
  if study not in STUDIES:
    raise ValueError(f"--study={study!r}; expected one of {sorted(STUDIES)} or 'long2short' "
                     "(run_long2short_study)")
  arms = STUDIES[study]
  unknown = [a for a in only if a not in arms]
  if unknown:
    raise ValueError(f"--arms: {unknown} are not arms of study {study!r}: {list(arms)}")
  mid = config.rl.iterations // 2
  out = {}
  for name, overrides in arms.items():
    if only and name not in only:
      continue
    out[name] = {k: v.format(mid=mid) if isinstance(v, str) else v
                 for k, v in overrides.items()}
  return out


def _get(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if part not in node:
      raise KeyError(f"study override {key!r}: the config has no key {part!r}")
    node = node[part]
  return node


def with_overrides(config: Any, overrides: Mapping[str, Any]) -> Any:
  """A copy of `config` with dotted-key overrides (each key must exist)."""
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    _get(c, key)
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def base_overrides(config: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
  """The overrides that change the base stages (those equal to the config's value do not)."""
  return {k: v for k, v in overrides.items()
          if k.startswith(BASE_PREFIXES) and _get(config, k) != v}


def base_name(config: Any, overrides: Mapping[str, Any]) -> str:
  """'base', or 'base-<key=value,...>' for an arm whose overrides change the base stages."""
  b = base_overrides(config, overrides)
  return "base" if not b else "base-" + ",".join(f"{k}={v}" for k, v in sorted(b.items()))


def pair_config(config: Any, overrides: Mapping[str, Any], pair: int) -> Any:
  """The RL config of an arm in seed pair `pair`: the same two seeds for every arm."""
  c = with_overrides(config, overrides)
  c.seed = config.seed + pair          # RL sampling and minibatch order
  c.data.seed = config.seed + pair     # RL prompt order (k15.rl.trainer.data_seed)
  return c


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------

def heldout_set(config: Any, path: str) -> list[Any]:
  """config.study.eval_problems per family from the eval split (written once, then reloaded)."""
  from k15.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    c = config.pipeline
    problems = []
    for family in c.families:
      options = {"ops": tuple(c.ops)} if family == "arithmetic" else {}
      problems += tasks.generate(family, config.study.eval_problems, seed=config.seed + 2,
                                 split="eval", difficulties=list(c.difficulties),
                                 max_cot_tokens=c.max_cot_tokens, **options)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tasks.write_jsonl(problems, path)
  return prompts_lib.load_jsonl(path)[0]


def evaluate_model(config: Any, model: Any, tok: Any, problems: Sequence[Any]) -> dict[str, Any]:
  """pass@1, pass@k, greedy accuracy and mean tokens, overall and per problem."""
  from k15 import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  s, ev = config.study, config.evaluate
  common = dict(tokenizer=tok, grade_fn=tasks.grade, max_new_tokens=ev.max_new_tokens,
                seed=s.eval_seed, batch_size=ev.batch_size)
  r = evaluate_lib.evaluate(model, problems, num_samples=s.eval_samples,
                            temperature=s.temperature, **common)
  n = r["num_samples"]
  acc = np.array([p["accuracy"] for p in r["per_problem"]])
  per = {"pass1": acc.tolist(), "pass_k": pass_at_k(acc * n, n, s.pass_k).tolist(),
         "mean_tokens": [p["mean_tokens"] for p in r["per_problem"]]}
  if s.greedy:
    g = evaluate_lib.evaluate(model, problems, num_samples=1, temperature=0.0, **common)
    per["greedy"] = [p["accuracy"] for p in g["per_problem"]]
  out = {m: float(np.mean(v)) for m, v in per.items()}
  out.update(n=len(problems), samples=n, k=s.pass_k, temperature=float(s.temperature),
             per_problem=per)
  return out


# ---------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------

def _read(path: str, config: Any = None, n: int = 0) -> Any:
  """A finished evaluation; with `config`, it must have been made with the same settings."""
  with open(path) as f:
    r = json.load(f)
  if config is not None and "skipped" not in r:
    s = config.study
    want = {"n": n, "samples": s.eval_samples, "k": s.pass_k, "temperature": s.temperature}
    got = {key: r.get(key) for key in want}
    if got != want or bool(s.greedy) != ("greedy" in r):
      raise ValueError(f"{path} was evaluated with {got} (greedy: {'greedy' in r}), but "
                       f"config.study asks for {want} (greedy: {s.greedy}); use a new workdir "
                       "or delete the eval files")
  return r


def _write(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(tmp, path)  # a run counts as done only once its file is whole


def run_study(config: Any, study: str, seeds: int, workdir: str,
              arms: Sequence[str] = ()) -> dict[str, Any]:
  """Runs (or resumes) the study; writes W/study.{json,md,png} and returns the summary."""
  # Imported here: the statistics above need none of the model stack.
  from k15 import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from k15 import parallel  # pylint: disable=g-import-not-at-top
  from k15 import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError("k15.study needs --workdir")
  if seeds < 1:
    raise ValueError(f"--seeds={seeds}: need at least 1 (2 for an interval)")
  if config.study.pass_k > config.study.eval_samples:
    raise ValueError(f"config.study.pass_k={config.study.pass_k} > config.study.eval_samples="
                     f"{config.study.eval_samples}: pass@k needs at least k samples")
  t_start = time.time()
  arm_overrides = study_arms(config, study, arms)
  problems = heldout_set(config, os.path.join(workdir, "eval.jsonl"))
  runs = [(arm, s) for s in range(seeds) for arm in arm_overrides]  # pair by pair
  bases: dict[str, tuple] = {}
  mesh = parallel.make_mesh(config.mesh)

  def base(arm: str) -> tuple:
    """(tokenizer, SFT model, curated prompts) of the arm's base, made or reloaded once."""
    name = base_name(config, arm_overrides[arm])
    if name not in bases:
      cfg = with_overrides(config, base_overrides(config, arm_overrides[arm]))
      bdir = os.path.join(workdir, name)
      _, tok, sft_model, records = pipeline_lib.base_stages(cfg, bdir, mesh)
      sft_path = os.path.join(bdir, "eval_sft.json")
      if not os.path.exists(sft_path):
        _write(sft_path, evaluate_model(cfg, sft_model, tok, problems))
      bases[name] = (tok, sft_model, records)
    return bases[name]

  results: dict[str, dict[int, dict]] = {arm: {} for arm in arm_overrides}
  skipped = 0
  with parallel.use_mesh(mesh, config.sharding_rules):
    bar = metrics_lib.progress(len(runs), desc=f"study {study}", unit="runs")
    for arm, s in runs:
      bar.set_postfix(arm=arm, seed=s)
      rdir = os.path.join(workdir, "runs", arm, f"seed{s}")
      path = os.path.join(rdir, "eval.json")
      if os.path.exists(path):
        skipped += 1
      else:
        tok, sft_model, records = base(arm)
        cfg = pair_config(config, arm_overrides[arm], s)
        model = pipeline_lib.rl_stage(cfg, sft_model, records, tok, mesh,
                                      os.path.join(rdir, "rl"))
        r = evaluate_model(cfg, model, tok, problems)
        r.update(rl_seed=cfg.seed, data_seed=cfg.data.seed,
                 base=base_name(config, arm_overrides[arm]), overrides=arm_overrides[arm])
        _write(path, r)
      results[arm][s] = _read(path, config, len(problems))
      bar.update(1)
    bar.close()
    sft = {}
    for arm in arm_overrides:
      name = base_name(config, arm_overrides[arm])
      path = os.path.join(workdir, name, "eval_sft.json")
      if not os.path.exists(path):
        base(arm)
      sft[name] = _read(path, config, len(problems))

  minutes = (time.time() - t_start) / 60
  summary = summarize(config, study, arm_overrides, results, sft, minutes=minutes,
                      skipped=skipped)
  _write(os.path.join(workdir, "study.json"), summary)
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(markdown(summary))
  plot(summary, os.path.join(workdir, "study.png"))
  print(markdown(summary))
  print(f"study {study}: {len(runs)} runs ({skipped} reused) in {minutes:.1f} minutes",
        flush=True)
  return summary


def run_long2short_study(config: Any, seeds: int, workdir: str,
                         arms: Sequence[str] = ()) -> dict[str, Any]:
  """The `long2short` study: per seed pair s, long RL from the shared SFT model (arm `long`, the
  reference), then each method of config.long2short.methods from that long model
  (k15.long2short.driver, each at long2short.token_budget sampled tokens), all evaluated on the
  held-out set like `run_study`'s arms. Within a pair every arm shares the long model and the
  sampling seed (config.seed + s). W/runs/long2short/seedS/ holds the long RL run (rl/), the
  methods' outputs (long2short/) and one evaluation per arm (eval/ARM.json). A method that
  trained nothing in some pair (e.g. no correct samples) leaves the tables, named in
  `skipped_arms`. Writes W/study.{json,md,png} like `run_study`."""
  from k15 import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from k15 import parallel  # pylint: disable=g-import-not-at-top
  from k15 import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from k15.long2short import driver  # pylint: disable=g-import-not-at-top
  if not workdir:
    raise ValueError("k15.study needs --workdir")
  if seeds < 1:
    raise ValueError(f"--seeds={seeds}: need at least 1 (2 for an interval)")
  driver.check_config(config)
  names = ["long"] + [m for m in driver.METHODS if m in config.long2short.methods]
  unknown = [a for a in arms if a not in names]
  if unknown:
    raise ValueError(f"--arms: {unknown} are not arms of study 'long2short': {names}")
  names = [a for a in names if a == "long" or not arms or a in arms]  # long: the reference
  t_start = time.time()
  base_cfg = with_overrides(config, LONG2SHORT_BASE)
  bname = base_name(config, LONG2SHORT_BASE)
  bdir = os.path.join(workdir, bname)
  problems = heldout_set(config, os.path.join(workdir, "eval.jsonl"))
  results: dict[str, dict[int, dict]] = {a: {} for a in names}
  reused = 0
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    _, tok, sft_model, records = pipeline_lib.base_stages(base_cfg, bdir, mesh)
    sft_path = os.path.join(bdir, "eval_sft.json")
    if not os.path.exists(sft_path):
      _write(sft_path, evaluate_model(base_cfg, sft_model, tok, problems))
    bar = metrics_lib.progress(seeds * len(names), desc="study long2short", unit="runs")
    for s in range(seeds):
      cfg = pair_config(base_cfg, {}, s)
      sdir = os.path.join(workdir, "runs", "long2short", f"seed{s}")
      ctx = None  # the pair's long model and methods, made when a run is missing
      for arm in names:
        bar.set_postfix(arm=arm, seed=s)
        path = os.path.join(sdir, "eval", f"{arm}.json")
        if os.path.exists(path):
          reused += 1
        else:
          if ctx is None:
            pipeline_lib.rl_stage(cfg, sft_model, records, tok, mesh, os.path.join(sdir, "rl"))
            ctx = driver.make_context(cfg, sdir, mesh, base=bdir)
          trained = driver.obtain(ctx, arm)
          r = {"skipped": trained.info.get("skipped", "nothing trained")}
          if trained.model is not None:
            r = evaluate_model(cfg, trained.model, tok, problems)
          r.update(sampled_tokens=trained.sampled_tokens, rl_seed=cfg.seed, base=bname)
          _write(path, r)
        results[arm][s] = _read(path, config, len(problems))
        bar.update(1)
    bar.close()
    sft = {bname: _read(sft_path, config, len(problems))}

  skipped_arms = {a: {s: r["skipped"] for s, r in results[a].items() if "skipped" in r}
                  for a in names}
  skipped_arms = {a: v for a, v in skipped_arms.items() if v}
  kept = [a for a in names if a not in skipped_arms]
  if "long" not in kept:
    raise ValueError(f"the long models were not evaluated: {skipped_arms}")
  minutes = (time.time() - t_start) / 60
  summary = summarize(config, "long2short", {a: LONG2SHORT_BASE for a in kept},
                      {a: results[a] for a in kept}, sft, minutes=minutes, skipped=reused)
  summary.update(token_budget=config.long2short.token_budget, skipped_arms=skipped_arms,
                 sampled_tokens={a: t_interval([results[a][s]["sampled_tokens"]
                                                for s in range(seeds)]) for a in kept})
  _write(os.path.join(workdir, "study.json"), summary)
  md = markdown(summary) + "\n## Response tokens each arm sampled (mean over seeds)\n\n"
  md += "".join(f"- {a}: {summary['sampled_tokens'][a]['mean']:,.0f}\n" for a in kept)
  md += f"\nBudget per method: {config.long2short.token_budget or 'none'}.\n"
  md += "".join(f"- {a} skipped: {v}\n" for a, v in skipped_arms.items())
  with open(os.path.join(workdir, "study.md"), "w") as f:
    f.write(md)
  plot(summary, os.path.join(workdir, "study.png"))
  print(md)
  print(f"study long2short: {seeds * len(names)} runs ({reused} reused) in {minutes:.1f} "
        "minutes", flush=True)
  return summary


def summarize(config: Any, study: str, arm_overrides: Mapping[str, Mapping[str, Any]],
              results: Mapping[str, Mapping[int, Mapping[str, Any]]],
              sft: Mapping[str, Mapping[str, Any]], *, minutes: float,
              skipped: int = 0) -> dict[str, Any]:
  """The study's JSON: runs, per-arm intervals, paired differences vs the first arm, RL - SFT."""
  arms = list(arm_overrides)
  seeds = sorted(next(iter(results.values())))
  metrics = [m for m in METRICS if all(m in results[a][s] for a in arms for s in seeds)]
  value = lambda a, m: [results[a][s][m] for s in seeds]
  per_problem = lambda a, m: np.array([results[a][s]["per_problem"][m] for s in seeds])
  out: dict[str, Any] = {
      "study": study, "seeds": seeds, "level": LEVEL, "metrics": metrics,
      "arms": {a: dict(arm_overrides[a]) for a in arms},
      "base": {a: base_name(config, arm_overrides[a]) for a in arms},
      "rl_seeds": {s: config.seed + s for s in seeds},
      "eval": {"problems": next(iter(sft.values()))["n"], **{
          k: config.study[k] for k in ("eval_samples", "pass_k", "temperature", "greedy")}},
      "runs": {a: {s: {m: results[a][s][m] for m in metrics} for s in seeds} for a in arms},
      "sft": {b: {m: r[m] for m in metrics if m in r} for b, r in sft.items()},
      "summary": {a: {m: t_interval(value(a, m)) for m in metrics} for a in arms},
      "differences": {}, "lift": {}, "minutes": round(minutes, 2), "reused_runs": skipped,
  }
  ref = arms[0]
  for a in arms[1:]:
    d = {}
    for m in metrics:
      d[m] = paired_difference(value(a, m), value(ref, m))
      d[m]["boot_lo"], d[m]["boot_hi"] = bootstrap_interval(
          per_problem(a, m) - per_problem(ref, m), samples=config.study.bootstrap,
          seed=config.study.bootstrap_seed)
    out["differences"][f"{a} - {ref}"] = d
  for a in arms:
    s0 = sft[out["base"][a]]
    out["lift"][a] = {m: t_interval(np.array(value(a, m)) - s0[m]) for m in metrics if m in s0}
  return out


def _fmt(iv: Mapping[str, Any], scale: float, boot: bool = False) -> str:
  text = f"{scale * iv['mean']:.1f}"
  if iv.get("lo") is not None:
    text += f" [{scale * iv['lo']:.1f}, {scale * iv['hi']:.1f}]"
  if boot and iv.get("boot_lo") is not None:
    text += f" (boot [{scale * iv['boot_lo']:.1f}, {scale * iv['boot_hi']:.1f}])"
  return text


def _scale(metric: str) -> float:
  return 1.0 if metric == "mean_tokens" else 100.0


def markdown(summary: Mapping[str, Any]) -> str:
  """Tables: per arm, the paired differences, RL - SFT; accuracies in points."""
  metrics = summary["metrics"]
  ev = summary["eval"]
  names = {"pass1": f"pass@1 % (T={ev['temperature']}, {ev['eval_samples']} samples)",
           "greedy": "greedy %", "pass_k": f"pass@{ev['pass_k']} %", "mean_tokens": "tokens"}
  head = lambda first: ("| " + " | ".join([first] + [names[m] for m in metrics]) + " |\n"
                        + "|" + "---|" * (len(metrics) + 1) + "\n")
  n = len(summary["seeds"])
  lines = [f"# Study `{summary['study']}`: {n} paired seeds, {ev['problems']} held-out problems\n",
           f"Mean [{int(100 * summary['level'])}% t interval over seeds]; "
           f"{summary['minutes']} minutes.\n",
           "\n## Arms (RL)\n\n" + head("arm")]
  for a, row in summary["summary"].items():
    lines.append(f"| {a} | " + " | ".join(_fmt(row[m], _scale(m)) for m in metrics) + " |\n")
  lines.append("\n## SFT (one model per base)\n\n" + head("base"))
  for b, row in summary["sft"].items():
    lines.append(f"| {b} | " + " | ".join(
        f"{_scale(m) * row[m]:.1f}" if m in row else "-" for m in metrics) + " |\n")
  if summary["differences"]:
    lines.append("\n## Paired differences (t over seed pairs; boot: seeds x problems)\n\n"
                 + head("difference"))
    for d, row in summary["differences"].items():
      lines.append(f"| {d} | " + " | ".join(_fmt(row[m], _scale(m), True) for m in metrics)
                   + " |\n")
  lines.append("\n## RL - SFT per arm\n\n" + head("arm"))
  for a, row in summary["lift"].items():
    lines.append(f"| {a} | " + " | ".join(
        _fmt(row[m], _scale(m)) if m in row else "-" for m in metrics) + " |\n")
  lines.append("\n## Arms' overrides\n\n")
  for a, o in summary["arms"].items():
    lines.append(f"- {a}: {', '.join(f'{k}={v}' for k, v in o.items())} "
                 f"({summary['base'][a]})\n")
  return "".join(lines)


def plot(summary: Mapping[str, Any], path: str) -> None:
  """Per accuracy metric: each arm's mean with its interval, the seeds as dots, SFT dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  metrics = [m for m in summary["metrics"] if m != "mean_tokens"]
  arms = list(summary["summary"])
  fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4), squeeze=False)
  for ax, m in zip(axes[0], metrics):
    for i, a in enumerate(arms):
      iv = summary["summary"][a][m]
      err = None if iv["lo"] is None else [[100 * (iv["mean"] - iv["lo"])],
                                           [100 * (iv["hi"] - iv["mean"])]]
      ax.errorbar([i], [100 * iv["mean"]], yerr=err, fmt="o", capsize=4, color=f"C{i}")
      seeds = [100 * v[m] for v in summary["runs"][a].values()]
      ax.scatter([i + 0.15] * len(seeds), seeds, s=8, color=f"C{i}", alpha=0.5)
    for j, (b, row) in enumerate(summary["sft"].items()):
      if m in row:
        ax.axhline(100 * row[m], ls="--", lw=1, color="gray" if j == 0 else f"C{7 + j}",
                   label=f"SFT {b}")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_xlim(-0.5, len(arms) - 0.5)
    ax.set_title({"pass1": "pass@1", "greedy": "greedy accuracy",
                  "pass_k": f"pass@{summary['eval']['pass_k']}"}[m])
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"{summary['study']}: mean and {int(100 * summary['level'])}% t interval over "
               f"{len(summary['seeds'])} seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  arms = tuple(a for a in f.arms.split(",") if a) if f.arms else ()
  if f.study == "long2short":
    run_long2short_study(f.config, f.seeds, f.workdir, arms)
  else:
    run_study(f.config, f.study, f.seeds, f.workdir, arms)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/tiny_cpu.py",
                                  "Path to an ml-collections config file[:args].",
                                  lock_config=True)
  flags.DEFINE_string("study", "", f"One of {sorted(STUDIES) + ['long2short']}.")
  flags.DEFINE_integer("seeds", 4, "Seed pairs (>= 2 for an interval).")
  flags.DEFINE_string("workdir", "", "Where the base, the runs and the tables go.")
  flags.DEFINE_string("arms", "", "Comma-separated subset of the study's arms (default all).")
  sys.exit(app.run(main))
