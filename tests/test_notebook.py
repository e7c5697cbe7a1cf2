"""The Colab notebooks run top to bottom (K15_NOTEBOOK_RUNLOCAL=1 shrinks them), as a user would."""

import json
import math
import os

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check_small_scale(outputs, work):
  assert "RL - SFT:" in outputs
  assert os.path.exists(work / "rl" / "metrics.jsonl")
  # Section 6 ran every long2short method from the pipeline's outputs and compared it to long.
  l2s = json.loads((work / "long2short.json").read_text())["results"]
  assert set(l2s) >= {"long", "short", "merge", "merge_rs", "shortest_rs", "dpo", "rl"}
  for name, r in l2s.items():
    if name != "long" and r["accuracy"] is not None:  # None: skipped, r["skipped"] says why
      assert r["tokens_vs_long"] == pytest.approx(r["mean_tokens"] / l2s["long"]["mean_tokens"])
  assert (work / "long2short.png").read_bytes()[:4] == b"\x89PNG"


def _check_qwen25_gsm8k(outputs, work):
  """The RL run's results, metrics and saved checkpoint (RUNLOCAL: 2 iterations, 24 tokens)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from k15 import hf_tokenizer, metrics  # pylint: disable=g-import-not-at-top
  from k15.data import prompts  # pylint: disable=g-import-not-at-top
  from k15.model import hf  # pylint: disable=g-import-not-at-top

  assert "transformers vs k15" in outputs
  results = json.loads((work / "notebook.json").read_text())
  assert results["iterations"] == 2
  for name in ("before", "after"):
    r = results[name]
    assert 0.0 <= r["accuracy"] <= 1.0 and (r["n"], r["num_samples"]) == (4, 2), r
    assert 0 < r["mean_tokens"] <= 24 and 0.0 <= r["truncated"] <= 1.0, r
  assert results["reload_max_abs_diff"] == 0.0  # float32 weights saved as float32
  assert results["transformers_max_abs_diff"] < 1e-4

  rows = [r for r in metrics.read_jsonl(work / "rl") if "rl/reward" in r]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["rl/groups_trained"] == 4 and r["train/skipped_steps"] == 0, r
    assert 0.0 <= r["rl/reward"] <= 1.0 and math.isfinite(r["train/loss"]), r
    assert 0 < r["rl/response_length_mean"] <= 24 and math.isfinite(r["train/grad_norm"]), r
  assert (work / "rl_curves.png").read_bytes()[:4] == b"\x89PNG"

  # The saved directory is a complete checkpoint: transformers reads the RL model's logits from
  # it, and its tokenizer renders the probe prompt the notebook used.
  saved = work / "export" / "final"
  probe = np.load(work / "probe.npz")
  first = prompts.load_prompts(work / "tiny" / "test.jsonl", "gsm8k")[0][0]
  tok = hf_tokenizer.HFTokenizer.load(saved, instruction=hf_tokenizer.BOXED_INSTRUCTION)
  assert tok.render_prompt(first.prompt) == probe["tokens"][0].tolist()
  assert tok.stop_ids == (2, 0)  # <|im_end|>, then <|endoftext|> from generation_config.json
  model = transformers.AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.tensor(probe["tokens"], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(logits, probe["logits"], atol=1e-4, rtol=0)

  # RL's gradient is real exactly when some group's rewards differed. With equal rewards in
  # every group (a random tiny model answers nothing right) the advantage is 0 and only the
  # regulariser tau (S - S_ref) grad S is left: 0 on the first minibatch, whose reference is its
  # own forward pass, and rounding noise on the others, whose reference comes from a separately
  # compiled pass. Adam scales even that noise to lr-sized steps, so the check is on the
  # gradient's norm; the weights must move when there is a signal.
  before = hf.open_safetensors(str(work / "tiny" / "qwen2-tiny" / "model.safetensors"))
  after = hf.open_safetensors(str(saved / "model.safetensors"))
  assert set(after) <= set(before)
  moved = max(float(np.abs(np.asarray(after[k]) - np.asarray(before[k])).max()) for k in after)
  grad_norm = max(r["train/grad_norm"] for r in rows)
  if all(r["train/frac_groups_all_equal"] == 1.0 for r in rows):
    assert grad_norm < 1e-5 and all(r["train/advantage_abs_mean"] < 1e-6 for r in rows), rows
  else:
    assert grad_norm > 1e-5 and moved > 1e-4, (grad_norm, moved)


# notebook -> (fake CPU devices, modules it needs beyond k15's own, checks)
NOTEBOOKS = {
    "small_scale_reproduction.ipynb": (1, (), _check_small_scale),
    # Two devices: the FSDP mesh shards the parameters, as on a multi-chip TPU runtime.
    "qwen25_05b_gsm8k_rl.ipynb": (2, ("torch", "transformers"), _check_qwen25_gsm8k),
}


@pytest.mark.slow  # each notebook runs its stages end to end: ~1 min each on 2 cores
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(name, tmp_path, monkeypatch):
  devices, requires, check = NOTEBOOKS[name]
  for module in requires:
    pytest.importorskip(module)
  work = tmp_path / "work"
  monkeypatch.setenv("K15_NOTEBOOK_RUNLOCAL", "1")
  monkeypatch.setenv("K15_NOTEBOOK_WORKDIR", str(work))
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  check(outputs, work)


def test_qwen25_notebook_has_a_parameters_cell_and_no_outputs():
  """papermill overrides the cell tagged 'parameters'; committed notebooks carry no outputs."""
  nb = nbformat.read(os.path.join(ROOT, "notebooks", "qwen25_05b_gsm8k_rl.ipynb"), as_version=4)
  nbformat.validate(nb)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  for key in ("CHECKPOINT_DIR", "TRAIN_DATA", "ITERATIONS", "PROMPTS_PER_ITERATION",
              "SAMPLES_PER_PROMPT", "MAX_NEW_TOKENS", "LEARNING_RATE"):
    assert f"\n{key} = " in "\n" + tagged[0].source, key
  assert all(not c.get("outputs") and c.get("execution_count") is None
             for c in nb.cells if c.cell_type == "code")
