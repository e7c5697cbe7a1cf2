"""Model families beyond plain Llama / Qwen2: Llama 3.x and YaRN RoPE scaling, Qwen3 (q/k norms),
Qwen3-MoE (router, experts, load-balancing loss, expert parallelism, routing replay), each against
transformers on tiny random models, and exported back."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k15 import parallel, sampling
from k15.model import hf, transformer

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

VOCAB = 61
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)

CASES = {
    # Scaling changes the angles of every position; the test positions reach past the original
    # context (16) and the per-dimension thresholds of both scalings.
    "llama-llama3": ("Llama", dict(max_position_embeddings=128, rope_theta=500.0,
                                   rope_scaling=dict(rope_type="llama3", factor=4.0,
                                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                                     original_max_position_embeddings=16))),
    "qwen2-yarn": ("Qwen2", dict(max_position_embeddings=128, rope_theta=1000.0,
                                 rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                   original_max_position_embeddings=16))),
    "qwen3": ("Qwen3", dict(head_dim=12, max_position_embeddings=128)),  # head_dim != D / N
    "qwen3-moe": ("Qwen3Moe", dict(MOE, norm_topk_prob=True, max_position_embeddings=128)),
    "qwen3-moe-sparse-step": ("Qwen3Moe", dict(MOE, num_hidden_layers=3, decoder_sparse_step=2,
                                               mlp_only_layers=[2], norm_topk_prob=False,
                                               max_position_embeddings=128)),
}


def _random_hf(arch, seed=0, **kw):
  cfg = getattr(tf, f"{arch}Config")(**{**BASE, **kw})
  torch.manual_seed(seed)
  model = getattr(tf, f"{arch}ForCausalLM")(cfg)
  # Random values everywhere, norm scales included (their init is 1).
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model.float().eval()


def _hf_logits(model, tokens, **kw):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens)), **kw)


def _tokens(T=40, B=2, seed=1):
  return np.random.RandomState(seed).randint(0, VOCAB, size=(B, T)).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (transformers model, its checkpoint directory), built once per module."""
  out = {}
  for name, (arch, kw) in CASES.items():
    ref = _random_hf(arch, **kw)
    path = tmp_path_factory.mktemp(name)
    ref.save_pretrained(path, safe_serialization=True)
    out[name] = (ref, str(path))
  return out


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_and_round_trip(case, scan, checkpoints, tmp_path):
  ref, path = checkpoints[case]
  overrides = {"scan_layers": scan}
  model = hf.load(path, jnp.float32, config_overrides=overrides)
  # Layers under scan, except a MoE stack with dense layers (one scanned body cannot hold both).
  assert model.cfg.scanned == (scan and case != "qwen3-moe-sparse-step")
  tokens = _tokens()
  # Positions offset past the original context of the scaled RoPEs.
  positions = np.broadcast_to(np.arange(40) + 30, tokens.shape).astype(np.int32)
  ours = np.asarray(model(jnp.asarray(tokens), positions=jnp.asarray(positions)))
  expected = _hf_logits(ref, tokens, position_ids=torch.tensor(positions.astype(np.int64))).logits
  np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4, rtol=0)

  # Export without naming the family: it comes from the model config.
  hf.save(model, str(tmp_path / "out"), max_shard_bytes=30_000)
  with open(tmp_path / "out" / "config.json") as f:
    written = json.load(f)
  assert written["architectures"] == ref.config.architectures
  back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
  assert type(back) is type(ref)
  again = _hf_logits(back, tokens, position_ids=torch.tensor(positions.astype(np.int64))).logits
  np.testing.assert_allclose(again.numpy(), ours, atol=1e-4, rtol=0)
  # And k15 reads its own export to the same config.
  assert hf.load(str(tmp_path / "out"), jnp.float32, config_overrides=overrides).cfg == model.cfg


def test_rope_scaling_matters_and_config_keeps_it(checkpoints):
  # Without its scaling the Llama 3 model's logits differ: the test above checks scaling itself.
  _, path = checkpoints["llama-llama3"]
  model = hf.load(path, jnp.float32)
  assert dict(model.cfg.rope_scaling)["rope_type"] == "llama3"
  plain = hf.load(path, jnp.float32, config_overrides={"rope_scaling": ()})
  nnx.update(plain, nnx.state(model))
  tokens = jnp.asarray(_tokens())
  assert np.abs(np.asarray(model(tokens)) - np.asarray(plain(tokens))).max() > 1e-2


def test_unsupported_rope_type_names_itself_and_the_supported(tmp_path):
  cfg = dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama",
             max_position_embeddings=64,
             rope_scaling=dict(rope_type="longrope", short_factor=[1.0], long_factor=[1.0]))
  with pytest.raises(hf.CheckpointError, match=r"'longrope'.*'llama3'.*'yarn'"):
    hf.config_from_hf(cfg, "x/config.json")
  with pytest.raises(ValueError, match=r"'dynamic'.*'llama3', 'yarn'"):
    transformer.ModelConfig(rope_scaling=dict(rope_type="dynamic", factor=2.0))


# ---------------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------------

def test_moe_aux_loss_equals_transformers(checkpoints):
  ref, path = checkpoints["qwen3-moe-sparse-step"]
  model = hf.load(path, jnp.float32)
  assert model.cfg.moe_dense_layers == (0, 2)  # step 2 makes layer 0 dense; layer 2 is listed
  tokens = _tokens(T=12)
  mask = np.ones_like(tokens)
  mask[0, :3] = 0  # left padding is left out of the loss
  out = _hf_logits(ref, tokens, attention_mask=torch.tensor(mask), output_router_logits=True)
  logits, routing = model(jnp.asarray(tokens), segment_ids=jnp.asarray(mask),
                          positions=jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0)),
                          return_routing=True)
  assert len(routing["router_logits"]) == 1 and routing["expert_ids"][0].shape == (2, 12, 2)
  np.testing.assert_allclose(np.asarray(routing["router_logits"][0]).reshape(-1, 8),
                             out.router_logits[0].numpy(), atol=1e-4)
  ours = transformer.load_balancing_loss(routing["router_logits"], 2, jnp.asarray(mask))
  np.testing.assert_allclose(float(ours), float(out.aux_loss), rtol=1e-5)
  # And without a mask, over two MoE layers.
  ref2, path2 = checkpoints["qwen3-moe"]
  model2 = hf.load(path2, jnp.float32)
  out2 = _hf_logits(ref2, tokens, output_router_logits=True)
  _, routing2 = model2(jnp.asarray(tokens), return_routing=True)
  ours2 = transformer.load_balancing_loss(routing2["router_logits"], 2)
  np.testing.assert_allclose(float(ours2), float(out2.aux_loss), rtol=1e-5)
  assert abs(float(ours2) - 2.0) > 1e-3  # not the value of a perfectly balanced router


def _moe_cfg(**kw):
  return transformer.ModelConfig(**{**dict(
      vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=48, tie_embeddings=False, qk_norm=True, num_experts=8, experts_per_token=2,
      moe_mlp_dim=16), **kw})


@pytest.mark.slow  # ~22 s on 2 cores; by default: dense vs transformers, ragged vs unsharded
def test_dense_and_ragged_dispatch_agree_with_gradients():
  cfg = _moe_cfg(num_layers=1)
  dense = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  ragged = transformer.Transformer(_moe_cfg(num_layers=1, moe_dispatch="ragged"),
                                   rngs=nnx.Rngs(0))
  tokens = jnp.asarray(_tokens(T=16, B=3) % 64)

  def loss(model):
    logits, routing = model(tokens, return_routing=True)
    return (jnp.mean(jax.nn.log_softmax(logits)[..., 0])
            + 0.01 * transformer.load_balancing_loss(routing["router_logits"], 2))

  # Rematerialised blocks (training) compute the same.
  remat = transformer.Transformer(_moe_cfg(num_layers=1, moe_dispatch="ragged", remat="full"),
                                  rngs=nnx.Rngs(0))
  values = {}
  for name, m in (("dense", dense), ("ragged", ragged), ("remat", remat)):
    graphdef, state = nnx.split(m)
    values[name] = jax.jit(jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s))))(state)
  for other in ("ragged", "remat"):
    np.testing.assert_allclose(values["dense"][0], values[other][0], atol=1e-6)
    for a, b in zip(jax.tree.leaves(values["dense"][1]), jax.tree.leaves(values[other][1])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The router gets a gradient (through the gate weights and the aux loss).
  assert np.abs(np.asarray(values["ragged"][1]["layers"][0]["mlp"]["router"].value)).max() > 0


# The default suite runs the ragged dispatch on the expert mesh; the other two take ~30 s each
# on a 2-core machine and run with the slow tests.
@pytest.mark.parametrize("dispatch,mesh_axes", [
    pytest.param("dense", {"expert": 4, "data": 2}, marks=pytest.mark.slow),
    ("ragged", {"expert": 4, "data": 2}),
    pytest.param("ragged", {"data": 4, "fsdp": 2},  # no expert axis: experts whole everywhere
                 marks=pytest.mark.slow)])
def test_moe_sharded_over_expert_axis_equals_unsharded(dispatch, mesh_axes):
  assert jax.device_count() == 8
  cfg = _moe_cfg(num_layers=1, moe_dispatch=dispatch)
  tokens = jnp.asarray(_tokens(T=16, B=8) % 64)

  def program(graphdef):
    def loss(s, t):
      logits, routing = nnx.merge(graphdef, s)(t, return_routing=True)
      aux = transformer.load_balancing_loss(routing["router_logits"], cfg.experts_per_token)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.01 * aux, logits
    return jax.value_and_grad(loss, has_aux=True)

  graphdef, state = nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(3)))
  (_, expected), expected_grad = jax.jit(program(graphdef))(state, tokens)

  with parallel.use_mesh(parallel.make_mesh(mesh_axes)):
    sharded = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(3)))
    gate = sharded.layers[0].mlp.gate.value
    if "expert" in mesh_axes:
      assert gate.sharding.spec[0] == "expert"
      assert gate.addressable_shards[0].data.shape == (2, 32, 16)
    graphdef, state = nnx.split(sharded)
    batch_sharding = parallel.sharding(("batch", "length"), tokens.shape)
    step = jax.jit(program(graphdef),
                   in_shardings=(parallel.state_shardings(state), batch_sharding))
    (_, out), grad = step(state, jax.device_put(tokens, batch_sharding))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_moe_prefill_and_decode_with_cache_match_full_forward():
  cfg = _moe_cfg(moe_dispatch="ragged")
  graphdef, state = nnx.split(transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  run = jax.jit(lambda s, t, p, c, i: nnx.merge(graphdef, s)(t, positions=p, cache=c,
                                                             cache_index=i))
  tokens = jnp.asarray(_tokens(T=12) % 64)
  full = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
  cache = transformer.init_cache(cfg, batch=2, length=16)
  logits, cache = run(state, tokens[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), cache, 0)
  steps = [np.asarray(logits)]
  for t in range(7, 12):
    logits, cache = run(state, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache, t)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("case,dispatch", [
    ("qwen3-moe", "dense"), pytest.param("qwen3-moe", "ragged", marks=pytest.mark.slow),
    ("llama-llama3", None), ("qwen2-yarn", None), ("qwen3", None)])
@pytest.mark.parametrize("scan", [False, True])
def test_greedy_sampling_matches_transformers_generate(case, dispatch, scan, tmp_path):
  # The sampler computes a generation's rotary angles itself: with the model's scaling, which
  # matters here since generation runs past the original context of 16 positions. The
  # continuous-batching path runs its own decode step over the paged cache (projections, q/k
  # norms, rotary angles and the MoE feed-forward taken from the model): it must agree too.
  arch, kw = CASES[case]
  # Seeds whose random models continue these prompts without settling into a short loop.
  ref = _random_hf(arch, seed={"qwen3": 3}.get(case, 2), **kw)
  with torch.no_grad():  # larger weights: greedy continuations wander instead of settling
    for p in ref.parameters():
      p.mul_(2.0)
  ref.save_pretrained(tmp_path, safe_serialization=True)
  model = hf.load(str(tmp_path), jnp.float32, config_overrides=dict(
      {"moe_dispatch": dispatch} if dispatch else {}, scan_layers=scan))
  assert model.cfg.scanned == scan
  prompts = [[5, 9, 2, 40, 11], [7, 3, 33], [1, 2, 3, 4, 5, 6, 7, 8]]
  n = 24
  res = sampling.generate(model, prompts, max_new_tokens=n, temperature=0.0, eos_id=None)
  cont = sampling.generate(model, prompts, max_new_tokens=n, temperature=0.0, eos_id=None,
                           continuous=True)
  np.testing.assert_array_equal(cont.tokens, res.tokens)
  with torch.no_grad():
    for i, p in enumerate(prompts):
      expected = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=int),
                              do_sample=False, max_new_tokens=n, pad_token_id=0)[0, len(p):]
      assert len(set(expected.tolist())) > 5, "degenerate reference continuation"
      np.testing.assert_array_equal(res.tokens[i], expected.numpy(), err_msg=f"prompt {i}")


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["dense", "ragged"])
def test_moe_sampling_on_an_expert_parallel_mesh_equals_one_device(dispatch):
  cfg = _moe_cfg(moe_dispatch=dispatch)
  single = transformer.Transformer(cfg, rngs=nnx.Rngs(5))
  prompts = [[5, 9, 2, 40, 11], [7, 3, 33], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 1]]
  gen = dict(max_new_tokens=12, eos_id=None, temperature=0.0)
  expected = sampling.generate(single, prompts, **gen)
  with parallel.use_mesh(parallel.make_mesh({"expert": 4, "data": 2})):
    sharded = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(5)))
    got = sampling.generate(sharded, prompts, **gen)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5)


@pytest.mark.slow  # ~30 s; tests/test_routing_replay.py replays routing in the default suite
def test_routing_replay_routes_by_the_given_experts():
  cfg = _moe_cfg()
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(_tokens(T=10) % 64)
  logits, routing = model(tokens, return_routing=True)
  # Replaying the model's own choices changes nothing.
  replayed, again = model(tokens, expert_ids=routing["expert_ids"], return_routing=True)
  np.testing.assert_allclose(np.asarray(replayed), np.asarray(logits), atol=1e-6)
  for a, b in zip(again["expert_ids"], routing["expert_ids"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Other experts: the output follows them, and routes exactly as told.
  other = tuple((ids + 1) % cfg.num_experts for ids in routing["expert_ids"])
  moved, told = model(tokens, expert_ids=other, return_routing=True)
  for a, b in zip(told["expert_ids"], other):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(moved) - np.asarray(logits)).max() > 1e-3
  # The ragged dispatch agrees under replay too, and gradients reach the router.
  ragged = transformer.Transformer(_moe_cfg(moe_dispatch="ragged"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(ragged(tokens, expert_ids=other)), np.asarray(moved),
                             atol=1e-5)
  graphdef, state = nnx.split(model)
  g = jax.grad(lambda s: nnx.merge(graphdef, s)(tokens, expert_ids=other).sum())(state)
  assert np.abs(np.asarray(g["layers"][1]["mlp"]["router"].value)).max() > 0
  with pytest.raises(ValueError, match="2 MoE layers"):
    model(tokens, expert_ids=other[:1])
