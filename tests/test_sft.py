"""SFT: packing layout and isolation, response-only loss, grain resume, learning, checkpoints."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from k15 import checkpoint as ckpt_lib
from k15 import config as k15_config
from k15 import parallel, sft, update
from k15 import tokenizer as tokenizer_lib
from k15.data import tasks
from k15.model import transformer


def _tiny_model(vocab_size=64, seed=0, **kw):
  cfg = transformer.ModelConfig(vocab_size=vocab_size, embed_dim=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, mlp_dim=64, **kw)
  return transformer.Transformer(cfg, rngs=nnx.Rngs(seed))


def _random_examples(rng, n, vocab=64, max_prompt=6, max_response=7):
  return [(list(rng.randint(4, vocab, size=rng.randint(1, max_prompt + 1))),
           list(rng.randint(4, vocab, size=rng.randint(1, max_response + 1))) + [1])
          for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------

def test_pack_layout_exact():
  examples = [([2, 5, 6], [7, 8, 1]),        # 6 tokens: row 0
              ([2, 9], [4, 1]),              # 4 tokens: row 1 (row 0 has 2 left)
              ([2, 3, 3, 3], [5, 5, 5, 1]),  # 8 tokens: row 2
              ([2], [9])]                    # 2 tokens: first fit is row 0
  out = sft.pack_examples(examples, 8)
  assert set(out) == {"tokens", "positions", "segment_ids", "loss_mask"}
  np.testing.assert_array_equal(out["tokens"], [[2, 5, 6, 7, 8, 1, 2, 9],
                                                [2, 9, 4, 1, 0, 0, 0, 0],
                                                [2, 3, 3, 3, 5, 5, 5, 1]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1, 1, 2, 2],
                                                     [1, 1, 1, 1, 0, 0, 0, 0],
                                                     [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3, 4, 5, 0, 1],
                                                   [0, 1, 2, 3, 0, 0, 0, 0],
                                                   [0, 1, 2, 3, 4, 5, 6, 7]])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 1, 1, 1, 0, 1],
                                                   [0, 0, 1, 1, 0, 0, 0, 0],
                                                   [0, 0, 0, 0, 1, 1, 1, 1]])
  for v in out.values():
    assert v.dtype == np.int32


def test_pack_overlong_truncate_drop_and_errors():
  examples = [([2, 5], [6, 7, 8, 9, 1]),   # 7 tokens > 5: truncated to [2 5 6 7 8]
              ([2, 3, 4, 5, 6, 7], [1]),   # prompt alone fills seq_len: dropped either way
              ([2], [4, 1])]
  out, stats = sft.pack_examples(examples, 5, return_stats=True)
  np.testing.assert_array_equal(out["tokens"], [[2, 5, 6, 7, 8], [2, 4, 1, 0, 0]])
  np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
  assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
  assert (stats.tokens, stats.loss_tokens) == (8, 5)

  out, stats = sft.pack_examples(examples, 5, overlong="drop", return_stats=True)
  np.testing.assert_array_equal(out["tokens"], [[2, 4, 1, 0, 0]])
  assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 2)

  with pytest.raises(ValueError, match="example 1 has an empty prompt"):
    sft.pack_examples([([2], [1]), ([], [4, 1])], 8)
  with pytest.raises(ValueError, match="example 0 has an empty response"):
    sft.pack_examples([([2], [])], 8)
  with pytest.raises(ValueError, match="overlong='cut'"):
    sft.pack_examples(examples, 8, overlong="cut")


@pytest.mark.parametrize("impl", ["reference", "flash"])
def test_packed_forward_equals_separate_forwards(impl):
  # block 8 < row length 32, so "flash" really runs blockwise across segment boundaries.
  model = _tiny_model(attention_impl=impl, attention_block_size=8)
  graphdef, state = nnx.split(model)
  logprobs = jax.jit(lambda s, *a: update.token_logprobs(nnx.merge(graphdef, s), *a))
  # Two example lengths (7 and 11, split differently into prompt and response): two compiles.
  rng = np.random.RandomState(0)
  examples = []
  for n in [7, 11, 7, 11, 11, 7, 7, 11, 7]:
    p = rng.randint(1, n - 1)
    examples.append((list(rng.randint(4, 64, size=p)), list(rng.randint(4, 64, size=n - p))))
  packed = sft.pack_examples(examples, 32)
  assert packed["segment_ids"].max() >= 3  # several examples share a row
  logp = np.asarray(logprobs(state, *(jnp.asarray(packed[k]) for k in
                                      ("tokens", "positions", "segment_ids"))))
  seen = 0
  for r in range(packed["tokens"].shape[0]):
    for seg in range(1, packed["segment_ids"][r].max() + 1):
      cols = np.nonzero(packed["segment_ids"][r] == seg)[0]
      alone = np.asarray(logprobs(state, jnp.asarray(packed["tokens"][r, cols])[None]))
      # Position 0 of a segment is the cross-boundary prediction; it is never in the loss.
      assert packed["loss_mask"][r, cols[0]] == 0
      np.testing.assert_allclose(logp[r, cols[1:]], alone[0, 1:], atol=1e-5, rtol=0)
      seen += 1
  assert seen == len(examples)


# ---------------------------------------------------------------------------------------------
# The loss.
# ---------------------------------------------------------------------------------------------

def test_sft_loss_counts_response_tokens_only():
  model = _tiny_model()
  batch = {k: jnp.asarray(v) for k, v in sft.pack_examples(
      _random_examples(np.random.RandomState(1), 6), 24).items()}
  loss, metrics = jax.jit(sft.sft_loss)(model, batch)
  logp = jax.jit(update.token_logprobs)(model, batch["tokens"], batch["positions"],
                                        batch["segment_ids"])
  mask = np.asarray(batch["loss_mask"], bool)
  np.testing.assert_allclose(loss, -np.asarray(logp)[mask].mean(), rtol=1e-6)
  assert metrics["tokens"] == mask.sum()

  # A prompt token is also context, so changing it changes the loss; what must not matter is
  # how well it is *predicted*: the loss's gradient w.r.t. the logits is zero outside the mask.

  def loss_from_logits(logits):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    picked = jnp.pad(picked, ((0, 0), (1, 0)))
    m = batch["loss_mask"] > 0
    return -jnp.where(m, picked, 0.0).sum() / m.sum()

  logits = jax.jit(lambda m, *a: m(*a))(model, batch["tokens"], batch["positions"],
                                          batch["segment_ids"])
  value, g = jax.jit(jax.value_and_grad(loss_from_logits))(logits)
  np.testing.assert_allclose(value, loss, rtol=1e-6)
  g = np.abs(np.asarray(g)).sum(-1)                                          # [B, T]
  # Logits at t predict token t+1: the gradient lives exactly where loss_mask[:, t+1] is 1.
  np.testing.assert_array_equal(g[:, :-1] > 0, mask[:, 1:])
  assert not g[:, -1].any()


def test_row_with_zero_mask_gets_zero_gradient():
  model = _tiny_model()
  graphdef, params = nnx.split(model)
  packed = sft.pack_examples(_random_examples(np.random.RandomState(2), 6), 24)
  batch = {k: jnp.asarray(v) for k, v in packed.items()}
  masked = dict(batch, loss_mask=batch["loss_mask"].at[0].set(0))
  changed = dict(masked, tokens=masked["tokens"].at[0].set(
      (masked["tokens"][0] * 7 + 3) % 64))  # a different row 0, still without loss tokens

  grads = jax.jit(lambda b: jax.grad(lambda p: sft.sft_loss(nnx.merge(graphdef, p), b)[0])(params))

  g1, g2 = grads(masked), grads(changed)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  # ...while unmasking row 0 does change the gradient.
  g0 = grads(batch)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0),
                                                         jax.tree.leaves(g1))) > 1e-4
  # An all-zero mask gives a zero loss and a zero gradient, not NaN.
  empty = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
  assert float(jax.jit(sft.sft_loss)(model, empty)[0]) == 0.0
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(grads(empty)))


# ---------------------------------------------------------------------------------------------
# The grain pipeline.
# ---------------------------------------------------------------------------------------------

def test_dataset_epochs_shapes_and_coverage():
  examples = [([2, 10 + i], [20 + i, 1]) for i in range(40)]  # 4 tokens each, unique marker
  ds = sft.make_dataset(examples, seq_len=10, batch_size=3, seed=0, num_epochs=2)
  batches = list(ds)
  seen = []
  for b in batches:
    for k in sft.BATCH_KEYS:
      assert b[k].shape == (3, 10) and b[k].dtype == np.int32
    # Token 1 of each example is its marker; first-fit keeps the read order row-major here.
    seen.extend(b["tokens"][(b["positions"] == 1) & (b["segment_ids"] > 0)].tolist())
  # Every example appears exactly twice over two epochs, in a different order each epoch.
  assert sorted(seen) == sorted(list(range(10, 50)) * 2)
  assert seen[:40] != seen[40:]
  assert sorted(seen[:40]) == list(range(10, 50))
  # Two 4-token examples fit a 10-token row: 2 per row, 6 per batch.
  assert len(batches) == int(np.ceil(80 / 6))


def test_dataset_state_resume_is_exact():
  examples = _random_examples(np.random.RandomState(3), 50, max_prompt=10, max_response=12)
  ds = sft.make_dataset(examples, seq_len=24, batch_size=4, seed=7, num_epochs=None)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # the checkpoint keeps it as JSON
  expected = [next(it) for _ in range(20)]        # crosses an epoch boundary (50 examples)
  fresh = iter(sft.make_dataset(examples, seq_len=24, batch_size=4, seed=7, num_epochs=None))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in sft.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], want[k])
  # A different seed gives a different order.
  other = next(iter(sft.make_dataset(examples, seq_len=24, batch_size=4, seed=8)))
  first = next(iter(ds))
  assert not np.array_equal(other["tokens"], first["tokens"])


# ---------------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
  problems = tasks.generate("arithmetic", 400, seed=0, difficulties=[1, 2])
  tok = tokenizer_lib.train_tokenizer(tasks.training_texts(problems),
                                      tmp_path_factory.mktemp("tok"), 320)
  examples = [tok.render_example(p.prompt, p.long_cot) for p in problems]
  return tok, examples


def _config(**kw):
  c = k15_config.sft_block(seq_len=128, batch_size=8, steps=60, checkpoint_every=1000)
  c.optimizer.learning_rate = 3e-3
  c.optimizer.end_learning_rate = 3e-4
  c.optimizer.warmup_steps = 5
  c.update(kw)
  return c


def _sharded_model(vocab_size, mesh, seed=0, num_layers=2):
  cfg = transformer.ModelConfig(vocab_size=vocab_size, embed_dim=64, num_layers=num_layers,
                                num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128)
  return parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(seed)), mesh)


def test_sft_learns_arithmetic_cot(arithmetic):
  tok, examples = arithmetic
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2})
  with parallel.use_mesh(mesh):
    model = _sharded_model(tok.vocab_size, mesh)
    trained, history = sft.train_sft(model, examples, _config(), mesh=mesh, progress=False)
  assert len(history) == 60 and all(np.isfinite(history))
  # The digit-by-digit CoT is almost deterministic given the prompt: the loss must collapse.
  assert np.mean(history[-5:]) < 0.5 * history[0], history
  # The returned model is the trained one: lower loss on held-out packed data.
  batch = {k: jnp.asarray(v) for k, v in sft.pack_examples(examples[:16], 128).items()}
  assert float(sft.sft_loss(trained, batch)[0]) < 0.5 * float(sft.sft_loss(model, batch)[0])


def test_sft_checkpoint_resume_matches_uninterrupted(arithmetic, tmp_path):
  tok, examples = arithmetic
  mesh = parallel.make_mesh({"data": -1})
  cfg = lambda steps: _config(steps=steps, batch_size=8, seq_len=96, checkpoint_every=2,
                              optimizer=dict(learning_rate=1e-3, warmup_steps=2,
                                             decay="constant", end_learning_rate=1e-3,
                                             decay_steps=0, b1=0.9, b2=0.95, weight_decay=0.0,
                                             grad_clip=1.0))
  with parallel.use_mesh(mesh):
    # train_sft leaves its input model intact, so two initial models serve every call.
    init_a = _sharded_model(tok.vocab_size, mesh, seed=0, num_layers=1)
    init_b = _sharded_model(tok.vocab_size, mesh, seed=5, num_layers=1)
    straight, h_straight = sft.train_sft(init_a, examples, cfg(6), mesh=mesh, progress=False)
    # "Interrupted" after 3 steps (a final save at 3), then continued to 6 in the same workdir.
    # The resumed call starts from another init: everything must come from the checkpoint.
    _, h_first = sft.train_sft(init_a, examples, cfg(3), mesh=mesh, workdir=str(tmp_path),
                               progress=False)
    resumed, h_resumed = sft.train_sft(init_b, examples, cfg(6), mesh=mesh,
                                       workdir=str(tmp_path), progress=False)
    assert len(h_first) == 3 and len(h_resumed) == 6
    np.testing.assert_allclose(h_resumed, h_straight, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed)), jax.tree.leaves(nnx.state(straight))):
      np.testing.assert_allclose(a, b, atol=1e-6)
    # A rerun of a finished run trains nothing and returns the saved model.
    again, h_again = sft.train_sft(init_b, examples, cfg(6), mesh=mesh, workdir=str(tmp_path),
                                   progress=False)
    assert h_again == h_resumed
    for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(resumed))):
      np.testing.assert_array_equal(a, b)
    # restore_params loads the params alone into a fresh model.
    loaded = ckpt_lib.restore_params(init_b, str(tmp_path / sft.CHECKPOINT_SUBDIR))
    for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(resumed))):
      np.testing.assert_array_equal(a, b)


def test_config_block_rejects_unknown_keys():
  with pytest.raises(ValueError, match="unknown sft config keys \\['stepz'\\]"):
    k15_config.sft_block(stepz=3)
  assert isinstance(k15_config.sft_block(steps=3), ml_collections.ConfigDict)


def test_load_jsonl_errors_name_file_and_line(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_text('{"prompt": "1+1?", "response": "\\\\boxed{2}"}\n\n{"prompt": "x"}\n')
  with pytest.raises(ValueError, match=f"{path}:3: missing or empty string field 'response'"):
    sft.load_jsonl(str(path))
  path.write_text('{"prompt": "1+1?", "response": "2"}\n')
  assert sft.load_jsonl(str(path)) == [("1+1?", "2")]
