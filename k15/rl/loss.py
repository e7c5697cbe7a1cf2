"""RL losses on groups of sampled responses: policy mirror descent and baselines.

Kimi k1.5 §2.3.2 (see ../shared/k15-paper.md). Each iteration samples k responses per prompt
from the current policy pi_i, which is also the reference of the mirror-descent step. The
surrogate the paper minimises is

  L(theta) = E_x E_{y~pi_i} [ (r - tau log Z - tau log(pi_theta(y|x) / pi_i(y|x)))^2 ],

with tau log Z approximated by the group's mean reward rbar, and its gradient (Eq. 3)

  (1/k) sum_j [ grad log pi_theta(y_j|x) (r_j - rbar) - tau/2 grad (log pi_theta/pi_i)^2 ]
  = -(1/(2 tau)) grad L.

Every function here is a pure, jittable function of per-token log-probs; none calls a model.

Shapes (letters used below):
  P  prompts in the batch
  K  samples per prompt (the paper's k)
  L  padded response length

Common arguments:
  logp:          [P, K, L] log pi_theta(y_t | x, y_<t) of the sampled tokens; differentiated.
  ref_logp:      [P, K, L] the same under pi_i, the policy that sampled the batch (the RL
                 trainer computes them with the loss's own forward pass before its first update,
                 so S - S_ref starts at exactly 0); a constant (stop_gradient).
  mask:          [P, K, L] 1 on response tokens that enter the loss, 0 on padding (bool or float).
  rewards:       [P, K] scalar reward of each response; a constant.
  sample_weight: optional [P, K] weight of each sample, 1 by default. 0 drops a sample: a
                 truncated response, or a group removed by dynamic sampling. A dropped sample is
                 treated as if it had never been drawn: it contributes no gradient, it is left
                 out of its group's mean (and, for GRPO, standard deviation), and the loss is
                 normalised by the number of kept samples sum(sample_weight) instead of P * K.
                 Fractional weights scale a sample's contribution the same way.

Every loss returns (loss, metrics): a scalar to minimise and a dict of scalar diagnostics
(stop-gradient), all in the dtype of logp, so float64 works under jax_enable_x64.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]

LOSS_NAMES = ("pmd", "pmd_token", "grpo", "reinforce", "rest")


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------


def _check_shapes(logp, ref_logp, mask, rewards, sample_weight) -> None:
  """Raises ValueError naming the argument whose shape is inconsistent."""
  shape = jnp.shape(logp)
  if len(shape) != 3:
    raise ValueError(f"logp must be [P, K, L], got shape {shape}")
  named = {"ref_logp": (ref_logp, shape), "mask": (mask, shape), "rewards": (rewards, shape[:2]),
           "sample_weight": (sample_weight, shape[:2])}
  for name, (x, want) in named.items():
    if x is not None and jnp.shape(x) != want:
      raise ValueError(f"{name} must have shape {want} (logp is [P, K, L] = {shape}), "
                       f"got {jnp.shape(x)}")


def _check_tau(tau) -> None:
  # A traced tau can't be checked; a Python number can, and tau <= 0 would divide by zero in
  # the squared form (tau = 0 is plain REINFORCE: use loss 'reinforce').
  if isinstance(tau, (int, float)) and not tau > 0:
    raise ValueError(f"tau must be > 0 for the PMD losses (config.rl.tau), got tau={tau}")


def _prepare(logp, ref_logp, mask, rewards, sample_weight):
  """Casts to logp's dtype, stops gradients on constants, returns (mask, r, ref, w, n)."""
  dtype = logp.dtype
  mask = jax.lax.stop_gradient(jnp.asarray(mask).astype(dtype))
  rewards = jax.lax.stop_gradient(jnp.asarray(rewards).astype(dtype))
  if ref_logp is not None:
    ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp).astype(dtype))
  if sample_weight is None:
    w = jnp.ones(rewards.shape, dtype)
  else:
    w = jax.lax.stop_gradient(jnp.asarray(sample_weight).astype(dtype))
  # n = number of kept samples (P * K without weights); all-dropped batches give loss 0, not NaN.
  n = jnp.sum(w)
  n = jnp.where(n > 0, n, jnp.ones_like(n))
  return mask, rewards, ref_logp, w, n


def _group_mean(x: Array, w: Array) -> Array:
  """Weighted mean over the K samples of each group: [P, K] -> [P, 1]."""
  wsum = jnp.sum(w, axis=1, keepdims=True)
  return jnp.sum(w * x, axis=1, keepdims=True) / jnp.where(wsum > 0, wsum, jnp.ones_like(wsum))


def _weighted_mean(x: Array, w: Array, n: Array) -> Array:
  return jnp.sum(w * x) / n


def _common_metrics(logp, ref_logp, mask, rewards, w, n, adv) -> Metrics:
  """Diagnostics shared by all losses; all stop-gradient."""
  logp = jax.lax.stop_gradient(logp)
  m = {}
  m["reward_mean"] = _weighted_mean(rewards, w, n)
  m["advantage_mean"] = _weighted_mean(adv, w, n)
  m["advantage_abs_mean"] = _weighted_mean(jnp.abs(adv), w, n)
  # Groups whose rewards are all equal give no learning signal (zero advantage); counted over
  # all real groups, before any dynamic-sampling drop, so the metric shows how many were
  # dropped. A group without a response token is padding (fixed batch shapes) and not counted.
  real = (jnp.sum(mask, axis=(1, 2)) > 0).astype(logp.dtype)  # [P]
  equal = (jnp.max(rewards, axis=1) == jnp.min(rewards, axis=1)).astype(logp.dtype)  # [P]
  m["frac_groups_all_equal"] = jnp.sum(real * equal) / jnp.maximum(jnp.sum(real), 1)
  m["kept_frac"] = jnp.sum(w) / w.size
  m["response_tokens_mean"] = _weighted_mean(jnp.sum(mask, axis=-1), w, n)
  if ref_logp is not None:
    d = logp - ref_logp  # [P, K, L] per-token log(pi_theta / pi_i)
    seq_log_ratio = jnp.sum(mask * d, axis=-1)  # [P, K]
    m["log_ratio_abs_mean"] = _weighted_mean(jnp.abs(seq_log_ratio), w, n)
    # KL(pi_i || pi_theta) per sequence from samples of pi_i: sum over tokens of the
    # non-negative, unbiased "k3" estimator rho - 1 - log rho with rho = pi_theta / pi_i.
    k3 = jnp.sum(mask * (jnp.expm1(d) - d), axis=-1)
    m["kl"] = _weighted_mean(k3, w, n)
  return m


# ---------------------------------------------------------------------------------------------
# Policy mirror descent (the k1.5 loss).
# ---------------------------------------------------------------------------------------------


def pmd_loss(
    logp: Array,
    ref_logp: Array,
    mask: Array,
    rewards: Array,
    tau: float | Array,
    *,
    sample_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """Sequence-level policy-mirror-descent loss (k1.5 §2.3.2, Eq. 3).

  With S = sum_t mask * logp and S_ref the same for ref_logp (sequence log-probs, [P, K]),
  rbar the group mean reward (including the sample itself, no std normalisation) and
  N = P * K (or the number of kept samples), the loss is the paper's squared surrogate
  scaled by 1 / (2 tau):

    loss = 1 / (2 tau N) * sum_{p,j} (r_pj - rbar_p - tau (S_pj - S_ref_pj))^2,

  so that its gradient with respect to logp is exactly Eq. 3 (negated, to minimise):

    d loss / d logp[p, j, t] = -mask[p, j, t] * [(r_pj - rbar_p) - tau (S_pj - S_ref_pj)] / N.

  Args:
    logp: [P, K, L] per-token log-probs under the parameters being trained.
    ref_logp: [P, K, L] per-token log-probs under the sampling policy pi_i.
    mask: [P, K, L] response-token mask.
    rewards: [P, K] rewards.
    tau: KL-regularisation strength, > 0.
    sample_weight: optional [P, K] sample weights (see module docstring).

  Returns:
    (loss, metrics).
  """
  _check_shapes(logp, ref_logp, mask, rewards, sample_weight)
  _check_tau(tau)
  mask, rewards, ref_logp, w, n = _prepare(logp, ref_logp, mask, rewards, sample_weight)
  adv = rewards - _group_mean(rewards, w)  # [P, K]
  log_ratio = jnp.sum(mask * (logp - ref_logp), axis=-1)  # [P, K] = S - S_ref
  residual = adv - tau * log_ratio  # [P, K]
  loss = jnp.sum(w * jnp.square(residual)) / (2 * tau * n)
  metrics = _common_metrics(logp, ref_logp, mask, rewards, w, n, adv)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


def pmd_token_loss(
    logp: Array,
    ref_logp: Array,
    mask: Array,
    rewards: Array,
    tau: float | Array,
    *,
    sample_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """Token-level variant of `pmd_loss`: the log-ratio regulariser is applied per token.

  The same squared surrogate, but with one residual per response token instead of one per
  sequence (d_t = logp_t - ref_logp_t):

    loss = 1 / (2 tau N) * sum_{p,j,t} mask * (r_pj - rbar_p - tau d_pjt)^2,

    d loss / d logp[p, j, t] = -mask[p, j, t] * [(r_pj - rbar_p) - tau d_pjt] / N.

  Up to a constant in theta this is the per-token policy gradient plus (tau/2) sum_t d_t^2,
  the form used by ROLL's `kimi15` variant. Tokens are summed within a sequence (not
  averaged), as in the sequence-level loss, so the advantage term's gradient is the same.

  Args: as `pmd_loss`.

  Returns:
    (loss, metrics).
  """
  _check_shapes(logp, ref_logp, mask, rewards, sample_weight)
  _check_tau(tau)
  mask, rewards, ref_logp, w, n = _prepare(logp, ref_logp, mask, rewards, sample_weight)
  adv = rewards - _group_mean(rewards, w)  # [P, K]
  residual = adv[..., None] - tau * (logp - ref_logp)  # [P, K, L]
  per_seq = jnp.sum(mask * jnp.square(residual), axis=-1)  # [P, K]
  loss = jnp.sum(w * per_seq) / (2 * tau * n)
  metrics = _common_metrics(logp, ref_logp, mask, rewards, w, n, adv)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Baselines for ablations.
# ---------------------------------------------------------------------------------------------


def grpo_loss(
    logp: Array,
    ref_logp: Array,
    mask: Array,
    rewards: Array,
    *,
    clip_eps: float = 0.2,
    eps: float = 1e-6,
    sample_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """GRPO: group-normalised advantages with a PPO-clipped token ratio.

  A = (r - mean_group(r)) / (std_group(r) + eps), with the population standard deviation
  (ddof = 0) over the kept samples of the group. With rho_t = exp(logp_t - ref_logp_t), where
  ref_logp is the sampling (old) policy,

    seq_loss = -(1 / T) sum_t mask_t min(rho_t A, clip(rho_t, 1 - clip_eps, 1 + clip_eps) A),

  T = number of response tokens of the sequence (token mean per sequence, as in the GRPO
  paper), and loss = sum w * seq_loss / N. No KL penalty to a frozen reference model.

  Args:
    logp, ref_logp, mask, rewards, sample_weight: see the module docstring.
    clip_eps: PPO clip range.
    eps: added to the group standard deviation.

  Returns:
    (loss, metrics); metrics add `clip_frac` (share of response tokens whose ratio is clipped
    on the side that zeroes the gradient) and `ratio_mean`.
  """
  _check_shapes(logp, ref_logp, mask, rewards, sample_weight)
  mask, rewards, ref_logp, w, n = _prepare(logp, ref_logp, mask, rewards, sample_weight)
  mean = _group_mean(rewards, w)  # [P, 1]
  std = jnp.sqrt(_group_mean(jnp.square(rewards - mean), w))  # [P, 1]
  adv = (rewards - mean) / (std + eps)  # [P, K]
  ratio = jnp.exp(logp - ref_logp)  # [P, K, L]
  a = adv[..., None]  # [P, K, 1]
  unclipped = ratio * a
  clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * a
  per_token = -jnp.minimum(unclipped, clipped)  # [P, K, L]
  tokens = jnp.sum(mask, axis=-1)  # [P, K]
  per_seq = jnp.sum(mask * per_token, axis=-1) / jnp.maximum(tokens, 1)
  loss = jnp.sum(w * per_seq) / n
  metrics = _common_metrics(logp, ref_logp, mask, rewards, w, n, adv)
  is_clipped = jax.lax.stop_gradient(clipped < unclipped).astype(logp.dtype)
  token_w = mask * w[..., None]
  ntok = jnp.maximum(jnp.sum(token_w), 1)
  metrics["clip_frac"] = jnp.sum(token_w * is_clipped) / ntok
  metrics["ratio_mean"] = jnp.sum(token_w * jax.lax.stop_gradient(ratio)) / ntok
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


def reinforce_loss(
    logp: Array,
    mask: Array,
    rewards: Array,
    *,
    ref_logp: Array | None = None,
    sample_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """REINFORCE with the group-mean baseline: loss = -sum w (r - rbar) S / N.

  Gradient: d loss / d logp[p, j, t] = -mask * (r_pj - rbar_p) / N, i.e. Eq. 3 with tau = 0.
  ref_logp, if given, only feeds the KL metrics.
  """
  _check_shapes(logp, ref_logp, mask, rewards, sample_weight)
  mask, rewards, ref_logp, w, n = _prepare(logp, ref_logp, mask, rewards, sample_weight)
  adv = rewards - _group_mean(rewards, w)  # [P, K]
  seq_logp = jnp.sum(mask * logp, axis=-1)  # [P, K] = S
  loss = -jnp.sum(w * adv * seq_logp) / n
  metrics = _common_metrics(logp, ref_logp, mask, rewards, w, n, adv)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


def rest_loss(
    logp: Array,
    mask: Array,
    rewards: Array,
    *,
    threshold: float = 0.5,
    ref_logp: Array | None = None,
    sample_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """ReST: maximum likelihood on the correct samples only (reward-filtered fine-tuning).

  The "no negative gradients" baseline of the paper's ablation (PMD vs ReST): a sample
  is correct when its reward is above `threshold`, c_pj = 1[r_pj > threshold]; correct samples
  are trained on with the log-likelihood, wrong ones contribute nothing (no push down):

    loss = -sum_{p,j} w c_pj S_pj / N,     d loss / d logp[p, j, t] = -mask * w c_pj / N,

  with S = sum_t mask * logp, N the number of kept samples. The default threshold 0.5 splits
  the verifier's 0/1 reward (k15's RL trainer counts a task reward above 0.5 as correct too);
  the length penalty of §2.3.3 with a weight below 1 keeps correct samples above 0.5 and wrong
  ones at or below 0, so the split survives it. Normalising by N (not by the number of correct
  samples) keeps the step on the scale of the policy-gradient losses, whose gradients are also
  sums over samples divided by N. ref_logp, if given, only feeds the KL metrics.

  Returns:
    (loss, metrics); the common metrics' `advantage_*` are those of c (the per-sample weight of
    the log-likelihood), and `correct_frac` is the share of kept samples that are correct.
  """
  _check_shapes(logp, ref_logp, mask, rewards, sample_weight)
  mask, rewards, ref_logp, w, n = _prepare(logp, ref_logp, mask, rewards, sample_weight)
  correct = (rewards > threshold).astype(logp.dtype)  # [P, K]
  seq_logp = jnp.sum(mask * logp, axis=-1)  # [P, K] = S
  loss = -jnp.sum(w * correct * seq_logp) / n
  metrics = _common_metrics(logp, ref_logp, mask, rewards, w, n, correct)
  metrics["correct_frac"] = _weighted_mean(correct, w, n)
  metrics["loss"] = jax.lax.stop_gradient(loss)
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Selection by config string (config.rl.loss).
# ---------------------------------------------------------------------------------------------


def compute_loss(
    name: str,
    logp: Array,
    ref_logp: Array,
    mask: Array,
    rewards: Array,
    *,
    tau: float | Array | None = None,
    clip_eps: float = 0.2,
    eps: float = 1e-6,
    rest_threshold: float = 0.5,
    sample_weight: Array | None = None,
) -> tuple[Array, Metrics]:
  """Dispatches to the loss named by `name` (one of LOSS_NAMES), passing what it uses.

  `tau` is required by 'pmd' and 'pmd_token'; `clip_eps` and `eps` are used by 'grpo' only,
  `rest_threshold` by 'rest' only.
  """
  check_name(name)
  if name in ("pmd", "pmd_token"):
    if tau is None:
      raise ValueError(f"loss {name!r} needs tau (config.rl.tau)")
    fn: Callable[..., Any] = pmd_loss if name == "pmd" else pmd_token_loss
    return fn(logp, ref_logp, mask, rewards, tau, sample_weight=sample_weight)
  if name == "grpo":
    return grpo_loss(logp, ref_logp, mask, rewards, clip_eps=clip_eps, eps=eps,
                     sample_weight=sample_weight)
  if name == "reinforce":
    return reinforce_loss(logp, mask, rewards, ref_logp=ref_logp, sample_weight=sample_weight)
  return rest_loss(logp, mask, rewards, threshold=rest_threshold, ref_logp=ref_logp,
                   sample_weight=sample_weight)


def check_name(name: str) -> None:
  """Raises ValueError naming config.rl.loss unless `name` is one of LOSS_NAMES."""
  if name not in LOSS_NAMES:
    raise ValueError(f"unknown loss {name!r} (config.rl.loss); valid: {', '.join(LOSS_NAMES)}")


def check_config(rl_cfg: Any) -> None:
  """Validates the loss keys of the `rl` block before a run spends time sampling."""
  check_name(rl_cfg.loss)
  if rl_cfg.loss in ("pmd", "pmd_token"):
    _check_tau(rl_cfg.tau)
  if rl_cfg.loss == "grpo" and not rl_cfg.clip_eps > 0:
    raise ValueError(f"config.rl.clip_eps must be > 0 for loss 'grpo', got {rl_cfg.clip_eps}")
