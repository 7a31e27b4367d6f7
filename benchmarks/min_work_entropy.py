"""What ``return_entropy=True`` costs ``strategy="min_work"``: the temporaries and the
matmul work (in units of 2·N·D·V, loops weighted by their trip counts) of
``value_and_grad`` in (hidden, kernel), compile-only, with the entropy only read (the
loss alone) and with an entropy bonus (``loss + 0.01 * aux.entropy``), against
``min_memory`` and the plain loss.

    JAX_PLATFORMS=cpu python -m benchmarks.min_work_entropy f32 cpu h100 v5p
    JAX_PLATFORMS=cpu python -m benchmarks.min_work_entropy bf16 cpu h100 v5p

Results (jax 0.12.0.1, libtpu 0.0.52) are in docs/guides/fused.md.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

import jaxce
from benchmarks import targets, timemodel

SHAPES = {"f32": (8192, 2048, 131072, jnp.float32), "bf16": (16384, 4096, 131072, jnp.bfloat16)}
TARGETS = {
    "cpu": "cpu",
    "h100": targets.H100,
    "v5e": targets.TPU_V5E,
    "v5p": targets.TPU_V5P,
    "v6e": targets.TPU_V6E,
}
# name: (strategy, return_entropy, weight of aux.entropy in the objective)
VARIANTS = {
    "min_work, plain loss": ("min_work", False, 0.0),
    "min_work, entropy read": ("min_work", True, 0.0),
    "min_work, loss + 0.01 H": ("min_work", True, 0.01),
    "min_memory, entropy read": ("min_memory", True, 0.0),
    "min_memory, loss + 0.01 H": ("min_memory", True, 0.01),
}


def objective(strategy: str, entropy: bool, bonus: float):
    def loss(h, k, y):
        out = jaxce.linear_cross_entropy(h, k, y, strategy=strategy, return_entropy=entropy)
        if not entropy:
            return out
        return out[0] + bonus * out[1].entropy if bonus else out[0]

    return loss


def main(shape: str, names: list[str]) -> None:
    n, d, v, dtype = SHAPES[shape]
    specs = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    for name in names:
        for variant, options in VARIANTS.items():
            fn = jax.value_and_grad(objective(*options), (0, 1))
            compiled = targets.compile_for(TARGETS[name], fn, *specs)
            temp = targets.analyse(compiled).temp_bytes / 2**20
            work = timemodel.matmul_work(compiled.as_text(), n, d, v)
            print(f"{name:5s} {shape:5s} {variant:26s} {temp:9.1f} MiB  {work:5.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
