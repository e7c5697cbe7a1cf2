"""Modes on a Hugging Face checkpoint and prompt files (`config.model_path`, `config.data`).

Each module's `run(config, workdir)` is one stage, and its output is the next one's input:

  sft       long-CoT SFT on prompt/response pairs            -> W/export/sft (a checkpoint)
  curate    pass-rate difficulty, hackable filter, balance   -> W/curated.jsonl (data.format=k15)
  rl        the k1.5 RL iteration with a verifier            -> W/export/final (a checkpoint)
  evaluate  pass@1, pass@k and greedy accuracy on data.eval  -> W/eval.json
"""
