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

The `length` study (Countdown; see `STUDY_CONFIG`) has one RL arm against the SFT model and
evaluates both at token cut-offs: each sampled response is cut at 64, 128, 256, ... tokens and
graded, and its RL runs log response length and accuracy per task difficulty each iteration
(W/runs/rl/seedS/rl/metrics.jsonl, `by_level/*`); W/study.md gains its tables, W/length.png
its curves. The `rl_lift` study counts, in the same samples, the carries its models forget
(k15.data.tasks.carry_slips), the careless demonstrator's habit before and after RL.

`--study=long2short` (`run_long2short_study`) pairs differently: per seed pair, one long RL
model from the shared SFT model, then each long2short method (k15.long2short) from it, every
method at `long2short.token_budget` sampled tokens; its arms are `long` and the methods.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from k15 import storage

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
    # The paper's length ablation: RL against its SFT model (evaluated, not an arm), both cut at
    # token budgets (see `STUDY_CONFIG`).
    "length": {"rl": {}},
}

# Settings a study needs whatever the config says (keys given as --config.KEY=... on the
# command line win). `length`: Countdown, where a longer search with backtracking finds answers
# that a short one misses. The demonstrator gives up after each line that misses with
# probability 0.15 (k15.data.tasks, `search_stop`): it solves ~55% of its problems, in
# demonstrations of ~100-130 tokens (median), and still shows some long searches that back up.
# RL and evaluation get 320 tokens, 2.5-3x those medians, within which every problem's full
# search fits. 3000 demonstrations and 600 steps: with fewer the SFT model miscopies the
# numbers and miscomputes its moves (docs/results.md).
STUDY_CONFIG: dict[str, dict[str, Any]] = {
    "length": {
        "pipeline.families": ("countdown",),
        "pipeline.difficulties": (3, 4),
        "pipeline.max_cot_tokens": 320,
        "pipeline.sft_search_stop": 0.15,
        "pipeline.sft_examples": 3000,
        "sft.steps": 600,
        "rl.max_new_tokens": 320,
        "evaluate.max_new_tokens": 320,
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
  if not epath.Path(path).exists():
    c = config.pipeline
    problems = []
    for family in c.families:
      options = {"ops": tuple(c.ops)} if family == "arithmetic" else {}
      problems += tasks.generate(family, config.study.eval_problems, seed=config.seed + 2,
                                 split="eval", difficulties=list(c.difficulties),
                                 max_cot_tokens=c.max_cot_tokens, **options)
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
# The length study: accuracy at token cut-offs, length and accuracy per difficulty.
# ---------------------------------------------------------------------------------------------

def length_cutoffs(budget: int) -> list[int]:
  """64, 128, 256, ... below the response budget, then the budget itself."""
  cuts, c = [], 64
  while c < budget:
    cuts.append(c)
    c *= 2
  return cuts + [int(budget)]


def accuracy_at_cutoffs(correct: np.ndarray, lengths: np.ndarray,
                        cutoffs: Sequence[int]) -> dict[int, np.ndarray]:
  """Per problem, the share of its samples still correct when cut at each cut-off.

  correct, lengths: [problems, samples], the graded responses (a response without a final
  answer is wrong) and their lengths in tokens, the stop token counted. A response cut at c
  tokens keeps its answer iff it ended by itself within c tokens: a cut response has no final
  answer (k15.rewards.finish), whatever its first c tokens hold. So the accuracy at c is the
  one these very samples would have had with a budget of c tokens (decoding does not look
  ahead at its budget), measured from one sampling pass.
  """
  correct, lengths = np.asarray(correct, bool), np.asarray(lengths)
  if correct.shape != lengths.shape or correct.ndim != 2:
    raise ValueError(f"accuracy_at_cutoffs: correct {correct.shape} and lengths "
                     f"{lengths.shape} must both be [problems, samples]")
  return {int(c): (correct & (lengths <= c)).mean(axis=1) for c in cutoffs}


def evaluate_sampled(config: Any, model: Any, tok: Any, problems: Sequence[Any], *,
                     cutoffs: bool = True, slips: bool = False) -> dict[str, Any]:
  """`evaluate_model`'s metrics (the same samples, so the same values) from one sampling pass
  whose texts are kept for more: length and accuracy per difficulty; with `cutoffs`, the
  accuracy at token cut-offs (`length_cutoffs` of evaluate.max_new_tokens: the length study);
  with `slips`, the carries due and forgotten in the sampled chains of thought
  (k15.data.tasks.carry_slips: rl_lift's careless demonstrator, before and after RL)."""
  from k15 import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from k15 import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  from k15.rewards import finish as finish_lib  # pylint: disable=g-import-not-at-top
  s, ev = config.study, config.evaluate
  n = s.eval_samples
  correct = np.zeros((len(problems), n), bool)
  lengths = np.zeros((len(problems), n), np.float64)
  carries = np.zeros((len(problems), 2), np.int64)  # due, forgotten
  gave_up = np.zeros((len(problems), n), bool)       # countdown: ended with the give-up line
  common = dict(tokenizer=tok, max_new_tokens=ev.max_new_tokens, seed=s.eval_seed,
                batch_size=ev.batch_size)
  bar = metrics_lib.progress(len(problems), desc="evaluate", unit="problems")
  for i, _, responses in evaluate_lib.sample_responses(
      model, problems, num_samples=n, temperature=s.temperature, **common):
    for j, resp in enumerate(responses):
      correct[i, j] = (finish_lib.has_final_answer(resp.finish_reason)
                       and tasks.grade(problems[i], resp.text) > 0.5)
      lengths[i, j] = len(resp.ids)
      gave_up[i, j] = tasks.gave_up(resp.text)
      if slips:
        carries[i] += tasks.carry_slips(resp.text)
    bar.update(1)
  bar.close()
  cut = (accuracy_at_cutoffs(correct, lengths, length_cutoffs(ev.max_new_tokens)) if cutoffs
         else {})
  per = {"pass1": correct.mean(axis=1).tolist(),
         "pass_k": pass_at_k(correct.sum(axis=1), n, s.pass_k).tolist(),
         "mean_tokens": lengths.mean(axis=1).tolist(),
         **{f"cut{c}": v.tolist() for c, v in cut.items()}}
  if s.greedy:
    g = evaluate_lib.evaluate(model, problems, num_samples=1, temperature=0.0,
                              grade_fn=tasks.grade, **common)
    per["greedy"] = [p["accuracy"] for p in g["per_problem"]]
  levels = np.array([int(p.difficulty) for p in problems])
  out: dict[str, Any] = {m: float(np.mean(per[m])) for m in METRICS if m in per}
  out.update(
      n=len(problems), samples=n, k=s.pass_k, temperature=float(s.temperature),
      by_difficulty={str(d): {"pass1": float(correct[levels == d].mean()),
                              "mean_tokens": float(lengths[levels == d].mean()),
                              "n": int((levels == d).sum())} for d in sorted(set(levels))},
      per_problem=per)
  if cutoffs:
    out["cutoffs"] = {str(c): float(v.mean()) for c, v in cut.items()}
    # The length study's demonstrator gives up; RL that lengthens responses may unlearn it.
    out["gave_up"] = float(gave_up.mean())
    for d, row in out["by_difficulty"].items():
      row["gave_up"] = float(gave_up[levels == int(d)].mean())
  if slips:
    due, forgotten = (int(v) for v in carries.sum(axis=0))
    out["carries"] = {"due": due, "forgotten": forgotten,
                      "slip_rate": forgotten / due if due else float("nan")}
  return out


class LevelLog:
  """Response length and accuracy per task difficulty in each RL iteration, as RL metrics.

  The trainer's metrics pool all prompts, and its difficulty is curation's label; the length
  study needs the task's own level (count of numbers). The reward function hands each
  iteration's graded responses to `on_rewards`, and `after_iteration` returns them as
  `by_level/d<level>_{tokens,accuracy}`, which the trainer writes with the iteration's metrics
  (so a resumed run keeps them). Accuracy here is the grade of the text, before the rule
  that a response cut at the budget has no answer.
  """

  def __init__(self, records: Sequence[Any]):
    self.levels = [int(r.meta.get("level", r.difficulty)) for r in records]
    self.batch: tuple | None = None

  def on_rewards(self, ids: Sequence[int], responses: Sequence[Any], rewards: Any) -> None:
    self.batch = (np.array([self.levels[i] for i in ids]),
                  np.array([len(r) for r in responses], np.float64), np.asarray(rewards))

  def after_iteration(self, trainer: Any) -> dict[str, float] | None:
    del trainer
    if self.batch is None:
      return None
    levels, lengths, rewards = self.batch
    self.batch = None
    out = {}
    for level in sorted(set(levels.tolist())):
      sel = levels == level
      out[f"by_level/d{level}_tokens"] = float(lengths[sel].mean())
      out[f"by_level/d{level}_accuracy"] = float((rewards[sel] > 0.5).mean())
    return out

  def hooks(self) -> dict[str, Any]:
    return {"on_rewards": self.on_rewards, "after_iteration": self.after_iteration}


def _curves(workdir: str, seeds: Sequence[int]) -> dict[str, list[list[float]]]:
  """`by_level/*` metrics of each seed's RL run: key -> [seed][iteration]."""
  from k15 import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  out: dict[str, list[list[float]]] = {}
  for s in seeds:
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "runs", "rl", f"seed{s}", "rl"))
    keys = sorted({k for r in rows for k in r if k.startswith("by_level/")})
    for k in keys:
      out.setdefault(k, []).append([float(r.get(k, float("nan"))) for r in rows])
  return out


def summarize_length(config: Any, results: Mapping[str, Mapping[int, Mapping[str, Any]]],
                     sft: Mapping[str, Mapping[str, Any]], workdir: str,
                     window: int = 5) -> dict[str, Any]:
  """Accuracy at each cut-off (SFT, RL, RL - SFT), length and accuracy per difficulty, the
  per-difficulty training curves and the verdict: does RL gain accuracy past the shorter
  cut-offs where SFT does not?"""
  seeds = sorted(results["rl"])
  rl = [results["rl"][s] for s in seeds]
  s0 = sft["base"]
  cutoffs = list(s0["cutoffs"])
  out: dict[str, Any] = {"cutoffs": {}, "by_difficulty": {}}
  for c in cutoffs:
    vals = np.array([r["cutoffs"][c] for r in rl])
    d = t_interval(vals - s0["cutoffs"][c])
    d["boot_lo"], d["boot_hi"] = bootstrap_interval(
        np.array([r["per_problem"][f"cut{c}"] for r in rl])
        - np.array(s0["per_problem"][f"cut{c}"])[None],
        samples=config.study.bootstrap, seed=config.study.bootstrap_seed)
    out["cutoffs"][c] = {"sft": s0["cutoffs"][c], "rl": t_interval(vals), "rl_minus_sft": d}
  for level, row in s0["by_difficulty"].items():
    out["by_difficulty"][level] = {
        m: {"sft": row[m], "rl": t_interval([r["by_difficulty"][level][m] for r in rl])}
        for m in ("pass1", "mean_tokens", "gave_up") if m in row}
    out["by_difficulty"][level]["n"] = row["n"]
  if "gave_up" in s0:
    vals = np.array([r["gave_up"] for r in rl])
    out["gave_up"] = {"sft": s0["gave_up"], "rl": t_interval(vals),
                      "rl_minus_sft": t_interval(vals - s0["gave_up"])}
  # The gain from the longest cut-off over the longest one at most half as long.
  long = cutoffs[-1]
  short = max((c for c in cutoffs if 2 * int(c) <= int(long)), key=int, default=cutoffs[0])
  rl_gain = np.array([r["cutoffs"][long] - r["cutoffs"][short] for r in rl])
  sft_gain = s0["cutoffs"][long] - s0["cutoffs"][short]
  diff = t_interval(rl_gain - sft_gain)
  if diff["lo"] is None:
    verdict = "inconclusive (one seed: no interval)"
  elif diff["lo"] > 0:
    verdict = "reproduced"
  elif diff["hi"] < 0:
    verdict = "not reproduced (RL gains less from longer responses than SFT)"
  else:
    verdict = "inconclusive (the interval of the gain difference contains 0)"
  out["gain"] = {"short": short, "long": long, "sft": sft_gain, "rl": t_interval(rl_gain),
                 "rl_minus_sft": diff, "verdict": verdict}
  curves = _curves(workdir, seeds)
  out["curves"] = {}
  for k, per_seed in curves.items():
    m = min(len(v) for v in per_seed)
    a = np.array([v[:m] for v in per_seed])
    w = min(window, m)
    out["curves"][k] = {"mean": np.nanmean(a, axis=0).tolist(),
                        "first": t_interval(np.nanmean(a[:, :w], axis=1)),
                        "last": t_interval(np.nanmean(a[:, -w:], axis=1)),
                        "last_minus_first": t_interval(np.nanmean(a[:, -w:], axis=1)
                                                       - np.nanmean(a[:, :w], axis=1))}
  out["window"] = window
  return out


def markdown_length(summary: Mapping[str, Any]) -> str:
  """The length study's tables: accuracy at cut-offs, per difficulty, over training."""
  L = summary["length"]
  cutoffs = list(L["cutoffs"])
  lines = ["\n## Accuracy (pass@1 %) of responses cut at N tokens\n\n",
           "| model | " + " | ".join(f"<= {c}" for c in cutoffs) + " |\n",
           "|" + "---|" * (len(cutoffs) + 1) + "\n",
           "| SFT | " + " | ".join(f"{100 * L['cutoffs'][c]['sft']:.1f}" for c in cutoffs)
           + " |\n",
           "| RL | " + " | ".join(_fmt(L["cutoffs"][c]["rl"], 100) for c in cutoffs) + " |\n",
           "| RL - SFT | " + " | ".join(_fmt(L["cutoffs"][c]["rl_minus_sft"], 100, True)
                                      for c in cutoffs) + " |\n"]
  g = L["gain"]
  lines.append(
      f"\nAccuracy gained from <= {g['short']} to <= {g['long']} tokens: SFT "
      f"{100 * g['sft']:+.1f}, RL {_fmt(g['rl'], 100)}, RL - SFT "
      f"{_fmt(g['rl_minus_sft'], 100)} points. Length and accuracy causally linked (RL's "
      f"accuracy rises with the cut-off more than SFT's): **{g['verdict']}**.\n")
  lines.append("\n## Per difficulty (count of numbers), held-out\n\n"
               "| difficulty | problems | SFT tokens | RL tokens | SFT pass@1 % | RL pass@1 % |\n"
               "|---|---|---|---|---|---|\n")
  for d, row in L["by_difficulty"].items():
    lines.append(f"| {d} | {row['n']} | {row['mean_tokens']['sft']:.1f} | "
                 f"{_fmt(row['mean_tokens']['rl'], 1)} | {100 * row['pass1']['sft']:.1f} | "
                 f"{_fmt(row['pass1']['rl'], 100)} |\n")
  if "gave_up" in L:
    g = L["gave_up"]
    lines.append(f"\nSampled responses that give up without an answer (`{_give_up_line()}`): "
                 f"SFT {100 * g['sft']:.1f}%, RL {_fmt(g['rl'], 100)}%, RL - SFT "
                 f"{_fmt(g['rl_minus_sft'], 100)} points.\n")
  if L["curves"]:
    w = L["window"]
    lines.append(f"\n## RL training: mean of the first and the last {w} iterations\n\n"
                 "| metric | first | last | last - first |\n|---|---|---|---|\n")
    for k, row in L["curves"].items():
      scale = 1.0 if k.endswith("_tokens") else 100.0
      lines.append(f"| {k} | {_fmt(row['first'], scale)} | {_fmt(row['last'], scale)} | "
                   f"{_fmt(row['last_minus_first'], scale)} |\n")
  return "".join(lines)


def _give_up_line() -> str:
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  return f"{tasks.GIVE_UP} N tries"


def plot_length(summary: Mapping[str, Any], path: str) -> None:
  """Accuracy against the cut-off (SFT, RL with its interval) and per-difficulty response
  length over RL iterations (mean over seeds; SFT's held-out length dashed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  L = summary["length"]
  cutoffs = list(L["cutoffs"])
  x = [int(c) for c in cutoffs]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  ax = axes[0]
  ax.plot(x, [100 * L["cutoffs"][c]["sft"] for c in cutoffs], "o--", color="gray", label="SFT")
  rl = [L["cutoffs"][c]["rl"] for c in cutoffs]
  ax.plot(x, [100 * r["mean"] for r in rl], "o-", color="C0", label="RL")
  if rl[0]["lo"] is not None:
    ax.fill_between(x, [100 * r["lo"] for r in rl], [100 * r["hi"] for r in rl], color="C0",
                    alpha=0.2)
  ax.set_xscale("log", base=2)
  ax.set_xticks(x, [str(c) for c in x])
  ax.set_xlabel("response cut at (tokens)")
  ax.set_ylabel("pass@1 %")
  ax.set_title("accuracy of responses cut at N tokens")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax = axes[1]
  for i, d in enumerate(L["by_difficulty"]):
    key = f"by_level/d{d}_tokens"
    if key in L["curves"]:
      ax.plot(L["curves"][key]["mean"], color=f"C{i}", lw=1, label=f"difficulty {d}")
    ax.axhline(L["by_difficulty"][d]["mean_tokens"]["sft"], ls="--", lw=1, color=f"C{i}")
  ax.set_xlabel("RL iteration")
  ax.set_ylabel("mean response tokens")
  ax.set_title("response length (dashed: SFT, held-out)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.suptitle(f"length: {len(summary['seeds'])} seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize_slips(summary: Mapping[str, Any],
                    results: Mapping[str, Mapping[int, Mapping[str, Any]]],
                    sft: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """rl_lift: the share of due carries forgotten in sampled chains of thought, per SFT model
  and per arm after RL (t interval over seeds), and RL - SFT per arm."""
  rate = lambda r: r.get("carries", {}).get("slip_rate", float("nan"))
  out: dict[str, Any] = {"sft": {b: rate(r) for b, r in sft.items()}, "rl": {},
                         "rl_minus_sft": {}}
  for arm, runs in results.items():
    rates = np.array([rate(runs[s]) for s in sorted(runs)])
    out["rl"][arm] = t_interval(rates)
    out["rl_minus_sft"][arm] = t_interval(rates - out["sft"][summary["base"][arm]])
  return out


def markdown_slips(summary: Mapping[str, Any]) -> str:
  s = summary["slips"]
  lines = ["\n## Carry slips in sampled chains of thought (% of due carries forgotten)\n\n",
           "| arm | SFT | RL | RL - SFT |\n|---|---|---|---|\n"]
  for arm in s["rl"]:
    lines.append(f"| {arm} | {100 * s['sft'][summary['base'][arm]]:.1f} | "
                 f"{_fmt(s['rl'][arm], 100)} | {_fmt(s['rl_minus_sft'][arm], 100)} |\n")
  return "".join(lines)


# ---------------------------------------------------------------------------------------------
# The study.
# ---------------------------------------------------------------------------------------------

def _read(path: str, config: Any = None, n: int = 0) -> Any:
  """A finished evaluation; with `config`, it must have been made with the same settings."""
  r = storage.read_json(path)
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
  storage.write_json(path, obj, indent=1)  # whole or absent: a run is done once it is there


# Keys that change only the tables made from finished runs, not the runs.
SUMMARY_ONLY_KEYS = ("study.bootstrap", "study.bootstrap_seed")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_workdir_config(config: Any, study: str, workdir: str) -> None:
  """Refuses to resume a study whose finished runs were made with another config.

  Runs are reused by their files alone, so a rerun with another override (a token budget, an
  iteration count) would otherwise mix old runs into new tables. W/config.json records the
  first run's config; keys that only it has or only this one has (code that added a key) and
  SUMMARY_ONLY_KEYS are not compared.
  """
  now = {k: v for k, v in _flat(json.loads(json.dumps(
      {"study_name": study, **config.to_dict()}, default=str))).items()
         if k not in SUMMARY_ONLY_KEYS}
  path = os.path.join(workdir, "config.json")
  if not epath.Path(path).exists():
    _write(path, now)
    return
  stored = _read(path)
  changed = sorted(k for k in set(now) & set(stored) if now[k] != stored[k])
  if changed:
    shown = "; ".join(f"{k}: {stored[k]!r} there, {now[k]!r} now" for k in changed[:8])
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    raise ValueError(f"{workdir} holds a study run with another config: {shown}{more}. Use "
                     f"another --workdir, or the same settings to resume ({path}).")


def study_config(config: Any, study: str, given: Sequence[str] = ()) -> Any:
  """`config` with the study's STUDY_CONFIG settings, except the keys in `given`."""
  return with_overrides(config, {k: v for k, v in STUDY_CONFIG.get(study, {}).items()
                                 if k not in given})


def run_study(config: Any, study: str, seeds: int, workdir: str,
              arms: Sequence[str] = (), given: Sequence[str] = ()) -> dict[str, Any]:
  """Runs (or resumes) the study; writes W/study.{json,md,png} and returns the summary.

  `given`: the config keys set on the command line, which STUDY_CONFIG leaves alone.
  """
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
  config = study_config(config, study, given)
  check_workdir_config(config, study, workdir)
  evaluate = {"length": evaluate_sampled,
              "rl_lift": functools.partial(evaluate_sampled, cutoffs=False, slips=True),
              }.get(study, evaluate_model)
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
      if not epath.Path(sft_path).exists():
        _write(sft_path, evaluate(cfg, sft_model, tok, problems))
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
      if epath.Path(path).exists():
        skipped += 1
      else:
        tok, sft_model, records = base(arm)
        cfg = pair_config(config, arm_overrides[arm], s)
        hooks = LevelLog(records).hooks() if study == "length" else {}
        model = pipeline_lib.rl_stage(cfg, sft_model, records, tok, mesh,
                                      os.path.join(rdir, "rl"), **hooks)
        r = evaluate(cfg, model, tok, problems)
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
      if not epath.Path(path).exists():
        base(arm)
      sft[name] = _read(path, config, len(problems))

  minutes = (time.time() - t_start) / 60
  summary = summarize(config, study, arm_overrides, results, sft, minutes=minutes,
                      skipped=skipped)
  if study == "length":
    summary["length"] = summarize_length(config, results, sft, workdir)
  if study == "rl_lift":
    summary["slips"] = summarize_slips(summary, results, sft)
  _write(os.path.join(workdir, "study.json"), summary)
  text = markdown(summary) + {"length": markdown_length, "rl_lift": markdown_slips}.get(
      study, lambda _: "")(summary)
  storage.write_text(os.path.join(workdir, "study.md"), text)
  plot(summary, os.path.join(workdir, "study.png"))
  if study == "length":
    plot_length(summary, os.path.join(workdir, "length.png"))
  print(text)
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
  check_workdir_config(config, "long2short", workdir)
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
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  arms = tuple(a for a in f.arms.split(",") if a) if f.arms else ()
  given = [a[len("--config."):].split("=")[0] for a in sys.argv if a.startswith("--config.")]
  from k15 import parallel  # pylint: disable=g-import-not-at-top
  parallel.configure_cpu_devices(f.config)
  if f.study == "long2short":
    run_long2short_study(f.config, f.seeds, f.workdir, arms)
  else:
    run_study(f.config, f.study, f.seeds, f.workdir, arms, given)


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
