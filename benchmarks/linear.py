"""Fused linear cross-entropy: memory (compile-only) and time vs the unfused JAX version.

Usage (repository root, after `pip install -c constraints.txt -e ".[test]"`):

    python benchmarks/linear.py            # memory at Liger's shape + time at 4096x512x16384
    python benchmarks/linear.py --processes   # also: one fresh process per variant, peak RSS

Memory: `memory_analysis().temp_size_in_bytes` of
`jit(value_and_grad(loss, argnums=(0, 1)))` on `jax.ShapeDtypeStruct`s (nothing allocated),
fused `jaxce.linear_cross_entropy` vs unfused `jaxce.cross_entropy(hidden @ kernel, y)`.
Time: the same jitted function on real float32 arrays, interleaved rounds, median; and
torch's `F.linear_cross_entropy` (reference path) on the same data for comparison.
--processes: each variant (jaxce fused / unfused, torch reference / chunked path with
`torch.nn.LinearCrossEntropyOptions()`) in its own process doing warm-up + one timed
forward+backward; reports that time and the process's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxce


def fused(h, k, y):
    return jaxce.linear_cross_entropy(h, k, y)


def unfused(h, k, y):
    return jaxce.cross_entropy(h @ k, y)


def temp_bytes(fn, n, d, v, dtype):
    specs = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    return grad.lower(*specs).compile().memory_analysis().temp_size_in_bytes


def time_jax(n, d, v, repeats):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((d, v)) * d**-0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, v, n))
    fns = {
        "jaxce fused": jax.jit(jax.value_and_grad(fused, argnums=(0, 1))),
        "unfused": jax.jit(jax.value_and_grad(unfused, argnums=(0, 1))),
    }
    for f in fns.values():
        jax.block_until_ready(f(h, k, y))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % 2 :] + names[: r % 2]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](h, k, y))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}, (h, k, y)


def time_torch(h, k, y, repeats):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    ht = torch.tensor(np.asarray(h), requires_grad=True)
    wt = torch.tensor(np.asarray(k).T.copy(), requires_grad=True)  # torch's [V, D] layout
    yt = torch.tensor(np.asarray(y), dtype=torch.int64)
    ts = []
    for _ in range(repeats + 1):
        ht.grad = wt.grad = None
        t0 = time.perf_counter()
        F.linear_cross_entropy(ht, wt, yt).backward()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:]) * 1e3


def _data(n, d, v):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, d)).astype(np.float32)
    k = (rng.standard_normal((d, v)) * d**-0.5).astype(np.float32)
    return h, k, rng.integers(0, v, n)


def one_process(variant, n, d, v):
    """Runs in a child process: warm-up, then one timed forward+backward; prints a line."""
    h, k, y = _data(n, d, v)
    if variant.startswith("jaxce"):
        fn = fused if variant == "jaxce fused" else unfused
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        args = (jnp.asarray(h), jnp.asarray(k), jnp.asarray(y))
        jax.block_until_ready(step(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(step(*args))
    else:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(2)
        ht = torch.tensor(h, requires_grad=True)
        wt = torch.tensor(k.T.copy(), requires_grad=True)
        yt = torch.tensor(y)
        options = torch.nn.LinearCrossEntropyOptions() if variant == "torch chunked" else None
        F.linear_cross_entropy(ht, wt, yt, options=options).backward()
        ht.grad = wt.grad = None
        t0 = time.perf_counter()
        F.linear_cross_entropy(ht, wt, yt, options=options).backward()
    ms = (time.perf_counter() - t0) * 1e3
    print(f"{ms:.1f} {_peak_rss_mib():.0f}")


def _peak_rss_mib():
    """This process's peak resident memory. /proc's VmHWM, since ru_maxrss survives exec
    on Linux (a child would report at least its parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


VARIANTS = ("jaxce fused", "jaxce unfused", "torch reference", "torch chunked")


def processes(n, d, v):
    print(
        f"\none fresh process per variant, {n} x {d} x {v} float32 (inputs ~ "
        f"{(n * d + d * v) * 4 / 2**20:.0f} MiB, logits {n * v * 4 / 2**20:.0f} MiB):"
    )
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, str(n), str(d), str(v)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        print(f"  {variant:<16} {float(out[0]):8.1f} ms   peak RSS {float(out[1]):7.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--processes", action="store_true", help="also run one process per variant")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, n, d, v = args.child
        one_process(variant, int(n), int(d), int(v))
        return

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    n, d, v = 16384, 4096, 131072
    print(
        f"\ncompile-only temp_size_in_bytes, value_and_grad wrt (hidden, kernel), {n} x {d} x {v}:"
    )
    for dtype in (jnp.float32, jnp.bfloat16):
        f, u = temp_bytes(fused, n, d, v, dtype), temp_bytes(unfused, n, d, v, dtype)
        print(
            f"  {jnp.dtype(dtype).name:<9} fused {f / 2**30:7.3f} GiB   unfused {u / 2**30:7.3f} GiB"
            f"   ratio {f / u:.3%}"
        )
    n, d, v = 4096, 512, 16384
    timing, data = time_jax(n, d, v, args.repeats)
    print(f"\ntime, value_and_grad wrt (hidden, kernel), {n} x {d} x {v} float32, median:")
    for name, ms in timing.items():
        print(f"  {name:<14} {ms:8.1f} ms  ({ms / timing['unfused']:.2f}x unfused)")
    try:
        print(
            f"  {'torch F.linear_cross_entropy (reference path)':<14} {time_torch(*data, args.repeats):8.1f} ms"
        )
    except ImportError:
        print("  (torch not installed: skipped)")
    if args.processes:
        processes(n, d, v)


if __name__ == "__main__":
    main()
