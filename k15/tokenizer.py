"""SentencePiece tokenizer: encode/decode, the chat template, and training a small model.

Any SentencePiece model loads (a Llama-style `tokenizer.model`, say). `train_tokenizer` builds
the small model the synthetic tasks use, in-process and in well under a second for a few
thousand texts. Its special ids are fixed:

  pad = 0, eos = 1, bos = 2, unk = 3

and it is made for arithmetic: digits are always single tokens (`split_digits`, so the model
sees numbers digit by digit), `\\boxed{` and the newline are single pieces, the digits and math
operators `+-*/=()^{}\\` are pieces of their own, normalization is the identity (so spaces and
newlines survive a round trip exactly), and byte fallback makes any text encodable: a character
never seen in training becomes its UTF-8 bytes, never <unk>.

The chat template (module constants below) is the same for SFT, RL and evaluation:

  prompt   = <bos> "User: {question}\\nAssistant:"
  response = "{response}" <eos>

The response is encoded on its own, so its first piece carries SentencePiece's word-start
marker, which decodes as the space after "Assistant:". `render_prompt(q)` equals the prompt half
of `render_example(q, r)` token for token, which is what lets a policy trained on examples be
sampled from prompts.
"""

from __future__ import annotations

import io
import os
from typing import Any, Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from k15 import storage

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
PROMPT_TEMPLATE = "User: {question}\nAssistant:"
MODEL_FILENAME = "tokenizer.model"
DEFAULT_USER_SYMBOLS = ("\\boxed{", "\n")
# Always in the vocabulary, even when the training text lacks some of them.
REQUIRED_CHARS = "0123456789+-*/=()^{}\\"


class Tokenizer:
  """A SentencePiece processor with the k15 special ids and chat template."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
    self._sp = processor
    self.path = path

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a model file, or `<dir>/tokenizer.model` when `path` is a directory."""
    path = os.fspath(path)
    if epath.Path(path).is_dir():
      path = os.path.join(path, MODEL_FILENAME)
    if not epath.Path(path).is_file():
      raise FileNotFoundError(
          f"SentencePiece model not found: {path} (train one with "
          "k15.tokenizer.train_tokenizer, or point at an existing tokenizer.model)")
    try:
      # Read through epath (the file may be remote), parsed from memory.
      processor = spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from None
    return cls(processor, path)

  @classmethod
  def from_proto(cls, model_proto: bytes) -> Tokenizer:
    """Builds a tokenizer from a serialized model (see `model_proto`), e.g. from a checkpoint."""
    return cls(spm.SentencePieceProcessor(model_proto=model_proto))

  @property
  def model_proto(self) -> bytes:
    return self._sp.serialized_model_proto()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id that ends a response (the sampler's `eos_id`); here eos alone."""
    return (self.eos_id,)

  @property
  def pad_id(self) -> int:
    # Llama-style models have no pad piece (-1); they pad with eos, which decode strips too.
    pad = self._sp.pad_id()
    return pad if pad >= 0 else self.eos_id

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    ids = self._sp.encode(text)
    if add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if add_eos and self.eos_id >= 0:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` up to the first eos; pad and bos are dropped. Accepts lists and arrays."""
    ids = np.asarray(ids).reshape(-1).tolist()
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} out of range for vocab_size {self.vocab_size}")
    return self._sp.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def render_prompt(self, question: str) -> list[int]:
    """<bos> "User: {question}\\nAssistant:" as ids; the policy continues from here."""
    return self.encode(PROMPT_TEMPLATE.format(question=question), add_bos=True)

  def render_example(self, question: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + <eos>) for SFT; the loss covers only the response ids."""
    return self.render_prompt(question), self.encode(response, add_eos=True)


def stop_ids(tokenizer: Any) -> tuple[int, ...]:
  """The ids that end a response: `tokenizer.stop_ids`, or (eos_id,) for a tokenizer without."""
  ids = getattr(tokenizer, "stop_ids", None)
  return tuple(ids) if ids is not None else (tokenizer.eos_id,)


def _model_path(model_prefix_or_dir: str | os.PathLike[str]) -> str:
  path = os.fspath(model_prefix_or_dir)
  if path.endswith(os.sep) or epath.Path(path).is_dir():
    return os.path.join(path, MODEL_FILENAME)
  return path if path.endswith(".model") else path + ".model"


def train_tokenizer(texts: Iterable[str], model_prefix_or_dir: str | os.PathLike[str],
                    vocab_size: int, *, model_type: str = "bpe",
                    user_defined_symbols: Sequence[str] = DEFAULT_USER_SYMBOLS,
                    num_threads: int = 1) -> Tokenizer:
  """Trains a SentencePiece model on `texts` and writes it; see the module docstring.

  Args:
    texts: training texts; each may span several lines.
    model_prefix_or_dir: a directory (existing, or ending in '/') gets `tokenizer.model`;
      anything else is a file prefix ('.model' is appended unless present).
    vocab_size: upper bound on the vocabulary, counting the 4 special ids and 256 byte pieces.
      Too little text for that many pieces gives a smaller vocabulary rather than an error;
      read the real size from `Tokenizer.vocab_size`.
    model_type: 'bpe' or 'unigram'.
    user_defined_symbols: strings that are always one piece.
    num_threads: trainer threads.

  Returns:
    The trained tokenizer (its `path` is the written file).
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  minimum = 4 + 256 + len(user_defined_symbols) + len(REQUIRED_CHARS)
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for learned pieces: the special "
                     f"ids, byte pieces, user symbols and required chars take {minimum}")
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_tokenizer needs at least one non-empty text")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        byte_fallback=True, split_digits=True, character_coverage=1.0,
        required_chars=REQUIRED_CHARS, user_defined_symbols=list(user_defined_symbols),
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, max_sentence_length=1 << 16, num_threads=num_threads,
        minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}, "
                     f"model_type={model_type}, {len(texts)} texts): {e}") from None
  path = _model_path(model_prefix_or_dir)
  storage.write_bytes(path, model.getvalue())
  return Tokenizer(spm.SentencePieceProcessor(model_proto=model.getvalue()), path)
