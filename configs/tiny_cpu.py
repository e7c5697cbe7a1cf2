"""The default config: a tiny model that runs on one CPU in seconds.

    python -m k15.main --config=configs/tiny_cpu.py --workdir=/tmp/k15_tiny

Builds the model directly sharded on the mesh (all local devices on the 'data' axis), runs a
jitted forward pass on a random batch and prints a short report: parameter count, mesh,
logits shape and timing. Override any key on the command line, e.g.
`--config.model.num_layers=4` or `--config.mesh.data=2 --config.mesh.tensor=-1`.

Structural options go after a colon: `--config=configs/tiny_cpu.py:runlocal=True`.
"""

from k15 import config as k15_config


def get_config(arg=None):
  arg = k15_config.parse_arg(arg, runlocal=False)
  c = k15_config.base(mode="smoke")
  c.model = k15_config.model_block(
      vocab_size=512, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
      mlp_dim=384, rope_theta=10_000.0, tie_embeddings=True)
  c.smoke = dict(batch=8, length=128)
  if arg.runlocal:  # the shrink switch: tests and CI
    c.model.num_layers = 2
    c.model.embed_dim = 64
    c.model.mlp_dim = 128
    c.smoke.batch = 8
    c.smoke.length = 32
  return c
