"""Test configuration: 8 simulated CPU devices (for tests/test_sharding.py), float64
available, strict dtype and rank promotion (so silent broadcasting or promotion bugs fail
loudly), hypothesis profiles."""

import os

import jax
from hypothesis import HealthCheck, settings

# Before anything initialises JAX's backends (conftest.py is imported before the test
# modules, in every pytest-xdist worker too). Single-device code is unaffected: arrays and
# computations go to the default device, cpu:0. jax_num_cpu_devices works on every
# supported JAX (0.7.2 ... 0.12), so no XLA_FLAGS=--xla_force_host_platform_device_count.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("JAXCE_HYPOTHESIS_PROFILE", "ci"))

# Scripts run in their own processes (tests/test_transforms.py: XLA flags of their own),
# never imported here.
collect_ignore = ["scripts"]
