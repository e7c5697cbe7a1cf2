"""The supervised training loop that SFT and DPO share: setup, resume, steps, checkpoints.

Both fine-tune a copy of a model with one jitted update step over a stream of batches; what
differs is the loss, the batches and what the checkpoint keeps beside the params and optimizer
state (SFT: the data iterator's position). Keeping the loop in one place keeps their behaviour
the same where it should be: the step donates its inputs, so the caller's model is copied first;
a step's metrics are fetched only after the next step is dispatched, so the host never waits on
the device between steps; checkpoints hold the whole loss history; SIGTERM saves and stops.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import metrics as metrics_lib
from k15 import parallel, update


@dataclasses.dataclass
class TrainState:
  """Parameters and optimizer state as the jitted step lays them out, and the step."""
  graphdef: nnx.GraphDef
  params: Any
  opt_state: Any
  param_shardings: Any
  opt_shardings: Any
  step_fn: Callable[[Any, Any, Mapping[str, jax.Array]], tuple[Any, Any, dict]]

  def model(self) -> Any:
    return nnx.merge(self.graphdef, self.params)


def prepare(model: Any, optimizer: optax.GradientTransformation, loss_fn: update.LossFn,
            mesh: jax.sharding.Mesh, *, batch_shardings: Mapping[str, Any],
            microbatches: int = 1) -> TrainState:
  """A copy of `model`'s params (the step donates its inputs, and the caller's model must stay
  usable), fresh optimizer state, and the update step, all laid out for `mesh`."""
  graphdef, params = nnx.split(model)
  param_shardings = parallel.state_shardings(params, mesh)
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)(params)
  opt_state, opt_shardings = update.init_optimizer_state(optimizer, params, param_shardings,
                                                         mesh)
  step_fn = update.make_train_step(
      graphdef, loss_fn, optimizer, microbatches=microbatches, param_shardings=param_shardings,
      opt_shardings=opt_shardings, batch_shardings=batch_shardings)
  return TrainState(graphdef, params, opt_state, param_shardings, opt_shardings, step_fn)


def resume(state: TrainState, checkpointer: ckpt_lib.Checkpointer | None, what: str,
           num_steps: int) -> tuple[int, list[float], dict | None]:
  """Loads the latest checkpoint into `state`, if there is one: (step, loss history, its meta);
  (0, [], None) otherwise."""
  latest = None if checkpointer is None else checkpointer.latest_step()
  if latest is None:
    return 0, [], None
  arrays, meta = checkpointer.restore(latest, abstract_arrays=ckpt_lib.abstract(
      {"params": state.params, "opt_state": state.opt_state},
      {"params": state.param_shardings, "opt_state": state.opt_shardings}))
  state.params, state.opt_state = arrays["params"], arrays["opt_state"]
  logging.info("%s: resumed from step %d of %d", what, latest, num_steps)
  return int(meta["step"]), [float(x) for x in meta["history"]], meta


def run(state: TrainState, next_batch: Callable[[int], Mapping[str, jax.Array] | None], *,
        step: int, num_steps: int, history: list[float], desc: str, shown: Mapping[str, str],
        workdir: str | None, checkpointer: ckpt_lib.Checkpointer | None,
        checkpoint_every: int, extra_meta: Callable[[], dict] = dict,
        progress: bool = True) -> int:
  """Steps from `step` to `num_steps` (or until `next_batch(step)` returns None); returns the
  last step.

  Appends each step's loss to `history`; shows the loss and the `shown` {label: metric} on a
  progress bar and writes every metric under `desc/` to the workdir's metrics. With a
  checkpointer: saves every `checkpoint_every` steps and at the end (params, optimizer state,
  step, history and `extra_meta()`), and on a preemption signal saves and stops early.
  """
  bar = metrics_lib.progress(num_steps, desc=desc, enabled=None if progress else False)
  bar.update(step)
  writer = metrics_lib.MetricWriter(workdir) if workdir else None
  record = lambda m: metrics_lib.record_step(m, history, bar, writer, desc, shown)

  def save(force: bool) -> None:
    if checkpointer is not None:
      checkpointer.save(step, arrays={"params": state.params, "opt_state": state.opt_state},
                        meta={"step": step, "history": history, **extra_meta()}, force=force)

  pending = None  # the previous step's metrics, fetched after the next step is dispatched
  try:
    while step < num_steps:
      batch = next_batch(step)
      if batch is None:
        break
      state.params, state.opt_state, metrics = state.step_fn(state.params, state.opt_state,
                                                             batch)
      step += 1
      if pending is not None:
        record(pending)
      pending = (step, metrics)
      if checkpointer is not None and (step % checkpoint_every == 0 or step == num_steps):
        record(pending)  # the history in the checkpoint is complete
        pending = None
        save(force=step == num_steps)
      if checkpointer is not None and checkpointer.should_stop(step):
        logging.warning("%s: preempted at step %d; saving and stopping", desc, step)
        break
    if pending is not None:
      record(pending)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  save(force=True)  # preempted, or the batches ran out before num_steps: keep the end state
  return step
