"""k15.study: its statistics against scipy, and the orchestration with fake stages."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from scipy import stats

from k15 import evaluate as evaluate_lib
from k15 import pipeline as pipeline_lib
from k15 import study
from k15.sampling import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- statistics --------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_t_quantile_matches_scipy(level):
  for df in list(range(1, 31)) + [57, 200]:
    want = stats.t.ppf(0.5 + level / 2, df)
    assert study.t_quantile(level, df) == pytest.approx(want, rel=1e-7), df


def test_t_interval_matches_scipy():
  x = [0.31, 0.45, 0.28, 0.52, 0.40]
  iv = study.t_interval(x)
  lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
  assert iv["mean"] == pytest.approx(np.mean(x))
  assert (iv["lo"], iv["hi"]) == (pytest.approx(lo), pytest.approx(hi))
  assert iv["n"] == 5
  one = study.t_interval([0.4])
  assert one["mean"] == 0.4 and one["lo"] is None and one["hi"] is None


def test_paired_difference_is_the_interval_of_the_differences():
  ref = np.array([0.30, 0.50, 0.20, 0.60])
  arm = ref + np.array([0.05, 0.07, 0.04, 0.06])  # seed luck shared by both arms
  iv = study.paired_difference(arm, ref)
  d = arm - ref
  lo, hi = stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
  assert (iv["mean"], iv["lo"], iv["hi"]) == (pytest.approx(d.mean()), pytest.approx(lo),
                                              pytest.approx(hi))
  # Pairing cancels the shared seed luck: the unpaired (Welch) interval straddles zero.
  welch = stats.ttest_ind(arm, ref, equal_var=False).confidence_interval(0.95)
  assert welch.low < 0 < iv["lo"]
  with pytest.raises(ValueError, match="pairs must match"):
    study.paired_difference([1, 2], [1, 2, 3])


def test_bootstrap_is_seeded_and_covers_the_mean():
  rng = np.random.default_rng(0)
  diff = 0.1 + rng.normal(0, 0.3, (4, 64)) + rng.normal(0, 0.05, (4, 1))
  a = study.bootstrap_interval(diff, samples=1000, seed=3)
  assert a == study.bootstrap_interval(diff, samples=1000, seed=3)
  assert a != study.bootstrap_interval(diff, samples=1000, seed=4)
  assert a[0] < diff.mean() < a[1]
  assert a[1] - a[0] < 0.3
  assert study.bootstrap_interval(np.full((3, 5), 0.2), samples=50, seed=0) == (
      pytest.approx(0.2), pytest.approx(0.2))


def test_pass_at_k():
  n = 8
  c = np.arange(n + 1)
  assert study.pass_at_k(c, n, 1) == pytest.approx(c / n)
  assert study.pass_at_k(c, n, n) == pytest.approx((c > 0).astype(float))
  # pass@2 from 8 samples with 1 correct: 1 - C(7,2)/C(8,2) = 1/4.
  assert study.pass_at_k([1], n, 2)[0] == pytest.approx(0.25)
  with pytest.raises(ValueError, match="pass_k"):
    study.pass_at_k([1], 4, 8)


# --- arms and seeds ----------------------------------------------------------------------------

def _config(**study_overrides):
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  c = tiny_cpu.get_config("runlocal=True")
  c.study.update(dict(dict(eval_problems=6, eval_samples=4, pass_k=2, bootstrap=200),
                     **study_overrides))
  return c


def test_arms_bases_and_pairs():
  c = _config()
  arms = study.study_arms(c, "sampling")
  assert list(arms) == ["prioritized", "uniform", "curriculum"]
  assert arms["curriculum"]["rl.sampling.curriculum"] == f"0:all,{c.rl.iterations // 2}:hard"
  assert {study.base_name(c, o) for o in arms.values()} == {"base"}
  lift = study.study_arms(c, "rl_lift")
  # The careless arm is the config's own demonstrator: it shares the plain base.
  assert study.base_name(c, lift["careless"]) == "base"
  assert study.base_name(c, lift["clean"]) == "base-pipeline.sft_carry_slip=0.0"
  p = study.pair_config(c, {"rl.loss": "rest"}, 3)
  assert (p.rl.loss, p.seed, p.data.seed) == ("rest", c.seed + 3, c.seed + 3)
  assert c.rl.loss == "pmd"  # the caller's config is left alone
  with pytest.raises(ValueError, match="expected one of"):
    study.study_arms(c, "nope")
  assert list(study.study_arms(c, "length")) == ["rl"]
  with pytest.raises(ValueError, match="not arms"):
    study.study_arms(c, "sampling", ["pmd"])
  with pytest.raises(KeyError, match="rl.nope"):
    study.with_overrides(c, {"rl.nope": 1})


# --- orchestration with fake stages ------------------------------------------------------------

ARM_SKILL = {"pmd": 2, "rest": 1, "reinforce": 0, "grpo": 1, "careless": 1, "clean": 2,
             "prioritized": 2, "uniform": 1, "curriculum": 0}


class _Fakes:
  """Stand-ins for SFT/curation, RL and sampling: instant, deterministic, and recorded."""

  def __init__(self, monkeypatch):
    self.bases, self.rl = [], []
    monkeypatch.setattr(pipeline_lib, "base_stages", self.base_stages)
    monkeypatch.setattr(pipeline_lib, "rl_stage", self.rl_stage)
    monkeypatch.setattr(evaluate_lib, "evaluate", self.evaluate)
    monkeypatch.setattr(evaluate_lib, "sample_responses", self.sample_responses)

  def base_stages(self, config, workdir, mesh):
    del mesh
    self.bases.append((os.path.basename(workdir), config.pipeline.sft_carry_slip))
    model = types.SimpleNamespace(skill=0, seed=0, base=os.path.basename(workdir))
    return {}, object(), model, ["prompt"]

  def rl_stage(self, config, model, records, tok, mesh, workdir):
    del tok, mesh
    arm = workdir.split(os.sep)[-3]
    self.rl.append(dict(arm=arm, seed=config.seed, data_seed=config.data.seed,
                        loss=config.rl.loss, base=model.base, records=records))
    return types.SimpleNamespace(skill=ARM_SKILL[arm], seed=config.seed, base=model.base)

  @staticmethod
  def sample_responses(model, problems, *, num_samples, **kwargs):
    """Texts with `evaluate`'s outcomes (problem i: (skill + seed + i) mod (k + 1) of k
    correct, 10 * skill + i tokens), each with one column line that is due a carry, which
    the models of skill < 2 forget."""
    del kwargs
    k = num_samples
    column = "8+5+0=13, carry 0, so far 3" if model.skill < 2 else "8+5+0=13, carry 1, so far 3"
    for i, p in enumerate(problems):
      good = (model.skill + model.seed + i) % (k + 1)
      responses = [text.Response(
          ids=np.zeros(10 * model.skill + i, np.int32),
          text=f"{column}\n\\boxed{{{p.answer if j < good else -1}}}",
          finish_reason=int(evaluate_lib.sampler.FinishReason.EOS)) for j in range(k)]
      yield i, [2], responses

  @staticmethod
  def evaluate(model, problems, *, num_samples, temperature, **kwargs):
    del kwargs
    # Problem i: (skill + seed + i) mod (k + 1) of k samples correct; greedy: skill >= 1.
    k = 1 if temperature == 0 else num_samples
    correct = [(model.skill + model.seed + i) % (k + 1) if k > 1 else float(model.skill >= 1)
               for i in range(len(problems))]
    per = [{"accuracy": ci / k, "mean_tokens": 10.0 * model.skill + i}
           for i, ci in enumerate(correct)]
    return {"num_samples": k, "per_problem": per}


def test_study_pairs_seeds_shares_the_base_and_resumes(tmp_path, monkeypatch):
  fakes = _Fakes(monkeypatch)
  c = _config()
  w = str(tmp_path)
  out = study.run_study(c, "negative_gradients", 3, w, arms=("pmd", "rest"))
  assert fakes.bases == [("base", 0.6)]  # SFT and curation once
  assert len(fakes.rl) == 6
  for s in range(3):
    pair = [r for r in fakes.rl if r["seed"] == c.seed + s]
    assert sorted(r["arm"] for r in pair) == ["pmd", "rest"]
    assert {r["data_seed"] for r in pair} == {c.seed + s}
  assert {(r["arm"], r["loss"]) for r in fakes.rl} == {("pmd", "pmd"), ("rest", "rest")}

  # Values: per seed, the mean over problems of the fake's correct fractions.
  n, k = c.study.eval_problems, c.study.eval_samples
  def pass1(arm, s):
    return np.mean([((ARM_SKILL[arm] + c.seed + s + i) % (k + 1)) / k for i in range(n)])
  pmd = [pass1("pmd", s) for s in range(3)]
  rest = [pass1("rest", s) for s in range(3)]
  assert out["summary"]["pmd"]["pass1"]["mean"] == pytest.approx(np.mean(pmd))
  lo, hi = stats.t.interval(0.95, 2, loc=np.mean(pmd), scale=stats.sem(pmd))
  assert out["summary"]["pmd"]["pass1"]["lo"] == pytest.approx(lo)
  assert out["summary"]["pmd"]["pass1"]["hi"] == pytest.approx(hi)
  d = out["differences"]["rest - pmd"]["pass1"]
  assert d["mean"] == pytest.approx(np.mean(rest) - np.mean(pmd))
  assert d["boot_lo"] <= d["mean"] <= d["boot_hi"]
  assert out["summary"]["pmd"]["greedy"]["mean"] == 1.0
  assert out["sft"]["base"]["greedy"] == 0.0
  assert out["lift"]["rest"]["greedy"]["mean"] == pytest.approx(1.0)
  assert out["summary"]["rest"]["mean_tokens"]["mean"] == pytest.approx(10 + (n - 1) / 2)

  on_disk = json.loads((tmp_path / "study.json").read_text())
  assert set(on_disk) >= {"study", "seeds", "arms", "runs", "sft", "summary", "differences",
                          "lift", "minutes", "eval"}
  assert on_disk["eval"]["problems"] == n and on_disk["metrics"] == list(study.METRICS)
  assert set(on_disk["runs"]["rest"]) == {"0", "1", "2"}
  md = (tmp_path / "study.md").read_text()
  assert "| rest - pmd |" in md and "(boot [" in md and "pass@2 %" in md
  assert (tmp_path / "study.png").stat().st_size > 0

  # Rerun: everything is reused, nothing trains.
  out2 = study.run_study(c, "negative_gradients", 3, w, arms=("pmd", "rest"))
  assert len(fakes.rl) == 6 and len(fakes.bases) == 1 and out2["reused_runs"] == 6
  assert out2["summary"] == out["summary"]
  # One run lost: only it reruns (its base is reloaded for it).
  os.remove(tmp_path / "runs" / "rest" / "seed1" / "eval.json")
  study.run_study(c, "negative_gradients", 3, w, arms=("pmd", "rest"))
  assert [(r["arm"], r["seed"]) for r in fakes.rl[6:]] == [("rest", c.seed + 1)]
  assert len(fakes.bases) == 2


def test_rl_lift_has_a_base_per_demonstrator(tmp_path, monkeypatch):
  fakes = _Fakes(monkeypatch)
  c = _config()
  out = study.run_study(c, "rl_lift", 2, str(tmp_path))
  assert sorted(fakes.bases) == [("base", 0.6), ("base-pipeline.sft_carry_slip=0.0", 0.0)]
  assert {(r["arm"], r["base"]) for r in fakes.rl} == {
      ("careless", "base"), ("clean", "base-pipeline.sft_carry_slip=0.0")}
  assert set(out["sft"]) == {"base", "base-pipeline.sft_carry_slip=0.0"}
  assert (tmp_path / "base-pipeline.sft_carry_slip=0.0" / "eval_sft.json").exists()
  # Sampled once, the texts kept: the same pass@1 as evaluate_model's, and the carry slips.
  n, k = c.study.eval_problems, c.study.eval_samples
  want = np.mean([[((ARM_SKILL["clean"] + c.seed + s + i) % (k + 1)) / k for i in range(n)]
                  for s in range(2)])
  assert out["summary"]["clean"]["pass1"]["mean"] == pytest.approx(want)
  slips = out["slips"]
  assert slips["sft"] == {"base": 1.0, "base-pipeline.sft_carry_slip=0.0": 1.0}
  assert slips["rl"]["careless"]["mean"] == 1.0 and slips["rl"]["clean"]["mean"] == 0.0
  assert slips["rl_minus_sft"]["clean"]["mean"] == -1.0
  run = json.loads((tmp_path / "runs" / "clean" / "seed1" / "eval.json").read_text())
  assert run["carries"] == {"due": n * k, "forgotten": 0, "slip_rate": 0.0}
  assert "| clean | 100.0 | 0.0 [0.0, 0.0] | -100.0 [-100.0, -100.0] |" in (
      tmp_path / "study.md").read_text()


@pytest.mark.slow
def test_real_shrunk_study(tmp_path):
  """The command end to end on the runlocal model: 2 arms x 2 seeds (resuming: see above)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  args = [sys.executable, "-m", "k15.study", "--config=configs/tiny_cpu.py:runlocal=True",
          "--study=negative_gradients", "--arms=pmd,rest", "--seeds=2", f"--workdir={tmp_path}",
          "--config.study.eval_problems=8", "--config.study.eval_samples=2",
          "--config.study.pass_k=2", "--config.study.bootstrap=100"]
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads((tmp_path / "study.json").read_text())
  assert list(out["summary"]) == ["pmd", "rest"] and out["seeds"] == [0, 1]
  for arm in ("pmd", "rest"):
    for s in (0, 1):
      run = json.loads((tmp_path / "runs" / arm / f"seed{s}" / "eval.json").read_text())
      assert run["rl_seed"] == s and run["data_seed"] == s and len(run["per_problem"]["pass1"]) == 8
  assert "minutes" in r.stdout
  assert "| rest - pmd |" in (tmp_path / "study.md").read_text()
  assert (tmp_path / "study.png").exists()


def test_resume_refuses_runs_made_with_another_config(tmp_path, monkeypatch):
  fakes = _Fakes(monkeypatch)
  w = str(tmp_path)
  study.run_study(_config(), "sampling", 1, w, arms=("uniform",))
  other = _config()
  other.rl.iterations += 1
  with pytest.raises(ValueError, match=r"another config: rl.iterations: 2 there, 3 now"):
    study.run_study(other, "sampling", 1, w, arms=("uniform",))
  with pytest.raises(ValueError, match=r"study_name: 'sampling' there, 'rl_lift' now"):
    study.run_study(_config(), "rl_lift", 1, w)
  assert len(fakes.rl) == 1  # neither trained anything
  # Tables-only keys may change; the runs are reused.
  out = study.run_study(_config(bootstrap=50), "sampling", 1, w, arms=("uniform",))
  assert out["reused_runs"] == 1 and len(fakes.rl) == 1
  # Without W/config.json (a study run before it existed), the evaluations still say how they
  # were made.
  os.remove(tmp_path / "config.json")
  with pytest.raises(ValueError, match=r"seed0/eval.json was evaluated with .*'samples': 4"):
    study.run_study(_config(eval_samples=2), "sampling", 1, w, arms=("uniform",))


# --- the long2short study ----------------------------------------------------------------------

L2S_SKILL = {"long": 2, "short": 0, "merge": 1, "merge_rs": 1, "shortest_rs": 2, "rl": 3}


def test_long2short_study_pairs_the_long_model_and_skips_empty_methods(tmp_path, monkeypatch):
  """Per seed pair: one long RL run, then every method from that pair's context (its seed);
  a method that trained nothing (here DPO) leaves the tables and is named; sampled tokens are
  reported per arm; a rerun reuses every evaluation."""
  from k15.long2short import driver  # pylint: disable=g-import-not-at-top
  fakes = _Fakes(monkeypatch)
  contexts = []

  def make_context(config, workdir, mesh, *, base):
    del mesh
    contexts.append((config.seed, os.path.basename(workdir), os.path.basename(base)))
    return types.SimpleNamespace(cache={}, seed=config.seed)

  def method(name):
    def train(ctx):
      if name == "dpo":
        return driver.Trained(None, {"skipped": "no DPO pairs"}, 40)
      model = types.SimpleNamespace(skill=L2S_SKILL[name], seed=ctx.seed, base="b")
      return driver.Trained(model, {}, 100 * L2S_SKILL[name] + ctx.seed)
    return train

  monkeypatch.setattr(driver, "make_context", make_context)
  for name in list(driver.TRAIN):
    monkeypatch.setitem(driver.TRAIN, name, method(name))
  monkeypatch.setattr(pipeline_lib, "rl_stage", lambda config, model, records, tok, mesh,
                      workdir: fakes.rl.append(dict(seed=config.seed, workdir=workdir)))
  c = _config()
  c.long2short.token_budget = 5000
  out = study.run_long2short_study(c, 2, str(tmp_path))
  base = "base-pipeline.sft_carry_slip=0.0,pipeline.sft_recheck=0.75"
  assert fakes.bases == [(base, 0.0)]  # the clean, over-careful demonstrator, once
  assert [(r["seed"], r["workdir"].split(os.sep)[-2:]) for r in fakes.rl] == [
      (c.seed, ["seed0", "rl"]), (c.seed + 1, ["seed1", "rl"])]
  assert contexts == [(c.seed, "seed0", base), (c.seed + 1, "seed1", base)]
  assert list(out["summary"]) == ["long", "merge", "merge_rs", "shortest_rs", "rl"]
  assert out["skipped_arms"] == {"dpo": {0: "no DPO pairs", 1: "no DPO pairs"}}
  assert "rl - long" in out["differences"] and out["token_budget"] == 5000
  assert out["sampled_tokens"]["rl"]["mean"] == pytest.approx(300 + c.seed + 0.5)
  n, k = c.study.eval_problems, c.study.eval_samples
  want = np.mean([np.mean([((3 + c.seed + s + i) % (k + 1)) / k for i in range(n)])
                  for s in range(2)])
  assert out["summary"]["rl"]["pass1"]["mean"] == pytest.approx(want)
  md = (tmp_path / "study.md").read_text()
  assert "| rl - long |" in md and "- merge: 100\n" in md and "dpo skipped" in md
  # A rerun: every evaluation reused, nothing trained.
  out2 = study.run_long2short_study(c, 2, str(tmp_path))
  assert len(fakes.rl) == 2 and len(contexts) == 2 and out2["summary"] == out["summary"]
  with pytest.raises(ValueError, match=r"--arms: \['pmd'\] are not arms of study 'long2short'"):
    study.run_long2short_study(c, 2, str(tmp_path), arms=("pmd",))


@pytest.mark.slow
def test_real_shrunk_long2short_study(tmp_path):
  """`--study=long2short` end to end on the runlocal model: 2 seed pairs, merge, DPO and
  long2short RL at a token budget (DPO may find no pairs with a random model: then it is a
  skipped arm)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  args = [sys.executable, "-m", "k15.study", "--config=configs/tiny_cpu.py:runlocal=True",
          "--study=long2short", "--arms=merge,dpo,rl", "--seeds=2", f"--workdir={tmp_path}",
          "--config.study.eval_problems=8", "--config.study.eval_samples=2",
          "--config.study.pass_k=2", "--config.study.bootstrap=100",
          "--config.long2short.token_budget=500"]
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads((tmp_path / "study.json").read_text())
  assert out["seeds"] == [0, 1] and list(out["summary"])[0] == "long"
  assert set(out["summary"]) | set(out["skipped_arms"]) == {"long", "merge", "dpo", "rl"}
  for arm in out["summary"]:
    for s in (0, 1):
      run = json.loads((tmp_path / "runs" / "long2short" / f"seed{s}" / "eval" /
                        f"{arm}.json").read_text())
      assert run["rl_seed"] == s and len(run["per_problem"]["pass1"]) == 8
  # Long2short RL stops at the first iteration that reaches the budget (one iteration samples
  # at most 4 prompts x 4 samples x 48 tokens; the cap is 2 iterations).
  for s in (0, 1):
    run = json.loads((tmp_path / "runs" / "long2short" / f"seed{s}" / "eval" / "rl.json"
                      ).read_text())
    assert 500 <= run["sampled_tokens"] < 500 + 4 * 4 * 48
  assert out["sampled_tokens"]["merge"]["mean"] == 0  # merging samples nothing
