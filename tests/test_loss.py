"""Tests for k15/rl/loss.py: exact gradients (float64) of PMD (Eq. 3) and the baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15.rl import loss as loss_lib

P, K, L = 3, 4, 7
TOL = 1e-12


@pytest.fixture(autouse=True)
def x64_strict():
  # float64 so gradients can be compared at 1e-12; implicit rank promotion is an error so the
  # losses' broadcasts are all explicit. Both settings are restored afterwards.
  with jax.enable_x64(True), jax.numpy_rank_promotion("raise"):
    yield


def _batch(seed=0, bool_mask=False, binary_rewards=False):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.05, 3.0, (P, K, L))
  ref_logp = logp + rng.normal(0, 0.3, (P, K, L))
  lengths = rng.integers(1, L + 1, (P, K))
  mask = np.arange(L)[None, None, :] < lengths[..., None]
  if not bool_mask:
    mask = mask.astype(np.float64)
  if binary_rewards:
    rewards = rng.integers(0, 2, (P, K)).astype(np.float64)
  else:
    rewards = rng.normal(0, 1, (P, K))
  return (jnp.asarray(logp), jnp.asarray(ref_logp), jnp.asarray(mask), jnp.asarray(rewards))


def _grad(fn, *args, **kw):
  return jax.grad(lambda lp: fn(lp, *args[1:], **kw)[0])(args[0])


def test_x64_is_active():
  logp, *_ = _batch()
  assert logp.dtype == jnp.float64


@pytest.mark.parametrize("bool_mask", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_pmd_gradient_is_eq3(bool_mask, use_jit):
  logp, ref_logp, mask, rewards = _batch(seed=1, bool_mask=bool_mask)
  tau = 0.37
  fn = jax.jit(loss_lib.pmd_loss) if use_jit else loss_lib.pmd_loss
  g = np.asarray(_grad(fn, logp, ref_logp, mask, rewards, tau))
  m = np.asarray(mask, np.float64)
  s = (m * np.asarray(logp)).sum(-1)
  s_ref = (m * np.asarray(ref_logp)).sum(-1)
  r = np.asarray(rewards)
  adv = r - r.mean(axis=1, keepdims=True)
  expected = -m * (adv - tau * (s - s_ref))[..., None] / (P * K)
  assert g.dtype == np.float64
  np.testing.assert_allclose(g, expected, rtol=0, atol=TOL)
  assert np.all(g[m == 0] == 0)


def test_squared_surrogate_and_eq3_agree():
  logp, ref_logp, mask, rewards = _batch(seed=2)
  tau = 0.1
  r = rewards
  rbar = jnp.mean(r, axis=1, keepdims=True)

  def seq(lp):
    return jnp.sum(mask * lp, axis=-1)

  # The paper's surrogate L, written out independently of loss.py.
  def surrogate(lp):
    return jnp.mean(jnp.square(r - rbar - tau * (seq(lp) - seq(ref_logp))))

  # Eq. 3 is the gradient of this objective (advantage held constant).
  def eq3_objective(lp):
    log_ratio = seq(lp) - seq(ref_logp)
    return jnp.mean(seq(lp) * (r - rbar) - tau / 2 * jnp.square(log_ratio))

  grad_l = jax.grad(surrogate)(logp)
  eq3 = jax.grad(eq3_objective)(logp)
  np.testing.assert_allclose(-grad_l / (2 * tau), eq3, rtol=0, atol=TOL)
  # pmd_loss minimises: its gradient is -Eq. 3 and its value is L / (2 tau).
  value, _ = loss_lib.pmd_loss(logp, ref_logp, mask, rewards, tau)
  np.testing.assert_allclose(_grad(loss_lib.pmd_loss, logp, ref_logp, mask, rewards, tau), -eq3,
                             rtol=0, atol=TOL)
  np.testing.assert_allclose(value, surrogate(logp) / (2 * tau), rtol=1e-13)
  assert np.abs(np.asarray(eq3)).max() > 1e-3  # the check is not vacuous


def test_pmd_token_gradient_formula():
  logp, ref_logp, mask, rewards = _batch(seed=3)
  tau = 0.25
  g = np.asarray(_grad(loss_lib.pmd_token_loss, logp, ref_logp, mask, rewards, tau))
  m = np.asarray(mask)
  r = np.asarray(rewards)
  adv = r - r.mean(axis=1, keepdims=True)
  d = np.asarray(logp) - np.asarray(ref_logp)
  expected = -m * (adv[..., None] - tau * d) / (P * K)
  np.testing.assert_allclose(g, expected, rtol=0, atol=TOL)
  # It differs from the sequence-level gradient whenever sequences have more than one token.
  g_seq = np.asarray(_grad(loss_lib.pmd_loss, logp, ref_logp, mask, rewards, tau))
  assert np.abs(g - g_seq).max() > 1e-3


def test_pmd_losses_agree_on_policy():
  # At theta = theta_i (logp == ref_logp) both PMD variants reduce to REINFORCE's gradient.
  logp, _, mask, rewards = _batch(seed=4)
  g_pmd = _grad(loss_lib.pmd_loss, logp, logp, mask, rewards, 0.5)
  g_tok = _grad(loss_lib.pmd_token_loss, logp, logp, mask, rewards, 0.5)
  g_rf = _grad(loss_lib.reinforce_loss, logp, mask, rewards)
  np.testing.assert_allclose(g_pmd, g_rf, rtol=0, atol=TOL)
  np.testing.assert_allclose(g_tok, g_rf, rtol=0, atol=TOL)


def test_reinforce_gradient_formula():
  logp, _, mask, rewards = _batch(seed=5)
  g = np.asarray(_grad(loss_lib.reinforce_loss, logp, mask, rewards))
  r = np.asarray(rewards)
  adv = r - r.mean(axis=1, keepdims=True)
  np.testing.assert_allclose(g, -np.asarray(mask) * adv[..., None] / (P * K), rtol=0, atol=TOL)


def test_grpo_advantage_normalization():
  logp, _, mask, rewards = _batch(seed=6)
  eps = 1e-6
  # On policy every ratio is 1, nothing is clipped, and d loss / d logp_t = -mask A / (T N).
  g = np.asarray(_grad(loss_lib.grpo_loss, logp, logp, mask, rewards, eps=eps))
  r = np.asarray(rewards)
  adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)
  m = np.asarray(mask)
  tokens = m.sum(-1)
  np.testing.assert_allclose(g, -m * (adv / tokens)[..., None] / (P * K), rtol=0, atol=TOL)
  # Recover A from the gradient: zero mean and unit (population) std in every group.
  a = -(g * P * K).sum(-1)  # = A, since sum_t mask / T = 1
  np.testing.assert_allclose(a.mean(1), 0, atol=1e-10)
  np.testing.assert_allclose(a.std(1), 1, atol=1e-5)
  _, metrics = loss_lib.grpo_loss(logp, logp, mask, rewards)
  assert metrics["clip_frac"] == 0
  np.testing.assert_allclose(metrics["ratio_mean"], 1.0)


def test_grpo_clipping():
  clip_eps = 0.2
  rewards = jnp.array([[1.0, 0.0]])  # A = +1 for sample 0, -1 for sample 1
  # Token log-ratios: far above, inside, far below the clip range.
  d = jnp.log(jnp.array([1.5, 1.05, 0.5]))
  ref_logp = jnp.full((1, 2, 3), -1.0)
  logp = ref_logp + jnp.stack([d, d])[None]
  mask = jnp.ones((1, 2, 3))
  g = np.asarray(_grad(loss_lib.grpo_loss, logp, ref_logp, mask, rewards, clip_eps=clip_eps))
  ratio = np.exp(np.asarray(d))
  a = np.array([0.5, -0.5]) / (0.5 + 1e-6)  # (r - mean) / (std + eps)
  # A > 0: the ratio clipped above (1.5) has zero gradient; the others get -A rho / (T N).
  np.testing.assert_allclose(g[0, 0], [0.0, -a[0] * ratio[1] / 6, -a[0] * ratio[2] / 6],
                             rtol=1e-12, atol=TOL)
  # A < 0: the ratio clipped below (0.5) has zero gradient.
  np.testing.assert_allclose(g[0, 1], [-a[1] * ratio[0] / 6, -a[1] * ratio[1] / 6, 0.0],
                             rtol=1e-12, atol=TOL)
  _, metrics = loss_lib.grpo_loss(logp, ref_logp, mask, rewards, clip_eps=clip_eps)
  np.testing.assert_allclose(metrics["clip_frac"], 2 / 6)


@pytest.mark.parametrize("name", loss_lib.LOSS_NAMES)
def test_sample_weight_drops_samples(name):
  logp, ref_logp, mask, rewards = _batch(seed=7)

  def run(lp, rl, mk, rw, sw=None):
    # Rewards here are N(0, 1): ReST's threshold 0 makes about half of them correct.
    return loss_lib.compute_loss(name, lp, rl, mk, rw, tau=0.3, rest_threshold=0.0,
                                 sample_weight=sw)

  w = np.ones((P, K))
  w[0, 3] = 0.0  # truncated samples
  w[1, 2] = 0.0
  w[2, :] = 0.0  # a group dropped by dynamic sampling
  value, _ = run(logp, ref_logp, mask, rewards, jnp.asarray(w))
  g = np.asarray(jax.grad(lambda lp: run(lp, ref_logp, mask, rewards, jnp.asarray(w))[0])(logp))
  assert np.all(g[0, 3] == 0) and np.all(g[1, 2] == 0) and np.all(g[2] == 0)
  # Dropping is the same as never having drawn the samples: the kept [2, 3, L] sub-batch gives
  # the same loss and gradients (group baselines over kept samples, N = 6 kept samples).
  idx = (np.array([[0], [1]]), np.array([[0, 1, 2], [0, 1, 3]]))
  sub = [x[idx] for x in (logp, ref_logp, mask, rewards)]
  value_sub, _ = run(*sub)
  g_sub = np.asarray(jax.grad(lambda lp: run(lp, *sub[1:])[0])(sub[0]))
  np.testing.assert_allclose(value, value_sub, rtol=1e-12)
  np.testing.assert_allclose(g[idx], g_sub, rtol=0, atol=TOL)
  assert np.abs(g_sub).max() > 1e-6


def test_all_dropped_is_zero_not_nan():
  logp, ref_logp, mask, rewards = _batch(seed=8)
  for name in loss_lib.LOSS_NAMES:
    value, metrics = loss_lib.compute_loss(name, logp, ref_logp, mask, rewards, tau=0.1,
                                           sample_weight=jnp.zeros((P, K)))
    assert value == 0, name
    assert all(np.isfinite(v) for v in metrics.values()), name


def test_compute_loss_dispatch_and_errors():
  logp, ref_logp, mask, rewards = _batch(seed=9)
  v1, _ = loss_lib.compute_loss("pmd", logp, ref_logp, mask, rewards, tau=0.2)
  v2, _ = loss_lib.pmd_loss(logp, ref_logp, mask, rewards, 0.2)
  assert v1 == v2
  v3, _ = loss_lib.compute_loss("grpo", logp, ref_logp, mask, rewards, clip_eps=0.1)
  v4, _ = loss_lib.grpo_loss(logp, ref_logp, mask, rewards, clip_eps=0.1)
  assert v3 == v4
  with pytest.raises(ValueError, match=r"unknown loss 'ppo'.*pmd, pmd_token, grpo, reinforce"):
    loss_lib.compute_loss("ppo", logp, ref_logp, mask, rewards)
  with pytest.raises(ValueError, match="needs tau"):
    loss_lib.compute_loss("pmd_token", logp, ref_logp, mask, rewards)
  with pytest.raises(ValueError, match="tau must be > 0"):
    loss_lib.pmd_loss(logp, ref_logp, mask, rewards, 0.0)
  with pytest.raises(ValueError, match=r"rewards must have shape \(3, 4\)"):
    loss_lib.pmd_loss(logp, ref_logp, mask, rewards[:, :2], 0.1)
  with pytest.raises(ValueError, match="sample_weight"):
    loss_lib.grpo_loss(logp, ref_logp, mask, rewards, sample_weight=jnp.ones((P,)))


def test_metrics():
  logp, ref_logp, mask, _ = _batch(seed=10)
  rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  _, m = loss_lib.pmd_loss(logp, logp, mask, rewards, 0.1)
  np.testing.assert_allclose(m["frac_groups_all_equal"], 2 / 3)
  np.testing.assert_allclose(m["reward_mean"], 5 / 12)
  np.testing.assert_allclose(m["advantage_mean"], 0, atol=1e-15)
  np.testing.assert_allclose(m["advantage_abs_mean"], (0.75 + 3 * 0.25) / 12)
  assert m["kl"] == 0 and m["log_ratio_abs_mean"] == 0
  np.testing.assert_allclose(m["response_tokens_mean"], np.asarray(mask).sum() / 12)
  _, m = loss_lib.pmd_loss(logp, ref_logp, mask, rewards, 0.1)
  assert m["kl"] > 0 and m["log_ratio_abs_mean"] > 0
  assert m["kept_frac"] == 1
  for v in m.values():
    assert v.shape == () and v.dtype == jnp.float64


def test_float32_under_jit():
  with jax.enable_x64(False):
    logp, ref_logp, mask, rewards = (jnp.asarray(x, jnp.float32) for x in _batch(seed=11))
    for name in loss_lib.LOSS_NAMES:
      fn = jax.jit(lambda *a, n=name: loss_lib.compute_loss(n, *a, tau=0.1))
      (value, metrics), g = jax.value_and_grad(fn, has_aux=True)(logp, ref_logp, mask, rewards)
      assert value.dtype == jnp.float32 and g.dtype == jnp.float32, name
      assert np.isfinite(value) and np.all(np.isfinite(g)), name


def test_rest_gradient_is_the_likelihood_of_correct_samples():
  logp, ref_logp, mask, _ = _batch(seed=12)
  # Verifier rewards with a length penalty on top: correct ones above 0.5, wrong ones <= 0.
  rewards = jnp.array([[1.2, 0.9, -0.1, 0.0], [0.0, -0.3, 0.0, 0.0], [1.0, 1.0, 0.8, 1.1]])
  correct = np.asarray(rewards) > 0.5
  g = np.asarray(_grad(loss_lib.rest_loss, logp, mask, rewards))
  m = np.asarray(mask)
  np.testing.assert_allclose(g, -m * correct[..., None] / (P * K), rtol=0, atol=TOL)
  assert np.all(g[~correct] == 0)  # no negative gradient: wrong samples are not pushed down
  # No baseline: a group with no correct sample gives nothing, an all-correct group everything
  # (REINFORCE and PMD give an all-correct group zero advantage).
  assert np.all(g[1] == 0) and np.all(g[2][m[2] > 0] < 0)
  # A wrong sample's reward does not move the correct samples' gradient.
  g2 = np.asarray(_grad(loss_lib.rest_loss, logp, mask, rewards.at[0, 2].set(-5.0)))
  np.testing.assert_allclose(g2, g, rtol=0, atol=TOL)
  # The threshold decides what is correct; compute_loss passes it and the reference log-probs
  # only feed the metrics.
  g_hi = np.asarray(jax.grad(lambda lp: loss_lib.compute_loss(
      "rest", lp, ref_logp, mask, rewards, rest_threshold=1.05)[0])(logp))
  hi = np.asarray(rewards) > 1.05
  np.testing.assert_allclose(g_hi, -m * hi[..., None] / (P * K), rtol=0, atol=TOL)
  value, metrics = loss_lib.compute_loss("rest", logp, ref_logp, mask, rewards)
  np.testing.assert_allclose(value, -(correct * (m * np.asarray(logp)).sum(-1)).sum() / (P * K),
                             rtol=1e-13)
  np.testing.assert_allclose(metrics["correct_frac"], correct.mean())
  assert metrics["kl"] > 0


def test_check_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = lambda **kw: ml_collections.ConfigDict(dict(dict(loss="pmd", tau=0.1, clip_eps=0.2), **kw))
  for name in loss_lib.LOSS_NAMES:
    loss_lib.check_config(cfg(loss=name))
  with pytest.raises(ValueError, match=r"unknown loss 'rset' \(config.rl.loss\).*rest"):
    loss_lib.check_config(cfg(loss="rset"))
  with pytest.raises(ValueError, match=r"config.rl.tau"):
    loss_lib.check_config(cfg(loss="pmd_token", tau=0.0))
  loss_lib.check_config(cfg(loss="rest", tau=0.0))  # tau is not ReST's
  with pytest.raises(ValueError, match=r"config.rl.clip_eps"):
    loss_lib.check_config(cfg(loss="grpo", clip_eps=0.0))


def test_frac_groups_all_equal_ignores_padding_groups():
  logp, ref_logp, mask, _ = _batch(seed=13)
  rewards = jnp.array([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
  # Group 2 is padding, as the trainer builds it: no response tokens, weight 0, rewards 0.
  mask = mask.at[2].set(0.0)
  w = jnp.ones((P, K)).at[2].set(0.0)
  for name in loss_lib.LOSS_NAMES:
    _, m = loss_lib.compute_loss(name, logp, ref_logp, mask, rewards, tau=0.1, sample_weight=w)
    np.testing.assert_allclose(m["frac_groups_all_equal"], 1 / 2, err_msg=name)  # not 2 / 3
  # A real group dropped by dynamic sampling (weight 0, tokens present) still counts.
  _, m = loss_lib.pmd_loss(logp, ref_logp, mask, rewards, 0.1, sample_weight=w.at[1].set(0.0))
  np.testing.assert_allclose(m["frac_groups_all_equal"], 1 / 2)
  _, m = loss_lib.pmd_loss(logp, ref_logp, jnp.zeros_like(mask), rewards, 0.1)
  assert m["frac_groups_all_equal"] == 0  # no real group: 0, not NaN
