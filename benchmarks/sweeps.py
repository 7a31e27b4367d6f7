"""Sweeps of the fused loss's knobs: min_work's ``block_size`` and ``acc_dtype``, and
min_memory's ``chunk_size`` (compile-only, through the time model), and the precision of
min_work's 16-bit d-kernel accumulator (run here, on the CPU).

    python -m benchmarks.sweeps precision 8192x256x4096 8192,1024,512,256,128,64 bfloat16
    python -m benchmarks.sweeps blocks h100,v5e,v5p,v6e 16384x4096x131072 512,1024,2048,4096 \
        bfloat16 --csv benchmarks/results/compile-only/min_work_blocks.csv
    python -m benchmarks.sweeps chunks h100,v5p 16384x4096x131072 256,1024,4096 bfloat16
    python -m benchmarks.sweeps chunks h100,v5e,v5p,v6e 8192x2048x131072 default float32

(``default``: the block or chunk the loss picks for that target itself.)

Rows are ``value_and_grad`` of the mean in ``hidden`` and ``kernel``: temporaries (MiB),
modelled time (ms, :mod:`benchmarks.timemodel` with each chip's calibrated efficiencies)
and its ratio to the materialised loss ``jaxce.cross_entropy(h @ k, y)`` on the same
target. TPU targets need ``flock /tmp/tpu.lock`` around the command where several
processes share libtpu.
"""

from __future__ import annotations

import argparse
import csv
import sys
from functools import partial

TARGET_NAMES = {
    "h100": "gpu:NVIDIA H100 80GB HBM3",
    "v5e": "tpu:v5e:1x1",
    "v5p": "tpu:v5p:1x1x1",
    "v6e": "tpu:v6e:1x1",
}


def _shape(text):
    return tuple(int(x) for x in text.split("x"))


def precision(shape, blocks, dtype):
    """Relative Frobenius error of min_work's d kernel against the float64 formula on the
    same 16-bit inputs, float32 vs ``dtype`` accumulation, per block size."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxce

    n, d, v = shape
    dt = jnp.dtype(dtype)
    h = jax.random.normal(jax.random.key(0), (n, d)).astype(dt)
    k = (jax.random.normal(jax.random.key(1), (d, v)) * (4 / np.sqrt(d))).astype(dt)
    y = jax.random.randint(jax.random.key(2), (n,), 0, v)
    h64, k64 = np.asarray(h, np.float64), np.asarray(k, np.float64)
    z = h64 @ k64
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(n), np.asarray(y)] -= 1
    ref = h64.T @ (p / n)
    del z, p

    def error(g):
        return float(np.linalg.norm(np.asarray(g, np.float64) - ref) / np.linalg.norm(ref))

    rows = []
    for block in blocks:
        row = dict(shape=f"{n}x{d}x{v}", dtype=dt.name, block=block, blocks=-(-n // block))
        for name, acc in (("float32", None), (dt.name, dt)):
            loss = partial(
                jaxce.linear_cross_entropy, strategy="min_work", block_size=block, acc_dtype=acc
            )
            grad = jax.jit(jax.grad(lambda k, loss=loss: loss(h, k, y)))
            row[f"error_acc_{name}"] = f"{error(grad(k)):.2e}"
        rows.append(row)
        print(row, flush=True)
    rounding = error(jnp.asarray(ref).astype(dt))
    print(f"the float64 d kernel rounded to {dt.name}: {rounding:.2e}")
    return rows


def _specs(shape, dtype):
    import jax
    import jax.numpy as jnp

    n, d, v = shape
    dt = jnp.dtype(dtype)
    return (
        jax.ShapeDtypeStruct((n, d), dt),
        jax.ShapeDtypeStruct((d, v), dt),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )


def _modelled(target, loss, specs, shape):
    """(temporaries MiB, modelled ms, matmul work) of value_and_grad of ``loss``."""
    import jax

    from benchmarks import targets
    from benchmarks import timemodel as tm

    compiled = targets.compile_for(target, jax.value_and_grad(loss, (0, 1)), *specs)
    temp = targets.analyse(compiled).temp_bytes
    est = tm.estimate(compiled.as_text(), tm.CHIPS[target], tm.calibrated(target))
    return round(temp / 2**20, 1), round(est.seconds * 1e3, 2), round(est.matmuls(*shape), 3)


def compile_sweep(kind, target_names, shape, values, dtype):
    """Per target: the materialised loss, then min_work per block (``kind="blocks"``;
    float32 and 16-bit accumulation) or min_memory per chunk (``kind="chunks"``)."""
    import jax.numpy as jnp

    import jaxce

    specs, rows = _specs(shape, dtype), []
    for name in target_names:
        target = TARGET_NAMES[name]
        base = dict(target=name, shape="x".join(map(str, shape)), dtype=jnp.dtype(dtype).name)
        temp, ms, work = _modelled(
            target, lambda h, k, y: jaxce.cross_entropy(h @ k, y), specs, shape
        )
        rows.append(dict(base, variant="materialised", size="", temp_mib=temp, model_ms=ms,
                         ratio=1.0, matmuls=work))  # fmt: skip
        accs = [None] if kind == "chunks" or jnp.dtype(dtype).itemsize >= 4 else [None, dtype]
        for value in values:
            for acc in accs:
                if kind == "blocks":
                    variant = "min_work" if acc is None else f"min_work acc_dtype={dtype}"
                    loss = partial(jaxce.linear_cross_entropy, strategy="min_work",
                                   block_size=value, acc_dtype=acc)  # fmt: skip
                else:
                    variant = "min_memory"
                    loss = partial(jaxce.linear_cross_entropy, strategy="min_memory",
                                   chunk_size=value)  # fmt: skip
                t, m, w = _modelled(target, loss, specs, shape)
                size = "default" if value is None else value
                rows.append(dict(base, variant=variant, size=size, temp_mib=t, model_ms=m,
                                 ratio=round(m / ms, 3), matmuls=w))  # fmt: skip
                print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweeps", description=__doc__)
    parser.add_argument("kind", choices=["precision", "blocks", "chunks"])
    parser.add_argument("args", nargs="+", help="[targets] shape values dtype")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    opts = parser.parse_args(argv)
    if opts.kind == "precision":
        shape, values, dtype = opts.args
        rows = precision(_shape(shape), [int(x) for x in values.split(",")], dtype)
    else:
        names, shape, values, dtype = opts.args
        values = [None if x == "default" else int(x) for x in values.split(",")]
        rows = compile_sweep(opts.kind, names.split(","), _shape(shape), values, dtype)
    if opts.csv:
        with open(opts.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
