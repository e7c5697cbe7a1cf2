"""Workdirs, prompt files and checkpoints on a remote path: gs:// through etils.epath.

The gs:// scheme is served by an in-memory fsspec filesystem registered in place of gcsfs, so
nothing a stage writes there can be reached through `open` or `os.path`: a read or write that
bypasses epath fails (or lands on local disk, which the tests check is untouched).
"""

import json
import os
import sys

import fsspec
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from k15 import storage


class FakeGCS(MemoryFileSystem):
  """gs://bucket/key held in memory (a store of its own, not the memory:// one)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    if path.startswith(("gs://", "gcs://")):
      path = path.split("://", 1)[1]
    return "/" + path.strip("/")


@pytest.fixture
def gcs():
  """The fake gs:// for one test; its store starts empty."""
  saved = {p: fsspec.registry.get(p) for p in FakeGCS.protocol}
  for p in FakeGCS.protocol:
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield FakeGCS.store
  for p, impl in saved.items():
    if impl is None:
      sys.modules["fsspec.registry"]._registry.pop(p, None)  # pylint: disable=protected-access
    else:
      fsspec.register_implementation(p, impl, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _keys(store, prefix):
  return sorted(k[len(prefix):] for k in store if k.startswith(prefix))


def test_storage_writes_and_reads_remote_files(gcs):
  storage.write_json("gs://b/w/a/r.json", {"x": 1, "y": np.float32(0.5)})
  storage.write_text("gs://b/w/t.md", "hello")
  storage.write_bytes("gs://b/w/m.bin", b"\x00\x01")
  assert storage.read_json("gs://b/w/a/r.json") == {"x": 1, "y": "0.5"}
  assert _keys(gcs, "/b/w/") == ["a/r.json", "m.bin", "t.md"]  # no temporary files left
  assert storage.is_remote("gs://b/w") and not storage.is_remote("/tmp/w")


def test_pipeline_data_tokenizer_and_results_on_a_gs_workdir(gcs, tmp_path, monkeypatch):
  """The tiny pipeline's data, tokenizer, curation report and plots land in gs://; a rerun
  reloads them from there."""
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  from k15 import pipeline, study  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # a stray relative write would land here
  c = tiny_cpu.get_config().pipeline
  c.update(sft_examples=40, rl_pool=8, eval_problems=8)
  data = pipeline.make_data(c, 0, "gs://b/w/data")
  assert _keys(gcs, "/b/w/data/") == ["eval.jsonl", "rl_pool.jsonl", "sft.jsonl"]
  assert [len(data[k]) for k in ("sft", "rl_pool", "eval")] == [40, 8, 8]
  tok = pipeline.make_tokenizer(data["sft"] + data["rl_pool"], "gs://b/w/tokenizer.model", 384)
  assert "/b/w/tokenizer.model" in gcs
  again = pipeline.make_tokenizer([], "gs://b/w/tokenizer.model", 384)  # reloaded, not trained
  text = data["sft"][0].prompt
  assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
  # A rerun reads the stored files: change one, and the reload returns the change.
  first = data["eval"][0]
  stored = epath.Path("gs://b/w/data/eval.jsonl").read_text().splitlines()
  row = json.loads(stored[0])
  row["prompt"] = "changed"
  epath.Path("gs://b/w/data/eval.jsonl").write_text("\n".join([json.dumps(row)] + stored[1:]))
  assert pipeline.make_data(c, 0, "gs://b/w/data")["eval"][0].prompt == "changed" != first.prompt
  # Curation's output (no model: curation off), a study's evaluation file, a plot.
  c.curate = False
  records = pipeline.curate(data["rl_pool"], None, c, 0, "gs://b/w/data")
  assert len(records) == 8 and "/b/w/data/rl_prompts.jsonl" in gcs
  assert storage.read_json("gs://b/w/data/curation.json") == {"skipped": True}
  study._write("gs://b/w/runs/a/eval.json", {"n": 1})  # pylint: disable=protected-access
  assert study._read("gs://b/w/runs/a/eval.json") == {"n": 1}  # pylint: disable=protected-access
  from k15 import metrics  # pylint: disable=g-import-not-at-top
  writer = metrics.MetricWriter("gs://b/w/rl", tensorboard=False)
  for step in (1, 2):
    writer.write_scalars(step, {"rl/reward": 0.1 * step, "rl/accuracy": 0.2,
                                "rl/response_length_mean": 9.0})
  writer.close()
  pipeline.plot_curves("gs://b/w/rl", "gs://b/w/rl_curves.png")
  assert gcs["/b/w/rl_curves.png"].getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(tmp_path) == []


def test_evaluate_mode_with_its_workdir_on_gs(gcs, tmp_path, monkeypatch):
  """Mode `evaluate` (synthetic tasks): the tokenizer read from, eval.json written to gs://."""
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  from k15 import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from k15 import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  texts = [tokenizer_lib.PROMPT_TEMPLATE.format(question=p.prompt) + " " + p.long_cot
           for p in tasks.generate("arithmetic", 30, seed=0, split="train",
                                   difficulties=[1, 2])]
  tokenizer_lib.train_tokenizer(texts, "gs://b/w/tokenizer.model", 384)
  config = tiny_cpu.get_config()
  config.mode = "evaluate"
  config.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      mlp_dim=64)
  config.evaluate.update(families=("arithmetic",), num_problems=2, num_samples=1,
                         max_new_tokens=4, batch_size=2, difficulties=(1,))
  results = evaluate_lib.run(config, "gs://b/w")
  saved = storage.read_json("gs://b/w/eval.json")
  assert saved["model"]["n"] == results["model"]["n"] == 2
  assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
  import test_rl_mode  # pylint: disable=g-import-not-at-top
  rows = [{"question": f"Ana has {a} apples and buys {b} more. How many apples now?",
           "answer": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in [(2, 3), (4, 5), (6, 7)]]
  d = tmp_path_factory.mktemp("ckpt")
  return test_rl_mode._checkpoint(d, "qwen2", rows), rows  # pylint: disable=protected-access


def _upload(local, remote):
  storage.upload(local, remote)
  return remote


def test_stage_copies_once_resumes_a_cut_copy_and_names_bad_paths(gcs, tiny_ckpt, tmp_path,
                                                                  capsys):
  ckpt, _ = tiny_ckpt
  remote = _upload(ckpt, "gs://b/models/tiny")
  cache = tmp_path / "cache"
  local = storage.stage(remote, cache)
  files = sorted(f for f in os.listdir(ckpt))
  assert sorted(f for f in os.listdir(local) if f != storage.MANIFEST) == files
  for f in files:
    assert open(os.path.join(local, f), "rb").read() == open(os.path.join(ckpt, f), "rb").read()
  assert "staging tiny" in capsys.readouterr().err  # the progress line, in bytes

  # Complete: a second call reads nothing but the listing.
  opened = []
  original = FakeGCS._open  # pylint: disable=protected-access
  def counting_open(self, path, *args, **kwargs):
    opened.append(path)
    return original(self, path, *args, **kwargs)
  FakeGCS._open = counting_open  # pylint: disable=protected-access
  try:
    assert storage.stage(remote, cache) == local and opened == []
    # A copy cut short (one file missing, no manifest): only that file is fetched again.
    os.remove(os.path.join(local, storage.MANIFEST))
    os.remove(os.path.join(local, "config.json"))
    assert storage.stage(remote, cache) == local
    assert opened == ["/b/models/tiny/config.json"]
  finally:
    FakeGCS._open = original  # pylint: disable=protected-access
  # A source that changed is copied again.
  epath.Path(remote, "extra.txt").write_text("new")
  assert open(os.path.join(storage.stage(remote, cache), "extra.txt")).read() == "new"

  with pytest.raises(FileNotFoundError, match=r"config.model_path=gs://b/missing: no such dir"):
    storage.stage("gs://b/missing", cache)
  def denied(self, path, *args, **kwargs):
    raise PermissionError(f"403 on {path}")
  FakeGCS.ls = denied
  try:
    with pytest.raises(OSError, match=r"config.model_path=gs://b/models/tiny: cannot read it "
                                      r"\(PermissionError: 403"):
      storage.stage(remote, cache)
  finally:
    del FakeGCS.ls


def test_modes_on_a_gs_checkpoint_prompt_file_and_workdir(gcs, tiny_ckpt, tmp_path,
                                                          monkeypatch):
  """Mode `evaluate` (through k15.main.run, as the command line calls it) with model_path,
  data.eval and the workdir all on gs://: the checkpoint is staged to config.model_cache_dir;
  an export to gs:// stages back to the same weights."""
  import test_rl_mode  # pylint: disable=g-import-not-at-top
  from k15 import hf_policy, main, parallel  # pylint: disable=g-import-not-at-top
  from k15.model import hf  # pylint: disable=g-import-not-at-top
  ckpt, rows = tiny_ckpt
  monkeypatch.chdir(tmp_path)
  remote = _upload(ckpt, "gs://b/models/tiny")
  epath.Path("gs://b/data/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = test_rl_mode._config(remote, "", **{  # pylint: disable=protected-access
      "data.eval": "gs://b/data/test.jsonl", "evaluate.max_new_tokens": 4,
      "evaluate.num_samples": 1, "model_cache_dir": str(tmp_path / "cache")})
  config.mode = "evaluate"
  results = main.run(config, "gs://b/w", {"model_path": remote, "mode": "evaluate"})
  assert results["sampled"]["n"] == 3
  assert set(storage.read_json("gs://b/w/eval.json")) == {"sampled", "greedy"}
  (staged,) = os.listdir(tmp_path / "cache")
  assert staged.startswith("tiny-") and sorted(os.listdir(tmp_path)) == ["cache"]

  assert config.model_path == str(tmp_path / "cache" / staged)  # main.run ran on the copy
  config.model_path = remote
  local = hf_policy.with_checkpoint_architecture(config)  # staged already: reused
  assert local.model_path == str(tmp_path / "cache" / staged)
  tok = hf_policy.load_tokenizer(local.model_path, hf_policy.instruction(local))
  with parallel.use_mesh(parallel.make_mesh({"data": -1}), config.sharding_rules):
    model = hf.load(local.model_path, config_overrides={"attention_impl": "reference"})
    hf_policy.export(model, tok, local, "gs://b/w/export/final")
  assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
      _keys(gcs, "/b/w/export/final/"))
  back = storage.stage("gs://b/w/export/final", tmp_path / "cache")
  tokens = np.asarray([tok.encode("Ana has 3 apples.")])
  again = hf.load(back, config_overrides={"attention_impl": "reference"})
  np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(model(tokens)))
