"""Expert placement planned from known routing (k15.moe_placement)."""

import numpy as np
import pytest

from k15 import moe_placement as mp


def test_identity_is_the_expert_axis_layout():
  p = mp.identity(8, 4)
  np.testing.assert_array_equal(p.slots, [[0, 1], [2, 3], [4, 5], [6, 7]])
  np.testing.assert_array_equal(mp.device_loads(np.arange(8), p), [1, 5, 9, 13])
  with pytest.raises(ValueError, match="6 experts do not split evenly over 4"):
    mp.identity(6, 4)


def test_a_known_case_reordering_solves():
  # The two hot experts share device 0 under the identity layout: max/mean 20 / 11.
  counts = np.array([10, 10, 1, 1])
  assert mp.imbalance(counts, mp.identity(4, 2)) == pytest.approx(20 / 11)
  p = mp.plan(counts, 2)
  np.testing.assert_array_equal(np.sort(mp.device_loads(counts, p)), [11, 11])
  assert sorted(p.slots.reshape(-1).tolist()) == [0, 1, 2, 3]  # each expert once


def test_a_known_case_replication_solves():
  # One expert takes 3/4 of the tokens: no reordering helps, one replica per device does.
  counts = np.array([60, 10, 5, 5])
  assert mp.device_loads(counts, mp.plan(counts, 2)).max() == 65
  p = mp.plan(counts, 2, spare_slots=1)
  loads = mp.device_loads(counts, p)
  np.testing.assert_allclose(loads, [40, 40])
  assert (p.slots == 0).sum() == 2  # the hot expert on both devices, its tokens split
  # Every expert's shares add up to all of its tokens.
  for e in range(4):
    assert p.share[p.slots == e].sum() == pytest.approx(1.0)
  assert mp.moved_experts(mp._padded(mp.identity(4, 2), 3), p) >= 1


@pytest.mark.parametrize("spare", [0, 1, 2])
def test_never_worse_than_identity_or_previous_on_skewed_routing(spare):
  rng = np.random.default_rng(0)
  previous = None
  for step in range(30):
    E, D = 16, 4
    counts = rng.zipf(1.3 + step / 30, E).astype(np.float64)  # heavy-tailed, changing skew
    counts = np.minimum(counts, 1e4) * rng.integers(10, 100)
    p = mp.plan(counts, D, spare_slots=spare, previous=previous)
    worst = mp.device_loads(counts, p).max()
    assert worst <= mp.device_loads(counts, mp.identity(E, D)).max() + 1e-9
    if previous is not None:
      assert worst <= mp.device_loads(counts, previous).max() + 1e-9
    # No device holds an expert twice; every expert's tokens are all placed.
    for d in range(D):
      held = p.slots[d][p.slots[d] >= 0]
      assert len(set(held.tolist())) == held.size
    np.testing.assert_allclose(mp.device_loads(counts, p).sum(), counts.sum())
    previous = p


def test_evaluate_reports_the_gain_and_the_cost():
  rng = np.random.default_rng(1)
  steps = np.stack([rng.zipf(1.5, 8) * 10.0 for _ in range(5)])
  out = mp.evaluate(steps, 4, spare_slots=1, bytes_per_expert=mp.expert_bytes(64, 32))
  assert out["max_over_mean_planned"] <= out["max_over_mean_identity"]
  assert out["max_over_mean_planned"] >= 1.0
  assert out["moved_bytes_per_step"] == out["moved_experts_per_step"] * 3 * 64 * 32 * 2
  assert out["plan_ms"] > 0
