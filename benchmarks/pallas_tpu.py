"""``implementation="pallas_tpu"`` against ``"xla_tpu"`` on the TPU compilers (deviceless).

    JAX_PLATFORMS=cpu python -m benchmarks.pallas_tpu [--chips v5e,v5p,v6e]

``value_and_grad`` of the mean of ``linear_cross_entropy(strategy="min_memory")`` w.r.t.
hidden and kernel, and of the materialised ``cross_entropy(h @ k, y)``, compiled for each
TPU generation at the issue's shapes: temporaries (``memory_analysis()``) and the time
model's milliseconds (``benchmarks/timemodel.py``; a Pallas kernel is modelled from the
cost it declares, the entry ``python -m benchmarks.timemodel_kernels`` checks against
tokamax's measured Mosaic kernel). Writes ``pallas_tpu.csv`` into
benchmarks/results/compile-only/.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxce
from benchmarks import targets, timemodel
from benchmarks.measure import REPO, write

SHAPES = [(16384, 4096, 131072, "bfloat16"), (8192, 2048, 131072, "float32")]
CHIPS = {"v5e": targets.TPU_V5E, "v5p": targets.TPU_V5P, "v6e": targets.TPU_V6E}


def variants():
    def fused(implementation):
        def loss(h, k, y):
            return jaxce.linear_cross_entropy(
                h, k, y, strategy="min_memory", implementation=implementation
            )

        return loss

    return {
        "materialised": lambda h, k, y: jaxce.cross_entropy(h @ k, y),
        "min_memory xla_tpu": fused("xla_tpu"),
        "min_memory pallas_tpu": fused("pallas_tpu"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", default="v5e,v5p,v6e")
    args = parser.parse_args(argv)
    rows = []
    for n, d, v, dtype in SHAPES:
        S = jax.ShapeDtypeStruct
        specs = (S((n, d), dtype), S((d, v), dtype), S((n,), jnp.int32))
        for chip in args.chips.split(","):
            target = CHIPS[chip]
            eff = timemodel.calibrated(target)
            base = None
            for name, loss in variants().items():
                compiled = targets.compile_for(target, jax.value_and_grad(loss, (0, 1)), *specs)
                est = timemodel.estimate(compiled.as_text(), target, eff)
                ms = est.seconds * 1e3
                base = base or ms
                row = dict(
                    chip=chip, shape=f"{n}x{d}x{v}", dtype=dtype, variant=name,
                    temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
                    model_ms=round(ms, 2), over_materialised=round(ms / base, 3),
                    matmuls=round(est.matmuls(n, d, v), 3),
                )  # fmt: skip
                rows.append(row)
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = REPO / "benchmarks" / "results" / "compile-only" / "pallas_tpu.csv"
    write(out, rows)
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
