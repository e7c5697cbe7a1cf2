r"""Mode `sft` on a checkpoint: long-CoT SFT (§2.2) on prompt/response pairs, then an export.

    python -m k15.main --config=configs/qwen25_1p5b_v5e.py --workdir=W --config.mode=sft \
        --config.model_path=CKPT --config.sft.data=PAIRS.jsonl --config.sft.steps=1000
    python -m k15.main ... --config.mode=rl --config.model_path=W/export/sft ...

PAIRS.jsonl holds {"prompt", "response"} lines. Each prompt becomes the user turn of the
checkpoint's chat template, wrapped in the instruction RL will use (`config.data.instruction`,
or the reward's own), so that SFT and RL prompts look alike; the response follows with the
end-of-turn token. Examples are packed into rows of sft.seq_len and the loss covers response
tokens only (k15.sft.train_sft). Checkpoints go to W/sft (a rerun resumes); the result is
exported to W/export/sft as a Hugging Face checkpoint for the next stage.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from k15 import hf_policy, parallel, sft, storage
from k15.model import build


def run(config: Any, workdir: str) -> dict[str, Any]:
  if not workdir:
    raise ValueError("mode 'sft' needs --workdir")
  if not config.sft.data:
    raise ValueError("mode 'sft' on a checkpoint needs --config.sft.data=PAIRS.jsonl "
                     '({"prompt", "response"} lines)')
  hf_policy.check_data_config(config, need=(), reads=())
  config = hf_policy.with_checkpoint_architecture(config)
  tok = hf_policy.load_tokenizer(config.model_path, hf_policy.instruction(config))
  examples = [tok.render_example(q, r) for q, r in sft.load_jsonl(config.sft.data)]

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    model = build.build_model(config, mesh)
    model, losses = sft.train_sft(model, examples, config.sft, mesh=mesh,
                                  workdir=os.path.join(workdir, "sft"), pad_id=tok.pad_id)
    if config.sft.steps and len(losses) < config.sft.steps:
      raise SystemExit(f"SFT stopped at step {len(losses)} of {config.sft.steps} (checkpoint "
                       "saved); rerun the same command to resume")
    export_dir = hf_policy.export(model, tok, config, os.path.join(workdir, "export", "sft"))
  report = {"examples": len(examples), "steps": len(losses),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "export": export_dir}
  if jax.process_index() == 0:
    print(f"[k15 sft] {report}", flush=True)
    storage.write_json(os.path.join(workdir, "sft.json"), dict(report, losses=losses))
  return dict(report, model=model, tokenizer=tok)
