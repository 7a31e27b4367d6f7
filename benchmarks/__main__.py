"""jaxce benchmarks: time and memory of jaxce vs optax, the plain formula, torch, tokamax.

    python -m benchmarks [SECTION ...] [--gpu] [--quick] [--out DIR] [--budget-s S]

Each section writes CSV files named after it (peak: peak_rss.csv, linear_memory:
linear.csv); targets also writes targets.md. Default: every section but targets; --gpu:
the GPU ones, sized for one 80+ GB GPU. Results go to benchmarks/results/<device>/
(targets alone: results/compile-only/; --quick: tiny shapes, into /tmp/jaxce-bench/), then
plots.py draws the figures. Only jaxce's public API is used.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import time
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts

import jax
import numpy as np

from benchmarks import cases, targets
from benchmarks.measure import REPO, compiled, interleaved, run_child, write

T0, DTYPES = time.time(), ("float32", "bfloat16")
PUBLISHED = (  # (name, tokens, hidden, vocab): Liger-Kernel's and Cut Cross-Entropy's
    ("Liger FLCE", 32768, 4096, 128256),
    ("Liger CE", 16384, 4096, 131072),
    ("CCE Gemma 2 2B", 8192, 2304, 256000),
)
CPU = {
    "ce_time": (4096, (1024, 4096, 16384, 32768, 131072)),
    "ce_memory": (16384, (1024, 4096, 16384, 32768, 65536, 131072, 262144)),
    "peak": (4096, (4096, 32768, 131072), ("jaxce", "optax", "torch")),
    "linear_memory": PUBLISHED,
    # the last: three ~69 GFLOP matmuls, compute-bound (the strategies against torch's)
    "linear_time": (
        (4096, 512, 16384, "float32"),
        (4096, 512, 16384, "bfloat16"),
        (2048, 1024, 16384, "float32"),
    ),
    "linear_peak": ((8192, 512, 32768, "float32"),),
    "higher_order": ((4096, 32768), (4096, 512, 16384), (16384, 131072), (16384, 4096, 131072)),
    # CE (v5e: half the tokens above 32k classes), fused linear, the 4-chip
    # vocabulary-parallel shape
    "targets": (
        ((4096, 32768, "float32"), (8192, 131072, "bfloat16")),
        (
            (16384, 4096, 131072, "bfloat16"),
            (8192, 2048, 131072, "float32"),
            (16384, 4096, 131072, "float32"),
        ),
        (16384, 4096, 131072),
    ),
    # value_and_grad of the mean, modelled: the shape and tokamax's measured one
    "timemodel": {
        "targets": (targets.H100, targets.TPU_V5P, targets.TPU_V6E, targets.TPU_V5E),
        "shapes": (
            (16384, 4096, 131072, "bfloat16"),
            (16384, 4096, 128256, "bfloat16"),
            (8192, 2048, 131072, "float32"),
        ),
    },
    "repeats": 5,
    "child_timeout": 900,
}
GPU = dict(
    CPU,
    ce_time=(16384, (4096, 16384, 32768, 131072)),
    ce_memory=(16384, (4096, 32768, 131072, 262144)),
    peak=(16384, (131072,), ("jaxce", "optax", "plain log_softmax", "torch")),
    linear_time=(*[(*p[1:], "bfloat16") for p in PUBLISHED[1:]], (8192, 2048, 32768, "float32")),
    linear_peak=((*PUBLISHED[0][1:], "bfloat16"),),
    repeats=10,
    child_timeout=150,
)


def tiny(sizes):
    """--quick: every size ÷ 16 (at least 64), three rounds."""
    if isinstance(sizes, dict):
        return {k: tiny(v) if k != "child_timeout" else v for k, v in sizes.items()} | {
            "repeats": 3
        }
    if isinstance(sizes, tuple):
        return tuple(map(tiny, sizes))
    return max(64, sizes // 16) if isinstance(sizes, int) and sizes > 64 else sizes


# Children first, while this process holds no GPU memory. linear_memory's compile-only rows
# are in targets' H100/H200 ones (compiling its matmuls here would autotune them).
GPU_SECTIONS = ["peak", "linear_peak", "ce_time", "linear_time", "ce_memory"]


class Run:
    """What the sections share: sizes, the time left, the log, JAX's backend and torch."""

    def __init__(self, sizes, budget, target_names):
        self.sizes, self.end, self.targets = sizes, T0 + (budget or 1e9), target_names
        self.gpu, self.torch, self.note = jax.default_backend() == "gpu", None, "not installed"
        self.dev = "cuda" if self.gpu else "cpu"
        with contextlib.suppress(ImportError):
            from benchmarks import torch_side as ts

            self.note = ts.torch.__version__ + ("" if ts.torch.cuda.is_available() else ", CPU")
            self.torch = ts if not self.gpu or ts.torch.cuda.is_available() else None

    def left(self):
        return self.end - time.time()

    def log(self, msg):
        print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)

    def timing(self, base, calls):
        rows = interleaved(calls, self.sizes["repeats"], base, self.left)
        self.log(", ".join(f"{r['provider']} {r['median_ms'] or r['status']}" for r in rows))
        gc.collect()
        if self.torch and self.gpu:
            self.torch.torch.cuda.empty_cache()
        return rows

    def children(self, shapes, variants):
        rows, torch = [], ("torch", *self.torch.LINEAR) if self.torch else ()
        for shape, dtype in shapes:
            for variant in (v for v in variants if v in torch or not v.startswith("torch")):
                spec = dict(variant=variant, dtype=dtype, shape=shape, device=self.dev)
                timeout = min(self.sizes["child_timeout"], self.left())
                res = run_child(spec, timeout) if timeout > 0 else {"status": "skipped: budget"}
                rows.append(dict(variant=variant, dtype=dtype, shape=join(shape), **res))
                self.log(f"{variant} {join(shape)} {dtype}: {res.get('step_mib')} MiB")
        return rows

    def compile_rows(self, target, todo):
        """Compile-only rows for ``todo``, [(row, (specs, {variant: loss}, argnums,
        shardings))]: value_and_grad w.r.t. argnums (None: the loss itself)."""
        rows, devices = [], targets.devices(target)
        for row, (specs, variants, argnums, shardings) in todo:
            done = []
            for variant, f in variants.items() if self.left() > 0 else ():
                tok = variant == "tokamax" and cases.tokamax_context(target, devices)
                f = f if argnums is None else jax.value_and_grad(f, argnums)
                mem, c = compiled(target, f, *specs, context=tok, shardings=shardings)
                if shardings and c:  # the kernel's [D, V]
                    mem["all_gather"] = all_gathers(c.as_text(), *specs[1].shape)
                done.append(dict(row, variant=variant, **mem))
            cells = [f"{r['variant']} {cell(r)}" for r in done]
            self.log(" | ".join([*map(str, row.values()), *cells]))
            rows += done
        return rows


def join(shape):
    return "x".join(map(str, shape))


def call(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def ce_time(run):
    (n, classes), rows = run.sizes["ce_time"], []
    for dtype in DTYPES:
        for c in classes:
            run.log(f"ce_time {dtype} [{n}, {c}]")
            x, y = cases.inputs((n, c), dtype)
            grad = {k: jax.jit(jax.value_and_grad(f)) for k, f in cases.CE_LOSSES.items()}
            calls = {k: call(f, x, y) for k, f in grad.items()}
            if run.torch:
                calls["torch"] = run.torch.from_jax("torch", (x, y), run.dev)
            calls["floor"] = call(jax.jit(cases.floor_pass), x)
            calls["lse pass"] = call(jax.jit(cases.lse_pass), x)
            rows += run.timing({"dtype": dtype, "tokens": n, "classes": c}, calls)
            del calls, x, y
    return {"ce_time.csv": rows}


def ce_memory(run):
    (n, classes), todo = run.sizes["ce_memory"], []
    for d in DTYPES:
        todo += [
            (dict(dtype=d, tokens=n, classes=c), cases.ce_cases(n, c, d)["index"]) for c in classes
        ]
    return {"ce_memory.csv": run.compile_rows("local", todo)}


def peak(run):
    n, classes, variants = run.sizes["peak"]
    return {"peak_rss.csv": run.children([((n, c), d) for d in DTYPES for c in classes], variants)}


def linear_memory(run):
    todo = []
    for dtype in DTYPES:
        for name, n, d, v in run.sizes["linear_memory"]:
            row = dict(shape_name=name, tokens=n, hidden=d, vocab=v, dtype=dtype)
            todo.append((row, cases.linear_case(n, d, v, dtype)))
    return {"linear.csv": run.compile_rows("local", todo)}


def linear_time(run):
    rows = []
    for n, d, v, dtype in run.sizes["linear_time"]:
        run.log(f"linear_time {n}x{d}x{v} {dtype}")
        # float32 matmuls at full precision everywhere (torch's CUDA default: no TF32)
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            args = cases.inputs((n, d, v), dtype)
            grad = partial(jax.value_and_grad, argnums=(0, 1))
            calls = {k: call(jax.jit(grad(f)), *args) for k, f in cases.LINEAR_LOSSES.items()}
            for variant in run.torch.LINEAR if run.torch else ():
                calls[variant] = run.torch.from_jax(variant, args, run.dev)
            rows += run.timing({"dtype": dtype, "tokens": n, "hidden": d, "vocab": v}, calls)
        del calls, args
    return {"linear_time.csv": rows}


def linear_peak(run):
    variants = [*cases.LINEAR_LOSSES, "torch reference", "torch chunked"]
    shapes = [((n, d, v), dtype) for n, d, v, dtype in run.sizes["linear_peak"]]
    return {"linear_peak.csv": run.children(shapes, variants)}


def transform(kind, p, f):
    """grad, jvp or HVP (jvp of grad) of ``f`` w.r.t. its first ``p`` inputs, as a function
    of (*inputs, y, *tangents)."""
    grad = jax.grad(f, tuple(range(p)))
    if kind == "grad":
        return lambda *a: grad(*a[: p + 1])
    inner = f if kind == "jvp" else grad
    return lambda *a: jax.jvp(lambda *x: inner(*x, a[p]), a[:p], a[p + 1 :])


def higher_order(run):
    """grad, jvp and HVP of jaxce and the plain formula (float32): time and temporaries."""
    ce_t, lin_t, ce_m, lin_m = run.sizes["higher_order"]
    fused, unfused = cases.LINEAR_LOSSES["jaxce fused"], cases.LINEAR_LOSSES["plain unfused"]
    times, memory = [], []
    for loss, shape, big, jaxce_f, plain_f in (
        ("cross_entropy", ce_t, ce_m, cases.CE_LOSSES["jaxce"], cases.plain_ce),
        ("linear_cross_entropy", lin_t, lin_m, fused, unfused),
    ):
        variants, p = (("jaxce", jaxce_f), ("plain", plain_f)), len(shape) - 1
        todo = [(v, t, transform(t, p, f)) for t in ("grad", "jvp", "hvp") for v, f in variants]
        run.log(f"higher_order {loss} {shape}")
        args = (*cases.inputs(shape, "float32"), *cases.inputs(shape, "float32", 1)[:-1])
        calls = {f"{v} {t}": call(jax.jit(g), *args) for v, t, g in todo}
        times += run.timing({"loss": loss, "shape": join(shape), "dtype": "float32"}, calls)
        del args, calls
        *specs, ys = jax.eval_shape(partial(cases.inputs, big, "float32"))
        base = dict(loss=loss, shape=join(big))
        todo = [
            (dict(base, transform=t), ((*specs, ys, *specs), {v: g}, None, None))
            for v, t, g in todo
        ]
        memory += run.compile_rows("local", todo)
    return {"higher_order.csv": times, "higher_order_memory.csv": memory}


def all_gathers(hlo, d, v):
    """Which all-gathers an HLO text has: 'none', or of the 'kernel' ([d, v]), the 'logits'
    ([tokens, v]) or 'other' arrays."""
    kinds = set()
    for m in re.finditer(r"= (.*?) all-gather(?:-start)?\(", hlo):  # an async start: a tuple
        for shape in re.findall(r"\[([\d,]+)\]", m.group(1)):
            dims = {int(s) for s in shape.split(",")}
            kinds.add("other" if v not in dims else "kernel" if d in dims else "logits")
    return "+".join(sorted(kinds)) or "none"


def compile_only(run):
    """The targets section: value_and_grad of each case compiled for each target."""
    ce_shapes, linear_shapes, sharded = run.sizes["targets"]
    rows = []
    for target in run.targets:
        if why := targets.available(target):
            run.log(f"{target}: unavailable ({why})")
            rows.append(dict(target=target, case="unavailable", status=f"unavailable: {why}"))
            continue
        devices, todo = targets.devices(target), []  # [(case, dtype, shape, spec)]
        impl, one = "mosaic_tpu" if target.startswith("tpu") else "chunked_xla", len(devices) == 1
        if not one:
            mesh = jax.sharding.Mesh(np.array(devices).reshape(2, -1), ("data", "model"))
            todo.append(
                ("sharded 2x2 mesh", "bfloat16", sharded, cases.sharded_case(mesh, *sharded))
            )
        else:
            for n, c, dtype in ce_shapes:
                n = n // 2 if "v5e" in target and c > 32768 else n  # 16 GiB of HBM
                ce = cases.ce_cases(n, c, dtype, impl)
                todo += [(k, dtype, (n, c), v) for k, v in ce.items()]
            for n, d, v, dtype in linear_shapes:
                todo.append(
                    ("fused linear", dtype, (n, d, v), cases.linear_case(n, d, v, dtype, impl))
                )
        todo = [(dict(target=target, case=k, dtype=dt, shape=join(sh)), v) for k, dt, sh, v in todo]
        rows += run.compile_rows(target, todo)
    ce = [r for r in rows if r.get("case") not in ("fused linear", "sharded 2x2 mesh")]
    table = "Temporaries in MiB (TPU cost model ms); tokamax: mosaic_tpu on TPU, chunked_xla on"
    table += " CPU/GPU; sharded: which all-gathers the HLO has.\n\n" + markdown(ce)
    print(table := table + "\n" + markdown([r for r in rows if r not in ce]))
    return {"targets.csv": rows, "targets.md": table}


def cell(r):
    if r is None or r["status"] != "ok":
        return r["status"][:40] if r else ""
    ms = f" ({r['model_ms']:.2f} ms)" if r["model_ms"] != "" else ""
    return f"{r['temp_bytes'] / 2**20:,.1f}{ms} {r.get('all_gather', '')}".strip()


def markdown(rows):
    """Per target and case, a cell per variant."""
    key = lambda r: (r["target"], r.get("case", ""), r.get("dtype", ""), r.get("shape", ""))  # noqa: E731
    variants = list(dict.fromkeys(r["variant"] for r in rows if "variant" in r))
    out = ["| target | case | dtype | shape | " + " | ".join(variants) + " |"]
    out.append("|---" * (4 + len(variants)) + "|")
    for k in dict.fromkeys(map(key, rows)):
        found = {r.get("variant"): r for r in rows if key(r) == k}
        out.append("| " + " | ".join([*k, *(cell(found.get(v)) for v in variants)]) + " |")
    return "\n".join(out) + "\n"


def timemodel(run):
    """Roofline time (benchmarks/timemodel.py, calibrated on tokamax's H100 measurements)
    of value_and_grad of the fused and materialised linear losses, per target."""
    from benchmarks import timemodel as tm

    rows = []
    for target in run.sizes["timemodel"]["targets"]:
        if target not in run.targets:  # --targets
            continue
        if why := targets.available(target):
            run.log(f"{target}: unavailable ({why})")
            continue
        chip, eff = tm.CHIPS[target], tm.calibrated(target)
        for n, d, v, dtype in run.sizes["timemodel"]["shapes"]:
            specs, variants, argnums, _ = cases.linear_case(n, d, v, dtype)
            variants = {k: variants[k] for k in TIMEMODEL_VARIANTS}
            if np.dtype(dtype).itemsize == 2:  # min_work's d kernel accumulated in 16 bits
                variants["jaxce min_work 16-bit acc"] = cases.min_work_16bit_acc(dtype)
            if target.startswith("gpu"):  # tokamax's XLA losses (its TPU kernel is opaque)
                for impl in ("xla", "chunked_xla"):
                    variants[f"tokamax {impl}"] = cases.tokamax_loss(impl)
            for variant, f in variants.items() if run.left() > 0 else ():
                tok = variant.startswith("tokamax") and cases.tokamax_context(
                    target, targets.devices(target)
                )
                mem, c = compiled(target, jax.value_and_grad(f, argnums), *specs, context=tok)
                row = dict(target=target, chip=chip.name, shape=join((n, d, v)), dtype=dtype)
                row.update(variant=variant, status=mem["status"])
                if c is not None:
                    est, peak = tm.estimate(c.as_text(), chip, eff), None
                    peak = tm.estimate(c.as_text(), chip, tm.PEAK)
                    used = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
                    row.update(
                        model_ms=round(est.seconds * 1e3, 2),
                        roofline_ms=round(peak.seconds * 1e3, 2),
                        matmuls=round(est.matmuls(n, d, v), 3),
                        tflop=round(est.flops / 1e12, 2),
                        hbm_gb=round(est.bytes / 1e9, 2),
                        launches=int(est.launches),
                        temp_mib=round(mem["temp_bytes"] / 2**20, 1),
                        fits_hbm=used <= chip.hbm,
                        xla_cost_model_ms=mem["model_ms"],
                        efficiency=tm.describe(eff),
                    )
                rows.append(row)
            done = [r for r in rows if r["target"] == target and r["shape"] == join((n, d, v))]
            run.log(
                f"{target} {join((n, d, v))}: "
                + ", ".join(f"{r['variant']} {r.get('model_ms', r['status'])} ms" for r in done)
            )
    return {"timemodel.csv": rows}


TIMEMODEL_VARIANTS = ("jaxce fused", "jaxce min_work", "jaxce unfused", "optax unfused")

SECTIONS = {
    "ce_time": ce_time,
    "ce_memory": ce_memory,
    "peak": peak,
    "linear_memory": linear_memory,
    "linear_time": linear_time,
    "linear_peak": linear_peak,
    "higher_order": higher_order,
    "targets": compile_only,
    "timemodel": timemodel,
}


def device_name():
    if jax.default_backend() != "cpu":
        return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")
    with open("/proc/cpuinfo") as fh:
        name = next((ln.split(":")[1] for ln in fh if ln.startswith("model name")), "")
    name = re.sub(r"\((R|TM)\)|\b(CPU|Processor)\b|@.*", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", f"cpu-{name}-{os.cpu_count()}c".lower())


def merged(path, meta):
    """``meta`` over the folder's earlier meta.json, keeping other sections' sizes, times
    and commands (compile-only: targets and timemodel share the folder)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    if old.get("label") != meta["label"]:
        return meta
    runs = {s: old.get("command", "") for s in old.get("seconds", {})} | old.get("commands", {})
    runs |= {s: f"{meta['command']} ({meta['date']}, {meta['git']})" for s in meta["seconds"]}
    keep = {k: {**old.get(k, {}), **meta[k]} for k in ("seconds", "sizes")}
    return {**old, **meta, **keep, "commands": runs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"some of: {', '.join(SECTIONS)}")
    parser.add_argument("--gpu", action="store_true", help="the GPU sections and sizes")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--repeats", type=int, help="timed rounds (the median of these)")
    parser.add_argument("--budget-s", type=float, help="start no work after S s (--gpu: 400)")
    parser.add_argument("--targets", default=",".join((*targets.ALL, targets.TPU_V5P_4)))
    args = parser.parse_args(argv)
    sections = args.sections or (
        GPU_SECTIONS if args.gpu else [s for s in SECTIONS if s not in ("targets", "timemodel")]
    )
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    sizes = (tiny if args.quick else dict)(GPU if args.gpu else CPU)
    sizes["repeats"] = args.repeats or sizes["repeats"]
    run = Run(sizes, args.budget_s or (400 if args.gpu else None), args.targets.split(","))
    if args.gpu and not run.gpu and not args.quick:
        raise SystemExit("--gpu: JAX sees no GPU (--quick runs the GPU sections' smoke test)")
    compile_only_sections = {"targets", "timemodel"}
    name = "compile-only" if set(sections) <= compile_only_sections else device_name()
    out = (
        args.out or (Path("/tmp/jaxce-bench") if args.quick else REPO / "benchmarks/results") / name
    )
    out.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", str(REPO), "describe", "--always", "--dirty"]
    meta = dict(label=name + ("" if run.gpu else f" ({os.cpu_count()} cores)"), seconds={})
    meta.update(
        command=" ".join(["python -m benchmarks", *sys.argv[1:]]),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    meta.update(git=subprocess.run(git, capture_output=True, text=True).stdout.strip())
    meta.update(python=sys.version.split()[0], jax=jax.__version__, torch=run.note)
    for package in ("jaxlib", "optax", "libtpu", "jax-cuda12-plugin", "tokamax"):
        with contextlib.suppress(PackageNotFoundError):
            meta[package] = version(package)
    meta.update(device=jax.devices()[0].device_kind, sizes={s: sizes[s] for s in sections})
    run.log(f"{meta['label']}: jax {jax.__version__}, torch {run.note}; writing to {out}")
    for section in sections:
        t0 = time.time()
        try:
            for file, data in SECTIONS[section](run).items():
                write(out / file, data)
        except Exception as err:  # a section's crash must not lose the others
            run.log(f"{section} FAILED: {type(err).__name__}: {err}")
            continue
        meta["seconds"][section] = round(time.time() - t0, 1)
        (out / "meta.json").write_text(json.dumps(merged(out / "meta.json", meta), indent=1))
        run.log(f"{section}: done in {time.time() - t0:.0f} s")
    with contextlib.suppress(ImportError):
        from benchmarks import plots

        plots.draw(out)
    run.log(f"done: {out}")


if __name__ == "__main__":
    main()
