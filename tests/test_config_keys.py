"""No config key that silently does nothing: k15.config.MODE_KEYS says what each mode reads,
k15.main refuses a command-line override of anything else, and the table is checked against the
keys each mode really reads on tiny settings (ConfigDict accessors patched to record them)."""

import json
import os
import random
import subprocess
import sys

import pytest
from absl import app

from configs import qwen25_1p5b_v5e, tiny_cpu
from k15 import config as k15_config
from k15 import main as k15_main

import config_recorder  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unread_override_is_an_error_naming_the_key_and_the_mode(capsys):
  config = tiny_cpu.get_config("runlocal=True")  # mode pipeline, which samples at seed=config.seed
  with pytest.raises(app.UsageError, match=r"mode 'pipeline' does not read config\.evaluate"
                                           r"\.top_p, config\.sft\.vocab_size: the override"):
    k15_main.run(config, "", {"evaluate.top_p": 0.9, "sft.vocab_size": 300, "rl.loss": "grpo",
                              "pipeline.rl_pool": 8, "model.num_layers": 3})
  # Keys read there pass; the same key is read by another mode.
  k15_main.check_overrides(config, "pipeline", {"rl.sampling.mode": "uniform", "seed": 3,
                                                "sft.optimizer.learning_rate": 1e-3})
  k15_main.check_overrides(config, "evaluate", {"evaluate.top_p": 0.9})
  # A checkpoint run has its own entry: SFT on pairs never reads the synthetic tasks' keys.
  config = qwen25_1p5b_v5e.get_config("runlocal=True")
  config.mode, config.model_path = "sft", "/nowhere"
  with pytest.raises(app.UsageError, match=r"mode 'sft:checkpoint' does not read "
                                           r"config\.sft\.families"):
    k15_main.run(config, "", {"sft.families": ("countdown",)})
  # The switch: a warning, and the run goes on (here into the missing checkpoint).
  config.unread_overrides = "warn"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    k15_main.run(config, "", {"sft.families": ("countdown",)})
  assert "warning: mode 'sft:checkpoint' does not read config.sft.families" in (
      capsys.readouterr().out)


def test_the_command_line_refuses_an_unread_override(tmp_path):
  r = subprocess.run([sys.executable, "-m", "k15.main", "--config=configs/tiny_cpu.py",
                      f"--workdir={tmp_path}", "--config.evaluate.top_p=0.9"],
                     cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0
  assert "mode 'pipeline' does not read config.evaluate.top_p" in r.stderr
  assert os.listdir(tmp_path) == []  # refused before anything ran


def test_every_table_entry_is_a_config_key():
  c = qwen25_1p5b_v5e.get_config()
  for variant, entries in k15_config.MODE_KEYS.items():
    for entry in k15_config.COMMON_KEYS + entries:
      node = c
      for part in entry.split("."):
        assert part in node, f"MODE_KEYS[{variant!r}] names {entry!r}, not a config key"
        node = node[part]


# ---------------------------------------------------------------------------------------------
# The table against what each mode reads.
# ---------------------------------------------------------------------------------------------

# Table entries that the tiny runs below leave unread because their settings take another
# branch; each says which setting reads it.
CONDITIONAL = {
    "model_cache_dir": "a remote model_path (tests/test_epath.py)",
    "unread_overrides": "an override the mode does not read (the tests above)",
    "sft.epochs": "sft.steps=0",
    "reward_options": "a response that ends within its budget (graded; a cut one scores 0)",
    "rl.routing_metrics": "a mixture-of-experts policy (tests/test_routing_replay.py)",
}


def _tiny(mode):
  c = tiny_cpu.get_config("runlocal=True")
  c.mode = mode
  c.pipeline.update(sft_examples=16, rl_pool=8, eval_problems=4, rl_prompts=4)
  c.sft.update(vocab_size=384, steps=2, batch_size=8, seq_len=128, num_examples=10,
               families=("arithmetic",))
  c.rl.update(iterations=1, max_new_tokens=16, prompts_per_iteration=2, samples_per_prompt=2,
              minibatch_groups=2)
  c.evaluate.update(num_samples=1, max_new_tokens=8, num_problems=2, families=("arithmetic",))
  c.long2short.update(
      num_prompts=4, short=dict(steps=1), rs=dict(samples=2, sft_steps=1, rounds=1,
                                                   max_new_tokens=8),
      dpo=dict(steps=1, batch_size=2, seq_len=128, checkpoint_every=1),
      rl=dict(iterations=1, max_new_tokens=8))
  return c


def _checkpoint_runs(tmp_path):
  import test_rl_mode  # pylint: disable=g-import-not-at-top
  rng = random.Random(0)
  rows = [test_rl_mode._word_problem(rng, i) for i in range(8)]  # pylint: disable=protected-access
  write = test_rl_mode._write_jsonl  # pylint: disable=protected-access
  train = write(tmp_path / "train.jsonl", rows[:6])
  evalf = write(tmp_path / "eval.jsonl", rows[6:])
  pairs = write(tmp_path / "pairs.jsonl", [{"prompt": r["question"], "response": r["answer"]}
                                           for r in rows])
  ckpt = test_rl_mode._checkpoint(tmp_path / "ckpt", "qwen2", rows)  # pylint: disable=protected-access
  for mode in ("evaluate", "sft", "curate", "rl"):
    c = test_rl_mode._config(ckpt, train, **{  # pylint: disable=protected-access
        "data.eval": evalf, "rl.iterations": 1, "evaluate.max_new_tokens": 8,
        "rl.max_new_tokens": 8, "curate.samples": 2, "curate.hackable_samples": 2,
        "curate.max_new_tokens": 0, "sft.data": pairs, "sft.steps": 2, "sft.batch_size": 8,
        "sft.seq_len": 128})
    c.mode = mode
    yield k15_config.mode_variant(mode, True), c


def _check(variant, reads):
  missing = sorted(k for k in reads if not k15_config.mode_reads(variant, k))
  assert not missing, f"mode {variant!r} reads {missing}, which MODE_KEYS[{variant!r}] lacks"
  unused = [e for e in k15_config.COMMON_KEYS + k15_config.MODE_KEYS[variant]
            if e not in CONDITIONAL
            and not any(k == e or k.startswith(e + ".") for k in reads)]
  assert not unused, f"MODE_KEYS[{variant!r}] lists {unused}, which mode {variant!r} never read"


# Several minutes on a 2-core machine: every mode runs (and compiles) once.
@pytest.mark.slow
def test_mode_keys_is_what_each_mode_reads(tmp_path):
  runs = [(m, _tiny(m), tmp_path / w) for m, w in (
      ("smoke", "smoke"), ("sft", "sft"), ("evaluate", "sft"), ("pipeline", "p"),
      ("long2short", "p"))]
  runs[2][1].evaluate.checkpoints = f"sft={tmp_path}/sft/sft_checkpoints"
  runs += [(v, c, tmp_path / f"c-{v}") for v, c in _checkpoint_runs(tmp_path)]
  seen = {}
  for variant, config, workdir in runs:
    with config_recorder.recording(config) as reads:
      k15_main.run(config, str(workdir))
    seen[variant] = sorted(reads)
  with open(tmp_path / "reads.json", "w") as f:
    json.dump(seen, f, indent=1)
  for variant, reads in seen.items():
    _check(variant, reads)
  assert set(seen) == set(k15_config.MODE_KEYS)


def test_from_file_reads_path_and_arg_as_the_config_flag_does():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  got = k15_config.from_file(os.path.join(root, "configs/qwen25_1p5b_v5e.py:runlocal=True"))
  assert got.to_dict() == qwen25_1p5b_v5e.get_config("runlocal=True").to_dict()
  assert got.to_dict() != qwen25_1p5b_v5e.get_config().to_dict()  # the arg was applied
  assert (k15_config.from_file(os.path.join(root, "configs/tiny_cpu.py")).to_dict()
          == tiny_cpu.get_config().to_dict())
  with pytest.raises(FileNotFoundError, match="configs/missing.py"):
    k15_config.from_file("configs/missing.py:runlocal=True")
