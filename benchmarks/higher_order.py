"""Cost of forward mode and Hessian-vector products through the lean losses.

Usage (from the repository root, after `pip install -c constraints.txt -e ".[test]"`):

    python benchmarks/higher_order.py            # time + compile-only memory
    python benchmarks/higher_order.py --quick    # smaller time shapes

For `jaxce.cross_entropy` (mean, float32) and `jaxce.linear_cross_entropy` (mean, float32,
gradients w.r.t. hidden and kernel) it times, jitted, compile excluded, interleaved, median
of --repeats rounds: the gradient, the forward-mode JVP, and the Hessian-vector product as
forward-over-reverse (`jax.jvp(jax.grad(f), x, v)`), next to the same three for the plain
(unfused, autodiff) formula. It also reports compile-only `memory_analysis()` temporaries
of each at a large shape (nothing is allocated).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jaxce


def ce_plain(x, y):
    lp = jax.nn.log_softmax(x, axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


def ce_ours(x, y):
    return jaxce.cross_entropy(x, y)


def lin_plain(h, k, y):
    return ce_plain(jnp.dot(h, k, preferred_element_type=jnp.float32), y)


def lin_ours(h, k, y):
    return jaxce.linear_cross_entropy(h, k, y)


def transforms(f, nargs):
    """grad / jvp / hvp of ``f(*params, y)`` w.r.t. the first ``nargs`` arguments."""
    argnums = tuple(range(nargs))

    def grad(*a):
        return jax.grad(f, argnums)(*a)

    def jvp(*a):
        params, y, v = a[:nargs], a[nargs], a[nargs + 1 :]
        return jax.jvp(lambda *p: f(*p, y), params, v)

    def hvp(*a):
        params, y, v = a[:nargs], a[nargs], a[nargs + 1 :]
        return jax.jvp(lambda *p: jax.grad(f, argnums)(*p, y), params, v)

    return {"grad": grad, "jvp": jvp, "hvp (jvp of grad)": hvp}


def timed(fns, args, repeats):
    jitted = {name: jax.jit(f) for name, f in fns.items()}
    for name, f in jitted.items():
        jax.block_until_ready(f(*args[name]))
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in jitted}
    names = list(jitted)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(jitted[name](*args[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def temp_bytes(f, specs):
    return jax.jit(f).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def _suite(kind, shapes):
    if kind == "ce":
        n, c = shapes
        params = [jax.ShapeDtypeStruct((n, c), jnp.float32)]
        y = jax.ShapeDtypeStruct((n,), jnp.int32)
        return {"jaxce": transforms(ce_ours, 1), "plain": transforms(ce_plain, 1)}, params, y
    n, d, v = shapes
    params = [jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32)]
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    return {"jaxce": transforms(lin_ours, 2), "plain": transforms(lin_plain, 2)}, params, y


def _args(name, params, y, classes):
    key = jax.random.key(0)
    vals = []
    for i, p in enumerate(params):
        scale = 1.0 if i == 0 else 0.05
        vals.append(jax.random.normal(jax.random.fold_in(key, i), p.shape, p.dtype) * scale)
    yv = jax.random.randint(jax.random.fold_in(key, 99), y.shape, 0, classes)
    if name == "grad":
        return (*vals, yv)
    tangents = [
        jax.random.normal(jax.random.fold_in(key, 50 + i), p.shape) for i, p in enumerate(params)
    ]
    return (*vals, yv, *tangents)


def report(kind, time_shape, mem_shape, repeats):
    label = "cross_entropy" if kind == "ce" else "linear_cross_entropy"
    suite, params, y = _suite(kind, time_shape)
    classes = time_shape[-1]
    fns, args = {}, {}
    for variant, trs in suite.items():
        for tname, f in trs.items():
            fns[f"{variant} {tname}"] = f
            args[f"{variant} {tname}"] = _args(tname, params, y, classes)
    t = timed(fns, args, repeats)
    print(f"\n{label}, time at {time_shape} float32 (median of {repeats}, ms):")
    for variant in suite:
        g = t[f"{variant} grad"]
        row = "  ".join(
            f"{tname} {1e3 * t[f'{variant} {tname}']:8.1f} ({t[f'{variant} {tname}'] / g:4.2f}x grad)"
            for tname in suite[variant]
        )
        print(f"  {variant:6s} {row}")
    suite, params, y = _suite(kind, mem_shape)
    print(f"{label}, compile-only temporaries at {mem_shape} float32 (MiB):")
    for variant, trs in suite.items():
        cells = []
        for tname, f in trs.items():
            specs = (*params, y) if tname == "grad" else (*params, y, *params)
            cells.append(f"{tname} {temp_bytes(f, specs) / 2**20:10.1f}")
        print(f"  {variant:6s} " + "  ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller time shapes")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    ce_time = (1024, 8192) if args.quick else (4096, 32768)
    lin_time = (1024, 256, 4096) if args.quick else (4096, 512, 16384)
    report("ce", ce_time, (16384, 131072), args.repeats)
    report("linear", lin_time, (16384, 4096, 131072), args.repeats)


if __name__ == "__main__":
    main()
