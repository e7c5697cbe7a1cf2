r"""The one entry point of k15.

    python -m k15.main --config=configs/tiny_cpu.py --workdir=/tmp/k15_tiny \
        [--config.model.num_layers=4 ...]

`config.mode` picks what runs. Every config key can be overridden on the command line; a key
that does not exist is an error (the config is locked).
"""

from __future__ import annotations

import importlib
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from k15 import config as k15_config
from k15 import parallel

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/tiny_cpu.py", "Path to an ml-collections config file[:args].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "Where outputs, checkpoints and logs go.")

# mode -> module with `run(config, workdir)`.
MODES = {
    "smoke": "k15.smoke",          # build the model, one forward pass, a report
    "sft": "k15.sft",              # long-CoT SFT (§2.2)
    "evaluate": "k15.evaluate",    # pass@1, tokens, per difficulty
    "pipeline": "k15.pipeline",    # data -> SFT -> curation -> RL -> evaluation
    "long2short": "k15.long2short",  # merge, shortest RS, DPO, long2short RL (§2.4)
    "rl": "k15.stages.rl",         # RL on a Hugging Face checkpoint and prompt files (§2.3)
    "curate": "k15.stages.curate",  # difficulty, hackable filter, balance -> a prompt file (§2.1)
}
# With config.model_path set, a mode runs on that checkpoint and the prompt files of
# config.data (k15.stages) rather than on the synthetic tasks.
CHECKPOINT_MODES = {
    "sft": "k15.stages.sft",
    "evaluate": "k15.stages.evaluate",
    "rl": "k15.stages.rl",
    "curate": "k15.stages.curate",
}


def run(config: Any, workdir: str, overrides: dict[str, Any] | None = None) -> Any:
  """Runs `config.mode`; `overrides` are the keys set on the command line (dotted -> value)."""
  overrides = overrides or {}
  if config.mode not in MODES:
    raise app.UsageError(f"config.mode={config.mode!r}; expected one of {sorted(MODES)}")
  from_checkpoint = bool(config.get("model_path")) and config.mode in CHECKPOINT_MODES
  check_overrides(config, k15_config.mode_variant(config.mode, from_checkpoint), overrides)
  parallel.configure_cpu_devices(config)  # before anything starts JAX's backends
  if config.get("model_path"):
    # The checkpoint fixes the architecture; an override on the command line must agree.
    from k15 import hf_policy  # pylint: disable=g-import-not-at-top
    config.model_path = hf_policy.staged_model_path(config)  # a gs:// checkpoint, copied here
    hf_policy.check_architecture(config.model_path, {
        k.partition(".")[2]: v for k, v in overrides.items() if k.startswith("model.")})
  parallel.maybe_initialize_distributed(config)
  parallel.configure_compilation_cache(config)
  logging.info("config:\n%s", config)
  module = CHECKPOINT_MODES[config.mode] if from_checkpoint else MODES[config.mode]
  return importlib.import_module(module).run(config, workdir)


def check_overrides(config: Any, variant: str, overrides: dict[str, Any]) -> None:
  """Refuses (config.unread_overrides='error') or warns about ('warn') a key set on the command
  line that the mode about to run never reads (k15.config.MODE_KEYS): it would do nothing."""
  unread = [k for k in sorted(overrides) if not k15_config.mode_reads(variant, k)]
  if not unread:
    return
  msg = (f"mode {variant!r} does not read {', '.join(f'config.{k}' for k in unread)}: "
         "the override would do nothing (k15.config.MODE_KEYS lists what each mode reads)")
  if config.get("unread_overrides", "error") == "warn":
    logging.warning("%s", msg)
    print(f"[k15] warning: {msg}", flush=True)
    return
  raise app.UsageError(msg + "; --config.unread_overrides=warn runs anyway")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Library INFO lines (orbax's above all) drown the progress output; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  run(_CONFIG.value, _WORKDIR.value, config_flags.get_override_values(flags.FLAGS["config"]))


if __name__ == "__main__":
  app.run(main)
