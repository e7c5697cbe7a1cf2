"""Tests for k15/data/samplers.py: prioritized and curriculum sampling, state, grain adapter."""

import copy
import json

import grain
import ml_collections
import numpy as np
import pytest

from k15.data import samplers

try:
  from scipy import stats
except ImportError:  # the statistic is computed with numpy; scipy only gives the critical value
  stats = None

# chi-square critical values at alpha = 0.001 by degrees of freedom, for when scipy is missing.
_CHI2_999 = {6: 22.458}


def _chi2_critical(df: int) -> float:
  return float(stats.chi2.ppf(0.999, df)) if stats is not None else _CHI2_999[df]


def _fake_correctness(ids, iteration, k=4):
  """Deterministic per-sample correctness [B, k] for driving success-rate updates."""
  rng = np.random.default_rng(1000 + iteration)
  p = (np.asarray(ids) % 5) / 5.0
  return (rng.random((len(ids), k)) < p[:, None]).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Prioritized sampling.
# ---------------------------------------------------------------------------------------------


def _prioritized(rates, seed=0, epsilon=0.0):
  sr = samplers.SuccessRates(len(rates))
  sr.load_state_dict({"rates": np.asarray(rates, np.float64),
                      "counts": np.ones(len(rates), np.int64)})
  return samplers.PrioritizedSampler(len(rates), sr, seed=seed, epsilon=epsilon)


def test_prioritized_frequencies_match_one_minus_success_rate():
  rates = np.array([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 0.25])
  sampler = _prioritized(rates, seed=3)
  n = 20000
  # Batch size 1: one independent draw per iteration, i.e. sampling with replacement.
  draws = np.array([sampler.sample(i, 1)[0] for i in range(n)])
  counts = np.bincount(draws, minlength=len(rates))
  assert counts[6] == 0  # s = 1: never drawn (epsilon = 0, as in the paper)
  expected_p = (1 - rates) / (1 - rates).sum()
  np.testing.assert_allclose(sampler.probabilities(0), expected_p)
  cells = expected_p > 0
  expected = n * expected_p[cells]
  chi2 = float(((counts[cells] - expected) ** 2 / expected).sum())
  critical = _chi2_critical(int(cells.sum()) - 1)
  assert chi2 < critical, (chi2, counts, expected)
  # The same test rejects uniform frequencies, so it has power to see a wrong sampler.
  uniform = np.full(cells.sum(), n / cells.sum())
  assert float(((counts[cells] - uniform) ** 2 / uniform).sum()) > 10 * critical
  if stats is not None:
    assert stats.chisquare(counts[cells], expected).pvalue > 1e-3


def test_prioritized_epsilon_and_all_solved():
  sampler = _prioritized([1.0, 1.0, 0.5, 0.0], epsilon=0.1)
  np.testing.assert_allclose(sampler.probabilities(0), np.array([0.1, 0.1, 0.5, 1.0]) / 1.7)
  # All solved and no floor: uniform rather than nothing.
  sampler = _prioritized([1.0, 1.0, 1.0])
  np.testing.assert_allclose(sampler.probabilities(0), [1 / 3] * 3)
  assert sorted(sampler.sample(0, 3)) == [0, 1, 2]


def test_batches_without_replacement():
  sampler = _prioritized(np.linspace(0, 0.9, 8), seed=1)
  for it in range(50):
    batch = sampler.sample(it, 6)
    assert batch.dtype == np.int64 and len(set(batch.tolist())) == 6
  # Larger than the pool: whole rounds over the pool, so every prompt appears 2 or 3 times.
  counts = np.bincount(sampler.sample(0, 20), minlength=8)
  assert counts.min() >= 2 and counts.max() <= 3
  # Only two prompts have positive weight: both are in every batch, weight-0 ones fill the rest.
  sampler = _prioritized([1.0, 0.2, 1.0, 1.0, 0.6, 1.0])
  for it in range(20):
    batch = sampler.sample(it, 4)
    assert {1, 4} <= set(batch.tolist()) and len(set(batch.tolist())) == 4


def test_same_iteration_same_draw():
  sampler = _prioritized(np.linspace(0, 0.9, 10), seed=5)
  np.testing.assert_array_equal(sampler.sample(7, 4), sampler.sample(7, 4))
  assert any(not np.array_equal(sampler.sample(7, 4), sampler.sample(i, 4)) for i in range(8, 12))
  other = _prioritized(np.linspace(0, 0.9, 10), seed=6)
  assert any(not np.array_equal(sampler.sample(i, 4), other.sample(i, 4)) for i in range(5))


# ---------------------------------------------------------------------------------------------
# Success rates.
# ---------------------------------------------------------------------------------------------


def test_success_rates_running_mean():
  sr = samplers.SuccessRates(4)
  np.testing.assert_array_equal(sr.rates, 0.0)
  sr.update([0, 2], [[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_allclose(sr.rates, [0.5, 0.0, 1.0, 0.0])
  # Repeated ids and flat rewards: prompt 0 gets 3 more samples (2 correct): 4/7 overall.
  sr.update([0, 0, 0, 3], [1.0, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(sr.rates, [4 / 7, 0.0, 1.0, 1.0])
  np.testing.assert_array_equal(sr.counts, [7, 0, 4, 1])


def test_success_rates_ema():
  sr = samplers.SuccessRates(3, decay=0.5, initial=0.2)
  sr.update([1], [[1, 1]])
  np.testing.assert_allclose(sr.rates, [0.2, 0.6, 0.2])
  sr.update([1, 2], [[0, 1], [0, 0]])
  np.testing.assert_allclose(sr.rates, [0.2, 0.55, 0.1])


def test_success_rates_errors_and_state():
  sr = samplers.SuccessRates(3)
  with pytest.raises(ValueError, match=r"success values must be in \[0, 1\].*-0.5"):
    sr.update([0], [[-0.5, 1.0]])
  with pytest.raises(ValueError, match="prompt id 3 out of range"):
    sr.update([3], [1.0])
  with pytest.raises(ValueError, match="rewards must be"):
    sr.update([0, 1], [1.0])
  with pytest.raises(ValueError, match="decay"):
    samplers.SuccessRates(3, decay=1.0)
  sr.update([0, 1], [[1, 0], [1, 1]])
  state = json.loads(json.dumps({k: v.tolist() for k, v in sr.state_dict().items()}))
  restored = samplers.SuccessRates(3)
  restored.load_state_dict(state)
  np.testing.assert_array_equal(restored.rates, sr.rates)
  np.testing.assert_array_equal(restored.counts, sr.counts)
  with pytest.raises(ValueError, match=r"'rates' has shape \(3,\), expected \(4,\)"):
    samplers.SuccessRates(4).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Curriculum.
# ---------------------------------------------------------------------------------------------


def test_curriculum_follows_schedule():
  labels = np.array(["easy", "medium", "hard"])[np.arange(30) % 3]
  sampler = samplers.CurriculumSampler(labels, "0:all,24:hard", seed=2)
  seen_before = set()
  for it in range(24):
    seen_before |= set(labels[sampler.sample(it, 5)].tolist())
  assert seen_before == {"easy", "medium", "hard"}  # warm-up uses the whole set
  for it in range(24, 80):
    batch = sampler.sample(it, 5)
    assert set(labels[batch].tolist()) == {"hard"}, it
  assert sampler.stage(23).labels is None and sampler.stage(24).labels == ("hard",)
  np.testing.assert_allclose(sampler.probabilities(30)[labels == "hard"], 0.1)


@pytest.mark.parametrize("schedule", [
    "0:..2, 10:..3 ,20:all",
    [(0, {"max": 2}), (10, {"max": 3}), (20, None)],
    [(0, [1, 2]), (10, (1, 2, 3)), (20, "all")],
])
def test_curriculum_easy_to_hard_levels(schedule):
  levels = np.arange(40) % 5 + 1  # levels 1..5, larger is harder
  sampler = samplers.make_sampler({"curriculum": schedule, "seed": 4}, levels)
  for it in range(30):
    batch = sampler.sample(it, 6)
    allowed_max = 2 if it < 10 else 3 if it < 20 else 5
    assert levels[batch].max() <= allowed_max, (it, levels[batch])
  assert levels[np.concatenate([sampler.sample(i, 6) for i in range(20, 30)])].max() == 5


@pytest.mark.parametrize("hard", [{"min": 0.7}, "hard", "0.7.."])
def test_curriculum_with_priorities(hard):
  pass_rate = np.array([0.9, 0.8, 0.1, 0.2, 0.05, 0.7])
  difficulty = 1 - pass_rate  # k15.data.prompts' label: higher is harder
  sr = samplers.SuccessRates(6)
  sr.update(np.arange(6), [[0, 0], [0, 0], [1, 1], [0, 1], [0, 0], [1, 1]])
  sampler = samplers.make_sampler(
      {"mode": "prioritized", "curriculum": [(0, "all"), (24, hard)]}, difficulty,
      success_rates=sr)
  np.testing.assert_allclose(sampler.probabilities(0), [1, 1, 0, 0.5, 1, 0] / np.float64(3.5))
  # From iteration 24: only hard prompts (2, 3, 4), weighted by 1 - s_i within them.
  np.testing.assert_allclose(sampler.probabilities(24), [0, 0, 0, 0.5 / 1.5, 1 / 1.5, 0])
  for it in range(24, 40):
    assert set(sampler.sample(it, 2).tolist()) == {3, 4}


def test_bucket_names_on_pass_rate_difficulties():
  """'hard' means the prompts curation put in its hard bucket: difficulty 1 - pass rate >= 2/3."""
  from k15.data import prompts  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pass_rate = rng.integers(0, 11, 60) / 10  # 10 samples each, as label_difficulty measures
  difficulty = 1 - pass_rate
  bucket = np.array([prompts.bucket_of(d, samplers.BUCKETS, prompts.DEFAULT_BUCKET_EDGES)
                     for d in difficulty])
  assert set(bucket) == {"easy", "medium", "hard"}
  sampler = samplers.make_sampler({"mode": "uniform", "curriculum": "0:all,20:hard"}, difficulty)
  early = np.concatenate([sampler.sample(it, 8) for it in range(20)])
  assert set(bucket[early]) == {"easy", "medium", "hard"}
  late = np.concatenate([sampler.sample(it, 8) for it in range(20, 60)])
  assert set(bucket[late]) == {"hard"}
  assert difficulty[late].min() >= 2 / 3 and pass_rate[late].max() <= 0.3  # the least solved
  assert set(late) == set(np.flatnonzero(bucket == "hard"))  # and all of them in time
  easy_then = samplers.make_sampler({"curriculum": "0:easy|medium,5:all"}, difficulty)
  assert difficulty[easy_then.sample(0, 20)].max() < 2 / 3
  # Bucket names and exact numbers mix; a numeric label still matches exactly.
  mixed = samplers.make_sampler({"curriculum": "0:easy|0.5"}, difficulty)
  assert set(np.round(difficulty[mixed.candidates(0)], 6)) <= set(
      np.round(difficulty[bucket == "easy"], 6)) | {0.5}


def test_success_rates_start_from_pass_rates():
  pass_rates = [0.9, None, 0.0, 0.5]
  sampler = samplers.make_sampler({"mode": "prioritized", "success_prior_samples": 10},
                                  num_prompts=4, pass_rates=pass_rates)
  sr = sampler.success_rates
  np.testing.assert_allclose(sr.rates, [0.9, 0.0, 0.0, 0.5])
  np.testing.assert_array_equal(sr.counts, [10, 0, 10, 10])
  np.testing.assert_allclose(sampler.probabilities(0), np.array([0.1, 1, 1, 0.5]) / 2.6)
  # The prior weighs as 10 samples in the running mean.
  sr.update([0, 1], [[0, 0], [1, 1]])
  np.testing.assert_allclose(sr.rates[:2], [9 / 12, 1.0])
  # Default: off, every prompt starts at 0 whatever its pass rate.
  off = samplers.make_sampler({"mode": "prioritized"}, num_prompts=4, pass_rates=pass_rates)
  np.testing.assert_array_equal(off.success_rates.rates, 0.0)
  with pytest.raises(ValueError, match="no prompt has one"):
    samplers.make_sampler({"success_prior_samples": 10}, num_prompts=2, pass_rates=[None, None])
  with pytest.raises(ValueError, match=r"pass rates must be in \[0, 1\]"):
    samplers.make_sampler({"success_prior_samples": 10}, num_prompts=1, pass_rates=[1.5])


def test_schedule_errors():
  levels = np.arange(10) % 3
  with pytest.raises(ValueError, match="must start at iteration 0"):
    samplers.CurriculumSampler(levels, "5:all")
  with pytest.raises(ValueError, match="start 3 is not after the previous stage's start 10"):
    samplers.CurriculumSampler(levels, [(0, None), (10, [1]), (3, [2])])
  with pytest.raises(ValueError, match="iteration 4 allows no prompt"):
    samplers.CurriculumSampler(levels, "0:all,4:7")
  with pytest.raises(ValueError, match="bad range"):
    samplers.CurriculumSampler(levels, "0:a..b")
  with pytest.raises(ValueError, match=r"unknown keys \['maximum'\]"):
    samplers.CurriculumSampler(levels, [(0, {"maximum": 2})])
  with pytest.raises(ValueError, match="not an integer"):
    samplers.CurriculumSampler(levels, "x:all")
  with pytest.raises(ValueError, match="labels .* are neither numbers nor bucket names"):
    samplers.CurriculumSampler(levels, "0:hardest")
  with pytest.raises(ValueError, match=r"bucket names \['hard'\] need difficulties in \[0, 1\]"):
    samplers.CurriculumSampler(levels, "0:hard")
  with pytest.raises(ValueError, match="needs numeric difficulties"):
    samplers.CurriculumSampler(np.array(["a", "b"]), "0:..2")
  with pytest.raises(ValueError, match="needs difficulties"):
    samplers.make_sampler({"curriculum": "0:all"}, num_prompts=4)


def test_make_sampler_config():
  cfg = ml_collections.ConfigDict({"mode": "prioritized", "curriculum": None, "seed": 7,
                                   "epsilon": 0.05, "success_decay": 0.9,
                                   "success_initial": 0.0})
  sampler = samplers.make_sampler(cfg, num_prompts=5)
  assert sampler.mode == "prioritized" and sampler.seed == 7 and sampler.epsilon == 0.05
  assert sampler.success_rates.decay == 0.9 and not sampler.stages
  sampler = samplers.make_sampler(cfg, num_prompts=5, mode="uniform")
  assert sampler.mode == "uniform"
  with pytest.raises(ValueError, match=r"unknown sampler config keys \['curicculum'\]"):
    samplers.make_sampler({"curicculum": "0:all"}, num_prompts=5)
  with pytest.raises(ValueError, match="unknown sampler mode 'priority'.*uniform, prioritized"):
    samplers.make_sampler({"mode": "priority"}, num_prompts=5)


# ---------------------------------------------------------------------------------------------
# State and resume.
# ---------------------------------------------------------------------------------------------


def _run(sampler, iterations, batch_size=4):
  """Draws and updates success rates like the trainer does; returns the draws."""
  out = []
  for it in iterations:
    ids = sampler.sample(it, batch_size)
    sampler.success_rates.update(ids, _fake_correctness(ids, it))
    out.append(ids)
  return out


def test_state_restore_reproduces_future_draws():
  cfg = {"mode": "prioritized", "curriculum": "0:all,6:1|2|3", "seed": 11}
  levels = np.arange(20) % 5
  sampler = samplers.make_sampler(cfg, levels)
  _run(sampler, range(0, 5))
  state = copy.deepcopy(sampler.state_dict())
  expected = _run(sampler, range(5, 12))
  restored = samplers.make_sampler(cfg, levels)
  assert not all(np.array_equal(a, b) for a, b in zip(_run(restored, range(5, 12)), expected))
  restored = samplers.make_sampler(cfg, levels)
  restored.load_state_dict(state)
  for a, b in zip(_run(restored, range(5, 12)), expected):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="saved with seed 11, this sampler has seed 12"):
    samplers.make_sampler(cfg, levels, seed=12).load_state_dict(state)


@pytest.mark.parametrize("as_map_dataset", [False, True])
def test_grain_adapter_resume(as_map_dataset):
  records = [{"id": i, "prompt": f"question {i}"} for i in range(12)]
  source = grain.MapDataset.source(records) if as_map_dataset else records
  cfg = {"mode": "prioritized", "seed": 3}

  def pipeline():
    sampler = samplers.make_sampler(cfg, num_prompts=len(records))
    ds = samplers.SampledPromptDataset(source, sampler, batch_size=3, num_iterations=10)
    ds = ds.map(lambda b: {**b, "prompts": [r["prompt"] for r in b["records"]]})
    return sampler, ds

  def step(sampler, it):
    batch = next(it)
    ids = np.array([r["id"] for r in batch["records"]])
    np.testing.assert_array_equal(ids, batch["indices"])
    sampler.success_rates.update(ids, _fake_correctness(ids, batch["iteration"]))
    return batch

  sampler, ds = pipeline()
  it = iter(ds)
  first = [step(sampler, it) for _ in range(4)]
  assert [b["iteration"] for b in first] == [0, 1, 2, 3]
  assert first[0]["prompts"] == [f"question {i}" for i in first[0]["indices"]]
  saved = json.loads(json.dumps(it.get_state()))  # what grain's checkpoint handler writes
  saved_sampler = copy.deepcopy(sampler.state_dict())
  rest = [step(sampler, it) for _ in range(6)]
  with pytest.raises(StopIteration):
    next(it)

  sampler2, ds2 = pipeline()
  sampler2.load_state_dict(saved_sampler)
  it2 = iter(ds2)
  it2.set_state(saved)
  resumed = [step(sampler2, it2) for _ in range(6)]
  for a, b in zip(resumed, rest):
    assert a["iteration"] == b["iteration"]
    np.testing.assert_array_equal(a["indices"], b["indices"])
  # The draws depend on the success rates: ones seen by the run differ from a fresh table's.
  sampler3, ds3 = pipeline()
  it3 = iter(ds3)
  it3.set_state(saved)
  fresh = [next(it3)["indices"] for _ in range(6)]
  assert any(not np.array_equal(a, b["indices"]) for a, b in zip(fresh, rest))


def test_grain_adapter_checks_records():
  sampler = samplers.make_sampler(num_prompts=5)
  with pytest.raises(ValueError, match="4 records but the sampler has 5 prompts"):
    samplers.SampledPromptDataset([{}] * 4, sampler, batch_size=2)
