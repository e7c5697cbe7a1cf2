"""Helpers shared by the ml-collections files in configs/.

A config file's `get_config(arg)` takes a short string of structural options
(`--config=configs/tiny_cpu.py:runlocal=True,layers=4`); `parse_arg` turns it into a
ConfigDict with typed defaults, and refuses keys it does not know.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from k15 import parallel
from k15.model import transformer

# The methods k15.long2short trains and compares (§2.4), in the order of its table.
LONG2SHORT_METHODS = ("merge", "merge_rs", "shortest_rs", "dpo", "rl")


def from_file(spec: str) -> ml_collections.ConfigDict:
  """The config of 'PATH[:ARG]' (e.g. 'configs/tiny_cpu.py:runlocal=True'), as --config= reads it,
  for scripts that build a config without absl flags."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} (from {spec!r}) does not exist")
  module_spec = importlib.util.spec_from_file_location("_k15_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


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
  # A directory (local or gs://) for JAX's persistent compilation cache; "" = off. A TPU
  # program of a real-scale config takes tens of seconds to minutes to compile, and every
  # restart (preemption, a new run from a checkpoint) would pay it again; with the cache a
  # restart loads the executables. See k15.parallel.configure_compilation_cache.
  c.compilation_cache_dir = ""
  # JAX devices on the CPU backend (k15.parallel.configure_cpu_devices): 0 leaves JAX's default
  # (one device, or what XLA_FLAGS says), N > 0 asks for N, -1 for one per core of this process.
  # The CPU backend runs each device's work on its own thread, so with one device most of a
  # multi-core CPU sits idle; the accelerator backends ignore the key.
  c.cpu_devices = 0
  # A key set on the command line that the mode does not read (MODE_KEYS): 'error' | 'warn'.
  c.unread_overrides = "error"
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
      preemption_check_tokens=0,   # sample in pieces of this many new tokens and check for
                                   # preemption between them (a spot VM's notice gives ~30 s);
                                   # 0 = check only between iterations
      temperature=1.0, top_p=1.0, top_k=0,
      repeat_ngram=0,              # repeat detection: n-gram size, 0 = off
      # How the sampler batches rows: 'auto' (its default rule, sampler.use_continuous),
      # 'static' (one batch decoded until its last row ends) or 'continuous' (slots refilled as
      # rows end, over a paged KV cache). All sample the same rows; only the time differs.
      batching="auto",
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
      early_finishers="train",     # partial rollouts: a sample that finished in an earlier
                                   # iteration than its group's last: 'train' (all its tokens,
                                   # against pi_i's reference) | 'exclude' (out of the loss and
                                   # the group baseline); see k15.rl.trainer
      reference="trainer",         # PMD's pi_i log-probs: 'trainer' (its own forward pass at
                                   # the start of each iteration) | 'sampler' (as sampled)
      # Mixture of experts: route each token in the loss by the experts the sampler chose
      # (routing replay; gate weights still from the trainer's router), and measure how often
      # sampler and trainer routing disagree and the log-prob gap with and without replay
      # (two extra forward passes per iteration).
      routing_replay=False,
      routing_metrics=True,
      length_weight=0.0,           # length penalty (§2.3.3), its weight ...
      length_warmup_iterations=0,  # ... and the iteration it switches on
      repeat_penalty=0.0,          # subtracted from the reward of a looping response
      # curriculum: e.g. '0:all,20:hard' (difficulty: higher is harder; easy/medium/hard are
      # curation's buckets); success_prior_samples: n > 0 starts each prompt's success rate
      # from its curation pass rate, weighted as n samples (0 = off: every prompt starts at 0).
      sampling=dict(mode="prioritized", curriculum="", epsilon=0.0, success_prior_samples=0),
      eval_every=0,                # mode rl: evaluate on data.eval every N iterations (and at
                                   # the end); 0 = at the end only
  ), overrides)


# Prompt-file formats that k15.data.prompts reads (see there for each one's keys).
DATA_FORMATS = ("gsm8k", "math", "k15", "code")


def data_block(**overrides: Any) -> ml_collections.ConfigDict:
  """Prompt sets of the modes that start from a checkpoint (rl, evaluate): JSONL files."""
  return make_block("data", dict(
      train="",             # RL prompts
      eval="",              # held-out problems: pass@1 every rl.eval_every iterations and at the end
      format="gsm8k",       # one of DATA_FORMATS
      eval_format="",       # data.eval's format; "" = data.format
      on_error="raise",     # a malformed line: 'raise' (names file, line and key) | 'skip' (counted)
      eval_limit=0,         # evaluate the first N problems of data.eval; 0 = all
      seed=-1,              # the RL prompt order (k15.rl.trainer.data_seed); -1 = config.seed
      instruction="",       # the user turn, "{question}" replaced; "" = the reward's own
                            # (k15.rewards.verifier.INSTRUCTIONS)
  ), overrides)


def curate_block(**overrides: Any) -> ml_collections.ConfigDict:
  """Mode `curate` on a checkpoint (§2.1): difficulty by the model's pass rate, the hackable
  filter, difficulty balancing; data.train in, W/curated.jsonl (data.format=k15) out."""
  return make_block("curate", dict(
      samples=10,            # samples per prompt for the pass rate (§2.1: 10)
      temperature=1.0,       # "a relatively high sampling temperature"
      max_new_tokens=0,      # their budget; 0 = rl.max_new_tokens
      hackable_samples=8,    # answers without a chain of thought; any correct drops the prompt
                             # (math and task rewards; 0 = no filter)
      hackable_tokens=16,    # budget of such an answer, after a forced "\boxed{"
      # Shares of the easy, medium and hard buckets (difficulty 1 - pass rate below 1/3,
      # below 2/3, above) after balancing; a tuple, as a ConfigDict sorts a dict's keys.
      mix=(0.3, 0.4, 0.3),
      max_prompts=0,         # cap on the curated set; 0 = all that balancing keeps
      batch_size=64,         # prompts per sampler call
  ), overrides)


def reward_options_block(**overrides: Any) -> ml_collections.ConfigDict:
  """Settings of the verifiers that `config.reward` names (k15.rewards.verifier)."""
  return make_block("reward_options", dict(
      math_timeout_s=5.0,   # per answer; over it scores 0
      code_fraction=False,  # code: reward the share of passed tests instead of all-or-nothing
      code_timeout_s=2.0,   # code: wall clock per test
      code_memory_mb=256,   # code: address space per sandboxed process
      code_workers=0,       # code: sandboxes at once; 0 = the CPU count
  ), overrides)


def checkpoint_block(**overrides: Any) -> ml_collections.ConfigDict:
  return make_block("checkpoint", dict(every=10, keep=3), overrides)


def sft_block(**overrides: Any) -> ml_collections.ConfigDict:
  """The `sft` block of a config, with defaults for the tiny CPU model; see `train_sft`."""
  c = dict(
      seq_len=512,           # T, packed row length
      batch_size=16,         # B, packed rows per step (global, over all hosts)
      steps=0,               # optimizer steps; 0: as many as `epochs` epochs give
      epochs=1,              # used when steps == 0 (§2.2: one epoch)
      microbatches=1,        # gradient accumulation: B / microbatches rows per pass
      overlong="truncate",   # examples over seq_len: 'truncate' | 'drop'
      seed=0,                # shuffle order (per epoch) of the examples
      # §2.2 decays 2e-5 -> 2e-6 for a 7B-class model; a tiny model wants a larger rate.
      optimizer=dict(learning_rate=1e-3, warmup_steps=20, decay="cosine", decay_steps=0,
                     end_learning_rate=1e-4, b1=0.9, b2=0.95, weight_decay=0.0,
                     grad_clip=1.0),
      checkpoint_every=100,  # steps between checkpoints (and one at the end)
      checkpoint_keep=2,
      # Mode `sft` only (`run`): the data and the tokenizer.
      data="",               # JSONL of {"prompt", "response"}; "" = synthetic tasks below
      tokenizer="",          # tokenizer.model; "" = train one on the synthetic tasks
      vocab_size=512,        # of a tokenizer trained here (<= config.model.vocab_size)
      families=("arithmetic", "countdown"),
      num_examples=2000,     # per family
      difficulties=(1, 2, 3),
  )
  return make_block("sft", c, overrides)


def evaluate_block(**overrides: Any) -> ml_collections.ConfigDict:
  """The `evaluate` block of a config; see `evaluate` and `run`."""
  c = dict(
      num_samples=4,          # k responses per problem; pass@1 is their mean correctness
      temperature=1.0,        # 0: greedy (one sample per problem)
      top_p=1.0,
      max_new_tokens=512,
      batch_size=32,          # problems per sampler call (each with k rows)
      seed=0,                 # sampling seed
      # Mode `evaluate` only (`run`): the held-out problems and what to evaluate.
      families=("arithmetic", "countdown"),
      num_problems=100,       # per family, from the 'eval' split of k15.data.tasks
      difficulties=(1, 2, 3),
      problem_seed=1234,
      tokenizer="",           # tokenizer.model; "" = <workdir>/tokenizer.model
      # Comma-separated name=checkpoint_dir, e.g. "sft=DIR/sft_checkpoints,rl=DIR/checkpoints";
      # an empty dir ("base=") is the model of config.model_path, or a random one.
      checkpoints="",
      greedy=True,            # modes from a checkpoint: also the greedy accuracy (one sample)
  )
  return make_block("evaluate", c, overrides)


def pipeline_block(**overrides: Any) -> ml_collections.ConfigDict:
  """The `pipeline` block: which problems, how many, and the curation settings."""
  c = dict(
      families=("arithmetic",),
      ops=("+",),                # arithmetic operators (k15.data.tasks)
      difficulties=(2, 3, 4, 5),
      sft_examples=1000,         # per family: the long-CoT warm-up set
      sft_cot="long",            # 'long' | 'short': the warm-up ablation (short = answer only)
      # The demonstrator's habits (k15.data.tasks options; SFT data only, RL prompts and the
      # held-out set keep their right answers). sft_carry_slip: the chance that a demonstration
      # forgets a due carry and so ends at a wrong answer; SFT imitates the habit, and the
      # verifiable reward of RL is what can remove it. sft_recheck: the chance that a column
      # is restated once more, redundant tokens for long2short (§2.4) to trim.
      sft_carry_slip=0.0,
      sft_recheck=0.0,
      # Countdown, the length study's demonstrator who gives up: the most search lines a
      # demonstration writes (0: no cap) and the chance of giving up after each line that
      # misses; a search that gives up ends without an answer.
      sft_search_cap=0,
      sft_search_stop=0.0,
      rl_pool=160,               # per family: candidate RL prompts before curation
      eval_problems=64,          # per family, held out
      vocab_size=384,            # tokenizer pieces (<= model.vocab_size; 256 are byte pieces)
      max_cot_tokens=300,
      # Curation (§2.1): pass-rate difficulty over `label_samples` samples at
      # `label_temperature`, hackable filter over `hackable_samples` no-CoT answers, balance.
      curate=True,
      label_samples=10,
      label_temperature=1.0,
      hackable_samples=8,
      mix=dict(easy=0.3, medium=0.4, hard=0.3),
      rl_prompts=256,            # cap on the curated set
  )
  return make_block("pipeline", c, overrides)


def long2short_block(**overrides: Any) -> ml_collections.ConfigDict:
  """The `long2short` block, with defaults for the tiny CPU model; see `run`."""
  return make_block("long2short", dict(
      methods=LONG2SHORT_METHODS,           # which of the methods `run` trains and evaluates
      prompt_set="rl_pool",      # prompts for rejection sampling and DPO: 'rl_pool' |
                                 # 'rl_prompts' (the curated RL set) | 'sft' (train split all)
      num_prompts=256,           # cap on those prompts (0: all)
      # The short-CoT model that `merge` averages with the long one.
      short=dict(init="sft",     # 'sft': from DIR/sft (the long model's parent) | 'long'
                 # 'concise': the long CoT without its restated columns | 'answer': the
                 # boxed answer alone (a model that cannot reason, nothing to merge with)
                 demonstrations="concise",
                 steps=60, learning_rate=3e-4),
      # Response tokens each method may sample (rejection sampling over all its rounds, DPO,
      # long2short RL), so that they are compared at equal cost; 0: no budget.
      token_budget=0,
      merge_weights=(0.5, 0.5),  # (long, short); must sum to 1
      # Shortest rejection sampling: n samples per prompt, SFT on the shortest correct.
      rs=dict(samples=8, temperature=1.0,
              max_new_tokens=0,  # 0: config.rl.max_new_tokens, the long model's budget
              # The fine-tune on the shortest correct samples: `sft_epochs` passes over them,
              # at most `sft_steps` steps (0: no cap). A round under a token budget keeps a
              # few dozen examples, and a fixed 40 steps were ~80 passes over them.
              sft_steps=40, sft_epochs=8, learning_rate=3e-4,
              rounds=1),         # > 1: each round samples from the previous round's model
      # DPO on the same samples of the long model as shortest_rs.
      dpo=dict(beta=0.1, steps=60, batch_size=16,  # pairs per step
               seq_len=256,      # prompt + response; longer pairs are dropped (counted)
               # 1e-4 collapsed the tiny model in the long2short runs, 1e-5 did not
               # (docs/results.md).
               learning_rate=1e-5, warmup_steps=5, grad_clip=1.0, seed=0,
               checkpoint_every=20),
      # Long2short RL: config.rl with these overrides; the length penalty is on from
      # iteration 0 (length_warmup_iterations=0). init: the checkpoint it starts from, 'long'
      # or one of the other methods' models (e.g. 'shortest_rs': RL after rejection sampling).
      rl=dict(iterations=20, max_new_tokens=128, length_weight=1.0, init="long"),
  ), overrides)


def shrink_real_scale(c: ml_collections.ConfigDict) -> None:
  """`:runlocal=True` of the real-scale configs: a CPU-sized model of the same structure, and
  RL, evaluation and checkpoints of seconds (what tests/test_rl_mode.py runs)."""
  c.model.update(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, dtype="float32", attention_impl="reference",
                 remat="none")
  c.mesh = mesh_block(data=-1)
  c.smoke = dict(batch=8, length=32)
  # No partial rollouts: a random model writes to the budget, and with segments its first
  # iteration would finish no group to train on (k15.rl.trainer).
  c.rl.update(iterations=2, prompts_per_iteration=4, samples_per_prompt=4, max_new_tokens=32,
              segment_budget=0, minibatch_groups=2, microbatches=1, length_bucket=16,
              repeat_ngram=0, length_warmup_iterations=0, eval_every=1)
  # A random tiny model needs a rate that moves it within two iterations.
  c.optimizer.learning_rate = 1e-3
  c.checkpoint = checkpoint_block(every=1, keep=2)
  c.evaluate.update(num_samples=2, max_new_tokens=16, batch_size=4)
  c.export.dtype = ""


def study_block(**overrides: Any) -> ml_collections.ConfigDict:
  """k15.study: the held-out set and the statistics of a paired-seed study of RL arms."""
  return make_block("study", dict(
      eval_problems=192,     # per family, held out (the 'eval' split of k15.data.tasks)
      eval_samples=8,        # samples per problem at `temperature`: pass@1 is their mean ...
      pass_k=8,              # ... and pass@k (k <= eval_samples) comes from the same samples
      temperature=1.0,
      greedy=True,           # also the greedy accuracy (one more sample per problem)
      eval_seed=0,           # evaluation sampling seed: the same for every model
      bootstrap=2000,        # resamples of seeds x problems for the paired differences
      bootstrap_seed=0,
  ), overrides)


def add_run_blocks(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds every block the modes read, with defaults, so that all configs share one key set.

  Real-scale configs then override what matters for them. The defaults live here, not in the
  stage modules that read them, so that building a config imports no stage (and no orbax,
  grain or RL stack).
  """
  c.model_path = ""   # a Hugging Face checkpoint directory to start from; "" = random init
  # Where a remote model_path (gs://) is copied, once per host; "" = ~/.cache/k15/models.
  c.model_cache_dir = ""
  c.accelerator_type = ""  # e.g. 'v5p-64', read by k15.plan
  c.smoke = dict(batch=8, length=128)
  c.optimizer = optimizer_block()
  c.rl = rl_block()
  c.checkpoint = checkpoint_block()
  c.sft = sft_block()
  c.evaluate = evaluate_block()
  c.pipeline = pipeline_block()
  c.long2short = long2short_block()
  c.study = study_block()
  # Modes that start from a checkpoint on prompt files (rl, evaluate).
  c.data = data_block()
  c.curate = curate_block()
  c.reward = "math"   # the verifier: 'math' | 'code' | 'task' (k15.rewards.verifier)
  c.reward_options = reward_options_block()
  c.export = dict(dtype="")  # W/export/final's dtype; "" = config.model.param_dtype
  return c


# What each mode reads, so that a key set on the command line that the mode about to run never
# reads is refused (k15.main.check_overrides) instead of silently doing nothing. An entry is a
# dotted key, or a block for all of its keys. sft and evaluate on config.model_path are
# "<mode>:checkpoint" (rl and curate always run on one). tests/test_config_keys.py
# records what each mode reads on tiny settings and checks this table against it.
COMMON_KEYS = ("mode", "mesh", "sharding_rules", "distributed",
               "distributed_coordinator_address", "distributed_num_processes",
               "distributed_process_id", "compilation_cache_dir", "cpu_devices", "unread_overrides",
               # Every mode builds its model from these (a checkpoint fixes the architecture).
               "model", "model_path", "model_cache_dir")

# sft's keys that only mode `sft` on the synthetic tasks reads (the rest train any SFT).
_SFT_SYNTHETIC = ("sft.data", "sft.tokenizer", "sft.vocab_size", "sft.families",
                  "sft.num_examples", "sft.difficulties")
_SFT_TRAINING = tuple(f"sft.{k}" for k in sft_block().keys() if f"sft.{k}" not in _SFT_SYNTHETIC)
# The RL trainer (k15.rl.trainer); rl.eval_every is mode rl's own.
_RL_TRAINING = tuple(f"rl.{k}" for k in rl_block().keys() if k != "eval_every") + (
    "seed", "optimizer", "checkpoint", "data.seed")
# Evaluation on a checkpoint's prompt files (k15.hf_policy.evaluate).
_EVALUATE_SAMPLING = ("evaluate.num_samples", "evaluate.temperature", "evaluate.top_p",
                      "evaluate.max_new_tokens", "evaluate.batch_size", "evaluate.seed")
_CHECKPOINT_DATA = ("data.instruction", "data.on_error", "reward", "reward_options")
MODE_KEYS: dict[str, tuple[str, ...]] = {
    "smoke": ("smoke", "seed"),
    "sft": ("sft", "seed"),
    "sft:checkpoint": _SFT_TRAINING + ("sft.data", "data.instruction", "reward", "export"),
    "evaluate": ("seed",) + tuple(f"evaluate.{k}" for k in evaluate_block().keys()
                                  if k != "greedy"),
    "evaluate:checkpoint": _EVALUATE_SAMPLING + _CHECKPOINT_DATA + (
        "evaluate.greedy", "data.eval", "data.format", "data.eval_format", "data.eval_limit"),
    "curate": _CHECKPOINT_DATA + ("seed", "curate", "data.train", "data.format",
                                  "rl.max_new_tokens"),
    "rl": _RL_TRAINING + _EVALUATE_SAMPLING + _CHECKPOINT_DATA + (
        "rl.eval_every", "evaluate.greedy", "data", "export"),
    "pipeline": _SFT_TRAINING + _RL_TRAINING + ("pipeline", "evaluate.num_samples",
                                                "evaluate.temperature", "evaluate.max_new_tokens",
                                                "evaluate.batch_size"),
    "long2short": _SFT_TRAINING + _RL_TRAINING + ("long2short", "evaluate"),
}


def mode_variant(mode: str, from_checkpoint: bool) -> str:
  """The MODE_KEYS entry of `mode`: '<mode>:checkpoint' when it runs on config.model_path."""
  return f"{mode}:checkpoint" if from_checkpoint and f"{mode}:checkpoint" in MODE_KEYS else mode


def mode_reads(variant: str, key: str) -> bool:
  """Whether mode `variant` (see mode_variant) reads the dotted config key `key`."""
  for entry in COMMON_KEYS + MODE_KEYS[variant]:
    if key == entry or key.startswith(entry + "."):
      return True
  return False
