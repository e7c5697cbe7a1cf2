"""Which responses have a final answer: the one rule RL rewards, evaluation and long2short share.

A response has a final answer only when the model ended it, with a stop token (finish reason
EOS). A response cut at its token limit (LENGTH) or stopped by repeat detection (REPEAT) scores
0, whatever \\boxed{} it closed before the cut:
- the graders take the LAST \\boxed{} as the answer, and in a response that did not end, the last
  box so far is not known to be the last (the model may have been about to revise it);
- crediting it would reward a policy that writes an answer and then never stops, and teach
  long2short's SFT and DPO data not to stop.
Unfinished partial rollouts (BUDGET) are not graded at all until they finish.

Without stop ids (`stops=False`, as in tests of the RL loop on toy rewards) a response cannot end
itself, so reaching the limit is how every response ends and counts as ending.
"""

from __future__ import annotations

import numpy as np

from k15.sampling import sampler


def has_final_answer(finish_reason, *, stops: bool = True):
  """True where a response with this finish reason (an int or an array of them) is graded."""
  reason = np.asarray(finish_reason)
  ended = reason == int(sampler.FinishReason.EOS)
  if not stops:
    ended |= reason == int(sampler.FinishReason.LENGTH)
  return bool(ended) if ended.ndim == 0 else ended


def final_score(score, finish_reason, *, stops: bool = True) -> np.ndarray:
  """score where the response has a final answer, else 0 (arrays broadcast), float32."""
  return np.where(has_final_answer(finish_reason, stops=stops), score, 0.0).astype(np.float32)
