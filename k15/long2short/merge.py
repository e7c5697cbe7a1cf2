"""Model merging (§2.4): the weighted average of the long-CoT and the short-CoT model.

The average runs on the devices, leaf by leaf, in the parameters' own sharding; no host ever
holds a whole model. Weights must sum to 1 (within 1e-6) and are never silently renormalized,
as a typo in a config would otherwise change the model quietly; negative weights
(extrapolation) are allowed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import parallel
from k15.model import transformer


def _path_name(path) -> str:
  # An nnx Variable flattens to its `.value`; the parameter's name is the path above it.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def merge(states: Sequence[Any], weights: Sequence[float]) -> Any:
  """The weighted average sum_i weights[i] * states[i], leaf by leaf; same pytree as states[0].

  states: nnx.State objects (`nnx.split(model)[1]`) or any parameter pytrees of one structure.
  weights: one per state, summing to 1 (within 1e-6; see the module docstring).

  Runs as one jitted program whose out_shardings are states[0]'s shardings: each device
  averages its own shards, so no host ever holds a whole model. A state laid out differently
  is first moved device-to-device to states[0]'s layout. Floating leaves are averaged in
  float32 (at least) and cast back to states[0]'s dtype, so a state merged with itself under
  weights (1.0,) or (0.5, 0.5) is returned bit for bit; non-floating leaves (counters, keys)
  are taken from states[0].
  """
  states, weights = list(states), [float(w) for w in weights]
  if not states:
    raise ValueError("merge: no states")
  if len(weights) != len(states):
    raise ValueError(f"merge: {len(states)} states but {len(weights)} weights {weights}")
  if not all(math.isfinite(w) for w in weights):
    raise ValueError(f"merge: weights {weights} must be finite")
  if abs(sum(weights) - 1.0) > 1e-6:
    raise ValueError(f"merge: weights {weights} sum to {sum(weights)}, not 1; give weights that "
                     "sum to 1 (they are not renormalized)")

  flat = [jax.tree_util.tree_flatten_with_path(s) for s in states]
  first_paths = [_path_name(p) for p, _ in flat[0][0]]
  first_leaves = [x for _, x in flat[0][0]]
  treedef = flat[0][1]
  for i, (leaves, tdef) in enumerate(flat[1:], start=1):
    paths = [_path_name(p) for p, _ in leaves]
    if tdef != treedef or paths != first_paths:
      missing = sorted(set(first_paths) - set(paths))
      extra = sorted(set(paths) - set(first_paths))
      raise ValueError(f"merge: state {i} has a different structure from state 0; parameters "
                       f"only in state 0: {missing[:5]}, only in state {i}: {extra[:5]}")
    for name, a, (_, b) in zip(first_paths, first_leaves, leaves):
      if _shape(a) != _shape(b):
        raise ValueError(f"merge: parameter {name!r} has shape {_shape(a)} in state 0 "
                         f"but {_shape(b)} in state {i}")

  # Host leaves (numpy) of states[0] go to the default device; the result lives there.
  first_leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in first_leaves]
  shardings = [x.sharding for x in first_leaves]
  columns = []  # per state, its leaves in states[0]'s layout
  for leaves, _ in flat:
    col = []
    for (_, x), s in zip(leaves, shardings):
      if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)):
        x = jax.device_put(x, s)  # device to device (never through a host) for jax arrays
      col.append(x)
    columns.append(col)
  average = _averager(len(columns), tuple(x.dtype for x in first_leaves), tuple(shardings))
  merged = average(columns, jnp.asarray(weights, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, merged)


@functools.lru_cache(maxsize=16)
def _averager(num_states: int, dtypes: tuple, shardings: tuple):
  """The jitted weighted average of `num_states` leaf lists (cached: one compile per layout)."""

  def average(columns, w):
    out = []
    for j, dtype in enumerate(dtypes):
      if not jnp.issubdtype(dtype, jnp.floating):
        out.append(columns[0][j])
        continue
      acc_dtype = jnp.promote_types(dtype, jnp.float32)
      acc = w[0] * columns[0][j].astype(acc_dtype)
      for i in range(1, num_states):
        acc = acc + w[i] * columns[i][j].astype(acc_dtype)
      out.append(acc.astype(dtype))
    return out

  return jax.jit(average, out_shardings=list(shardings))


def merge_checkpoints(model_template: transformer.Transformer, dirs: Sequence[str],
                      weights: Sequence[float], mesh: jax.sharding.Mesh, *,
                      steps: Sequence[int | None] | None = None) -> transformer.Transformer:
  """`merge` of the params of several k15 checkpoints (SFT or RL), as a model.

  dirs: checkpoint directories (those holding the step subdirectories, e.g.
  `DIR/sft/sft_checkpoints`, `DIR/rl/checkpoints`); steps: one per dir (default the latest).
  Each is restored into model_template's layout (`k15.checkpoint.restore_params`) and the
  result has that layout too. All restored models are held on the devices at once
  (len(dirs) model copies).
  """
  dirs = list(dirs)
  steps = list(steps) if steps is not None else [None] * len(dirs)
  if not dirs or len(steps) != len(dirs):
    raise ValueError(f"merge_checkpoints: {len(dirs)} dirs and {len(steps)} steps")
  if len(weights) != len(dirs):
    raise ValueError(f"merge_checkpoints: {len(dirs)} dirs but {len(weights)} weights")
  with mesh_context(mesh):
    graphdef = nnx.graphdef(model_template)
    states = [nnx.state(ckpt_lib.restore_params(model_template, d, step=s))
              for d, s in zip(dirs, steps)]
    return nnx.merge(graphdef, merge(states, weights))


def mesh_context(mesh):
  """`parallel.use_mesh(mesh)`, or nothing when that mesh is already the active one."""
  return (contextlib.nullcontext() if parallel.active_mesh() is mesh
          else parallel.use_mesh(mesh))

