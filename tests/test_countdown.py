"""Countdown for the length study: generator and verifier, the demonstrator who gives up, the
accuracy at token cut-offs, and the per-difficulty RL log (k15.data.tasks, k15.study)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from k15 import metrics as metrics_lib
from k15 import study
from k15.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRY = "try "


def _boxed(text):
  return text.rsplit("\\boxed{", 1)[1].rsplit("}", 1)[0]


# --- generator and verifier --------------------------------------------------------------------

@pytest.mark.parametrize("level", [3, 4])
def test_generated_problems_are_solved_by_their_demonstration(level):
  problems = tasks.generate("countdown", 40, seed=5, difficulties=[level], max_cot_tokens=320)
  for p in problems:
    numbers, target = p.meta["numbers"], p.meta["target"]
    assert len(numbers) == level and p.answer == str(target)
    expr = _boxed(p.long_cot)
    assert expr == _boxed(p.short_cot)
    assert tasks.verify_countdown(expr, numbers, target), (p.prompt, expr)
    assert tasks.grade(p, p.long_cot) == 1.0 and tasks.grade(p, p.short_cot) == 1.0
    # No solution with fewer numbers (min(level, 4) - 1): more numbers, deeper search.
    assert target not in tasks._reachable(numbers, level - 1)
    assert tasks.approx_tokens(p.long_cot) <= 320
  assert len({p.meta["key"] for p in problems}) > 30


@pytest.mark.filterwarnings("error::SyntaxWarning")
def test_verifier_rejects_wrong_numbers_targets_and_malformed_expressions():
  numbers, target = [7, 15, 10], 18
  assert tasks.verify_countdown("15+10-7", numbers, target)
  assert tasks.verify_countdown("15 + 10 − 7 = 18", numbers, target)  # unicode minus, "= target"
  assert tasks.verify_countdown("(15+10)-7", numbers, target)
  bad = {
      "15+10-7+0": "beyond the given numbers",  # a number not given
      "15+10-7-10+10": "beyond the given numbers",  # 10 used three times, given once
      "15+3": "beyond the given numbers",
      "15+10": "evaluates to 25",  # the wrong target
      "15+10-7=17": "right-hand side",
      "15+10-": "cannot parse",
      "(15+10-7": "cannot parse",
      "15**10": "not allowed",
      "15+10-7.0": "not allowed",
      "abs(15)": "not allowed",
      "15or 10": "not allowed",  # parsed without a SyntaxWarning ("invalid decimal literal")
      "15/7": "not an exact integer division",
      "": "empty",
  }
  for expr, why in bad.items():
    err = tasks.countdown_error(expr, numbers, target)
    assert err is not None and why in err, (expr, err)
    assert not tasks.verify_countdown(expr, numbers, target)
  rec = tasks.generate("countdown", 1, seed=0, difficulties=[3])[0]
  assert tasks.grade(rec, "no box here") == 0.0
  assert tasks.grade(rec, "\\boxed{" + str(rec.meta["target"]) + "}") == 0.0  # not its numbers


# --- the search-capped demonstrator ------------------------------------------------------------

def test_search_cap_changes_demonstrations_not_problems():
  kw = dict(seed=3, difficulties=[3, 4], max_cot_tokens=320)
  full = tasks.generate("countdown", 80, **kw)
  capped = tasks.generate("countdown", 80, search_cap=4, **kw)
  assert [p.prompt for p in capped] == [p.prompt for p in full]
  assert [p.answer for p in capped] == [p.answer for p in full]
  solved = unsolved = 0
  for f, c in zip(full, capped):
    lines = f.meta["search_lines"]
    assert c.meta["search_lines"] == lines
    tries = [ln for ln in c.long_cot.splitlines() if ln.startswith(TRY)]
    assert len(tries) <= 4
    if lines <= 4:  # the short search finds it: the same demonstration
      solved += 1
      assert c.meta["demo_solved"] and c.long_cot == f.long_cot
      assert tasks.grade(c, c.long_cot) == 1.0
    else:  # it stops at the cap without an answer; the longer search finds one
      unsolved += 1
      assert not c.meta["demo_solved"]
      assert c.long_cot.endswith("stop: no answer in 4 tries") and "\\boxed{" not in c.long_cot
      assert c.long_cot.splitlines()[:5] == f.long_cot.splitlines()[:5]  # its first 4 tries
      assert tasks.grade(c, c.long_cot) == 0.0 and tasks.grade(f, f.long_cot) == 1.0
      assert sum(ln.startswith(TRY) for ln in f.long_cot.splitlines()) > 4
  assert solved > 10 and unsolved > 10  # both kinds are common at levels 3 and 4
  with pytest.raises(ValueError, match="search_cap=-1"):
    tasks.generate("countdown", 1, seed=0, difficulties=[3], search_cap=-1)


def test_search_stop_gives_up_at_random_and_keeps_long_searches():
  kw = dict(seed=3, difficulties=[3, 4], max_cot_tokens=320)
  full = tasks.generate("countdown", 300, **kw)
  lines = np.array([f.meta["search_lines"] for f in full])
  solved_share = []
  for stop in (0.1, 0.3):
    gave = tasks.generate("countdown", 300, search_stop=stop, **kw)
    assert [p.prompt for p in gave] == [p.prompt for p in full]
    assert [p.answer for p in gave] == [p.answer for p in full]
    assert gave == tasks.generate("countdown", 300, search_stop=stop, **kw)  # deterministic
    solved = np.array([p.meta["demo_solved"] for p in gave])
    for f, g in zip(full, gave):
      if g.meta["demo_solved"]:
        assert g.long_cot == f.long_cot
      else:  # a prefix of the full search (at least one line, not all), then the stop line
        tries = g.long_cot.splitlines()[1:-1]
        assert 1 <= len(tries) < f.meta["search_lines"]
        assert g.long_cot.splitlines()[:-1] == f.long_cot.splitlines()[:len(tries) + 1]
        assert g.long_cot.endswith(f"stop: no answer in {len(tries)} tries")
        assert tasks.grade(g, g.long_cot) == 0.0
    # A search of L lines survives L - 1 chances to give up: shorter searches are solved more
    # often, and some solved demonstrations still back up (what a cap of 4 never shows).
    assert solved[lines <= 3].mean() > solved[lines >= 7].mean() > 0
    for greedy_path in (2, 3):  # the greedy path's length at 3 and at 4 numbers
      expected = (1 - stop) ** (greedy_path - 1)
      assert abs(solved[lines == greedy_path].mean() - expected) < 0.12, (stop, greedy_path)
    assert any("back to" in g.long_cot and g.meta["demo_solved"] for g in gave)
    solved_share.append(solved.mean())
  assert solved_share[0] > solved_share[1]
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="search_stop"):
      tasks.generate("countdown", 1, seed=0, difficulties=[3], search_stop=bad)


def test_pipeline_caps_only_the_sft_demonstrations(tmp_path):
  from k15 import config as k15_config  # pylint: disable=g-import-not-at-top
  from k15 import pipeline  # pylint: disable=g-import-not-at-top
  c = k15_config.pipeline_block(families=("countdown",), difficulties=(3,), sft_examples=30,
                                rl_pool=20, eval_problems=10, sft_search_cap=2,
                                sft_search_stop=0.2)
  data = pipeline.make_data(c, 0, str(tmp_path))
  assert any(not r.meta["demo_solved"] for r in data["sft"])
  assert all(r.meta["demo_solved"] for r in data["rl_pool"] + data["eval"])


# --- accuracy at token cut-offs ----------------------------------------------------------------

def test_cutoffs():
  assert study.length_cutoffs(320) == [64, 128, 256, 320]
  assert study.length_cutoffs(256) == [64, 128, 256]
  assert study.length_cutoffs(64) == [64]


def test_accuracy_at_cutoffs_counts_a_response_only_once_it_has_ended():
  # Two problems x three samples: (correct, length in tokens, stop token counted).
  correct = np.array([[1, 1, 0], [0, 1, 1]], bool)
  lengths = np.array([[60, 130, 40], [300, 128, 257]])
  acc = study.accuracy_at_cutoffs(correct, lengths, [64, 128, 256, 320])
  np.testing.assert_allclose(acc[64], [1 / 3, 0])       # only the 60-token answer
  np.testing.assert_allclose(acc[128], [1 / 3, 1 / 3])  # 128 fits exactly; 130 is cut
  np.testing.assert_allclose(acc[256], [2 / 3, 1 / 3])  # 257 is cut at 256
  np.testing.assert_allclose(acc[320], [2 / 3, 2 / 3])  # = the uncut accuracy
  with pytest.raises(ValueError, match="problems, samples"):
    study.accuracy_at_cutoffs(correct, lengths[:, :2], [64])


def test_a_cut_response_equals_the_response_sampled_with_that_budget():
  """Why cutting one sampling pass measures accuracy at each budget: the first c tokens of a
  response do not depend on the budget, and one longer than c is cut off without an answer."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from k15.model import transformer  # pylint: disable=g-import-not-at-top
  from k15.sampling import sampler  # pylint: disable=g-import-not-at-top
  cfg = transformer.ModelConfig(vocab_size=32, embed_dim=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=64)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  prompts = [[2, 5, 6], [2, 7]]
  kw = dict(eos_id=1, temperature=1.0, seed=3, num_samples=4)
  long = sampler.generate(model, prompts, max_new_tokens=24, **kw)
  short = sampler.generate(model, prompts, max_new_tokens=8, **kw)
  for r in range(8):
    n = int(long.lengths[r])
    m = int(short.lengths[r])
    np.testing.assert_array_equal(np.asarray(short.tokens[r, :m]),
                                  np.asarray(long.tokens[r, :min(n, 8)]))
    # Ended within 8 tokens in the long run iff it ends by itself in the short one.
    ended = n <= 8 and int(long.finish_reason[r]) == int(sampler.FinishReason.EOS)
    assert ended == (int(short.finish_reason[r]) == int(sampler.FinishReason.EOS))
  del jax


# --- per-difficulty RL log and the study's summary ---------------------------------------------

def _rec(level):
  return types.SimpleNamespace(meta={"level": level}, difficulty=0.5)


def test_level_log_reports_each_iteration_per_difficulty():
  log = study.LevelLog([_rec(3), _rec(4), _rec(3)])
  assert log.after_iteration(None) is None  # no graded responses yet
  log.on_rewards([0, 2, 1, 1], [np.zeros(10), np.zeros(30), np.zeros(7), np.zeros(9)],
                 np.array([1.0, 0.0, 1.0, 1.0]))
  m = log.after_iteration(None)
  assert m == {"by_level/d3_tokens": 20.0, "by_level/d3_accuracy": 0.5,
               "by_level/d4_tokens": 8.0, "by_level/d4_accuracy": 1.0}
  assert log.after_iteration(None) is None  # each batch is reported once
  assert set(log.hooks()) == {"on_rewards", "after_iteration"}


def _eval(cut, tokens3, seed_noise=0.0, gave_up=0.5):
  """A fake evaluate_sampled result on 4 problems (levels 3, 3, 4, 4)."""
  cuts = {str(c): [v + seed_noise] * 4 for c, v in cut.items()}
  return {"cutoffs": {c: float(np.mean(v)) for c, v in cuts.items()}, "gave_up": gave_up,
          "by_difficulty": {"3": {"pass1": cut[320], "mean_tokens": tokens3, "n": 2},
                            "4": {"pass1": cut[320], "mean_tokens": tokens3 + 20, "n": 2}},
          "per_problem": {f"cut{c}": v for c, v in cuts.items()}}


def test_summarize_length_verdict_and_curves(tmp_path):
  cfg = types.SimpleNamespace(study=types.SimpleNamespace(bootstrap=200, bootstrap_seed=0))
  sft = {"base": _eval({64: 0.0, 128: 0.3, 256: 0.3, 320: 0.3}, 100.0)}
  # RL gains past 128 tokens; SFT does not.
  rl = {s: _eval({64: 0.0, 128: 0.3, 256: 0.45, 320: 0.5}, 150.0 + s, 0.01 * s,
                 gave_up=0.2 + 0.01 * s) for s in range(4)}
  for s in range(4):
    path = tmp_path / "runs" / "rl" / f"seed{s}" / "rl"
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
      for it in range(1, 11):
        f.write(json.dumps({"step": it, "by_level/d3_tokens": 100.0 + 5 * it + s}) + "\n")
  out = study.summarize_length(cfg, {"rl": rl}, sft, str(tmp_path))
  g = out["gain"]
  assert (g["short"], g["long"]) == ("128", "320")
  assert g["sft"] == pytest.approx(0.0) and g["rl"]["mean"] == pytest.approx(0.2)
  assert g["verdict"] == "reproduced"
  assert out["cutoffs"]["320"]["rl_minus_sft"]["mean"] == pytest.approx(0.215)
  assert out["by_difficulty"]["4"]["mean_tokens"]["rl"]["mean"] == pytest.approx(171.5)
  curve = out["curves"]["by_level/d3_tokens"]
  assert len(curve["mean"]) == 10 and curve["mean"][0] == pytest.approx(106.5)
  assert curve["last_minus_first"]["mean"] == pytest.approx(25.0)  # 5 iterations x 5 tokens
  # SFT gains as much as RL: no causal link shown.
  rl_flat = {s: _eval({64: 0.0, 128: 0.3 + 0.01 * s, 256: 0.3, 320: 0.3 + 0.01 * s}, 150.0)
             for s in range(4)}
  out2 = study.summarize_length(cfg, {"rl": rl_flat}, sft, str(tmp_path))
  assert out2["gain"]["verdict"].startswith("inconclusive")
  summary = {"length": out, "seeds": [0, 1, 2, 3]}
  md = study.markdown_length(summary)
  assert "| RL - SFT |" in md and "<= 320" in md and "**reproduced**" in md
  assert "| by_level/d3_tokens |" in md
  assert out["gave_up"]["rl_minus_sft"]["mean"] == pytest.approx(-0.285)
  assert "give up without an answer (`stop: no answer in N tries`): SFT 50.0%" in md
  study.plot_length(summary, str(tmp_path / "length.png"))
  assert (tmp_path / "length.png").stat().st_size > 0


def test_study_config_keeps_keys_given_on_the_command_line():
  from configs import tiny_cpu  # pylint: disable=g-import-not-at-top
  c = study.study_config(tiny_cpu.get_config(), "length", given=["rl.max_new_tokens"])
  assert c.pipeline.families == ("countdown",) and c.pipeline.sft_search_stop > 0
  assert c.evaluate.max_new_tokens == 320 and c.rl.max_new_tokens == 256
  assert study.study_config(tiny_cpu.get_config(), "sampling") == tiny_cpu.get_config()


@pytest.mark.slow
def test_real_shrunk_length_study(tmp_path):
  """The command end to end on the runlocal model: SFT, curation, 2 RL seeds, cut-offs."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  args = [sys.executable, "-m", "k15.study", "--config=configs/tiny_cpu.py:runlocal=True",
          "--study=length", "--seeds=2", f"--workdir={tmp_path}",
          "--config.study.eval_problems=8", "--config.study.eval_samples=2",
          "--config.study.pass_k=2", "--config.study.bootstrap=100",
          "--config.rl.max_new_tokens=96", "--config.evaluate.max_new_tokens=96"]
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads((tmp_path / "study.json").read_text())
  assert list(out["summary"]) == ["rl"] and out["seeds"] == [0, 1]
  assert list(out["length"]["cutoffs"]) == ["64", "96"]
  assert set(out["length"]["by_difficulty"]) == {"3", "4"}
  for s in (0, 1):
    run = json.loads((tmp_path / "runs" / "rl" / f"seed{s}" / "eval.json").read_text())
    assert len(run["per_problem"]["cut64"]) == 8
    # A response counted at 64 tokens is counted at 96 too.
    assert all(a <= b for a, b in zip(run["per_problem"]["cut64"], run["per_problem"]["cut96"]))
    assert run["per_problem"]["cut96"] == run["per_problem"]["pass1"]
    assert 0.0 <= run["gave_up"] <= 1.0 and "gave_up" in run["by_difficulty"]["3"]
    rows = metrics_lib.read_jsonl(str(tmp_path / "runs" / "rl" / f"seed{s}" / "rl"))
    assert {"by_level/d3_tokens", "by_level/d4_tokens"} <= set(rows[-1])
  assert "cut at N tokens" in (tmp_path / "study.md").read_text()
  assert (tmp_path / "length.png").stat().st_size > 0


# --- rl_lift's carry slips (arithmetic) --------------------------------------------------------

def test_carry_slips_counts_forgotten_carries_and_borrows():
  cot = "\n".join([
      "Add the columns from the right, carrying.",
      "8+5+0=13, carry 0, so far 3",             # due, forgotten
      "recheck 8+5+0 is 13, digit 3, carry 0, yes",  # a restatement: not counted again
      "4+2+0=6, carry 0, so far 63",             # not due
      "9+9+1=19, carry 1, so far 963",           # due, kept
      "7*8+3=59, carry 5, so far 9",             # due, kept
      "12-5-0=7, borrow 0, so far 7",            # due (borrowed 1), forgotten
      "3-1-0=2, borrow 0, so far 27",            # not due
      "9+9+0=1x, carry",                         # garbled: skipped
      "\\boxed{27}"])
  assert tasks.carry_slips(cot) == (4, 2)
  assert tasks.carry_slips("\\boxed{5}") == (0, 0)


def test_carry_slips_measures_the_demonstrators_slip_rate():
  kw = dict(seed=0, difficulties=[2, 3, 4], ops=("+", "-", "*"))
  for slip, lo, hi in ((0.6, 0.5, 0.7), (0.0, 0.0, 0.0)):
    counts = np.array([tasks.carry_slips(p.long_cot)
                       for p in tasks.generate("arithmetic", 300, carry_slip=slip, **kw)])
    due, forgotten = counts.sum(axis=0)
    assert due > 300 and lo <= forgotten / due <= hi, (slip, due, forgotten)
