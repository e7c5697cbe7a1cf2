"""Tests for k15.metrics: event files, JSONL, length stats, FLOPs/MFU and progress."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from k15 import metrics
from k15.model import transformer


def _read_scalars(logdir):
  """{tag: [(step, value)]} from tensorboardX event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2
  out = {}
  files = sorted(logdir.glob("events.out.tfevents.*"))
  assert files, f"no event file in {logdir}"
  for path in files:
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4  # length, its crc, payload, payload crc
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_writer_tensorboard_and_jsonl(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(1, {"rl/reward": 0.25, "train/grad_norm": jnp.float32(1.5),
                             "perf/sample_tokens_per_s": np.int64(1000)})
    writer.write_scalars(2, {"rl/reward": float("nan"), "train/grad_norm": np.float32(np.inf)})
    writer.write_scalars(2, {"rl/accuracy": True})  # more of step 2, written later
    writer.write_text(2, "samples/response", "The answer is \\boxed{4}.")
    with pytest.raises(ValueError, match="'rl/bad' must be a scalar"):
      writer.write_scalars(3, {"rl/bad": np.ones(3)})

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  second = json.loads(lines[1])  # strict JSON: null, not NaN
  assert second["rl/reward"] is None and second["train/grad_norm"] is None
  assert "NaN" not in lines[1] and "Infinity" not in lines[1]

  records = metrics.read_jsonl(tmp_path)
  assert [r["step"] for r in records] == [1, 2]
  assert records[0]["rl/reward"] == 0.25 and records[0]["train/grad_norm"] == 1.5
  assert records[0]["perf/sample_tokens_per_s"] == 1000
  assert math.isnan(records[1]["rl/reward"]) and records[1]["rl/accuracy"] == 1

  scalars = _read_scalars(tmp_path / "tb")
  assert scalars["rl/reward"][0] == (1, 0.25)
  assert scalars["rl/reward"][1][0] == 2 and math.isnan(scalars["rl/reward"][1][1])
  assert scalars["train/grad_norm"] == [(1, 1.5), (2, math.inf)]
  assert scalars["perf/sample_tokens_per_s"] == [(1, 1000.0)]


def test_resumed_run_overrides_steps_and_bad_lines_are_named(tmp_path):
  with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
    for step in range(1, 5):
      writer.write_scalars(step, {"rl/reward": step / 10})
  # Resumed from a checkpoint at step 2: steps 3 and 4 are written again.
  with metrics.MetricWriter(tmp_path, enabled=True, tensorboard=False) as writer:
    for step in (3, 4):
      writer.write_scalars(step, {"rl/reward": step})
  assert [r["rl/reward"] for r in metrics.read_jsonl(tmp_path)] == [0.1, 0.2, 3, 4]
  assert not (tmp_path / "tb").exists()

  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:7"):
    metrics.read_jsonl(tmp_path)


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricWriter(workdir, enabled=False)
  writer.write_scalars(1, {"rl/reward": 1.0})
  writer.write_text(1, "samples", "x")
  writer.flush()
  writer.close()
  assert not workdir.exists()
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    metrics.read_jsonl(workdir)


def test_response_length_stats_by_hand():
  stats = metrics.response_length_stats(
      [10, 20, 30, 40, 100], truncated=[0, 0, 0, 0, 1], repeated=[1, 1, 0, 0, 0])
  # p90 interpolates between the 4th and 5th of 5 sorted values: 40 + 0.6 * (100 - 40).
  assert stats == {"rl/response_length_mean": 40.0, "rl/response_length_p90": 76.0,
                   "rl/response_length_max": 100.0, "rl/share_truncated": 0.2,
                   "rl/share_repeated": 0.4}
  assert metrics.response_length_stats(np.array([[3, 5]]), prefix="eval/") == {
      "eval/response_length_mean": 4.0, "eval/response_length_p90": 4.8,
      "eval/response_length_max": 5.0}
  with pytest.raises(ValueError, match="truncated has 1 entries"):
    metrics.response_length_stats([1, 2], truncated=[True])
  with pytest.raises(ValueError, match="empty"):
    metrics.response_length_stats([])


def test_model_flops_and_mfu_by_hand():
  cfg = transformer.ModelConfig(vocab_size=100, embed_dim=16, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, mlp_dim=32, tie_embeddings=True)
  # Per layer: q,k,v 16*(4+2*2)*8 = 1024, o 4*8*16 = 512, mlp 3*16*32 = 1536, norms 32 -> 3104.
  # N = 2 * 3104 + 16 (final norm) + 100 * 16 (head) = 7824.
  # Attention, causal, T = 64: 2 * L * n * H * T = 2 * 2 * 4 * 8 * 64 = 8192.
  assert metrics.model_flops_per_token(cfg, 64, training=False) == 2 * 7824 + 8192
  assert metrics.model_flops_per_token(cfg, 64, training=True) == 6 * 7824 + 3 * 8192
  # An untied head costs the same matmul; the extra embedding table costs nothing.
  untied = transformer.ModelConfig(**{**cfg.__dict__, "tie_embeddings": False})
  assert untied.num_params() == cfg.num_params() + 1600
  assert metrics.model_flops_per_token(untied, 64, training=True) == 6 * 7824 + 3 * 8192
  # The config's model block works as well.
  assert metrics.model_flops_per_token(dict(cfg.__dict__), 64, False) == 2 * 7824 + 8192

  # 1000 tokens/s of training on a device with 1e9 peak FLOP/s.
  flops_per_s = 1000 * metrics.model_flops_per_token(cfg, 64, training=True)
  assert metrics.mfu(flops_per_s, 1e9) == pytest.approx(71520e3 / 1e9)
  assert metrics.mfu(1e12, 4e12) == 0.25
  assert math.isnan(metrics.mfu(1e12, None))
  assert metrics.peak_flops() is None  # CPU devices have no entry


def test_progress_logs_lines_when_not_a_tty():
  out = io.StringIO()
  seen = list(metrics.progress(range(5), "sampling", enabled=True, log_every_s=0.0, file=out))
  assert seen == [0, 1, 2, 3, 4]
  lines = out.getvalue().splitlines()
  assert lines[-1].startswith("sampling: 5/5 (100%)") and "ETA 0:00:00" in lines[-1]
  assert len(lines) == 6  # every update (interval 0) and the closing line

  out = io.StringIO()
  with metrics.progress(100, "training", enabled=True, log_every_s=3600, file=out,
                        unit="tok") as bar:
    bar.update(40)
    bar.set_postfix(loss=0.5)
    assert out.getvalue() == ""  # nothing until the interval passes or the bar closes
  assert out.getvalue().startswith("training: 40/100 (40%)")
  assert "tok/s" in out.getvalue() and "[loss=0.5]" in out.getvalue()

  out = io.StringIO()
  assert list(metrics.progress(range(3), "x", enabled=False, file=out)) == [0, 1, 2]
  assert out.getvalue() == ""

  out = io.StringIO()
  assert list(metrics.progress(range(3), "forced", enabled=True, force=True, file=out)) == [
      0, 1, 2]
  assert "forced" in out.getvalue() and "3/3" in out.getvalue()  # a tqdm bar
