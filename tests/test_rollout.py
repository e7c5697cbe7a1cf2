"""Partial rollouts: split over segments == uninterrupted; the replay buffer is plain data."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15 import sampling
from k15.model import transformer

PROMPTS = [("a", [5, 17, 99, 3]), ("b", [42, 42] + list(range(60, 71))), (7, [7, 8, 9, 120, 1])]


def _model(seed=0, **kw):
  base = dict(vocab_size=128, embed_dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, tie_embeddings=False)
  base.update(kw)
  return transformer.Transformer(transformer.ModelConfig(**base), rngs=nnx.Rngs(seed))


def _run_to_completion(model, budget, *, max_new_tokens, **kw):
  """Iterations of partial rollouts until nothing is left; returns {(prompt_id, j): traj}."""
  buffer, done = sampling.ReplayBuffer(), {}
  prompts = PROMPTS
  for it in range(100):
    finished, buffer = sampling.rollout(
        model, prompts, num_samples=2, max_new_tokens=max_new_tokens, segment_budget=budget,
        buffer=buffer, policy_version=it, seed=1, **kw)
    for t in finished:
      done[(t.prompt_id, t.sample_index)] = t
    for t in buffer.trajectories:
      assert t.finish_reason == sampling.FinishReason.BUDGET
      assert t.length % budget == 0  # a full segment per iteration until finished
    prompts = []  # new prompts only in the first iteration
    if not buffer:
      return done, it + 1
  raise AssertionError("rollout did not finish")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_split_rollout_equals_uninterrupted(temperature):
  model = _model()
  # One prompt bucket for prompts + partial responses of up to 13 + 40 tokens: fewer programs.
  kw = dict(max_new_tokens=40, temperature=temperature, eos_id=None, prompt_buckets=[64])
  # An eos that ends one of the responses in its middle (found by a run without eos).
  probe, _ = _run_to_completion(model, 40, **kw)
  eos = int(probe[("b", 0)].tokens[17])
  kw["eos_id"] = eos

  whole, iters = _run_to_completion(model, 40, **kw)
  assert iters == 1
  split, iters = _run_to_completion(model, 6, **kw)
  assert iters == 7  # ceil(40 / 6)
  assert sorted(whole, key=str) == sorted(split, key=str)
  reasons = {k: sampling.FinishReason(t.finish_reason).name for k, t in whole.items()}
  assert "EOS" in reasons.values() and "LENGTH" in reasons.values()
  for key, w in whole.items():
    s = split[key]
    np.testing.assert_array_equal(s.tokens, w.tokens, err_msg=str(key))
    np.testing.assert_allclose(s.logprobs, w.logprobs, atol=1e-4, err_msg=str(key))
    assert s.finish_reason == w.finish_reason
    assert w.num_segments == 1 and np.all(w.versions == 0)
    # Iteration i produced tokens 6i..6i+5: the version array says which segment is which.
    np.testing.assert_array_equal(s.versions, np.arange(s.length) // 6)
    assert s.num_segments == -(-s.length // 6)
    np.testing.assert_array_equal(s.on_policy_mask(s.versions[-1]),
                                  np.arange(s.length) >= 6 * s.versions[-1])
  if temperature:
    # Samples of one prompt differ (their own seeds), greedy ones do not.
    assert not np.array_equal(whole[("a", 0)].tokens, whole[("a", 1)].tokens)


def test_repeat_detection_across_segments():
  # Attention and MLP outputs zeroed: the next token is a function of the current one, so greedy
  # decoding cycles; a 4-gram straddles the boundaries of segments of 3 or 4 tokens.
  model = _model(seed=5, vocab_size=32)
  for layer in model.layers:
    layer.attn.o.value = jnp.zeros_like(layer.attn.o.value)
    layer.mlp.down.value = jnp.zeros_like(layer.mlp.down.value)
  kw = dict(max_new_tokens=60, temperature=0.0, eos_id=None, repeat_ngram=4, repeat_window=32)
  prompts = [("loop", [3, 9])]
  whole, _ = sampling.rollout(model, prompts, num_samples=1, segment_budget=60, buffer=None,
                              policy_version=0, seed=0, **kw)
  assert [sampling.FinishReason(t.finish_reason).name for t in whole] == ["REPEAT"]
  n = whole[0].length
  assert 4 < n < 60
  budget = 3 if n % 3 else 4  # the loop is caught in the middle of a segment
  buffer, finished = sampling.ReplayBuffer(), []
  for it in range(30):
    finished, buffer = sampling.rollout(model, prompts if it == 0 else [], num_samples=1,
                                        segment_budget=budget, buffer=buffer, policy_version=it,
                                        seed=0, **kw)
    if finished:
      break
  assert len(buffer) == 0 and len(finished) == 1
  assert finished[0].finish_reason == sampling.FinishReason.REPEAT
  np.testing.assert_array_equal(finished[0].tokens, whole[0].tokens)


def test_buffer_state_round_trips_through_json():
  model = _model(seed=2)
  kw = dict(num_samples=2, max_new_tokens=30, segment_budget=8, eos_id=None, temperature=1.0)
  _, buffer = sampling.rollout(model, PROMPTS, buffer=None, policy_version=3, seed=4, **kw)
  assert len(buffer) == 6
  state = buffer.state_dict()
  restored = sampling.ReplayBuffer()
  restored.load_state_dict(json.loads(json.dumps(state)))
  assert len(restored) == 6
  for a, b in zip(buffer.trajectories, restored.trajectories):
    assert (a.prompt_id, a.sample_index, a.seed, a.finish_reason) == (
        b.prompt_id, b.sample_index, b.seed, b.finish_reason)
    for name in ("prompt", "tokens", "logprobs", "versions"):
      x, y = getattr(a, name), getattr(b, name)
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(x, y)  # exact, float32 log-probs included
  # Continuing from the restored buffer gives what continuing the original gives.
  _, cont_a = sampling.rollout(model, [], buffer=buffer, policy_version=4, seed=0, **kw)
  _, cont_b = sampling.rollout(model, [], buffer=restored, policy_version=4, seed=0, **kw)
  assert json.dumps(cont_a.state_dict()) == json.dumps(cont_b.state_dict())
  assert all(t.length == 16 for t in cont_a.trajectories)


def test_bad_buffer_content_is_named():
  t = sampling.Trajectory(prompt_id="p", prompt=np.array([1], np.int32), sample_index=2, seed=0,
                          tokens=np.array([3], np.int32), logprobs=np.array([-1.0], np.float32),
                          versions=np.array([0], np.int32),
                          finish_reason=int(sampling.FinishReason.EOS))
  with pytest.raises(ValueError, match="prompt 'p' sample 2 is finished \\(EOS\\)"):
    sampling.ReplayBuffer().add([t])
  with pytest.raises(ValueError, match="version 0"):
    sampling.ReplayBuffer().load_state_dict({"version": 0, "trajectories": []})
  bad = t.to_dict()
  del bad["seed"]
  with pytest.raises(ValueError, match="trajectory 0: missing key 'seed'"):
    sampling.ReplayBuffer().load_state_dict({"version": 1, "trajectories": [bad]})


def _same_trajectories(a, b):
  assert [(t.prompt_id, t.sample_index) for t in a] == [(t.prompt_id, t.sample_index) for t in b]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.tokens, y.tokens)
    np.testing.assert_array_equal(x.versions, y.versions)
    np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
    assert x.finish_reason == y.finish_reason


def test_rollout_in_checked_pieces_equals_one_piece_and_interrupts_cleanly():
  model = _model()
  kw = dict(num_samples=2, max_new_tokens=25, eos_id=None, temperature=1.0, seed=3,
            prompt_buckets=[64])
  # An iteration with a buffer: one segment of 9 tokens already sampled for every prompt.
  _, start = sampling.rollout(model, PROMPTS, segment_budget=9, buffer=None, policy_version=0,
                              **kw)
  state = start.state_dict()
  fresh = [("c", [11, 12, 13])]

  def iteration(**extra):
    buffer = sampling.ReplayBuffer()
    buffer.load_state_dict(state)
    return sampling.rollout(model, fresh, segment_budget=20, buffer=buffer, policy_version=1,
                            **kw, **extra)

  one_done, one_left = iteration()
  asked = []
  pieces_done, pieces_left = iteration(check_every=6, stop_check=lambda: asked.append(1) and False)
  assert len(asked) == 3  # between the pieces of 6, 6, 6 and 2 tokens
  _same_trajectories(one_done, pieces_done)
  _same_trajectories(one_left.trajectories, pieces_left.trajectories)
  # Both kinds occur: continued rows end at 25 tokens, new rows spend their 20 unfinished.
  assert len(one_done) == 6 and len(one_left) == 2

  # Interrupted at the second question: the buffer is back as it was, nothing is returned.
  buffer = sampling.ReplayBuffer()
  buffer.load_state_dict(state)
  answers = iter([False, True])
  with pytest.raises(sampling.SamplingInterrupted, match="after 12 of 20 tokens"):
    sampling.rollout(model, fresh, segment_budget=20, buffer=buffer, policy_version=1,
                     check_every=6, stop_check=lambda: next(answers), **kw)
  assert buffer.state_dict() == state
