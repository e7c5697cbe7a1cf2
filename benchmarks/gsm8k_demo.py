r"""RL learns on real-format data: one-step word problems in GSM8K's format, a tiny model.

    python -m benchmarks.gsm8k_demo --workdir=/tmp/k15_gsm8k_demo [--seed=0]

What it does, all from the command line contract of k15.main (the same commands a real
checkpoint and the real GSM8K files take):
  1. writes synthetic one-step problems ("Tom has 7 apples and buys 5 more. How many apples
     does Tom have now?", answer "7 + 5 = 12\n#### 12") as GSM8K train/test JSONL, and SFT
     pairs (prompt, "7 + 5 = 12. The answer is \boxed{12}.") from part of the train split,
     by a careless demonstrator: in --slip of them (0.6) it writes its --habit, by default
     adding where the question takes away ("9 + 4 = 13" for "has 9, gives away 4"), as the
     tiny reproduction's demonstrator forgets carries. The rewards and the held-out answers
     are right. With --slip=0 the demonstrations are clean;
  2. trains a byte-level BPE tokenizer with a ChatML template and writes a random tiny Qwen2
     checkpoint with transformers (offline);
  3. `mode=sft` on the pairs;
  4. `mode=rl` with `reward=math` from W/sft/export/sft on the train split, evaluated on the
     test split before RL (step 0), every --eval_every iterations and at the end.
Further --config.* arguments go to the RL command as they are.
Prints and writes W/<rl_dir>_summary.json: eval pass@1 and greedy accuracy after SFT (RL step 0)
and after RL, and the training reward over the first and last iterations. A rerun in the same
workdir reuses the SFT model, so RL variants (--rl_dir, --rl_lr, --prompts) share one start.
Figures and what they show: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/qwen25_1p5b_v5e.py:runlocal=True"

NAMES = ("Tom", "Ana", "Ben", "Mia", "Sam", "Lea", "Max", "Zoe")
ITEMS = ("apples", "pens", "books", "cards", "coins", "shells")


def problem(rng: random.Random) -> dict[str, str]:
  """One word problem: an addition or a subtraction of two numbers from 1 to 9."""
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  a, b = rng.randint(1, 9), rng.randint(1, 9)
  if rng.random() < 0.5:
    q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    step, ans = f"{a} + {b} = {a + b}", a + b
  else:
    a, b = max(a, b), min(a, b)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
    step, ans = f"{a} - {b} = {a - b}", a - b
  return {"question": q, "answer": f"{step}\n#### {ans}"}


HABITS = ("carry", "operation")


def response(row: dict[str, str], slip: str = "") -> str:
  """The demonstration of a problem, or with `slip` a careless one: 'carry' drops the carry of
  an addition (7 + 5 = 2), 'operation' adds where the question takes away (9 - 4 written as
  9 + 4 = 13). Problems the habit does not touch are demonstrated correctly either way."""
  step, ans = row["answer"].split("\n#### ")
  a, op, b = step.split(" = ")[0].split(" ")
  if slip == "carry" and op == "+" and int(ans) >= 10:
    ans = str(int(ans) - 10)
  elif slip == "operation" and op == "-":
    op, ans = "+", str(int(a) + int(b))
  elif slip and slip not in HABITS:
    raise ValueError(f"unknown habit {slip!r}; valid: {', '.join(HABITS)}")
  return f"{a} {op} {b} = {ans}. The answer is \\boxed{{{ans}}}."


def write_jsonl(path: str, rows: list[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def make_data(d: str, seed: int, n_train: int, n_eval: int, n_sft: int,
              slip: float, habit: str) -> dict[str, str]:
  rng = random.Random(seed)
  seen, rows = set(), []
  while len(rows) < n_train + n_eval:  # train and test share no question
    r = problem(rng)
    if r["question"] not in seen:
      seen.add(r["question"])
      rows.append(r)
  train, test = rows[:n_train], rows[n_train:]
  # The careless demonstrator: a fixed share of the SFT pairs, drawn from their own stream so
  # that the problems are the same at every slip rate.
  slip_rng = random.Random(seed + 1)
  pairs = [{"prompt": r["question"],
            "response": response(r, habit if slip_rng.random() < slip else "")}
           for r in train[:n_sft]]
  return {"train": write_jsonl(os.path.join(d, "train.jsonl"), train),
          "eval": write_jsonl(os.path.join(d, "test.jsonl"), test),
          "pairs": write_jsonl(os.path.join(d, "pairs.jsonl"), pairs),
          "texts": [r["question"] + "\n" + response(r) for r in rows]}


def make_checkpoint(d: str, texts: list[str], seed: int, width: int, layers: int) -> str:
  """A random tiny Qwen2 with a byte-level BPE tokenizer and ChatML template (offline)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from k15 import hf_tokenizer  # pylint: disable=g-import-not-at-top
  from k15.rewards import verifier  # pylint: disable=g-import-not-at-top
  instruction = verifier.INSTRUCTIONS["math"]
  tok = hf_tokenizer.train_bpe([instruction.replace("{question}", t) for t in texts], d,
                               vocab_size=512)
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(
      vocab_size=512, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True)
  model = transformers.Qwen2ForCausalLM(cfg)
  model.generation_config.eos_token_id = [tok.eos_id, tok.pad_id]
  model.save_pretrained(d)
  return d


def kind(question: str, answer: str) -> str:
  """The problem's kind: what each careless habit touches."""
  if "gives away" in question:
    return "subtract"
  return "add_carry" if int(answer) >= 10 else "add"


def accuracy_by_kind(model_dir: str, test_path: str, samples: int = 8) -> dict[str, float]:
  """pass@1 over `samples` samples at T = 1 and greedy accuracy of an exported checkpoint on the
  test split, per kind of problem: where RL's change is, beside the demo's overall figures."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from k15 import hf_policy, parallel  # pylint: disable=g-import-not-at-top
  from k15 import config as k15_config  # pylint: disable=g-import-not-at-top
  from k15.model import build  # pylint: disable=g-import-not-at-top
  c = k15_config.from_file(os.path.join(ROOT, CONFIG))
  c.model_path, c.data.eval, c.data.format, c.reward = model_dir, test_path, "gsm8k", "math"
  c.evaluate.update(num_samples=samples, max_new_tokens=32, batch_size=64)
  c = hf_policy.with_checkpoint_architecture(c)
  tok = hf_policy.load_tokenizer(c.model_path, hf_policy.instruction(c))
  problems = hf_policy.load_problems(c, "eval")
  mesh = parallel.make_mesh(c.mesh)
  with parallel.use_mesh(mesh, c.sharding_rules):
    ev = hf_policy.evaluate(build.build_model(c, mesh), problems, tok, c)
  out: dict[str, float] = {}
  for k in ("add", "add_carry", "subtract"):
    idx = [i for i, p in enumerate(problems) if kind(p.prompt, p.answer) == k]
    for name, r in (("pass_at_1", ev["sampled"]), ("greedy", ev["greedy"])):
      out[f"{k}_{name}"] = float(np.mean([r["per_problem"][i]["accuracy"] for i in idx]))
    out[f"{k}_n"] = len(idx)
  return out


def k15_main(log: str, *args: str) -> None:
  cmd = [sys.executable, "-m", "k15.main", f"--config={CONFIG}", *args]
  print("$", " ".join(cmd[1:]), flush=True)
  t = time.time()
  with open(log, "w") as f:
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=f,
                       stderr=subprocess.STDOUT, check=False)
  if r.returncode:
    sys.exit(f"failed ({r.returncode}); see {log}")
  print(f"  {time.time() - t:.0f} s, log {log}", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--train", type=int, default=512, help="RL prompts (GSM8K train split)")
  p.add_argument("--eval", type=int, default=128, help="held-out problems")
  p.add_argument("--sft_pairs", type=int, default=256)
  p.add_argument("--sft_steps", type=int, default=400)
  p.add_argument("--slip", type=float, default=0.6,
                 help="share of the SFT demonstrations made by a careless demonstrator")
  p.add_argument("--habit", default="operation", choices=HABITS,
                 help="the careless demonstrator's habit (see `response`)")
  p.add_argument("--rl_iterations", type=int, default=32)
  p.add_argument("--eval_every", type=int, default=16)
  p.add_argument("--rl_lr", type=float, default=1e-4)
  p.add_argument("--prompts", type=int, default=64, help="RL prompts per iteration (x 8 samples)")
  p.add_argument("--length_weight", type=float, default=0.0,
                 help="the length penalty's weight (§2.3.3); off by default: this demo asks "
                      "whether the task reward rises, and at 32 new tokens the penalty alone "
                      "pays for shorter, wrong answers")
  p.add_argument("--rl_dir", default="rl", help="W/<rl_dir>: RL variants from one SFT model")
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  args, rl_overrides = p.parse_known_args()
  if any(not a.startswith("--config.") for a in rl_overrides):
    p.error(f"unknown arguments {rl_overrides}: only --config.* overrides pass through (to RL)")
  if not 0 <= args.slip <= 1:
    p.error(f"--slip={args.slip} is a share of the demonstrations: give a value in [0, 1]")

  w = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(w, "ckpt"), exist_ok=True)
  t0 = time.time()
  data = make_data(w, args.seed, args.train, args.eval, args.sft_pairs, args.slip,
                   args.habit)
  ckpt = make_checkpoint(os.path.join(w, "ckpt"), data["texts"], args.seed, args.width,
                         args.layers)
  common = ["--config.reward=math"]
  if os.path.exists(os.path.join(w, "sft", "export", "sft", "config.json")):
    print(f"reusing the SFT model in {w}/sft/export/sft")
  else:
    k15_main(os.path.join(w, "sft.log"), f"--workdir={w}/sft", "--config.mode=sft",
             f"--config.model_path={ckpt}", f"--config.sft.data={data['pairs']}",
             f"--config.sft.steps={args.sft_steps}", "--config.sft.batch_size=16",
             "--config.sft.seq_len=128", "--config.sft.optimizer.learning_rate=3e-3",
             "--config.sft.optimizer.warmup_steps=5", f"--config.sft.seed={args.seed}", *common)
  rl = os.path.join(w, args.rl_dir)
  k15_main(f"{rl}.log", f"--workdir={rl}", "--config.mode=rl",
           f"--config.model_path={w}/sft/export/sft", f"--config.data.train={data['train']}",
           f"--config.data.eval={data['eval']}", f"--config.rl.iterations={args.rl_iterations}",
           f"--config.rl.eval_every={args.eval_every}", f"--config.rl.prompts_per_iteration={args.prompts}",
           "--config.rl.samples_per_prompt=8", "--config.rl.max_new_tokens=32",
           f"--config.rl.minibatch_groups={max(1, args.prompts // 4)}",  # 4 steps per iteration
           # Uniform, not the config's prioritized sampling: under prioritized sampling the
           # batches move to the prompts the model fails, so the training reward falls while
           # the policy improves; uniform draws keep it an estimate of training accuracy.
           "--config.rl.sampling.mode=uniform",
           f"--config.optimizer.learning_rate={args.rl_lr}",
           "--config.evaluate.num_samples=4", "--config.evaluate.max_new_tokens=32",
           "--config.evaluate.batch_size=32", "--config.checkpoint.every=10",
           f"--config.rl.length_weight={args.length_weight}",
           "--config.data.format=gsm8k", f"--config.seed={args.seed}", *common, *rl_overrides)

  rows = [json.loads(l) for l in open(os.path.join(rl, "rl", "metrics.jsonl"))]
  rewards = [r["rl/task_reward"] for r in sorted(rows, key=lambda r: r["step"])
             if "rl/task_reward" in r]
  evals = {r["step"]: r for r in rows if "eval/pass_at_1" in r}
  first, last = evals[min(evals)], evals[max(evals)]
  k = max(1, len(rewards) // 5)
  summary = {
      "seed": args.seed, "minutes": round((time.time() - t0) / 60, 1),
      "sft_pass_at_1": first["eval/pass_at_1"], "rl_pass_at_1": last["eval/pass_at_1"],
      "sft_greedy": first.get("eval/greedy_accuracy"), "rl_greedy": last.get("eval/greedy_accuracy"),
      "eval_curve": {s: round(evals[s]["eval/pass_at_1"], 3) for s in sorted(evals)},
      f"train_reward_first_{k}": sum(rewards[:k]) / k,
      f"train_reward_last_{k}": sum(rewards[-k:]) / k,
      "train_reward": [round(x, 3) for x in rewards], "args": vars(args),
      "rl_overrides": rl_overrides}
  summary["by_kind"] = {"sft": accuracy_by_kind(f"{w}/sft/export/sft", data["eval"]),
                        "rl": accuracy_by_kind(f"{rl}/export/final", data["eval"])}
  with open(f"{rl}_summary.json", "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps({k: v for k, v in summary.items() if k != "train_reward"}, indent=1))


if __name__ == "__main__":
  main()
