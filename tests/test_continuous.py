"""Continuous batching over the paged KV cache: the same rows as each prompt sampled alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15 import parallel
from k15 import sampling
from k15.model import attention, transformer
from k15.sampling import paged, sampler

PROMPTS = [[5, 17, 99, 3], [42] * 2 + list(range(60, 75)), [7, 8, 9, 10, 11, 12, 120, 1, 2],
           [9, 9, 1], list(range(30, 52))]


def _native(seed=0, **kw):
  # One layer: the tests compile many programs, and a layer more changes nothing they check.
  base = dict(vocab_size=128, embed_dim=64, num_layers=1, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, tie_embeddings=False)
  base.update(kw)
  return transformer.Transformer(transformer.ModelConfig(**base), rngs=nnx.Rngs(seed))


def _assert_same_rows(got, want, rows=slice(None), msg=""):
  width = want.tokens.shape[1]  # a prompt alone may have a lower limit
  np.testing.assert_array_equal(got.tokens[rows, :width], want.tokens, err_msg=msg)
  np.testing.assert_allclose(got.logprobs[rows, :width], want.logprobs, atol=1e-5, err_msg=msg)
  np.testing.assert_array_equal(got.lengths[rows], want.lengths, err_msg=msg)
  np.testing.assert_array_equal(got.finish_reason[rows], want.finish_reason, err_msg=msg)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_equal_each_prompt_sampled_alone(temperature):
  # 12 rows through 3 slots of 4-token blocks: rows end at different steps (an EOS list, a
  # repeat check, per-prompt limits) and their slots take the next rows mid-loop; prompts of
  # 3 to 22 tokens start their responses mid-block (copy on write of the prompt's last block).
  model = _native(seed=12)
  counts = [1, 5, 2, 3, 1]
  gen = dict(max_new_tokens=[24, 40, 8, 40, 33], num_samples=counts, temperature=temperature,
             seed=5, repeat_ngram=2, repeat_window=8)
  free = sampling.generate(model, PROMPTS, eos_id=None, **gen)
  eos = [int(free.tokens[3, 4]), int(free.tokens[9, 6])]
  static = sampling.generate(model, PROMPTS, eos_id=eos, **gen)
  got = sampling.generate(model, PROMPTS, eos_id=eos, continuous=True, slots=3, block_size=4,
                          **gen)
  assert len(set(static.reasons())) >= 2, static.reasons()
  _assert_same_rows(got, static)
  assert got.stats["kv_peak_bytes"] <= got.stats["kv_bytes"] < static.stats["kv_bytes"]
  # Prompts alone (their rows keep their seeds): the first (one row) and the second (five).
  # (The static path's rows do not depend on the batch: test_sampler.)
  start = np.cumsum([0] + counts)
  for i in (0, 1):
    one = dict(gen, max_new_tokens=gen["max_new_tokens"][i], num_samples=counts[i],
               row_seeds=list(range(start[i], start[i + 1])))
    alone = sampling.generate(model, [PROMPTS[i]], eos_id=eos, continuous=True, slots=2,
                              block_size=4, **one)
    _assert_same_rows(got, alone, slice(start[i], start[i + 1]), f"prompt {i}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_prefill_equals_prefill_batches_and_static(temperature):
  # Prompts of 3 to 22 tokens prefilled in chunks of 5 tokens (smaller than most prompts, not a
  # multiple of the block size 4 or of any prompt's length) or of 32 (a prompt per chunk),
  # together with the slots' decode steps: the rows of the static path and of prefill batches,
  # with an EOS list, a repeat check and per-prompt limits, rows refilling 3 slots mid-loop.
  model = _native(seed=12)
  gen = dict(max_new_tokens=[24, 40, 8, 40, 33], num_samples=[1, 5, 2, 3, 1],
             temperature=temperature, seed=5, repeat_ngram=2, repeat_window=8)
  free = sampling.generate(model, PROMPTS, eos_id=None, **gen)
  gen["eos_id"] = [int(free.tokens[3, 4]), int(free.tokens[9, 6])]
  static = sampling.generate(model, PROMPTS, **gen)
  batches = sampling.generate(model, PROMPTS, continuous=True, slots=3, block_size=4, **gen)
  assert len(set(static.reasons())) >= 2, static.reasons()
  _assert_same_rows(batches, static)
  for chunk in (5, 32):
    got = sampling.generate(model, PROMPTS, continuous=True, slots=3, block_size=4,
                            prefill_chunk=chunk, **gen)
    _assert_same_rows(got, static, msg=f"prefill_chunk={chunk}")
    assert got.stats["kv_bytes"] == batches.stats["kv_bytes"]


def test_chunk_attention_is_causal_over_the_prompts_blocks():
  # Q queries of one prompt (positions 5..11 of a 12-token prompt, blocks in random order)
  # attend as causal attention over the contiguous prompt does; a query past the prompt
  # (length 0) gives zeros.
  rng = np.random.RandomState(2)
  K, G, H, C, M, L = 2, 2, 8, 4, 4, 12
  k_seq = rng.randn(1, M * C, K, H).astype(np.float32)
  v_seq = rng.randn(1, M * C, K, H).astype(np.float32)
  q = rng.randn(8, K * G, H).astype(np.float32)
  table = rng.permutation(np.arange(1, 1 + M)).astype(np.int32)
  k_pool = np.zeros((K, 1 + M, C, H), np.float32)
  v_pool = np.zeros_like(k_pool)
  for j in range(M):
    k_pool[:, table[j]] = k_seq[0, j * C:(j + 1) * C].transpose(1, 0, 2)
    v_pool[:, table[j]] = v_seq[0, j * C:(j + 1) * C].transpose(1, 0, 2)
  pos = 5 + np.arange(7)
  want = attention.attend(jnp.asarray(q[None, :7]), jnp.asarray(k_seq), jnp.asarray(v_seq),
                          q_segment_ids=jnp.ones((1, 7), jnp.int32),
                          kv_segment_ids=jnp.asarray((np.arange(M * C) < L)[None], jnp.int32),
                          q_positions=jnp.asarray(pos[None]),
                          kv_positions=jnp.arange(M * C)[None], impl="reference")[0]
  lengths = jnp.asarray(np.append(pos + 1, 0), jnp.int32)
  got = paged.attend_chunk(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool),
                           jnp.asarray(table), lengths, columns=M, scale=H ** -0.5)
  np.testing.assert_allclose(got[:7], want, atol=1e-5)
  np.testing.assert_array_equal(got[7], 0.0)


def test_draws_invert_the_cdf_at_row_uniforms():
  # At temperature 1 token t of row r is the first whose cumulative probability exceeds the
  # row's uniform (`sampler.row_uniforms`). Recomputed in float64 from the model's logits of
  # the whole sequence, that gives every token both paths drew, except where the uniform lies
  # within float32 rounding of a CDF boundary. Such a tie is all that may set a row of the
  # continuous path apart from the static path's at temperature > 0 (they add up attention in
  # a different order), which is what benchmarks/sampler.py's longtail check allows.
  model = _native(seed=9)
  counts, seeds, tie = [1, 5, 2, 3, 1], [40, 7, 9, 123456789, 3, 8, 5, 0, 2, 1, 77, 6], 1e-5
  # The first test's shapes and static arguments, so the module compiles these programs once.
  gen = dict(max_new_tokens=[24, 40, 8, 40, 33], num_samples=counts, temperature=1.0, seed=21,
             eos_id=[3, 4], row_seeds=seeds, repeat_ngram=2, repeat_window=8)
  u = sampler.row_uniforms(21, seeds, 40)
  source = np.repeat(np.arange(len(PROMPTS)), counts)
  for continuous in (False, True):
    res = sampling.generate(model, PROMPTS, continuous=continuous, slots=3, block_size=4, **gen)
    # Every row's prompt and response in one causal call, right-padded (padding comes after).
    seqs = np.zeros((len(source), 64), np.int32)
    for r, n in enumerate(res.lengths):
      seqs[r, :len(PROMPTS[source[r]]) + n] = PROMPTS[source[r]] + res.tokens[r, :n].tolist()
    all_logits = np.asarray(jax.jit(model)(jnp.asarray(seqs)), np.float64)  # [R, 64, V]
    checked = ties = 0
    for r, n in enumerate(res.lengths):
      start = len(PROMPTS[source[r]]) - 1
      logits = all_logits[r, start:start + n]                               # [n, V]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)        # [n, V]
      want = np.sum(cdf <= u[r, :n, None], axis=-1)
      near = np.min(np.abs(cdf[:, :-1] - u[r, :n, None]), axis=-1) < tie
      np.testing.assert_array_equal(res.tokens[r, :n][~near], want[~near],
                                    err_msg=f"row {r}, continuous={continuous}")
      checked, ties = checked + n, ties + int(near.sum())
    assert checked > 200 and ties <= 1, (checked, ties)


def test_pool_by_tokens_queues_rows_and_frees_prompts():
  # Twelve 22-token prompts (6 blocks of 4 each) prefilled inside the loop as their rows enter
  # two slots: with the default pool, at most two rows and their prompts are in flight at
  # once (not all twelve prompts); with a pool of 40 tokens (10 blocks) that holds one row and
  # its prompt (6 + 3 blocks) but not two, rows wait for the pool and run one at a time. Both
  # give the static path's rows, whatever the prefill batch.
  model = _native(seed=8)
  prompts = [[(7 * i + j) % 120 + 1 for j in range(22)] for i in range(12)]
  gen = dict(max_new_tokens=8, temperature=1.0, seed=3, eos_id=[5, 6, 7])
  static = sampling.generate(model, prompts, continuous=False, **gen)
  per_block = 2 * 1 * 2 * 16 * 4 * 4  # k and v, 1 layer, 2 kv heads, head dim 16, f32, 4 tokens
  # Chunked prefill reserves a prompt and its first row when the prefill starts, and with the
  # default pool prefills the next prompt while the last one's row waits for a slot (one
  # prompt more in flight); the small pool cannot hold that ahead, so it waits as above.
  for kv_tokens, prefill_batch, chunk, most_blocks in (
      (None, 8, 0, 2 * (6 + 3)), (40, 1, 0, 6 + 3), (None, 8, 7, 2 * (6 + 3) + 6),
      (40, 8, 7, 6 + 3)):
    got = sampling.generate(model, prompts, continuous=True, slots=2, block_size=4,
                            kv_tokens=kv_tokens, prefill_batch=prefill_batch,
                            prefill_chunk=chunk, **gen)
    _assert_same_rows(got, static, msg=f"kv_tokens={kv_tokens}, prefill_chunk={chunk}")
    assert got.stats["kv_peak_bytes"] <= most_blocks * per_block < 12 * 6 * per_block
  assert got.stats["kv_bytes"] == (1 + 10) * per_block  # the scratch block and 40 tokens


def test_pool_that_cannot_hold_a_row_is_refused():
  model = _native()
  with pytest.raises(ValueError, match=r"kv_tokens=32 \(8 blocks of 4 tokens\) cannot hold "
                                       r"prompt 1 \(9 tokens\) with max_new_tokens=20"):
    sampling.generate(model, [[1, 2], list(range(1, 10))], max_new_tokens=[4, 20], eos_id=None,
                      continuous=True, block_size=4, kv_tokens=32)


def test_default_rule():
  # Continuous only where a slot can take a second row and rows can end at different steps.
  rule = sampler.use_continuous
  assert rule(64, 32, early_stop=True, same_limits=True)
  assert rule(64, 32, early_stop=False, same_limits=False)
  assert not rule(64, 32, early_stop=False, same_limits=True)   # every row runs to its limit
  assert not rule(32, 32, early_stop=True, same_limits=False)   # no slot takes a second row


def test_partial_rollout_segments_equal_static():
  # Continued trajectories: prompt + partial response prefilled as one sequence, the RNG
  # counting response positions from the prefix, a repeat check that sees the prefix, and the
  # iteration's budget as the limit; then a rollout split into segments equals an
  # uninterrupted one.
  model = _native(seed=3)
  seqs = [PROMPTS[0] + [11, 12, 13], PROMPTS[2], PROMPTS[1] + [40] * 5]
  gen = dict(max_new_tokens=[6, 30, 9], num_samples=[1, 3, 1], temperature=1.0, eos_id=[5],
             response_prefix=[3, 0, 5], row_seeds=[101, 7, 8, 9, 202], repeat_ngram=3,
             repeat_window=16, seed=0)
  static = sampling.generate(model, seqs, **gen)
  got = sampling.generate(model, seqs, continuous=True, slots=2, block_size=8, **gen)
  _assert_same_rows(got, static)
  assert "LENGTH" in got.reasons()
  # A 30-token response in segments of 6 + 24 tokens is the uninterrupted one.
  whole = sampling.generate(model, [PROMPTS[2]], max_new_tokens=30, temperature=1.0, eos_id=None,
                            row_seeds=[7], continuous=True, slots=1, block_size=4)
  first = sampling.generate(model, [PROMPTS[2]], max_new_tokens=6, temperature=1.0, eos_id=None,
                            row_seeds=[7], continuous=True, slots=1, block_size=4)
  rest = sampling.generate(model, [PROMPTS[2] + first.tokens[0].tolist()], max_new_tokens=24,
                           temperature=1.0, eos_id=None, row_seeds=[7], response_prefix=6,
                           continuous=True, slots=1, block_size=4)
  np.testing.assert_array_equal(np.concatenate([first.tokens[0], rest.tokens[0]]),
                                whole.tokens[0])
  np.testing.assert_allclose(np.concatenate([first.logprobs[0], rest.logprobs[0]]),
                             whole.logprobs[0], atol=1e-5)


def test_rollout_passes_through():
  # The rollout front end with continuous batching: same finished trajectories and buffer.
  model = _native(seed=4)
  kw = dict(num_samples=3, max_new_tokens=20, segment_budget=7, policy_version=0, seed=1,
            eos_id=[9], temperature=1.0)
  prompts = [("a", PROMPTS[0]), ("b", PROMPTS[3])]
  done_s, buf_s = sampling.rollout(model, prompts, buffer=None, **kw)
  done_c, buf_c = sampling.rollout(model, prompts, buffer=None, continuous=True, **kw)
  assert len(buf_s) > 0
  for a, b in zip(done_s + buf_s.trajectories, done_c + buf_c.trajectories, strict=True):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.finish_reason == b.finish_reason


# The chunked cases on the data-only and tensor-only meshes run with the slow tests (the
# default suite keeps the fsdp x tensor one, which exercises both kinds of split).
@pytest.mark.parametrize("mesh_axes,chunk", [
    ({"data": 8}, 0), ({"data": 2, "tensor": 4}, 0), ({"fsdp": 2, "tensor": 4}, 0),
    pytest.param({"data": 8}, 6, marks=pytest.mark.slow), ({"fsdp": 2, "tensor": 4}, 6),
    pytest.param({"tensor": 8}, 6, marks=pytest.mark.slow)])
def test_mesh_equals_unsharded(mesh_axes, chunk):
  # Data parallel: each device runs its own slots over its own rows; on a mesh that splits the
  # parameters each batch shard runs its own slots, tensor parallel within; on a mesh with no
  # batch axis, one SPMD program. All give the unsharded rows, with prefill in batches or in
  # chunks.
  model = _native(seed=6)
  gen = dict(max_new_tokens=[24, 40, 8, 40, 33], num_samples=[1, 5, 2, 3, 1], temperature=1.0,
             seed=2, eos_id=[3, 40], prefill_chunk=chunk)
  expected = sampling.generate(model, PROMPTS, continuous=True, slots=2, **gen)
  with parallel.use_mesh(parallel.make_mesh(mesh_axes)):
    sharded = parallel.create_sharded(lambda: _native(seed=6))
    got = sampling.generate(sharded, PROMPTS, continuous=True, slots=2, **gen)
  _assert_same_rows(got, expected)


def test_attend_gather_equals_reference_attention():
  # Rows scattered over a pool's blocks in random order attend as a contiguous cache does.
  rng = np.random.RandomState(0)
  S, K, G, H, C, M = 3, 2, 2, 8, 4, 6
  lengths = np.array([1, 13, 24])
  k_rows = rng.randn(S, M * C, K, H).astype(np.float32)
  v_rows = rng.randn(S, M * C, K, H).astype(np.float32)
  q = rng.randn(S, K * G, H).astype(np.float32)
  perm = rng.permutation(np.arange(1, 1 + S * M))
  tables = perm.reshape(S, M).astype(np.int32)
  k_pool = np.zeros((K, 1 + S * M, C, H), np.float32)
  v_pool = np.zeros_like(k_pool)
  for s in range(S):
    for j in range(M):
      k_pool[:, tables[s, j]] = k_rows[s, j * C:(j + 1) * C].transpose(1, 0, 2)
      v_pool[:, tables[s, j]] = v_rows[s, j * C:(j + 1) * C].transpose(1, 0, 2)
  seg = (np.arange(M * C)[None] < lengths[:, None]).astype(np.int32)
  want = attention.attend(jnp.asarray(q[:, None]), jnp.asarray(k_rows), jnp.asarray(v_rows),
                          q_segment_ids=jnp.ones((S, 1), jnp.int32),
                          kv_segment_ids=jnp.asarray(seg),
                          q_positions=jnp.asarray(lengths[:, None] - 1),
                          kv_positions=jnp.broadcast_to(jnp.arange(M * C), (S, M * C)),
                          impl="reference")[:, 0]
  for columns in (6, 8):  # the table's width, and a wider read of scratch columns
    wide = np.pad(tables, [(0, 0), (0, columns - M)])
    got = paged.attend_gather(jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool),
                              jnp.asarray(wide), jnp.asarray(lengths), columns=columns,
                              scale=H ** -0.5)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_free_list_pop_push():
  free = jnp.arange(10, 20, dtype=jnp.int32)
  ids, top = paged.pop(free, jnp.int32(10), jnp.array([True, False, True, True]))
  np.testing.assert_array_equal(ids, [19, paged.SCRATCH, 18, 17])
  assert int(top) == 7
  tables = jnp.array([[1, 19, 0], [2, 3, 0], [18, 17, 0]], jnp.int32)
  free, top = paged.push(free, top, tables, first=jnp.array([1, 0, 0]),
                         count=jnp.array([1, 0, 2]))
  assert int(top) == 10
  assert sorted(np.asarray(free[7:10]).tolist()) == [17, 18, 19]
  np.testing.assert_array_equal(free[:7], np.arange(10, 17))


def test_bad_inputs_are_named():
  model = _native()
  with pytest.raises(ValueError, match="slots=0 must be >= 1"):
    sampling.generate(model, [[1]], max_new_tokens=4, eos_id=None, continuous=True, slots=0)
  with pytest.raises(ValueError, match="block_size=0 must be >= 1"):
    sampling.generate(model, [[1]], max_new_tokens=4, eos_id=None, continuous=True,
                      block_size=0)
  with pytest.raises(ValueError, match="prefill_chunk=-1 must be >= 0"):
    sampling.generate(model, [[1]], max_new_tokens=4, eos_id=None, prefill_chunk=-1)
  with pytest.raises(ValueError, match="prefill_chunk=8 applies to continuous batching only"):
    sampling.generate(model, [[1]], max_new_tokens=4, eos_id=None, continuous=False,
                      prefill_chunk=8)


def test_one_program_per_bucket():
  model = _native(seed=7)
  kw = dict(eos_id=None, num_samples=2, continuous=True, slots=2)
  sampling.generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=20, temperature=1.0, **kw)
  before = sampling.compiled_programs()
  sampling.generate(model, [list(range(1, 10))], max_new_tokens=30, temperature=0.0, seed=9,
                    **kw)
  assert sampling.compiled_programs() == before
  assert sampler.default_slots(100) == 32 and sampler.default_slots(5) == 5


@pytest.mark.parametrize("chunk", [0, pytest.param(16, marks=pytest.mark.slow)])
def test_paged_program_compiles_for_tpu(monkeypatch, chunk):
  # The continuous program with the Pallas TPU paged-attention kernel, compiled for a v5e chip
  # of a compile-only topology (libtpu, no TPU needed); with chunked prefill too (the chunk's
  # attention on the gather path).
  import dataclasses  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x4", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no compile-only TPU devices: {e}")
  model = _native(vocab_size=256, embed_dim=128, head_dim=128, dtype="bfloat16")
  calls = []
  run = sampler._run
  monkeypatch.setattr(sampler, "_run", lambda *a, **kw: calls.append((a, kw)) or run(*a, **kw))
  sampling.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, eos_id=None, num_samples=4,
                    continuous=True, slots=4, prefill_chunk=chunk)
  (state, x), kw = calls[-1]
  device = jax.sharding.SingleDeviceSharding(topo.devices[0])
  spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype, sharding=device)
  static = dataclasses.replace(kw["static"], paged_impl="tpu")
  compiled = run.lower(jax.tree.map(spec, state), jax.tree.map(spec, x), graphdef=kw["graphdef"],
                       static=static).compile()
  # One Pallas kernel call per layer, in the decode loop (chunked: in the decode step with and
  # the one without a chunk).
  assert compiled.as_text().count("tpu_custom_call") == model.cfg.num_layers * (1 + bool(chunk))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_paged_step_on_fsdp_tensor_mesh_equals_unsharded(kv_heads):
  # The SPMD paged step (pool and slots split over fsdp, kv heads over tensor when it divides
  # them, else whole on each tensor shard), with tables that count blocks within each batch
  # shard, computes what one device computes with the pool's global block ids.
  S, C, M, shards = 4, 4, 3, 2
  local_blocks = 1 + S // shards * M                                  # per shard, scratch 0
  kw = dict(num_heads=8, num_kv_heads=kv_heads)
  model = _native(seed=9, **kw)
  cfg = model.cfg
  rng = np.random.RandomState(1)
  shape = (cfg.num_kv_heads, shards * local_blocks, C, cfg.head_dim)
  pool = {n: (jnp.asarray(rng.randn(*shape), jnp.float32),) for n in ("k", "v")}
  tables = np.stack([1 + np.arange(M) + (s % (S // shards)) * M for s in range(S)])
  lengths = np.array([3, 9, 12, 1], np.int32)
  tokens, block = np.array([5, 6, 7, 8], np.int32), np.zeros((S,), np.int32)
  ctx = lengths - 1
  for s in range(S):
    block[s] = tables[s, ctx[s] // C]
  step = lambda m, pool, tables, block: paged.decode_step(
      m, jnp.asarray(tokens), jnp.asarray(ctx), pool, jnp.asarray(tables), jnp.asarray(block),
      jnp.asarray(ctx % C), jnp.asarray(lengths), buckets=(M,), num_groups=1)
  offset = (np.arange(S) // (S // shards) * local_blocks)[:, None]
  want_logits, want_pool = step(model, pool, tables + offset, block + offset[:, 0])
  mesh = parallel.make_mesh({"fsdp": shards, "tensor": 4})
  with parallel.use_mesh(mesh):
    sharded = parallel.create_sharded(lambda: _native(seed=9, **kw))
    specs = paged.pool_specs(cfg, mesh)
    put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
    got_logits, got_pool = jax.jit(step)(
        sharded, jax.tree.map(lambda a: put(a, specs["pool"]), pool),
        put(tables, jax.sharding.PartitionSpec(specs["slots"][0], None)),
        put(block, specs["slots"]))
  assert (specs["pool"][0] is not None) == (kv_heads == 4)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
  for name in ("k", "v"):
    np.testing.assert_allclose(got_pool[name][0], want_pool[name][0], atol=1e-6)
  # A prefill chunk writes one prompt's blocks, which lie in one batch shard: refused here.
  with parallel.use_mesh(mesh), pytest.raises(ValueError, match="splits it 2 ways"):
    paged.decode_step(sharded, jnp.asarray(tokens), jnp.asarray(ctx), pool, jnp.asarray(tables),
                      jnp.asarray(block), jnp.asarray(ctx % C), jnp.asarray(lengths),
                      buckets=(M,), chunk={})
