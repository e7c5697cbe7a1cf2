"""Long2short RL (§2.4): RL from the long model (or another method's) with the length penalty
on from the first iteration and a smaller rollout budget."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import ml_collections

from k15 import checkpoint as ckpt_lib
from k15 import metrics as metrics_lib
from k15.data import prompts as prompts_lib
from k15.model import transformer
from k15.rl import stage as rl_stage_lib


def long2short_config(config: Any) -> ml_collections.ConfigDict:
  """A copy of `config` whose `rl` block is long2short RL's (the input is left unchanged)."""
  l2s = config.long2short.rl
  if not l2s.length_weight > 0:
    raise ValueError(f"long2short.rl.length_weight={l2s.length_weight}: long2short RL needs "
                     "the length penalty (a weight > 0)")
  if l2s.iterations < 1 or l2s.max_new_tokens < 1:
    raise ValueError(f"long2short.rl.iterations={l2s.iterations} and max_new_tokens="
                     f"{l2s.max_new_tokens} must be >= 1")
  if l2s.max_new_tokens >= config.rl.max_new_tokens:
    logging.warning("long2short.rl.max_new_tokens=%d is not below rl.max_new_tokens=%d: the "
                    "rollout budget is not reduced", l2s.max_new_tokens, config.rl.max_new_tokens)
  cfg = config.copy_and_resolve_references()
  cfg.rl.iterations = int(l2s.iterations)
  cfg.rl.max_new_tokens = int(l2s.max_new_tokens)
  cfg.rl.length_weight = float(l2s.length_weight)
  cfg.rl.length_warmup_iterations = 0
  if cfg.rl.segment_budget > cfg.rl.max_new_tokens:
    cfg.rl.segment_budget = cfg.rl.max_new_tokens
  return cfg


def sampled_tokens(workdir: str) -> int:
  """Response tokens an RL run in `workdir` has sampled so far (its metrics.jsonl)."""
  try:
    rows = metrics_lib.read_jsonl(workdir)
  except FileNotFoundError:
    return 0
  return int(sum(r.get("rl/sampled_tokens", 0) for r in rows))


def long2short_rl(config: Any, model: transformer.Transformer,
                  records: Sequence[prompts_lib.PromptRecord], tok: Any, mesh: Any,
                  workdir: str, *, token_budget: int = 0) -> transformer.Transformer:
  """§2.4 long2short RL: `k15.rl.stage.rl_stage` from `model` under `long2short_config`.

  token_budget > 0: training ends after the iteration at which the run's sampled response
  tokens reach it (long2short.rl.iterations stays the cap). Resumes from
  `<workdir>/checkpoints` like any RL run; a run whose budget is spent trains no more.
  """
  cfg = long2short_config(config)
  stop_when = None
  if token_budget > 0:
    spent = [sampled_tokens(workdir)]

    def stop_when(metrics):
      spent[0] += int(metrics.get("rl/sampled_tokens", 0))
      return spent[0] >= token_budget

    if spent[0] >= token_budget:  # finished earlier: its last checkpoint, no training
      return ckpt_lib.restore_params(model, os.path.join(workdir, "checkpoints"))
  return rl_stage_lib.rl_stage(cfg, model, records, tok, mesh, workdir, stop_when=stop_when)
