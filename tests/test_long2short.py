"""Long2short (§2.4): DPO loss and pairs, merging (values, sharding, errors), shortest rejection
sampling, one DPO training run, the long2short RL config."""

import math
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from k15 import config as k15_config
from k15 import checkpoint as ckpt_lib
from k15 import long2short, parallel, sampling
from k15.long2short import dpo as dpo_lib
from k15.long2short import driver, rejection
from k15.long2short import rl as l2s_rl
from k15.rl import stage as rl_stage_lib
from k15.model import transformer

L2S = long2short


def _tiny_cfg(vocab_size=64, num_layers=2):
  return transformer.ModelConfig(vocab_size=vocab_size, embed_dim=32, num_layers=num_layers,
                                 num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)


# ---------------------------------------------------------------------------------------------
# DPO loss and pairs.
# ---------------------------------------------------------------------------------------------

def test_dpo_loss_closed_form_and_gradient_sign():
  pc = np.array([-3.0, -10.0, -1.5, -7.0], np.float32)
  pr = np.array([-4.0, -2.0, -1.5, -9.0], np.float32)
  rc = np.array([-3.5, -9.0, -2.0, -7.0], np.float32)
  rr = np.array([-3.0, -2.5, -1.0, -8.0], np.float32)
  beta = 0.3
  margin = beta * ((pc - rc) - (pr - rr))
  expected = np.mean(np.log1p(np.exp(-margin.astype(np.float64))))  # -log sigmoid(m)
  loss, metrics = L2S.dpo_loss(pc, pr, rc, rr, beta)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["dpo/margin"]), margin.mean(), rtol=1e-5)
  assert float(metrics["dpo/accuracy"]) == pytest.approx(np.mean(margin > 0))
  # Policy equal to the reference: every margin is 0 and the loss is log 2.
  loss0, _ = L2S.dpo_loss(pc, pr, pc, pr, beta)
  assert float(loss0) == pytest.approx(math.log(2.0), rel=1e-6)

  # Gradient descent raises the chosen log-probs and lowers the rejected ones.
  g_chosen, g_rejected = jax.grad(lambda a, b: L2S.dpo_loss(a, b, rc, rr, beta)[0],
                                  argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
  assert np.all(np.asarray(g_chosen) < 0) and np.all(np.asarray(g_rejected) > 0)
  # d loss / d pc_i = -beta * sigmoid(-m_i) / B, exactly.
  np.testing.assert_allclose(np.asarray(g_chosen), -beta / (1 + np.exp(margin)) / 4, rtol=1e-5)


def _group(lengths, correct, prompt=(2, 7), tag=10):
  # Response j: `lengths[j]` tokens, all equal to tag + j, so each response is recognizable.
  return L2S.Group(prompt=list(prompt), responses=[[tag + j] * n for j, n in enumerate(lengths)],
                   correct=list(correct))


def test_build_dpo_pairs_rules():
  groups = [
      # chosen: index 1 (len 4, the first of the two shortest correct); index 3 ties with it
      # and is excluded; index 2 (len 6 = 1.5x) is not longer than 1.5x: excluded; index 4
      # (len 7 > 6) is a correct-but-long negative; index 0 (wrong, len 9) is a negative;
      # the wrong ones no longer than the chosen (index 5, len 2; index 6, len 4) are not.
      _group([9, 4, 6, 4, 7, 2, 4], [False, True, True, True, True, False, False]),
      _group([3, 5, 8], [False, False, False], prompt=(2, 8)),  # no correct response: no pairs
      _group([5], [True], prompt=(2, 9)),                        # correct alone: no pairs
  ]
  pairs = L2S.build_dpo_pairs(groups)
  chosen = ([2, 7], [11] * 4)
  assert [c for c, _ in pairs] == [chosen] * 2
  assert [r for _, r in pairs] == [([2, 7], [10] * 9), ([2, 7], [14] * 7)]
  assert L2S.build_dpo_pairs(groups[1:]) == []

  assert L2S.shortest_correct(groups[0]) == 1
  selection = L2S.select_shortest(groups)
  assert selection.examples == [chosen, ([2, 9], [10] * 5)]
  assert (selection.kept, selection.skipped_no_correct) == (2, 1)
  assert selection.mean_chosen_tokens == pytest.approx(4.5)
  assert selection.sampled_tokens == 36 + 16 + 5 == rejection.sampled_tokens(groups)


# ---------------------------------------------------------------------------------------------
# Merging.
# ---------------------------------------------------------------------------------------------

def test_merge_plain_pytrees_mean_self_and_errors():
  rng = np.random.default_rng(0)
  a = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": {"x": np.arange(5, dtype=np.int32),
                                                              "y": np.float32(2.0)}}
  b = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": {"x": np.arange(5, dtype=np.int32) + 7,
                                                              "y": np.float32(-4.0)}}
  m = L2S.merge([a, b], [0.5, 0.5])
  np.testing.assert_allclose(np.asarray(m["w"]), (a["w"] + b["w"]) / 2, rtol=1e-6)
  assert float(m["b"]["y"]) == -1.0
  np.testing.assert_array_equal(np.asarray(m["b"]["x"]), a["b"]["x"])  # ints: the first's
  np.testing.assert_array_equal(np.asarray(L2S.merge([a], [1.0])["w"]), a["w"])
  np.testing.assert_allclose(np.asarray(L2S.merge([a, a, a], [0.2, 0.3, 0.5])["w"]), a["w"],
                             rtol=1e-6)

  with pytest.raises(ValueError, match="sum to 0.9"):
    L2S.merge([a, b], [0.5, 0.4])
  with pytest.raises(ValueError, match="2 states but 1 weights"):
    L2S.merge([a, b], [1.0])
  bad = {"w": np.zeros((4, 3), np.float32), "b": b["b"]}
  with pytest.raises(ValueError, match=r"parameter 'w' has shape \(3, 4\) in state 0 but "
                                       r"\(4, 3\) in state 1"):
    L2S.merge([a, bad], [0.5, 0.5])
  with pytest.raises(ValueError, match=r"only in state 1: \['b/z'\]"):
    L2S.merge([a, {"w": a["w"], "b": {"x": a["b"]["x"], "z": a["b"]["y"]}}], [0.5, 0.5])


@pytest.fixture(scope="module")
def sharded_pair():
  """Two tiny models' states on the 8-device mesh data=2, fsdp=2, tensor=2 (built once)."""
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg = _tiny_cfg()
  with parallel.use_mesh(mesh):
    m1 = parallel.create_sharded(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(1)), mesh)
    s1 = nnx.state(m1)
    shardings = jax.tree.map(lambda x: x.sharding, s1)
    # A second, different state in the same layout, without a second init compile.
    s2 = jax.jit(lambda s: jax.tree.map(lambda x: 0.5 - 2.0 * x, s), out_shardings=shardings)(s1)
  return mesh, m1, s1, s2


def test_merge_sharded_states_keeps_sharding(sharded_pair):
  mesh, _, s1, s2 = sharded_pair
  with parallel.use_mesh(mesh):
    mean = L2S.merge([s1, s2], [0.5, 0.5])
    same = L2S.merge([s1, s1], [0.5, 0.5])
  assert type(mean) is type(s1)
  sharded = 0
  for x, y, got, self_merge in zip(jax.tree.leaves(s1), jax.tree.leaves(s2),
                                   jax.tree.leaves(mean), jax.tree.leaves(same)):
    assert got.sharding.is_equivalent_to(x.sharding, x.ndim)
    sharded += not got.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(got), (np.asarray(x) + np.asarray(y)) / 2, rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_array_equal(np.asarray(self_merge), np.asarray(x))  # bit for bit
  assert sharded >= 5  # the embedding, projections and MLP are split over the mesh

  # A model of another shape: the error names the parameter (checked before any device work).
  other_cfg = transformer.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, mlp_dim=48)
  other = nnx.state(nnx.eval_shape(lambda: transformer.Transformer(other_cfg, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r"parameter 'layers/0/mlp/\w+' has shape \(\d+, \d+\) "
                                       r"in state 0 but \(\d+, \d+\) in state 1"):
    L2S.merge([s1, other], [0.5, 0.5])


def test_merge_checkpoints(sharded_pair, tmp_path):
  mesh, template, s1, s2 = sharded_pair
  dirs = []
  for i, state in enumerate((s1, s2)):
    d = str(tmp_path / f"run{i}")
    with ckpt_lib.Checkpointer(d, save_every=1, keep=1, subdir=None) as c:
      c.save(3, arrays={"params": state}, force=True)
    dirs.append(d)
  with parallel.use_mesh(mesh):
    merged = L2S.merge_checkpoints(template, dirs, [0.25, 0.75], mesh)
  for got, a, b in zip(jax.tree.leaves(nnx.state(merged)), jax.tree.leaves(s1),
                       jax.tree.leaves(s2)):
    assert got.sharding.is_equivalent_to(a.sharding, a.ndim)
    np.testing.assert_allclose(np.asarray(got), 0.25 * np.asarray(a) + 0.75 * np.asarray(b),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Shortest rejection sampling with a fake sampler and grader.
# ---------------------------------------------------------------------------------------------

class _FakeTokenizer:
  vocab_size, eos_id, pad_id = 64, 1, 0

  def render_prompt(self, question):
    return [2, int(question)]

  def decode(self, ids):
    return " ".join(str(int(i)) for i in ids if int(i) != self.eos_id)


class _Problem:
  def __init__(self, i):
    self.prompt, self.id = str(10 + i), f"p{i}"


# Per problem (prompt token 10 + i): each sample's (length incl. eos, first token, finish reason).
# Token 5 = a right answer. Problem 0: the shortest correct is sample 2 (sample 3 ties, sample 4
# is shorter but cut at the budget, sample 5 is shorter but wrong).
_E, _L = int(sampling.FinishReason.EOS), int(sampling.FinishReason.LENGTH)
_PLAN = {10: [(6, 5, _E), (5, 5, _E), (3, 5, _E), (3, 5, _E), (2, 5, _L), (2, 9, _E)],
         11: [(4, 9, _E), (3, 8, _E), (2, 5, _L), (5, 7, _E), (2, 9, _E), (3, 9, _E)],
         12: [(7, 5, _E), (7, 9, _E), (4, 5, _E), (3, 9, _E), (8, 5, _E), (5, 5, _E)]}


def _fake_generate(model, prompts, *, max_new_tokens, eos_id, num_samples, seed, pad_id,
                   row_seeds, temperature=1.0, **unused):
  del model, seed, temperature, unused
  assert len(row_seeds) == len(prompts) * num_samples
  R = len(prompts) * num_samples
  tokens = np.full((R, max_new_tokens), pad_id, np.int32)
  lengths = np.zeros(R, np.int32)
  reasons = np.zeros(R, np.int32)
  for i, p in enumerate(prompts):
    for j, (n, first, reason) in enumerate(_PLAN[p[-1]]):
      r = i * num_samples + j
      eos = int(np.atleast_1d(eos_id)[0])  # the sampler gets the tokenizer's stop ids
      row = [first] + [20 + j] * (n - 2) + ([eos] if reason == _E else [30])
      tokens[r, :n], lengths[r], reasons[r] = row, n, reason
  return sampling.SampleResult(tokens=tokens, logprobs=np.zeros(tokens.shape, np.float32),
                               lengths=lengths, finish_reason=reasons)


def test_shortest_rejection_sampling_fake_sampler(monkeypatch):
  monkeypatch.setattr(sampling.sampler, "generate", _fake_generate)
  grade = lambda problem, text: float(text.split()[0] == "5")
  kw = dict(tokenizer=_FakeTokenizer(), grade_fn=grade, n=6, temperature=1.0, max_new_tokens=8,
            seed=0)
  problems = [_Problem(i) for i in range(3)]
  selection = L2S.shortest_rejection_sampling(None, problems, batch_size=2, **kw)
  # Problem 0 -> sample 2 (len 3); problem 1 has no correct finished response: skipped;
  # problem 2 -> sample 2 (len 4).
  assert selection.examples == [([2, 10], [5, 22, 1]), ([2, 12], [5, 22, 22, 1])]
  assert (selection.problems, selection.kept, selection.skipped_no_correct) == (3, 2, 1)
  assert selection.mean_chosen_tokens == pytest.approx(3.5)
  assert selection.sampled_tokens == 21 + 19 + 34
  # The same examples at another batch size (row seeds do not depend on it).
  assert L2S.shortest_rejection_sampling(None, problems, batch_size=3, **kw) == selection
  # A token budget stops at the first batch boundary that reaches it: problem 0 alone (21
  # tokens) reaches 10, but its batch also holds problem 1; 41 needs the last batch too.
  for budget, kept_problems, spent in ((10, 2, 40), (40, 2, 40), (41, 3, 74)):
    capped = L2S.shortest_rejection_sampling(None, problems, batch_size=2, token_budget=budget,
                                             **kw)
    assert (capped.problems, capped.sampled_tokens) == (kept_problems, spent), budget


# ---------------------------------------------------------------------------------------------
# DPO training.
# ---------------------------------------------------------------------------------------------

def test_train_dpo_lowers_the_loss_on_its_pairs(tmp_path):
  mesh = parallel.make_mesh({"data": -1})
  rng = np.random.default_rng(0)
  pairs = []
  for _ in range(10):  # batches of 8: the last reference batch is padded
    prompt = [2] + list(rng.integers(4, 64, size=3))
    pairs.append(((prompt, list(rng.integers(4, 64, size=4)) + [1]),
                  (prompt, list(rng.integers(4, 64, size=6)) + [1])))
  config = k15_config.long2short_block(dpo=dict(steps=3, batch_size=8, seq_len=16, learning_rate=3e-3,
                                     warmup_steps=0, checkpoint_every=1)).dpo
  with parallel.use_mesh(mesh):
    model = parallel.create_sharded(  # one layer: the test is about the loss, not the model
        lambda: transformer.Transformer(_tiny_cfg(num_layers=1), rngs=nnx.Rngs(0)), mesh)
    trained, losses = L2S.train_dpo(model, pairs, config, mesh, workdir=str(tmp_path),
                                    progress=False)
    ref = dpo_lib.reference_logprobs(model, pairs, seq_len=16, batch_size=8, mesh=mesh)  # input
    logp = dpo_lib.reference_logprobs(trained, pairs, seq_len=16, batch_size=8, mesh=mesh)
  assert len(losses) == 3
  # The reference is the starting model: the first step's loss is log 2 exactly.
  assert losses[0] == pytest.approx(math.log(2.0), abs=1e-5)
  after, metrics = L2S.dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], config.beta)
  assert float(after) < math.log(2.0) - 1e-3
  assert float(metrics["dpo/margin"]) > 0
  # The chosen responses gained probability relative to the rejected ones on average.
  assert np.mean((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1])) > 0
  # Interrupted after step 2 (step 3's checkpoint lost): a rerun resumes and ends bit for bit
  # where the uninterrupted run did; a rerun of a finished run returns it without training.
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  with ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2) as c:
    assert c.all_steps() == [2]
  for _ in range(2):
    with parallel.use_mesh(mesh):
      again, history = L2S.train_dpo(model, pairs, config, mesh, workdir=str(tmp_path),
                                     progress=False)
    assert history == losses
    for x, y in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(trained))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_make_dpo_arrays_layout_and_overlong():
  pairs = [(([2, 5], [6, 1]), ([2, 5], [7, 8, 9, 1])),
           (([2, 5], [6, 1]), ([2, 5], [7] * 10 + [1]))]  # rejected over seq_len: dropped
  arrays, dropped = dpo_lib.make_dpo_arrays(pairs, 8, pad_id=0)
  assert dropped == 1 and arrays["tokens"].shape == (1, 2, 8)
  np.testing.assert_array_equal(arrays["tokens"][0], [[2, 5, 6, 1, 0, 0, 0, 0],
                                                      [2, 5, 7, 8, 9, 1, 0, 0]])
  np.testing.assert_array_equal(arrays["mask"][0], [[0, 0, 1, 1, 0, 0, 0, 0],
                                                    [0, 0, 1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(arrays["segment_ids"][0].sum(-1), [4, 6])


def test_batch_indices_cover_each_epoch_once():
  seen = np.concatenate([dpo_lib._batch_indices(s, 4, 10, seed=3) for s in range(5)])  # 2 epochs
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
  np.testing.assert_array_equal(dpo_lib._batch_indices(2, 4, 10, seed=3), seen[8:12])


def test_rs_steps_scale_with_the_selected_examples():
  """A round under a token budget keeps few examples: its fine-tune takes sft_epochs passes
  over them, not a fixed step count (the cap binds only for many examples)."""
  config_sft = k15_config.sft_block(seq_len=64, batch_size=4)
  rs = lambda **kw: ml_collections.ConfigDict(dict(dict(sft_steps=40, sft_epochs=8), **kw))
  example = lambda n: ([1] * 8, [5] * n)  # 8 prompt tokens, n response tokens
  few = [example(24) for _ in range(8)]       # 32 tokens each: 2 per packed row, 1 batch/epoch
  many = [example(24) for _ in range(80)]     # 10 batches per epoch
  assert driver.rs_steps(config_sft, few, rs(), pad_id=0) == 8
  assert driver.rs_steps(config_sft, few, rs(sft_epochs=3), pad_id=0) == 3
  assert driver.rs_steps(config_sft, many, rs(), pad_id=0) == 40      # the cap
  assert driver.rs_steps(config_sft, many, rs(sft_steps=0), pad_id=0) == 80
  assert driver.rs_steps(config_sft, many, rs(sft_epochs=0), pad_id=0) == 40
  with pytest.raises(ValueError, match="both 0"):
    driver.rs_steps(config_sft, few, rs(sft_steps=0, sft_epochs=0), pad_id=0)


@pytest.mark.parametrize("init", ["sft", "long"])
def test_short_model_from_sft_is_shared_by_the_seed_pairs(tmp_path, monkeypatch, init):
  """In a study each seed pair has its own out_dir; a short model made from the SFT model is
  the same in every pair, so it is trained in the base's shared_dir (train_sft reuses it)."""
  from k15 import sft  # pylint: disable=g-import-not-at-top
  from k15.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  workdirs = []
  monkeypatch.setattr(sft, "train_sft", lambda model, examples, cfg, **kw: (
      workdirs.append(kw["workdir"]) or f"short({model})", None))
  monkeypatch.setattr(driver, "obtain", lambda ctx, name: driver.Trained(name))
  record = prompts_lib.PromptRecord(id="a", prompt="q", answer="1", domain="arithmetic",
                                    meta={"long_cot": "x", "short_cot": "\\boxed{1}"})
  config = ml_collections.ConfigDict(dict(
      sft=k15_config.sft_block(), long2short=k15_config.long2short_block(short=dict(init=init))))
  tok = types.SimpleNamespace(render_example=lambda q, r: ([1], [2, 3]), pad_id=0)
  for pair in range(2):
    ctx = driver.Context(config=config, paths={}, out_dir=tmp_path / f"seed{pair}", tok=tok,
                         eval_records=[], prompts=[], rl_records=[], sft_records=[record],
                         mesh=None, template=None, shared_dir=tmp_path / "base" / "long2short")
    assert driver.train_short(ctx).model == f"short({init})"
  if init == "sft":
    assert workdirs == [str(tmp_path / "base" / "long2short" / "short")] * 2
  else:  # from each pair's long model: its own
    assert workdirs == [str(tmp_path / f"seed{p}" / "short") for p in range(2)]


# ---------------------------------------------------------------------------------------------
# Config and long2short RL.
# ---------------------------------------------------------------------------------------------

def test_config_block_and_long2short_rl_overrides(monkeypatch, tmp_path):
  with pytest.raises(ValueError, match=r"unknown long2short config keys \['dpo_beta'\]"):
    k15_config.long2short_block(dpo_beta=0.2)
  with pytest.raises(ValueError, match=r"unknown long2short.dpo keys \['bta'\]"):
    k15_config.long2short_block(dpo=dict(bta=0.2))
  c = k15_config.long2short_block(dpo=dict(beta=0.2))
  assert c.dpo.beta == 0.2 and c.dpo.steps == 60  # the other dpo keys keep their defaults
  with pytest.raises(ValueError, match=r"long2short.rs must be a dict"):
    k15_config.long2short_block(rs=8)

  # Nested blocks of the other config blocks are checked the same way (k15.config.make_block).
  with pytest.raises(ValueError, match=r"unknown rl.sampling keys \['mod'\]"):
    k15_config.rl_block(sampling=dict(mod="uniform"))
  assert k15_config.rl_block(sampling=dict(mode="uniform")).sampling.to_dict() == dict(
      mode="uniform", curriculum="", epsilon=0.0, success_prior_samples=0)
  config = ml_collections.ConfigDict(dict(
      seed=0, rl=k15_config.rl_block(max_new_tokens=192, length_weight=0.0,
                                     length_warmup_iterations=30, iterations=60,
                                     segment_budget=160),
      long2short=k15_config.long2short_block(rl=dict(iterations=5, max_new_tokens=96,
                                          length_weight=0.5))))
  config.lock()
  seen = {}

  def fake_rl_stage(cfg, model, records, tok, mesh, workdir, stop_when=None):
    seen.update(cfg=cfg, model=model, records=records, workdir=workdir, iterations=0)
    while seen["iterations"] < cfg.rl.iterations:  # each iteration samples 100 tokens
      seen["iterations"] += 1
      if stop_when is not None and stop_when({"rl/sampled_tokens": 100}):
        break
    return "trained"

  monkeypatch.setattr(rl_stage_lib, "rl_stage", fake_rl_stage)
  out = L2S.long2short_rl(config, "long-model", ["r0", "r1"], None, None, "/tmp/x")
  assert out == "trained" and seen["model"] == "long-model" and seen["records"] == ["r0", "r1"]
  rl = seen["cfg"].rl
  assert (rl.iterations, rl.max_new_tokens, rl.length_weight, rl.length_warmup_iterations,
          rl.segment_budget) == (5, 96, 0.5, 0, 96)
  # The caller's config is unchanged.
  assert (config.rl.iterations, config.rl.max_new_tokens, config.rl.length_weight,
          config.rl.length_warmup_iterations) == (60, 192, 0.0, 30)
  assert seen["iterations"] == 5  # no token budget: rl.iterations
  # A token budget of 250 ends training after the third iteration (300 tokens sampled).
  workdir = tmp_path / "rl"
  assert L2S.long2short_rl(config, "long-model", [], None, None, str(workdir),
                           token_budget=250) == "trained"
  assert seen["iterations"] == 3
  # A run whose metrics show the budget spent is restored from its checkpoints, not trained.
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 1, "rl/sampled_tokens": 200}\n'
                                         '{"step": 2, "rl/sampled_tokens": 90}\n')
  assert l2s_rl.sampled_tokens(str(workdir)) == 290
  monkeypatch.setattr(ckpt_lib, "restore_params", lambda model, path: f"restored {path}")
  seen.clear()
  out = L2S.long2short_rl(config, "long-model", [], None, None, str(workdir), token_budget=250)
  assert out == f"restored {workdir / 'checkpoints'}" and not seen
  config.unlock()
  config.long2short.rl.length_weight = 0.0
  with pytest.raises(ValueError, match="length_weight=0.0"):
    L2S.long2short_rl(config, "long-model", [], None, None, "/tmp/x")


def test_format_table_and_efficiency():
  R = L2S.MethodResult
  results = {"long": R("long", accuracy=0.9, mean_tokens=100.0, token_efficiency=9.0),
             "rl": R("rl", accuracy=0.88, mean_tokens=60.0, sampled_tokens=123456,
                     token_efficiency=L2S.token_efficiency(0.88, 60.0)),
             "dpo": R("dpo", skipped="no correct samples", sampled_tokens=777)}
  assert L2S.token_efficiency(0.88, 60.0) == pytest.approx(0.88 / 0.06)
  table = L2S.format_table(results)
  assert "-40.0%" in table and "-2.0" in table and "no correct samples" in table
  assert "123,456" in table and "777" in table  # what each method sampled
  driver.compare_to_long(results)
  assert results["rl"].tokens_vs_long == pytest.approx(0.6) and results["rl"].meets_target
  assert R.from_json(results["rl"].to_json()) == results["rl"]


def test_run_refuses_a_missing_pipeline_and_a_changed_config(tmp_path):
  config = ml_collections.ConfigDict(dict(
      seed=0, evaluate=dict(num_samples=2), long2short=k15_config.long2short_block()))
  with pytest.raises(FileNotFoundError, match=r"needs a finished pipeline.*tokenizer\.model"):
    L2S.run(config, str(tmp_path))
  for rel in ("tokenizer.model", "sft/sft_checkpoints/", "rl/checkpoints/", "data/eval.jsonl",
              "data/sft.jsonl", "data/rl_pool.jsonl", "data/rl_prompts.jsonl"):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if rel.endswith("/") else path.write_text("")
  (tmp_path / "long2short.json").write_text('{"config": {"long2short": {}}, "results": {}}')
  with pytest.raises(ValueError, match="made with another long2short/evaluate config"):
    L2S.run(config, str(tmp_path))
  config.long2short.methods = ("merge", "distill")
  with pytest.raises(ValueError, match=r"unknown \['distill'\]"):
    L2S.run(config, str(tmp_path))


@pytest.mark.parametrize("rounds,dry_round", [(1, 0), (2, 0), (3, 3)])
def test_run_chains_rejection_sampling_rounds_and_rl_init(tmp_path, monkeypatch, rounds,
                                                          dry_round):
  """rs.rounds and rl.init='shortest_rs': each rejection-sampling round fine-tunes the previous
  round's model on that model's own shortest correct samples, and long2short RL trains the last
  one, not the long model; the table says so. A round whose samples are all wrong (dry_round)
  ends the rounds with the model before it. The stages are fakes that return labelled
  stand-in models (strings)."""
  from k15 import config as k15_config
  from k15 import evaluate as evaluate_lib
  from k15 import sft
  from k15.model import build
  from k15 import tokenizer as tokenizer_lib
  from k15.data import prompts as prompts_lib

  for rel in ("tokenizer.model", "sft/sft_checkpoints/", "rl/checkpoints/", "data/eval.jsonl",
              "data/sft.jsonl", "data/rl_pool.jsonl", "data/rl_prompts.jsonl"):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if rel.endswith("/") else path.write_text("")
  records = {"eval.jsonl": ["e0", "e1"], "rl_pool.jsonl": ["p0", "p1"],
             "rl_prompts.jsonl": ["q0"], "sft.jsonl": []}
  monkeypatch.setattr(prompts_lib, "load_jsonl",
                      lambda path: (records[path.rsplit("/", 1)[-1]], None))
  monkeypatch.setattr(tokenizer_lib.Tokenizer, "load",
                      staticmethod(lambda path: types.SimpleNamespace(pad_id=0)))
  monkeypatch.setattr(build, "build_model", lambda config, mesh: "template")
  monkeypatch.setattr(ckpt_lib, "restore_params", lambda template, path: "long")
  sampled = []

  def fake_groups(model, problems, **kw):  # a model named after k fine-tunes answers in 4 - k
    assert kw["token_budget"] == 600 // rounds  # the rounds share the method's budget
    sampled.append(model)
    k = model.count("rs(")
    ok = k + 1 != dry_round
    return [L2S.Group([1], [[5, 6, 7, 2][k:], [5, 6, 7, 8, 2][k:]], [ok, ok], "p0"),
            L2S.Group([1], [[7, 2]], [False], "p1")]

  monkeypatch.setattr(rejection, "sample_groups", fake_groups)
  trained = []
  monkeypatch.setattr(sft, "train_sft", lambda model, examples, cfg, **kw: (
      trained.append((model, examples)) or f"rs({model})", None))
  started = []
  monkeypatch.setattr(l2s_rl, "long2short_rl", lambda config, model, recs, tok, mesh, workdir,
                      token_budget: started.append((model, recs, token_budget)) or f"l2s({model})")
  monkeypatch.setattr(evaluate_lib, "evaluate", lambda model, problems, **kw: dict(
      accuracy=0.5 + 0.01 * model.count("("), mean_tokens=100.0 - 35 * model.count("rs(")))

  config = ml_collections.ConfigDict(dict(
      seed=0, mesh=k15_config.mesh_block(data=-1), sharding_rules=tuple(parallel.DEFAULT_RULES),
      sft=k15_config.sft_block(steps=1, seq_len=16, batch_size=2,
                               optimizer=dict(learning_rate=1.0, end_learning_rate=0.0,
                                              warmup_steps=0, decay_steps=0)),
      rl=dict(max_new_tokens=64),
      evaluate=dict(num_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=64, batch_size=4),
      long2short=k15_config.long2short_block(methods=("shortest_rs", "rl"), token_budget=600,
                                             rs=dict(rounds=rounds), rl=dict(init="shortest_rs"))))
  results = L2S.run(config, str(tmp_path))
  # Round r samples from round r - 1's model and keeps each prompt's shortest correct
  # response (p1 has none); RL starts from the last round's model, on the curated RL prompts.
  models = ["long", "rs(long)", "rs(rs(long))"]
  done = dry_round - 1 if dry_round else rounds  # rounds that trained a model
  assert sampled == models[:rounds]
  assert trained == [(models[r], [([1], [5, 6, 7, 2][r:])]) for r in range(done)]
  assert started == [(models[done], ["q0"], 600)]
  rl = results["rl"]
  assert rl.init == "shortest_rs" and rl.accuracy == pytest.approx(0.5 + 0.01 * (done + 1))
  assert results["shortest_rs"].info["rounds"] == done
  assert ("stopped" in results["shortest_rs"].info) == bool(dry_round)
  # Every round's samples count, the dry round's too: round k's responses are 11 - 2k tokens.
  assert results["shortest_rs"].sampled_tokens == sum(11 - 2 * k for k in range(rounds))
  assert rl.tokens_vs_long == pytest.approx(1 - 0.35 * done) and rl.meets_target
  assert "long2short RL (from shortest RS)" in L2S.format_table(results)
  assert (tmp_path / "long2short" / f"groups_shortest_rs_b{600 // rounds}.json").exists() == (
      rounds >= 2)
  # A rerun reads the stored results (typed again) and trains nothing.
  sampled.clear()
  again = L2S.run(config, str(tmp_path))
  assert again == results and not sampled
  with pytest.raises(ValueError, match=r"long2short.rl.init='sft'"):
    config.long2short.rl.init = "sft"
    L2S.run(config, str(tmp_path))
  config.long2short.rl.init = "long"
  with pytest.raises(ValueError, match=r"long2short.rs.rounds=0"):
    config.long2short.rs.rounds = 0
    L2S.run(config, str(tmp_path))
