"""Test configuration: float64 available, strict dtype and rank promotion (so silent
broadcasting or promotion bugs fail loudly), hypothesis profiles."""

import os

import jax
from hypothesis import HealthCheck, settings

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

# Scripts run in their own processes (e.g. with simulated devices), never imported here.
collect_ignore = ["scripts"]
