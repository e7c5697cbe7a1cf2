"""Metrics of a run: tensorboardX event files, a JSONL log, response-length stats, MFU, progress.

Issue 4 §6. `MetricWriter` writes every scalar twice: to tensorboardX event files in
`<workdir>/tb` (for TensorBoard) and as one JSON line per call to `<workdir>/metrics.jsonl`
(for tests, plots and notebooks; `read_jsonl` loads it back, one record per step). Names are
namespaced by what they measure:

  rl/...     reward, accuracy, response_length_mean / _p90 / _max, share_truncated,
             share_repeated, entropy, kl (estimate of KL(pi || pi_i)), skipped_updates
  train/...  loss, grad_norm, learning_rate
  perf/...   sample_tokens_per_s, train_tokens_per_s, mfu, iteration_s

Only process 0 writes (`enabled`); the other hosts of a pod get a writer that does nothing.
A non-finite value is written as it is to TensorBoard (NaN shows as a gap and a warning there)
and as null in the JSONL, which has no NaN.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
import tqdm
from etils import epath

_JSONL = "metrics.jsonl"


def _scalar(name: str, value: Any) -> float | int:
  """A Python number from a Python/numpy/jax scalar; anything else is an error naming `name`."""
  if isinstance(value, (bool, np.bool_)):
    return int(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, float):
    return value
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
  if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
    raise ValueError(f"metric {name!r} must be a number, got {arr.dtype}")
  out = arr.reshape(()).item()
  return int(out) if isinstance(out, (bool, int)) else float(out)


def _json_number(x: float | int) -> float | int | None:
  return x if isinstance(x, int) or math.isfinite(x) else None


class MetricWriter:
  """Scalars to `<workdir>/tb` (tensorboardX) and `<workdir>/metrics.jsonl`.

  Usable as a context manager. Local and gs:// workdirs both work: a remote JSONL is kept in
  memory and rewritten whole on `flush` (object stores can't append).
  """

  def __init__(self, workdir: str | epath.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self.workdir = epath.Path(workdir)
    self._tb = None
    self._file = None
    self._remote_lines: list[str] | None = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (slow import, process 0 only)
      self._tb = tensorboardX.SummaryWriter(logdir=str(self.workdir / "tb"))
    path = self.workdir / _JSONL
    if "://" in str(self.workdir):
      self._remote_lines = path.read_text().splitlines() if path.exists() else []
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes {name: number} at `step`; numpy and jax scalars are fine (fetched here)."""
    if not self.enabled:
      return
    step = int(step)
    values = {str(k): _scalar(str(k), v) for k, v in scalars.items()}
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, global_step=step)
    record = {"step": step, "time": round(time.time(), 3)}
    record.update({k: _json_number(v) for k, v in values.items()})
    line = json.dumps(record, allow_nan=False)
    if self._file is not None:
      self._file.write(line + "\n")
      # Lines reach the OS at once, so a crashed run's log is complete up to the crash.
      self._file.flush()
    elif self._remote_lines is not None:
      self._remote_lines.append(line)

  def write_text(self, step: int, name: str, text: str) -> None:
    """Text (e.g. a sampled response) to TensorBoard's text tab; not to the JSONL."""
    if self.enabled and self._tb is not None:
      self._tb.add_text(name, text, global_step=int(step))

  def flush(self) -> None:
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
    if self._file is not None:
      self._file.flush()
    elif self._remote_lines is not None:
      (self.workdir / _JSONL).write_text("\n".join(self._remote_lines) + "\n")

  def close(self) -> None:
    if not self.enabled:
      return
    self.flush()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._file is not None:
      self._file.close()
      self._file = None
    self._remote_lines = None
    self.enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(workdir: str | epath.PathLike) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl`, one per step, ascending.

  Several lines of one step are merged, later values winning: a run resumed from a checkpoint
  rewrites the steps after it, and the rewrite is what counts. nulls stand for non-finite
  values and come back as NaN.
  """
  path = epath.Path(workdir) / _JSONL
  if not path.exists():
    raise FileNotFoundError(f"no metrics file {path}")
  by_step: dict[int, dict[str, Any]] = {}
  for lineno, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{path}:{lineno}: not a metrics record ({e}): {line[:200]!r}") from e
    merged = by_step.setdefault(step, {})
    merged.update({k: (math.nan if v is None else v) for k, v in record.items()})
  return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------------------------------------
# Statistics of a batch of responses.
# ---------------------------------------------------------------------------------------------

def response_length_stats(lengths: Any, truncated: Any = None, repeated: Any = None, *,
                          prefix: str = "rl/") -> dict[str, float]:
  """Mean, p90 and max of response lengths (tokens), and the shares truncated / repeated.

  `truncated` marks responses that hit the generation budget; `repeated` those stopped by
  repeat detection (paper §2.6); both boolean arrays of `lengths`' shape, optional. p90 is
  numpy's linearly interpolated 90th percentile.
  """
  lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
  if lengths.size == 0:
    raise ValueError("response_length_stats: no responses (lengths is empty)")
  out = {
      f"{prefix}response_length_mean": float(lengths.mean()),
      f"{prefix}response_length_p90": float(np.percentile(lengths, 90)),
      f"{prefix}response_length_max": float(lengths.max()),
  }
  for name, flags in (("truncated", truncated), ("repeated", repeated)):
    if flags is None:
      continue
    flags = np.asarray(flags, dtype=bool).reshape(-1)
    if flags.shape != lengths.shape:
      raise ValueError(f"response_length_stats: {name} has {flags.size} entries, lengths "
                       f"{lengths.size}")
    out[f"{prefix}share_{name}"] = float(flags.mean())
  return out


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU.
# ---------------------------------------------------------------------------------------------

def model_flops_per_token(model_cfg: Any, seq_len: int, training: bool) -> float:
  """Matmul FLOPs per token of a decoder (the usual MFU convention, e.g. PaLM appendix B).

  With N = non-embedding parameters + the LM head (the matmul weights a token passes through;
  the embedding lookup is free, a tied head still costs a matmul), L layers, n query heads of
  size H and sequences of length T:

    forward:             2 N + 2 L n H T
    forward + backward:  6 N + 6 L n H T

  2 N is one multiply-add per weight. Attention does QK^T and AV, 2 * 2 n H c FLOPs per layer
  for a query that sees c keys; causal attention sees c = T/2 keys on average, which gives
  2 L n H T (PaLM's 12 L n H T counts full, non-causal attention for training). Backward costs
  twice the forward. For sampling, T is the whole sequence, prompt + response; the result is
  then an estimate of the mean over the response's tokens.
  """
  if not hasattr(model_cfg, "num_params"):  # the config's `model` block
    from k15.model import transformer  # pylint: disable=g-import-not-at-top
    model_cfg = transformer.ModelConfig.from_config(model_cfg)
  L, n, H = model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim
  table = model_cfg.vocab_size * model_cfg.embed_dim
  non_embedding = model_cfg.num_params() - table * (1 if model_cfg.tie_embeddings else 2)
  n_matmul = non_embedding + table  # + the LM head
  per_pass = 2 * n_matmul + 2 * L * n * H * seq_len
  return float(3 * per_pass if training else per_pass)


def mfu(flops_per_s: float, peak_flops: float | None) -> float:
  """Model FLOPs utilization: achieved model FLOPs/s over the hardware's peak (NaN if unknown).

  Both for the same set of devices, e.g. `tokens_per_s * model_flops_per_token(...)` over
  `peak_flops()`.
  """
  if not peak_flops:
    return math.nan
  return float(flops_per_s) / float(peak_flops)


# Dense bf16 peak FLOP/s per JAX device (a TPU v2/v3 device is one core, later TPUs one chip).
_PEAK_FLOPS = (
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),   # v5e
    ("TPU v5", 459e12),        # v5p
    ("TPU v6 lite", 918e12),   # v6e (Trillium)
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(devices: Sequence[jax.Device] | None = None) -> float | None:
  """Summed peak bf16 FLOP/s of `devices` (default: all), or None if any kind is unknown (CPU)."""
  total = 0.0
  for d in jax.devices() if devices is None else devices:
    kind = getattr(d, "device_kind", "")
    # The longest matching name wins ("TPU v5 lite" before "TPU v5").
    matches = [(name, f) for name, f in _PEAK_FLOPS if name in kind]
    if not matches:
      return None
    total += max(matches, key=lambda m: len(m[0]))[1]
  return total


# ---------------------------------------------------------------------------------------------
# Progress.
# ---------------------------------------------------------------------------------------------

def record_step(step_metrics: tuple[int, Mapping[str, Any]], history: list[float], bar,
                writer: "MetricWriter | None", prefix: str,
                shown: Mapping[str, str]) -> None:
  """Books one optimizer step of a training loop (SFT, DPO): fetches its metrics, appends the
  loss to `history`, shows `loss` and the `shown` {label: metric} on the progress bar, and writes
  every metric under `prefix/` (names that already have a '/' as they are)."""
  step, m = step_metrics
  m = jax.device_get(m)
  history.append(float(m["loss"]))
  bar.set_postfix(loss=f"{float(m['loss']):.4f}",
                  **{label: f"{float(m[key]):.2f}" for label, key in shown.items()})
  bar.update(1)
  if writer is not None:
    writer.write_scalars(step, {k if "/" in k else f"{prefix}/{k}": v for k, v in m.items()})


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _LogProgress:
  """tqdm's interface for logs that are not a terminal: a line every `every_s` seconds."""

  def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str,
               every_s: float, file: Any):
    self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
    self.every_s, self.file = every_s, file
    self.n = 0
    self.postfix = ""
    self._start = self._last = time.monotonic()
    self._closed = False

  def __iter__(self):
    for item in self.iterable:
      yield item
      self.update(1)
    self.close()

  def __len__(self) -> int:
    return self.total or 0

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, **kwargs) -> None:
    items = dict(ordered_dict or {}, **kwargs)
    self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

  def update(self, n: int = 1) -> None:
    self.n += n
    now = time.monotonic()
    if now - self._last >= self.every_s:
      self._last = now
      self._print(now)

  def _print(self, now: float) -> None:
    elapsed = now - self._start
    rate = self.n / elapsed if elapsed > 0 else math.nan
    text = f"{self.desc}: {self.n}"
    if self.total:
      left = (self.total - self.n) / rate if rate > 0 else math.nan
      text += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
    text += f" {rate:.3g} {self.unit}/s, elapsed {_eta(elapsed)}"
    if self.total:
      text += f", ETA {_eta(left)}"
    if self.postfix:
      text += f" [{self.postfix}]"
    print(text, file=self.file, flush=True)

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self._print(time.monotonic())


def progress(iterable_or_total: Iterable | int, desc: str = "", *, enabled: bool | None = None,
             force: bool = False, unit: str = "it", unit_scale: bool = False,
             log_every_s: float = 30.0, file: Any = None) -> Any:
  """A progress bar with ETA: wraps an iterable, or counts to a total with `.update(n)`.

  On a terminal (or with `force`) a tqdm bar; in a log that is not a terminal (CI, a TPU
  worker's log file) a plain line every `log_every_s` seconds and one at the end; nothing on
  processes other than 0 or with `enabled=False`. All three support iteration, `update`,
  `set_postfix`, `close` and `with`.
  """
  file = sys.stderr if file is None else file
  if isinstance(iterable_or_total, int):
    iterable, total = None, iterable_or_total
  else:
    iterable = iterable_or_total
    total = len(iterable) if hasattr(iterable, "__len__") else None
  enabled = jax.process_index() == 0 if enabled is None else enabled
  if not enabled:
    return tqdm.tqdm(iterable, total=total, disable=True)
  is_tty = hasattr(file, "isatty") and file.isatty()
  if is_tty or force:
    return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                     file=file, dynamic_ncols=True)
  return _LogProgress(iterable, total, desc, unit, log_every_s, file)
