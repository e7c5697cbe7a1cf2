"""Tests for k15.model.attention: reference by hand, flash == reference, linear memory, splash."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k15.model import attention


def _positions(seg: np.ndarray) -> np.ndarray:
  """Positions that restart at 0 at every new segment, as in packed rows."""
  pos = np.zeros_like(seg)
  for b in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
  return pos


def _packed(b: int, t: int) -> tuple[np.ndarray, np.ndarray]:
  """Row 0: three segments and trailing padding; row 1: left padding then one segment."""
  seg = np.zeros((b, t), np.int32)
  seg[0, :t // 3] = 1
  seg[0, t // 3:t // 2] = 2
  seg[0, t // 2:t - 7] = 3
  seg[1, 9:] = 1
  return seg, _positions(seg).astype(np.int32)


def _case(name: str, rng: np.random.Generator):
  """(T, S, q_seg, kv_seg, q_pos, kv_pos) for one masking pattern, batch 2."""
  if name == "packed":  # Training on packed rows; T = 50 is not a multiple of block_size 16.
    seg, pos = _packed(2, 50)
    return seg, seg, pos, pos
  if name == "shuffled_positions":  # Causality by position, not by index.
    seg, _ = _packed(2, 50)
    pos = np.stack([rng.permutation(50) for _ in range(2)]).astype(np.int32)
    return seg, seg, pos, pos
  if name == "decode":  # One new token against a 300-slot KV cache with left padding and free slots.
    kv_seg = np.zeros((2, 300), np.int32)
    kv_seg[0, 0:177] = 1  # Row 0: 177 tokens, no left padding.
    kv_seg[1, 48:177] = 1  # Row 1: 48 left-padding slots, 129 tokens.
    kv_pos = np.maximum(np.cumsum(kv_seg, axis=1) - 1, 0).astype(np.int32)
    q_seg = np.ones((2, 1), np.int32)
    # The newest key (slot 176) opens a 16-slot block in both rows: an off-by-one in block
    # skipping would drop it.
    q_pos = np.array([[176], [128]], np.int32)
    return q_seg, kv_seg, q_pos, kv_pos
  if name == "chunk":  # A 5-token chunk after a 120-token prefix.
    kv_seg = np.ones((2, 140), np.int32)
    kv_seg[:, 125:] = 0
    kv_pos = np.arange(140, dtype=np.int32)[None].repeat(2, 0)
    q_seg = np.ones((2, 5), np.int32)
    q_pos = np.arange(120, 125, dtype=np.int32)[None].repeat(2, 0)
    return q_seg, kv_seg, q_pos, kv_pos
  raise ValueError(name)


def _attend_with_grads(impl, q, k, v, q_seg, kv_seg, q_pos, kv_pos, w, block_size=16):
  """Output and d(sum(out * w))/d(q, k, v), jitted."""

  def loss(q, k, v):
    out = attention.attend(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
        kv_positions=kv_pos, impl=impl, block_size=block_size)
    return jnp.sum(out * w), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def _assert_close(actual, desired, what):
  desired = np.asarray(desired)
  scale = max(1.0, float(np.abs(desired).max()))
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=1e-4, atol=1e-4 * scale,
                             err_msg=what)


def _random_qkv(rng, b, t, s, n, kh, h, dtype=jnp.float32):
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  return q, k, v


def test_reference_by_hand():
  # Equal scores (q = 0): each query averages the values it may see.
  seg = jnp.array([[1, 1, 2, 0]], jnp.int32)
  pos = jnp.array([[0, 1, 0, 0]], jnp.int32)
  v = jnp.arange(8, dtype=jnp.float32).reshape(1, 4, 1, 2)  # [B, S, K, H]
  q = jnp.zeros((1, 4, 2, 2), jnp.float32)  # Two query heads share the one kv head.
  out = attention.attend(q, jnp.ones_like(v), v, q_segment_ids=seg, kv_segment_ids=seg,
                         q_positions=pos, kv_positions=pos)
  want = np.array([[0, 1], [1, 2], [4, 5], [0, 0]], np.float32)  # v0, mean(v0, v1), v2, padding.
  np.testing.assert_allclose(out[0, :, 0], want, atol=1e-6)
  np.testing.assert_allclose(out[0, :, 1], want, atol=1e-6)
  # Scores 0 and log 3 give weights 1/4 and 3/4: 0 * 1/4 + 4 * 3/4 = 3.
  one = jnp.ones((1, 2), jnp.int32)
  out = attention.attend(
      jnp.ones((1, 2, 1, 1)), jnp.array([0.0, np.log(3.0)]).reshape(1, 2, 1, 1),
      jnp.array([0.0, 4.0]).reshape(1, 2, 1, 1), q_segment_ids=one, kv_segment_ids=one,
      q_positions=jnp.array([[1, 1]], jnp.int32), kv_positions=jnp.array([[0, 1]], jnp.int32),
      scale=1.0)
  np.testing.assert_allclose(out[0, :, 0, 0], [3.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("name", ["packed", "shuffled_positions", "decode", "chunk"])
def test_flash_matches_reference(name, heads):
  rng = np.random.default_rng(0)
  q_seg, kv_seg, q_pos, kv_pos = _case(name, rng)
  (b, t), s = q_seg.shape, kv_seg.shape[1]
  block_size = 16
  assert t * s > block_size**2, "would take the reference fallback instead of the flash path"
  n, kh = heads
  q, k, v = _random_qkv(rng, b, t, s, n, kh, 8)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  args = (q, k, v, q_seg, kv_seg, q_pos, kv_pos, w)
  ref_out, ref_grads = _attend_with_grads("reference", *args)
  out, grads = _attend_with_grads("flash", *args, block_size=block_size)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert float(jnp.abs(ref_out).max()) > 0.1  # Not a vacuous comparison of zeros.
  _assert_close(out, ref_out, "flash forward")
  for grad, ref_grad, what in zip(grads, ref_grads, "qkv"):
    assert float(jnp.abs(ref_grad).max()) > 0.01
    _assert_close(grad, ref_grad, f"flash d{what}")


@pytest.mark.parametrize("impl", ["reference", "flash"])
@pytest.mark.parametrize("name", ["decode", "chunk"])
def test_cache_layout_equals_default_layout(name, impl):
  # kv_layout="BKSH" ([B, K, S, H]) and k_layout="BKHS" (keys [B, K, H, S], as the KV cache
  # holds them) attend exactly as [B, S, K, H] does; both cases exceed one 16 x 16 block, so
  # "flash" takes its blockwise path.
  rng = np.random.default_rng(3)
  q_seg, kv_seg, q_pos, kv_pos = _case(name, rng)
  (b, t), s = q_seg.shape, kv_seg.shape[1]
  q, k, v = _random_qkv(rng, b, t, s, 4, 2, 8)
  kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos, kv_positions=kv_pos,
            impl=impl, block_size=16)
  want = attention.attend(q, k, v, **kw)
  heads_first = lambda x: jnp.einsum("BSKH->BKSH", x)
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, kv_layout="BKSH", **kw))(
      q, heads_first(k), heads_first(v))
  assert float(jnp.abs(want).max()) > 0.1
  _assert_close(got, want, f"{impl} with kv_layout='BKSH'")
  # The cache's own layout: keys transposed ([B, K, H, S]), values [B, K, S, H].
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, kv_layout="BKSH", k_layout="BKHS",
                                                 **kw))(q, jnp.einsum("BSKH->BKHS", k),
                                                        heads_first(v))
  _assert_close(got, want, f"{impl} with k_layout='BKHS'")


@pytest.mark.parametrize("impl", ["reference", "flash"])
def test_query_without_visible_keys_gives_zeros_and_finite_grads(impl):
  rng = np.random.default_rng(1)
  t = 40
  q_seg = np.ones((1, t), np.int32)
  q_seg[0, 30:] = 0  # Padding queries.
  q_seg[0, 20:25] = 7  # A segment that no key has.
  kv_seg = np.where(q_seg == 7, 1, q_seg).astype(np.int32)
  pos = np.arange(t, dtype=np.int32)[None]
  kv_pos = pos + 5  # Queries at positions 0..4 precede every key.
  q, k, v = _random_qkv(rng, 1, t, t, 4, 2, 8)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  out, grads = _attend_with_grads(impl, q, k, v, q_seg, kv_seg, pos, kv_pos, w)
  blind = np.zeros(t, bool)
  blind[:5] = blind[20:25] = blind[30:] = True
  np.testing.assert_array_equal(np.asarray(out[0, blind]), 0.0)
  assert np.abs(np.asarray(out[0, ~blind])).max() > 0.1
  for grad in grads:
    assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grads[0][0, blind]), 0.0)


def test_flash_bfloat16_close_to_reference():
  rng = np.random.default_rng(2)
  seg, pos = _packed(2, 50)
  q, k, v = _random_qkv(rng, 2, 50, 50, 4, 2, 8, jnp.bfloat16)
  kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos)
  out = attention.attend(q, k, v, impl="flash", block_size=16, **kw)
  ref = attention.attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                         **kw)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def _temp_bytes(impl: str, t: int, grad: bool) -> int:
  """Temporary buffer bytes of the compiled (not run) program at t tokens, B=1, N=K=1, H=64."""

  def f(q, k, v, seg, pos):
    def out_sum(q, k, v):
      return attention.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                              kv_positions=pos, impl=impl).sum()
    return jax.grad(out_sum, argnums=(0, 1, 2))(q, k, v) if grad else out_sum(q, k, v)

  x = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  compiled = jax.jit(f).lower(x, x, x, ids, ids).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward_backward"])
def test_flash_memory_is_linear(grad):
  flash_8k, flash_4k = _temp_bytes("flash", 8192, grad), _temp_bytes("flash", 4096, grad)
  reference_8k = _temp_bytes("reference", 8192, grad)
  # The reference holds at least one [8192, 8192] float32 score matrix (256 MiB).
  assert reference_8k >= 8192 * 8192 * 4
  assert flash_8k < reference_8k / 8, (flash_8k, reference_8k)
  assert flash_8k / flash_4k < 3, (flash_4k, flash_8k)


def test_splash_off_tpu_raises():
  x = jnp.zeros((1, 8, 2, 4))
  ids = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"impl='splash'.*'cpu'"):
    attention.attend(x, x, x, q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids,
                     kv_positions=ids, impl="splash")


def test_bad_arguments_raise_clear_errors():
  x = jnp.zeros((1, 8, 4, 4))
  ids = jnp.ones((1, 8), jnp.int32)
  kw = dict(q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids, kv_positions=ids)
  with pytest.raises(ValueError, match="reference, flash, splash"):
    attention.attend(x, x, x, impl="flesh", **kw)
  with pytest.raises(ValueError, match="divisible"):
    attention.attend(x, x[:, :, :3], x[:, :, :3], **kw)
  with pytest.raises(ValueError, match="kv_positions"):
    attention.attend(x, x, x, **{**kw, "kv_positions": ids[:, :5]})
  with pytest.raises(ValueError, match="kv_layout='BSHK'"):
    attention.attend(x, x, x, kv_layout="BSHK", **kw)
  with pytest.raises(ValueError, match="k_layout='BHSK'"):
    attention.attend(x, x, x, k_layout="BHSK", **kw)
  # Keys [B, K, H, S] whose sizes disagree with the values' [B, K, S, H].
  with pytest.raises(ValueError, match="disagree"):
    attention.attend(x, jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 4, 4, 8)), kv_layout="BKSH",
                     k_layout="BKHS", **kw)
  # [B, K, S, H] keys of 8 slots and 2 heads, but segment ids for 4 slots.
  kv = jnp.zeros((1, 2, 8, 4))
  with pytest.raises(ValueError, match=r"kv_segment_ids must have shape \(1, 8\)"):
    attention.attend(x, kv, kv, kv_layout="BKSH", **{**kw, "kv_segment_ids": ids[:, :4]})


@pytest.mark.parametrize("mesh_shape", [None, dict(data=2, tensor=4), dict(fsdp=4, tensor=2)])
def test_splash_wrapper_in_pallas_interpreter(mesh_shape):
  # The kernel itself needs a TPU; its interpreter checks the wrapper (layout, GQA, scale, padding,
  # segment ids) against the reference. Positions increase by 1 within segments, as splash needs.
  # On a mesh the kernel runs per device under shard_map, built for the local heads: 4-way
  # tensor splits the 4 query heads but not the 2 kv heads (they are repeated to 4 so each
  # shard has its own), 2-way splits both. Batch rows split over data / fsdp.
  from k15 import parallel  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  seg, pos = (np.concatenate([x, x]) for x in _packed(2, 150))  # Pads to 256 internally.
  q, k, v = _random_qkv(rng, 4, 150, 150, 4, 2, 128)
  scale = 0.1

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  def splash(q, k, v):
    return attention._splash(q, k, v, seg, seg, scale=scale, block_size=128, interpret=True)

  def reference(q, k, v):
    return attention.attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                            kv_positions=pos, scale=scale)

  with (parallel.use_mesh(parallel.make_mesh(mesh_shape)) if mesh_shape
        else contextlib.nullcontext()):
    out = jax.jit(splash)(q, k, v)
    grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  _assert_close(out, reference(q, k, v), "splash forward")
  ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for grad, ref_grad, what in zip(grads, ref_grads, "qkv"):
    _assert_close(grad, ref_grad, f"splash d{what}")


def test_splash_choice_follows_the_mesh_devices():
  # A mesh of CPU devices refuses splash whatever the default backend; the message says so.
  from k15 import parallel  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 8, 2, 4))
  ids = jnp.ones((1, 8), jnp.int32)
  with parallel.use_mesh(parallel.make_mesh(dict(data=-1))):
    with pytest.raises(ValueError, match=r"devices of the mesh.*'cpu'"):
      attention.attend(x, x, x, q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids,
                       kv_positions=ids, impl="splash")
