"""The transformer against transformers' Llama/Qwen2, sharded vs single-device, and the cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15 import parallel
from k15.model import hf, transformer

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")


def _random_hf_model(family, seed=0, **kw):
  base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, rms_norm_eps=1e-6)
  base.update(kw)
  torch.manual_seed(seed)
  if family == "llama":
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**base))
  else:
    model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**base))
  # Random values everywhere, biases and norm scales included (their init is 0 and 1).
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model.float().eval()


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


HF_CASES = {
    "llama-gqa1-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-gqa3-untied": ("llama", dict(num_attention_heads=6, num_key_value_heads=2,
                                        tie_word_embeddings=False)),
    "llama-mha": ("llama", dict(num_key_value_heads=6, tie_word_embeddings=False)),
    "qwen2-bias-theta1e6-tied": ("qwen2", dict(rope_theta=1e6, tie_word_embeddings=True)),
    "qwen2-gqa-untied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=24, rope_theta=1e6, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case,scan", [(c, False) for c in sorted(HF_CASES)] + [
    ("llama-gqa3-untied", True), ("qwen2-bias-theta1e6-tied", True)])
def test_logits_match_transformers(case, scan, tmp_path):
  family, kw = HF_CASES[case]
  ref = _random_hf_model(family, **kw)
  ref.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
  model = hf.load(str(tmp_path / "ckpt"), jnp.float32, config_overrides={"scan_layers": scan})
  assert model.cfg.scanned == scan
  tokens = np.random.RandomState(1).randint(0, 97, size=(2, 19)).astype(np.int32)
  ours = np.asarray(model(jnp.asarray(tokens)))
  assert ours.shape == (2, 19, 97) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, _hf_logits(ref, tokens), atol=1e-4, rtol=0)

  # And back: what hf.save writes loads in transformers with the same logits.
  hf.save(model, str(tmp_path / "out"), family=family if model.cfg.qkv_bias else "llama",
          max_shard_bytes=20_000)  # small shards: exercise the index file
  assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
  np.testing.assert_allclose(_hf_logits(back, tokens), ours, atol=1e-4, rtol=0)


def test_sharded_forward_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  cfg = transformer.ModelConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=16, mlp_dim=128, tie_embeddings=False)
  single = transformer.Transformer(cfg, rngs=nnx.Rngs(3))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 16)), jnp.int32)
  expected = np.asarray(single(tokens))

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with parallel.use_mesh(mesh):
    sharded = parallel.create_sharded(
        lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(3)))
    # Same init, different placement.
    np.testing.assert_array_equal(np.asarray(sharded.embed.value), np.asarray(single.embed.value))
    q = sharded.layers[0].attn.q.value
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (32, 2, 16)
    assert sharded.layers[0].mlp.down.value.sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp")

    graphdef, state = nnx.split(sharded)
    batch_sharding = parallel.sharding(("batch", "length"), tokens.shape)
    fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t),
                  in_shardings=(parallel.state_shardings(state), batch_sharding))
    out = fwd(state, jax.device_put(tokens, batch_sharding))
    assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5, rtol=0)


def test_prefill_and_decode_with_cache_match_full_forward():
  cfg = transformer.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                                num_kv_heads=1, head_dim=8, mlp_dim=64)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)), jnp.int32)
  full = np.asarray(model(tokens))
  cache = transformer.init_cache(cfg, batch=2, length=16)
  logits, cache = model(tokens[:, :7], cache=cache, cache_index=0)
  steps = [np.asarray(logits)]
  for t in range(7, 12):
    pos = jnp.full((2, 1), t, jnp.int32)
    logits, cache = model(tokens[:, t:t + 1], positions=pos, cache=cache, cache_index=t)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_packed_segments_equal_separate_sequences():
  cfg = transformer.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=2,
                                num_kv_heads=2, head_dim=16, mlp_dim=64)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(1))
  rng = np.random.RandomState(0)
  a, b = rng.randint(0, 64, 5), rng.randint(0, 64, 7)
  packed = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 2], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(7)) + [0, 0]], jnp.int32)
  out = np.asarray(model(packed, positions=pos, segment_ids=seg))
  np.testing.assert_allclose(out[0, :5], np.asarray(model(jnp.asarray(a[None])))[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:12], np.asarray(model(jnp.asarray(b[None])))[0], atol=1e-5)


def test_causal_through_gradients():
  # Untied head, distinct tokens: the gradient of the logits at position t reaches the embedding
  # rows of tokens 0..t and of no later token.
  cfg = transformer.ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2,
                                num_kv_heads=1, head_dim=8, mlp_dim=32, tie_embeddings=False)
  graphdef, state = nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.arange(3, 13, dtype=jnp.int32)[None]

  def logits_at_4(s):
    return nnx.merge(graphdef, s)(tokens)[0, 4].sum()

  g = np.asarray(jax.grad(logits_at_4)(state)["embed"].value)[np.asarray(tokens[0])]
  assert np.abs(g[5:]).max() == 0.0
  assert np.abs(g[:5]).sum(axis=1).min() > 0.0


def test_bfloat16_compute_keeps_float32_logits():
  cfg = transformer.ModelConfig(vocab_size=64, embed_dim=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=64)
  m32 = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  cfg16 = transformer.ModelConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
  m16 = transformer.Transformer(cfg16, rngs=nnx.Rngs(0))
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  out16 = m16(tokens)
  assert out16.dtype == jnp.float32
  assert m16.layers[0].attn.q.value.dtype == jnp.float32  # storage dtype unchanged
  ref = np.asarray(m32(tokens))
  rel = np.abs(np.asarray(out16) - ref).max() / np.abs(ref).max()
  assert 0 < rel < 0.05, rel  # bfloat16 rounding, not a different computation


# --- bad input: every error names what is wrong ---------------------------------------------

def test_checkpoint_without_config_json(tmp_path):
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.load(str(tmp_path))


def test_llama_attention_bias_is_refused(tmp_path):
  _random_hf_model("llama", num_hidden_layers=1, attention_bias=True).save_pretrained(tmp_path)
  with pytest.raises(hf.CheckpointError, match="attention_bias"):
    hf.load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(
      {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
  with pytest.raises(hf.CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
    hf.load(str(tmp_path))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  _random_hf_model("llama", num_hidden_layers=1).save_pretrained(path, safe_serialization=True)
  return path


def _rewrite(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  tensors = {k: np.array(v) for k, v in hf.open_safetensors(str(src / "model.safetensors")).items()}
  edit(tensors)
  hf.write_safetensors(str(dst / "model.safetensors"), tensors)
  (dst / "config.json").write_text((src / "config.json").read_text())


def test_shard_missing_a_tensor(small_ckpt, tmp_path):
  _rewrite(small_ckpt, tmp_path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointError, match="model.layers.0.mlp.up_proj.weight.*missing"):
    hf.load(str(tmp_path))


def test_tensor_of_wrong_shape(small_ckpt, tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 48), np.float32)
  _rewrite(small_ckpt, tmp_path, edit)
  with pytest.raises(hf.CheckpointError, match=r"k_proj.weight.*shape \(16, 48\)"):
    hf.load(str(tmp_path))


def test_mesh_axes_must_multiply_to_device_count():
  with pytest.raises(ValueError, match="multiplies to 4, but there are 8 devices"):
    parallel.make_mesh({"data": 2, "tensor": 2})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parallel.make_mesh({"model": 8})
  assert parallel.make_mesh({"data": -1, "tensor": 2}).shape["data"] == 4


def test_unknown_model_config_key():
  with pytest.raises(ValueError, match="unknown model config keys.*num_layer"):
    transformer.ModelConfig.from_config({"num_layer": 3})
