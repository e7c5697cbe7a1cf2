"""The Colab notebook runs top to bottom (shrunk config), as a user would run it."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["small_scale_reproduction.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
  monkeypatch.setenv("K15_NOTEBOOK_RUNLOCAL", "1")
  monkeypatch.setenv("K15_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "RL - SFT:" in outputs
  assert os.path.exists(tmp_path / "work" / "rl" / "metrics.jsonl")
