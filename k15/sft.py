"""Long-CoT supervised fine-tuning: the warm-up before RL (paper §2.2).

k1.5 fine-tunes on a small, verified set of long chain-of-thought demonstrations (planning,
evaluation, reflection, exploration) with "vanilla" SFT: one epoch, packed sequences, the
learning rate decayed from 2e-5 to 2e-6 at 32k context. Here the same recipe, at any scale:

  examples (prompt ids, response ids + eos)
    -> grain: shuffle per epoch, repeat, first-fit pack into [batch, seq_len] rows  (make_dataset)
    -> loss on response tokens only                                                (sft_loss)
    -> jitted sharded AdamW step, warm-up + cosine decay                           (train_sft)
    -> checkpoint: params, optimizer state and the data iterator's state          (exact resume)

Packing. A row holds several examples one after another; each gets its own segment id (1, 2,
... per row; 0 is padding) and positions restarting at 0, so under the model's attention
(a token sees earlier positions of its own segment only) a packed example computes exactly what
it would alone. `loss_mask[t]` marks the tokens whose log-prob p(token_t | tokens_<t) is
trained: the response tokens, eos included, never the prompt. A segment's first token is always
a prompt token, so the one prediction that crosses a segment boundary (the last token of one
example "predicting" the first of the next) is never trained.

Examples longer than `seq_len` are truncated on the right (and counted), or dropped with
`overlong='drop'`; an example left with no response token after truncation is dropped either
way, since it would train nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from k15 import checkpoint as ckpt_lib
from k15 import parallel, storage, train_loop, update
from k15 import tokenizer as tokenizer_lib
from k15.model import transformer

Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids incl. eos)
BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask")
OVERLONG = ("truncate", "drop")
CHECKPOINT_SUBDIR = "sft_checkpoints"


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PackStats:
  """Counts from packing; `truncated` and `dropped` are examples over seq_len."""
  examples: int = 0   # packed into rows
  truncated: int = 0
  dropped: int = 0
  tokens: int = 0     # real (non-padding) tokens in rows
  loss_tokens: int = 0

  def log(self, where: str) -> None:
    if self.truncated or self.dropped:
      logging.warning("%s: %d examples over seq_len were truncated and %d dropped "
                      "(of %d seen)", where, self.truncated, self.dropped,
                      self.examples + self.dropped)


def _check_example(i: int, example: Any) -> None:
  try:
    prompt, response = example
  except (TypeError, ValueError):
    raise ValueError(f"SFT example {i} is not a (prompt_ids, response_ids) pair: "
                     f"{str(example)[:80]}") from None
  if len(prompt) == 0:
    # The first response token would then be "predicted" from the previous packed example.
    raise ValueError(f"SFT example {i} has an empty prompt; every prompt needs at least one "
                     "token (e.g. <bos>)")
  if len(response) == 0:
    raise ValueError(f"SFT example {i} has an empty response: nothing to train on")


def _prepare(example: Example, seq_len: int, overlong: str,
             stats: PackStats) -> tuple[np.ndarray, np.ndarray, bool] | None:
  """(tokens [n], loss_mask [n], truncated) with n <= seq_len, or None if it is dropped.

  Drops are counted here; the rest is counted by `_count` once the example is in a row (an
  example read but carried over to the next batch is read again after a restore).
  """
  prompt, response = example
  tokens = np.concatenate([np.asarray(prompt, np.int32), np.asarray(response, np.int32)])
  mask = np.zeros(tokens.shape, np.int32)
  mask[len(prompt):] = 1
  if tokens.size > seq_len:
    if overlong == "drop" or len(prompt) >= seq_len:
      stats.dropped += 1
      return None
    return tokens[:seq_len], mask[:seq_len], True
  return tokens, mask, False


class _Rows:
  """First-fit packing into `num_rows` rows of `seq_len` (None: as many rows as needed)."""

  def __init__(self, num_rows: int | None, seq_len: int, pad_id: int):
    self.num_rows, self.seq_len, self.pad_id = num_rows, seq_len, pad_id
    self.rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    self.fill: list[int] = []

  def add(self, tokens: np.ndarray, mask: np.ndarray) -> bool:
    """Places the example in the first row with room; False if none has room."""
    n = tokens.size
    for r, used in enumerate(self.fill):
      if used + n <= self.seq_len:
        self.rows[r].append((tokens, mask))
        self.fill[r] += n
        return True
    if self.num_rows is not None and len(self.rows) >= self.num_rows:
      return False
    self.rows.append([(tokens, mask)])
    self.fill.append(n)
    return True

  def __len__(self) -> int:
    return len(self.rows)

  def arrays(self) -> dict[str, np.ndarray]:
    R = self.num_rows if self.num_rows is not None else len(self.rows)
    T = self.seq_len
    out = {
        "tokens": np.full((R, T), self.pad_id, np.int32),
        "positions": np.zeros((R, T), np.int32),
        "segment_ids": np.zeros((R, T), np.int32),
        "loss_mask": np.zeros((R, T), np.int32),
    }
    for r, row in enumerate(self.rows):
      start = 0
      for seg, (tokens, mask) in enumerate(row, start=1):
        end = start + tokens.size
        out["tokens"][r, start:end] = tokens
        out["positions"][r, start:end] = np.arange(tokens.size)
        out["segment_ids"][r, start:end] = seg
        out["loss_mask"][r, start:end] = mask
        start = end
    return out


def pack_examples(examples: Sequence[Example], seq_len: int, *, overlong: str = "truncate",
                  pad_id: int = tokenizer_lib.PAD_ID,
                  return_stats: bool = False) -> Any:
  """Packs (prompt ids, response ids) pairs first-fit into rows of `seq_len` tokens.

  Returns:
    {"tokens", "positions", "segment_ids", "loss_mask"}: int32 [R, seq_len] with as many rows
    R as needed (see the module docstring for their meaning), and PackStats too if
    `return_stats`.
  """
  if overlong not in OVERLONG:
    raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG}")
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be >= 2")
  stats = PackStats()
  rows = _Rows(None, seq_len, pad_id)
  for i, example in enumerate(examples):
    _check_example(i, example)
    prepared = _prepare(example, seq_len, overlong, stats)
    if prepared is not None:
      rows.add(*prepared[:2])
      _count(stats, *prepared)
  stats.log("pack_examples")
  out = rows.arrays()
  return (out, stats) if return_stats else out


def _count(stats: PackStats, tokens: np.ndarray, mask: np.ndarray, truncated: bool) -> None:
  stats.examples += 1
  stats.truncated += int(truncated)
  stats.tokens += int(tokens.size)
  stats.loss_tokens += int(mask.sum())


# ---------------------------------------------------------------------------------------------
# The grain pipeline.
# ---------------------------------------------------------------------------------------------

class _PackBatchIterator(grain.DatasetIterator):
  """Fills one [batch_size, seq_len] batch at a time, first-fit, from the parent's examples.

  The example that fits nowhere starts the next batch. Its parent state from *before* it was
  read is what `get_state` reports, so a restored iterator reads it again: the state is the
  parent's state plus counters, with no examples inside, and resuming is exact.
  """

  def __init__(self, parent: grain.DatasetIterator, *, batch_size: int, seq_len: int,
               pad_id: int, overlong: str):
    super().__init__(parent)
    self._batch_size, self._seq_len = batch_size, seq_len
    self._pad_id, self._overlong = pad_id, overlong
    self._pending = None  # (prepared example, parent state before reading it)
    self.stats = PackStats()

  def __next__(self) -> dict[str, np.ndarray]:
    rows = _Rows(self._batch_size, self._seq_len, self._pad_id)
    while True:
      if self._pending is not None:
        prepared, before = self._pending
        self._pending = None
      else:
        before = self._parent.get_state()
        try:
          example = next(self._parent)
        except StopIteration:
          break
        prepared = _prepare(example, self._seq_len, self._overlong, self.stats)
        if prepared is None:
          continue
      if not rows.add(*prepared[:2]):
        self._pending = (prepared, before)
        break
      _count(self.stats, *prepared)
    if not len(rows):
      raise StopIteration
    return rows.arrays()

  def get_state(self) -> dict[str, Any]:
    parent = self._pending[1] if self._pending is not None else self._parent.get_state()
    return {"parent": parent, "stats": dataclasses.asdict(self.stats)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None
    self.stats = PackStats(**state["stats"])


class _PackBatchDataset(grain.IterDataset):
  """Packs the parent's examples into fixed-shape batches; see `_PackBatchIterator`."""

  def __init__(self, parent: grain.IterDataset, **kwargs: Any):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> _PackBatchIterator:
    return _PackBatchIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return f"PackBatchDataset({self._kwargs})"


def make_dataset(examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
                 num_epochs: int | None = 1, shuffle: bool = True,
                 overlong: str = "truncate", pad_id: int = tokenizer_lib.PAD_ID,
                 shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """A grain dataset of packed batches: dicts of int32 [batch_size, seq_len] numpy arrays.

  Each epoch visits every example once in a new order (grain's per-epoch shuffle seeds);
  `num_epochs=None` repeats forever. `iter(ds)` has `get_state()` (a JSON-able dict) and
  `set_state()`, which resume exactly. With several hosts, each reads shard `shard_index` of
  `shard_count` and packs its own `batch_size` rows (pass the per-host batch).
  """
  if overlong not in OVERLONG:
    raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG}")
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 2 and batch_size={batch_size} >= 1")
  if not examples:
    raise ValueError("make_dataset: no SFT examples")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  for i, example in enumerate(examples):
    _check_example(i, example)
  ds = grain.MapDataset.source(list(examples))
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs)
  # Packing is cheap Python on small arrays: read in this thread, so the order (and the
  # iterator state) never depends on prefetch threads.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return _PackBatchDataset(ds, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id,
                           overlong=overlong)


# ---------------------------------------------------------------------------------------------
# Loss and training.
# ---------------------------------------------------------------------------------------------

def sft_loss(model: transformer.Transformer,
             batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean negative log-likelihood over the `loss_mask` tokens of the whole batch (plus the
  router's load-balancing loss, weighted by model.router_aux_weight, for a mixture of experts)."""
  logp, _, aux = update.logprobs_and_router_aux(model, batch["tokens"], batch["positions"],
                                                batch["segment_ids"])          # [B, T]
  mask = batch["loss_mask"] > 0
  n = mask.sum()
  # `where`, not a product: the value at an unmasked position must not matter at all.
  loss = -jnp.where(mask, logp, 0.0).sum() / jnp.maximum(n, 1)
  return update.add_router_aux(model, loss, {"tokens": n.astype(jnp.float32)}, aux)


def _optimizer_config(cfg: Any, num_steps: int) -> ml_collections.ConfigDict:
  """The optimizer block with decay_steps filled in: the steps left after the warm-up."""
  opt = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  if not opt.get("decay_steps", 0):
    opt.decay_steps = max(1, num_steps - opt.get("warmup_steps", 0))
  return opt


def count_steps(examples: Sequence[Example], config_sft: Any, *, batch_size: int | None = None,
                pad_id: int = tokenizer_lib.PAD_ID) -> int:
  """Optimizer steps of a run: `steps`, or the packed batches of `epochs` epochs."""
  if config_sft.get("steps", 0):
    return int(config_sft.steps)
  ds = make_dataset(examples, seq_len=config_sft.seq_len,
                    batch_size=batch_size or config_sft.batch_size, seed=config_sft.seed,
                    num_epochs=config_sft.epochs, overlong=config_sft.overlong, pad_id=pad_id,
                    shard_index=jax.process_index(), shard_count=jax.process_count())
  return sum(1 for _ in ds)


def train_sft(model: transformer.Transformer, examples: Sequence[Example], config_sft: Any, *,
              mesh: jax.sharding.Mesh, workdir: str | None = None, progress: bool = True,
              pad_id: int = tokenizer_lib.PAD_ID,
              ) -> tuple[transformer.Transformer, list[float]]:
  """Fine-tunes `model` on `examples`; returns (the trained model, loss of every step).

  config_sft: the `sft` block (`k15.config.sft_block`): seq_len, batch_size, steps or epochs,
  microbatches, overlong, seed, optimizer, checkpoint_every, checkpoint_keep.

  The input model is left as it was. With a `workdir`, params, optimizer state, data-iterator
  state and the loss history are saved to `<workdir>/sft_checkpoints` every
  `checkpoint_every` steps and at the end; a call that finds a checkpoint continues from it,
  and one that finds the final step just returns the saved model (so a rerun pipeline reuses
  a finished SFT). The learning-rate schedule spans the run's steps (`count_steps`), so resume
  with the same `steps`/`epochs`.
  """
  c = config_sft
  hosts = jax.process_count()
  if c.batch_size % hosts:
    raise ValueError(f"sft.batch_size={c.batch_size} is not divisible by the {hosts} hosts")
  local_batch = c.batch_size // hosts
  num_steps = count_steps(examples, c, batch_size=local_batch, pad_id=pad_id)
  if num_steps < 1:
    raise ValueError("SFT has no steps to run: sft.steps and sft.epochs give 0 batches")

  ctx = (contextlib.nullcontext() if parallel.active_mesh() is mesh
         else parallel.use_mesh(mesh))
  with ctx:
    # --- model, optimizer, update step ----------------------------------------------------
    shape = (c.batch_size, c.seq_len)
    batch_sharding = parallel.sharding(("batch", "length"), shape, mesh)
    state = train_loop.prepare(
        model, update.make_optimizer(_optimizer_config(c.optimizer, num_steps)), sft_loss, mesh,
        batch_shardings={k: batch_sharding for k in BATCH_KEYS},
        microbatches=c.get("microbatches", 1))

    # --- input pipeline ---------------------------------------------------------------------
    # steps given: repeat forever and stop at `steps`; else exactly `epochs` epochs.
    ds = make_dataset(examples, seq_len=c.seq_len, batch_size=local_batch, seed=c.seed,
                      num_epochs=None if c.get("steps", 0) else c.epochs,
                      overlong=c.overlong, pad_id=pad_id,
                      shard_index=jax.process_index(), shard_count=hosts)
    data_iter = iter(ds)

    # --- resume -----------------------------------------------------------------------------
    checkpointer = None
    if workdir:
      checkpointer = ckpt_lib.Checkpointer(
          workdir, save_every=c.checkpoint_every, keep=c.checkpoint_keep,
          subdir=CHECKPOINT_SUBDIR)
      if threading.current_thread() is threading.main_thread():
        checkpointer.install_preemption_handler()  # SIGTERM: save at the next step, stop
    step, history, meta = train_loop.resume(state, checkpointer, "SFT", num_steps)
    if meta is not None:
      data_iter.set_state(meta["data"])

    # --- loop -------------------------------------------------------------------------------
    tokens_seen = 0

    def next_batch(step):
      del step
      nonlocal tokens_seen
      try:
        local = next(data_iter)
      except StopIteration:
        return None
      tokens_seen += int(local["loss_mask"].sum())
      return {k: jax.make_array_from_process_local_data(batch_sharding, local[k], shape)
              for k in BATCH_KEYS}

    t0 = time.perf_counter()
    try:
      step = train_loop.run(
          state, next_batch, step=step, num_steps=num_steps, history=history, desc="sft",
          shown={"gnorm": "grad_norm"}, workdir=workdir, checkpointer=checkpointer,
          checkpoint_every=c.checkpoint_every,
          extra_meta=lambda: {"data": data_iter.get_state()}, progress=progress)
    finally:
      if checkpointer is not None:
        checkpointer.close()
    elapsed = time.perf_counter() - t0
    data_iter.stats.log("SFT data")
    if history:
      logging.info("SFT: %d steps, loss %.4f -> %.4f, %.0f loss tokens/s", step, history[0],
                   history[-1], tokens_seen / max(elapsed, 1e-9))
  return state.model(), history


# ---------------------------------------------------------------------------------------------
# Mode `sft`.
# ---------------------------------------------------------------------------------------------

def load_jsonl(path: str) -> list[tuple[str, str]]:
  """(prompt, response) pairs from a JSONL file of {"prompt": ..., "response": ...} lines."""
  out = []
  with epath.Path(path).open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                         f"{type(record).__name__}")
      for key in ("prompt", "response"):
        if not isinstance(record.get(key), str) or not record[key]:
          raise ValueError(f"{path}:{line_no}: missing or empty string field {key!r}")
      out.append((record["prompt"], record["response"]))
  if not out:
    raise ValueError(f"{path}: no SFT examples")
  return out


def synthetic_pairs(config_sft: Any, seed: int) -> list[tuple[str, str]]:
  """(question, long CoT) pairs of the synthetic tasks (train split) in config_sft."""
  from k15.data import tasks  # pylint: disable=g-import-not-at-top
  pairs = []
  for family in config_sft.families:
    for p in tasks.generate(family, config_sft.num_examples, seed=seed, split="train",
                            difficulties=list(config_sft.difficulties)):
      pairs.append((p.prompt, p.long_cot))
  return pairs


def run(config: Any, workdir: str) -> dict:
  """Mode `sft`: fine-tune `config.model` (or `config.model_path`) on `config.sft`'s data."""
  from k15.model import build  # pylint: disable=g-import-not-at-top
  c = config.sft
  if c.data:
    pairs = load_jsonl(c.data)
  else:
    pairs = synthetic_pairs(c, config.seed)
  if c.tokenizer:
    tok = tokenizer_lib.Tokenizer.load(c.tokenizer)
  elif not c.data:
    path = os.path.join(workdir or tempfile.mkdtemp(), tokenizer_lib.MODEL_FILENAME)
    if epath.Path(path).exists():  # a rerun: the tokenizer the checkpoints were trained with
      tok = tokenizer_lib.Tokenizer.load(path)
    else:
      texts = [tokenizer_lib.PROMPT_TEMPLATE.format(question=q) + " " + r for q, r in pairs]
      tok = tokenizer_lib.train_tokenizer(texts, path, c.vocab_size)
  else:
    raise ValueError("config.sft.tokenizer is empty: a tokenizer is trained only for the "
                     "synthetic tasks; point sft.tokenizer at the tokenizer of your model")
  if tok.vocab_size > config.model.vocab_size and not config.get("model_path", ""):
    raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but config.model.vocab_size "
                     f"is {config.model.vocab_size}")
  examples = [tok.render_example(q, r) for q, r in pairs]

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    model = build.build_model(config, mesh)
    model, history = train_sft(model, examples, c, mesh=mesh, workdir=workdir or None,
                               pad_id=tok.pad_id)
  report = {"examples": len(examples), "steps": len(history),
            "first_loss": history[0] if history else None,
            "final_loss": history[-1] if history else None}
  if jax.process_index() == 0:
    print(f"k15 sft: {report}")
    if workdir:
      storage.write_json(os.path.join(workdir, "sft.json"), dict(report, history=history))
  return report
