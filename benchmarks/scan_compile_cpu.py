r"""Compile time of the 1.5B config's train step on XLA:CPU against depth, layers scanned or looped.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python -m benchmarks.scan_compile_cpu [--layers=4,16]

The TPU figure is benchmarks/scan_compile.py (libtpu's compile-only devices); this one needs
nothing but jax and compiles the same train step (`update.make_train_step`, chunked log-probs,
remat 'full', 2-way FSDP x 4-way tensor over 8 CPU devices, 8 rows x 2048 tokens) on XLA:CPU
with flash attention in place of the TPU-only splash kernel. Nothing is allocated: parameters,
optimizer state and batch are abstract. Prints one JSON line per (depth, scan) with the lowering
and the compile time.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
from flax import nnx

from configs import qwen25_1p5b_v5e
from k15 import config as k15_config
from k15 import parallel, update
from k15.model import transformer


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", default="4,16")
  args = ap.parse_args()
  base = qwen25_1p5b_v5e.get_config().model.to_dict()
  base.update(attention_impl="flash")  # splash is TPU-only
  rows, length = 8, 2048
  for layers in [int(x) for x in args.layers.split(",")]:
    for scan in (True, False):
      cfg = transformer.ModelConfig(**dict(base, num_layers=layers, scan_layers=scan))
      with parallel.use_mesh(parallel.make_mesh({"fsdp": 2, "tensor": 4})):
        abstract = nnx.eval_shape(lambda cfg=cfg: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(abstract)
        optimizer = update.make_optimizer(k15_config.optimizer_block())
        opt = jax.eval_shape(optimizer.init, params)

        def loss_fn(model, batch):
          return -jnp.mean(update.token_logprobs(model, batch["tokens"])), {}

        step = update.make_train_step(
            graphdef, loss_fn, optimizer, param_shardings=parallel.state_shardings(params),
            batch_shardings={"tokens": parallel.sharding(("batch", None), (rows, length))})
        t0 = time.perf_counter()
        lowered = step.lower(params, opt, {"tokens": jax.ShapeDtypeStruct((rows, length),
                                                                          jnp.int32)})
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
      print(json.dumps({"layers": layers, "scan": scan, "lower_s": round(t1 - t0, 1),
                        "compile_s": round(t2 - t1, 1)}), flush=True)


if __name__ == "__main__":
  main()
