"""RL from a model on prompt records of the synthetic tasks, rewarded by their grader: the stage
that the tiny pipeline, the studies (k15.study) and long2short RL share."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from flax import nnx

from k15.data import prompts as prompts_lib
from k15.data import tasks
from k15.model import transformer
from k15.rl import trainer as trainer_lib
from k15.sampling import text


def rl_stage(config: Any, model: transformer.Transformer,
             records: Sequence[prompts_lib.PromptRecord], tok: Any, mesh: Any, workdir: str, *,
             stop_when: Callable[[dict[str, float]], bool] | None = None,
             on_rewards: Callable[[Sequence[int], Sequence[np.ndarray], np.ndarray], None]
             | None = None,
             after_iteration: Callable[[Any], dict[str, float] | None] | None = None,
             ) -> transformer.Transformer:
  """RL from `model` on the records (config.rl); returns the final policy.

  Resumes from `<workdir>/checkpoints`; stop_when and after_iteration: see `RLTrainer.train`
  (k15.study's length study logs response length per difficulty through after_iteration);
  on_rewards(ids, responses, rewards), if given, sees each iteration's graded responses. A
  preempted run exits (its checkpoint saved) so that no later stage starts from a half-trained
  policy.
  """
  records = list(records)
  prompts = [trainer_lib.Prompt(tokens=tok.render_prompt(r.prompt), difficulty=r.difficulty,
                                pass_rate=r.pass_rate) for r in records]

  def reward_fn(ids, responses):
    rewards = np.array([tasks.grade(records[i], text.decode(tok, r))
                        for i, r in zip(ids, responses)], np.float32)
    if on_rewards is not None:
      on_rewards(ids, responses, rewards)
    return rewards

  trainer = trainer_lib.RLTrainer(config, model, prompts, reward_fn, mesh=mesh, workdir=workdir,
                                  eos_id=tok.stop_ids, pad_id=tok.pad_id)
  trainer.train(stop_when=stop_when, after_iteration=after_iteration)
  if trainer.preempted:
    raise SystemExit("preempted during RL (checkpoint saved); rerun the same command to resume")
  return nnx.merge(trainer.graphdef, trainer.params)
