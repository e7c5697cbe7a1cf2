"""Long2short (§2.4, Fig. 7): the long-CoT RL model's accuracy at a shorter chain of thought.

The paper's four methods (five variants, as in its Fig. 7) turn the long-CoT RL model ("long")
into one that answers in fewer tokens; each is evaluated on the held-out problems for accuracy
and mean response tokens:

  merge         weighted average of the long and a short-CoT model       (`merge.merge`)
  merge_rs      shortest rejection sampling (below) from the merged model
  shortest_rs   n responses per prompt, the shortest correct one kept, SFT on them
                                                                   (`rejection.select_shortest`)
  dpo           positive = the shortest correct response; negatives = the longer wrong ones
                and the correct ones over 1.5x its length; DPO against the frozen starting
                model                                  (`dpo.build_dpo_pairs`, `dpo.train_dpo`)
  rl            RL from the long model (or, with `rl.init`, another method's model) with the
                length penalty on from the first iteration and a smaller rollout budget
                                                                       (`rl.long2short_rl`)

`driver.run` is mode `long2short`: every method from a finished pipeline's workdir, at equal
sampled tokens (`long2short.token_budget`), in one table and plot.
"""

from k15.long2short.dpo import build_dpo_pairs, dpo_loss, train_dpo
from k15.long2short.driver import MethodResult, format_table, run, token_efficiency
from k15.long2short.merge import merge, merge_checkpoints
from k15.long2short.rejection import (Group, sample_groups, select_shortest,
                                      shortest_correct, shortest_rejection_sampling)
from k15.long2short.rl import long2short_config, long2short_rl

__all__ = [
    "Group", "MethodResult", "build_dpo_pairs", "dpo_loss", "format_table",
    "long2short_config", "long2short_rl", "merge", "merge_checkpoints", "run",
    "sample_groups", "select_shortest", "shortest_correct", "shortest_rejection_sampling",
    "token_efficiency", "train_dpo",
]
