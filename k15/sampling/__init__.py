"""k15.sampling: the jitted KV-cache sampler and partial rollouts (k1.5 §2.6).

  from k15 import sampling
  res = sampling.generate(model, prompts, max_new_tokens=256, eos_id=tok.eos_id, num_samples=8)
  finished, buffer = sampling.rollout(model, [(pid, tokens), ...], num_samples=8, ...)
"""

from k15.sampling.rollout import ReplayBuffer, SamplingInterrupted, Trajectory, rollout
from k15.sampling.sampler import (FinishReason, SampleResult, bucket_length, compiled_programs,
                                  filter_logits, generate, repeat_detected)

__all__ = [
    "FinishReason", "ReplayBuffer", "SampleResult", "SamplingInterrupted", "Trajectory",
    "bucket_length", "compiled_programs", "filter_logits", "generate", "repeat_detected", "rollout",
]
