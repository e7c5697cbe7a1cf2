"""Evaluation: pass@1 over k samples, mean tokens, the per-difficulty breakdown, the table."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from k15 import config as k15_config
from k15 import evaluate
from k15.model import transformer
from k15.sampling import sampler


@dataclasses.dataclass(frozen=True)
class _Problem:
  id: str
  prompt: str
  difficulty: int
  solved: int  # how many of the k samples the fake sampler makes correct


class _CharTokenizer:
  """One token per character; eos = 1, pad = 0; enough for the evaluation loop."""
  eos_id, pad_id, bos_id = 1, 0, 2

  def render_prompt(self, question):
    return [self.bos_id] + [ord(ch) for ch in question]

  def decode(self, ids):
    ids = list(np.asarray(ids).reshape(-1))
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return "".join(chr(i) for i in ids if i not in (self.pad_id, self.bos_id))


def _fake_generate(calls):
  """A sampler whose row r (seed s = row_seeds[r]) answers 'ok' for sample j < solved, where
  j = s % k; its response is `3 + j + len(question) % 3` tokens long, eos counted, or cut at
  max_new_tokens (reason LENGTH)."""

  def generate(model, prompts, *, max_new_tokens, eos_id, temperature, top_p, top_k, seed,
               num_samples, pad_id, row_seeds):
    del model, top_p, top_k, seed
    calls.append(dict(prompts=len(prompts), num_samples=num_samples, temperature=temperature))
    k = num_samples
    rows = len(prompts) * k
    assert len(row_seeds) == rows
    tokens = np.full((rows, max_new_tokens), pad_id, np.int32)
    lengths = np.zeros(rows, np.int32)
    reasons = np.full(rows, int(sampler.FinishReason.EOS), np.int32)
    for i, prompt in enumerate(prompts):
      question = "".join(chr(t) for t in prompt[1:])
      solved = int(question.split(":")[1])
      for j in range(k):
        r = i * k + j
        assert row_seeds[r] % k == j
        text = ("ok" if row_seeds[r] % k < solved else "no") + "x" * (j + len(question) % 3)
        ids = [ord(ch) for ch in text] + [int(np.atleast_1d(eos_id)[0])]  # stop ids: eos first
        if len(ids) > max_new_tokens:
          ids = ids[:max_new_tokens]
          reasons[r] = int(sampler.FinishReason.LENGTH)
        tokens[r, :len(ids)] = ids
        lengths[r] = len(ids)
    return sampler.SampleResult(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                                lengths=lengths, finish_reason=reasons)

  return generate


def _problems():
  # (difficulty, solved of k=4) chosen so every difficulty has a different accuracy.
  spec = [(1, 4), (1, 3), (1, 4), (2, 1), (2, 2), (3, 0), (2, 0), (3, 1)]
  return [_Problem(id=f"p{i}", prompt=f"q{i}:{solved}", difficulty=d, solved=solved)
          for i, (d, solved) in enumerate(spec)]


def _grade(problem, text):
  return 1.0 if text.startswith("ok") else 0.0


def _expected_length(problem, j):
  return 3 + j + len(problem.prompt) % 3


def test_pass_at_1_tokens_and_breakdown(monkeypatch):
  calls = []
  monkeypatch.setattr(sampler, "generate", _fake_generate(calls))
  problems, k = _problems(), 4
  res = evaluate.evaluate(None, problems, tokenizer=_CharTokenizer(), grade_fn=_grade,
                          num_samples=k, temperature=1.0, max_new_tokens=16, seed=0,
                          batch_size=3, progress=False)
  solved = np.array([p.solved for p in problems], float)
  lengths = np.array([[_expected_length(p, j) for j in range(k)] for p in problems], float)
  assert res["accuracy"] == pytest.approx(solved.mean() / k)
  assert res["mean_tokens"] == pytest.approx(lengths.mean())
  assert res["n"] == len(problems) and res["num_samples"] == k
  assert res["greedy_accuracy"] is None and res["truncated"] == 0.0
  assert [c["prompts"] for c in calls] == [3, 3, 3]  # the last batch is filled up
  assert sorted(res["by_difficulty"]) == [1, 2, 3]
  for d, got in res["by_difficulty"].items():
    idx = [i for i, p in enumerate(problems) if p.difficulty == d]
    assert got["n"] == len(idx)
    assert got["accuracy"] == pytest.approx(solved[idx].mean() / k)
    assert got["mean_tokens"] == pytest.approx(lengths[idx].mean())
  assert res["by_difficulty"][1]["accuracy"] == pytest.approx(11 / 12)
  assert [p["accuracy"] for p in res["per_problem"]] == pytest.approx(list(solved / k))
  assert [p["id"] for p in res["per_problem"]] == [p.id for p in problems]

  # Row seeds, not batches, decide each sample: another batch size gives the same results.
  other = evaluate.evaluate(None, problems, tokenizer=_CharTokenizer(), grade_fn=_grade,
                            num_samples=k, temperature=1.0, max_new_tokens=16, seed=0,
                            batch_size=8, progress=False)
  assert other == res


def test_greedy_uses_one_sample(monkeypatch):
  calls = []
  monkeypatch.setattr(sampler, "generate", _fake_generate(calls))
  problems = _problems()
  res = evaluate.evaluate(None, problems, tokenizer=_CharTokenizer(), grade_fn=_grade,
                          num_samples=4, temperature=0.0, max_new_tokens=16, seed=0,
                          batch_size=8, progress=False)
  assert calls == [dict(prompts=8, num_samples=1, temperature=0.0)]
  # Sample 0 is correct iff solved > 0.
  want = np.mean([p.solved > 0 for p in problems])
  assert res["accuracy"] == pytest.approx(want) and res["greedy_accuracy"] == res["accuracy"]
  assert res["num_samples"] == 1


def test_truncated_responses_are_counted_and_score_zero(monkeypatch):
  monkeypatch.setattr(sampler, "generate", _fake_generate([]))
  problems, k, limit = _problems(), 4, 5
  res = evaluate.evaluate(None, problems, tokenizer=_CharTokenizer(), grade_fn=_grade,
                          num_samples=k, temperature=1.0, max_new_tokens=limit, seed=0,
                          batch_size=8, progress=False)
  lengths = np.array([[_expected_length(p, j) for j in range(k)] for p in problems])
  assert res["truncated"] == pytest.approx((lengths > limit).mean())
  assert 0 < res["truncated"] < 1
  assert res["mean_tokens"] == pytest.approx(np.minimum(lengths, limit).mean())
  # A cut response has no final answer (k15.rewards.finish), though "ok" survives the cut here
  # and the grader alone would accept it.
  right = np.array([[j < p.solved for j in range(k)] for p in problems])
  assert np.any(right & (lengths > limit))
  assert res["accuracy"] == pytest.approx((right & (lengths <= limit)).mean())
  with pytest.raises(ValueError, match="no problems"):
    evaluate.evaluate(None, [], tokenizer=_CharTokenizer(), grade_fn=_grade, progress=False)


def test_format_table():
  results = {
      "sft": {"accuracy": 0.4125, "mean_tokens": 123.46,
              "by_difficulty": {1: {"accuracy": 0.75, "mean_tokens": 80.0, "n": 4},
                                3: {"accuracy": 0.0, "mean_tokens": 200.0, "n": 2}}},
      "rl": {"accuracy": 0.6, "mean_tokens": 150.0,
             "by_difficulty": {"1": {"accuracy": 1.0, "mean_tokens": 90.0, "n": 4},
                               "2": {"accuracy": 0.5, "mean_tokens": 160.0, "n": 4},
                               None: {"accuracy": 0.5, "mean_tokens": 9.0, "n": 2}}},
  }
  table = evaluate.format_table(results)
  lines = table.splitlines()
  assert len(lines) == 4
  assert lines[0].split() == ["model", "accuracy", "%", "mean", "tokens", "d=1", "%", "d=2", "%",
                              "d=3", "%"]
  assert lines[2].split() == ["sft", "41.2", "123.5", "75.0", "-", "0.0"]
  assert lines[3].split() == ["rl", "60.0", "150.0", "100.0", "50.0", "-"]
  # Columns line up: every line has the same width.
  assert len({len(line.rstrip()) for line in lines}) == 1


def test_with_the_real_sampler():
  """A random tiny model through k15.sampling: lengths and grading wired right, any batch."""
  cfg = transformer.ModelConfig(vocab_size=128, embed_dim=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=64)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  problems = [_Problem(id=str(i), prompt=f"q{i}", difficulty=1 + i % 2, solved=0)
              for i in range(3)]
  texts = []

  def grade(problem, text):
    texts.append(text)
    return float(len(text) % 2 == 0)

  kw = dict(tokenizer=_CharTokenizer(), grade_fn=grade, num_samples=2, temperature=1.0,
            max_new_tokens=6, seed=3, progress=False)
  res = evaluate.evaluate(model, problems, batch_size=3, **kw)
  direct = sampler.generate(model, [_CharTokenizer().render_prompt(p.prompt) for p in problems],
                            max_new_tokens=6, eos_id=1, temperature=1.0, seed=3, num_samples=2,
                            row_seeds=np.arange(6))
  assert res["mean_tokens"] == pytest.approx(direct.lengths.mean())
  ended = [r == "EOS" for r in direct.reasons()]
  want = [ended[r] and len(_CharTokenizer().decode(direct.tokens[r, :direct.lengths[r]])) % 2 == 0
          for r in range(6)]
  assert res["accuracy"] == pytest.approx(np.mean(want))
  assert res["truncated"] == pytest.approx(np.mean([r == "LENGTH" for r in direct.reasons()]))
  assert len(texts) == sum(ended)  # a response that did not end is not graded
  one = evaluate.evaluate(model, problems, batch_size=1, **kw)
  assert one["accuracy"] == res["accuracy"] and one["mean_tokens"] == res["mean_tokens"]


def test_bad_arguments():
  with pytest.raises(ValueError, match="no problems"):
    evaluate.evaluate(None, [], tokenizer=_CharTokenizer(), grade_fn=_grade, progress=False)
  with pytest.raises(ValueError, match="num_samples=0"):
    evaluate.evaluate(None, _problems(), tokenizer=_CharTokenizer(), grade_fn=_grade,
                      num_samples=0, progress=False)
  with pytest.raises(ValueError, match="unknown evaluate config keys \\['samples'\\]"):
    k15_config.evaluate_block(samples=3)
  with pytest.raises(ValueError, match="item 'sft': expected name=directory"):
    evaluate._parse_checkpoints("sft")
