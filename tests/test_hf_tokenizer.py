"""Tests for k15.hf_tokenizer: the chat prompt, stop ids, round trips, and use by k15.evaluate."""

import json
import os
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from k15 import hf_tokenizer  # pylint: disable=g-import-not-at-top
from k15 import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

TEXTS = [
    "Ana has 12 apples and buys 7 more. How many apples does she have now?\n12 + 7 = 19\n#### 19",
    "A box holds 6 pens. How many pens are in 4 boxes?\n6 * 4 = 24 so \\boxed{24}",
    "What is 1/2 + 1/3? \\frac{1}{2} + \\frac{1}{3} = \\boxed{\\frac{5}{6}}",
] * 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_tok")
  hf_tokenizer.train_bpe(TEXTS, path, vocab_size=320)
  return path


@pytest.fixture(scope="module")
def tok(tok_dir):
  return hf_tokenizer.HFTokenizer.load(tok_dir, instruction=hf_tokenizer.BOXED_INSTRUCTION)


def _id(t, token):
  return t.hf.convert_tokens_to_ids(token)


@pytest.mark.parametrize("text", [
    "Ana has 12 apples.",
    "\\boxed{\\frac{5}{6}} and (3*4)/2^2 = 3",
    "naïve café — 数学 😀",  # never seen in training: byte-level BPE still encodes it
    "two  spaces,\ttab and a trailing space ",
    "",
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids + [tok.eos_id] + tok.encode("after the end"))) == text


def test_special_ids(tok):
  assert tok.uses_chat_template
  assert tok.eos_id == _id(tok, "<|im_end|>") and tok.pad_id == _id(tok, "<|endoftext|>")
  assert tok.stop_ids == (tok.eos_id,)
  assert tok.bos_id == -1  # as Qwen2.5: no bos token
  assert 259 < tok.vocab_size <= 320
  ids = tok.encode("7", add_bos=True, add_eos=True)
  assert ids[-1] == tok.eos_id and len(ids) == 2


def test_chat_prompt(tok):
  question = "A box holds 6 pens. How many pens are in 4 boxes?"
  text = tok.prompt_text(question)
  assert text == ("<|im_start|>user\n" + question + "\nPlease reason step by step, and put your "
                  "final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
  ids = tok.render_prompt(question)
  assert ids == tok.hf.encode(text, add_special_tokens=False)
  assert ids.count(_id(tok, "<|im_start|>")) == 2 and ids[-1] != tok.eos_id
  prompt, response = tok.render_example(question, "6 * 4 = 24, so \\boxed{24}")
  assert prompt == ids and response[-1] == tok.eos_id
  assert tok.decode(response) == "6 * 4 = 24, so \\boxed{24}"
  # Template tokens the model might emit inside a response are not text.
  assert tok.decode(tok.encode("a<|im_start|>b")) == "ab"


def test_system_message(tok_dir):
  t = hf_tokenizer.HFTokenizer.load(tok_dir, system="Be brief.")
  assert t.prompt_text("1+1?") == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?"
                                   "<|im_end|>\n<|im_start|>assistant\n")


def test_end_of_turn_is_found_when_eos_differs(tok_dir):
  # Qwen2.5 base: eos is <|endoftext|>, but its chat template ends a turn with <|im_end|>.
  base = transformers.AutoTokenizer.from_pretrained(str(tok_dir), eos_token="<|endoftext|>")
  t = hf_tokenizer.HFTokenizer(base)
  im_end, endoftext = _id(t, "<|im_end|>"), _id(t, "<|endoftext|>")
  assert base.eos_token_id == endoftext
  assert t.eos_id == im_end and t.stop_ids == (im_end, endoftext)
  a, b = t.encode("12"), t.encode("34")
  assert t.decode(a + [endoftext] + b) == "12" and t.decode(a + [im_end] + b) == "12"
  assert t.render_example("q", "r")[1][-1] == im_end


def test_generation_config_adds_stop_ids(tok_dir, tmp_path):
  shutil.copytree(tok_dir, tmp_path / "ckpt")
  other = 5  # any id: generation_config.json may list ids that are not special tokens
  with open(tmp_path / "ckpt" / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [2, other], "do_sample": True}, f)
  t = hf_tokenizer.HFTokenizer.load(tmp_path / "ckpt")
  assert t.stop_ids == (t.eos_id, other)
  assert t.decode(t.encode("12") + [other] + t.encode("34")) == "12"

  with open(tmp_path / "ckpt" / "generation_config.json", "w") as f:
    f.write('{"eos_token_id": "two"}')
  with pytest.raises(ValueError, match="generation_config.json.*eos_token_id"):
    hf_tokenizer.HFTokenizer.load(tmp_path / "ckpt")


def test_without_chat_template(tok_dir, tmp_path):
  t = hf_tokenizer.HFTokenizer.load(tok_dir, use_chat_template=False,
                                    instruction="Q: {question}")
  assert not t.uses_chat_template
  assert t.prompt_text("1+1?") == tokenizer_lib.PROMPT_TEMPLATE.format(question="Q: 1+1?")
  assert t.render_prompt("1+1?") == t.encode("User: Q: 1+1?\nAssistant:")  # no bos token

  plain = hf_tokenizer.train_bpe(TEXTS, tmp_path / "plain", vocab_size=300, chat_template=None)
  assert not plain.uses_chat_template and plain.eos_id == _id(plain, "<|im_end|>")
  with pytest.raises(ValueError, match="no chat template"):
    hf_tokenizer.HFTokenizer.load(tmp_path / "plain", use_chat_template=True)


def test_errors(tok, tok_dir, tmp_path):
  with pytest.raises(ValueError, match="placeholder"):
    hf_tokenizer.HFTokenizer.load(tok_dir, instruction="no question here")
  with pytest.raises(ValueError, match=f"vocab_size {tok.vocab_size}"):
    tok.decode([1, tok.vocab_size + 3])
  with pytest.raises(TypeError, match="str"):
    tok.encode(12)
  with pytest.raises(FileNotFoundError, match="hf download"):
    hf_tokenizer.HFTokenizer.load(tmp_path / "missing")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="empty"):
    hf_tokenizer.HFTokenizer.load(tmp_path / "empty")
  with pytest.raises(ValueError, match="no room"):
    hf_tokenizer.train_bpe(TEXTS, tmp_path / "small", vocab_size=200)


def test_drop_in_for_evaluate(tok):
  """k15.evaluate samples with it: prompts rendered, responses decoded and graded."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from k15 import evaluate  # pylint: disable=g-import-not-at-top
  from k15.data import prompts  # pylint: disable=g-import-not-at-top
  from k15.model import transformer  # pylint: disable=g-import-not-at-top

  # A model vocabulary padded beyond the tokenizer's, as Qwen2.5's is (151936 > 151665).
  cfg = transformer.ModelConfig(vocab_size=384, embed_dim=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=16, mlp_dim=64, qkv_bias=True)
  model = transformer.Transformer(cfg, rngs=nnx.Rngs(0))
  problems = [prompts.PromptRecord(id=str(i), prompt=f"What is {i} + 1?", answer=str(i + 1),
                                   domain="math") for i in range(3)]
  seen = []

  def grade(problem, text):
    seen.append(text)
    return float(text.strip() == problem.answer)

  r = evaluate.evaluate(model, problems, tokenizer=tok, grade_fn=grade, num_samples=2,
                        temperature=1.0, max_new_tokens=8, batch_size=2, progress=False)
  assert r["n"] == 3 and r["num_samples"] == 2
  # Only responses the model ended are graded (k15.rewards.finish); evaluation runs no repeat
  # detection, so the others are exactly the ones cut at the limit.
  assert len(seen) == round(6 * (1 - r["truncated"]))
  # A random model samples ids past the tokenizer's vocabulary too; they are dropped, not decoded.
  assert all(isinstance(t, str) for t in seen) and 0 < r["mean_tokens"] <= 8
