r"""Mode `rl`: the k1.5 RL iteration on a Hugging Face checkpoint, real prompts and a verifier.

    python -m k15.main --config=configs/qwen25_1p5b_v5e.py --workdir=W --config.mode=rl \
        --config.model_path=CKPT --config.data.train=TRAIN.jsonl --config.data.eval=EVAL.jsonl \
        --config.data.format=gsm8k --config.reward=math --config.rl.iterations=N

  checkpoint (k15.hf_policy) -> the training file, each host parsing its share of the lines
     (k15.data.prompt_file); the drawn prompts rendered with the chat template, a share per host
  -> k15.rl.trainer.RLTrainer (the loop the tiny pipeline runs too), rewarded by
     k15.rewards.verifier on the decoded responses (with several hosts, each grades its share
     of them and the rewards are gathered onto every host)
  -> pass@1 and greedy accuracy on data.eval every rl.eval_every iterations and at the end
  -> W/export/final/, a Hugging Face checkpoint of the final policy

Workdir layout:

  W/rl/          trainer checkpoints, metrics.jsonl (each iteration's reward; eval/* at the
                 iterations evaluated, step 0 = the starting checkpoint), tensorboard events
  W/results.json the final evaluation, iterations run, prompt counts
  W/export/final config.json, safetensors, tokenizer files, generation_config.json

A rerun of the same command resumes from the latest trainer checkpoint; a finished run is not
trained again (its evaluation and export are redone).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from flax import nnx

from k15 import evaluate as evaluate_lib
from k15 import hf_policy, parallel, storage
from k15.model import build
from k15.rewards import verifier
from k15.rl import trainer as trainer_lib


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[k15 rl {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Runs mode `rl`; returns {"results": the final evaluation, "model": the final policy, ...}."""
  if not workdir:
    raise ValueError("mode 'rl' needs --workdir")
  hf_policy.check_data_config(config, need=("train",))
  config = hf_policy.with_checkpoint_architecture(config)
  tok = hf_policy.load_tokenizer(config.model_path, hf_policy.instruction(config))
  # Each host parses its share of the training file and reads records only as it needs them.
  train = hf_policy.open_prompt_file(config, "train", tok)
  eval_problems = hf_policy.load_problems(config, "eval") if config.data.eval else []
  grade = verifier.make_grader(config.reward, config.reward_options)
  _log(f"{len(train)} RL prompts, {len(eval_problems)} eval problems; reward {config.reward}")

  # Before the checkpoint loads: a sample past its positions is refused here.
  hf_policy.check_lengths(config, train.prompt_lengths, "rl.max_new_tokens")
  hf_policy.check_lengths(config, [len(tok.render_prompt(r.prompt)) for r in eval_problems],
                          "evaluate.max_new_tokens")

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    model = build.build_model(config, mesh)
    if tok.vocab_size > model.cfg.vocab_size:
      raise ValueError(f"the tokenizer of {config.model_path} has {tok.vocab_size} ids but the "
                       f"model's vocabulary only {model.cfg.vocab_size}")

    reward_fn = hf_policy.make_reward_fn(tok, train, grade)
    rl_dir = os.path.join(workdir, "rl")
    trainer = trainer_lib.RLTrainer(config, model, train, reward_fn, mesh=mesh,
                                    workdir=rl_dir, eos_id=tok.stop_ids, pad_id=tok.pad_id)
    every, end = config.rl.eval_every, config.rl.iterations
    if eval_problems and every and trainer.checkpointer.latest_step() is None:
      _log("evaluating the starting checkpoint")
      trainer.writer.write_scalars(0, hf_policy.eval_metrics(
          hf_policy.evaluate(model, eval_problems, tok, config)))
    del model  # the trainer holds its own copy of the parameters

    def after_iteration(t: trainer_lib.RLTrainer):
      # The last iteration's evaluation is the final one below.
      if eval_problems and every and t.iteration % every == 0 and t.iteration < end:
        return hf_policy.eval_metrics(hf_policy.evaluate(
            nnx.merge(t.graphdef, t.params), eval_problems, tok, config))
      return None

    _log(f"RL: {end} iterations of {config.rl.loss}")
    trainer.train(after_iteration=after_iteration)
    if trainer.preempted:
      raise SystemExit("preempted during RL (checkpoint saved); rerun the same command to resume")
    final = nnx.merge(trainer.graphdef, trainer.params)

    results: dict[str, Any] = {"iterations": trainer.iteration, "train_prompts": len(train),
                               "eval_problems": len(eval_problems)}
    if eval_problems:
      _log(f"evaluating the final policy on {len(eval_problems)} problems")
      ev = hf_policy.evaluate(final, eval_problems, tok, config)
      trainer.writer.write_scalars(trainer.iteration, hf_policy.eval_metrics(ev))
      trainer.writer.flush()
      for r in ev.values():
        r.pop("per_problem", None)
      results["eval"] = ev
    export_dir = hf_policy.export(final, tok, config, os.path.join(workdir, "export", "final"))
    results["export"] = export_dir

  if jax.process_index() == 0:
    if eval_problems:
      print(evaluate_lib.format_table(results["eval"]))
    storage.write_json(os.path.join(workdir, "results.json"), results)
    _log(f"exported the final policy to {export_dir}")
  return {"results": results, "model": final, "tokenizer": tok}
