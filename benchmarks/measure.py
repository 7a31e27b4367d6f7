"""The measuring core of every section: one interleaved timer, one compile-only memory
helper, and one peak-memory child: ``python -m benchmarks.measure SPEC`` (JSON: variant,
dtype, shape, device) runs one forward+backward in a fresh process and prints the memory in
use before it, the peak's growth over it (CPU: resident set, VmHWM reset through
/proc/self/clear_refs; GPU: the allocator's peak; JAX's cannot be reset, so a JAX child
compiles before it allocates its inputs) and its time. A torch child never imports JAX."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def failure(err):
    """'OOM' for an out-of-memory error (at run or compile time), else a one-line error."""
    text = f"{type(err).__name__}: {err}"
    oom = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory", "HbmOom")
    return "OOM" if any(s in text for s in oom) else "error: " + text.splitlines()[0][:160]


def write(path, data):
    """``data`` to ``path``: a string as is, a list of dicts as CSV (columns in order of
    first appearance)."""
    if isinstance(data, str):
        return path.write_text(data)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for row in data for k in row)))
        writer.writeheader()
        writer.writerows(data)


def interleaved(calls, repeats, base, left, warmup=2):
    """CSV rows timing zero-argument calls (each returns when its work is done): ``warmup``
    calls each (compile), then rounds running every call once in a fresh random order (a
    call right after one that frees GiBs is slower). A call that raises is dropped with its
    failure ("OOM", ...); nothing starts once ``left()`` (seconds) < 0."""
    out = {}
    for name, call in calls.items():
        try:
            for _ in range(warmup if left() > 0 else 0):
                call()
            out[name] = [] if left() > 0 else "skipped: budget"
        except Exception as err:
            out[name] = failure(err)
    order = random.Random(0)
    for _ in range(repeats):
        live = [n for n, v in out.items() if isinstance(v, list)]
        for name in order.sample(live, len(live)) if left() > 0 else ():
            try:
                t0 = time.perf_counter()
                calls[name]()
                out[name].append((time.perf_counter() - t0) * 1e3)
            except Exception as err:
                out[name] = failure(err)
    rows = []
    for name, ms in out.items():
        row = dict(base, provider=name, median_ms="", min_ms="", max_ms="", rounds=len(ms))
        if isinstance(ms, str):
            rows.append(dict(row, rounds=0, status=ms))
            continue
        row.update(median_ms=round(statistics.median(ms), 3), min_ms=round(min(ms), 3))
        rows.append(dict(row, max_ms=round(max(ms), 3), status="ok"))
    return rows


def compiled(target, fn, *specs, context=None, shardings=None):
    """Compile-only memory of ``jax.jit(fn)`` for a target of targets.py: (row, compiled);
    the row has temporaries, argument and output bytes and the TPU cost model's ms."""
    from benchmarks import targets

    try:
        with context or contextlib.nullcontext():
            c = targets.compile_for(target, fn, *specs, shardings=shardings)
        r = targets.analyse(c)
    except Exception as err:
        return {"status": failure(err)}, None
    row = dict(temp_bytes=r.temp_bytes, argument_bytes=r.argument_bytes)
    row.update(output_bytes=r.output_bytes, status="ok")
    ms = "" if not r.model_seconds else round(r.model_seconds * 1e3, 4)  # 0: no model
    return dict(row, model_ms=ms), c


def run_child(spec, timeout):
    """Runs one peak-memory child (see the module docstring); its result."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    if spec["device"] != "cpu":  # kernel choice does not change buffers: no autotuning
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"
    cmd = [sys.executable, "-m", "benchmarks.measure", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"error: exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def host_memory():
    """(peak, current, reset) of this process's resident set."""

    def kib(field):
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) * 1024 for ln in fh if ln.startswith(field + ":"))

    def reset():
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    return "VmHWM", lambda: kib("VmHWM"), lambda: kib("VmRSS"), reset


def _jax_step(spec):
    import jax
    import jax.numpy as jnp

    from benchmarks import cases

    shape, dtype = spec["shape"], jnp.dtype(spec["dtype"])
    losses, argnums = (cases.CE_LOSSES, 0) if len(shape) == 2 else (cases.LINEAR_LOSSES, (0, 1))
    with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
        specs = jax.eval_shape(lambda: cases.inputs(shape, dtype))  # compiled before inputs
        step = jax.jit(jax.value_and_grad(losses[spec["variant"]], argnums)).lower(*specs).compile()
    args = jax.block_until_ready(cases.inputs(shape, dtype))
    if jax.default_backend() != "gpu":
        return lambda: jax.block_until_ready(step(*args)), host_memory()
    stats = jax.devices()[0].memory_stats
    meter = ("peak_bytes_in_use", lambda: stats()["peak_bytes_in_use"])
    meter += (lambda: stats()["bytes_in_use"], lambda: None)
    return lambda: jax.block_until_ready(step(*args)), meter


def child(spec):
    if spec["variant"].startswith("torch"):
        from benchmarks import torch_side

        step, (name, peak, current, reset) = torch_side.child_step(spec)
    else:
        step, (name, peak, current, reset) = _jax_step(spec)
    life, before = peak(), current()
    reset()
    t0 = time.perf_counter()
    step()
    ms, mib = (time.perf_counter() - t0) * 1e3, 2**-20
    result = dict(measure=name, peak_mib=round(max(life, peak()) * mib, 1), status="ok")
    return dict(
        result,
        before_mib=round(before * mib, 1),
        step_mib=round((peak() - before) * mib, 1),
        step_ms=round(ms, 1),
    )


if __name__ == "__main__":
    try:
        result = child(json.loads(sys.argv[1]))
    except Exception as err:  # recorded by the parent, which goes on
        result = {"status": failure(err)}
    print(json.dumps(result), flush=True)
