"""Text in, responses out: the one sampling front end over `k15.sampling.generate`.

Evaluation, curation, long2short and the notebooks ask the same thing of a model: k responses
to each of many questions, as ids and text, with why each ended. `sample_text` does it in
batches of a fixed shape (the last batch is filled up with copies of its last question, whose
rows are dropped), so the sampler compiles once per call site, not once per batch size.

    for i, prompt, responses in text.sample_text(model, tok, questions, num_samples=8,
                                                 batch_size=64, max_new_tokens=256, seed=0):
      ...  # responses[j].ids, .text, .finish_reason
    texts = text.TextSampler(model, tok, max_new_tokens=256).sample(questions, n=8)

Seeds: sample j of question i draws from row seed i * num_samples + j under `seed`, so a
response does not depend on the batch size or on the other questions of its batch.
`batch_seeds=True` is the older rule of curation (seed + the batch's first index, rows counted
within the batch, and a last batch of its own size): the default tiny run curates with it, and
switching would change what it draws.

Stop ids come from the tokenizer (`k15.tokenizer.stop_ids`); ids past the tokenizer's
vocabulary (a model may pad its embedding table) are dropped before decoding, as they have no
text. A forced `prefix` opens every response: its tokens are appended to the prompt, and its
text starts each response's text (its ids are not in `Response.ids`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from k15 import metrics as metrics_lib
from k15 import tokenizer as tokenizer_lib
from k15.sampling import sampler


@dataclasses.dataclass(frozen=True)
class Response:
  """One sampled response: its ids (eos included when it ended there), text and finish reason."""
  ids: np.ndarray
  text: str
  finish_reason: int  # a k15.sampling.FinishReason


def decode(tokenizer: Any, ids: np.ndarray) -> str:
  """The text of response ids, without ids past the tokenizer's vocabulary (they have none)."""
  ids = np.asarray(ids)
  vocab = getattr(tokenizer, "vocab_size", None)
  return tokenizer.decode(ids if vocab is None else ids[ids < vocab])


def sample_text(model: Any, tokenizer: Any, questions: Sequence[str], *, num_samples: int,
                batch_size: int, max_new_tokens: int, seed: int = 0, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, prefix: str = "",
                batch_seeds: bool = False, progress: bool = False,
                ) -> Iterator[tuple[int, list[int], list[Response]]]:
  """Yields (index, prompt ids, its `num_samples` responses) for each question, in order.

  tokenizer: renders a question with its chat template (`render_prompt`), encodes the prefix,
    decodes responses; its stop ids end a response.
  prefix: text forced as the start of every response (e.g. "\\boxed{" for an answer without
    reasoning); the prompt ids yielded include its tokens.
  batch_seeds: the older seeding rule (module docstring); False gives per-row seeds that do
    not depend on the batch.
  """
  k = num_samples
  if k < 1 or batch_size < 1:
    raise ValueError(f"num_samples={k} and batch_size={batch_size} must be >= 1")
  if not questions:
    return
  forced = list(tokenizer.encode(prefix)) if prefix else []
  full = min(batch_size, len(questions))
  bar = metrics_lib.progress(len(questions), desc=f"sample x{k}", unit="prompts",
                             enabled=None if progress else False)
  for start in range(0, len(questions), batch_size):
    chunk = questions[start:start + batch_size]
    prompts = [list(tokenizer.render_prompt(q)) + forced for q in chunk]
    if batch_seeds:
      call_seed, row_seeds = seed + start, np.arange(len(prompts) * k)
    else:
      # Fixed shape: the last batch is filled up with copies of its last prompt (rows dropped).
      prompts += [prompts[-1]] * (full - len(prompts))
      call_seed, row_seeds = seed, np.arange(start * k, (start + len(prompts)) * k)
    result = sampler.generate(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=call_seed, eos_id=tokenizer_lib.stop_ids(tokenizer), num_samples=k,
        pad_id=tokenizer.pad_id, row_seeds=row_seeds)
    for i in range(len(chunk)):
      responses = []
      for r in range(i * k, (i + 1) * k):  # prompt-major rows
        ids = np.asarray(result.tokens[r, :int(result.lengths[r])])
        responses.append(Response(ids=ids, text=prefix + decode(tokenizer, ids),
                                  finish_reason=int(result.finish_reason[r])))
      yield start + i, list(prompts[i]), responses
    bar.update(len(chunk))
  bar.close()


@dataclasses.dataclass(frozen=True)
class TextSampler:
  """A model and tokenizer with sampling defaults; `sample` is the callable curation takes
  (k15.data.prompts.curate: n response texts per question)."""
  model: Any
  tokenizer: Any
  max_new_tokens: int
  seed: int = 0
  batch_size: int = 64
  batch_seeds: bool = False  # the older seeding rule (module docstring)
  progress: bool = True

  def sample(self, questions: Sequence[str], n: int, temperature: float = 1.0, *,
             prefix: str = "", max_new_tokens: int | None = None) -> list[list[str]]:
    """n response texts per question; `prefix` is forced as the start of each response."""
    return [[r.text for r in responses] for _, _, responses in sample_text(
        self.model, self.tokenizer, questions, num_samples=n, batch_size=self.batch_size,
        max_new_tokens=max_new_tokens or self.max_new_tokens, seed=self.seed,
        temperature=temperature, prefix=prefix, batch_seeds=self.batch_seeds,
        progress=self.progress)]
