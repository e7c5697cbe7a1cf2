"""The command line: the smoke run end to end, config overrides and their errors."""

import json
import os
import subprocess
import sys

import pytest

from k15 import config as k15_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, devices=8):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
  return subprocess.run([sys.executable, "-m", "k15.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_smoke_run_on_a_mesh_with_overrides(tmp_path):
  r = _main("--config=configs/tiny_cpu.py:runlocal=True", f"--workdir={tmp_path}",
            "--config.mode=smoke", "--config.model.num_layers=3", "--config.mesh.data=2",
            "--config.mesh.tensor=-1")
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / "smoke.json").read_text())
  assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4,
                            "sequence": 1}
  assert report["logits_shape"] == [8, 32, 384]
  assert report["finite"]
  # A freshly initialized model predicts close to uniformly.
  assert abs(report["nll"] - report["log_vocab"]) < 1.0
  assert "k15 smoke run" in r.stdout


def test_real_scale_config_has_the_same_keys():
  from configs import qwen25_7b_v5p, tiny_cpu  # pylint: disable=g-import-not-at-top
  def keys(c, prefix=""):
    out = set()
    for k, v in c.items():
      out.add(prefix + k)
      if hasattr(v, "items"):
        out |= keys(v, prefix + k + ".")
    return out
  tiny, big = tiny_cpu.get_config(), qwen25_7b_v5p.get_config()
  assert keys(tiny) <= keys(big)
  assert big.model.num_layers == 28 and big.model.qkv_bias
  shrunk = qwen25_7b_v5p.get_config("runlocal=True")
  assert shrunk.model.num_layers == 2 and not shrunk.distributed


@pytest.mark.parametrize("xla_devices,expected", [(None, 4), (2, 2)])
def test_cpu_devices_sets_the_cpu_device_count_unless_xla_flags_do(tmp_path, xla_devices,
                                                                   expected):
  # config.cpu_devices=4 gives 4 CPU devices (the default mesh spans them); a device count in
  # XLA_FLAGS, as tests and benchmarks set it, wins.
  r = _main("--config=configs/tiny_cpu.py:runlocal=True", f"--workdir={tmp_path}",
            "--config.mode=smoke", "--config.cpu_devices=4", devices=xla_devices)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads((tmp_path / "smoke.json").read_text())
  assert report["mesh"]["data"] == expected


def test_unknown_config_key_names_it(tmp_path):
  r = _main("--config=configs/tiny_cpu.py:runlocal=True", f"--workdir={tmp_path}",
            "--config.model.num_layer=3")
  assert r.returncode != 0
  assert "num_layer" in r.stderr and "num_layers" in r.stderr


def test_bad_mesh_names_the_problem(tmp_path):
  r = _main("--config=configs/tiny_cpu.py:runlocal=True", f"--workdir={tmp_path}",
            "--config.mode=smoke", "--config.mesh.data=3")
  assert r.returncode != 0
  assert "config.mesh" in r.stderr and "8 devices" in r.stderr


def test_parse_arg():
  a = k15_config.parse_arg("runlocal=True,layers=4", runlocal=False, layers=2, name="x")
  assert a.runlocal is True and a.layers == 4 and a.name == "x"
  with pytest.raises(ValueError, match="'laters' is not one of"):
    k15_config.parse_arg("laters=4", layers=2)
  with pytest.raises(ValueError, match="expected int"):
    k15_config.parse_arg("layers=four", layers=2)


def test_compilation_cache_config_turns_on_the_persistent_cache(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  from k15 import main as k15_main, parallel  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  config = k15_config.add_run_blocks(k15_config.base())
  assert config.compilation_cache_dir == ""  # off by default
  assert not parallel.configure_compilation_cache(config)
  assert jax.config.jax_compilation_cache_dir == saved["jax_compilation_cache_dir"]
  # main applies it after the distributed start and before a mode compiles anything.
  src = inspect.getsource(k15_main.run)
  assert (src.index("maybe_initialize_distributed") < src.index("configure_compilation_cache")
          < src.index("import_module"))
  config.compilation_cache_dir = str(tmp_path / "xla_cache")
  # Every program is worth caching here, so that the tiny one below is written.
  monkeypatch.setattr(parallel, "COMPILATION_CACHE_MIN_COMPILE_SECS", 0.0)
  try:
    assert parallel.configure_compilation_cache(config)
    assert jax.config.jax_compilation_cache_dir == config.compilation_cache_dir
    assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
    compilation_cache.reset_cache()  # an earlier test may have settled on "no cache"
    jax.jit(lambda x: x * 3.0 + 1.0)(jax.numpy.arange(7.0)).block_until_ready()
    assert list((tmp_path / "xla_cache").iterdir()), "no executable written to the cache"
  finally:
    for k, v in saved.items():
      jax.config.update(k, v)
    compilation_cache.reset_cache()
