"""Checkpoints: everything a run needs to continue, saved asynchronously with orbax.

Issue 4 §5 and DESIGN.md ("everything a run needs to continue lives in the checkpoint"). A
checkpoint at step s is a directory `<workdir>/checkpoints/<s>/` with two items:

  arrays  a pytree of arrays (params state, optimizer state, RNG keys, numeric tables such as
          per-prompt success rates), written by every host for the shards it owns (orbax,
          tensorstore). Restoring takes an abstract target whose `.sharding`s decide the layout,
          so a checkpoint saved on one mesh restores onto another mesh or a single device.
  meta    a JSON dict written by process 0 (iteration, data-iterator state, sampler state, the
          replay buffer of unfinished rollouts, a config snapshot). numpy arrays and numpy
          scalars inside it are encoded transparently and come back as numpy; tuples come back
          as lists; dict keys must be strings. Keep big numeric state (success rates of a large
          prompt set) in `arrays` instead: JSON of millions of floats is slow.

Any pytree works for `arrays` (nnx.State, optax states, dicts, lists): it is stored as a
nested dict named by the tree's key paths, and rebuilt with the structure of the restore
target. Typed PRNG keys (`jax.random.key`) are stored as their key data and rewrapped on
restore with the implementation of the target's key.

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it when
every item is complete (on GCS, where renames are not atomic, it writes a commit file last
instead), so a save killed midway is invisible to `latest_step()`; leftover temporary
directories are deleted when the next Checkpointer opens the directory.

Preemption (a TPU VM gets SIGTERM some seconds before it is taken away):

    ckpt = checkpoint.Checkpointer(workdir, save_every=10, keep=3)
    ckpt.install_preemption_handler()
    for step in range(start, num_steps):
      state = train_step(state)
      ckpt.save(step, arrays=..., meta=...)          # every `save_every` steps, async
      if ckpt.should_stop(step):
        ckpt.save(step, arrays=..., meta=..., force=True)
        break
    ckpt.close()                                     # waits for the last save

With one process the handler is a Python SIGTERM handler that only sets a flag; the loop
saves at the next step boundary, so no save ever starts inside a signal handler. With several
processes (jax.distributed) every host must stop at the same step, so `should_stop` asks
JAX's preemption service (`multihost_utils.reached_preemption_sync_point`), which gets the
notice on one host and agrees on a step with all; the Python handler is not installed then,
because it would replace the one JAX's service relies on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any

_ARRAYS = "arrays"
_META = "meta"
_NDARRAY = "__ndarray__"  # marks an encoded numpy array inside meta


# ---------------------------------------------------------------------------------------------
# Pytrees <-> nested dicts of named arrays.
# ---------------------------------------------------------------------------------------------

def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_prng_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_named(tree: PyTree, fn: Callable[[Any], Any]) -> dict:
  """Nested dict {path entry: ...} with fn(leaf) at the leaves; names from the key paths."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not path:
      raise ValueError("`arrays` must be a container (dict, nnx.State, ...), not a bare array")
    node = out
    names = [_key_name(p) for p in path]
    for name in names[:-1]:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"arrays: two leaves share the name {'/'.join(names)}")
    if names[-1] in node:
      raise ValueError(f"arrays: two leaves share the name {'/'.join(names)}")
    node[names[-1]] = fn(leaf)
  return out


def _from_named(named: dict, target: PyTree, fn: Callable[[Any, Any], Any]) -> PyTree:
  """The inverse of `_to_named`: target's structure with fn(stored, target_leaf) leaves."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves = []
  for path, leaf in paths_leaves:
    node = named
    for p in path:
      node = node[_key_name(p)]
    leaves.append(fn(node, leaf))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _key_data_abstract(abstract_key: Any) -> tuple[jax.ShapeDtypeStruct, Any]:
  """(abstract key data, PRNG impl) of an abstract typed key, via public APIs only."""
  impl = []

  def data(k):
    impl.append(jax.random.key_impl(k))
    return jax.random.key_data(k)

  shape = jax.eval_shape(data, jax.ShapeDtypeStruct(abstract_key.shape, abstract_key.dtype))
  # A PartitionSpec shorter than the rank leaves the trailing key-data dims replicated.
  return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=abstract_key.sharding), impl[0]


def abstract(tree: PyTree, shardings: Any = None) -> PyTree:
  """The restore target for `tree` (arrays or ShapeDtypeStructs).

  `shardings` is a pytree of shardings with the structure of `tree` (e.g. from
  `parallel.state_shardings`) or one Sharding for every leaf; by default each leaf keeps its
  own `.sharding`. Typed PRNG keys stay typed keys.
  """
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=shardings or getattr(x, "sharding", None)),
        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ---------------------------------------------------------------------------------------------
# Meta: JSON with numpy arrays.
# ---------------------------------------------------------------------------------------------

def _encode_meta(x: Any, where: str = "meta") -> Any:
  if isinstance(x, Mapping):
    out = {}
    for k, v in x.items():
      if not isinstance(k, str):
        raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be str "
                        f"(convert it, or keep the table in `arrays`)")
      out[k] = _encode_meta(v, f"{where}[{k!r}]")
    return out
  if isinstance(x, (list, tuple)):
    return [_encode_meta(v, f"{where}[{i}]") for i, v in enumerate(x)]
  if isinstance(x, jax.Array):
    x = np.asarray(x)
  if isinstance(x, np.ndarray):
    if x.dtype == object:
      raise TypeError(f"{where}: object arrays can't be stored in meta")
    return {_NDARRAY: x.tolist(), "dtype": x.dtype.str, "shape": list(x.shape)}
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  raise TypeError(f"{where}: a {type(x).__name__} is not JSON-able; meta holds dicts, lists, "
                  f"str, numbers, bools, None and numpy arrays")


def _decode_meta(x: Any) -> Any:
  if isinstance(x, dict):
    if _NDARRAY in x:
      return np.asarray(x[_NDARRAY], dtype=np.dtype(x["dtype"])).reshape(x["shape"])
    return {k: _decode_meta(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_decode_meta(v) for v in x]
  return x


# ---------------------------------------------------------------------------------------------
# The checkpointer.
# ---------------------------------------------------------------------------------------------

class Checkpointer:
  """Saves every `save_every` steps (asynchronously), keeps the last `keep`, restores anywhere.

  `directory` is the run's workdir (checkpoints go to `<workdir>/checkpoints`) or, with
  `subdir=None`, the checkpoint directory itself; local paths and gs:// both work.
  """

  def __init__(self, directory: str | epath.PathLike, *, save_every: int, keep: int | None,
               async_save: bool = True, subdir: str | None = "checkpoints"):
    if save_every < 1:
      raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
    if keep is not None and keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1 or None (keep all), got {keep}")
    # orbax (tensorstore) refuses relative local paths; `--workdir=runs/x` is common.
    path = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    self.directory = path / subdir if subdir else path
    self.save_every = save_every
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        # Save exactly at multiples of save_every (and at a JAX preemption sync point); orbax's
        # default would also save the first step of a fresh run.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy()]),
        # Removes what a killed save left behind; such directories are never restored from.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_ARRAYS: ocp.StandardCheckpointHandler(),
                       _META: ocp.JsonCheckpointHandler()})
    self._preempted = threading.Event()
    self._previous_handlers: dict[int, Any] = {}

  # -- saving -----------------------------------------------------------------------------------

  def save(self, step: int, *, arrays: PyTree, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Starts saving step `step` if it is due (or `force`); returns whether it started.

    Returns as soon as the arrays are copied off the devices, so the caller may donate or
    overwrite them; the files are written in the background. A step that is already saved
    is not saved again (returns False), so a forced save after a periodic one is harmless.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    def leaf(x):
      if _is_prng_key(x):
        return jax.random.key_data(x)
      # Host arrays are copied so that the caller may change them while the write goes on;
      # orbax copies device arrays to the host before `save` returns.
      return np.array(x) if isinstance(x, np.ndarray) else x

    named = _to_named(arrays, leaf)
    encoded = _encode_meta(dict(meta or {}))
    return self._manager.save(
        step, force=True,
        args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardSave(named),
                                   _META: ocp.args.JsonSave(encoded)}))

  def wait(self) -> None:
    """Blocks until the pending save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the pending save, then releases orbax's threads and the signal handler."""
    self._manager.wait_until_finished()
    self._manager.close()
    self.uninstall_preemption_handler()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- reading ----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, ascending; a save still in flight counts once it is committed."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The last committed step, or None; interrupted saves are never returned."""
    return self._manager.latest_step()

  def restore(self, step: int | None = None, *,
              abstract_arrays: PyTree | None = None) -> tuple[PyTree, dict]:
    """Returns (arrays, meta) of `step` (default: the latest).

    `abstract_arrays` is the target: a pytree with the structure of the saved one whose
    leaves are jax.ShapeDtypeStruct with `.sharding` (the layout to restore into, on any
    mesh; see `abstract`) or numpy arrays (restored as numpy). Without a target everything
    comes back as numpy in a nested dict named by the saved key paths, typed PRNG keys as their
    raw key data (for inspection in notebooks).
    """
    self._manager.wait_until_finished()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"saved steps: {steps}")

    if abstract_arrays is None:
      # Straight onto the host: no target needed, and nothing is placed on any device.
      metadata = self._manager.item_metadata(step)[_ARRAYS]
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
      with ocp.PyTreeCheckpointer() as reader:
        named = reader.restore(self.directory / str(step) / _ARRAYS,
                               args=ocp.args.PyTreeRestore(restore_args=restore_args))
      return named, self._restore_meta(step)

    def target(leaf):
      if _is_prng_key(leaf):
        leaf = _key_data_abstract(leaf)[0]
      if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
        raise ValueError(f"restore target {leaf} has no sharding; give each "
                         f"jax.ShapeDtypeStruct a sharding (checkpoint.abstract) or use a "
                         f"numpy array to restore onto the host")
      return leaf

    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _ARRAYS: ocp.args.StandardRestore(_to_named(abstract_arrays, target)),
        _META: ocp.args.JsonRestore()}))
    named, meta = restored[_ARRAYS], _decode_meta(restored[_META] or {})

    def rebuild(stored, leaf):
      if _is_prng_key(leaf):
        return jax.random.wrap_key_data(stored, impl=_key_data_abstract(leaf)[1])
      return stored

    return _from_named(named, abstract_arrays, rebuild), meta

  def _restore_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))
    return _decode_meta(restored[_META] or {})

  # -- preemption -------------------------------------------------------------------------------

  def install_preemption_handler(self, callback: Callable[[], None] | None = None,
                                 signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """On SIGTERM, marks the run preempted (see `should_stop`); `callback` runs too.

    The handler does no I/O; `callback` should be as light (it runs between Python bytecodes
    of the main thread, possibly inside a jitted call's dispatch). Must be called from the
    main thread. A no-op with several JAX processes, where JAX's preemption service takes
    the signal (module docstring).
    """
    if jax.process_count() > 1:
      logging.info("multi-host run: preemption is detected by JAX's preemption service")
      return

    def handler(signum, frame):
      del frame
      self._preempted.set()
      logging.warning("received signal %d: saving a checkpoint at the end of this step", signum)
      if callback is not None:
        callback()

    for sig in signals:
      self._previous_handlers[sig] = signal.signal(sig, handler)

  def uninstall_preemption_handler(self) -> None:
    """Restores the handlers that were there before `install_preemption_handler`."""
    if threading.current_thread() is not threading.main_thread():
      return
    for sig, previous in self._previous_handlers.items():
      signal.signal(sig, previous)
    self._previous_handlers.clear()

  @property
  def preempted(self) -> bool:
    """Whether this process got the preemption signal."""
    return self._preempted.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether the loop should save (force=True) and exit after `step`.

    Call it once per step on every process: with several processes it is a synchronization
    point of JAX's preemption service, and all of them get the same answer at the same step.
    """
    if self._preempted.is_set():
      return True
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False
    return False


def restore_params(model: Any, directory: str, step: int | None = None) -> Any:
  """`model` with the `params` of a k15 checkpoint (SFT or RL), laid out like model's own.

  `directory` is a checkpoint directory (holding step subdirectories), e.g.
  `<workdir>/sft_checkpoints`. Restores through host memory, so other items saved beside the
  params (optimizer state, tables) need no target.
  """
  checkpointer = Checkpointer(directory, save_every=1, keep=None, subdir=None)
  try:
    named, _ = checkpointer.restore(step)
  finally:
    checkpointer.close()
  if "params" not in named:
    raise ValueError(f"checkpoint in {directory} has no 'params' item; it has "
                     f"{sorted(named)}")
  graphdef, state = nnx.split(model)

  def load(path, leaf):
    node = named["params"]
    names = []
    for entry in path:
      name = next(str(getattr(entry, a)) for a in ("key", "name", "idx") if hasattr(entry, a))
      names.append(name)
      if not isinstance(node, dict) or name not in node:
        raise ValueError(f"checkpoint in {directory} lacks params/{'/'.join(names)}")
      node = node[name]
    if tuple(node.shape) != tuple(leaf.shape):
      raise ValueError(f"params/{'/'.join(names)}: checkpoint shape {node.shape} != model "
                       f"shape {leaf.shape}")
    return jax.device_put(np.asarray(node, leaf.dtype), leaf.sharding)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(load, state))
