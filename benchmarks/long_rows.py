"""Cross-entropy value_and_grad at the same element count, short vs long rows.

XLA:CPU's row reductions slow down per element once a row exceeds 32,768 classes; jaxce
reduces long rows as sub-rows (``jaxce/_core.py``). Prints jaxce, optax and a bare
``logsumexp`` (jitted, median of 5 after a warm-up) at [4096, 32768] and [1024, 131072].

    python benchmarks/long_rows.py
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

import jaxce


def _median_ms(fn, *args, rounds=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    for n, c in [(4096, 32768), (1024, 131072)]:
        x = jax.random.normal(jax.random.key(0), (n, c))
        y = jax.random.randint(jax.random.key(1), (n,), 0, c)
        ours = jax.jit(jax.value_and_grad(lambda x, y: jaxce.cross_entropy(x, y)))
        theirs = jax.jit(
            jax.value_and_grad(
                lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
            )
        )
        lse = jax.jit(lambda x, y: jax.nn.logsumexp(x, axis=-1))
        row = [f"{name} {_median_ms(f, x, y):.1f} ms" for name, f in
               (("jaxce", ours), ("optax", theirs), ("logsumexp only", lse))]  # fmt: skip
        print(f"[{n}, {c}] f32 value_and_grad: " + ", ".join(row))


if __name__ == "__main__":
    main()
