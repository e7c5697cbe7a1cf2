r"""A Hugging Face tokenizer behind k15's tokenizer interface, for real checkpoints (Qwen2.5, ...).

The sampler, the RL trainer, evaluation and SFT reach a tokenizer only through a few members,
which k15.tokenizer.Tokenizer (SentencePiece, the synthetic tasks) defines and `HFTokenizer`
implements over `transformers.AutoTokenizer`:

  render_prompt(question)            prompt ids; the policy continues from here
  render_example(question, response) (prompt ids, response ids + eos), for SFT
  encode(text, add_bos, add_eos), decode(ids)
  eos_id, pad_id, bos_id, vocab_size

The prompt. `instruction` wraps the question (its "{question}" is replaced), e.g.
`BOXED_INSTRUCTION`, which asks for the final answer in \boxed{} as k15.rewards.math grades it.
With a chat template (Qwen2.5 ships one with both its base and Instruct checkpoints) the wrapped
question is one user turn, optionally after a system turn, rendered with
`add_generation_prompt=True`; without one it goes into k15.tokenizer.PROMPT_TEMPLATE
("User: ...\nAssistant:"), after the bos token if the tokenizer has one.

Stop tokens. A chat model ends its turn with an end-of-turn token (Qwen2.5: <|im_end|>), which
need not be the tokenizer's eos (Qwen2.5 base: <|endoftext|>). `eos_id` is the end-of-turn
token the chat template writes after an assistant message (found by rendering one), else the
tokenizer's eos. `stop_ids` adds the tokenizer's eos and the eos ids of the checkpoint's
generation_config.json; the sampler and the RL trainer take that tuple as `eos_id`, and
`decode` cuts the text at the first of them.

`train_bpe` trains a small byte-level BPE tokenizer with a ChatML template, offline: what the
Qwen2.5 notebook's CI run and the tests use in place of a downloaded one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from k15 import tokenizer as tokenizer_lib

# The phrasing Qwen2.5-Math and most open RL recipes use for boxed final answers.
BOXED_INSTRUCTION = ("{question}\nPlease reason step by step, and put your final answer "
                     "within \\boxed{}.")

# A minimal ChatML template (the turn format of Qwen2.5): <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

# Text that no tokenizer special-cases, to find where a chat template puts the response.
_MARKER = "K15_RESPONSE_MARKER_7f3a"


def _generation_eos_ids(path: str) -> tuple[int, ...]:
  """The eos_token_id (an int or a list) of `path`/generation_config.json, if there is one."""
  file = os.path.join(path, "generation_config.json")
  if not os.path.isfile(file):
    return ()
  with open(file, encoding="utf-8") as f:
    try:
      eos = json.load(f).get("eos_token_id")
    except ValueError as e:
      raise ValueError(f"{file}: not valid JSON: {e}") from None
  if eos is None:
    return ()
  eos = [eos] if isinstance(eos, int) else eos
  if not isinstance(eos, list) or not all(isinstance(i, int) for i in eos):
    raise ValueError(f"{file}: eos_token_id must be an int or a list of ints, got {eos!r}")
  return tuple(eos)


class HFTokenizer:
  """k15's tokenizer interface (see the module docstring) over a transformers tokenizer."""

  def __init__(self, tokenizer: Any, *, instruction: str = "{question}",
               system: str | None = None, use_chat_template: bool | None = None,
               extra_stop_ids: Sequence[int] = (), path: str | None = None):
    """Wraps `tokenizer` (a transformers PreTrainedTokenizer[Fast]).

    Args:
      tokenizer: the Hugging Face tokenizer.
      instruction: the user message; "{question}" is replaced by the question.
      system: a system message before the user turn (chat template only); None: none, so the
        template's own default applies (Qwen2.5 adds one).
      use_chat_template: None: use the tokenizer's chat template when it has one.
      extra_stop_ids: more ids that end a response (e.g. generation_config.json's eos ids).
      path: where the tokenizer was loaded from, for messages.
    """
    if "{question}" not in instruction:
      raise ValueError(f"instruction {instruction!r} has no '{{question}}' placeholder")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
      raise ValueError(f"use_chat_template=True, but the tokenizer {path or ''} has no chat "
                       "template")
    self.hf = tokenizer
    self.path = path
    self.instruction, self.system = instruction, system
    self.uses_chat_template = has_template if use_chat_template is None else use_chat_template
    self._vocab_size = len(tokenizer)

    eos = self._end_of_turn_id() if self.uses_chat_template else None
    if eos is None:
      eos = tokenizer.eos_token_id
    if eos is None:
      raise ValueError(f"the tokenizer {path or ''} has no eos token and its chat template no "
                       "end-of-turn token: k15 needs one to end responses")
    stops = [eos, tokenizer.eos_token_id, *extra_stop_ids]
    self._stop_ids = tuple(dict.fromkeys(int(i) for i in stops if i is not None))
    bad = [i for i in self._stop_ids if not 0 <= i < self._vocab_size]
    if bad:
      raise ValueError(f"stop token ids {bad} are outside the tokenizer's vocabulary "
                       f"[0, {self._vocab_size})")
    self._eos_id = int(eos)

  @classmethod
  def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> HFTokenizer:
    """AutoTokenizer.from_pretrained(path), plus generation_config.json's eos ids as stops.

    `path` is a local checkpoint directory; nothing is downloaded. kwargs go to __init__.
    """
    import transformers  # pylint: disable=g-import-not-at-top  (the [hf] extra)
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer directory not found: {path} (download the checkpoint "
                              "first, e.g. `hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir "
                              f"{path}`)")
    try:
      tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"{path}: no Hugging Face tokenizer could be loaded: {e}") from None
    extra = tuple(kwargs.pop("extra_stop_ids", ())) + _generation_eos_ids(path)
    return cls(tok, extra_stop_ids=extra, path=path, **kwargs)

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the wrapped tokenizer (tokenizer.json, its config and chat template) to `path`."""
    self.hf.save_pretrained(os.fspath(path))

  # --- ids -------------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer can decode; a model's embedding table may be larger (Qwen2.5 pads)."""
    return self._vocab_size

  @property
  def eos_id(self) -> int:
    """The token that ends a response: end of turn with a chat template, else the eos."""
    return self._eos_id

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Every id that ends a response, eos_id first; pass it as the sampler's `eos_id`."""
    return self._stop_ids

  @property
  def pad_id(self) -> int:
    pad = self.hf.pad_token_id
    return self._eos_id if pad is None else int(pad)

  @property
  def bos_id(self) -> int:
    """-1 when the tokenizer has no bos token (Qwen2.5), as SentencePiece reports it."""
    bos = self.hf.bos_token_id
    return -1 if bos is None else int(bos)

  # --- text ------------------------------------------------------------------------------------

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text`; special-token strings in it (e.g. '<|im_end|>') become their ids."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str, got {type(text).__name__}")
    ids = list(self.hf.encode(text, add_special_tokens=False)) if text else []
    if add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` up to the first stop id, special tokens dropped. Lists and arrays."""
    ids = np.asarray(ids).reshape(-1).tolist()
    cut = [ids.index(s) for s in self._stop_ids if s in ids]
    if cut:
      ids = ids[:min(cut)]
    bad = [i for i in ids if not 0 <= i < self._vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} out of range for the tokenizer's vocab_size "
                       f"{self._vocab_size} (drop ids >= vocab_size that a padded model "
                       "vocabulary can sample)")
    return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

  def _messages(self, question: str) -> list[dict[str, str]]:
    user = self.instruction.replace("{question}", question)
    messages = [{"role": "user", "content": user}]
    if self.system is not None:
      messages.insert(0, {"role": "system", "content": self.system})
    return messages

  def prompt_text(self, question: str) -> str:
    """The prompt as text: what `render_prompt` encodes."""
    if self.uses_chat_template:
      return self.hf.apply_chat_template(self._messages(question), tokenize=False,
                                         add_generation_prompt=True)
    user = self.instruction.replace("{question}", question)
    return tokenizer_lib.PROMPT_TEMPLATE.format(question=user)

  def render_prompt(self, question: str) -> list[int]:
    """Prompt ids of `question` (see the module docstring); the policy continues from here."""
    # A chat template writes its own bos (Llama 3) when it wants one.
    return self.encode(self.prompt_text(question), add_bos=not self.uses_chat_template)

  def render_example(self, question: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + eos_id) for SFT; the loss covers only the response ids."""
    return self.render_prompt(question), self.encode(response, add_eos=True)

  def _end_of_turn_id(self) -> int | None:
    """The added token the chat template writes right after an assistant message, if any."""
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _MARKER}]
    try:
      text = self.hf.apply_chat_template(messages, tokenize=False)
    except Exception:  # pylint: disable=broad-except  (templates raise what they like)
      return None
    if _MARKER not in text:
      return None
    tail = text[text.rindex(_MARKER) + len(_MARKER):]
    ids = self.hf.encode(tail, add_special_tokens=False) if tail else []
    added = set(self.hf.get_added_vocab().values())
    return int(ids[0]) if ids and ids[0] in added else None


def train_bpe(texts: Iterable[str], directory: str | os.PathLike[str], vocab_size: int, *,
              chat_template: str | None = CHATML_TEMPLATE, **kwargs: Any) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer with ChatML special tokens and saves it to `directory`.

  Offline and in well under a second for a few hundred texts. Special ids: <|endoftext|> = 0
  (pad), <|im_start|> = 1, <|im_end|> = 2 (eos and end of turn); the 256 byte symbols follow,
  so any text encodes. kwargs go to HFTokenizer (e.g. instruction=BOXED_INSTRUCTION).

  Returns:
    HFTokenizer.load(directory): exactly what a later run reads back.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top  (comes with transformers)
  import transformers  # pylint: disable=g-import-not-at-top
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  minimum = len(specials) + 256
  if vocab_size <= minimum:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for merges: the special tokens "
                     f"and the 256 byte symbols take {minimum}")
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("train_bpe needs at least one non-empty text")
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(texts, trainer)
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>"], chat_template=chat_template)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  tok.save_pretrained(directory)
  return HFTokenizer.load(directory, **kwargs)
