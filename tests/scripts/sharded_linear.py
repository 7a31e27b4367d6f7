"""Run in a fresh process with 4 simulated CPU devices (see tests/test_sharding.py)."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

assert len(jax.devices()) == 4
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
rng = np.random.default_rng(0)
h = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
k = jnp.asarray(rng.standard_normal((16, 1024)) * 0.25, jnp.float32)
w = jnp.asarray(rng.uniform(0.5, 2.0, 1024), jnp.float32)
y = jnp.asarray(rng.integers(0, 1024, 8)).at[3].set(-100)


def loss(h, k):
    return jaxce.linear_cross_entropy(h, k, y, w, label_smoothing=0.1, chunk_size=256)


step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
ref_value, (ref_dh, ref_dk) = step(h, k)
hs = jax.device_put(h, NamedSharding(mesh, P("data", None)))
ks = jax.device_put(k, NamedSharding(mesh, P(None, "model")))
value, (dh, dk) = step(hs, ks)
np.testing.assert_allclose(value, ref_value, rtol=1e-6)
np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-7)
np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-7)
print("sharded ok")
