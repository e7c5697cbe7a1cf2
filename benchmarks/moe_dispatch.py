r"""Mixture-of-experts dispatch on this machine: the dense one-hot form vs sorted rows through
`jax.lax.ragged_dot` (`ModelConfig.moe_dispatch`), side by side.

One MoE layer (k15.model.transformer.MoE, float32) at a few shapes, each a (tokens, experts,
top-k) case: a decode step (B rows x 1 token), and prefill / training chunks. For each dispatch the
jitted forward and forward+backward (gradients w.r.t. the layer's parameters and input) are
compiled; time is the best of --repeats runs after one warm-up (best, not mean, because dev
machines are shared). The ratio column is dense time / ragged time (> 1: ragged is faster).

Run by hand from the repository root (not part of the tests):

  JAX_PLATFORMS=cpu python -m benchmarks.moe_dispatch
  JAX_PLATFORMS=cpu python -m benchmarks.moe_dispatch --embed=512 --moe_mlp=256 --repeats=10
  python -m benchmarks.moe_dispatch --tpu=v5p:2x2x1   # compile only, see below (another
                                                      # process holding libtpu: set
                                                      # ALLOW_MULTIPLE_LIBTPU_LOAD=1)

--tpu=TOPOLOGY compiles instead (no TPU needed: libtpu's compile-only devices through
`jax.experimental.topologies`) a training step of a small bf16 MoE model, both dispatches, with
the experts on an 'expert' mesh axis over all the topology's chips, and prints each program's
scratch memory, FLOPs and collectives as XLA:TPU planned them.

The dense form runs every expert on every token (E / k times the useful FLOPs) as plain einsums;
the ragged form runs only the chosen experts' rows, at the cost of a sort, a gather and a
scatter. Which wins depends on E / k and on how the backend lowers ragged_dot.
"""

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.attention import _best_time  # best of n runs after a warm-up
from k15 import parallel
from k15.model import transformer

# (name, batch rows, tokens per row, experts, top-k)
CASES = (
    ("decode 32x1, E8 k2", 32, 1, 8, 2),
    ("decode 32x1, E64 k8", 32, 1, 64, 8),
    ("prefill 4x128, E8 k2", 4, 128, 8, 2),
    ("prefill 4x128, E64 k8", 4, 128, 64, 8),
)


def _programs(layer):
  graphdef, state = nnx.split(layer)

  def out_sum(s, x):
    y, _, _ = nnx.merge(graphdef, s)(x)
    return jnp.sum(y)

  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  fwd_bwd = jax.jit(jax.grad(out_sum, argnums=(0, 1)))
  return state, fwd, fwd_bwd


def _compiled_train_step(cfg, mesh):
  """The gradient of mean logits + load-balancing loss, lowered and compiled for `mesh`."""
  with parallel.use_mesh(mesh):
    abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda v, sh: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh),
                         state, parallel.state_shardings(state))
    tokens = jax.ShapeDtypeStruct((8, 256), jnp.int32,
                                  sharding=parallel.sharding(("batch", "length"), (8, 256)))

    def loss(s, t):
      logits, routing = nnx.merge(graphdef, s)(t, return_routing=True)
      return logits.mean() + transformer.load_balancing_loss(routing["router_logits"],
                                                             cfg.experts_per_token)

    return jax.jit(jax.grad(loss)).lower(state, tokens).compile()


def _compile_for_tpu(topology: str):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  mesh = parallel.make_mesh({"expert": len(devices)}, devices=devices)
  print(f"{topology}: {len(devices)} x {devices[0].device_kind}, mesh expert={len(devices)}")
  for dispatch in ("dense", "ragged"):
    cfg = transformer.ModelConfig(
        vocab_size=1024, embed_dim=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
        mlp_dim=512, qk_norm=True, num_experts=16, experts_per_token=4, moe_mlp_dim=128,
        moe_dispatch=dispatch, dtype="bfloat16", tie_embeddings=False)
    compiled = _compiled_train_step(cfg, mesh)
    text = compiled.as_text()
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    print(f"  {dispatch:6s} temp {compiled.memory_analysis().temp_size_in_bytes / 2**20:7.1f} MiB"
          f"  {flops / 1e9:8.2f} GFLOP  all-reduce {text.count('all-reduce(')}"
          f"  all-gather {text.count('all-gather(')}  all-to-all {text.count('all-to-all(')}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--embed", type=int, default=256)
  parser.add_argument("--moe_mlp", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tpu", default="", help="a TPU topology, e.g. v5p:2x2x1: compile only")
  args = parser.parse_args()
  if args.tpu:
    _compile_for_tpu(args.tpu)
    return
  print(f"{jax.devices()[0].platform}, D={args.embed}, expert F={args.moe_mlp}, float32; "
        "best of %d, ms" % args.repeats)
  header = (f"{'case':24s} {'fwd dense':>10s} {'fwd ragged':>11s} {'ratio':>6s}   "
            f"{'f+b dense':>10s} {'f+b ragged':>11s} {'ratio':>6s}")
  print(header)
  for name, B, T, E, k in CASES:
    x = jax.random.normal(jax.random.key(1), (B, T, args.embed), jnp.float32)
    times = {}
    for dispatch in ("dense", "ragged"):
      cfg = transformer.ModelConfig(embed_dim=args.embed, num_experts=E, experts_per_token=k,
                                    moe_mlp_dim=args.moe_mlp, moe_dispatch=dispatch)
      state, fwd, fwd_bwd = _programs(transformer.MoE(cfg, rngs=nnx.Rngs(0)))
      times[dispatch] = [1e3 * _best_time(f, (state, x), args.repeats) for f in (fwd, fwd_bwd)]
    (fd, bd), (fr, br) = times["dense"], times["ragged"]
    print(f"{name:24s} {fd:10.2f} {fr:11.2f} {fd / fr:6.2f}   {bd:10.2f} {br:11.2f} "
          f"{bd / br:6.2f}", flush=True)


if __name__ == "__main__":
  main()
