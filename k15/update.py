"""The parameter update shared by SFT, RL and DPO: optimizer, jitted sharded train step.

`make_train_step` turns a loss on (model, batch) into one compiled step
`(params, opt_state, batch, step) -> (params, opt_state, metrics)` with explicit shardings,
buffer donation (the old params and optimizer state are reused in place), gradient
accumulation over microbatches (`lax.scan`, so memory is that of one microbatch) and a guard:
a non-finite loss or gradient skips the update, leaves params and optimizer state as they
were, and reports `skipped=1` in the metrics.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from k15.model import logprobs, transformer

Batch = dict[str, jax.Array]
LossFn = Callable[[transformer.Transformer, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
  """AdamW with linear warm-up then constant or cosine decay, and global-norm clipping.

  cfg keys: learning_rate, warmup_steps, decay ('constant' | 'cosine'), decay_steps,
  end_learning_rate, b1, b2, weight_decay, grad_clip (0 = off).
  """
  lr, warmup = cfg.learning_rate, cfg.get("warmup_steps", 0)
  decay = cfg.get("decay", "constant")
  if decay == "constant":
    after = optax.constant_schedule(lr)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(
        lr, max(1, cfg.decay_steps), alpha=cfg.get("end_learning_rate", 0.0) / lr)
  elif decay == "linear":
    after = optax.linear_schedule(lr, cfg.get("end_learning_rate", 0.0), max(1, cfg.decay_steps))
  else:
    raise ValueError(f"optimizer.decay={decay!r}; expected 'constant', 'cosine' or 'linear'")
  schedule = (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
              if warmup else after)
  parts = []
  if cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95),
                           weight_decay=cfg.get("weight_decay", 0.0)))
  return optax.chain(*parts)


def token_logprobs(model: transformer.Transformer, tokens: jax.Array,
                   positions: jax.Array | None = None,
                   segment_ids: jax.Array | None = None) -> jax.Array:
  """log p(tokens[:, t] | tokens[:, <t]) from one forward pass: [B, T] float32, 0 at t = 0.

  The same function gives the trainer's log-probs and the teacher-forced check of the
  sampler's, so the two can only differ by numerics. The head runs in tiles of the model's
  `logits_chunk` tokens (k15.model.logprobs), never on whole [B, T, V] logits unless one tile
  covers the row.
  """
  return logprobs.token_logprobs_and_entropy(model, tokens, positions, segment_ids)[0]


def logprobs_and_router_aux(model: transformer.Transformer, tokens: jax.Array,
                            positions: jax.Array | None = None,
                            segment_ids: jax.Array | None = None,
                            expert_ids: jax.Array | None = None
                            ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """(log-probs [B, T], entropies [B, T], load-balancing loss or None) from one forward pass.

  What a training loss needs of the policy: the SFT and RL losses add the router's auxiliary
  loss (`add_router_aux`) when the model has experts. For a dense model the third entry is None
  and the forward pass is `token_logprobs`' op for op. The aux loss counts every real token
  (segment id > 0), prompt included, as transformers counts every attended token.
  expert_ids: [B, T, L, k] recorded experts of the L MoE layers (-1: route by the router) to
  replay (`replay_ids`), or None.
  """
  if not model.cfg.num_experts:
    return (*logprobs.token_logprobs_and_entropy(model, tokens, positions, segment_ids), None)
  logp, ent, routing = logprobs.token_logprobs_and_entropy(
      model, tokens, positions, segment_ids, return_routing=True,
      expert_ids=None if expert_ids is None else replay_ids(expert_ids))
  if not routing["router_logits"]:  # every layer listed in moe_dense_layers
    return logp, ent, None
  mask = None if segment_ids is None else segment_ids > 0
  aux = transformer.load_balancing_loss(routing["router_logits"], model.cfg.experts_per_token,
                                        mask)
  return logp, ent, aux


def replay_ids(expert_ids: jax.Array) -> tuple[jax.Array, ...]:
  """Recorded expert ids [B, T, L, k] -> the model's `expert_ids`: one [B, T, k] per MoE layer."""
  return tuple(expert_ids[:, :, i] for i in range(expert_ids.shape[2]))


def add_router_aux(model: transformer.Transformer, loss: jax.Array, metrics: dict,
                   aux: jax.Array | None) -> tuple[jax.Array, dict]:
  """loss + model.router_aux_weight * aux, with aux reported as `router_aux_loss`.

  Unchanged when aux is None (a dense model). At weight 0 the aux loss is still reported: a
  collapsing router shows up in the metrics before it shows up in the reward.
  """
  if aux is None:
    return loss, metrics
  metrics = dict(metrics, router_aux_loss=jax.lax.stop_gradient(aux))
  w = model.cfg.router_aux_weight
  return (loss + w * aux if w else loss), metrics


def _split_microbatches(batch: Batch, n: int) -> Batch:
  """Each entry split along its leading axis into n parts: rows with rows, groups with groups.

  An entry per group ([G, k] rewards) splits with the rows of those groups ([G * k, T]) only
  when n divides G; anything else would pair rows with another group's rewards, so it is an
  error that names the entries.
  """
  bad = {key: tuple(x.shape) for key, x in batch.items() if x.shape[0] % n}
  if bad:
    raise ValueError(f"microbatches={n} does not divide the leading dimension of batch entries "
                     f"{bad}: a microbatch holds whole groups, so the number of microbatches "
                     f"must divide the groups (and rows) of a step")
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                    optimizer: optax.GradientTransformation, *, microbatches: int = 1,
                    param_shardings: Any = None, opt_shardings: Any = None,
                    batch_shardings: Any = None, donate: bool = True):
  """A jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)`.

  params: the nnx State of the model (nnx.split(model)[1]). The batch's leading axis is split
  into `microbatches` equal parts whose gradients are averaged, so a microbatch must hold whole
  groups when the loss is defined per group.
  """

  def loss_of_params(params, mb):
    return loss_fn(nnx.merge(graphdef, params), mb)

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  def step(params, opt_state, batch):
    if microbatches == 1:
      (loss, metrics), grads = grad_fn(params, batch)
    else:
      mbs = _split_microbatches(batch, microbatches)

      def body(acc, mb):
        (l, m), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, acc, (l, m, g)), None

      first = jax.tree.map(lambda x: x[0], mbs)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, metrics, grads), _ = jax.lax.scan(body, zeros, mbs)
      loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, (loss, metrics, grads))

    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # Skip a non-finite step: keep the old params and optimizer state (no NaN reaches them).
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))
    return params, opt_state, metrics

  return jax.jit(
      step,
      in_shardings=(param_shardings, opt_shardings, batch_shardings),
      out_shardings=(param_shardings, opt_shardings, None),
      donate_argnums=(0, 1) if donate else ())


def init_optimizer_state(optimizer: optax.GradientTransformation, params: Any,
                         param_shardings: Any, mesh: jax.sharding.Mesh):
  """(optimizer state, its shardings): moments laid out like their params, the rest replicated.

  Built with explicit out_shardings: `zeros_like` alone does not carry a parameter's sharding
  through jit, and a replicated Adam state would cost a full model copy per device.
  """
  shardings = optimizer_shardings(optimizer, params, param_shardings, mesh)
  return jax.jit(optimizer.init, out_shardings=shardings)(params), shardings


def optimizer_shardings(optimizer: optax.GradientTransformation, params: Any,
                        param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings of `optimizer.init(params)` (params may be abstract): moments like their params."""
  abstract = jax.eval_shape(optimizer.init, params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return optax.tree_map_params(
      optimizer, lambda _, sh: sh, abstract, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))
