"""The RL iteration end to end on a task whose reward is directly learnable."""

import jax
import numpy as np
import pytest
from flax import nnx

from k15 import config as k15_config
from k15 import parallel
from k15.model import transformer
from k15.rl import trainer as trainer_lib

VOCAB, TARGET = 16, 7


def _config(loss, **rl):
  c = k15_config.base(mode="rl", seed=0)
  c.model = k15_config.model_block(vocab_size=VOCAB, embed_dim=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, head_dim=16, mlp_dim=64)
  c.mesh = k15_config.mesh_block(data=-1)
  c.optimizer = k15_config.optimizer_block(learning_rate=3e-3)
  c.rl = k15_config.rl_block(
      iterations=30, prompts_per_iteration=8, samples_per_prompt=8, max_new_tokens=4,
      loss=loss, tau=0.05, minibatch_groups=4, length_bucket=16, **rl)
  c.rl.sampling.mode = "uniform"
  c.checkpoint = k15_config.checkpoint_block(every=1000, keep=1)
  return c


def _reward(ids, responses):
  # Share of the response tokens equal to TARGET: chance is 1/16.
  return np.array([np.mean(np.asarray(r) == TARGET) for r in responses], np.float32)


def _trainer(config, workdir, mesh):
  cfg = transformer.ModelConfig.from_config(config.model)
  model = parallel.create_sharded(
      lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(config.seed)), mesh)
  prompts = [trainer_lib.Prompt(tokens=[1 + i % 5, 2 + i % 3, 3]) for i in range(16)]
  return trainer_lib.RLTrainer(config, model, prompts, _reward, mesh=mesh, workdir=workdir,
                               eos_id=None)


@pytest.mark.parametrize("loss", ["pmd", "grpo"])
def test_rl_learns_a_directly_learnable_reward(loss, tmp_path):
  config = _config(loss)
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh)
    history = trainer.train(progress=False)
  rewards = [m["rl/task_reward"] for m in history]
  assert np.mean(rewards[:2]) < 0.3
  assert np.mean(rewards[-3:]) > 0.9, rewards
  assert all(m["train/skipped"] == 0 for m in history)
  # Everything issue 4 asks the metrics to show, per iteration.
  for key in ("rl/reward", "rl/accuracy", "rl/response_length_mean", "rl/response_length_p90",
              "rl/response_length_max", "rl/share_truncated", "rl/share_repeated",
              "train/entropy", "train/kl", "train/grad_norm", "perf/sample_tokens_per_s",
              "perf/train_tokens_per_s"):
    assert key in history[-1], key
  # MFU needs the devices' peak FLOP/s, which k15 knows for TPUs and GPUs, not for a CPU.
  assert "perf/train_mfu" not in history[-1] and "perf/sample_mfu" not in history[-1]
  assert np.isfinite(history[-1]["train/kl"]) and history[-1]["perf/train_tokens_per_s"] > 0


_WORKER = r'''
import sys, os, json
import jax
import numpy as np
sys.path.insert(0, {tests_dir!r})
import test_rl as t
from k15 import parallel
from flax import nnx
workdir, iterations, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = t._config("pmd", segment_budget=2)
config.rl.max_new_tokens = 5
config.checkpoint.every = 1
config.checkpoint.keep = 2
config.rl.iterations = iterations
mesh = parallel.make_mesh({{"data": -1}})
with parallel.use_mesh(mesh):
  trainer = t._trainer(config, workdir, mesh)
  orig_step = trainer.step
  def step():
    m = orig_step()
    with open(marker, "a") as f:
      f.write(f"{{trainer.iteration}}\n")
    return m
  trainer.step = step
  trainer.train(progress=False)
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(trainer.params)]
  np.savez(os.path.join(workdir, "final.npz"), *leaves)
'''


def _run_worker(tmp_path, workdir, iterations, kill_after=None):
  import os
  import signal
  import subprocess
  import sys
  import time
  script = tmp_path / "worker.py"
  script.write_text(_WORKER.format(tests_dir=os.path.dirname(__file__)))
  marker = tmp_path / f"marker-{os.path.basename(workdir)}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.Popen([sys.executable, str(script), workdir, str(iterations), str(marker)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  if kill_after is None:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    return
  deadline = time.time() + 600
  while time.time() < deadline:
    done = marker.read_text().split() if marker.exists() else []
    if len(done) >= kill_after:
      time.sleep(0.3)  # somewhere inside the next iteration (or its async checkpoint)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return
    time.sleep(0.05)
  proc.kill()
  raise AssertionError("worker did not reach the kill point")


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(tmp_path):
  # Uninterrupted: 6 iterations. Interrupted: SIGKILL after 3, then resume to 6. Partial
  # rollouts are on (segment budget 2 < 5 new tokens), so the replay buffer and the pending
  # groups must round-trip through the checkpoint too.
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  _run_worker(tmp_path, straight, 6)
  _run_worker(tmp_path, resumed, 6, kill_after=3)
  assert not (tmp_path / "resumed" / "final.npz").exists()
  before = (tmp_path / "marker-resumed").read_text().split()
  _run_worker(tmp_path, resumed, 6)    # resumes from its latest complete checkpoint
  after = (tmp_path / "marker-resumed").read_text().split()[len(before):]
  # It continued from a checkpoint (iteration >= 2 done), not from scratch, and finished at 6.
  assert int(after[0]) >= 3 and after[-1] == "6", (before, after)
  a = np.load(tmp_path / "straight" / "final.npz")
  b = np.load(tmp_path / "resumed" / "final.npz")
  assert len(a.files) == len(b.files)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])


def test_readme_curriculum_on_a_pool_smaller_than_the_batch(tmp_path):
  # Curated prompts carry difficulty = 1 - pass rate (higher is harder). The README's
  # '0:all,20:hard' must run on them, and from iteration 20 draw only the hard bucket
  # (difficulty >= 2/3: prompts 2, 3, 4). Its 3 prompts (and the 6 of the whole pool) are fewer
  # than the 8 prompts an iteration draws, so prompts repeat within an iteration.
  pass_rate = [0.9, 0.8, 0.1, 0.2, 0.05, 0.7]
  config = _config("rest")
  config.rl.samples_per_prompt = 4
  config.rl.sampling.curriculum = "0:all,20:hard"
  config.rl.sampling.success_prior_samples = 10
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    cfg = transformer.ModelConfig.from_config(config.model)
    model = parallel.create_sharded(
        lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    prompts = [trainer_lib.Prompt(tokens=[1 + i, 2, 3], difficulty=1 - p, pass_rate=p)
               for i, p in enumerate(pass_rate)]
    trainer = trainer_lib.RLTrainer(config, model, prompts, _reward, mesh=mesh,
                                    workdir=str(tmp_path), eos_id=None)
    np.testing.assert_allclose(trainer.success.rates, pass_rate)  # the curation's, as a prior
    drawn = {}
    sample = trainer.sampler.sample
    trainer.sampler.sample = lambda it, n: drawn.setdefault(it, sample(it, n))
    for it in (0, 20):
      trainer.iteration = it
      m = trainer.step()
      assert m["rl/groups_trained"] == 8, (it, m)  # every draw, repeats included, trained
      assert np.isfinite(m["train/loss"]) and m["train/skipped_steps"] == 0
  assert len(set(drawn[0].tolist())) == 6 and len(drawn[0]) == 8
  assert set(drawn[20].tolist()) == {2, 3, 4}
  # Every sample entered the success table once: 10 prior samples + 4 per draw.
  np.testing.assert_array_equal(
      trainer.success.counts, 10 + 4 * np.bincount(np.concatenate([drawn[0], drawn[20]]),
                                                  minlength=6))


def test_learning_rate_schedule_survives_the_optimizer_reset():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from k15 import update  # pylint: disable=g-import-not-at-top
  opt = update.make_optimizer(k15_config.optimizer_block(learning_rate=1.0, warmup_steps=10))
  params = {"w": jnp.ones(3)}
  state = opt.init(params)
  for _ in range(4):
    _, state = opt.update({"w": jnp.ones(3)}, state, params)
  reset = trainer_lib.carry_schedule_step(opt.init(params), state)
  kind = lambda s, t: [x for x in jax.tree.leaves(s, is_leaf=lambda y: isinstance(y, t))
                       if isinstance(x, t)]
  assert [int(x.count) for x in kind(reset, optax.ScaleByScheduleState)] == [4]
  adam = kind(reset, optax.ScaleByAdamState)
  assert int(adam[0].count) == 0 and float(jnp.abs(adam[0].mu["w"]).max()) == 0  # reset
  # The next step's learning rate is warm-up step 4's (0.4), not step 0's (0).
  updates, _ = opt.update({"w": jnp.ones(3)}, reset, params)
  assert float(jnp.abs(updates["w"]).max()) == pytest.approx(0.4, rel=1e-3)

def test_microbatches_that_would_split_a_group_are_refused(tmp_path):
  # One group per step in 4 microbatches would split its [1, k] rewards: a config error naming
  # both keys, before anything is compiled.
  config = _config("pmd", microbatches=4)
  config.rl.minibatch_groups = 1
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    with pytest.raises(ValueError, match=r"rl\.microbatches=4.*rl\.minibatch_groups=1"):
      _trainer(config, str(tmp_path), mesh)


def test_every_host_holds_the_same_rewards_by_construction(monkeypatch):
  # A grader whose answer depends on the host (as a sandbox's wall-clock timeout can): on 3
  # hosts each grades its own share of the 7 samples, once, and the all-gather of the shares
  # gives every host the same rewards.
  import types  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flat = [types.SimpleNamespace(prompt_id=i, tokens=np.array([i])) for i in range(7)]
  host, graded_by = [0], {}

  def flaky(ids, responses):
    for i in ids:
      graded_by.setdefault(i, []).append(host[0])
    return np.array([i + 10.0 * host[0] for i in ids], np.float32)

  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(jax, "process_index", lambda: host[0])
  shares = []
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: shares.append(np.array(x)) or np.zeros((3,) + x.shape))
  fake = types.SimpleNamespace(reward_fn=flaky)
  for host[0] in range(3):
    trainer_lib.RLTrainer._grade(fake, flat)  # pylint: disable=protected-access
  assert graded_by == {0: [0], 1: [0], 2: [0], 3: [1], 4: [1], 5: [1], 6: [2]}
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack(shares))
  every = []
  for host[0] in range(3):
    every.append(trainer_lib.RLTrainer._grade(fake, flat))  # pylint: disable=protected-access
  for rewards in every:
    np.testing.assert_array_equal(rewards, [0, 1, 2, 13, 14, 15, 26])


def test_stop_when_ends_training_with_a_checkpoint(tmp_path):
  """`train(stop_when=...)` (a budget of sampled tokens, as long2short RL uses it) stops after
  the first iteration it accepts and saves it; rl/sampled_tokens counts the response tokens."""
  config = _config("pmd")
  mesh = parallel.make_mesh({"data": -1})
  spent = []

  def stop_when(m):
    spent.append(m["rl/sampled_tokens"])
    return sum(spent) >= 2 * 8 * 8 * 4  # two iterations' worth at the token limit

  with parallel.use_mesh(mesh):
    trainer = _trainer(config, str(tmp_path), mesh)
    history = trainer.train(stop_when=stop_when, progress=False)
  # No eos: every response runs to the limit, 8 prompts x 8 samples x 4 tokens an iteration.
  assert spent == [256, 256] and len(history) == 2 and trainer.iteration == 2
  assert trainer.checkpointer.latest_step() == 2


@pytest.mark.slow  # three short RL runs (~35 s); tests/test_rollout.py checks the pieces alone
def test_preemption_while_sampling_saves_the_last_iteration_and_resumes_exactly(tmp_path):
  """With rl.preemption_check_tokens the sampler stops between pieces of an iteration; the
  checkpoint is the previous iteration's, and resuming gives what an uninterrupted run gives."""
  config = _config("pmd", preemption_check_tokens=2)
  config.rl.iterations = 3
  mesh = parallel.make_mesh({"data": -1})
  with parallel.use_mesh(mesh):
    straight = _trainer(config, str(tmp_path / "straight"), mesh)
    straight.train(progress=False)

    stopped = _trainer(config, str(tmp_path / "stopped"), mesh)
    checks = []
    # The checks alternate: after the first 2-token piece of an iteration's 4, then after the
    # iteration. The 5th is inside iteration 3's sampling.
    stopped.checkpointer.should_stop = lambda step: checks.append(step) or step == 5
    history = stopped.train(progress=False)
    assert checks == [1, 2, 3, 4, 5] and len(history) == 2
    assert stopped.preempted and stopped.iteration == 2
    stopped.checkpointer.wait()
    assert stopped.checkpointer.latest_step() == 2

    resumed = _trainer(config, str(tmp_path / "stopped"), mesh)
    resumed.train(progress=False)
  assert resumed.iteration == 3
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_batching_chooses_the_sampler_path(tmp_path, monkeypatch):
  # config.rl.batching reaches the sampler as `continuous` (None: its default rule); a bad
  # value is refused naming the key.
  mesh = parallel.make_mesh({"data": -1})
  seen = []

  def rollout(model, prompts, *, buffer, **kw):
    seen.append(kw["continuous"])
    return [], buffer
  monkeypatch.setattr(trainer_lib.sampling, "rollout", rollout)
  with parallel.use_mesh(mesh):
    for batching in ("auto", "static", "continuous"):
      trainer = _trainer(_config("pmd", batching=batching), str(tmp_path / batching), mesh)
      assert trainer.step()["rl/groups_trained"] == 0
    with pytest.raises(ValueError, match=r"config\.rl\.batching='paged'; expected one of "
                                         r"\('auto', 'static', 'continuous'\)"):
      _trainer(_config("pmd", batching="paged"), str(tmp_path / "bad"), mesh)
  assert seen == [None, False, True]
