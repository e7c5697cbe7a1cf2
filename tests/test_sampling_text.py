"""The text sampling front end (k15.sampling.text): the same tokens as the sampler calls that
evaluation and curation made before it, per-row seeds independent of the batch, a forced
prefix, stop ids, and no text for ids past the tokenizer's vocabulary."""

import numpy as np
import pytest
from flax import nnx

from k15.model import transformer
from k15.sampling import sampler, text


class _CharTokenizer:
  """One token per character (ids 3..), eos = 1, a second stop id 2, pad = 0; its vocabulary
  (100) is smaller than the model's (128), as a padded embedding table would be."""
  eos_id, pad_id, vocab_size = 1, 0, 100
  stop_ids = (1, 2)

  def render_prompt(self, question):
    return [5] + self.encode(question)

  def encode(self, s):
    return [3 + (ord(ch) % 90) for ch in s]

  def decode(self, ids):
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    assert all(i < self.vocab_size for i in ids), ids  # the front end drops the others
    return "".join(chr(48 + i % 40) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def model():
  cfg = transformer.ModelConfig(vocab_size=128, embed_dim=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=64)
  return transformer.Transformer(cfg, rngs=nnx.Rngs(0))


QUESTIONS = [f"q{i}" + "x" * (i % 3) for i in range(5)]


def _rows(result, r):
  return result.tokens[r, :int(result.lengths[r])]


def test_default_seeds_match_the_direct_calls_evaluation_made(model):
  """Row seed i * k + j under `seed`, batches padded with the last prompt: what
  evaluation's own sampling loop asked of the sampler; and the same for every batch size."""
  tok, k = _CharTokenizer(), 3
  got = {bs: list(text.sample_text(model, tok, QUESTIONS, num_samples=k, batch_size=bs,
                                   max_new_tokens=10, seed=7))
         for bs in (2, 5)}
  for bs in (2, 5):
    assert [i for i, _, _ in got[bs]] == list(range(5))
  for start in range(0, 5, 2):  # the old loop at batch size 2, last batch filled up
    prompts = [tok.render_prompt(q) for q in QUESTIONS[start:start + 2]]
    prompts += [prompts[-1]] * (2 - len(prompts))
    direct = sampler.generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=7,
                              eos_id=(1, 2), num_samples=k, pad_id=0,
                              row_seeds=np.arange(start * k, (start + 2) * k))
    for i in range(start, min(start + 2, 5)):
      for bs in (2, 5):
        _, prompt, responses = got[bs][i]
        assert prompt == tok.render_prompt(QUESTIONS[i])
        for j, resp in enumerate(responses):
          row = (i - start) * k + j
          np.testing.assert_array_equal(resp.ids, _rows(direct, row))
          assert resp.finish_reason == int(direct.finish_reason[row])
  # Different seeds draw different tokens (the comparison above is not vacuous).
  other = list(text.sample_text(model, tok, QUESTIONS, num_samples=k, batch_size=5,
                                max_new_tokens=10, seed=8))
  assert any(not np.array_equal(a.ids, b.ids) for (_, _, ra), (_, _, rb) in zip(got[5], other)
             for a, b in zip(ra, rb))


def test_batch_seeds_match_the_direct_calls_curation_made(model):
  """`batch_seeds=True` with a forced prefix: what curation's own loop asked of the sampler
  (seed + batch start, rows 0.. within the batch, the prefix's tokens after the prompt, a last
  batch of its own size: the very same calls), as texts; the default tiny run curates this
  way, so it draws what it drew before the front end existed."""
  tok, n, bs = _CharTokenizer(), 2, 2
  sampler_ = text.TextSampler(model, tok, max_new_tokens=8, seed=3, batch_size=bs,
                              batch_seeds=True, progress=False)
  for prefix, limit in (("", None), ("\\boxed{", 4)):
    got = sampler_.sample(QUESTIONS, n, 1.0, prefix=prefix, max_new_tokens=limit)
    forced = tok.encode(prefix) if prefix else []
    want = []
    for start in range(0, len(QUESTIONS), bs):
      chunk = QUESTIONS[start:start + bs]
      res = sampler.generate(model, [tok.render_prompt(q) + forced for q in chunk],
                             temperature=1.0, seed=3 + start, max_new_tokens=limit or 8,
                             eos_id=tok.stop_ids, num_samples=n, pad_id=tok.pad_id)
      for i in range(len(chunk)):
        want.append([prefix + tok.decode(ids[ids < tok.vocab_size])
                     for ids in (_rows(res, r) for r in range(i * n, (i + 1) * n))])
    assert got == want
    assert all(t.startswith(prefix) for texts in got for t in texts)


def test_stop_ids_and_out_of_vocabulary_ids():
  """A fake sampler: the front end passes the tokenizer's stop ids and drops ids the tokenizer
  has no text for (here 120 >= its vocabulary of 100) before decoding."""
  seen = {}

  def generate(model, prompts, *, eos_id, num_samples, max_new_tokens, pad_id, row_seeds,
               **unused):
    seen.update(eos_id=eos_id, rows=len(row_seeds))
    R = len(prompts) * num_samples
    tokens = np.full((R, max_new_tokens), pad_id, np.int32)
    tokens[:, :3] = [10, 120, 2]
    return sampler.SampleResult(
        tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
        lengths=np.full(R, 3, np.int32),
        finish_reason=np.full(R, int(sampler.FinishReason.EOS), np.int32))

  orig, sampler.generate = sampler.generate, generate
  try:
    tok = _CharTokenizer()
    [(_, _, [r])] = list(text.sample_text(None, tok, ["a"], num_samples=1, batch_size=4,
                                          max_new_tokens=5))
  finally:
    sampler.generate = orig
  assert tuple(seen["eos_id"]) == (1, 2) and seen["rows"] == 1
  np.testing.assert_array_equal(r.ids, [10, 120, 2])  # ids as sampled
  assert r.text == tok.decode([10, 2])
  with pytest.raises(ValueError, match="num_samples=0"):
    list(text.sample_text(None, tok, ["a"], num_samples=0, batch_size=1, max_new_tokens=5))
