"""The sampler against transformers' greedy generate, teacher forcing, its own distribution, a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from k15 import parallel
from k15 import sampling
from k15.model import hf, transformer

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 99, 3], [42] * 2 + list(range(60, 75)), [7, 8, 9, 10, 11, 12, 120, 1, 2]]


def _native(seed=0, **kw):
  # One layer: the tests compile many programs, and a layer more changes nothing they check.
  base = dict(vocab_size=128, embed_dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, tie_embeddings=False)
  base.update(kw)
  return transformer.Transformer(transformer.ModelConfig(**base), rngs=nnx.Rngs(seed))


def _teacher_forced_logprobs(model, prompts, responses):
  """log p(response[t] | prompt, response[:t]) per row, from one full forward without a cache.

  Rows are right-padded (segment 0), which leaves the causal prefix of every row unchanged.
  """
  seqs = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
  T = max(len(s) for s in seqs)
  tokens = np.zeros((len(seqs), T), np.int32)
  segs = np.zeros((len(seqs), T), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)], segs[i, :len(s)] = s, 1
  logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens), segment_ids=jnp.asarray(segs)),
                                       axis=-1))
  out = []
  for i, (p, r) in enumerate(zip(prompts, responses)):
    idx = np.arange(len(p) - 1, len(p) + len(r) - 1)
    out.append(logp[i, idx, r])
  return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A random transformers Llama and the same weights loaded into k15."""
  cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)
  torch.manual_seed(0)
  ref = tf.LlamaForCausalLM(cfg)
  # Weights of std 0.5: greedy continuations wander over the vocabulary instead of settling
  # on one token (as they do at the default init).
  with torch.no_grad():
    for p in ref.parameters():
      p.copy_(torch.randn_like(p) * 0.5)
  ref = ref.float().eval()
  path = tmp_path_factory.mktemp("llama")
  ref.save_pretrained(path, safe_serialization=True)
  return ref, hf.load(str(path), jnp.float32)


def test_greedy_matches_transformers_generate(llama):
  ref, model = llama
  n = 56
  res = sampling.generate(model, PROMPTS, max_new_tokens=n, temperature=0.0, eos_id=None)
  assert res.tokens.shape == (3, n) and res.tokens.dtype == np.int32
  assert res.logprobs.dtype == np.float32
  np.testing.assert_array_equal(res.lengths, n)
  assert res.reasons() == ["LENGTH"] * 3
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # a tiny model: one thread is faster, and unbothered by a busy CPU
  try:
    # One prompt at a time in torch, so its padding conventions play no part.
    with torch.no_grad():
      hf_out = [ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                             do_sample=False, max_new_tokens=n, pad_token_id=0)[0, len(p):].numpy()
                for p in PROMPTS]
  finally:
    torch.set_num_threads(threads)
  # Continuous batching over the paged cache: 2 slots for 3 prompts, blocks of 8 tokens.
  cont = sampling.generate(model, PROMPTS, max_new_tokens=n, temperature=0.0, eos_id=None,
                           continuous=True, slots=2, block_size=8)
  for i, (p, expected) in enumerate(zip(PROMPTS, hf_out)):
    assert len(set(expected.tolist())) > 10, "degenerate reference continuation"
    np.testing.assert_array_equal(res.tokens[i], expected, err_msg=f"prompt {i}")
    np.testing.assert_array_equal(cont.tokens[i], expected, err_msg=f"prompt {i}, continuous")
    np.testing.assert_allclose(cont.logprobs[i], res.logprobs[i], atol=1e-5)
    # Left padding in the batch changes nothing: each prompt alone gives the same.
    alone = sampling.generate(model, [p], max_new_tokens=n, temperature=0.0, eos_id=None)
    np.testing.assert_array_equal(alone.tokens[0], res.tokens[i])
    np.testing.assert_allclose(alone.logprobs[0], res.logprobs[i], atol=1e-5)
    # Greedy reports the policy's (untempered) log-prob of the argmax.
    np.testing.assert_allclose(res.logprobs[i],
                               _teacher_forced_logprobs(model, [p], [expected])[0], atol=1e-4)


def test_sampled_logprobs_equal_teacher_forcing():
  model = _native(seed=1)
  # Three decode phases (a cache of 32 + 8, 16, 24 slots): the phase changes do not show.
  res = sampling.generate(model, PROMPTS[:2], max_new_tokens=24, temperature=1.0, eos_id=None,
                          num_samples=3, seed=7, decode_phases=3)
  assert res.tokens.shape == (6, 24)
  # Prompt-major rows; the samples of a prompt differ.
  assert len({tuple(r) for r in res.tokens[:3]}) == 3
  expected = _teacher_forced_logprobs(model, [PROMPTS[r // 3] for r in range(6)], res.tokens)
  for r in range(6):
    assert expected[r].mean() < -1.0  # a spread distribution, not a near-deterministic one
    np.testing.assert_allclose(res.logprobs[r], expected[r], atol=1e-4, err_msg=f"row {r}")


def test_seeds_reproducible_and_rows_independent_of_batch():
  model = _native(seed=2)
  kw = dict(max_new_tokens=16, temperature=1.0, eos_id=None, num_samples=2)
  a = sampling.generate(model, PROMPTS, seed=3, **kw)
  b = sampling.generate(model, PROMPTS, seed=3, **kw)
  c = sampling.generate(model, PROMPTS, seed=4, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).mean() > 0.5
  # A row's draws depend on (seed, row seed), not on the rest of the batch or its padding.
  last = sampling.generate(model, PROMPTS[2:], seed=3, row_seeds=[4, 5], **kw)
  np.testing.assert_array_equal(last.tokens, a.tokens[4:])


@pytest.fixture(scope="module")
def tiny():
  """A model with a 12-token vocabulary and one prompt's next-token logits."""
  model = _native(seed=3, vocab_size=12, embed_dim=32, head_dim=8, mlp_dim=64)
  model.lm_head.value = model.lm_head.value * 0.3  # a flatter next-token distribution
  prompt = [1, 5, 2, 7]
  logits = np.asarray(model(jnp.asarray([prompt], jnp.int32))[0, -1], np.float64)
  return model, prompt, logits


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_first_token_frequencies_match_softmax(tiny, temperature):
  model, prompt, logits = tiny
  n = 4000
  res = sampling.generate(model, [prompt], max_new_tokens=1, temperature=temperature,
                          eos_id=None, num_samples=n, seed=11)
  probs = _softmax(logits / temperature)
  assert probs.max() < 0.4, probs  # enough spread for the test to mean something
  counts = np.bincount(res.tokens[:, 0], minlength=12)
  _, p = stats.chisquare(counts, probs * n)
  assert p > 1e-3, (counts, probs * n)
  np.testing.assert_allclose(res.logprobs[:, 0], np.log(probs)[res.tokens[:, 0]], atol=1e-5)


def _kept_set(logits, top_k, top_p):
  """Numpy reference of top-k then top-p: indices a sampler may emit."""
  order = np.argsort(-logits, kind="stable")
  keep = order[:top_k] if top_k else order
  probs = _softmax(logits[keep])
  before = np.cumsum(probs) - probs
  return set(keep[before < top_p].tolist()) | {int(keep[0])}


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (5, 0.5)])
def test_top_k_top_p_stay_in_kept_set(tiny, top_k, top_p):
  model, prompt, logits = tiny
  kept = _kept_set(logits, top_k, top_p)
  assert 1 < len(kept) < 12
  n = 2000
  res = sampling.generate(model, [prompt], max_new_tokens=1, temperature=1.0, top_k=top_k,
                          top_p=top_p, eos_id=None, num_samples=n, seed=5)
  drawn = res.tokens[:, 0]
  assert set(drawn.tolist()) == kept  # never outside, and every kept token shows up
  renorm = np.full(12, -np.inf)
  renorm[sorted(kept)] = np.log(_softmax(logits[sorted(kept)]))
  np.testing.assert_allclose(res.logprobs[:, 0], renorm[drawn], atol=1e-5)
  counts = np.bincount(drawn, minlength=12)[sorted(kept)]
  _, p = stats.chisquare(counts, np.exp(renorm[sorted(kept)]) * n)
  assert p > 1e-3


def test_filter_logits_matches_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(16, 40).astype(np.float32) * 2
  for top_k, top_p in [(1, 1.0), (7, 1.0), (0, 0.3), (0, 0.95), (10, 0.8)]:
    out = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k,
                                            None if top_p == 1.0 else top_p))
    for b in range(16):
      kept = _kept_set(logits[b].astype(np.float64), top_k, top_p)
      assert set(np.flatnonzero(np.isfinite(out[b])).tolist()) == kept, (top_k, top_p, b)
      np.testing.assert_array_equal(out[b][sorted(kept)], logits[b][sorted(kept)])


def test_eos_stops_and_pads():
  model = _native(seed=4)
  free = sampling.generate(model, PROMPTS, max_new_tokens=32, temperature=0.0, eos_id=None)
  assert free.reasons() == ["LENGTH"] * 3
  np.testing.assert_array_equal(free.lengths, 32)
  # Make an eos of a token that row 0 emits at step 5 and whose first occurrence in the other
  # rows (if any) we know.
  eos = int(free.tokens[0, 5])
  first = [int(np.flatnonzero(r == eos)[0]) if eos in r else None for r in free.tokens]
  assert first[0] <= 5
  res = sampling.generate(model, PROMPTS, max_new_tokens=32, temperature=0.0, eos_id=eos,
                          pad_id=127)
  for i, f in enumerate(first):
    n = 32 if f is None else f + 1
    assert res.lengths[i] == n
    assert res.reasons()[i] == ("LENGTH" if f is None else "EOS")
    np.testing.assert_array_equal(res.tokens[i, :n], free.tokens[i, :n])
    np.testing.assert_array_equal(res.tokens[i, n:], 127)
    np.testing.assert_array_equal(res.logprobs[i, n:], 0.0)
    assert np.all(res.logprobs[i, :n] < 0)
  # Several eos ids: whichever comes first.
  eos2 = int(free.tokens[1, 2])
  both = sampling.generate(model, PROMPTS, max_new_tokens=32, temperature=0.0,
                           eos_id=[eos, eos2])
  assert both.lengths[1] <= 3 and both.reasons()[1] == "EOS"
  # Per-prompt limits.
  lim = sampling.generate(model, PROMPTS, max_new_tokens=[3, 9, 32], temperature=0.0,
                          eos_id=None)
  np.testing.assert_array_equal(lim.lengths, [3, 9, 32])
  np.testing.assert_array_equal(lim.tokens[0, 3:], 0)


def _looping_model(vocab=32):
  """Attention and MLP outputs zeroed: the next token is a function f of the current one, so
  greedy decoding enters a cycle within `vocab` steps."""
  model = _native(seed=5, vocab_size=vocab)
  for layer in model.layers:
    layer.attn.o.value = jnp.zeros_like(layer.attn.o.value)
    layer.mlp.down.value = jnp.zeros_like(layer.mlp.down.value)
  f = np.asarray(jnp.argmax(model(jnp.arange(vocab, dtype=jnp.int32)[:, None])[:, 0], -1))
  return model, f


def _repeat_at(seq, t, n, window):
  """Numpy reference: seq[t-n+1 : t+1] occurred earlier within the last `window` tokens."""
  hist = list(seq[max(0, t + 1 - window):t + 1])
  if len(hist) < n:
    return False
  last = hist[-n:]
  return any(hist[j:j + n] == last for j in range(len(hist) - n))


def _first_repeat(seq, n, window):
  return next((t for t in range(len(seq)) if _repeat_at(seq, t, n, window)), None)


def test_repeat_detected_matches_numpy():
  rng = np.random.RandomState(0)
  hist = rng.randint(0, 3, (64, 12)).astype(np.int32)
  hist[:8, :5] = -1  # short responses
  for n in (1, 2, 3, 5):
    got = np.asarray(sampling.repeat_detected(jnp.asarray(hist), n))
    for b in range(64):
      valid = hist[b][hist[b] >= 0].tolist()
      want = _repeat_at(valid, len(valid) - 1, n, 12)
      assert got[b] == want, (n, b, hist[b])
  assert 0 < got.sum() < 64


def test_repeat_detection_stops_a_loop():
  model, f = _looping_model()
  prompt = [3, 9]
  seq = [prompt[-1]]
  for _ in range(64):
    seq.append(int(f[seq[-1]]))
  greedy = seq[1:]
  stop = _first_repeat(greedy, 3, 16)
  assert stop is not None and stop < 40
  plain = sampling.generate(model, [prompt], max_new_tokens=64, temperature=0.0, eos_id=None)
  np.testing.assert_array_equal(plain.tokens[0], greedy)
  res = sampling.generate(model, [prompt], max_new_tokens=64, temperature=0.0, eos_id=None,
                          repeat_ngram=3, repeat_window=16)
  assert res.reasons() == ["REPEAT"]
  assert res.lengths[0] == stop + 1
  np.testing.assert_array_equal(res.tokens[0, :stop + 1], greedy[:stop + 1])


def test_one_program_per_bucket():
  model = _native(seed=6)
  kw = dict(eos_id=None, num_samples=2)
  sampling.generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=20, temperature=1.0, **kw)
  before = sampling.compiled_programs()
  # Another prompt length in the same 16-bucket, another limit in the same 32-bucket, other
  # sampling parameters and seeds: the same program.
  sampling.generate(model, [list(range(1, 10))], max_new_tokens=30, temperature=0.5,
                    top_p=1.0, seed=9, **kw)
  sampling.generate(model, [[7] * 16], max_new_tokens=17, temperature=0.0, eos_id=None,
                    num_samples=2)
  assert sampling.compiled_programs() == before
  # A longer prompt bucket compiles a new one.
  sampling.generate(model, [[7] * 17], max_new_tokens=17, temperature=0.0, eos_id=None,
                    num_samples=2)
  assert sampling.compiled_programs() == before + 1


def test_sharded_greedy_equals_unsharded():
  assert jax.device_count() == 8
  kw = dict(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, mlp_dim=128, tie_embeddings=False)
  cfg = transformer.ModelConfig(**kw)
  single = transformer.Transformer(cfg, rngs=nnx.Rngs(8))
  prompts = PROMPTS + [[9, 9, 1]]
  gen = dict(max_new_tokens=40, eos_id=None, num_samples=2)
  expected = sampling.generate(single, prompts, temperature=0.0, **gen)
  expected_t1 = sampling.generate(single, prompts, temperature=1.0, seed=1, **gen)

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    sharded = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(8)))
    q = sharded.layers[0].attn.q.value
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    got = sampling.generate(sharded, prompts, temperature=0.0, **gen)
    got_t1 = sampling.generate(sharded, prompts, temperature=1.0, seed=1, **gen)
    # The parameters were used in place: still the same sharded arrays.
    assert sharded.layers[0].attn.q.value is q
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)
  np.testing.assert_array_equal(got_t1.tokens, expected_t1.tokens)
  np.testing.assert_allclose(got_t1.logprobs, expected_t1.logprobs, atol=1e-5)


def test_prefill_slots_keep_rows_with_their_prompts():
  from k15.sampling import sampler  # pylint: disable=g-import-not-at-top
  # 3 prompts with 1, 5 and 2 samples over 4 devices of 4 rows (8 real rows, 8 padding rows):
  # prompt 1's samples straddle devices 0 and 1, so both prefill it.
  source = np.repeat(np.arange(3), [1, 5, 2])
  slots, rows = sampler._prefill_slots(source, U=3, Rb=16, shards=4, local=True)
  width = len(slots) // 4
  assert width == 2 and len(slots) == 8
  for r, u in enumerate(source):
    block = r // 4
    assert 0 <= rows[r] < width and slots[block * width + rows[r]] == u
  assert slots[:4] == [0, 1, 1, 2] and slots[4:] == [-1] * 4
  # One SPMD program: prompt u in slot u, rows pointing at it wherever it lies.
  slots, rows = sampler._prefill_slots(source, U=3, Rb=16, shards=4, local=False)
  assert slots[:3] == [0, 1, 2] and all(s == -1 for s in slots[3:]) and len(slots) % 4 == 0
  np.testing.assert_array_equal(rows[:8], source)


@pytest.mark.parametrize("mesh_axes,per_device", [
    ({"data": 8}, True), ({"data": 4, "fsdp": 2}, False), ({"data": 2, "tensor": 4}, False)])
def test_data_parallel_mesh_samples_per_device(mesh_axes, per_device, monkeypatch):
  # On a mesh that only splits rows (parameters whole on every device), each device samples its
  # own rows in its own loop, with no collective; rows, log-probs, lengths and finish reasons
  # are those of the unsharded sampler. Uneven sample counts put a prompt's samples on two
  # devices; an eos id, a repeat check and per-prompt limits make rows finish at different
  # steps, so devices stop their loops at different times.
  from k15.sampling import sampler  # pylint: disable=g-import-not-at-top
  model = _native(seed=12, num_layers=2)
  prompts = PROMPTS + [[9, 9, 1], list(range(30, 52))]
  gen = dict(max_new_tokens=[24, 40, 8, 40, 33], num_samples=[1, 5, 2, 3, 1], temperature=1.0,
             seed=5, repeat_ngram=2, repeat_window=8)
  free = sampling.generate(model, prompts, eos_id=None, **gen)
  eos = int(free.tokens[3, 4])
  expected = sampling.generate(model, prompts, eos_id=eos, **gen)
  assert len(set(expected.reasons())) >= 2, expected.reasons()
  calls = []
  run = sampler._run
  monkeypatch.setattr(sampler, "_run", lambda *a, **kw: calls.append((a, kw)) or run(*a, **kw))
  with parallel.use_mesh(parallel.make_mesh(mesh_axes)):
    sharded = parallel.create_sharded(lambda: _native(seed=12, num_layers=2))
    axes = sampler._row_axes(parallel.state_shardings(nnx.state(sharded)))
    assert bool(axes) == per_device
    got = sampling.generate(sharded, prompts, eos_id=eos, **gen)
    # The per-device program has no collective at all; the SPMD one all-reduces "all done?".
    hlo = run.lower(*calls[-1][0], **calls[-1][1]).compile().as_text()
  collectives = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
  assert any(c in hlo for c in collectives) != per_device
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)
  np.testing.assert_array_equal(got.lengths, expected.lengths)
  np.testing.assert_array_equal(got.finish_reason, expected.finish_reason)
  # The program read one host copy of each replicated parameter on all 8 CPU devices, while
  # the model kept its own copy per device.
  used = [a for a in jax.tree.leaves(calls[-1][0][0]) if a.is_fully_replicated]
  own = [a for a in jax.tree.leaves(nnx.state(sharded)) if a.is_fully_replicated]
  assert used and len(used) == len(own)
  assert all(len(_buffers(a)) == 1 for a in used)
  assert all(len(_buffers(a)) == 8 for a in own)


def _buffers(x):
  return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}


def test_share_cpu_replicas():
  mesh = parallel.make_mesh({"data": 4, "tensor": 2})
  spec = jax.sharding.PartitionSpec
  # Computed on the devices, one buffer each (a device_put of an aligned numpy array may
  # already alias it on every device).
  replicated = jax.jit(lambda: jnp.arange(96.0, dtype=jnp.float32).reshape(8, 12),
                       out_shardings=jax.sharding.NamedSharding(mesh, spec()))
  whole = replicated()
  split = jax.device_put(np.ones((8, 12), np.float32),
                         jax.sharding.NamedSharding(mesh, spec("tensor")))
  tree = {"whole": whole, "split": split, "host": np.zeros(3), "n": 7}
  out = parallel.share_cpu_replicas(tree)
  assert len(_buffers(whole)) == 8 and len(_buffers(out["whole"])) == 1
  assert out["whole"].sharding == whole.sharding
  np.testing.assert_array_equal(np.asarray(out["whole"]), np.asarray(whole))
  for shard in out["whole"].addressable_shards:  # every device sees the whole value
    np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(whole))
  # Split arrays, host arrays and other leaves are returned as they are.
  assert out["split"] is split and out["host"] is tree["host"] and out["n"] == 7
  # A computation over the shared array reads the same values on every device.
  doubled = jax.jit(lambda a: a * 2, out_shardings=whole.sharding)(out["whole"])
  np.testing.assert_array_equal(np.asarray(doubled), 2 * np.asarray(whole))
  # Donating either array while the other is alive leaves the other one intact on every device.
  expected = np.asarray(whole).copy()
  bump = jax.jit(lambda a: a + 1, donate_argnums=0)
  for donate_shared in (False, True):
    fresh = replicated()
    assert len(_buffers(fresh)) == 8
    shared = parallel.share_cpu_replicas(fresh)
    donated, kept = (shared, fresh) if donate_shared else (fresh, shared)
    np.testing.assert_array_equal(np.asarray(bump(donated)), expected + 1)
    for shard in kept.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected)


def test_cache_layout_under_a_mesh():
  # One [B, K, H, S] k and [B, K, S, H] v per layer, rows over the batch axes and kv heads over
  # 'tensor'.
  from k15.sampling import sampler  # pylint: disable=g-import-not-at-top
  cfg = transformer.ModelConfig(vocab_size=128, embed_dim=64, num_layers=3, num_heads=4,
                                num_kv_heads=2, head_dim=16, mlp_dim=128)
  with parallel.use_mesh(parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    cache = jax.jit(lambda: sampler._constrain_cache(transformer.init_cache(cfg, 8, 24)))()
  assert len(cache["k"]) == len(cache["v"]) == 3
  rows = ("data", "fsdp")
  for x, shape in [(k, (8, 2, 16, 24)) for k in cache["k"]] + [(v, (8, 2, 24, 16))
                                                                for v in cache["v"]]:
    assert x.shape == shape
    assert x.sharding.spec == jax.sharding.PartitionSpec(rows, "tensor")
  assert cache["positions"].sharding.spec == jax.sharding.PartitionSpec(rows)


# --- bad input: every error names what is wrong ---------------------------------------------

def test_bad_inputs_are_named():
  model = _native(seed=0)
  with pytest.raises(ValueError, match="prompt 1 has token id 128 outside"):
    sampling.generate(model, [[1], [2, 128]], max_new_tokens=4, eos_id=None)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    sampling.generate(model, [[]], max_new_tokens=4, eos_id=None)
  with pytest.raises(ValueError, match="top_p=0.0"):
    sampling.generate(model, [[1]], max_new_tokens=4, eos_id=None, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens=0 for prompt 0"):
    sampling.generate(model, [[1]], max_new_tokens=0, eos_id=None)
  with pytest.raises(ValueError, match="longer than the largest prompt bucket 8"):
    sampling.generate(model, [[1] * 9], max_new_tokens=4, eos_id=None, prompt_buckets=[4, 8])
  with pytest.raises(ValueError, match="eos_id 500 is outside"):
    sampling.generate(model, [[1]], max_new_tokens=4, eos_id=500)
  with pytest.raises(ValueError, match="num_samples has 1 entries but there are 2 prompts"):
    sampling.generate(model, [[1], [2]], max_new_tokens=4, eos_id=None, num_samples=[2])
