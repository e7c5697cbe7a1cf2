"""k15: the Kimi k1.5 reinforcement-learning recipe in JAX, from one CPU to a TPU pod."""

__version__ = "0.1.0"
