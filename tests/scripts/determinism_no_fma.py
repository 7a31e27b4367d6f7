"""Eager vs jax.jit gradients, bit for bit, when XLA:CPU cannot contract multiply-adds.

Run by tests/test_transforms.py in its own process with XLA_FLAGS=--xla_cpu_max_isa=AVX
(AVX has no FMA instructions). With FMA, XLA:CPU contracts a*b+c differently depending on
how the surrounding program is fused, which moves some gradient elements by one rounding
between an eager call (forward and backward compiled as separate programs) and jax.jit
(one program); without contraction every element must be identical.
Prints the number of differing gradient elements per case, then "no-fma determinism ok".
"""

import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: cases.py
from cases import determinism_inputs

jax.config.update("jax_enable_x64", True)


def cross_entropy_cases():
    rng = np.random.default_rng(8)
    grid = itertools.product(
        [False, True], ["none", "mean", "sum"], [jnp.float32, jnp.bfloat16], [0.0, 0.1]
    )
    for prob, reduction, dtype, eps in grid:
        x, t, w = determinism_inputs(rng, prob, dtype)

        def total(x, w, t, reduction=reduction, eps=eps):
            loss = jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
            return jnp.sum(loss).astype(jnp.float32)

        name = f"cross_entropy prob={prob} {reduction} {dtype.__name__} eps={eps}"
        yield name, total, (x, w), t


def linear_cases():
    rng = np.random.default_rng(9)
    for dtype, eps in itertools.product([jnp.float32, jnp.bfloat16], [0.0, 0.1]):
        h = jnp.asarray(rng.standard_normal((48, 16)), dtype)
        k = jnp.asarray(rng.standard_normal((16, 40)) / 4, dtype)
        b = jnp.asarray(rng.standard_normal(40), dtype)
        t = jnp.asarray(rng.integers(0, 40, 48)).at[3].set(-100)

        def total(h, k, b, t, eps=eps):
            loss = jaxce.linear_cross_entropy(h, k, t, label_smoothing=eps, bias=b, chunk_size=16)
            return loss.astype(jnp.float32)

        yield f"linear_cross_entropy {dtype.__name__} eps={eps}", total, (h, k, b), t


def main():
    bad = 0
    # Every input is passed as an argument: closed-over constants may be constant-folded
    # by XLA (e.g. a 'mean' denominator), which rounds differently.
    for name, total, args, t in itertools.chain(cross_entropy_cases(), linear_cases()):
        argnums = tuple(range(len(args)))
        eager_value, eager = jax.value_and_grad(total, argnums)(*args, t)
        jit_value, jitted = jax.jit(jax.value_and_grad(total, argnums))(*args, t)
        diff = int(eager_value != jit_value)
        for a, b in zip(eager, jitted, strict=True):
            diff += int(np.sum(np.asarray(a, np.float32) != np.asarray(b, np.float32)))
        print(f"{name}: {diff} differing elements")
        bad += diff
    if bad:
        sys.exit(f"{bad} elements differ between eager and jit")
    print("no-fma determinism ok")


if __name__ == "__main__":
    main()
