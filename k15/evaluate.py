"""Evaluation: pass@1 averaged over k samples, mean response tokens, per-difficulty breakdown.

The paper reports long-CoT models by Pass@1 and, for long2short (§2.4, Fig. 7), accuracy against
the mean number of response tokens. Sampling k responses per problem at the evaluation
temperature and averaging their correctness gives pass@1 with k times less variance than one
sample; `temperature=0` gives the greedy accuracy (one sample per problem, as the k would be
identical).

    results = {"sft": evaluate(sft_model, problems, ...), "rl": evaluate(rl_model, ...)}
    print(format_table(results))

`evaluate` returns plain floats and ints (JSON-able; difficulty keys become strings in JSON).
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from k15 import metrics as metrics_lib
from k15 import storage
from k15 import tokenizer as tokenizer_lib
from k15.model import transformer
from k15.rewards import finish as finish_lib
from k15.sampling import sampler, text

GradeFn = Callable[[Any, str], float]  # (problem, response text) -> score in [0, 1]


def _difficulty_key(problem: Any) -> Any:
  d = getattr(problem, "difficulty", None)
  if isinstance(d, float) and d.is_integer():
    return int(d)
  return d


def sample_responses(model: transformer.Transformer, problems: Sequence[Any], *,
                     tokenizer: Any, **kwargs: Any):
  """`k15.sampling.text.sample_text` on the problems' questions (`problem.prompt`): yields
  (index, prompt ids, its responses) per problem. The one place evaluation samples, so that
  `evaluate` and the studies' evaluations (k15.study) draw the same responses."""
  return text.sample_text(model, tokenizer, [p.prompt for p in problems], **kwargs)


def evaluate(model: transformer.Transformer, problems: Sequence[Any], *,
             tokenizer: tokenizer_lib.Tokenizer, grade_fn: GradeFn, num_samples: int = 4,
             temperature: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
             batch_size: int = 32, top_p: float = 1.0, top_k: int = 0,
             progress: bool = True) -> dict[str, Any]:
  """Samples `num_samples` responses per problem and grades them.

  Args:
    model: the policy.
    problems: objects with `.prompt` (the question text) and `.difficulty` (for the
      breakdown); anything else they carry is for `grade_fn`.
    tokenizer: renders prompts with the chat template and decodes responses.
    grade_fn: (problem, response text) -> score; a score > 0.5 counts as correct.
    num_samples: k; ignored (1) when temperature == 0.
    temperature, top_p, top_k: sampling parameters.
    max_new_tokens: response budget; a response cut off there (or stopped as a repeat) has no
      final answer and counts as wrong (k15.rewards.finish).
    seed: sampling seed. Sample j of problem i draws from row seed i * k + j, so the results
      do not depend on batch_size.
    batch_size: problems per sampler call.
    progress: show a progress bar.

  Returns:
    {"accuracy": pass@1 (mean correctness over all samples), "mean_tokens": mean response
    length (eos counted), "n": problems, "num_samples": k, "temperature",
    "greedy_accuracy": the accuracy when temperature == 0 else None,
    "truncated": share of responses that hit max_new_tokens,
    "by_difficulty": {difficulty: {"accuracy", "mean_tokens", "n"}},
    "per_problem": [{"id", "difficulty", "accuracy", "mean_tokens"}] in input order}.
  """
  if not problems:
    raise ValueError("evaluate: no problems")
  if num_samples < 1 or batch_size < 1:
    raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1")
  k = 1 if temperature == 0 else num_samples
  correct = np.zeros((len(problems), k), np.float32)
  lengths = np.zeros((len(problems), k), np.float32)
  truncated = np.zeros((len(problems), k), bool)

  bar = metrics_lib.progress(len(problems), desc="evaluate", unit="problems",
                             enabled=None if progress else False)
  for i, _, responses in sample_responses(
      model, problems, tokenizer=tokenizer, num_samples=k, batch_size=batch_size,
      max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p,
      top_k=top_k):
    for j, resp in enumerate(responses):
      correct[i, j] = (finish_lib.has_final_answer(resp.finish_reason)
                       and float(grade_fn(problems[i], resp.text)) > 0.5)
      lengths[i, j] = len(resp.ids)
      truncated[i, j] = resp.finish_reason == int(sampler.FinishReason.LENGTH)
    bar.set_postfix(acc=f"{correct[:i + 1].mean():.3f}")
    bar.update(1)
  bar.close()

  by_difficulty: dict[Any, dict[str, Any]] = {}
  groups: dict[Any, list[int]] = collections.defaultdict(list)
  for i, p in enumerate(problems):
    groups[_difficulty_key(p)].append(i)
  for d in sorted(groups, key=_sort_key):
    idx = groups[d]
    by_difficulty[d] = {"accuracy": float(correct[idx].mean()),
                        "mean_tokens": float(lengths[idx].mean()), "n": len(idx)}
  accuracy = float(correct.mean())
  return {
      "accuracy": accuracy,
      "mean_tokens": float(lengths.mean()),
      "n": len(problems),
      "num_samples": k,
      "temperature": float(temperature),
      "greedy_accuracy": accuracy if temperature == 0 else None,
      "truncated": float(truncated.mean()),
      "by_difficulty": by_difficulty,
      "per_problem": [
          {"id": getattr(p, "id", str(i)), "difficulty": _difficulty_key(p),
           "accuracy": float(correct[i].mean()), "mean_tokens": float(lengths[i].mean())}
          for i, p in enumerate(problems)],
  }


def _sort_key(d: Any) -> tuple:
  """Numbers first in numeric order, then anything else by its text (JSON turns keys to str)."""
  try:
    return (0, float(d), "")
  except (TypeError, ValueError):
    return (1, 0.0, str(d))


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A text table: one row per model; accuracy (%), mean tokens, accuracy (%) per difficulty."""
  if not results:
    raise ValueError("format_table: no results")
  difficulties: list[Any] = []
  for res in results.values():
    for d in res.get("by_difficulty", {}):
      # Unlabelled problems (e.g. GSM8K) have no difficulty: no column for them alone.
      if d is not None and str(d) not in map(str, difficulties):
        difficulties.append(d)
  difficulties.sort(key=_sort_key)

  header = ["model", "accuracy %", "mean tokens"] + [f"d={d} %" for d in difficulties]
  rows = []
  for name, res in results.items():
    by_d = {str(d): v for d, v in res.get("by_difficulty", {}).items()}
    row = [str(name), f"{100 * res['accuracy']:.1f}", f"{res['mean_tokens']:.1f}"]
    row += [f"{100 * by_d[str(d)]['accuracy']:.1f}" if str(d) in by_d else "-"
            for d in difficulties]
    rows.append(row)
  widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
  fmt = lambda r: "  ".join(
      cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
  lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
  return "\n".join(lines)


def _parse_checkpoints(spec: str) -> dict[str, str]:
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep or not name:
      raise ValueError(f"config.evaluate.checkpoints item {item!r}: expected name=directory")
    out[name] = path
  return out


def run(config: Any, workdir: str) -> dict[str, dict[str, Any]]:
  """Mode `evaluate`: the models in `config.evaluate.checkpoints` on held-out synthetic problems.

  With no checkpoints listed, evaluates the model of `config.model_path` (or a random one, a
  baseline). Prints the table and writes `<workdir>/eval.json`.
  """
  # Imported here: mode modules are imported by name from k15.main, and these pull in more.
  from k15 import checkpoint, parallel  # pylint: disable=g-import-not-at-top
  from k15.model import build  # pylint: disable=g-import-not-at-top
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  c = config.evaluate
  tok_path = c.tokenizer or os.path.join(workdir, tokenizer_lib.MODEL_FILENAME)
  tok = tokenizer_lib.Tokenizer.load(tok_path)
  problems = []
  for family in c.families:
    problems += tasks.generate(family, c.num_problems, seed=c.problem_seed, split="eval",
                               difficulties=list(c.difficulties))
  checkpoints = _parse_checkpoints(c.checkpoints) or {"model": ""}

  results = {}
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    for name, directory in checkpoints.items():
      model = build.build_model(config, mesh)
      if directory:
        model = checkpoint.restore_params(model, directory)
      logging.info("evaluating %s (%s) on %d problems", name, directory or "initial model",
                   len(problems))
      results[name] = evaluate(
          model, problems, tokenizer=tok, grade_fn=tasks.grade, num_samples=c.num_samples,
          temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
          seed=c.seed, batch_size=c.batch_size)
  if jax.process_index() == 0:
    print(format_table(results))
    if workdir:
      storage.write_json(os.path.join(workdir, "eval.json"), results)
  return results
