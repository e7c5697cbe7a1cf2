"""Length penalty (§2.3.3) on hand-worked groups, and the jitted batch version against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15.rewards import length


def test_equal_lengths_give_zero():
  np.testing.assert_array_equal(length.length_penalty([7, 7, 7], [True, False, True]), [0, 0, 0])
  np.testing.assert_array_equal(length.length_penalty([5], [True]), [0])


def test_all_correct_hand_worked():
  # min 100, max 300: lambda = 0.5 - (len - 100) / 200.
  got = length.length_penalty([100, 200, 300, 150], [True] * 4)
  np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.25])


def test_all_wrong_never_positive():
  # Same lambdas as above, clipped at 0 for wrong answers: brevity earns nothing when wrong.
  got = length.length_penalty([100, 200, 300, 150], [False] * 4)
  np.testing.assert_allclose(got, [0.0, 0.0, -0.5, 0.0])


def test_mixed_group():
  # min 10, max 50: lambda = 0.5 - (len - 10) / 40 = [0.5, 0.25, -0.5, 0.0, 0.125].
  lengths = [10, 20, 50, 30, 25]
  correct = [True, False, False, True, True]
  got = length.length_penalty(lengths, correct)
  np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.0, 0.125])
  assert got.dtype == np.float32


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="lengths"):
    length.length_penalty([1, 2, 3], [True, False])


def test_batch_matches_numpy_under_jit():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 50, size=(64, 8))
  lengths[3] = 17  # one group with all lengths equal
  lengths[5, :] = [1, 2, 2, 2, 2, 2, 2, 40]
  correct = rng.random((64, 8)) < 0.5
  correct[7] = False
  correct[8] = True
  want = np.stack([length.length_penalty(l, c) for l, c in zip(lengths, correct)])
  got = jax.jit(length.length_penalty_batch)(jnp.asarray(lengths), jnp.asarray(correct))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got)[3], 0.0)
  assert got.shape == (64, 8) and got.dtype == jnp.float32


def test_batch_equal_lengths_are_zero_not_nan():
  # jnp.where guards the 0/0: no NaN even though the division is traced for every group.
  got = length.length_penalty_batch(jnp.full((2, 4), 9), jnp.ones((2, 4), bool))
  assert bool(jnp.all(got == 0.0))


def test_combined_reward_warmup_weight_and_repeat():
  task = jnp.array([[1.0, 1.0, 0.0, 0.0]])
  lengths = jnp.array([[10, 30, 10, 30]])
  repeated = jnp.array([[False, False, False, True]])
  # lambda = [0.5, -0.5, 0.5, -0.5]; wrong ones clipped -> [0.5, -0.5, 0, -0.5].
  kwargs = dict(length_weight=0.2, length_warmup_iterations=5, repeat_penalty=0.3)
  before = length.combined_reward(task, lengths, repeated, iteration=4, **kwargs)
  np.testing.assert_allclose(before, [[1.0, 1.0, 0.0, -0.3]], atol=1e-6)
  after = length.combined_reward(task, lengths, repeated, iteration=5, **kwargs)
  np.testing.assert_allclose(after, [[1.1, 0.9, 0.0, -0.1 - 0.3]], atol=1e-6)


def test_combined_reward_jits_with_traced_iteration():
  task = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  lengths = jnp.array([[5, 15], [8, 8]])
  repeated = jnp.zeros((2, 2), bool)
  fn = jax.jit(lambda it: length.combined_reward(
      task, lengths, repeated, iteration=it, length_weight=1.0, length_warmup_iterations=3,
      repeat_penalty=0.5))
  np.testing.assert_allclose(fn(jnp.int32(2)), task, atol=1e-6)
  np.testing.assert_allclose(fn(jnp.int32(3)), [[1.5, -0.5], [1.0, 1.0]], atol=1e-6)
