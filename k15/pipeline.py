"""Mode `pipeline`: the whole k1.5 recipe at small scale, end to end, resumable.

    data -> tokenizer -> long-CoT SFT (§2.2) -> curation (§2.1) -> RL with PMD (§2.3)
         -> evaluation of the SFT and the RL model on the same held-out problems

Workdir layout (each stage reuses its finished output when the pipeline is rerun, so an
interrupted run continues where it stopped):

  DIR/data/{sft,rl_pool,eval}.jsonl   generated problems (train and eval splits are disjoint)
  DIR/data/rl_prompts.jsonl           the curated RL prompt set, DIR/data/curation.json its report
  DIR/tokenizer.model                 sentencepiece model trained on the training problems
  DIR/sft/                            SFT checkpoints and metrics
  DIR/rl/                             RL checkpoints, metrics.jsonl and tensorboard events
  DIR/results.json                    {"sft": {...}, "rl": {...}} accuracy, mean tokens, per difficulty
  DIR/rl_curves.png                   reward, accuracy and response length per RL iteration
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import jax
from etils import epath

from k15 import evaluate as evaluate_lib
from k15 import metrics as metrics_lib
from k15 import parallel, sft, storage
from k15 import tokenizer as tokenizer_lib
from k15.data import prompts as prompts_lib
from k15.data import tasks
from k15.model import build, transformer
from k15.rl.stage import rl_stage
from k15.sampling import text


# ---------------------------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[k15 pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(c: Any, seed: int, data_dir: str) -> dict[str, list[prompts_lib.PromptRecord]]:
  """Generates (or reloads) the SFT set, the RL candidate pool and the held-out set."""
  epath.Path(data_dir).mkdir(parents=True, exist_ok=True)
  specs = {"sft": ("train", c.sft_examples, seed), "rl_pool": ("train", c.rl_pool, seed + 1),
           "eval": ("eval", c.eval_problems, seed + 2)}
  out = {}
  for name, (split, n, s) in specs.items():
    path = os.path.join(data_dir, f"{name}.jsonl")
    if not epath.Path(path).exists():
      problems = []
      for family in c.families:
        options = {}
        if family == "arithmetic":
          options["ops"] = tuple(c.ops)
          if name == "sft":
            options.update(carry_slip=c.sft_carry_slip, recheck=c.sft_recheck)
        elif family == "countdown" and name == "sft":
          options.update(search_cap=c.sft_search_cap, search_stop=c.sft_search_stop)
        problems += tasks.generate(family, n, seed=s, split=split,
                                   difficulties=list(c.difficulties),
                                   max_cot_tokens=c.max_cot_tokens, **options)
      tasks.write_jsonl(problems, path)
    out[name] = prompts_lib.load_jsonl(path)[0]
  return out


def _cot(record: prompts_lib.PromptRecord, kind: str) -> str:
  key = {"long": "long_cot", "short": "short_cot"}.get(kind)
  if key is None:
    raise ValueError(f"pipeline.sft_cot={kind!r}; expected 'long' or 'short'")
  return record.meta[key]


def make_tokenizer(records: Sequence[prompts_lib.PromptRecord], path: str,
                   vocab_size: int) -> tokenizer_lib.Tokenizer:
  if epath.Path(path).exists():
    return tokenizer_lib.Tokenizer.load(path)
  texts = []
  for r in records:
    q = tokenizer_lib.PROMPT_TEMPLATE.format(question=r.prompt)
    texts += [q + " " + r.meta["long_cot"], q + " " + r.meta["short_cot"]]
  return tokenizer_lib.train_tokenizer(texts, path, vocab_size)


def curate(pool: list[prompts_lib.PromptRecord], policy: text.TextSampler, c: Any, seed: int,
           data_dir: str) -> list[prompts_lib.PromptRecord]:
  """§2.1 on the RL pool with the SFT model: difficulty by pass rate, hackable filter, balance."""
  path = os.path.join(data_dir, "rl_prompts.jsonl")
  if epath.Path(path).exists():
    return prompts_lib.load_jsonl(path)[0]
  if not c.curate:
    records = list(pool)[:c.rl_prompts]
    report = {"skipped": True}
  else:
    # No chain of thought: the response is forced to open with the answer box at once.
    answer_fn = lambda qs, n: policy.sample(qs, n, 1.0, prefix="\\boxed{", max_new_tokens=12)
    sample_fn = lambda qs, n, t: policy.sample(qs, n, t)
    records, report = prompts_lib.curate(
        pool, grade_fn=tasks.grade, answer_fn=answer_fn, sample_fn=sample_fn,
        hackable_n=c.hackable_samples, difficulty_n=c.label_samples,
        temperature=c.label_temperature, mix=dict(c.mix), seed=seed, batch_size=64)
    records = records[:c.rl_prompts]
  if not records:
    raise ValueError(f"curation kept no RL prompts of {len(pool)}: {report}")
  prompts_lib.write_jsonl(records, path)
  storage.write_json(os.path.join(data_dir, "curation.json"), report)
  return records


def plot_curves(rl_dir: str, path: str) -> None:
  """Reward, accuracy and response length per RL iteration (matplotlib, no display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in metrics_lib.read_jsonl(rl_dir) if "rl/reward" in r]
  if not rows:
    return
  it = [r["step"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for ax, key, title in zip(axes, ("rl/reward", "rl/accuracy", "rl/response_length_mean"),
                            ("reward", "training accuracy", "mean response tokens")):
    ax.plot(it, [r[key] for r in rows], lw=1)
    ax.set_title(title)
    ax.set_xlabel("RL iteration")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=110)
  plt.close(fig)


def base_stages(config: Any, workdir: str, mesh) -> tuple[
    dict[str, list[prompts_lib.PromptRecord]], tokenizer_lib.Tokenizer, transformer.Transformer,
    list[prompts_lib.PromptRecord]]:
  """Data, tokenizer, SFT and curation in `workdir` (each reused when finished there).

  Returns (data, tokenizer, SFT model, curated RL prompts). Call inside `parallel.use_mesh`.
  Everything RL needs comes from here, so that a study (k15.study) can run several RL arms
  from one SFT model and one curated prompt set.
  """
  c = config.pipeline
  data_dir = os.path.join(workdir, "data")
  data = make_data(c, config.seed, data_dir)
  _log(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.items())}")
  tok = make_tokenizer(data["sft"] + data["rl_pool"], os.path.join(workdir, "tokenizer.model"),
                       c.vocab_size)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but config.model.vocab_size "
                     f"is {config.model.vocab_size}")
  _log(f"tokenizer: {tok.vocab_size} pieces")

  model = build.build_model(config, mesh)
  examples = [tok.render_example(r.prompt, _cot(r, c.sft_cot)) for r in data["sft"]]
  _log(f"SFT on {len(examples)} {c.sft_cot}-CoT examples")
  sft_model, losses = sft.train_sft(model, examples, config.sft, mesh=mesh,
                                    workdir=os.path.join(workdir, "sft"), pad_id=tok.pad_id)
  if config.sft.steps and len(losses) < config.sft.steps:
    # Stopped early (SIGTERM): the checkpoint is saved; later stages must not start.
    raise SystemExit(f"SFT stopped at step {len(losses)} of {config.sft.steps} (checkpoint "
                     "saved); rerun the same command to resume")

  # batch_seeds: the seeding this run's curation has always used (k15.sampling.text).
  policy = text.TextSampler(sft_model, tok, max_new_tokens=config.rl.max_new_tokens,
                            seed=config.seed, batch_seeds=True)
  records = curate(data["rl_pool"], policy, c, config.seed, data_dir)
  _log(f"curated RL prompts: {len(records)}")
  if len(records) < config.rl.prompts_per_iteration:
    _log(f"warning: {len(records)} curated prompts < rl.prompts_per_iteration="
         f"{config.rl.prompts_per_iteration}, so every iteration draws prompts more than once "
         f"(data/curation.json has the bucket counts)")
  return data, tok, sft_model, records


def run(config: Any, workdir: str) -> dict[str, Any]:
  if not workdir:
    raise ValueError("mode 'pipeline' needs --workdir")
  t_start = time.time()
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    data, tok, sft_model, records = base_stages(config, workdir, mesh)
    ev = config.evaluate
    _log(f"RL: {config.rl.iterations} iterations of {config.rl.loss}")
    rl_model = rl_stage(config, sft_model, records, tok, mesh, os.path.join(workdir, "rl"))

    results = {}
    for name, m in (("sft", sft_model), ("rl", rl_model)):
      _log(f"evaluating {name} on {len(data['eval'])} held-out problems")
      r = evaluate_lib.evaluate(
          m, data["eval"], tokenizer=tok, grade_fn=tasks.grade, num_samples=ev.num_samples,
          temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=config.seed,
          batch_size=ev.batch_size)
      r.pop("per_problem", None)
      results[name] = r

  results["minutes"] = round((time.time() - t_start) / 60, 2)
  if jax.process_index() == 0:
    print(evaluate_lib.format_table({k: v for k, v in results.items() if k in ("sft", "rl")}))
    print(f"RL - SFT accuracy: {100 * (results['rl']['accuracy'] - results['sft']['accuracy']):+.1f}"
          f" points; {results['minutes']} minutes")
    storage.write_json(os.path.join(workdir, "results.json"), results)
    plot_curves(os.path.join(workdir, "rl"), os.path.join(workdir, "rl_curves.png"))
  return results
