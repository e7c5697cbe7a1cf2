"""Mode `rl` from the command line: a tiny Hugging Face checkpoint, GSM8K-format files, the math
verifier, evaluation, export; and the errors for bad input."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from k15 import hf_policy, hf_tokenizer  # pylint: disable=g-import-not-at-top
from k15.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
from k15.stages import rl as rl_run  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/qwen25_1p5b_v5e.py:runlocal=True"


def _word_problem(rng: random.Random, i: int) -> dict:
  a, b = rng.randint(2, 30), rng.randint(2, 30)
  if i % 2:
    return {"question": f"Ana has {a} apples and buys {b} more. How many apples now?",
            "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
  return {"question": f"A box holds {a} pens. How many pens are in {b} boxes?",
          "answer": f"{a} * {b} = {a * b}\n#### {a * b}"}


def _write_jsonl(path, rows) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("gsm8k")
  rng = random.Random(0)
  rows = [_word_problem(rng, i) for i in range(16)]
  return {"rows": rows, "train": _write_jsonl(d / "train.jsonl", rows[:12]),
          "eval": _write_jsonl(d / "test.jsonl", rows[12:])}


def _checkpoint(directory, family: str, rows, texts=None, vocab_size=300) -> str:
  """A random tiny checkpoint written by transformers, with a byte-level BPE tokenizer and
  ChatML template trained offline (on `texts`, default the GSM8K-format `rows`); its vocabulary
  padded beyond the tokenizer's, as Qwen2.5's."""
  texts = texts or [r["question"] + "\n" + r["answer"] for r in rows]
  tok = hf_tokenizer.train_bpe(texts, directory, vocab_size=vocab_size)
  common = dict(vocab_size=vocab_size + 20, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6)
  torch.manual_seed(0)
  if family == "qwen2":
    cfg = transformers.Qwen2Config(rope_theta=1e6, tie_word_embeddings=True, **common)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(rope_theta=1e4, tie_word_embeddings=False, head_dim=16,
                                   **common)
    model = transformers.LlamaForCausalLM(cfg)
  model.generation_config.eos_token_id = [tok.eos_id, tok.pad_id]
  model.save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory, data):
  return _checkpoint(tmp_path_factory.mktemp("qwen2_tiny"), "qwen2", data["rows"])


def _main(*args):
  return subprocess.run([sys.executable, "-m", "k15.main", *args], cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                        timeout=900)


def _contract_args(workdir, ckpt, data, iterations=2):
  return [f"--config={CONFIG}", f"--workdir={workdir}", "--config.mode=rl",
          f"--config.model_path={ckpt}", f"--config.data.train={data['train']}",
          f"--config.data.eval={data['eval']}", "--config.data.format=gsm8k",
          "--config.reward=math", f"--config.rl.iterations={iterations}"]


def _logits_k15(model, tokens):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return np.asarray(model(jnp.asarray(tokens)))


def _check_run(workdir, ckpt, iterations):
  from k15 import checkpoint  # pylint: disable=g-import-not-at-top
  from k15.model import hf  # pylint: disable=g-import-not-at-top
  # Each iteration's reward, and the evaluation at the start, after each iteration and at the end.
  rows = [json.loads(l) for l in open(os.path.join(workdir, "rl", "metrics.jsonl"))]
  rewards = {r["step"]: r["rl/reward"] for r in rows if "rl/reward" in r}
  assert sorted(rewards) == list(range(1, iterations + 1))
  assert all(np.isfinite(v) for v in rewards.values())  # the verifier's, less length penalties
  assert all(0.0 <= r["rl/task_reward"] <= 1.0 for r in rows if "rl/reward" in r)
  evals = sorted(r["step"] for r in rows if "eval/pass_at_1" in r)
  assert evals == list(range(0, iterations + 1))
  assert all("eval/greedy_accuracy" in r for r in rows if "eval/pass_at_1" in r)
  results = json.load(open(os.path.join(workdir, "results.json")))
  assert results["iterations"] == iterations and results["eval_problems"] == 4

  # W/export/final loads in transformers with the logits of k15's final parameters (the
  # trainer's last checkpoint), which differ from the starting checkpoint's.
  export = os.path.join(workdir, "export", "final")
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "generation_config.json"} <= set(os.listdir(export))
  tok = transformers.AutoTokenizer.from_pretrained(export)
  src_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
  text = "<|im_start|>user\nAna has 3 apples.<|im_end|>\n<|im_start|>assistant\n"
  assert tok.encode(text) == src_tok.encode(text)
  assert tok.chat_template == src_tok.chat_template
  tokens = np.asarray([src_tok.encode(text)], np.int64)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = theirs(torch.tensor(tokens)).logits.numpy()
  # The run's layout: the config scans its layers, so its checkpoints hold stacked layers.
  start = hf.load(ckpt, config_overrides={"attention_impl": "reference", "scan_layers": True})
  final = checkpoint.restore_params(start, os.path.join(workdir, "rl", "checkpoints"))
  ours = _logits_k15(final, tokens)
  assert np.abs(ours - theirs).max() <= 1e-4
  assert np.abs(_logits_k15(start, tokens) - ours).max() > 1e-3  # RL moved the weights


# About a minute each on a 2-core machine, most of it compiling the sampler and train step.
@pytest.mark.slow
def test_rl_mode_end_to_end_qwen2(tmp_path, qwen_ckpt, data):
  r = _main(*_contract_args(tmp_path, qwen_ckpt, data))
  assert r.returncode == 0, r.stderr[-4000:]
  _check_run(str(tmp_path), qwen_ckpt, 2)
  assert json.load(open(tmp_path / "export" / "final" / "config.json"))["architectures"] == [
      "Qwen2ForCausalLM"]


@pytest.mark.slow
def test_rl_mode_end_to_end_llama_and_resume(tmp_path, tmp_path_factory, data):
  ckpt = _checkpoint(tmp_path_factory.mktemp("llama_tiny"), "llama", data["rows"])
  r = _main(*_contract_args(tmp_path, ckpt, data))
  assert r.returncode == 0, r.stderr[-4000:]
  _check_run(str(tmp_path), ckpt, 2)
  assert json.load(open(tmp_path / "export" / "final" / "config.json"))["architectures"] == [
      "LlamaForCausalLM"]
  # A rerun with more iterations resumes from the trainer's checkpoint: one more, not three.
  r = _main(*_contract_args(tmp_path, ckpt, data, iterations=3))
  assert r.returncode == 0, r.stderr[-4000:]
  rows = [json.loads(l) for l in open(tmp_path / "rl" / "metrics.jsonl")]
  assert sorted(r["step"] for r in rows if "rl/reward" in r) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Clear errors, before anything slow starts.
# ---------------------------------------------------------------------------------------------

def _config(ckpt, train, **updates):
  from configs import qwen25_1p5b_v5e  # pylint: disable=g-import-not-at-top
  c = qwen25_1p5b_v5e.get_config("runlocal=True")
  c.model_path, c.data.train, c.data.format, c.reward = ckpt, train, "gsm8k", "math"
  for key, value in updates.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def test_malformed_line_names_file_line_and_field(tmp_path, qwen_ckpt, data):
  rows = data["rows"]
  bad = _write_jsonl(tmp_path / "bad.jsonl",
                     [rows[0], rows[1], {"question": "How many?", "answer": 7}])
  with pytest.raises(prompts_lib.PromptFormatError, match=r"bad\.jsonl:3: key 'answer'"):
    rl_run.run(_config(qwen_ckpt, bad), str(tmp_path / "w"))
  broken = _write_jsonl(tmp_path / "broken.jsonl", [rows[0], '{"question": "x", "answer'])
  with pytest.raises(prompts_lib.PromptFormatError, match=r"broken\.jsonl:2: invalid JSON"):
    rl_run.run(_config(qwen_ckpt, broken), str(tmp_path / "w"))
  # ... or skipped and counted.
  records = hf_policy.load_problems(_config(qwen_ckpt, bad, **{"data.on_error": "skip"}), "train")
  assert len(records) == 2


def test_missing_field_is_named(tmp_path, qwen_ckpt, data):
  path = _write_jsonl(tmp_path / "missing.jsonl", [data["rows"][0], {"question": "How many?"}])
  with pytest.raises(prompts_lib.PromptFormatError,
                     match=r"missing\.jsonl:2: missing key\(s\) \['answer'\]"):
    rl_run.run(_config(qwen_ckpt, path), str(tmp_path / "w"))


def test_lengths_past_max_position_embeddings_are_refused(tmp_path, qwen_ckpt, data,
                                                         monkeypatch):
  from k15.model import build  # pylint: disable=g-import-not-at-top
  from k15.model import hf  # pylint: disable=g-import-not-at-top
  def no_model(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the lengths were checked")
  monkeypatch.setattr(build, "build_model", no_model)
  # The tiny checkpoint has max_position_embeddings=512; its prompts are a few dozen tokens.
  for key in ("rl.max_new_tokens", "evaluate.max_new_tokens"):
    config = _config(qwen_ckpt, data["train"], **{"data.eval": data["eval"], key: 600})
    with pytest.raises(hf.CheckpointError) as e:
      rl_run.run(config, str(tmp_path / "w"))
    msg = str(e.value)
    assert "config.json" in msg and f"config.{key}=600" in msg
    assert "max_position_embeddings=512" in msg and '"type": "yarn"' in msg
    assert '"factor": 2.0' in msg and '"original_max_position_embeddings": 512' in msg

  raw = json.load(open(os.path.join(qwen_ckpt, "config.json")))
  assert hf.position_limit(raw) == (512, "max_position_embeddings=512")
  hf.check_positions(raw, 512, "it")  # the limit itself is allowed
  # YaRN as Qwen2.5's model card sets it (max_position_embeddings unchanged) extends the limit.
  yarn = dict(raw, rope_scaling={"type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 512})
  yarn.pop("rope_parameters", None)
  limit, why = hf.position_limit(yarn)
  assert limit == 2048 and "original_max_position_embeddings=512" in why and "4.0" in why
  hf.check_positions(yarn, 2048, "it")
  with pytest.raises(hf.CheckpointError, match=r"it = 2049 positions, past the 2048.*YaRN.*"
                     r'"factor": 8.0'):
    hf.check_positions(yarn, 2049, "it")


def test_unknown_format_and_reward_list_the_known_ones(tmp_path, qwen_ckpt, data):
  with pytest.raises(ValueError, match=r"data.format='gsm9k'.*'gsm8k', 'math', 'k15', 'code'"):
    rl_run.run(_config(qwen_ckpt, data["train"], **{"data.format": "gsm9k"}), str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown reward 'maths'.*'math', 'code', 'task'"):
    rl_run.run(_config(qwen_ckpt, data["train"], reward="maths"), str(tmp_path))


def test_checkpoint_without_tokenizer_files(tmp_path, qwen_ckpt, data):
  bare = tmp_path / "bare"
  bare.mkdir()
  for f in ("config.json", "model.safetensors"):
    (bare / f).write_bytes(open(os.path.join(qwen_ckpt, f), "rb").read())
  with pytest.raises(FileNotFoundError, match=r"bare has no tokenizer files"):
    rl_run.run(_config(str(bare), data["train"]), str(tmp_path / "w"))


@pytest.mark.slow  # loads and refuses several checkpoints: ~50 s on 2 cores
def test_checkpoint_path_errors(tmp_path, data):
  # A remote checkpoint is staged (tests/test_epath.py); one that cannot be read is named.
  with pytest.raises(OSError, match=r"config.model_path=gs://b/ckpt: cannot read it"):
    rl_run.run(_config("gs://b/ckpt", data["train"]), str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"model_path=.*nowhere: not a directory"):
    rl_run.run(_config(str(tmp_path / "nowhere"), data["train"]), str(tmp_path))
  with pytest.raises(ValueError, match=r"needs --config.model_path"):
    rl_run.run(_config("", data["train"]), str(tmp_path))


def test_architecture_key_contradicting_config_json(tmp_path, qwen_ckpt, data):
  # The config file's own architecture keys give way to the checkpoint's ...
  from configs import qwen25_1p5b_v5e  # pylint: disable=g-import-not-at-top
  config = hf_policy.with_checkpoint_architecture(_config(qwen_ckpt, data["train"]))
  assert config.model.vocab_size == 320 and config.model.embed_dim == 64
  assert qwen25_1p5b_v5e.get_config("runlocal=True").model.vocab_size == 512
  hf_policy.check_architecture(qwen_ckpt, {"num_layers": 2, "dtype": "bfloat16"})
  # ... but one given on the command line must agree with config.json.
  with pytest.raises(ValueError, match=r"config.model.num_layers=3 contradicts .*config.json, "
                                       r"which gives num_layers=2"):
    hf_policy.check_architecture(qwen_ckpt, {"num_layers": 3})
  r = _main(*_contract_args(tmp_path, qwen_ckpt, data), "--config.model.qkv_bias=False")
  assert r.returncode != 0
  assert "config.model.qkv_bias=False contradicts" in r.stderr and "qkv_bias=True" in r.stderr


# ---------------------------------------------------------------------------------------------
# The other stages on a checkpoint, and their composition.
# ---------------------------------------------------------------------------------------------

def _stage_config(ckpt, data, mode, **updates):
  c = _config(ckpt, data["train"], **updates)
  c.mode = mode
  c.data.eval = data["eval"]
  return c


def test_evaluate_mode_on_an_exported_checkpoint(tmp_path, qwen_ckpt, data):
  from k15 import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from k15 import parallel  # pylint: disable=g-import-not-at-top
  from k15.model import hf  # pylint: disable=g-import-not-at-top
  from k15.rewards import verifier  # pylint: disable=g-import-not-at-top
  from k15.stages import evaluate as evaluate_stage  # pylint: disable=g-import-not-at-top
  config = _stage_config(qwen_ckpt, data, "evaluate", **{"evaluate.max_new_tokens": 8})
  tok = hf_policy.load_tokenizer(qwen_ckpt, hf_policy.instruction(config))
  with parallel.use_mesh(parallel.make_mesh({"data": -1}), config.sharding_rules):
    model = hf.load(qwen_ckpt, config_overrides={"attention_impl": "reference",
                                                 "scan_layers": config.model.scan_layers})
    export = hf_policy.export(model, tok, config, str(tmp_path / "export" / "final"))
    problems = hf_policy.load_problems(config, "eval")
    grade = verifier.make_grader("math", config.reward_options)
    direct = evaluate_lib.evaluate(
        model, problems, tokenizer=tok, grade_fn=lambda p, t: float(grade([p], [t])[0]),
        num_samples=2, temperature=1.0, max_new_tokens=8, seed=0, batch_size=4)

  config.model_path = export
  results = evaluate_stage.run(config, str(tmp_path / "w"))
  saved = json.load(open(tmp_path / "w" / "eval.json"))
  assert set(saved) == {"sampled", "greedy"}
  # The exported checkpoint samples what the model it was exported from samples.
  s = results["sampled"]
  assert s["mean_tokens"] == direct["mean_tokens"] and s["accuracy"] == direct["accuracy"]
  assert [p["mean_tokens"] for p in s["per_problem"]] == [
      p["mean_tokens"] for p in direct["per_problem"]]
  assert s["num_samples"] == 2 and results["greedy"]["num_samples"] == 1
  assert s["pass_at_k"] >= s["accuracy"] and s["by_source"]["gsm8k"]["n"] == 4


CODE_ROWS = [
    {"id": "add", "prompt": "Read two integers and print their sum.",
     "tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12\n"}]},
    {"id": "double", "prompt": "Write double(x) that returns 2 * x.",
     "tests": "assert double(2) == 4\nassert double(-3) == -6\n"},
]
GOOD = {"add": "Sum them.\n```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "double": "```python\ndef double(x):\n  print('debug')\n  return 2 * x\n```"}
HOSTILE = [
    # A fork flood, then the right answer.
    "```python\nimport os\nfor _ in range(10000):\n  try:\n    os.fork()\n  except OSError:\n"
    "    pass\na, b = map(int, input().split())\nprint(a + b)\n```",
    # The network.
    "```python\nimport socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n"
    "a, b = map(int, input().split())\nprint(a + b)\n```",
    # A file write outside the sandbox.
    "```python\nopen('/tmp/k15_hostile_was_here', 'w').write('x')\n"
    "a, b = map(int, input().split())\nprint(a + b)\n```",
]


def test_code_reward_through_the_rl_path(tmp_path, qwen_ckpt, sandbox):
  """data.format=code, reward=code: file -> records -> token ids -> decode -> sandbox -> reward."""
  del sandbox
  from k15.rewards import verifier  # pylint: disable=g-import-not-at-top
  path = _write_jsonl(tmp_path / "code.jsonl", CODE_ROWS)
  config = _config(qwen_ckpt, path, **{"data.format": "code", "reward": "code"})
  records = hf_policy.load_problems(config, "train")
  tok = hf_policy.load_tokenizer(qwen_ckpt, hf_policy.instruction(config))
  assert "```python" in tok.prompt_text(records[0].prompt)
  reward_fn = hf_policy.make_reward_fn(
      tok, records, verifier.make_grader("code", config.reward_options))
  ids = lambda text: np.asarray(tok.encode(text) + [tok.eos_id])
  good = reward_fn([0, 1], [ids(GOOD["add"]), ids(GOOD["double"])])
  assert list(good) == [1.0, 1.0]
  if os.path.exists("/tmp/k15_hostile_was_here"):
    os.unlink("/tmp/k15_hostile_was_here")
  bad = reward_fn([0] * len(HOSTILE), [ids(h) for h in HOSTILE])
  assert list(bad) == [0.0] * len(HOSTILE)
  assert not os.path.exists("/tmp/k15_hostile_was_here")
  # An early exit skips the asserts; wrong code, no code block and a cut-off block score 0.
  tricks = ["```python\nimport sys\nsys.exit(0)\n```", "```python\ndef double(x):\n  return x\n```",
            "def double(x): return 2 * x", "```python\ndef double(x):\n  return 2 * x\n"]
  assert list(reward_fn([1] * 4, [ids(t) for t in tricks])) == [0.0] * 4
  # The share of passed tests, by option.
  half = "```python\nprint(3)\n```"
  assert reward_fn([0], [ids(half)])[0] == 0.0
  config.reward_options.code_fraction = True
  partial = hf_policy.make_reward_fn(tok, records,
                                     verifier.make_grader("code", config.reward_options))
  assert partial([0], [ids(half)])[0] == 0.5


@pytest.mark.slow
def test_sft_then_curate_then_rl_then_evaluate(tmp_path, qwen_ckpt, data):
  """The stages compose through files: W/export/sft -> W/curated.jsonl -> W/export/final."""
  from k15.stages import curate, evaluate as evaluate_stage, sft  # pylint: disable=g-import-not-at-top
  pairs = [{"prompt": r["question"], "response": r["answer"].replace(
      "\n#### ", ". The answer is \\boxed{") + "}."} for r in data["rows"][:12]]
  sft_data = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
  w = str(tmp_path / "w")
  report = sft.run(_stage_config(qwen_ckpt, data, "sft", **{
      "sft.data": sft_data, "sft.steps": 4, "sft.batch_size": 8, "sft.seq_len": 256}), w)
  assert report["steps"] == 4 and report["final_loss"] < report["first_loss"]
  sft_ckpt = os.path.join(w, "export", "sft")
  assert transformers.AutoTokenizer.from_pretrained(sft_ckpt).chat_template

  out = curate.run(_stage_config(sft_ckpt, data, "curate", **{
      "curate.samples": 2, "curate.hackable_samples": 2, "curate.max_new_tokens": 16}), w)
  curated = prompts_lib.load_prompts(out["path"], "k15")[0]
  assert curated and all(r.pass_rate is not None and r.difficulty == 1 - r.pass_rate
                         for r in curated)
  report = json.load(open(os.path.join(w, "curation.json")))
  assert report["input"] == 12 and report["output"] == len(curated)
  # Buckets named in order of difficulty (a random model solves nothing: all hard).
  assert set(report["buckets"]) == {"hard"}

  c = _stage_config(sft_ckpt, data, "rl", **{"data.format": "k15", "data.eval_format": "gsm8k",
                                               "rl.iterations": 1})
  c.data.train = out["path"]
  rl_out = rl_run.run(c, w)
  assert rl_out["results"]["train_prompts"] == len(curated)
  final = os.path.join(w, "export", "final")
  ev = evaluate_stage.run(_stage_config(final, data, "evaluate"), str(tmp_path / "ev"))
  assert ev["sampled"]["n"] == 4


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_hold_the_batches_of_one(tmp_path, qwen_ckpt, data):
  """mode=rl on two local processes (jax.distributed, 4 devices each), each reading its share of
  the prompt file, draws the prompts and computes the rewards that one process with 8 devices
  does, iteration by iteration."""
  def launch(workdir, devices, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen(
        [sys.executable, "-m", "k15.main", *_contract_args(workdir, qwen_ckpt, data), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  port = _free_port()
  multi = [launch(tmp_path / "multi", 4, "--config.distributed=True",
                  f"--config.distributed_coordinator_address=127.0.0.1:{port}",
                  "--config.distributed_num_processes=2",
                  f"--config.distributed_process_id={i}") for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in multi]
  for p, log in zip(multi, logs):
    assert p.returncode == 0, log[-4000:]
  # Each host parsed its half of the 12 training lines (k15.data.prompt_file).
  for i, (log, share) in enumerate(zip(logs, ("[0, 6)", "[6, 12)"))):
    assert f"[k15 host {i}/2] {data['train']}: parsed its share, non-blank lines {share}" in log
  single = launch(tmp_path / "single", 8)
  log = single.communicate(timeout=900)[0]
  assert single.returncode == 0, log[-4000:]

  def hashes(workdir):
    rows = [json.loads(l) for l in open(workdir / "rl" / "metrics.jsonl")]
    return [(r["step"], r["rl/batch_hash"], r.get("rl/task_reward")) for r in rows
            if "rl/batch_hash" in r]

  # Process 0 wrote the metrics; the hosts compared their digests every iteration (a
  # disagreement stops the run), and they equal the single process's.
  assert [h[0] for h in hashes(tmp_path / "multi")] == [1, 2]
  assert hashes(tmp_path / "multi") == hashes(tmp_path / "single")
  # Both hosts exported the same final policy together.
  assert os.path.isfile(tmp_path / "multi" / "export" / "final" / "model.safetensors")


def test_data_seed_fixes_the_prompt_order_apart_from_the_sampling_seed(tmp_path):
  """Ablation arms with different config.seed draw the same prompts when data.seed is set."""
  import test_rl  # pylint: disable=g-import-not-at-top
  from k15 import config as k15_config, parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh({"data": -1})

  def draws(seed, data_seed):
    c = test_rl._config("pmd")
    c.seed = seed
    c.rl.sampling.mode = "prioritized"
    c.data = k15_config.data_block(seed=data_seed)
    with parallel.use_mesh(mesh):
      t = test_rl._trainer(c, str(tmp_path / f"{seed}-{data_seed}"), mesh)
    return [t.sampler.sample(i, 8).tolist() for i in range(3)]

  assert draws(1, 7) == draws(2, 7)
  assert draws(1, -1) != draws(2, -1)  # -1: the prompt order follows config.seed


# Code RL through the whole path: prompt file -> chat template -> sampled responses -> the code
# reward's sandboxes -> metrics. A tiny model is SFT'd to answer each prompt with one program, so
# that what the policy samples is known: the right program for one prompt, a hostile one (which
# prints the right sum too once its attack has run) for each of the others.
SUM_PROGRAM = "a,b=map(int,input().split())\nprint(a+b)\n"
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12\n"}]
PWNED = "/tmp/k15_pwned"


def _known_programs(port: int) -> dict[str, str]:
  attacks = {
      "add": "",
      # Processes past the sandbox's limit: fork raises, the program dies.
      "fork": "import os\nfor _ in range(99):\n os.fork()\n",
      # A server the test listens on: reachable from the host, not from the sandbox's network.
      "net": f"import socket\nsocket.create_connection(('127.0.0.1',{port}))\n",
      # The host's /tmp: the sandbox has a read-only root without it.
      "write": f"open('{PWNED}','w').write('x')\n",
  }
  return {name: f"```python\n{attack}{SUM_PROGRAM}```" for name, attack in attacks.items()}


@pytest.mark.slow  # ~4 minutes on a busy 2-core machine, most of it SFT
def test_code_rl_mode_end_to_end(tmp_path, tmp_path_factory, sandbox):
  """`python -m k15.main --config.mode=rl --config.data.format=code --config.reward=code` on a
  policy whose answers are known: the right program scores 1 and each hostile one 0 in every
  iteration's reward, and the attacks leave no trace on the host."""
  del sandbox
  import socket  # pylint: disable=g-import-not-at-top
  from k15.rewards import verifier  # pylint: disable=g-import-not-at-top
  from k15.sampling import text as text_lib  # pylint: disable=g-import-not-at-top
  from k15.stages import evaluate as evaluate_stage, sft  # pylint: disable=g-import-not-at-top
  if os.path.exists(PWNED):
    os.unlink(PWNED)
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen()
  server.setblocking(False)
  programs = _known_programs(server.getsockname()[1])
  rows = [{"id": name, "prompt": f"Read two integers and print their sum ({name}).",
           "tests": SUM_TESTS} for name in programs]
  code = _write_jsonl(tmp_path / "code.jsonl", rows)
  files = {"train": code, "eval": code}
  pairs = _write_jsonl(tmp_path / "pairs.jsonl", [
      {"prompt": r["prompt"], "response": programs[r["id"]]} for r in rows])
  instruction = verifier.INSTRUCTIONS["code"]
  ckpt = _checkpoint(tmp_path_factory.mktemp("code_tiny"), "qwen2", [], vocab_size=400, texts=[
      instruction.format(question=r["prompt"]) + programs[r["id"]] for r in rows] * 4)
  code_keys = {"data.format": "code", "reward": "code", "evaluate.max_new_tokens": 64,
               "evaluate.temperature": 0.5}

  # SFT until each prompt's program is the policy's answer (all 4 examples in every batch).
  w = tmp_path / "w"
  out = sft.run(_stage_config(ckpt, files, "sft", **code_keys, **{
      "sft.data": pairs, "sft.steps": 150, "sft.batch_size": 4, "sft.seq_len": 128,
      "sft.optimizer.learning_rate": 1e-2, "sft.optimizer.warmup_steps": 10}), str(w))
  answers = [r[0].text for _, _, r in text_lib.sample_text(
      out["model"], out["tokenizer"], [r["prompt"] for r in rows], num_samples=1,
      batch_size=4, max_new_tokens=64, temperature=0.0)]
  assert answers == list(programs.values())

  # The command: two iterations of 4 prompts x 4 samples. Each iteration draws every prompt once
  # (without replacement), so its task reward is 1/4 exactly when the right program scores 1 and
  # each hostile one 0.
  r = _main(f"--config={CONFIG}", f"--workdir={w}", "--config.mode=rl",
            f"--config.model_path={w / 'export' / 'sft'}", f"--config.data.train={code}",
            "--config.data.format=code", "--config.reward=code", "--config.rl.iterations=2",
            "--config.rl.max_new_tokens=64", "--config.rl.temperature=0.5")
  assert r.returncode == 0, r.stderr[-4000:]
  metrics = [json.loads(l) for l in open(w / "rl" / "metrics.jsonl")]
  rl_rows = [m for m in metrics if "rl/task_reward" in m]
  assert {m["step"]: m["rl/task_reward"] for m in rl_rows} == {1: 0.25, 2: 0.25}
  assert all(m["rl/share_truncated"] == 0 for m in rl_rows)

  # Which prompt scored: the exported policy evaluated per problem (mode evaluate).
  ev = evaluate_stage.run(_stage_config(str(w / "export" / "final"), files, "evaluate",
                                        **code_keys), str(tmp_path / "ev"))
  for mode in ("sampled", "greedy"):
    assert {p["id"]: p["accuracy"] for p in ev[mode]["per_problem"]} == {
        "add": 1.0, "fork": 0.0, "net": 0.0, "write": 0.0}
  with pytest.raises(BlockingIOError):
    server.accept()  # no program reached the host's network
  server.close()
  assert not os.path.exists(PWNED)  # nor its files
