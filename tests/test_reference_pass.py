"""PMD's reference from the trainer's own forward pass, the partial-rollout training rule for
early finishers, and the optimizer state that lives only while training (k15.rl.trainer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15 import config as k15_config
from k15 import parallel, update
from k15.model import transformer
from k15.rl import trainer as trainer_lib
from k15 import sampling

VOCAB, EOS = 16, 5


def _config(**rl):
  c = k15_config.base(mode="rl", seed=0)
  c.model = k15_config.model_block(vocab_size=VOCAB, embed_dim=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, mlp_dim=64, dtype="float32")
  c.optimizer = k15_config.optimizer_block(learning_rate=3e-3)
  c.rl = k15_config.rl_block(**{**dict(
      iterations=3, prompts_per_iteration=4, samples_per_prompt=4, max_new_tokens=8,
      loss="pmd", tau=0.05, minibatch_groups=2, length_bucket=8), **rl})
  c.rl.sampling.mode = "uniform"
  c.checkpoint = k15_config.checkpoint_block(every=1, keep=1)
  return c


def _reward(ids, responses):
  return np.array([np.mean(np.asarray(r) == 7) for r in responses], np.float32)


def _trainer(config, workdir, mesh, eos_id=None):
  cfg = transformer.ModelConfig.from_config(config.model)
  model = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
  # Prompts of different lengths, so rows carry different amounts of padding.
  prompts = [trainer_lib.Prompt(tokens=[1 + i % 5] * (1 + i % 3) + [3]) for i in range(8)]
  return trainer_lib.RLTrainer(config, model, prompts, _reward, mesh=mesh, workdir=workdir,
                               eos_id=eos_id)


def _record_steps(trainer):
  """Wraps the trainer's train steps so that every minibatch's metrics are kept, in order."""
  calls = []
  make = trainer._train_step

  def train_step(rows):
    fn = make(rows)

    def step(params, opt_state, mb):
      out = fn(params, opt_state, mb)
      calls.append(jax.device_get(out[2]))
      return out

    return step

  trainer._train_step = train_step
  return calls


def test_reference_is_the_samplers_logprobs_at_temperature_one(tmp_path):
  # At temperature 1 and top_p 1 in float32 the sampler draws from pi_i itself, so its log-probs
  # and the trainer's reference pass are one quantity by two programs (KV-cache decode and a
  # teacher-forced chunked forward): equal to float32 rounding.
  config = _config(temperature=1.0, top_p=1.0)
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh, eos_id=EOS)
    ids, finished = trainer._collect(0)
    groups = trainer._ready_groups(finished)
    rewards = np.zeros((len(groups), 4), np.float32)
    batch = trainer_lib.build_batch(groups, rewards, num_groups=len(groups), length=16,
                                    version=0, loss_on_old_segments=False, mask_truncated=False,
                                    drop_equal_reward_groups=False)
    ref = trainer._reference_logprobs(batch)
  cur = batch["current"] > 0
  assert cur.sum() > 20
  diff = np.abs(ref - batch["ref_logp"])[cur]
  assert diff.max() <= 1e-4, diff.max()
  # A reference of the wrong tokens would be far off: the check can fail.
  assert np.abs(ref[:, :-1] - batch["ref_logp"][:, 1:])[cur[:, 1:]].max() > 1e-2
  gap = trainer_lib.sampler_gap(batch["ref_logp"], ref, batch["current"])
  assert gap["rl/sampler_ref_abs_diff_max"] == pytest.approx(diff.max())
  assert 0 < gap["rl/sampler_ref_abs_diff_mean"] <= 1e-4


def test_log_ratio_is_exactly_zero_on_the_first_minibatch(tmp_path):
  # S - S_ref = 0 exactly before the first update of an iteration: the reference pass is the
  # loss's own forward. After that update the second minibatch sees a changed policy.
  config = _config(temperature=0.8, top_p=0.9)   # the sampler's log-probs are tempered
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh)
    calls = _record_steps(trainer)
    for _ in range(2):
      n = len(calls)
      m = trainer.step()
      assert len(calls) - n == 2                 # 4 groups, 2 per minibatch
      first, second = calls[n], calls[n + 1]
      assert float(first["log_ratio_abs_mean"]) == 0.0 and float(first["kl"]) == 0.0
      assert float(second["log_ratio_abs_mean"]) > 0.0
      # Tempered sampling: the sampler's log-probs are not pi_i's, and the metrics say so.
      assert m["rl/sampler_ref_abs_diff_mean"] > 1e-3
      assert m["rl/sampler_ref_seq_abs_diff"] >= m["rl/sampler_ref_abs_diff_mean"]
    # With rl.reference='sampler' the first minibatch's log-ratio is the sampler's bias.
    config.rl.reference = "sampler"
    trainer = _trainer(config, str(tmp_path / "sampler"), mesh)
    calls = _record_steps(trainer)
    m = trainer.step()
    assert float(calls[0]["log_ratio_abs_mean"]) > 1e-2
    assert "rl/sampler_ref_abs_diff_mean" not in m


def test_own_forward_is_the_reference_bit_for_bit(tmp_path):
  # Rows marked ref_self take S_ref from the loss's own forward: the same loss and gradient,
  # bit for bit, as the reference pass's log-probs give, whatever ref_logp holds for them.
  config = _config(temperature=0.8)
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh, eos_id=EOS)
    groups = trainer._ready_groups(trainer._collect(0)[1])
    rewards = np.arange(len(groups) * 4, dtype=np.float32).reshape(-1, 4) % 3
    batch = trainer_lib.build_batch(groups, rewards, num_groups=len(groups), length=16,
                                    version=0, loss_on_old_segments=False, mask_truncated=False,
                                    drop_equal_reward_groups=False)
    batch.pop("current")
    with_pass = dict(batch, ref_logp=trainer._reference_logprobs(batch))
    own = dict(batch, ref_logp=np.full_like(batch["ref_logp"], -7.0),
               ref_self=np.ones_like(batch["ref_self"]))
    wrong = dict(own, ref_self=np.zeros_like(batch["ref_self"]))
    loss_fn = trainer_lib.make_loss_fn(config.rl, 4)
    grad = jax.jit(jax.value_and_grad(
        lambda p, b: loss_fn(nnx.merge(trainer.graphdef, p), b)[0]))
    (l1, g1), (l2, g2), (l3, _) = (grad(trainer.params, b) for b in (with_pass, own, wrong))
  assert float(l1) == float(l2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert abs(float(l3) - float(l1)) > 1e-3  # the -7 reference, used, would change the loss


@pytest.mark.parametrize("minibatch_groups,num_passes,passed", [(2, 1, 2), (4, 1, 0), (2, 2, 4)])
def test_reference_pass_skips_the_first_minibatch(minibatch_groups, num_passes, passed,
                                                  tmp_path):
  # 4 groups per iteration: the pass covers every group but the first minibatch's (none with
  # one minibatch), and all of them when a second pass retrains them after updates.
  config = _config(minibatch_groups=minibatch_groups, num_passes=num_passes, iterations=2)
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh)
    rows = []
    fn = trainer_lib.make_reference_fn(trainer.graphdef, trainer.param_shardings)
    trainer._ref_fn = lambda p, b: rows.append(b["tokens"].shape[0]) or fn(p, b)
    calls = _record_steps(trainer)
    for _ in range(2):
      rows.clear()
      n = len(calls)
      m = trainer.step()
      assert sum(rows) == passed * 4
      assert float(calls[n]["log_ratio_abs_mean"]) == 0.0
      assert ("rl/sampler_ref_abs_diff_mean" in m) == (passed > 0)
      assert np.isfinite(m["train/loss"])


def _traj(sample_index, versions, prompt=(1, 2)):
  n = len(versions)
  return sampling.Trajectory(
      prompt_id=0, prompt=np.asarray(prompt, np.int32), sample_index=sample_index, seed=0,
      tokens=np.arange(1, n + 1, dtype=np.int32), logprobs=np.full(n, -1.0, np.float32),
      versions=np.asarray(versions, np.int32), finish_reason=int(sampling.FinishReason.EOS))


@pytest.mark.parametrize("rule", trainer_lib.EARLY_FINISHERS)
def test_early_finishers_are_trained_or_leave_the_baseline(rule):
  # A group of 3 started in iteration 4 trains in iteration 5: sample 0 finished in 4 (an
  # early finisher, no token of 5), samples 1 and 2 span iterations 4 and 5.
  group = [_traj(0, [4, 4]), _traj(1, [4, 5, 5]), _traj(2, [4, 5])]
  b = trainer_lib.build_batch([group], np.array([[1.0, 0.0, 0.0]]), num_groups=2, length=8,
                              version=5, loss_on_old_segments=False, mask_truncated=False,
                              drop_equal_reward_groups=False, early_finishers=rule)
  resp = lambda row: b["mask"][row, 2:2 + group[row].length]
  np.testing.assert_array_equal(resp(1), [0, 1, 1])          # only the current segment
  np.testing.assert_array_equal(resp(2), [0, 1])
  np.testing.assert_array_equal(b["current"][0], 0)
  if rule == "train":
    np.testing.assert_array_equal(resp(0), [1, 1])           # all of its tokens
    np.testing.assert_array_equal(b["sample_weight"][0], [1, 1, 1])
  else:
    np.testing.assert_array_equal(resp(0), [0, 0])
    np.testing.assert_array_equal(b["sample_weight"][0], [0, 1, 1])  # out of the baseline
  # The rule before this choice gave sample 0 mask 0 and weight 1. Now no sample is in its
  # group's baseline without a gradient:
  has_grad = b["mask"][:3].sum(-1) > 0
  np.testing.assert_array_equal(b["sample_weight"][0] > 0, has_grad)
  np.testing.assert_array_equal(b["sample_weight"][1], 0)    # a padding group


@pytest.mark.slow
@pytest.mark.parametrize("rule", trainer_lib.EARLY_FINISHERS)
def test_partial_rollouts_leave_no_sample_in_the_baseline_without_gradient(rule, tmp_path,
                                                                         monkeypatch):
  # Segments of 2 tokens, responses up to 6, stopping at EOS: samples of a group finish in
  # different iterations. In every batch the trainer builds, a sample in the baseline
  # (weight > 0) has loss tokens.
  config = _config(segment_budget=2, max_new_tokens=6, early_finishers=rule, iterations=4)
  batches = []
  build = trainer_lib.build_batch
  monkeypatch.setattr(trainer_lib, "build_batch",
                      lambda *a, **kw: batches.append(dict(b := build(*a, **kw))) or b)
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh, eos_id=EOS)
    history = trainer.train(progress=False)
  assert all(np.isfinite(m["train/loss"]) for m in history if "train/loss" in m)
  early = 0
  for b in batches:
    real = b["segment_ids"].sum(-1) > 0
    in_baseline = (b["sample_weight"].reshape(-1) > 0) & real
    has_grad = b["mask"].sum(-1) > 0
    early += int(((b["current"].sum(-1) == 0) & real).sum())
    np.testing.assert_array_equal(in_baseline, has_grad & real)
  assert early > 0  # the run had early finishers for the rule to act on


def test_sampler_reference_refuses_to_train_on_older_policies_tokens(tmp_path):
  config = _config(segment_budget=2, reference="sampler", early_finishers="train")
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    with pytest.raises(ValueError, match=r"rl\.reference='sampler'.*early_finishers"):
      _trainer(config, str(tmp_path), mesh)


def test_optimizer_moments_exist_only_while_training_and_resume(tmp_path):
  config = _config()
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh)
    assert trainer.opt_state is None            # nothing resident before the first sampling
    seen = []
    collect = trainer._collect
    trainer._collect = lambda it: (seen.append(trainer.opt_state), collect(it))[1]
    trainer.train(num_iterations=2, progress=False)
    assert seen == [None, None] and trainer.opt_state is None
    # The schedule's step counts the run's optimizer steps: 2 iterations x 2 minibatches.
    assert [int(c) for c in trainer.schedule_counts] == [4]
    params = jax.tree.map(np.asarray, trainer.params)
    again = _trainer(config, str(tmp_path), mesh)
    assert again.maybe_restore() and again.iteration == 2
    assert [int(c) for c in again.schedule_counts] == [4]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again.params)):
      np.testing.assert_array_equal(a, np.asarray(b))


def test_expert_ids_in_the_batch_replay_the_routing():
  # A MoE batch may carry the experts the sampler routed to ([R, T, M, k]); the
  # reference pass and the loss route by them. Replaying the model's own choices changes
  # nothing; replaying other experts changes the log-probs.
  cfg = transformer.ModelConfig(vocab_size=32, embed_dim=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, mlp_dim=48, num_experts=4,
                                experts_per_token=2, moe_mlp_dim=16)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32, (2, 12)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  batch = dict(tokens=tokens, positions=pos, segment_ids=jnp.ones_like(tokens))
  _, routing = model(tokens, pos, return_routing=True)
  own = jnp.stack(routing["expert_ids"], axis=2)                          # [R, T, M, k]
  ref = trainer_lib.make_reference_fn(graphdef)
  plain = np.asarray(ref(params, batch))
  np.testing.assert_allclose(np.asarray(ref(params, dict(batch, expert_ids=own))), plain,
                             atol=1e-6)
  other = (own + 1) % cfg.num_experts
  assert np.abs(np.asarray(ref(params, dict(batch, expert_ids=other))) - plain).max() > 1e-3
  logp, _, _ = update.logprobs_and_router_aux(model, tokens, pos, None, other)
  np.testing.assert_allclose(np.asarray(ref(params, dict(batch, expert_ids=other))),
                             np.asarray(logp), atol=1e-6)
