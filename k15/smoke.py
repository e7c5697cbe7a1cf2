"""Mode `smoke`: build the model sharded on the mesh, run one jitted forward pass, report.

The quickest check that an installation, a mesh and a config fit together, on a laptop or on
every host of a pod slice.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k15 import parallel, storage
from k15.model import build


def run(config, workdir: str) -> dict:
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.sharding_rules):
    t0 = time.perf_counter()
    model = build.build_model(config, mesh)
    jax.block_until_ready(nnx.state(model))
    t_init = time.perf_counter() - t0

    B, T = config.smoke.batch, config.smoke.length
    cfg = model.cfg
    tokens = jax.random.randint(jax.random.key(config.seed), (B, T), 0, cfg.vocab_size,
                                jnp.int32)
    tokens = jax.device_put(tokens, parallel.sharding(("batch", "length"), tokens.shape))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    t0 = time.perf_counter()
    logits = forward(state, tokens).block_until_ready()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = forward(state, tokens).block_until_ready()
    t_step = time.perf_counter() - t0

    # Next-token loss of a random model is about log(vocab): a sanity check on the numbers.
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
    report = {
        "params": cfg.num_params(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "backend": jax.default_backend(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "logits_shape": list(logits.shape),
        "finite": bool(jnp.isfinite(logits).all()),
        "nll": float(nll),
        "log_vocab": float(np.log(cfg.vocab_size)),
        "init_s": round(t_init, 3),
        "compile_s": round(t_compile, 3),
        "forward_s": round(t_step, 4),
        "tokens_per_s": round(B * T / t_step, 1),
    }
  if jax.process_index() == 0:
    print("k15 smoke run")
    for k, v in report.items():
      print(f"  {k:13s} {v}")
    if workdir:
      storage.write_json(os.path.join(workdir, "smoke.json"), report)
  return report
