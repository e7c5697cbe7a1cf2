"""Routing replay: the sampler records each token's experts, they travel with the trajectory
(partial rollouts, replay buffer, checkpoint) into the training batch, and the trainer's forward
routes by them, so its log-probs are the sampler's where its own routing would differ."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from k15 import parallel, update
from k15.model import transformer
from k15.rl import trainer
from k15 import sampling


def _cfg(**kw):
  return transformer.ModelConfig(**{**dict(
      vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, tie_embeddings=False, num_experts=4, experts_per_token=2, moe_mlp_dim=16),
      **kw})


def _near_tie_model(**kw):
  """An MoE whose router columns for experts 0-2 differ by ~1e-6 of their size: their order
  depends on float rounding, so the sampler (prefill and one-token decode steps) and the
  trainer (whole rows) route some tokens differently in float32, as batch composition and
  kernel choice do at scale. The experts themselves differ, so a flip moves the log-probs."""
  model = transformer.Transformer(_cfg(**kw), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for block in model.layers:
    w = np.array(block.mlp.router[...])
    base = 3 * w[:, 0]
    for e in range(3):
      w[:, e] = base + 1e-6 * rng.normal(size=base.shape)
    block.mlp.router[...] = jnp.asarray(w)
  return model


def _prompts(n=3, seed=1):
  rng = np.random.default_rng(seed)
  return [(i, rng.integers(1, 64, size).tolist()) for i, size in enumerate((5, 9, 3, 7)[:n])]


def _rollout(model, prompts=None, **kw):
  args = dict(num_samples=2, max_new_tokens=12, segment_budget=12, buffer=None,
              policy_version=0, seed=3, eos_id=None)
  return sampling.rollout(model, _prompts() if prompts is None else prompts, **{**args, **kw})


def _batch(finished, version=0):
  groups = [sorted([t for t in finished if t.prompt_id == i], key=lambda t: t.sample_index)
            for i in sorted({t.prompt_id for t in finished})]
  rewards = np.zeros((len(groups), len(groups[0])), np.float32)
  return trainer.build_batch(groups, rewards, num_groups=len(groups), length=32,
                             version=version, loss_on_old_segments=False, mask_truncated=False,
                             drop_equal_reward_groups=False)


def _assert_replay_routes_as_recorded(model, batch):
  ids = batch["expert_ids"]
  _, routing = model(jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                     jnp.asarray(batch["segment_ids"]), return_routing=True,
                     expert_ids=update.replay_ids(jnp.asarray(ids)))
  got = np.stack([np.asarray(a) for a in routing["expert_ids"]], axis=2)
  recorded = ids[..., 0] >= 0
  assert recorded.sum() > 0
  np.testing.assert_array_equal(got[recorded], ids[recorded])


def _mismatch(model, batch):
  m = trainer.routing_mismatch(model, {k: jnp.asarray(v) for k, v in batch.items()})
  return {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("continuous", [False, True])
def test_replay_gives_the_sampler_logprobs_where_routing_differs(continuous):
  model = _near_tie_model()
  finished, _ = _rollout(model, continuous=continuous)
  L = 2
  for t in finished:  # prompt and response, every MoE layer, top-2, compact
    assert t.expert_ids.shape == (t.prompt.size + t.length, L, 2)
    assert t.expert_ids.dtype == np.int8
    assert (t.expert_ids[:-1] >= 0).all() and (t.expert_ids[-1] == -1).all()
  batch = _batch(finished)
  m = _mismatch(model, batch)
  # Without replay: some choices differ, and they move the log-probs.
  assert 0 < m["differ"] / m["choices"] < 0.5
  assert m["gap_max"] > 1e-2
  # With replay: the trainer's log-prob of every response token is the sampler's.
  assert m["gap_replay_max"] <= 1e-4
  # And it routes exactly as recorded.
  _assert_replay_routes_as_recorded(model, batch)


def test_static_and_continuous_sampling_record_the_same_routing():
  model = transformer.Transformer(_cfg(), rngs=nnx.Rngs(2))
  a, _ = _rollout(model)
  b, _ = _rollout(model, continuous=True)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.tokens, y.tokens)
    np.testing.assert_array_equal(x.expert_ids, y.expert_ids)


def _assert_same_routing(got, expected, prompts):
  """Same rows and routing; every prompt token routed, the padding after it never."""
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_array_equal(got.expert_ids, expected.expert_ids)
  np.testing.assert_array_equal(got.prompt_expert_ids, expected.prompt_expert_ids)
  for u, p in enumerate(prompts):
    assert (got.prompt_expert_ids[u, :len(p)] >= 0).all()
    assert (got.prompt_expert_ids[u, len(p):] == -1).all()


@pytest.mark.slow  # compiles the sampler for 8 devices twice: minutes on a loaded machine
@pytest.mark.parametrize("continuous", [False, True])
def test_routing_on_a_data_parallel_mesh_equals_one_device(continuous):
  """Each device samples its own rows and prefills its own prompts (`sampler._entry`): the
  recorded routing comes back in row order and each prompt's from one of its slots."""
  model = transformer.Transformer(_cfg(), rngs=nnx.Rngs(2))
  prompts = [p for _, p in _prompts(4)]
  gen = dict(max_new_tokens=6, eos_id=None, num_samples=[3, 1, 2, 2], continuous=continuous)
  expected = sampling.generate(model, prompts, **gen)
  with parallel.use_mesh(parallel.make_mesh({"data": -1})):
    got = sampling.generate(model, prompts, **gen)
  _assert_same_routing(got, expected, prompts)


@pytest.mark.parametrize("mesh_axes,chunk", [(None, 0), ({"fsdp": 2, "tensor": 4}, 0),
                                             (None, 3), ({"fsdp": 2, "tensor": 4}, 3)])
def test_continuous_prefill_batches_record_the_static_routing(mesh_axes, chunk):
  """The continuous loop prefills prompts in batches as their first samples take a slot (here
  one prompt per batch, two slots, so prompts are prefilled between decode steps, into slots
  reused by earlier prompts), or in chunks of 3 tokens with the decode steps: each prompt's
  prefill routing and each response token's come back as the static path records them, also
  with parameters split over fsdp and tensor."""
  model = transformer.Transformer(_cfg(), rngs=nnx.Rngs(2))
  prompts = [p for _, p in _prompts(4)]
  gen = dict(max_new_tokens=[6, 3, 5, 4], eos_id=None, num_samples=[3, 1, 2, 2], seed=1)
  expected = sampling.generate(model, prompts, continuous=False, **gen)
  cont = dict(continuous=True, slots=2, prefill_batch=1, prefill_chunk=chunk)
  if mesh_axes is None:
    got = sampling.generate(model, prompts, **cont, **gen)
  else:
    with parallel.use_mesh(parallel.make_mesh(mesh_axes)):
      sharded = parallel.create_sharded(lambda: transformer.Transformer(_cfg(), rngs=nnx.Rngs(2)))
      got = sampling.generate(sharded, prompts, **cont, **gen)
  _assert_same_routing(got, expected, prompts)
  for r, n in enumerate(got.lengths):  # every fed-back token routed, the last one never
    assert (got.expert_ids[r, :n - 1] >= 0).all() and (got.expert_ids[r, n - 1:] == -1).all()


def test_bfloat16_sampler_and_float32_trainer():
  """The sampler in bfloat16, the trainer in float32 on the same weights: routing differs
  without replay and agrees 100% with it (the log-probs still differ by bfloat16 rounding)."""
  trainer_model = _near_tie_model()
  sampler_model = transformer.Transformer(_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(sampler_model, nnx.state(trainer_model))
  finished, _ = _rollout(sampler_model)
  batch = _batch(finished)
  m = _mismatch(trainer_model, batch)
  assert m["differ"] / m["choices"] > 0
  assert m["gap"] > 0 and m["gap_replay"] > 0
  _assert_replay_routes_as_recorded(trainer_model, batch)


def test_partial_rollouts_carry_routing_through_the_buffer_and_checkpoint():
  model = _near_tie_model()
  finished, buffer = _rollout(model, segment_budget=5)
  assert not finished and len(buffer) == 6
  # The buffer goes through the checkpoint's JSON and comes back with the same routing.
  state = json.loads(json.dumps(buffer.state_dict()))
  restored = sampling.ReplayBuffer()
  restored.load_state_dict(state)
  for a, b in zip(buffer.trajectories, restored.trajectories):
    assert b.expert_ids.dtype == a.expert_ids.dtype
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
  version = 0
  while len(restored):
    version += 1
    done, restored = _rollout(model, [], buffer=restored, policy_version=version,
                              segment_budget=5)
    finished += done
  assert len(finished) == 6
  for t in finished:
    assert t.num_segments == 3 and t.expert_ids.shape[0] == t.prompt.size + t.length
  # The last segment was drawn under its own prefill's routing of everything before it and
  # its decode's routing: replaying them gives its log-probs exactly.
  m = _mismatch(model, _batch(finished, version=version))
  assert m["tokens"] == 6 * 2
  assert m["gap_replay_max"] <= 1e-4


def test_trajectory_checks_the_routing_length():
  model = transformer.Transformer(_cfg(), rngs=nnx.Rngs(2))
  t = _rollout(model)[0][0]
  d = t.to_dict()
  d["tokens"] = d["tokens"][:-1]
  d["logprobs"] = d["logprobs"][:-1]
  d["versions"] = d["versions"][:-1]
  with pytest.raises(ValueError, match="expert_ids has"):
    sampling.Trajectory.from_dict(d)
  d = t.to_dict()
  d["expert_ids"] = {"dtype": "int8"}
  with pytest.raises(ValueError, match="unreadable expert_ids"):
    sampling.Trajectory.from_dict(d, "buffer trajectory 3")


def test_unrecorded_tokens_take_the_router_own_choice():
  model = transformer.Transformer(_cfg(), rngs=nnx.Rngs(2))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
  logits, routing = model(tokens, return_routing=True)
  ids = [np.asarray(x).copy() for x in routing["expert_ids"]]
  other = [(x + 1) % 4 for x in ids]
  for x in other:
    x[:, 5:] = -1  # nothing recorded from token 5 on
  mixed, got = model(tokens, expert_ids=tuple(jnp.asarray(x) for x in other),
                     return_routing=True)
  for g, o in zip(got["expert_ids"], other):
    np.testing.assert_array_equal(np.asarray(g)[:, :5], o[:, :5])
  # The first layer's router sees the embeddings, whatever earlier tokens were routed to.
  np.testing.assert_array_equal(np.asarray(got["expert_ids"][0])[:, 5:], ids[0][:, 5:])
  # All unrecorded: the model's own forward.
  none = tuple(jnp.full_like(jnp.asarray(x), -1) for x in ids)
  np.testing.assert_allclose(np.asarray(model(tokens, expert_ids=none)), np.asarray(logits),
                             atol=1e-6)


def test_rl_loss_replays_with_the_switch_and_trains_the_router():
  model = _near_tie_model()
  finished, _ = _rollout(model)
  batch = {k: jnp.asarray(v) for k, v in _batch(finished).items()}
  batch["rewards"] = jnp.asarray([[1.0, 0.0]] * 3)

  def loss_fn(replay):
    cfg = ml_collections.ConfigDict(dict(loss="pmd", tau=0.1, clip_eps=0.2,
                                         routing_replay=replay))
    return trainer.make_loss_fn(cfg, k=2)

  own, _ = loss_fn(False)(model, batch)
  replayed, _ = loss_fn(True)(model, batch)
  assert abs(float(own) - float(replayed)) > 1e-6
  # The replayed loss is the PMD loss of the replayed log-probs.
  graphdef, state = nnx.split(model)
  g = jax.grad(lambda s: loss_fn(True)(nnx.merge(graphdef, s), batch)[0])(state)
  for i in range(2):
    assert np.abs(np.asarray(g["layers"][i]["mlp"]["router"].value)).max() > 0


def test_dense_models_record_no_routing():
  model = transformer.Transformer(_cfg(num_experts=0), rngs=nnx.Rngs(2))
  finished, _ = _rollout(model)
  res = sampling.generate(model, [[1, 2, 3]], max_new_tokens=4, eos_id=None)
  assert res.expert_ids is None and res.prompt_expert_ids is None
  assert all(t.expert_ids is None for t in finished)
  assert "expert_ids" not in _batch(finished)
  assert json.loads(json.dumps(finished[0].to_dict()))["expert_ids"] is None


def test_expert_counts():
  ids = np.array([[[0, 1], [2, 3]], [[1, 0], [3, -1]], [[-1, -1], [-1, -1]]], np.int8)
  np.testing.assert_array_equal(trainer.expert_counts(ids, 4), [[2, 2, 0, 0], [0, 0, 1, 2]])
