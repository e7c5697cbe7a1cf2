r"""Compiles a config's RL programs for its TPU slice on any machine, and reports memory per chip.

    python -m k15.aot --config=configs/qwen25_1p5b_v5e.py [--topology=v5e-8] [--json=PATH]
        [--config.rl.max_new_tokens=16384 ...]

libtpu's compile-only devices (`jax.experimental.topologies`) stand for the chips of the slice,
so no TPU is needed: `pip install -e .[tpu]` brings libtpu. Every program an RL iteration runs
is compiled at the config's real shapes, with parameters, optimizer state, batches and KV
caches as `jax.ShapeDtypeStruct`s (nothing is allocated, a 7B model included):

  train         the RL train step: the longest length bucket (prompt + rl.max_new_tokens),
                rl.minibatch_groups x k rows in rl.microbatches microbatches, PMD loss with
                the chunked log-probs, Adam update, donated params and optimizer state
  ref_logprobs  the trainer's forward log-prob pass (the reference pass), one microbatch of
                rows at a time as k15.rl.trainer runs it
  prefill       the sampler's prefill: the sequences of one rollout call (continued rows
                included) at the longest prompt bucket, filling their KV cache
  decode        one decode step of all sample rows against the full-length cache (donated)
  decode_paged  one step of continuous batching's decode (k15.sampling.paged): as many slots as
                `decode` has rows, a block pool (donated) holding each slot's full length,
                keys and values read through the Pallas paged-attention kernel; pool and slots
                split over the batch axes, kv heads over tensor (`paged.pool_specs`)

A mixture of experts compiles as the RL loop runs it: with rl.routing_replay the train batch
and the reference pass carry the sampler's expert ids [rows, T, MoE layers, top-k], the prefill
returns the prompts' routing, and both decode steps write their tokens' experts into the
sampler's routing record (donated, beside the cache).

Shapes are `k15.plan`'s worst case for one rollout and one gradient step, and its per-chip
prediction for each program is printed beside XLA's. Training and sampling use the same
parameter layout (k15.parallel's rules), so there is no re-layout program between them.

For each program: memory per chip from `compiled.memory_analysis()` (arguments + outputs +
temporaries + generated code - aliased, i.e. donated, buffers) against the chip's HBM, XLA's
FLOPs and bytes accessed (`cost_analysis()`; Pallas kernels such as splash attention count as
zero), and the compile time on this host. Exit status 1 if a program does not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

# Compile-only use of libtpu touches no chip, so another process holding libtpu's lock (a test
# run, a second compile) must not stop it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from k15 import parallel, plan as plan_lib, update  # pylint: disable=wrong-import-position
from k15.model import transformer  # pylint: disable=wrong-import-position
from k15.rl import trainer  # pylint: disable=wrong-import-position
from k15.sampling import paged, sampler  # pylint: disable=wrong-import-position

GiB = 2**30

# Chips -> the slice's physical topology (x, y[, z]), per TPU generation.
_TOPOLOGIES = {
    "v5e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
    "v6e": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"},
    "v5p": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"},
    "v4": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
           256: "4x8x8", 512: "8x8x8"},
}


def topology_name(topology: str) -> tuple[str, int, str]:
  """'v5e-8' or 'v5litepod-8' or 'v5e:2x4' -> ('v5e', 8, 'v5e:2x4'); v4/v5p names count cores."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", topology.strip())
  if m:
    return m.group(1), math.prod(int(d) for d in m.group(2).split("x")), topology.strip()
  chip, n = plan_lib.accelerator_chips(topology)
  if n not in _TOPOLOGIES[chip]:
    raise ValueError(f"no known topology for {topology!r} ({n} {chip} chips); known chip "
                     f"counts: {sorted(_TOPOLOGIES[chip])}; or pass e.g. --topology={chip}:2x4")
  return chip, n, f"{chip}:{_TOPOLOGIES[chip][n]}"


def topology_devices(topology: str) -> tuple[str, list[Any]]:
  """(chip, compile-only TPU devices of the slice), from libtpu (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip, n, name = topology_name(topology)
  dims = len(name.split(":")[1].split("x"))
  per_host = (2, 2, 1) if n >= 4 else (1, 1, 1)
  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=name, chip_config_name="default",
      chips_per_host_bounds=per_host, num_slices=1, wrap=(False,) * 3)
  devices = list(desc.devices)
  if len(devices) != n:
    raise ValueError(f"topology {name} has {len(devices)} devices, expected {n} "
                     f"({dims}-d {chip})")
  return chip, devices


@dataclasses.dataclass
class Program:
  name: str
  shapes: str
  memory: dict[str, int]   # bytes per chip: arguments, outputs, temporaries, aliased, code
  flops: float
  bytes: float
  compile_s: float
  plan_bytes: float
  # The Pallas (Mosaic) kernels the program calls, by name: which attention it really runs.
  kernels: tuple[str, ...] = ()

  @property
  def total(self) -> int:
    m = self.memory
    return m["arguments"] + m["outputs"] + m["temporaries"] + m["code"] - m["aliased"]


def _compile(name, shapes, fn, args, plan_bytes) -> Program:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  kernels = tuple(sorted(set(re.findall(r'kernel_name\s*=\s*"([^"]+)"', lowered.as_text()))))
  ma = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  memory = {"arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
            "temporaries": ma.temp_size_in_bytes, "aliased": ma.alias_size_in_bytes,
            "code": ma.generated_code_size_in_bytes}
  return Program(name, shapes, memory, float(cost.get("flops", 0.0)),
                 float(cost.get("bytes accessed", 0.0)), compile_s, float(plan_bytes), kernels)


def _struct(shape, dtype, axes, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.sharding(axes, shape, mesh))


def _compile_decode_paged(graphdef, params, cfg, mesh, slots: int, length: int, plan_bytes,
                          block_size: int = 16, record=None) -> Program:
  """One paged decode step: `slots` slots, each with `length` tokens of blocks in the pool.

  Each batch shard's pool holds its slots' blocks and a scratch block; the tables index
  within the shard (`paged.pool_specs`). `record` (a mixture of experts, `_routing_record`):
  the step also writes the slots' experts into it, as the continuous sampler does. Call under
  `parallel.use_mesh(mesh)`.
  """
  sp = paged.pool_specs(cfg, mesh)
  shards = math.prod(mesh.shape[a] for a in paged._names(sp["slots"][0]))  # pylint: disable=protected-access
  C, M = block_size, -(-length // block_size) + 1
  blocks = shards * (1 + slots // shards * -(-length // C))
  pool_shape = (cfg.num_kv_heads, blocks, C, cfg.head_dim)
  dtype = transformer.to_dtype(cfg.dtype)
  pool_sh = jax.sharding.NamedSharding(mesh, sp["pool"])
  pool = {name: tuple(jax.ShapeDtypeStruct(pool_shape, dtype, sharding=pool_sh)
                      for _ in range(cfg.num_layers)) for name in ("k", "v")}
  slot_sh = jax.sharding.NamedSharding(mesh, sp["slots"])
  vec = lambda: jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=slot_sh)
  tables = jax.ShapeDtypeStruct((slots, M), jnp.int32, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(sp["slots"][0], None)))

  def decode_paged(state, pool, tokens, positions, tables, block, offset, lengths, *record):
    out = paged.decode_step(nnx.merge(graphdef, state), tokens, positions, pool, tables, block,
                            offset, lengths, buckets=(M,), impl="tpu",
                            return_routing=bool(record))
    if not record:
      return out
    logits, pool, ids = out  # the slots' experts [slots, L, k], written at the step's index
    return logits, pool, _record_step(record[0], ids[:, None], record[1])

  args = (params, pool, vec(), vec(), tables, vec(), vec(), vec())
  if record is not None:
    args += (record, jax.ShapeDtypeStruct((), jnp.int32))
  return _compile("decode_paged", f"{slots} slots x {length} tokens, pool {blocks} blocks of {C}",
                  jax.jit(decode_paged, donate_argnums=(1, 8) if record is not None else 1),
                  args, plan_bytes)


def _routing_record(cfg, mesh, rows: int, tokens: int) -> jax.ShapeDtypeStruct | None:
  """A mixture of experts: the sampler's record of each response token's experts, [rows,
  tokens, MoE layers, top-k] in `transformer.expert_id_dtype`, carried (donated) through
  decode; None for a dense model."""
  layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  if not layers:
    return None
  return _struct((rows, tokens, layers, cfg.experts_per_token), transformer.expert_id_dtype(cfg),
                 ("batch", None, None, None), mesh)


def _record_step(record, ids, index):
  """Writes one step's ids [rows, 1, L, k] at response index `index` of the record."""
  return jax.lax.dynamic_update_slice(record, ids.astype(record.dtype), (0, index, 0, 0))


def abstract_state(config: Any, cfg: transformer.ModelConfig, mesh):
  """(graphdef, params, optimizer, opt_state, param shardings, opt shardings): abstract
  parameters and optimizer state as `jax.ShapeDtypeStruct`s, laid out as the trainer lays them
  out. Call before the mesh is set: with compile-only devices as the mesh, jax can make no
  array, which optax's tree_map_params does."""
  rules = parallel.rules_from_config(config.get("sharding_rules"))
  abstract = nnx.eval_shape(lambda: transformer.Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  param_sh = parallel.state_shardings(state, mesh, rules)
  as_struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(as_struct, state, param_sh)
  optimizer = update.make_optimizer(config.optimizer)
  opt_sh = update.optimizer_shardings(optimizer, params, param_sh, mesh)
  opt = jax.tree.map(as_struct, jax.eval_shape(optimizer.init, params), opt_sh)
  return graphdef, params, optimizer, opt, param_sh, opt_sh


def train_batch(cfg: transformer.ModelConfig, mesh, R: int, T: int, k: int,
                replay: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The RL train step's batch (k15.rl.trainer.build_batch) of R rows x T tokens in groups of
  k, split over the batch axes; `replay` adds the sampler's expert ids [R, T, MoE layers,
  top-k] that rl.routing_replay routes by."""
  tok = lambda shape: _struct(shape, jnp.int32, ("batch", None), mesh)
  f32 = lambda shape: _struct(shape, jnp.float32, ("batch", None), mesh)
  batch = {"tokens": tok((R, T)), "positions": tok((R, T)), "segment_ids": tok((R, T)),
           "mask": f32((R, T)), "ref_logp": f32((R, T)), "rewards": f32((R // k, k)),
           "sample_weight": f32((R // k, k)), "ref_self": f32((R // k, k))}
  if replay:
    batch["expert_ids"] = _routing_record(cfg, mesh, R, T)
  return batch


def compile_programs(config: Any, topology: str | None = None, *,
                     programs: tuple[str, ...] = ("train", "ref_logprobs", "prefill", "decode",
                                                  "decode_paged"),
                     progress: bool = False, report=None) -> dict[str, Any]:
  """Compiles `programs` of `config` for `topology` (default: config.accelerator_type).

  `report(program)`, if given, is called as each program is compiled (a long compile's
  results are then not lost with a later one).

  Returns {"accelerator", "topology", "hbm_bytes", "mesh", "programs": [Program], "plan"}.
  """
  topology = topology or config.get("accelerator_type", "")
  if not topology:
    raise ValueError("no TPU to compile for: set config.accelerator_type (e.g. 'v5litepod-8') "
                     "or pass --topology=v5e-8")
  if "rl" not in config:
    raise ValueError("k15.aot compiles an RL iteration's programs; the config has no `rl` block")
  chip, devices = topology_devices(topology)
  mesh = parallel.make_mesh(config.mesh, devices)
  p = plan_lib.plan(config, chip=chip, num_chips=len(devices))
  cfg = transformer.ModelConfig.from_config(config.model)
  rl = config.rl
  k = rl.samples_per_prompt
  out_programs = []
  bar = None
  if progress:
    from k15 import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    bar = metrics_lib.progress(len(programs), desc="aot compile", enabled=True)

  rules = parallel.rules_from_config(config.get("sharding_rules"))
  graphdef, params, optimizer, opt, param_sh, opt_sh = abstract_state(config, cfg, mesh)

  with parallel.use_mesh(mesh, rules):
    t = p["train"]
    R, T = t["rows"], t["seq_len"]
    tok = lambda shape: _struct(shape, jnp.int32, ("batch", None), mesh)
    plan_params = t["params"]
    # A mixture of experts with rl.routing_replay: the train batch and the reference pass carry
    # the sampler's expert ids [R, T, MoE layers, top-k] (k15.rl.trainer.build_batch).
    replay = (_routing_record(cfg, mesh, R, T) if rl.get("routing_replay", False) else None)

    for name in programs:
      if name == "train":
        batch = train_batch(cfg, mesh, R, T, k, replay=replay is not None)
        step = update.make_train_step(graphdef, trainer.make_loss_fn(rl, k), optimizer,
                                      microbatches=t["microbatches"], param_shardings=param_sh,
                                      opt_shardings=opt_sh)
        prog = _compile("train", f"{R} rows x {T} tokens, {t['microbatches']} microbatch(es)",
                        step, (params, opt, batch), t["peak"])
      elif name == "ref_logprobs":
        # The trainer's reference pass (`trainer.make_reference_fn`), one microbatch of groups
        # at a time: the loss's forward, routed by the recorded experts with rl.routing_replay.
        Rm = R // t["microbatches"]
        fn = jax.jit(lambda s, a, b, c, *ids: update.logprobs_and_router_aux(
            nnx.merge(graphdef, s), a, b, c, *ids)[0])
        replay_m = (None if replay is None else
                    _routing_record(cfg, mesh, Rm, T))
        prog = _compile("ref_logprobs", f"{Rm} rows x {T} tokens", fn,
                        (params, tok((Rm, T)), tok((Rm, T)), tok((Rm, T)))
                        + ((replay_m,) if replay_m is not None else ()), p["ref_logprobs"])
      elif name == "prefill":
        s = p["sampling"]
        U, P = s["sequences"], s["prompt_bucket"]

        def prefill(state, tokens, positions, segment_ids):
          # The sampler's prefill: all but the last prompt token fill the cache (their logits
          # are dropped), then the last token alone gives the first new token's logits; a
          # mixture of experts also returns the prompts' expert ids [U, P, L, k].
          return sampler._prefill(  # pylint: disable=protected-access
              nnx.merge(graphdef, state),
              {"tokens": tokens, "positions": positions, "segment_ids": segment_ids})

        seq = lambda: _struct((U, P), jnp.int32, ("batch", "length"), mesh)
        prog = _compile("prefill", f"{U} sequences x {P} tokens", jax.jit(prefill),
                        (params, seq(), seq(), seq()), plan_params + s["prefill"])
      elif name == "decode":
        s = p["sampling"]
        Rs, S = s["rows"], s["cache_length"]
        cache = jax.eval_shape(lambda: transformer.init_cache(cfg, Rs, S))
        cache = sampler._map_cache(  # pylint: disable=protected-access
            lambda a, axes: _struct(a.shape, a.dtype, axes, mesh), cache)

        record = _routing_record(cfg, mesh, Rs, S - s["prompt_bucket"])

        def decode(state, cache, tokens, positions, index, *record):
          model = nnx.merge(graphdef, state)
          logits, cache, *routing = model(tokens, positions=positions,
                                          segment_ids=jnp.ones_like(tokens), cache=cache,
                                          cache_index=index, return_routing=bool(record))
          cache = sampler._constrain_cache(cache)  # pylint: disable=protected-access
          if not record:
            return logits[:, 0], cache
          # As the sampler records a step's experts, at the token's response index.
          ids = sampler._stack_routing(routing[0], cfg)  # pylint: disable=protected-access
          return logits[:, 0], cache, _record_step(record[0], ids, index - s["prompt_bucket"])

        row = lambda: _struct((Rs, 1), jnp.int32, ("batch", None), mesh)
        args = (params, cache, row(), row(), jax.ShapeDtypeStruct((), jnp.int32))
        prog = _compile("decode", f"{Rs} rows, cache {S}",
                        jax.jit(decode, donate_argnums=(1, 5) if record is not None else 1),
                        args + ((record,) if record is not None else ()),
                        plan_params + s["kv_cache"] + s["decode"])
      elif name == "decode_paged":
        s = p["sampling"]
        prog = _compile_decode_paged(
            graphdef, params, cfg, mesh, s["rows"], s["cache_length"],
            plan_params + s["kv_cache"] + s["decode_paged"],
            record=_routing_record(cfg, mesh, s["rows"], s["cache_length"] - s["prompt_bucket"]))
      else:
        raise ValueError(f"unknown program {name!r}; known: train, ref_logprobs, prefill, "
                         f"decode, decode_paged")
      out_programs.append(prog)
      if report is not None:
        report(prog)
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  return {"accelerator": topology, "topology": topology_name(topology)[2],
          "chip": plan_lib.CHIPS[chip].name, "hbm_bytes": plan_lib.CHIPS[chip].hbm_gib * GiB,
          "mesh": p["mesh"], "programs": out_programs, "plan": p}


def to_json(result: dict[str, Any]) -> dict[str, Any]:
  hbm = result["hbm_bytes"]
  return {
      "accelerator": result["accelerator"], "topology": result["topology"],
      "hbm_gib": hbm / GiB, "mesh": result["mesh"],
      "programs": [{"name": pr.name, "shapes": pr.shapes, "memory_gib": pr.total / GiB,
                    "fits": pr.total <= hbm, "flops": pr.flops, "bytes": pr.bytes,
                    "compile_s": pr.compile_s, "plan_gib": pr.plan_bytes / GiB,
                    "kernels": list(pr.kernels),
                    **{f"{key}_gib": v / GiB for key, v in pr.memory.items()}}
                   for pr in result["programs"]],
  }


def format_table(result: dict[str, Any]) -> str:
  hbm = result["hbm_bytes"]
  g = lambda b: f"{b / GiB:7.3f}"
  lines = [f"{result['chip']} x {math.prod(result['mesh'].values())} ({result['topology']})  mesh {result['mesh']}  HBM {hbm / GiB:.2f} GiB per chip",
           "memory per chip in GiB: args + out + temp + code - aliased = total (plan)",
           f"{'program':13s} {'args':>7s} {'out':>7s} {'temp':>7s} {'code':>7s} {'alias':>7s} "
           f"{'total':>7s} {'plan':>7s}  {'fits':4s} {'TFLOP':>9s} {'GB':>8s} {'compile':>8s}"
           "  shapes"]
  for pr in result["programs"]:
    m = pr.memory
    lines.append(
        f"{pr.name:13s} {g(m['arguments'])} {g(m['outputs'])} {g(m['temporaries'])} "
        f"{g(m['code'])} {g(m['aliased'])} {g(pr.total)} {g(pr.plan_bytes)}  "
        f"{'yes' if pr.total <= hbm else 'NO':4s} {pr.flops / 1e12:9.2f} {pr.bytes / 1e9:8.2f} "
        f"{pr.compile_s:7.1f}s  {pr.shapes}"
        + (f"; kernels {', '.join(pr.kernels)}" if pr.kernels else ""))
  return "\n".join(lines)


def main(argv=None) -> int:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  cfg_flag = config_flags.DEFINE_config_file("config", None, "ml-collections config file[:args]",
                                             lock_config=True)
  topo = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-8, v5p-64 or v5e:2x4; "
                             "default config.accelerator_type.")
  json_path = flags.DEFINE_string("json", None, "Also write the results here as JSON.")
  only = flags.DEFINE_list("programs", "train,ref_logprobs,prefill,decode,decode_paged",
                           "Programs to compile.")
  flags.mark_flag_as_required("config")

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    report = lambda pr: print(f"compiled {pr.name} ({pr.shapes}) in {pr.compile_s:.1f} s: "
                              f"{pr.total / GiB:.2f} GiB per chip, plan {pr.plan_bytes / GiB:.2f}",
                              flush=True)
    result = compile_programs(cfg_flag.value, topo.value, programs=tuple(only.value),
                              progress=True, report=report)
    print(format_table(result))
    if json_path.value:
      with open(json_path.value, "w") as f:
        json.dump(to_json(result), f, indent=1)
    misfits = [pr.name for pr in result["programs"] if pr.total > result["hbm_bytes"]]
    if misfits:
      print(f"DOES NOT FIT: {', '.join(misfits)} exceed(s) {result['hbm_bytes'] / GiB:.2f} GiB "
            f"per chip")
      sys.exit(1)

  app.run(run, argv=argv)
  return 0


if __name__ == "__main__":
  main()
