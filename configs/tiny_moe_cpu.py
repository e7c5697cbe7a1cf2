"""The tiny reproduction (configs/tiny_cpu.py) with a mixture-of-experts policy.

    python -m k15.main --config=configs/tiny_moe_cpu.py --workdir=/tmp/k15_moe

The same pipeline, data, schedule and mesh as tiny_cpu (see its docstring for the modes and
ablation flags); only the policy's MLPs change: each layer's SwiGLU becomes a Qwen3-MoE block of
4 experts with top-2 routing and renormalised top-2 weights. Each expert is half the dense
MLP's width, so a token's active MLP parameters equal tiny_cpu's. The router's load-balancing
loss is added to the SFT and RL losses at weight 0.01 (Switch Transformer's value) and reported
as `router_aux_loss`. The mesh is tiny_cpu's, data-parallel over whatever CPU devices there are,
with every expert on every device.

`:runlocal=True` shrinks everything as tiny_cpu's does, for tests and CI.
"""

import importlib.util
import os

from k15 import config as k15_config


def _tiny_cpu():
  """configs/tiny_cpu.py, loaded by path so this file works wherever --config points to it."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_cpu.py")
  spec = importlib.util.spec_from_file_location("_k15_tiny_cpu", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  arg = k15_config.parse_arg(arg, runlocal=False)
  c = _tiny_cpu().get_config(f"runlocal={arg.runlocal}")
  # 'dense' dispatch: at 4 experts and top-2 the one-hot form does only twice the chosen
  # experts' FLOPs in plain einsums, with no sort or scatter (benchmarks/moe_dispatch.py).
  c.model.update(num_experts=4, experts_per_token=2, moe_mlp_dim=c.model.mlp_dim // 2,
                 norm_topk_prob=True, moe_dispatch="dense", router_aux_weight=0.01)
  return c
