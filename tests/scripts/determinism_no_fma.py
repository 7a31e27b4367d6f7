"""Eager vs jax.jit gradients, bit for bit, when XLA:CPU cannot contract multiply-adds.

Run by tests/test_transforms.py in its own process with XLA_FLAGS=--xla_cpu_max_isa=AVX
(AVX has no FMA instructions). With FMA, XLA:CPU contracts a*b+c differently depending on
how the surrounding program is fused, which moves some gradient elements by one rounding
between an eager call (forward and backward compiled as separate programs) and jax.jit
(one program); without contraction every element must be identical.

The cases: entry point (cross_entropy on class indices or on probabilities,
linear_cross_entropy) x reduction x dtype x smoothing. By default a pairwise cover of them
(``CASES``, every pair of values of any two options at least once); ``--full`` runs every
combination. Prints the number of differing gradient elements per case, then
"no-fma determinism ok".
"""

import argparse
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxce
from parity.grid import rng_for

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: cases.py
from cases import covering_grid, determinism_inputs

jax.config.update("jax_enable_x64", True)

FACTORS = (
    ["index", "probabilities", "linear"], ["none", "mean", "sum"], [jnp.float32, jnp.bfloat16],
    [0.1, 0.0],
)  # fmt: skip
# The pairwise cover (covering_grid marks the rest of the product 'slow'). It starts from
# the first combination, smoothed float32 class indices: the case where FMA contraction
# moves the most gradient elements (over a thousand when XLA_FLAGS leaves FMA on).
CASES = [tuple(p.values) for p in covering_grid(*FACTORS) if not p.marks]


def case(entry, reduction, dtype, eps):
    """``(name, total, args, t)``: ``total(*args, t)`` is the summed loss in float32."""
    name = f"{entry} {reduction} {dtype.__name__} eps={eps}"
    rng = rng_for("no-fma", name)
    if entry == "linear":
        h = jnp.asarray(rng.standard_normal((48, 16)), dtype)
        k = jnp.asarray(rng.standard_normal((16, 40)) / 4, dtype)
        b = jnp.asarray(rng.standard_normal(40), dtype)
        t = jnp.asarray(rng.integers(0, 40, 48)).at[3].set(-100)

        def total(h, k, b, t):
            loss = jaxce.linear_cross_entropy(
                h, k, t, reduction=reduction, label_smoothing=eps, bias=b, chunk_size=16
            )
            return jnp.sum(loss).astype(jnp.float32)

        return name, total, (h, k, b), t
    x, t, w = determinism_inputs(rng, entry == "probabilities", dtype)

    def total(x, w, t):
        loss = jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
        return jnp.sum(loss).astype(jnp.float32)

    return name, total, (x, w), t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every combination of the options")
    combos = itertools.product(*FACTORS) if parser.parse_args().full else CASES
    bad = 0
    # Every input is passed as an argument: closed-over constants may be constant-folded
    # by XLA (e.g. a 'mean' denominator), which rounds differently.
    for name, total, args, t in (case(*combo) for combo in combos):
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
