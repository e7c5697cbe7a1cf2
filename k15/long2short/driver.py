"""Mode `long2short` (`run`): the methods of §2.4 from a finished pipeline, at equal sampled tokens.

Mode `long2short` expects a finished `pipeline` in the workdir (tokenizer, data, SFT and RL
checkpoints; it does not run or import the pipeline) and adds:

  DIR/long2short/short/      SFT of the short-CoT model (long2short.short.demonstrations)
  DIR/long2short/groups_*.json   n sampled responses per prompt (ids, correct) of a model
  DIR/long2short/{merge_rs,shortest_rs}[_roundR]/   their SFT checkpoints, round by round
  DIR/long2short/dpo/        DPO checkpoints and metrics
  DIR/long2short/rl/         long2short RL checkpoints and metrics
  DIR/long2short.json        per model: accuracy, mean tokens, sampled tokens, vs long
  DIR/long2short.png         accuracy vs mean tokens, one point per model (Fig. 7)

Every stage reuses its output on a rerun; a rerun with a different `long2short` or `evaluate`
block is refused (delete DIR/long2short* to start over).

Equal sampled tokens (`long2short.token_budget` > 0): the methods that learn from their own
samples each spend at most about that many response tokens on sampling (each stops at the
first sampler batch, or RL iteration, that reaches it; a sampler batch then holds at most the
budget's worth of responses at the token limit): shortest rejection sampling splits it evenly
over its rounds, DPO samples its pairs' groups with it, long2short RL stops training when its
rollouts reach it. Merging samples nothing. The table reports what each spent.

Decisions this file makes (the paper leaves them open):
- The short model is SFT on short-CoT demonstrations: 'concise' (default) the long CoT without
  its restated columns (k15.data.tasks.without_rechecks), or 'answer' the boxed answer alone.
  It starts by default from the pipeline's long-CoT SFT checkpoint (`short.init='sft'`): the
  long model is that checkpoint plus RL, so the merge averages two fine-tunes of one parent,
  as the paper's long and short models share their base. `short.init='long'` fine-tunes the
  long model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
from etils import epath
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import config as k15_config
from k15 import evaluate as evaluate_lib
from k15 import parallel, sft
from k15 import tokenizer as tokenizer_lib
from k15.data import prompts as prompts_lib
from k15.data import tasks
from k15.long2short import dpo as dpo_lib
from k15.long2short import merge as merge_lib
from k15.long2short import rejection
from k15.long2short import rl as rl_lib
from k15.model import build, transformer

METHODS = k15_config.LONG2SHORT_METHODS
LABELS = {"long": "long (RL)", "short": "short (SFT)", "merge": "merge",
          "merge_rs": "merge + shortest RS", "shortest_rs": "shortest RS", "dpo": "DPO",
          "rl": "long2short RL"}
PROMPT_SETS = {"rl_pool": "rl_pool.jsonl", "rl_prompts": "rl_prompts.jsonl", "sft": "sft.jsonl"}
RL_INITS = ("long", "merge", "merge_rs", "shortest_rs", "dpo")  # where long2short RL may start
SHORT_DEMONSTRATIONS = {"concise": lambda r: tasks.without_rechecks(r.meta["long_cot"]),
                        "answer": lambda r: r.meta["short_cot"]}


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[k15 long2short {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Typed results.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Trained:
  """A method's model (None: it had nothing to train on, `info['skipped']` says why), what it
  did, and the response tokens it sampled to do it."""
  model: transformer.Transformer | None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  sampled_tokens: int = 0


@dataclasses.dataclass
class MethodResult:
  """One row of the table: a model's held-out evaluation and what making it cost."""
  name: str
  accuracy: float | None = None         # pass@1 on the held-out problems; None when skipped
  mean_tokens: float | None = None      # mean response tokens there
  token_efficiency: float | None = None  # accuracy per 1k response tokens
  sampled_tokens: int = 0               # response tokens the method sampled (its budget)
  init: str = "long"                    # the model the method started from
  skipped: str = ""                     # why nothing was trained
  tokens_vs_long: float | None = None   # mean_tokens / long's
  accuracy_vs_long: float | None = None  # accuracy - long's
  meets_target: bool = False            # >= 30% fewer tokens at <= 3 points below long
  info: dict[str, Any] = dataclasses.field(default_factory=dict)        # the method's stats
  evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rest of evaluate's

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "MethodResult":
    return cls(**d)


@dataclasses.dataclass
class Context:
  """What every method reads: config, tokenizer, data, mesh, the model template, directories."""
  config: Any
  paths: dict[str, epath.Path]                 # the pipeline outputs (`require_pipeline`)
  out_dir: epath.Path
  tok: Any
  eval_records: list[prompts_lib.PromptRecord]  # the held-out problems of the table
  prompts: list[prompts_lib.PromptRecord]      # rejection sampling and DPO
  rl_records: list[prompts_lib.PromptRecord]   # long2short RL (the curated RL prompts)
  sft_records: list[prompts_lib.PromptRecord]  # the short model's demonstrations
  mesh: Any
  template: transformer.Transformer
  cache: dict[str, Trained] = dataclasses.field(default_factory=dict)
  # Where models that depend on the base alone are kept (k15.study: shared by its seed pairs);
  # None: out_dir.
  shared_dir: epath.Path | None = None

  @property
  def l2s(self) -> Any:
    return self.config.long2short


# ---------------------------------------------------------------------------------------------
# The methods: each a function of the context that returns a Trained.
# ---------------------------------------------------------------------------------------------

def obtain(ctx: Context, name: str) -> Trained:
  """The model `name`, trained (or reloaded from its checkpoints) on first use."""
  if name not in ctx.cache:
    ctx.cache[name] = TRAIN[name](ctx)
  return ctx.cache[name]


def _restore(ctx: Context, key: str) -> Trained:
  return Trained(ckpt_lib.restore_params(ctx.template, str(ctx.paths[key])))


def _finetune_config(config_sft: Any, steps: int,
                     learning_rate: float) -> ml_collections.ConfigDict:
  """config.sft for a short fine-tune: `steps` steps, warm-up 10%, cosine to lr / 10."""
  c = config_sft.copy_and_resolve_references()
  c.steps = int(steps)
  c.optimizer.learning_rate = float(learning_rate)
  c.optimizer.end_learning_rate = float(learning_rate) / 10
  c.optimizer.warmup_steps = max(1, int(steps) // 10)
  c.optimizer.decay_steps = 0  # train_sft fills in the steps after the warm-up
  return c


def _finetune(ctx: Context, model: transformer.Transformer, examples, steps: int,
              learning_rate: float, tag: str,
              out_dir: epath.Path | None = None) -> transformer.Transformer:
  cfg = _finetune_config(ctx.config.sft, steps, learning_rate)
  trained, _ = sft.train_sft(model, examples, cfg, mesh=ctx.mesh,
                             workdir=str((out_dir or ctx.out_dir) / tag), pad_id=ctx.tok.pad_id)
  return trained


def train_short(ctx: Context) -> Trained:
  c = ctx.l2s.short
  make = SHORT_DEMONSTRATIONS[c.demonstrations]
  examples = [ctx.tok.render_example(r.prompt, make(r)) for r in ctx.sft_records]
  _log(f"short model: SFT from the {c.init} model on {len(examples)} {c.demonstrations} "
       "short-CoT examples")
  # From the SFT model, the short model depends on the base alone (the fine-tune's seed is
  # config.sft's): a study trains it once for all its seed pairs (train_sft reuses a finished run).
  out_dir = ctx.shared_dir if c.init == "sft" else None
  model = _finetune(ctx, obtain(ctx, c.init).model, examples, c.steps, c.learning_rate, "short",
                    out_dir)
  ctx.cache.pop("sft", None)
  return Trained(model, {"demonstrations": c.demonstrations})


def train_merge(ctx: Context) -> Trained:
  long, short = obtain(ctx, "long").model, obtain(ctx, "short").model
  weights = tuple(ctx.l2s.merge_weights)
  _log(f"merging long and short with weights {weights}")
  merged = merge_lib.merge([nnx.state(long), nnx.state(short)], weights)
  return Trained(nnx.merge(nnx.graphdef(long), merged), {"weights": list(weights)})


def groups_of(ctx: Context, tag: str, model: transformer.Transformer,
              token_budget: int) -> list[rejection.Group]:
  """n responses per prompt from `model`, filed as groups_<tag>[_b<budget>].json (reused)."""
  c = ctx.l2s.rs
  name = f"groups_{tag}" + (f"_b{token_budget}" if token_budget else "")
  path = ctx.out_dir / f"{name}.json"
  if path.exists():
    return [rejection.Group.from_json(g) for g in json.loads(path.read_text())]
  _log(f"sampling {c.samples} responses per prompt (of {len(ctx.prompts)}) from the {tag} model"
       + (f" up to {token_budget} tokens" if token_budget else ""))
  max_new_tokens = c.max_new_tokens or ctx.config.rl.max_new_tokens
  batch_size = ctx.config.evaluate.batch_size
  if token_budget:  # batches of at most the budget's worth: the overshoot is under one batch
    batch_size = max(1, min(batch_size, token_budget // (c.samples * max_new_tokens)))
  groups = rejection.sample_groups(
      model, ctx.prompts, tokenizer=ctx.tok, grade_fn=tasks.grade, n=c.samples,
      temperature=c.temperature, max_new_tokens=max_new_tokens, seed=ctx.config.seed,
      batch_size=batch_size, token_budget=token_budget)
  _atomic_write(path, [g.to_json() for g in groups])  # every host: its own copy
  return groups


def _rejection_rounds(ctx: Context, source: str, name: str) -> Trained:
  """Round 1 fine-tunes `source` on its own shortest correct samples; round r > 1 samples from
  round r - 1's model and fine-tunes that. A later round with no correct sample ends the rounds
  with the model before it. With a token budget, each round gets an equal share."""
  c = ctx.l2s.rs
  round_budget = ctx.l2s.token_budget // c.rounds if ctx.l2s.token_budget else 0
  model, tag, spent = obtain(ctx, source).model, source, 0
  info: dict[str, Any] = {}
  for r in range(1, c.rounds + 1):
    groups = groups_of(ctx, tag, model, round_budget)  # samples of this round's start model
    spent += rejection.sampled_tokens(groups)
    tag = name if r == 1 else f"{name}_round{r}"
    selection = rejection.select_shortest(groups)
    info.update(selection.stats())
    _log(f"{tag}: {selection.stats()}")
    if not selection.examples:
      if r == 1:
        return Trained(None, dict(info, skipped="no correct samples"), spent)
      return Trained(model, dict(info, rounds=r - 1, stopped=f"round {r}: no correct samples"),
                     spent)
    steps = rs_steps(ctx.config.sft, selection.examples, c, pad_id=ctx.tok.pad_id)
    info[f"{tag}_sft_steps"] = steps
    model = _finetune(ctx, model, selection.examples, steps, c.learning_rate, tag)
  return Trained(model, dict(info, rounds=c.rounds), spent)


def rs_steps(config_sft: Any, examples: Sequence[Any], rs: Any, *, pad_id: int) -> int:
  """Steps of a rejection-sampling fine-tune: `rs.sft_epochs` passes over `examples` packed as
  config.sft packs them, capped at `rs.sft_steps` (either 0: the other alone)."""
  if not rs.sft_epochs:
    if not rs.sft_steps:
      raise ValueError("long2short.rs.sft_steps and rs.sft_epochs are both 0: no fine-tune")
    return int(rs.sft_steps)
  c = config_sft.copy_and_resolve_references()
  c.steps, c.epochs = 0, int(rs.sft_epochs)
  steps = max(1, sft.count_steps(examples, c, pad_id=pad_id))
  return min(steps, int(rs.sft_steps)) if rs.sft_steps else steps


def train_merge_rs(ctx: Context) -> Trained:
  return _rejection_rounds(ctx, "merge", "merge_rs")


def train_shortest_rs(ctx: Context) -> Trained:
  return _rejection_rounds(ctx, "long", "shortest_rs")


def train_dpo(ctx: Context) -> Trained:
  groups = groups_of(ctx, "long", obtain(ctx, "long").model, ctx.l2s.token_budget)
  spent = rejection.sampled_tokens(groups)
  pairs = dpo_lib.build_dpo_pairs(groups)
  _log(f"DPO on {len(pairs)} pairs")
  if not pairs:
    return Trained(None, {"pairs": 0, "skipped": "no DPO pairs"}, spent)
  model, _ = dpo_lib.train_dpo(obtain(ctx, "long").model, pairs, ctx.l2s.dpo, ctx.mesh,
                               pad_id=ctx.tok.pad_id, workdir=str(ctx.out_dir / "dpo"))
  return Trained(model, {"pairs": len(pairs)}, spent)


def train_rl(ctx: Context) -> Trained:
  c = ctx.l2s.rl
  start = obtain(ctx, c.init)
  if start.model is None:
    return Trained(None, {"init": c.init, "skipped": f"its init, {c.init}, trained nothing"})
  _log(f"long2short RL from the {c.init} model: at most {c.iterations} iterations"
       + (f" or {ctx.l2s.token_budget} sampled tokens" if ctx.l2s.token_budget else "")
       + f", budget {c.max_new_tokens} tokens, length_weight {c.length_weight}")
  rl_dir = str(ctx.out_dir / "rl")
  model = rl_lib.long2short_rl(ctx.config, start.model, ctx.rl_records, ctx.tok, ctx.mesh,
                               rl_dir, token_budget=ctx.l2s.token_budget)
  return Trained(model, {"init": c.init}, rl_lib.sampled_tokens(rl_dir))


TRAIN: dict[str, Callable[[Context], Trained]] = {
    "long": lambda ctx: _restore(ctx, "rl_checkpoints"),
    "sft": lambda ctx: _restore(ctx, "sft_checkpoints"),
    "short": train_short, "merge": train_merge, "merge_rs": train_merge_rs,
    "shortest_rs": train_shortest_rs, "dpo": train_dpo, "rl": train_rl,
}


# ---------------------------------------------------------------------------------------------
# Evaluation, the table and the plot.
# ---------------------------------------------------------------------------------------------

def token_efficiency(accuracy: float, mean_tokens: float) -> float:
  """Accuracy (0..1) per 1k response tokens."""
  return float(accuracy) / max(float(mean_tokens), 1e-9) * 1000.0


def evaluate_method(ctx: Context, name: str, trained: Trained,
                    problems: list[prompts_lib.PromptRecord]) -> MethodResult:
  info = dict(trained.info)
  init = info.pop("init", "long")
  if trained.model is None:
    return MethodResult(name, sampled_tokens=trained.sampled_tokens, init=init,
                        skipped=info.pop("skipped", "nothing trained"), info=info)
  _log(f"evaluating {name} on {len(problems)} held-out problems")
  ev = ctx.config.evaluate
  r = evaluate_lib.evaluate(
      trained.model, problems, tokenizer=ctx.tok, grade_fn=tasks.grade,
      num_samples=ev.num_samples, temperature=ev.temperature, top_p=ev.top_p,
      max_new_tokens=ev.max_new_tokens, seed=ctx.config.seed, batch_size=ev.batch_size)
  r.pop("per_problem", None)
  accuracy, mean_tokens = r.pop("accuracy"), r.pop("mean_tokens")
  return MethodResult(name, accuracy=accuracy, mean_tokens=mean_tokens,
                      token_efficiency=token_efficiency(accuracy, mean_tokens),
                      sampled_tokens=trained.sampled_tokens, init=init, info=info, evaluation=r)


def compare_to_long(results: dict[str, MethodResult]) -> None:
  """Fills in each method's tokens and accuracy against the long model's."""
  long = results["long"]
  for name, r in results.items():
    if name != "long" and r.accuracy is not None:
      r.tokens_vs_long = r.mean_tokens / long.mean_tokens
      r.accuracy_vs_long = r.accuracy - long.accuracy
      r.meets_target = bool(r.tokens_vs_long <= 0.7 and r.accuracy_vs_long >= -0.03)


def _label(r: MethodResult) -> str:
  return LABELS.get(r.name, r.name) + ("" if r.init == "long"
                                       else f" (from {LABELS.get(r.init, r.init)})")


def format_table(results: dict[str, MethodResult]) -> str:
  """One row per model: accuracy, mean tokens, both against `long`, efficiency, sampled tokens."""
  long = results.get("long")
  header = ["model", "accuracy %", "mean tokens", "tokens vs long", "acc - long (pts)",
            "acc per 1k tokens", "sampled tokens"]
  rows = []
  for name, r in results.items():
    if r.accuracy is None:
      rows.append([_label(r), "-", "-", "-", "-", r.skipped or "-", f"{r.sampled_tokens:,}"])
      continue
    vs_tok = vs_acc = "-"
    if long is not None and long.accuracy is not None and name != "long":
      vs_tok = f"{100 * (r.mean_tokens / long.mean_tokens - 1):+.1f}%"
      vs_acc = f"{100 * (r.accuracy - long.accuracy):+.1f}"
    rows.append([_label(r), f"{100 * r.accuracy:.1f}", f"{r.mean_tokens:.1f}", vs_tok, vs_acc,
                 f"{r.token_efficiency:.2f}", f"{r.sampled_tokens:,}"])
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
  fmt = lambda row: "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                              for i, (cell, w) in enumerate(zip(row, widths)))
  return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def plot(results: dict[str, MethodResult], path: str) -> None:
  """Accuracy against mean response tokens, one labelled point per model (Fig. 7's layout)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for name, r in results.items():
    if r.accuracy is None:
      continue
    x, y = r.mean_tokens, 100 * r.accuracy
    ax.scatter([x], [y], s=70 if name == "long" else 40, marker="*" if name == "long" else "o",
               zorder=3)
    ax.annotate(_label(r), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
  ax.set_xlabel("mean response tokens (held-out)")
  ax.set_ylabel("accuracy % (pass@1)")
  ax.set_title("long2short: accuracy vs response length")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Mode `long2short`.
# ---------------------------------------------------------------------------------------------

def _atomic_write(path: epath.Path, obj: Any) -> None:
  tmp = path.parent / f"{path.name}.tmp{jax.process_index()}"
  tmp.write_text(json.dumps(obj, indent=2, default=str))
  tmp.replace(path)


def check_config(config: Any) -> None:
  """Clear errors for the `long2short` keys before anything slow starts."""
  c = config.long2short
  unknown = sorted(set(c.methods) - set(METHODS))
  if unknown:
    raise ValueError(f"long2short.methods has unknown {unknown}; known: {list(METHODS)}")
  if c.prompt_set not in PROMPT_SETS:
    raise ValueError(f"long2short.prompt_set={c.prompt_set!r}; expected one of "
                     f"{sorted(PROMPT_SETS)}")
  if c.short.init not in ("sft", "long"):
    raise ValueError(f"long2short.short.init={c.short.init!r}; expected 'sft' or 'long'")
  if c.short.demonstrations not in SHORT_DEMONSTRATIONS:
    raise ValueError(f"long2short.short.demonstrations={c.short.demonstrations!r}; expected "
                     f"one of {sorted(SHORT_DEMONSTRATIONS)}")
  if not (isinstance(c.rs.rounds, int) and c.rs.rounds >= 1):
    raise ValueError(f"long2short.rs.rounds={c.rs.rounds!r}; expected an int >= 1")
  if c.rl.init not in RL_INITS:
    raise ValueError(f"long2short.rl.init={c.rl.init!r}; expected one of {list(RL_INITS)}")
  if not (isinstance(c.token_budget, int) and c.token_budget >= 0):
    raise ValueError(f"long2short.token_budget={c.token_budget!r}; expected an int >= 0 "
                     "(0: no budget)")


def require_pipeline(workdir: epath.Path,
                     base: epath.Path | None = None) -> dict[str, epath.Path]:
  """The pipeline outputs mode `long2short` reads; an error lists any that are missing.

  base: where the data, tokenizer and SFT come from when not from `workdir` (a study's shared
  base stages); the long model is always `workdir`/rl's.
  """
  base = workdir if base is None else base
  paths = {"tokenizer": base / tokenizer_lib.MODEL_FILENAME,
           "sft_checkpoints": base / "sft" / sft.CHECKPOINT_SUBDIR,
           "rl_checkpoints": workdir / "rl" / "checkpoints",
           "eval": base / "data" / "eval.jsonl"}
  paths.update({name: base / "data" / f for name, f in PROMPT_SETS.items()})
  missing = [str(p) for p in paths.values() if not p.exists()]
  if missing:
    raise FileNotFoundError(f"mode 'long2short' needs a finished pipeline in {workdir} (run "
                            f"--config.mode=pipeline first); missing: {missing}")
  return paths


def _fingerprint(config: Any) -> dict[str, Any]:
  """What stored results were made with; a rerun must match (the methods may change)."""
  return json.loads(json.dumps({
      "long2short": {k: v for k, v in config.long2short.to_dict().items() if k != "methods"},
      "evaluate": config.evaluate.to_dict(), "seed": config.seed}, default=str))


def _methods(c: Any) -> list[str]:
  """The models to evaluate, in table order: long, short (when merging), then the methods."""
  names = ["long"]
  if {"merge", "merge_rs"} & set(c.methods):
    names.append("short")
  return names + [m for m in METHODS if m in c.methods]


def make_context(config: Any, workdir: str, mesh: Any, *, base: str | None = None) -> Context:
  """The tokenizer, data and model template of a finished pipeline in `workdir` (data,
  tokenizer and SFT from `base` if given); the methods' outputs go to `workdir`/long2short.
  Call inside `parallel.use_mesh(mesh)`."""
  check_config(config)
  c = config.long2short
  root = epath.Path(workdir)
  paths = require_pipeline(root, epath.Path(base) if base else None)
  out_dir = root / "long2short"
  out_dir.mkdir(parents=True, exist_ok=True)
  load = lambda name: prompts_lib.load_jsonl(str(paths[name]))[0]
  prompts = load(c.prompt_set)
  if c.num_prompts:
    prompts = prompts[:c.num_prompts]
  return Context(config=config, paths=paths, out_dir=out_dir,
                 tok=tokenizer_lib.Tokenizer.load(str(paths["tokenizer"])),
                 eval_records=load("eval"), prompts=prompts, rl_records=load("rl_prompts"),
                 sft_records=load("sft"), mesh=mesh, template=build.build_model(config, mesh),
                 shared_dir=epath.Path(base) / "long2short" if base else None)


def run(config: Any, workdir: str) -> dict[str, MethodResult]:
  """Mode `long2short`: the methods of §2.4 from a finished pipeline in `workdir`."""
  if not workdir:
    raise ValueError("mode 'long2short' needs --workdir (a finished pipeline's)")
  check_config(config)
  c = config.long2short
  root = epath.Path(workdir)
  require_pipeline(root)  # before anything else: the error names what is missing

  # --- stored results (a rerun continues) --------------------------------------------------
  json_path = root / "long2short.json"
  fingerprint = _fingerprint(config)
  save = lambda: _atomic_write(json_path, {
      "config": fingerprint, "token_budget": c.token_budget,
      "results": {k: r.to_json() for k, r in results.items()}})
  results: dict[str, MethodResult] = {}
  if json_path.exists():
    stored = json.loads(json_path.read_text())
    if stored.get("config") != fingerprint:
      raise ValueError(f"{json_path} was made with another long2short/evaluate config; delete "
                       f"it and {root / 'long2short'} to start over, or use the same config")
    results = {k: MethodResult.from_json(v) for k, v in stored.get("results", {}).items()}

  # --- the methods, one by one; each model is trained (or reloaded) on first use ----------
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    ctx = make_context(config, workdir, mesh)
    for name in _methods(c):
      if name in results:
        continue
      results[name] = evaluate_method(ctx, name, obtain(ctx, name), ctx.eval_records)
      save()
      if name not in ("long", "short", "merge", c.rl.init):  # no later method starts from it
        ctx.cache.pop(name, None)

  # --- the table ------------------------------------------------------------------------------
  compare_to_long(results)
  save()
  if jax.process_index() == 0:
    print(format_table(results))
    met = [_label(r) for r in results.values() if r.meets_target]
    print(f"methods with >= 30% fewer tokens at <= 3 points below long: {met or 'none'}")
    plot(results, str(root / "long2short.png"))
  return results
