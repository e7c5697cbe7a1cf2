"""Tests for k15.tokenizer: training, round trips, special ids, the chat template, errors."""

import time

import numpy as np
import pytest

from k15 import tokenizer
from k15.data import tasks


def _task_texts(n_per_family=150):
  problems = (tasks.generate("arithmetic", n_per_family, seed=1, difficulties=[1, 2, 3, 4, 5],
                             ops=("+", "-", "*"))
              + tasks.generate("countdown", n_per_family, seed=1, difficulties=[3, 4, 5]))
  return problems, tasks.training_texts(problems)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  problems, texts = _task_texts()
  tok = tokenizer.train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=512)
  return tok, problems


@pytest.mark.parametrize("text", [
    "What is 4738 + 925?",
    "8+5+0=13, carry 1, so far 3\ncheck: 5663-925=4738 ok\n\\boxed{5663}",
    "\\boxed{\\frac{1}{2}} and (3*4)/2^2 = 3",
    "naïve café — 数学 😀 Ωμέγα",  # unseen in training: byte fallback
    "two  spaces,\ttab and trailing space ",
    "",
])
def test_round_trip(trained, text):
  tok, _ = trained
  ids = tok.encode(text)
  assert tokenizer.UNK_ID not in ids
  assert tok.decode(ids) == text


def test_digits_are_single_tokens_and_boxed_is_one_piece(trained):
  tok, _ = trained
  pieces = [tok.id_to_piece(i) for i in tok.encode("12345+67890=80235")]
  assert [p for p in pieces if p.strip("▁")] == list("12345+67890=80235")
  boxed = tok.encode("\\boxed{42}")
  assert [tok.id_to_piece(i) for i in boxed if tok.id_to_piece(i) != "▁"] == [
      "\\boxed{", "4", "2", "}"]
  for op in "+-*/=()^":
    pieces = [tok.id_to_piece(i) for i in tok.encode(f"1{op}2")]
    assert pieces[-3:] == ["1", op, "2"]  # a piece of its own, not a byte-fallback <0x..>


def test_special_ids(trained):
  tok, _ = trained
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "</s>", "<s>", "<unk>"]
  assert 260 < tok.vocab_size <= 512
  ids = tok.encode("7", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tokenizer.BOS_ID not in tok.encode("7")


def test_decode_stops_at_eos_and_strips_pad(trained):
  tok, _ = trained
  ids = tok.encode("\\boxed{12}")
  padded = np.array([tok.bos_id] + ids + [tok.eos_id] + tok.encode("junk") + [tok.pad_id] * 3)
  assert tok.decode(padded) == "\\boxed{12}"
  assert tok.decode(ids + [tok.pad_id, tok.pad_id]) == "\\boxed{12}"
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size + 5])


def test_chat_template(trained):
  tok, _ = trained
  prompt_ids, response_ids = tok.render_example("What is 3 + 4?", "\\boxed{7}")
  assert prompt_ids == tok.render_prompt("What is 3 + 4?")
  assert prompt_ids[0] == tok.bos_id and tok.eos_id not in prompt_ids
  assert response_ids[-1] == tok.eos_id
  assert tok.decode(prompt_ids + response_ids) == "User: What is 3 + 4?\nAssistant: \\boxed{7}"
  assert tok.decode(response_ids) == "\\boxed{7}"


def test_train_speed_and_load(tmp_path):
  _, texts = _task_texts(n_per_family=1500)  # 6000 texts
  start = time.perf_counter()
  tok = tokenizer.train_tokenizer(texts, tmp_path / "small", vocab_size=400, model_type="unigram")
  assert time.perf_counter() - start < 5
  assert tok.path == str(tmp_path / "small.model")
  loaded = tokenizer.Tokenizer.load(tmp_path / "small.model")
  text = texts[3]
  assert loaded.encode(text) == tok.encode(text)
  assert tokenizer.Tokenizer.from_proto(tok.model_proto).encode(text) == tok.encode(text)


def test_load_from_directory_and_errors(trained, tmp_path):
  tok, _ = trained
  assert tokenizer.Tokenizer.load(tok.path.rsplit("/", 1)[0]).vocab_size == tok.vocab_size
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.model")):
    tokenizer.Tokenizer.load(tmp_path / "nope.model")
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model"):
    tokenizer.Tokenizer.load(tmp_path / "bad.model")
  with pytest.raises(ValueError, match="vocab_size=100"):
    tokenizer.train_tokenizer(["a b c"], tmp_path / "x", vocab_size=100)
  with pytest.raises(ValueError, match="model_type"):
    tokenizer.train_tokenizer(["a b c"], tmp_path / "x", vocab_size=400, model_type="word")


def test_approx_tokens_tracks_real_counts(trained):
  # tasks.approx_tokens enforces max_cot_tokens without a tokenizer; it must stay close.
  tok, problems = trained
  for p in problems[::7]:
    real, approx = len(tok.encode(p.long_cot)), tasks.approx_tokens(p.long_cot)
    assert 0.7 * real <= approx <= 1.3 * real, (p.long_cot, real, approx)


def test_stop_ids(trained):
  tok, _ = trained
  assert tok.stop_ids == (tok.eos_id,)
  assert tokenizer.stop_ids(tok) == (tok.eos_id,)

  class ChatTokenizer:  # e.g. k15.hf_tokenizer.HFTokenizer: end of turn first, then eos
    eos_id, stop_ids = 7, [7, 3]

  class EosOnly:  # any object with an eos_id is enough for the sampler calls
    eos_id = 5

  assert tokenizer.stop_ids(ChatTokenizer()) == (7, 3)
  assert tokenizer.stop_ids(EosOnly()) == (5,)
