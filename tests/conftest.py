"""Test setup: 8 fake CPU devices stand in for a pod slice's mesh.

The flag must be set before jax is first imported, so it lives here rather than in each test.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
