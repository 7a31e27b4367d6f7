"""Speed and memory of jaxce.cross_entropy vs optax and the plain log_softmax formula.

Usage (from the repository root, after `pip install -c constraints.txt -e ".[test]"`):

    python benchmarks/core.py                 # time at [4096, 32768] f32 + memory table
    python benchmarks/core.py --quick         # smaller time shape, same memory table

Time: `jax.jit(jax.value_and_grad(mean loss))`, compile excluded, the variants interleaved
in a random order each round, median of --repeats rounds after warm-up.
Memory: compile-only `memory_analysis()` on `jax.ShapeDtypeStruct` inputs (nothing is
allocated) of the same jitted value_and_grad, at [16384, 131072] by default.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxce


def jaxce_mean(x, y):
    return jaxce.cross_entropy(x, y)


def jaxce_smoothed_weighted(x, y, w):
    return jaxce.cross_entropy(x, y, w, label_smoothing=0.1)


def optax_mean(x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def plain_mean(x, y):
    lp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


VARIANTS = {"jaxce": jaxce_mean, "optax": optax_mean, "plain log_softmax": plain_mean}


def time_variants(n, c, dtype, repeats):
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (n, c), dtype)
    y = jax.random.randint(ky, (n,), 0, c)
    fns = {name: jax.jit(jax.value_and_grad(f)) for name, f in VARIANTS.items()}
    for f in fns.values():  # compile + warm up
        jax.block_until_ready(f(x, y))
        jax.block_until_ready(f(x, y))
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(repeats):
        # A fresh random order every round. The previous call matters: right after the
        # plain formula (which allocates and frees GiBs) any variant takes ~25-30 ms longer
        # at [4096, 32768], so a fixed rotation, where each variant mostly follows the same
        # one, would favour some variants.
        for name in order.sample(list(fns), len(fns)):
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](x, y))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def temp_bytes(fn, *specs, grad_only=False):
    transform = jax.grad if grad_only else jax.value_and_grad
    compiled = jax.jit(transform(fn)).lower(*specs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(n, c):
    rows = []
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    w = jax.ShapeDtypeStruct((c,), jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.ShapeDtypeStruct((n, c), dtype)
        cases = [(name, f, (x, y)) for name, f in VARIANTS.items()]
        cases.append(("jaxce weight+smoothing", jaxce_smoothed_weighted, (x, y, w)))
        for name, f, specs in cases:
            for grad_only in (False, True):
                rows.append(
                    {
                        "dtype": jnp.dtype(dtype).name,
                        "variant": name,
                        "transform": "grad" if grad_only else "value_and_grad",
                        "temp_bytes": temp_bytes(f, *specs, grad_only=grad_only),
                    }
                )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time at [1024, 8192] instead")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--memory-shape", type=int, nargs=2, default=(16384, 131072))
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    n, c = (1024, 8192) if args.quick else (4096, 32768)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({platform.machine()})")
    timing = time_variants(n, c, jnp.float32, args.repeats)
    print(f"\njit(value_and_grad(mean loss)) at [{n}, {c}] float32, median of {args.repeats}:")
    for name, ms in timing.items():
        print(f"  {name:<20} {ms:9.1f} ms   ({ms / timing['optax']:.2f}x optax)")

    mn, mc = args.memory_shape
    f32_logits = mn * mc * 4
    print(
        f"\ncompile-only temp_size_in_bytes at [{mn}, {mc}] (f32 logits = {f32_logits / 2**30:.2f} GiB):"
    )
    rows = memory_table(mn, mc)
    for r in rows:
        print(
            f"  {r['dtype']:<9} {r['variant']:<24} {r['transform']:<15}"
            f" {r['temp_bytes'] / 2**30:8.3f} GiB  ({r['temp_bytes'] / f32_logits:.3f}x f32 logits)"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"timing_ms": timing, "time_shape": [n, c], "memory": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
