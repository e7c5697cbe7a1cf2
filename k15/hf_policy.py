"""What the modes that start from a Hugging Face checkpoint share: its architecture, tokenizer,
prompt files, evaluation on them, and the export of the result as a checkpoint again.

`config.model_path` is a checkpoint directory (config.json, *.safetensors, tokenizer files).
The architecture comes from its config.json; `config.model` contributes the dtypes, attention
and remat settings (k15.model.build.build_model). A config file's own architecture keys describe the
model it was sized for (k15.plan reads them), so they give way to the checkpoint's; a key set
on the command line that contradicts config.json is an error (`check_architecture`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any, Sequence

import jax
import numpy as np

from k15 import config as k15_config
from k15 import evaluate as evaluate_lib
from k15 import hf_tokenizer, storage
from k15.data import prompt_file
from k15.data import prompts as prompts_lib
from k15.model import hf, transformer
from k15.rewards import verifier
from k15.sampling import text

# ModelConfig fields that a checkpoint fixes; the others (dtypes, attention, remat) are ours.
ARCHITECTURE_KEYS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings",
                     "qkv_bias")
# Where a remote config.model_path is staged when config.model_cache_dir is empty.
DEFAULT_MODEL_CACHE = "~/.cache/k15/models"
# One of these makes a directory a tokenizer for transformers.AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_checkpoint_config(model_path: str) -> tuple[transformer.ModelConfig, str]:
  """(architecture, family 'llama' | 'qwen2') from `model_path`/config.json."""
  raw, file = read_config_json(model_path)
  cfg = hf.config_from_hf(raw, file)
  archs = raw.get("architectures") or []
  family = next((hf.ARCHITECTURES[a] for a in archs if a in hf.ARCHITECTURES),
                raw.get("model_type"))
  return cfg, family


def read_config_json(model_path: str) -> tuple[dict[str, Any], str]:
  """(`model_path`/config.json as a dict, its path), with errors that name the problem."""
  file = os.path.join(model_path, "config.json")
  if storage.is_remote(model_path):
    raise ValueError(f"config.model_path={model_path}: k15 reads checkpoints from local disk; "
                     "stage it first (hf_policy.staged_model_path, which the modes call)")
  if not os.path.isdir(model_path):
    raise FileNotFoundError(f"config.model_path={model_path}: not a directory")
  if not os.path.isfile(file):
    raise hf.CheckpointError(f"config.model_path={model_path}: no config.json (is this a "
                             "Hugging Face checkpoint directory?)")
  with open(file, encoding="utf-8") as f:
    try:
      raw = json.load(f)
    except ValueError as e:
      raise hf.CheckpointError(f"{file}: not valid JSON: {e}") from None
  return raw, file


def check_lengths(config: Any, lengths: Sequence[int], budget_key: str) -> None:
  """Refuses prompts (of these token counts) + config.<budget_key> new tokens past the
  checkpoint's positions (k15.model.hf.position_limit): the model would sample them without
  an error, badly."""
  if not len(lengths):
    return
  raw, file = read_config_json(config.model_path)
  longest = int(max(lengths))
  budget = config
  for part in budget_key.split("."):
    budget = budget[part]
  hf.check_positions(raw, longest + int(budget),
                     f"the longest prompt ({longest} tokens) + config.{budget_key}={budget}",
                     file)


def check_architecture(model_path: str, explicit: dict[str, Any]) -> None:
  """Raises when an architecture key given explicitly (model.<key>=value) contradicts config.json."""
  cfg, _ = read_checkpoint_config(model_path)
  for key, value in sorted(explicit.items()):
    if key in ARCHITECTURE_KEYS and value != getattr(cfg, key):
      raise ValueError(
          f"config.model.{key}={value!r} contradicts {os.path.join(model_path, 'config.json')}, "
          f"which gives {key}={getattr(cfg, key)!r}; with config.model_path set the "
          "architecture comes from the checkpoint (drop the override)")


def staged_model_path(config: Any) -> str:
  """config.model_path itself when local; a remote one (gs://) copied once per host to
  config.model_cache_dir (default DEFAULT_MODEL_CACHE) with a progress bar, and that copy."""
  if not storage.is_remote(config.model_path):
    return config.model_path
  return storage.stage(config.model_path, config.model_cache_dir or DEFAULT_MODEL_CACHE,
                       what="config.model_path")


def with_checkpoint_architecture(config: Any) -> Any:
  """A copy of `config` whose model block holds the checkpoint's architecture, and whose
  model_path is local (a remote checkpoint staged, see `staged_model_path`)."""
  model_path = staged_model_path(config)
  cfg, _ = read_checkpoint_config(model_path)
  config = copy.deepcopy(config)
  config.model_path = model_path
  config.model.update({k: getattr(cfg, k) for k in ARCHITECTURE_KEYS})
  return config


def load_tokenizer(model_path: str, instruction: str) -> hf_tokenizer.HFTokenizer:
  """The checkpoint's own tokenizer and chat template; stop ids from it and generation_config."""
  if not any(os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(
        f"config.model_path={model_path} has no tokenizer files (one of {list(TOKENIZER_FILES)}"
        " with tokenizer_config.json): k15 takes the tokenizer and chat template from the "
        "checkpoint directory; copy them there (tokenizer.save_pretrained(path))")
  return hf_tokenizer.HFTokenizer.load(model_path, instruction=instruction)


def instruction(config: Any) -> str:
  return config.data.instruction or verifier.INSTRUCTIONS[config.reward]


def check_data_config(config: Any, *, need: Sequence[str],
                      reads: Sequence[str] = ("train", "eval")) -> None:
  """Clear errors for the `data` and `reward` keys before anything slow starts: `need`, the
  prompt files the mode requires; `reads`, those it reads (whose formats are checked)."""
  verifier.check_name(config.reward)
  formats = (["format"] if reads else []) + (["eval_format"] if "eval" in reads else [])
  for key in formats:
    value = config.data[key]
    if (value or key == "format") and value not in k15_config.DATA_FORMATS:
      raise ValueError(f"unknown config.data.{key}={value!r}; known formats: "
                       f"{list(k15_config.DATA_FORMATS)}")
  for key in need:
    if not config.data[key]:
      raise ValueError(f"mode {config.mode!r} needs --config.data.{key}=FILE.jsonl")
  if not config.model_path:
    raise ValueError(f"mode {config.mode!r} needs --config.model_path=CHECKPOINT_DIR (a Hugging "
                     "Face checkpoint directory)")


def load_problems(config: Any, which: str) -> list[prompts_lib.PromptRecord]:
  """The records of config.data.<which> ('train' | 'eval') in config.data.format."""
  path, fmt = _data_file(config, which)
  records, skipped = prompts_lib.load_prompts(path, fmt, on_error=config.data.on_error)
  if which == "eval" and config.data.eval_limit:
    records = records[:config.data.eval_limit]
  return _checked(records, skipped, config, which)


def open_prompt_file(config: Any, which: str,
                     tok: hf_tokenizer.HFTokenizer) -> prompt_file.PromptFile:
  """config.data.<which> as a PromptFile: each host parses and tokenizes (chat template
  applied) its share of the lines, and reads records only when it needs them."""
  path, fmt = _data_file(config, which)
  prompts = prompt_file.PromptFile(path, fmt, on_error=config.data.on_error,
                                   tokenize=tok.render_prompt)
  start, stop = prompts.share
  print(f"[k15 host {jax.process_index()}/{jax.process_count()}] {path}: parsed its share, "
        f"non-blank lines [{start}, {stop}); {len(prompts)} records in all", flush=True)
  return _checked(prompts, prompts.skipped, config, which)


def _data_file(config: Any, which: str) -> tuple[str, str]:
  return config.data[which], (which == "eval" and config.data.eval_format) or config.data.format


def _checked(records, skipped: int, config: Any, which: str):
  path = config.data[which]
  if skipped and jax.process_index() == 0:
    print(f"[k15] {path}: skipped {skipped} malformed line(s)", flush=True)
  if not len(records):
    raise ValueError(f"config.data.{which}={path}: no records")
  return records


def make_reward_fn(tok: hf_tokenizer.HFTokenizer, records: Sequence[prompts_lib.PromptRecord],
                   grade: verifier.GradeBatch):
  """The trainer's reward_fn(prompt indices, response ids) -> rewards: decode, then verify."""

  def reward_fn(ids, responses):
    # A padded model vocabulary (Qwen2.5) can sample ids the tokenizer has no text for.
    texts = [text.decode(tok, r) for r in responses]
    return np.asarray(grade([records[int(i)] for i in ids], texts), np.float32)
  return reward_fn


def evaluate(model: transformer.Transformer, problems: Sequence[prompts_lib.PromptRecord],
             tok: hf_tokenizer.HFTokenizer, config: Any) -> dict[str, Any]:
  """pass@1 over config.evaluate.num_samples samples, and the greedy accuracy, on `problems`."""
  grade = verifier.make_grader(config.reward, config.reward_options)
  grade_one = lambda problem, response: float(grade([problem], [response])[0])
  ev = config.evaluate
  kwargs = dict(tokenizer=tok, grade_fn=grade_one, max_new_tokens=ev.max_new_tokens,
                seed=ev.seed, batch_size=ev.batch_size, top_p=ev.top_p)
  out = {"sampled": evaluate_lib.evaluate(model, problems, num_samples=ev.num_samples,
                                          temperature=ev.temperature, **kwargs)}
  if ev.greedy and ev.temperature != 0:
    out["greedy"] = evaluate_lib.evaluate(model, problems, num_samples=1, temperature=0.0,
                                          **kwargs)
  for r in out.values():
    per = r["per_problem"]
    # pass@k: the share of problems that any of their k samples solves.
    r["pass_at_k"] = float(np.mean([p["accuracy"] > 0 for p in per]))
    by_source: dict[str, list[float]] = {}
    for problem, p in zip(problems, per):
      by_source.setdefault(problem.tags[0] if problem.tags else problem.domain,
                           []).append(p["accuracy"])
    r["by_source"] = {k: {"accuracy": float(np.mean(v)), "n": len(v)}
                      for k, v in sorted(by_source.items())}
  return out


def eval_metrics(results: dict[str, Any]) -> dict[str, float]:
  """The scalars of `evaluate` for metrics.jsonl."""
  s = results["sampled"]
  out = {"eval/pass_at_1": s["accuracy"], "eval/mean_tokens": s["mean_tokens"],
         "eval/truncated": s["truncated"]}
  if "greedy" in results:
    out["eval/greedy_accuracy"] = results["greedy"]["accuracy"]
  elif s["temperature"] == 0:
    out["eval/greedy_accuracy"] = s["accuracy"]
  return out


def export(model: transformer.Transformer, tok: hf_tokenizer.HFTokenizer, config: Any,
           directory: str) -> str:
  """Writes `model` as a Hugging Face checkpoint: config.json, safetensors, tokenizer files and
  the source checkpoint's generation_config.json (its stop ids)."""
  _, family = read_checkpoint_config(config.model_path)
  # Written locally (safetensors, save_pretrained), then uploaded when `directory` is remote.
  with storage.local_dir(directory) as local:
    hf.save(model, local, family=family, dtype=config.export.dtype or config.model.param_dtype)
    if jax.process_index() == 0:
      tok.save(local)
      gen = os.path.join(config.model_path, "generation_config.json")
      if os.path.isfile(gen):
        shutil.copy(gen, local)
  return directory
