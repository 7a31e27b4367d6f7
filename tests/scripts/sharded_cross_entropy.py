"""Run in a fresh process with 8 simulated CPU devices (see tests/test_sharding.py).

cross_entropy on logits sharded P('data', 'model') (vocabulary on 'model'), every option:
loss and gradients equal the single-device result, the gradient keeps the logits'
sharding, and the compiled program moves only O(tokens) data between devices.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from hlo import collective_sizes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

jax.config.update("jax_enable_x64", True)
assert len(jax.devices()) == 8
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
N, C = 64, 1024


def check(prob, reduction, weighted, ignore, eps, dtype, extra=False):
    rng = np.random.default_rng(abs(hash((prob, reduction, weighted, ignore, eps))) % 2**32)
    x = jnp.asarray(rng.standard_normal((N, C)) * 2, dtype)
    if prob:
        t = rng.random((N, C))
        t = jnp.asarray(t / t.sum(-1, keepdims=True), dtype)
        t_spec = P("data", "model")
    else:
        t = rng.integers(0, C, N)
        if ignore:
            t[::5] = -100
        t = jnp.asarray(t)
        t_spec = P("data")
    w = jnp.asarray(rng.uniform(0.5, 2.0, C), dtype) if weighted else None

    # The options beyond PyTorch: a mask, z-loss and a soft cap (replicated mask).
    options = {}
    if extra:
        mask = jnp.asarray(rng.random(N) > 0.2)
        options = {"where": mask, "z_loss": 1e-2, "logit_softcap": 3.0}

    def loss(x, t, w):
        return jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps, **options)

    def total(x, t, w):
        out = loss(x, t, w)
        return jnp.sum(out * jnp.arange(1, out.size + 1).reshape(out.shape))

    argnums = (0, 1) if prob else (0,)
    step = jax.jit(jax.value_and_grad(total, argnums))
    ref_value, ref_grads = step(x, t, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    ts = jax.device_put(t, NamedSharding(mesh, t_spec))
    ws = None if w is None else jax.device_put(w, NamedSharding(mesh, P("model")))
    value, grads = step(xs, ts, ws)
    # Shards sum in another order: equal up to rounding, relative to each array's scale
    # (a gradient term lse - x_c loses digits when x_c is close to lse).
    eps_d = float(jnp.finfo(dtype).eps)

    def close(a, b):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * eps_d * float(np.max(np.abs(b))))

    close(value, ref_value)
    for g, r in zip(grads, ref_grads, strict=True):
        close(g, r)
        assert g.sharding.spec == P("data", "model"), g.sharding.spec
    close(jax.jit(loss)(xs, ts, ws), jax.jit(loss)(x, t, w))
    # Communication: nothing logits-sized crosses devices, only per-token vectors.
    if dtype != jnp.float64 or not eps:  # compiled-HLO check on the smoothed float64 half
        return
    for fn, args in [(step, (xs, ts, ws)), (jax.jit(loss), (xs, ts, ws))]:
        sizes = collective_sizes(fn.lower(*args).compile().as_text())
        assert sizes, "expected some cross-device reduction"
        big = [s for s in sizes if s[1] > 4 * N]
        assert not big, big


def main():
    cases = list(
        itertools.product(
            [False, True],
            ["none", "mean"],  # 'sum' is the same per-element losses, summed
            [False, True],
            [False, True],
            [0.0, 0.1],
            [jnp.float64, jnp.float32],
        )
    )
    # Weight and ignore_index together, smoothing on and off; float32 once per target kind.
    cases = [
        (prob, red, weighted, ignore, eps, dtype)
        for prob, red, weighted, ignore, eps, dtype in cases
        if not (prob and ignore)
        and (weighted == ignore or prob)
        and (dtype == jnp.float64 or (weighted and eps and red == "mean"))
    ]
    cases += [(prob, "mean", True, not prob, 0.1, jnp.float64, True) for prob in (False, True)]
    for case in cases:
        try:
            check(*case)
        except Exception:
            print("failed case:", case)
            raise
    print(f"sharded cross_entropy ok ({len(cases)} cases)")
    sys.exit(0)


if __name__ == "__main__":
    main()
