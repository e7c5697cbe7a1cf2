r"""Mode `curate` on a checkpoint (§2.1): the RL prompt set, labelled and balanced by the model.

    python -m k15.main --config=configs/qwen25_1p5b_v5e.py --workdir=W --config.mode=curate \
        --config.model_path=CKPT --config.data.train=TRAIN.jsonl --config.data.format=gsm8k \
        --config.reward=math
    python -m k15.main ... --config.mode=rl --config.data.train=W/curated.jsonl \
        --config.data.format=k15

On data.train: drop duplicates and prompts a final-answer check cannot grade; drop "hackable"
prompts, which the model answers right without a chain of thought (a response forced to open
with \boxed{} and cut after a few tokens; math and task rewards only); label each prompt's
difficulty by the model's pass rate over curate.samples samples (difficulty = 1 - pass rate,
higher is harder); balance the difficulty buckets to curate.mix. Writes W/curated.jsonl in the
k15 schema (difficulty and pass_rate filled in) and W/curation.json, what each step dropped.
A rerun reuses a finished W/curated.jsonl.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from etils import epath

from k15 import hf_policy, parallel, storage
from k15.data import prompts as prompts_lib
from k15.model import build
from k15.rewards import verifier
from k15.sampling import text

# Rewards whose answers sit in \boxed{}, so that a forced box is an answer without reasoning.
_BOXED_REWARDS = ("math", "task")


def run(config: Any, workdir: str) -> dict[str, Any]:
  if not workdir:
    raise ValueError("mode 'curate' needs --workdir")
  hf_policy.check_data_config(config, need=("train",), reads=("train",))
  path = os.path.join(workdir, "curated.jsonl")
  if epath.Path(path).exists():
    records = prompts_lib.load_jsonl(path)[0]
    return {"records": records, "path": path, "reused": True}
  config = hf_policy.with_checkpoint_architecture(config)
  c = config.curate
  tok = hf_policy.load_tokenizer(config.model_path, hf_policy.instruction(config))
  pool = hf_policy.load_problems(config, "train")
  grade = verifier.make_grader(config.reward, config.reward_options)
  grade_one = lambda record, response: float(grade([record], [response])[0])

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    model = build.build_model(config, mesh)
    policy = text.TextSampler(model, tok, max_new_tokens=c.max_new_tokens or
                              config.rl.max_new_tokens, seed=config.seed,
                              batch_size=c.batch_size)
    answer_fn = None
    if c.hackable_samples and config.reward in _BOXED_REWARDS:
      answer_fn = lambda qs, n: policy.sample(qs, n, 1.0, prefix="\\boxed{",
                                              max_new_tokens=c.hackable_tokens)
    records, report = prompts_lib.curate(
        pool, grade_fn=grade_one, answer_fn=answer_fn,
        sample_fn=lambda qs, n, t: policy.sample(qs, n, t), hackable_n=c.hackable_samples,
        difficulty_n=c.samples, temperature=c.temperature, mix=dict(zip(("easy", "medium", "hard"), c.mix)), seed=config.seed,
        batch_size=c.batch_size)
  if c.max_prompts:
    records = records[:c.max_prompts]
  if not records:
    raise ValueError(f"curation kept no prompts of {len(pool)} in {config.data.train}: {report}")
  if jax.process_index() == 0:
    prompts_lib.write_jsonl(records, path)
    storage.write_json(os.path.join(workdir, "curation.json"), report)
    print(f"[k15 curate] kept {len(records)} of {len(pool)} prompts -> {path}; {report}",
          flush=True)
  return {"records": records, "path": path, "report": report, "reused": False}
