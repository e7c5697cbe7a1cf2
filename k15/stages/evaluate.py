"""Mode `evaluate` on a checkpoint: pass@1 (mean over k samples), pass@k and the greedy accuracy
on `config.data.eval` with the verifier of `config.reward`, by difficulty and by source.

    python -m k15.main --config=configs/qwen25_1p5b_v5e.py --workdir=W --config.mode=evaluate \
        --config.model_path=W/export/final --config.data.eval=EVAL.jsonl \
        --config.data.format=gsm8k --config.reward=math

Prints the table and writes W/eval.json ({"sampled": ..., "greedy": ...}, each with accuracy,
pass_at_k, mean_tokens, truncated, by_difficulty, by_source and per_problem).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from k15 import evaluate as evaluate_lib
from k15 import hf_policy, parallel, storage
from k15.model import build


def run(config: Any, workdir: str) -> dict[str, Any]:
  hf_policy.check_data_config(config, need=("eval",), reads=("eval",))
  config = hf_policy.with_checkpoint_architecture(config)
  tok = hf_policy.load_tokenizer(config.model_path, hf_policy.instruction(config))
  problems = hf_policy.load_problems(config, "eval")
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    model = build.build_model(config, mesh)
    results = hf_policy.evaluate(model, problems, tok, config)
  if jax.process_index() == 0:
    print(evaluate_lib.format_table(results))
    for name, r in results.items():
      print(f"{name}: pass@1 {100 * r['accuracy']:.1f}%, pass@{r['num_samples']} "
            f"{100 * r['pass_at_k']:.1f}% on {r['n']} problems of {config.data.eval}")
    if workdir:
      storage.write_json(os.path.join(workdir, "eval.json"), results)
  return results
