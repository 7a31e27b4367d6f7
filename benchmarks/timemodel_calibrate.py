"""Calibrates benchmarks/timemodel.py on tokamax's published H100 measurements.

    JAX_PLATFORMS=cpu python -m benchmarks.timemodel_calibrate [--limit N] [--fit]

tokamax's wheel ships, per chip, the times its autotuner measured
(``tokamax/data/autotuning/<chip>/*linear_softmax_cross_entropy_loss*.json``): keys are
the call's arguments (``x``, ``w`` shapes, ``reduction``, …), values map a kernel config to
``evaluation_times_ms`` (5 runs) and ``peak_memory_mb``. The ``xla`` (materialised) and
``chunked_xla`` (b_block 1024 × v_block 2048, recompute) losses are plain JAX: their
forward and VJP functions are compiled here for the same chip (compile-only) and modelled.
Rows: ``reduction='mean'``, no residuals returned, shapes with all four measurements.
``--chip v5p``/``v6e``: tokamax's TPU v5p and v6e measurements alike. Writes
``timemodel_calibration_<chip>.csv`` (per shape: measured and modelled ms, errors, the
chunked/xla ratio) into benchmarks/results/compile-only/.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

from benchmarks import targets, timemodel
from benchmarks.measure import REPO, write

CACHE = Path(os.environ.get("JAXCE_HLO_CACHE", "/tmp/jaxce-timemodel-hlo"))
KINDS = {  # (tokamax json name, implementation, pass)
    "xla fwd": "linear_softmax_cross_entropy_loss",
    "xla vjp": "linear_softmax_cross_entropy_loss_vjp",
    "chunked fwd": "chunked_xla_linear_softmax_cross_entropy_loss",
    "chunked vjp": "chunked_xla_linear_softmax_cross_entropy_loss_vjp",
}
CHIPS = {  # --chip: (compile-only target, tokamax's measurement folder)
    "h100": (targets.H100, "nvidia_h100_80gb_hbm3"),
    "v5p": (targets.TPU_V5P, "tpu_v5"),  # device_kind "TPU v5" (v5e is "TPU v5 lite")
    "v6e": (targets.TPU_V6E, "tpu_v6_lite"),
}


def measurements(chip_dir: str) -> dict[tuple, dict[str, float]]:
    """{(x, w): {kind: median ms}} for reduction='mean' without residuals."""
    import tokamax

    root = Path(tokamax.__file__).parent / "data" / "autotuning" / chip_dir
    out: dict[tuple, dict[str, float]] = {}
    for kind, name in KINDS.items():
        for key, configs in json.loads((root / f"{name}.json").read_text()).items():
            k = json.loads(key)
            if k["reduction"] != "mean" or k["return_residuals"]:
                continue
            if len(configs) != 1:  # no measurement, or several configs
                continue
            (value,) = configs.values()
            times = out.setdefault((k["x"], k["w"]), {})
            times[kind] = statistics.median(value["evaluation_times_ms"])
            if "residuals" in k:  # the VJP's log-sum-exp input: bf16 for bf16 x
                times["lse"] = k["residuals"][0]
    return {k: v for k, v in out.items() if set(KINDS) <= set(v) and "lse" in v}


def _spec(text: str):
    import jax

    dtype, dims = text.rstrip("]").split("[")
    names = {"bf16": "bfloat16", "f32": "float32", "i32": "int32"}
    return jax.ShapeDtypeStruct(tuple(int(d) for d in dims.split(",")), names[dtype])


def programs(x: str, w: str, lse: str):
    """The four programs tokamax measured, as (function, argument specs)."""
    import jax
    import jax.numpy as jnp
    from tokamax._src.ops.linear_softmax_cross_entropy_loss import chunked_xla, reference

    xs, ws = _spec(x), _spec(w)
    labels = jax.ShapeDtypeStruct(xs.shape[:1], jnp.int32)
    lse = _spec(lse)
    dout = jax.ShapeDtypeStruct((), jnp.float32)
    blocks = dict(b_block_sz=1024, v_block_sz=2048)
    fwd = (xs, labels, ws)
    bwd = (dout, lse, xs, labels, ws)
    return {
        "xla fwd": (
            lambda x, y, w: reference.linear_softmax_cross_entropy_loss_fwd_reference(
                x, y, w, reduction="mean"
            )[0],
            fwd,
        ),
        "xla vjp": (
            lambda d, s, x, y, w: reference.linear_softmax_cross_entropy_loss_bwd_reference(
                d, s, x, y, w, reduction="mean"
            ),
            bwd,
        ),
        "chunked fwd": (
            lambda x, y, w: chunked_xla.linear_softmax_cross_entropy_loss_fwd_chunked_xla(
                x, y, w, reduction="mean", **blocks
            )[0],
            fwd,
        ),
        "chunked vjp": (
            lambda d, s, x, y, w: chunked_xla.linear_softmax_cross_entropy_loss_bwd_chunked_xla(
                d, s, x, y, w, reduction="mean", **blocks
            ),
            bwd,
        ),
    }


def hlo(target: str, x: str, w: str, kind: str, lse: str) -> str:
    """The optimized HLO of one measured program (cached on disk)."""
    import jax

    key = f"{target}|{x}|{w}|{kind}|" + (f"{lse}|" if "vjp" in kind else "") + jax.__version__
    tag = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = CACHE / f"{tag}.hlo"
    if not path.exists():
        fn, specs = programs(x, w, lse)[kind]
        CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(targets.compile_for(target, fn, *specs).as_text())
    return path.read_text()


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.rstrip("]").split("[")[1].split(","))


def table(target, data, eff):
    rows = []
    for (x, w), measured in data.items():
        (n, d), (_, v) = _dims(x), _dims(w)
        row = dict(target=target, x=x, w=w, tokens=n, hidden=d, vocab=v)
        for kind in KINDS:
            est = timemodel.estimate(hlo(target, x, w, kind, measured["lse"]), target, eff)
            row[f"{kind} measured ms"] = round(measured[kind], 3)
            row[f"{kind} model ms"] = round(est.seconds * 1e3, 3)
            row[f"{kind} matmuls"] = round(est.matmuls(n, d, v), 3)
        for impl in ("xla", "chunked"):
            for src in ("measured", "model"):
                row[f"{impl} total {src} ms"] = round(
                    row[f"{impl} fwd {src} ms"] + row[f"{impl} vjp {src} ms"], 3
                )
            row[f"{impl} total error"] = round(
                row[f"{impl} total model ms"] / row[f"{impl} total measured ms"] - 1, 3
            )
        for src in ("measured", "model"):
            row[f"ratio {src}"] = round(
                row[f"chunked total {src} ms"] / row[f"xla total {src} ms"], 3
            )
        row["ratio error"] = round(row["ratio model"] / row["ratio measured"] - 1, 3)
        rows.append(row)
    return rows


def fit(target, data):
    """Least squares on log(model / measured) over all 4 × shapes times: the 16- and
    32-bit matmul efficiencies, the bandwidth efficiency and the per-launch cost, by a grid
    search (the roofline's max() makes gradients useless)."""
    chip = timemodel.CHIPS[target]
    rows, prog, measured = [], [], []
    for (x, w), times in data.items():
        for kind in KINDS:
            for o in timemodel.ops(hlo(target, x, w, kind, times["lse"]), chip):
                rows.append(
                    (
                        o.flops16 / chip.flops16,
                        o.flops32 / chip.flops32,
                        o.bytes / chip.bandwidth,
                        o.count,
                    )
                )
                prog.append(len(measured))
            measured.append(times[kind] * 1e-3)
    a, prog, measured = np.array(rows), np.array(prog), np.log(np.array(measured))
    best = (math.inf, None)
    grid = itertools.product(
        np.arange(0.40, 1.21, 0.04),
        np.arange(0.30, 1.81, 0.06),
        np.arange(0.30, 1.01, 0.05),
        np.arange(0.0, 12.1e-6, 0.5e-6),
    )
    for e16, e32, ebw, launch in grid:
        op = np.maximum(a[:, 0] / e16 + a[:, 1] / e32, a[:, 2] / ebw) + a[:, 3] * launch
        err = np.log(np.bincount(prog, op)) - measured
        if (score := float(np.mean(err**2))) < best[0]:
            best = (score, (e16, e32, ebw, launch))
    e16, e32, ebw, launch = best[1]
    eff = timemodel.Efficiency(round(e16, 2), round(e32, 2), round(ebw, 2), round(launch, 7))
    print(f"fitted {eff}: rms log error {best[0] ** 0.5:.3f}", flush=True)
    return eff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", choices=list(CHIPS), default="h100")
    parser.add_argument("--limit", type=int, help="only the first N shapes (smoke run)")
    parser.add_argument("--every", type=int, default=1, help="every k-th shape (TPU: slow)")
    parser.add_argument("--fit", action="store_true", help="fit the efficiencies anew")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/compile-only")
    args = parser.parse_args(argv)
    target, folder = CHIPS[args.chip]
    data = measurements(folder)
    data = dict(sorted(data.items(), key=lambda kv: (kv[0][0].split("[")[0], _dims(kv[0][0]))))
    data = dict(list(data.items())[:: args.every][: args.limit])
    print(f"{len(data)} shapes with xla/chunked forward and VJP measured", flush=True)
    for i, ((x, w), times) in enumerate(data.items()):
        for kind in KINDS:
            hlo(target, x, w, kind, times["lse"])
        print(f"  compiled {i + 1}/{len(data)}: {x} {w}", flush=True)
    fitted = fit(target, data) if args.fit else timemodel.calibrated(target)
    rows = []
    for name, eff in (("peak", timemodel.PEAK), ("calibrated", fitted)):
        part = table(target, data, eff)
        for r in part:
            r["efficiency"] = name
        rows += part
        errs = [abs(r["ratio error"]) for r in part]
        tot = [abs(r[f"{i} total error"]) for r in part for i in ("xla", "chunked")]
        print(
            f"{name} ({timemodel.describe(eff)}): ratio |error| max {max(errs):.0%} "
            f"median {statistics.median(errs):.0%}; time |error| max {max(tot):.0%} "
            f"median {statistics.median(tot):.0%}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / f"timemodel_calibration_{args.chip}.csv", rows)
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
