"""On a real GPU: does the portable forward's target-logit spelling cost time there?

jaxce's portable forward (``jaxce/_rows.py``) picks the target logit with a reduction of
``where(class == target, x, 0)`` rather than a gather: on the TPU compiler that fuses with
the row's other reductions (cost model 0.91 vs 1.37 ms at [4096, 32768] f32) and keeps
logits produced inside the jit unmaterialised. On a GPU, whether that extra reduction costs
wall-clock time is a question for a GPU. This script times, on the default device,
``jit(value_and_grad(mean loss))`` of:

* ``masked``: a minimal lse-only custom-VJP cross-entropy whose forward picks the target
  by the masked reduction (jaxce's portable spelling);
* ``gather``: the same loss picking it by ``take_along_axis``;
* ``jaxce`` and ``optax`` (``benchmarks/cases.py``).

All variants in one process on the same data, interleaved in a fresh random order each
round (``benchmarks/measure.py``), median of ``--rounds``. One CSV row per (shape,
variant). Usage, from the repository root:

    python -m benchmarks.gpu_spellings --out DIR [--rounds 20] [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import cases
from benchmarks.measure import interleaved, write


def _forward(x, y, masked):
    dtype = jnp.float32
    m = jnp.max(x, axis=-1, keepdims=True).astype(dtype)
    if masked:
        hit = lax.broadcasted_iota(jnp.int32, x.shape, 1) == y[:, None]
        x_y = jnp.sum(jnp.where(hit, x, jnp.zeros_like(x)), axis=-1, keepdims=True)
    else:
        x_y = jnp.take_along_axis(x, y[:, None], axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.exp(x.astype(dtype) - m), axis=-1, keepdims=True))
    return (lse - x_y.astype(dtype))[:, 0], lse


def _loss(masked):
    @jax.custom_vjp
    def loss(x, y):
        return _forward(x, y, masked)[0]

    def fwd(x, y):
        nll, lse = _forward(x, y, masked)
        return nll, (x, y, lse)

    def bwd(res, g):
        x, y, lse = res
        hit = lax.broadcasted_iota(jnp.int32, x.shape, 1) == y[:, None]
        p = jnp.exp(x.astype(jnp.float32) - lse) * g[:, None]
        return (p - jnp.where(hit, g[:, None], 0)).astype(x.dtype), None

    loss.defvjp(fwd, bwd)
    return lambda x, y: jnp.mean(loss(x, y))


VARIANTS = {
    "masked": _loss(True),
    "gather": _loss(False),
    "jaxce": cases.CE_LOSSES["jaxce"],
    "optax": cases.optax_ce,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (runs on a CPU)")
    args = parser.parse_args()
    shapes = (
        [(64, 1000, "float32")]
        if args.quick
        else [
            (4096, 32768, "float32"),
            (8192, 131072, "bfloat16"),
            (16384, 131072, "bfloat16"),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, c, dtype in shapes:
        x, y = cases.inputs((n, c), dtype)
        fns = {k: jax.jit(jax.value_and_grad(f)) for k, f in VARIANTS.items()}
        calls = {k: lambda f=f, a=(x, y): jax.block_until_ready(f(*a)) for k, f in fns.items()}
        base = dict(device=jax.devices()[0].device_kind, tokens=n, classes=c, dtype=dtype)
        for row in interleaved(calls, args.rounds, base, lambda: 1):
            ok = row["status"] == "ok"
            rows.append(dict(row, loss=float(fns[row["provider"]](x, y)[0]) if ok else ""))
            print(rows[-1], flush=True)
        del x, y, fns, calls
    write(args.out / "gpu_spellings.csv", rows)


if __name__ == "__main__":
    main()
