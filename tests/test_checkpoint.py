"""Tests for k15.checkpoint: mesh-to-mesh restore, retention, SIGTERM and crash safety."""

import os
import pathlib
import select
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from k15 import checkpoint, parallel
from k15.model import transformer

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = transformer.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=64)


def _make_model():
  return transformer.Transformer(CFG, rngs=nnx.Rngs(0))


def _shardings(tree, mesh):
  """Logical-axis shardings for nnx Variables (also inside optax states); others replicated."""
  def one(x):
    if isinstance(x, nnx.Variable):
      return parallel.state_shardings(x, mesh)
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _train_state(mesh):
  """Params of a sharded model, an adam state after one update (non-zero moments), a key."""
  model = parallel.create_sharded(_make_model, mesh)
  params = nnx.state(model, nnx.Param)
  tx = optax.adam(1e-2)

  @jax.jit  # one compile instead of one per eager op and shape
  def opt_after_one_step(params):
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
    return tx.update(grads, tx.init(params), params)[1]

  opt = opt_after_one_step(params)
  return {"params": params, "opt": opt, "rng": jax.random.key(7),
          "success": np.linspace(0, 1, 12, dtype=np.float32)}


def _abstract_target(mesh):
  params = nnx.state(nnx.eval_shape(_make_model), nnx.Param)
  opt = jax.eval_shape(optax.adam(1e-2).init, params)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  tree = {"params": params, "opt": opt, "rng": rng}
  target = checkpoint.abstract(tree, _shardings(tree, mesh))
  target["success"] = np.zeros(12, np.float32)   # numpy leaf: restored onto the host
  return target


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_other_meshes_and_one_device(tmp_path):
  src_mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state = _train_state(src_mesh)
  embed = state["params"]["embed"].value
  assert len(embed.sharding.device_set) == 8  # really saved from a sharded layout
  meta = {"iteration": 3, "data": {"epoch": 1, "offsets": np.arange(4, dtype=np.int64)},
          "replay": [{"tokens": [1, 2, 3], "segment": 2}], "reward": float("nan")}
  with checkpoint.Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
    assert ckpt.save(3, arrays=state, meta=meta)
    ckpt.wait()
    assert ckpt.latest_step() == 3

  for axes in ({"tensor": 4, "data": 2}, {"data": 8}):
    mesh = parallel.make_mesh(axes)
    target = _abstract_target(mesh)
    arrays, got_meta = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3).restore(
        abstract_arrays=target)
    _assert_trees_equal(arrays, state)
    for leaf, want in zip(jax.tree.leaves(arrays), jax.tree.leaves(target)):
      if isinstance(want, jax.ShapeDtypeStruct):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), (leaf.sharding, want)
      else:
        assert isinstance(leaf, np.ndarray)
    assert isinstance(arrays["params"], nnx.State)
    assert jax.dtypes.issubdtype(arrays["rng"].dtype, jax.dtypes.prng_key)
    # The restored key draws the same numbers as the saved one.
    np.testing.assert_array_equal(jax.random.uniform(arrays["rng"], (3,)),
                                  jax.random.uniform(state["rng"], (3,)))
    assert got_meta["iteration"] == 3 and got_meta["replay"] == meta["replay"]
    np.testing.assert_array_equal(got_meta["data"]["offsets"], meta["data"]["offsets"])
    assert got_meta["data"]["offsets"].dtype == np.int64
    assert np.isnan(got_meta["reward"])
  assert arrays["params"]["embed"].value.sharding.spec == P(None, None)  # data=8: replicated

  one = SingleDeviceSharding(jax.devices()[0])
  target = _abstract_target(src_mesh)
  target = checkpoint.abstract({k: v for k, v in target.items() if k != "success"}, one)
  target["success"] = np.zeros(12, np.float32)
  arrays, _ = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3).restore(
      3, abstract_arrays=target)
  _assert_trees_equal(arrays, state)
  assert all(leaf.sharding == one for leaf in jax.tree.leaves(arrays["params"]))

  # Without a target: numpy on the host, named by key paths.
  host, _ = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3).restore()
  np.testing.assert_array_equal(host["params"]["embed"]["value"], np.asarray(embed))
  assert isinstance(host["params"]["embed"]["value"], np.ndarray)


def test_interval_keep_force_and_reopen(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, save_every=2, keep=2)
  saved = [s for s in range(1, 8) if ckpt.save(s, arrays={"x": np.full(3, s)}, meta={"s": s})]
  assert saved == [2, 4, 6]
  assert ckpt.save(7, arrays={"x": np.full(3, 7)}, force=True)
  assert not ckpt.save(7, arrays={"x": np.full(3, 70)}, force=True)  # already there
  ckpt.close()
  assert ckpt.all_steps() == [6, 7]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
      "6", "7"]

  again = checkpoint.Checkpointer(tmp_path, save_every=2, keep=2)
  assert again.latest_step() == 7
  arrays, meta = again.restore(6, abstract_arrays={"x": np.zeros(3, np.int64)})
  np.testing.assert_array_equal(arrays["x"], np.full(3, 6))
  assert meta == {"s": 6}
  with pytest.raises(FileNotFoundError, match="step 3"):
    again.restore(3)
  with pytest.raises(TypeError, match=r"meta\['table'\]: key 1"):
    again.save(8, arrays={"x": np.zeros(3)}, meta={"table": {1: 0.5}})
  with pytest.raises(ValueError, match="no sharding"):
    again.restore(abstract_arrays={"x": jax.ShapeDtypeStruct((3,), jnp.int64)})
  again.close()

  sync = checkpoint.Checkpointer(tmp_path / "sync", save_every=1, keep=1, async_save=False)
  assert sync.save(1, arrays={"x": np.ones(2)})
  assert (tmp_path / "sync" / "checkpoints" / "1").is_dir()  # committed before save returned
  sync.close()


def _child(script: str, workdir) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS="")
  return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> str:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    ready, _, _ = select.select([proc.stdout], [], [], 0.5)
    if ready:
      line = proc.stdout.readline()
      if line.startswith(prefix):
        return line.strip()
      if not line and proc.poll() is not None:
        break
  proc.kill()
  raise AssertionError(f"child never printed {prefix!r}; stderr:\n{proc.stderr.read()[-3000:]}")


_PREEMPTED_LOOP = """
import sys, time
import numpy as np
from k15 import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], save_every=1000, keep=2)
ckpt.install_preemption_handler(callback=lambda: print("callback", flush=True))
step = 0
while True:
  step += 1
  time.sleep(0.02)  # a training step
  print(f"step {step}", flush=True)
  if ckpt.should_stop(step):
    ckpt.save(step, arrays={"w": np.full(4, step, np.float32)}, meta={"step": step}, force=True)
    ckpt.close()
    print(f"saved {step}", flush=True)
    sys.exit(0)
"""


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = _child(_PREEMPTED_LOOP, tmp_path)
  _wait_for_line(proc, "step 5", timeout_s=60)
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  _wait_for_line(proc, "callback", timeout_s=30)
  line = _wait_for_line(proc, "saved", timeout_s=30)
  assert proc.wait(timeout=30) == 0
  assert time.monotonic() - sent < 30
  step = int(line.split()[1])
  assert step >= 5

  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1000, keep=2)
  assert ckpt.latest_step() == step
  arrays, meta = ckpt.restore(abstract_arrays={"w": np.zeros(4, np.float32)})
  np.testing.assert_array_equal(arrays["w"], np.full(4, step, np.float32))
  assert meta == {"step": step}


# Saves step 1, then step 2 of ~64 MiB with the final rename (orbax's commit) held back, so
# the parent can SIGKILL it after every byte is written but before the commit.
_KILLED_MID_SAVE = """
import os, sys, time
import numpy as np
from k15 import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], save_every=1, keep=3)
ckpt.save(1, arrays={"w": np.ones(8, np.float32)}, meta={"step": 1})
ckpt.wait()
rename = os.rename
def held_rename(src, dst, *a, **k):
  if ".orbax-checkpoint-tmp" in os.fspath(src):
    print("committing", flush=True)
    time.sleep(600)
  return rename(src, dst, *a, **k)
os.rename = held_rename
ckpt.save(2, arrays={"w": np.random.default_rng(0).random(16 << 20, np.float32)},
          meta={"step": 2})
print("started", flush=True)
ckpt.wait()
"""


def test_killed_save_is_invisible_and_cleaned_up(tmp_path):
  proc = _child(_KILLED_MID_SAVE, tmp_path)
  _wait_for_line(proc, "committing", timeout_s=60)
  proc.kill()  # SIGKILL: no handler, no cleanup
  proc.wait(timeout=10)
  ckpt_dir = tmp_path / "checkpoints"
  leftovers = [p for p in ckpt_dir.iterdir() if p.name.startswith("2.")]
  assert leftovers and ".orbax-checkpoint-tmp" in leftovers[0].name
  assert sum(f.stat().st_size for f in leftovers[0].rglob("*") if f.is_file()) > 32 << 20

  # A hand-made temporary directory of a later step is ignored as well.
  fake = ckpt_dir / "9.orbax-checkpoint-tmp-1234567890"
  (fake / "arrays").mkdir(parents=True)
  (fake / "meta").write_text("{}")

  ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=3)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  arrays, meta = ckpt.restore(abstract_arrays={"w": np.zeros(8, np.float32)})
  np.testing.assert_array_equal(arrays["w"], np.ones(8, np.float32))
  assert meta == {"step": 1}
  # The run goes on: step 2 saves again, and the leftovers are gone.
  assert ckpt.save(2, arrays={"w": np.full(8, 2, np.float32)}, meta={"step": 2})
  ckpt.close()
  assert ckpt.all_steps() == [1, 2]
  assert not any("tmp" in p.name for p in ckpt_dir.iterdir()), list(ckpt_dir.iterdir())
