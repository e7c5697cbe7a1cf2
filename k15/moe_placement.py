"""Expert placement planned from known routing: balancing expert-parallel load ahead of a step.

With expert parallelism each device runs the experts it holds, so a step lasts as long as its
most loaded device. In RL the routing of a training batch is known before the step (the
sampler recorded it, k15.sampling.rollout), which lets the placement be planned for that step
(the ReLibra line): experts are reordered between steps so that hot and cold ones share
devices, and the hottest get replicas in spare slots within the step, their tokens split
between the copies. This module plans on the host from tokens per expert; it does not move
weights or change the sharded model's dispatch (which holds expert e on device e // (E / D),
the 'expert' mesh axis's contiguous blocks, `identity`).

Letters: E experts, D expert-parallel devices, S expert slots per device (E / D, plus spares).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from scipy import optimize


@dataclasses.dataclass(frozen=True)
class Placement:
  """Which expert each device's slots hold and the share of its tokens each copy takes."""
  slots: np.ndarray   # int [D, S]: expert id per slot, -1 empty
  share: np.ndarray   # float [D, S]: fraction of that expert's tokens routed to this copy

  @property
  def devices(self) -> int:
    return self.slots.shape[0]


def identity(num_experts: int, devices: int) -> Placement:
  """Expert e on device e // (E / D): the layout of weights sharded over the 'expert' axis."""
  if num_experts % devices:
    raise ValueError(f"{num_experts} experts do not split evenly over {devices} devices")
  slots = np.arange(num_experts).reshape(devices, num_experts // devices)
  return Placement(slots=slots, share=np.ones(slots.shape))


def device_loads(counts: np.ndarray, placement: Placement) -> np.ndarray:
  """Tokens per device [D] for tokens per expert `counts` [E] under `placement`."""
  counts = np.asarray(counts, np.float64)
  held = placement.slots >= 0
  return np.where(held, counts[np.maximum(placement.slots, 0)] * placement.share, 0).sum(axis=1)


def imbalance(counts: np.ndarray, placement: Placement) -> float:
  """max / mean tokens per device (1 is perfect balance)."""
  loads = device_loads(counts, placement)
  return float(loads.max() / max(loads.mean(), 1e-12))


def _copies(counts: np.ndarray, total: int, devices: int) -> np.ndarray:
  """Copies per expert filling `total` slots: each spare slot goes to the expert whose tokens
  per copy are highest (at most one copy per device), which minimises the largest item."""
  copies = np.ones(counts.size, np.int64)
  for _ in range(total - counts.size):
    per_copy = np.where(copies < devices, counts / copies, -1.0)
    e = int(np.argmax(per_copy))
    if per_copy[e] <= 0:
      break
    copies[e] += 1
  return copies


def _lpt(counts: np.ndarray, copies: np.ndarray, devices: int, per_device: int) -> Placement:
  """Longest processing time first: copies in decreasing load, each onto the least loaded
  device with a free slot that does not already hold that expert."""
  items = sorted(((counts[e] / copies[e], e) for e in range(counts.size)
                  for _ in range(copies[e])), reverse=True)
  slots = np.full((devices, per_device), -1, np.int64)
  share = np.zeros((devices, per_device))
  fill = np.zeros(devices, np.int64)
  loads = np.zeros(devices)
  for load, e in items:
    free = [d for d in range(devices) if fill[d] < per_device and e not in slots[d, :fill[d]]]
    d = min(free, key=lambda d: (loads[d], d))
    slots[d, fill[d]], share[d, fill[d]] = e, 1.0 / copies[e]
    fill[d] += 1
    loads[d] += load
  return Placement(slots=slots, share=share)


def _improve(counts: np.ndarray, p: Placement, rounds: int = 64) -> Placement:
  """Pairwise swaps between the most loaded device and another, while one lowers the pair's
  larger load (LPT's result is within 4/3 of optimal; swaps close part of the rest)."""
  slots, share = p.slots.copy(), p.share.copy()
  for _ in range(rounds):
    item = np.where(slots >= 0, counts[np.maximum(slots, 0)] * share, 0.0)
    loads = item.sum(axis=1)
    hi = int(np.argmax(loads))
    best = (loads[hi], None)
    for d in range(slots.shape[0]):
      if d == hi:
        continue
      for i in range(slots.shape[1]):
        for j in range(slots.shape[1]):
          if slots[hi, i] == slots[d, j] or slots[hi, i] in slots[d] or slots[d, j] in slots[hi]:
            continue
          delta = item[hi, i] - item[d, j]
          worst = max(loads[hi] - delta, loads[d] + delta)
          if worst < best[0] - 1e-9:
            best = (worst, (d, i, j))
    if best[1] is None:
      break
    d, i, j = best[1]
    slots[hi, i], slots[d, j] = slots[d, j], slots[hi, i]
    share[hi, i], share[d, j] = share[d, j], share[hi, i]
  return Placement(slots=slots, share=share)


def plan(counts: np.ndarray, devices: int, *, spare_slots: int = 0,
         previous: Placement | None = None) -> Placement:
  """The placement for a step whose tokens per expert are `counts` [E], over `devices`.

  Each device has E / D slots plus `spare_slots` for replicas of the hottest experts. Returns
  the plan with the lowest most loaded device among the greedy plans (with and without
  replicas), the identity layout and `previous`, so it is never worse than either; ties go to
  the plan that moves the fewest experts. Greedy plans are relabelled device by device to keep
  as many experts in place as possible (`_align`), since which device is which is free.
  """
  counts = np.asarray(counts, np.float64)
  E = counts.size
  if E % devices:
    raise ValueError(f"{E} experts do not split evenly over {devices} devices")
  per_device = E // devices + spare_slots
  base = _padded(identity(E, devices), per_device)
  if previous is None or previous.slots.shape != (devices, per_device):
    previous = base
  candidates = [previous, base]
  for total in sorted({E, devices * per_device}):
    greedy = _lpt(counts, _copies(counts, total, devices), devices, per_device)
    candidates.append(_align(_improve(counts, greedy), previous))
  return min(candidates, key=lambda p: (round(float(device_loads(counts, p).max()), 6),
                                        moved_experts(previous, p)))


def _align(p: Placement, previous: Placement) -> Placement:
  """`p` with its devices renumbered to keep the most experts where `previous` has them (an
  assignment problem on the [D, D] overlap counts)."""
  D = p.devices
  overlap = np.array([[len(set(p.slots[i][p.slots[i] >= 0]) & set(previous.slots[j]))
                       for j in range(D)] for i in range(D)])
  rows, cols = optimize.linear_sum_assignment(-overlap)
  order = np.empty(D, np.int64)
  order[cols] = rows
  return Placement(slots=p.slots[order], share=p.share[order])


def _padded(p: Placement, per_device: int) -> Placement:
  extra = per_device - p.slots.shape[1]
  return Placement(slots=np.pad(p.slots, ((0, 0), (0, extra)), constant_values=-1),
                   share=np.pad(p.share, ((0, 0), (0, extra))))


def moved_experts(old: Placement, new: Placement) -> int:
  """Expert copies that `new` puts on a device that did not hold them under `old` (weights
  to send before the step; replicas count each time)."""
  return sum(len(set(new.slots[d][new.slots[d] >= 0]) - set(old.slots[d][old.slots[d] >= 0]))
             for d in range(new.devices))


def expert_bytes(embed_dim: int, moe_mlp_dim: int, bytes_per_param: int = 2) -> int:
  """Weights of one SwiGLU expert (gate, up, down)."""
  return 3 * embed_dim * moe_mlp_dim * bytes_per_param


def evaluate(counts_per_step: np.ndarray, devices: int, *, spare_slots: int = 0,
             bytes_per_expert: int = 0) -> dict[str, float]:
  """Plans each step of `counts_per_step` [steps, E] from the previous step's placement.

  Returns the mean over steps of max/mean tokens per device without the plan (identity) and
  with it, the mean time to plan a step, and the expert weights moved per step (bytes, with
  `bytes_per_expert`): reordered experts plus the step's replicas.
  """
  counts_per_step = np.asarray(counts_per_step, np.float64)
  E = counts_per_step.shape[1]
  base = identity(E, devices)
  previous, before, after, seconds, moved = None, [], [], [], []
  for counts in counts_per_step:
    t0 = time.perf_counter()
    p = plan(counts, devices, spare_slots=spare_slots, previous=previous)
    seconds.append(time.perf_counter() - t0)
    moved.append(moved_experts(_padded(base, p.slots.shape[1]) if previous is None else previous,
                               p))
    before.append(imbalance(counts, base))
    after.append(imbalance(counts, p))
    previous = p
  return {"max_over_mean_identity": float(np.mean(before)),
          "max_over_mean_planned": float(np.mean(after)),
          "plan_ms": 1e3 * float(np.mean(seconds)),
          "moved_experts_per_step": float(np.mean(moved)),
          "moved_bytes_per_step": float(np.mean(moved)) * bytes_per_expert}
