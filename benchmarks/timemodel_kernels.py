"""Checks benchmarks/timemodel.py's entry for Pallas kernels on tokamax's measured Mosaic
TPU kernel.

    JAX_PLATFORMS=cpu python -m benchmarks.timemodel_kernels --chip v5p|v6e [--every K]

The time model sees inside no custom call; a Pallas kernel that declares a
``CostEstimate`` is modelled from it as one operation, ``max(FLOPs / (peak · e_dot),
bytes / (bandwidth · e_bw))`` with the chip's fitted efficiencies
(``timemodel.CALIBRATION``, fitted on XLA programs only): the kernel's DMAs are assumed
to overlap its matmuls. tokamax's wheel ships the times its autotuner measured for its
own Mosaic kernel (``pallas_mosaic_tpu_linear_softmax_cross_entropy_loss[_vjp].json``),
whose ``pallas_call``\\ s declare their cost; this compiles the forward and backward
kernels with the measured block configuration for the same chip (compile-only) and
compares. Rows: ``reduction='mean'``, bfloat16 and float32 ``x``, no residuals returned.
Writes ``timemodel_kernels_<chip>.csv`` into benchmarks/results/compile-only/.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import cases, targets, timemodel
from benchmarks.measure import REPO, write
from benchmarks.timemodel_calibrate import CHIPS, _dims, _spec

NAMES = {
    "fwd": "pallas_mosaic_tpu_linear_softmax_cross_entropy_loss",
    "vjp": "pallas_mosaic_tpu_linear_softmax_cross_entropy_loss_vjp",
}


def measurements(chip_dir: str) -> dict[tuple, dict]:
    """{(x, w, lse): {"fwd"/"vjp": (median ms, config)}}, reduction='mean'."""
    import tokamax

    root = Path(tokamax.__file__).parent / "data" / "autotuning" / chip_dir
    out: dict[tuple, dict] = {}
    for kind, name in NAMES.items():
        for key, configs in json.loads((root / f"{name}.json").read_text()).items():
            k = json.loads(key)
            if k["reduction"] != "mean" or k["return_residuals"] or len(configs) != 1:
                continue
            ((config, value),) = configs.items()
            lse = k["residuals"][0] if "residuals" in k else None
            row = out.setdefault((k["x"], k["w"]), {})
            row[kind] = (statistics.median(value["evaluation_times_ms"]), json.loads(config))
            if lse:
                row["lse"] = lse
    return {k: v for k, v in out.items() if {"fwd", "vjp", "lse"} <= set(v)}


def program(kind, x, w, lse, config):
    """tokamax's forward or backward Mosaic kernel with the measured block sizes."""
    import jax
    import jax.numpy as jnp
    from tokamax._src.ops.linear_softmax_cross_entropy_loss import (
        pallas_mosaic_tpu_kernel as kernel,
    )

    xs, ws = _spec(x), _spec(w)
    labels = jax.ShapeDtypeStruct(xs.shape[:1], jnp.int32)
    blocks = {k: config[k] for k in ("b_block_size", "h_block_size", "v_block_size")}
    if kind == "fwd":
        fn = kernel.linear_softmax_cross_entropy_loss_fwd_pallas_mosaic_tpu
        return lambda x, y, w: fn(x, y, w, reduction="mean", **blocks)[0], (xs, labels, ws)
    fn = kernel.linear_softmax_cross_entropy_loss_bwd_pallas_mosaic_tpu
    extra = {"buffer_count": tuple(config["buffer_count"])} if "buffer_count" in config else {}
    dout = jax.ShapeDtypeStruct((), jnp.float32)

    def vjp(d, s, x, y, w):
        return fn(d, s, x, y, w, reduction="mean", **blocks, **extra)

    return vjp, (dout, _spec(lse), xs, labels, ws)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", choices=["v5p", "v6e"], default="v5p")
    parser.add_argument("--every", type=int, default=1, help="every k-th shape")
    args = parser.parse_args(argv)
    target, chip_dir = CHIPS[args.chip]
    eff = timemodel.calibrated(target)
    data = sorted(measurements(chip_dir).items())[:: args.every]
    devices = targets.devices(target)
    rows = []
    for (x, w), measured in data:
        (n, d), (_, v) = _dims(x), _dims(w)
        row = dict(target=target, x=x, w=w, tokens=n, hidden=d, vocab=v)
        for kind in ("fwd", "vjp"):
            ms, config = measured[kind]
            fn, specs = program(kind, x, w, measured["lse"], config)
            with cases.tokamax_context(target, devices):
                text = targets.compile_for(target, fn, *specs).as_text()
            modelled = timemodel.estimate(text, target, eff).seconds * 1e3
            row[f"{kind}_measured_ms"] = round(ms, 3)
            row[f"{kind}_model_ms"] = round(modelled, 3)
            row[f"{kind}_error"] = round(modelled / ms - 1, 3)
        total_m = row["fwd_measured_ms"] + row["vjp_measured_ms"]
        total = row["fwd_model_ms"] + row["vjp_model_ms"]
        row["total_error"] = round(total / total_m - 1, 3)
        rows.append(row)
        print(
            f"{x:>18} {w:>20}  fwd {row['fwd_measured_ms']:8.2f} ms model {row['fwd_error']:+.0%}"
            f"  vjp {row['vjp_measured_ms']:8.2f} ms model {row['vjp_error']:+.0%}"
            f"  total {row['total_error']:+.0%}",
            flush=True,
        )
    errors = sorted(abs(r["total_error"]) for r in rows)
    print(
        f"{args.chip}: {len(rows)} shapes; |total error| max {errors[-1]:.0%}, "
        f"median {statistics.median(errors):.0%}"
    )
    out = REPO / "benchmarks" / "results" / "compile-only" / f"timemodel_kernels_{args.chip}.csv"
    write(out, rows)
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
