"""Length penalty and the combined reward (paper §2.3.3 and §2.6).

Within one group of k responses to the same prompt, with min_len / max_len the shortest and
longest response lengths:

  lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
  len_reward_i = lambda_i            if response i is correct
               = min(0, lambda_i)    otherwise

and every len_reward is 0 when max_len == min_len. So among correct responses the shortest earns
+0.5 and the longest -0.5; wrong responses are never rewarded for brevity but are still penalized
for length. The paper adds it with a weight after a warm-up with no length penalty; repeat
detection (§2.6, partial rollouts) can add a penalty for degenerate repeated text.

Shapes: G = number of groups (prompts), K = responses per group.
"""

import jax
import jax.numpy as jnp
import numpy as np


def length_penalty(lengths, correct) -> np.ndarray:
  """Length reward of one group of k responses (§2.3.3), as float32 [K]."""
  lengths = np.asarray(lengths, np.float64)
  correct = np.asarray(correct, bool)
  if lengths.ndim != 1 or correct.shape != lengths.shape:
    raise ValueError(f"length_penalty: lengths {lengths.shape} and correct {correct.shape} must "
                     "both be one group [k]")
  if lengths.size == 0:
    return np.zeros(0, np.float32)
  lo, hi = lengths.min(), lengths.max()
  if hi == lo:
    return np.zeros(lengths.shape, np.float32)
  lam = 0.5 - (lengths - lo) / (hi - lo)
  return np.where(correct, lam, np.minimum(0.0, lam)).astype(np.float32)


def length_penalty_batch(lengths: jax.Array, correct: jax.Array) -> jax.Array:
  """length_penalty for every group at once: [G, K] lengths and correct -> float32 [G, K].

  Pure jnp, so it can run inside jitted code.
  """
  lengths = jnp.asarray(lengths, jnp.float32)
  correct = jnp.asarray(correct)
  if lengths.ndim != 2 or correct.shape != lengths.shape:
    raise ValueError(f"length_penalty_batch: lengths {lengths.shape} and correct "
                     f"{correct.shape} must both be [num_groups, k]")
  lo = lengths.min(axis=1, keepdims=True)  # [G, 1]
  hi = lengths.max(axis=1, keepdims=True)  # [G, 1]
  span = hi - lo
  # Equal lengths: the where keeps the division finite so that no NaN leaks into gradients.
  lam = 0.5 - (lengths - lo) / jnp.where(span > 0, span, 1.0)
  reward = jnp.where(correct.astype(bool), lam, jnp.minimum(0.0, lam))
  return jnp.where(span > 0, reward, 0.0).astype(jnp.float32)


def combined_reward(task_reward: jax.Array, lengths: jax.Array, repeated: jax.Array, *,
                    iteration, length_weight: float, length_warmup_iterations: int,
                    repeat_penalty: float, correct: jax.Array | None = None) -> jax.Array:
  """The scalar RL reward of each response, float32 [G, K].

  reward = task_reward
           + length_weight * length_penalty   (only once iteration >= length_warmup_iterations)
           - repeat_penalty * repeated

  Args:
    task_reward: [G, K] verifier reward (1 / 0 for math and passed-all-tests code).
    lengths: [G, K] response lengths in tokens.
    repeated: [G, K] bool, generation stopped by repeat detection.
    iteration: RL iteration (a Python int or a traced scalar).
    length_weight: weight of the length penalty after the warm-up.
    length_warmup_iterations: first iteration with the length penalty on (§2.3.3: none at first).
    repeat_penalty: subtracted from repeated responses.
    correct: [G, K] bool for the length penalty; default task_reward > 0.5.
  """
  task_reward = jnp.asarray(task_reward, jnp.float32)
  lengths = jnp.asarray(lengths)
  repeated = jnp.asarray(repeated)
  if lengths.shape != task_reward.shape or repeated.shape != task_reward.shape:
    raise ValueError(f"combined_reward: task_reward {task_reward.shape}, lengths "
                     f"{lengths.shape} and repeated {repeated.shape} must all be [num_groups, k]")
  if correct is None:
    correct = task_reward > 0.5
  weight = jnp.where(jnp.asarray(iteration) >= length_warmup_iterations, length_weight, 0.0)
  return (task_reward
          + weight * length_penalty_batch(lengths, correct)
          - repeat_penalty * repeated.astype(jnp.float32))
