"""The policy a run starts from: a Hugging Face checkpoint (`config.model_path`) or a random
model of `config.model`, created directly sharded on the mesh."""

from __future__ import annotations

from flax import nnx

from k15 import parallel
from k15.model import hf, transformer


def build_model(config, mesh) -> transformer.Transformer:
  """The policy: from `config.model_path` (a Hugging Face checkpoint) if set, else random."""
  model_path = config.get("model_path", "")
  if model_path:
    # The keys that are ours, not the checkpoint's: how the model computes, not what it is.
    overrides = {k: v for k, v in config.model.items()
                 if k in ("dtype", "attention_impl", "attention_block_size", "remat",
                          "logits_chunk", "scan_layers", "moe_dispatch")}
    return hf.load(model_path, transformer.to_dtype(config.model.param_dtype), mesh=mesh,
                   rules=config.sharding_rules, config_overrides=overrides)
  cfg = transformer.ModelConfig.from_config(config.model)
  return parallel.create_sharded(
      lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(config.seed)), mesh,
      config.sharding_rules)
