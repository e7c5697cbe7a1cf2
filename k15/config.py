"""Helpers shared by the ml-collections files in configs/.

A config file's `get_config(arg)` takes a short string of structural options
(`--config=configs/tiny_cpu.py:runlocal=True,layers=4`); `parse_arg` turns it into a
ConfigDict with typed defaults, and refuses keys it does not know.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from k15 import parallel
from k15.model import transformer


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'a=1,b=x' -> ConfigDict(a=1, b='x'), typed like the defaults; unknown keys are an error."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"config arg {key!r} is not one of {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if not sep or value.lower() in ("1", "true", "yes"):
        parsed: Any = True
      elif value.lower() in ("0", "false", "no"):
        parsed = False
      else:
        raise ValueError(f"config arg {key}={value!r}: expected true or false")
    elif isinstance(default, (int, float)):
      try:
        parsed = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config arg {key}={value!r}: expected {type(default).__name__}") from e
    else:
      parsed = value
    out[key] = parsed
  return out


def make_block(name: str, defaults: dict[str, Any],
               overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config block: `defaults` updated by `overrides`; a key it does not have is an error.

  A default that is itself a dict is a nested block: its override must be a dict too, with
  known keys only, and updates just the keys it names.
  """
  c = ml_collections.ConfigDict(defaults)
  unknown = sorted(set(overrides) - set(c.keys()))
  if unknown:
    raise ValueError(f"unknown {name} config keys {unknown}; known: {sorted(c.keys())}")
  for key, value in overrides.items():
    if isinstance(c[key], ml_collections.ConfigDict):
      known = sorted(c[key].keys())
      if not isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ValueError(f"{name}.{key} must be a dict of {known}, got {value!r}")
      bad = sorted(set(value.keys()) - set(known))
      if bad:
        raise ValueError(f"unknown {name}.{key} keys {bad}; known: {known}")
  c.update(overrides)
  return c


def model_block(**overrides: Any) -> ml_collections.ConfigDict:
  """The `model` block: every ModelConfig field, so each one is overridable by flag."""
  fields = {f.name: f.default for f in dataclasses.fields(transformer.ModelConfig)}
  return make_block("model", fields, overrides)


def mesh_block(**sizes: int) -> ml_collections.ConfigDict:
  """The `mesh` block: one size per mesh axis; -1 takes the remaining devices."""
  out = {a: 1 for a in parallel.MESH_AXES}
  out.update(sizes)
  return ml_collections.ConfigDict(out)


def base(mode: str = "smoke", seed: int = 0) -> ml_collections.ConfigDict:
  """Keys every config has, with their defaults."""
  c = ml_collections.ConfigDict()
  c.mode = mode
  c.seed = seed
  c.mesh = mesh_block(data=-1)
  # Logical axis -> mesh axes; see k15.parallel.DEFAULT_RULES for the names.
  c.sharding_rules = tuple(parallel.DEFAULT_RULES)
  # Multi-host: on a TPU pod slice set distributed=True (or K15_DISTRIBUTED=1) and leave the
  # rest empty; jax finds the coordinator itself.
  c.distributed = False
  c.distributed_coordinator_address = ""
  c.distributed_num_processes = 0
  c.distributed_process_id = -1
  return c


def optimizer_block(**overrides: Any) -> ml_collections.ConfigDict:
  """AdamW (k15.update.make_optimizer)."""
  return make_block("optimizer", dict(
      learning_rate=1e-3, warmup_steps=0, decay="constant", decay_steps=0,
      end_learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0), overrides)


def rl_block(**overrides: Any) -> ml_collections.ConfigDict:
  """The RL iteration (k15.rl.trainer); names follow paper §2.3 and §2.6."""
  return make_block("rl", dict(
      iterations=50,
      prompts_per_iteration=16,
      samples_per_prompt=8,        # k
      max_new_tokens=256,          # a response's total budget
      segment_budget=0,            # partial rollouts: new tokens per sequence per iteration;
                                   # 0 = off (the whole budget in one iteration)
      temperature=1.0, top_p=1.0, top_k=0,
      repeat_ngram=0,              # repeat detection: n-gram size, 0 = off
      loss="pmd",                  # 'pmd' | 'pmd_token' | 'grpo' | 'reinforce' | 'rest'
      tau=0.1,                     # PMD regulariser strength
      clip_eps=0.2,                # GRPO
      num_passes=1,                # passes over an iteration's groups
      minibatch_groups=4,          # groups per gradient step
      microbatches=1,              # gradient accumulation within a step
      length_bucket=64,            # training rows are padded to a multiple of this
      reset_optimizer=True,        # "we also reset the optimizer at the start of each iteration"
      dynamic_sampling=False,      # drop groups whose rewards are all equal
      mask_truncated=False,        # drop responses cut at max_new_tokens from the loss
      loss_on_old_segments=False,  # partial rollouts: train on segments of older policies too
      length_weight=0.0,           # length penalty (§2.3.3), its weight ...
      length_warmup_iterations=0,  # ... and the iteration it switches on
      repeat_penalty=0.0,          # subtracted from the reward of a looping response
      # curriculum: e.g. '0:all,20:hard' (difficulty: higher is harder; easy/medium/hard are
      # curation's buckets); success_prior_samples: n > 0 starts each prompt's success rate
      # from its curation pass rate, weighted as n samples (0 = off: every prompt starts at 0).
      sampling=dict(mode="prioritized", curriculum="", epsilon=0.0, success_prior_samples=0),
  ), overrides)


def checkpoint_block(**overrides: Any) -> ml_collections.ConfigDict:
  return make_block("checkpoint", dict(every=10, keep=3), overrides)


def add_run_blocks(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds every block the modes read, with defaults, so that all configs share one key set.

  Real-scale configs then override what matters for them; the blocks' owners define the keys
  (k15.sft, k15.evaluate, k15.pipeline) and are imported here only when a config is built.
  """
  from k15 import evaluate, long2short, pipeline, sft  # pylint: disable=g-import-not-at-top
  c.model_path = ""   # a Hugging Face checkpoint directory to start from; "" = random init
  c.accelerator_type = ""  # e.g. 'v5p-64', read by k15.plan
  c.smoke = dict(batch=8, length=128)
  c.optimizer = optimizer_block()
  c.rl = rl_block()
  c.checkpoint = checkpoint_block()
  c.sft = sft.config_block()
  c.evaluate = evaluate.config_block()
  c.pipeline = pipeline.config_block()
  c.long2short = long2short.config_block()
  return c
