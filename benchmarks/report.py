"""Benchmark report: jaxce vs optax vs PyTorch, time and memory, as CSV files and PNG plots.

Usage (repository root):

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/report.py                  # full CPU report, about 15 min on 2 cores
    python benchmarks/report.py --quick          # tiny smoke run (writes to /tmp)
    python benchmarks/report.py --plots-only --out DIR   # redraw DIR's PNGs from its CSVs
    python benchmarks/gpu.py                     # the same, sized for an 80 GB GPU

The full run writes to benchmarks/results/cpu-<processor>-<cores>c/ (or --out):

ce_time.csv / ce_time.png
    `jit(value_and_grad(mean loss))` of a [tokens, classes] logits array, float32 and
    bfloat16, classes 1k..128k: jaxce, `optax.softmax_cross_entropy_with_integer_labels`, the
    plain `log_softmax` formula, torch `F.cross_entropy` (forward + `.backward()`), and the
    memory-traffic floor (one jitted pass that reads the logits and writes an array of their
    size, `x * 2`) and the "lse pass" (one read with one `exp` per element, the least a
    forward computes). All variants in one process on the same data (torch sees JAX's buffer
    through DLPack), interleaved round by round with the order rotated, warm-up calls first
    (compile excluded), median of --repeats rounds.
ce_memory.csv / ce_memory.png
    Compile-only `memory_analysis()` of each JAX variant's `jit(value_and_grad)` on
    `jax.ShapeDtypeStruct`s (nothing allocated): temporaries vs number of classes.
residuals.txt
    `jax.ad_checkpoint.print_saved_residuals` of each variant at a small shape.
peak_rss.csv / peak_rss.png
    One fresh process per (framework, shape) doing one forward+backward (benchmarks/
    peak_child.py): its peak resident memory (VmHWM) over its life, that minus the peak of a
    baseline process that only imports the framework and allocates the inputs ("net"), and
    the growth of the peak over the forward+backward alone ("step": high-water mark reset
    after the inputs are allocated and, for JAX, the function compiled ahead of time).
linear.csv / linear_memory.png
    Fused `linear_cross_entropy` vs unfused JAX (`jaxce.cross_entropy(hidden @ kernel)` and
    the plain formula on float32 logits): compile-only memory at Liger-Kernel's and Cut
    Cross-Entropy's published shapes; total = inputs + gradients + temporaries.
linear_time.csv / linear_time.png, linear_peak.csv
    The same three plus torch `F.linear_cross_entropy` (reference path, and the chunked path
    with `torch.nn.LinearCrossEntropyOptions()`): time (interleaved, median) and one process
    per variant's peak memory.
headline.png, summary.md, meta.json
    The headline plot, the key numbers with the goals, and the environment and durations.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxce
from jaxce._core import _sum_exp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 2**20
GIB = 2**30

# Published shapes (tokens, hidden, vocabulary); see ../shared/PEERS.md.
LIGER_FLCE = ("Liger FLCE", 32768, 4096, 128256)  # 5.8 GB vs 27.6 GB (4.8x), bf16, A100
LIGER_CE = ("Liger CE", 16384, 4096, 131072)  # their CE shape, with a 4096 hidden size
CCE = ("CCE Gemma 2 2B", 8192, 2304, 256000)  # loss memory 24 GB -> 1 MB, A100
LIGER_RATIO = 27.6 / 5.8


# ----------------------------------------------------------------------------- losses


def plain_ce(x, y):
    """The textbook formula: float32 log_softmax, then pick the target (autodiff gradient)."""
    lp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


CE_LOSSES = {
    "jaxce": lambda x, y: jaxce.cross_entropy(x, y),
    "optax": lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(),
    "plain log_softmax": plain_ce,
}


def floor_pass(x):
    """The memory-traffic floor: read the logits once, write an array of their size."""
    return x * 2


def lse_pass(x):
    """The least a cross-entropy forward computes: one read of the logits and one ``exp``
    per element (a row log-sum-exp shifted by a known logit, not the row max).

    floor + this is the least a forward+backward made of separate passes can take (the
    backward needs the finished log-sum-exp of a row before it writes that row). The sum is
    jaxce's own ``_sum_exp``, so rows longer than 32,768 are summed as sub-rows as jaxce
    does (XLA:CPU's long-row reductions are slow).
    """
    shift = x[:, :1].astype(jnp.float32)
    return (shift + jnp.log(_sum_exp(x, shift, 1, jnp.float32)))[:, 0]


LINEAR_LOSSES = {
    "jaxce fused": lambda h, k, y: jaxce.linear_cross_entropy(h, k, y),
    "jaxce unfused": lambda h, k, y: jaxce.cross_entropy(h @ k, y),
    "plain unfused": lambda h, k, y: plain_ce(jnp.dot(h, k, preferred_element_type=jnp.float32), y),
}


def normal(key, shape, dtype, scale=1.0):
    """Standard-normal (times `scale`) [n, m] array of `dtype`, generated on the device.

    Generated block by block into the output buffer (a loop of in-place updates), so the
    random bits and float32 intermediates never exist at full size: a process that only
    allocates its inputs then peaks at about the inputs' size (see peak_child.py).
    """
    n, m = shape
    rows = max(1, min(n, 2**20 // m))
    while n % rows:
        rows -= 1

    @jax.jit
    def gen(key):
        def block(i, out):
            z = jax.random.normal(jax.random.fold_in(key, i), (rows, m), jnp.float32)
            return lax.dynamic_update_slice(out, (z * scale).astype(dtype), (i * rows, 0))

        return lax.fori_loop(0, n // rows, block, jnp.zeros(shape, dtype))

    return gen(key)


def ce_inputs(n, c, dtype, seed=0):
    """Standard-normal [n, c] logits of `dtype` and targets."""
    kx, ky = jax.random.split(jax.random.key(seed))
    return normal(kx, (n, c), dtype), jax.random.randint(ky, (n,), 0, c)


def linear_inputs(n, d, v, dtype, seed=0):
    """hidden [n, d], kernel [d, v] (scaled by d**-0.5), targets [n]."""
    kh, kk, ky = jax.random.split(jax.random.key(seed), 3)
    h, k = normal(kh, (n, d), dtype), normal(kk, (d, v), dtype, d**-0.5)
    return h, k, jax.random.randint(ky, (n,), 0, v)


# ----------------------------------------------------------------------------- environment


@dataclass
class Env:
    """Where things run: JAX's backend, torch (or None) and its device."""

    mode: str  # "cpu" or "gpu"
    backend: str = field(init=False)
    device_kind: str = field(init=False)
    torch: object = field(init=False, default=None)
    torch_device: str = field(init=False, default="cpu")
    torch_note: str = field(init=False, default="")

    def __post_init__(self):
        self.backend = jax.default_backend()
        self.device_kind = jax.devices()[0].device_kind
        if self.mode == "gpu" and self.backend != "gpu":
            print("[report] no GPU visible to JAX: running the GPU sizes on", self.backend)
        try:
            import torch
        except ImportError:
            self.torch_note = "torch not installed"
            return
        if self.backend == "gpu":
            if not torch.cuda.is_available():
                self.torch_note = f"torch {torch.__version__} has no CUDA: skipped"
                return
            self.torch_device = "cuda"
            torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated
        else:
            torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch

    @property
    def child_device(self):
        return "gpu" if self.backend == "gpu" else "cpu"

    def torch_sync(self):
        if self.torch_device == "cuda":
            self.torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.torch is not None and self.torch_device == "cuda":
            self.torch.cuda.empty_cache()

    def to_torch(self, a):
        """A torch view of a JAX array (DLPack, no copy; a host copy if that fails)."""
        t = self.torch
        try:
            out = t.from_dlpack(a)
        except Exception:
            arr = np.asarray(a)
            if arr.dtype == jnp.bfloat16:
                out = t.from_numpy(arr.view(np.uint16).copy()).view(t.bfloat16)
            else:
                out = t.from_numpy(arr.copy())
        return out.to(self.torch_device)


def device_slug(env):
    if env.backend == "cpu":
        model = "cpu"
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1]
                    break
        model = re.sub(r"\((R|TM)\)|\b(CPU|Processor)\b|@.*", "", model, flags=re.I)
        name = f"cpu-{model}-{os.cpu_count()}c"
    else:
        name = env.device_kind
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def failure(err):
    text = f"{type(err).__name__}: {err}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "OOM"
    return "error: " + text.splitlines()[0][:120]


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """What each section measures. Shapes are (tokens, classes) or (tokens, hidden, vocab)."""

    ce_tokens: int
    ce_classes: tuple
    dtypes: tuple
    repeats: int
    warmup: int
    mem_tokens: int
    mem_classes: tuple
    rss_classes: tuple
    residual_shape: tuple
    linear_memory: tuple  # (name, tokens, hidden, vocab), both dtypes
    linear_time: tuple  # (tokens, hidden, vocab, dtype)
    linear_peak: tuple  # (tokens, hidden, vocab, dtype)
    child_timeout: int = 900


DTYPES = ("float32", "bfloat16")
CLASSES = (1024, 4096, 16384, 32768, 65536, 131072)

CPU = Sizes(
    ce_tokens=4096,
    ce_classes=(1024, 4096, 16384, 32768, 131072),
    dtypes=DTYPES,
    repeats=5,
    warmup=2,
    mem_tokens=16384,
    mem_classes=(*CLASSES, 262144),
    rss_classes=(4096, 32768, 131072),
    residual_shape=(8, 1024),
    linear_memory=(LIGER_FLCE, LIGER_CE, CCE),
    linear_time=((4096, 512, 16384, "float32"), (4096, 512, 16384, "bfloat16")),
    linear_peak=((8192, 512, 32768, "float32"),),
)

GPU = Sizes(
    ce_tokens=16384,
    ce_classes=CLASSES,
    dtypes=DTYPES,
    repeats=10,
    warmup=2,
    mem_tokens=16384,
    mem_classes=(*CLASSES, 262144),
    rss_classes=(131072,),
    residual_shape=(8, 1024),
    linear_memory=(LIGER_FLCE, LIGER_CE, CCE),
    linear_time=(
        (*LIGER_CE[1:], "bfloat16"),
        (*CCE[1:], "bfloat16"),
        (8192, 2048, 32768, "float32"),
    ),
    linear_peak=((*LIGER_FLCE[1:], "bfloat16"),),
    child_timeout=240,
)

QUICK = Sizes(
    ce_tokens=256,
    ce_classes=(1024, 4096),
    dtypes=DTYPES,
    repeats=5,
    warmup=2,
    mem_tokens=1024,
    mem_classes=(1024, 4096, 16384),
    rss_classes=(4096,),
    residual_shape=(4, 256),
    linear_memory=(("tiny", 512, 64, 4096),),
    linear_time=((256, 64, 2048, "float32"),),
    linear_peak=((256, 64, 2048, "float32"),),
    child_timeout=300,
)


# ----------------------------------------------------------------------------- timing


def interleaved(calls, repeats, warmup):
    """Times zero-argument calls (each returns once its work is done) round by round.

    Each call runs `warmup` times first (compiles, allocator warm-up); a call that raises
    (out of memory, say) is dropped and reported. Every round runs each remaining call once,
    starting one further along each round so that no variant always follows the same one.
    Returns ({name: [seconds]}, {name: failure}).
    """
    failed, live = {}, {}
    for name, call in calls.items():
        try:
            for _ in range(warmup):
                call()
            live[name] = call
        except Exception as err:
            failed[name] = failure(err)
    times = {name: [] for name in live}
    for r in range(repeats):
        names = [n for n in live if n not in failed]
        if not names:
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:
            try:
                t0 = time.perf_counter()
                live[name]()
                times[name].append(time.perf_counter() - t0)
            except Exception as err:
                failed[name] = failure(err)
    return {n: ts for n, ts in times.items() if n not in failed}, failed


def _jax_call(fn, *args):
    jax.block_until_ready(fn(*args))


def _torch_ce_call(env, x, y):
    F = env.torch.nn.functional
    xt = env.to_torch(x).requires_grad_()
    yt = env.to_torch(y).long()

    def call():
        F.cross_entropy(xt, yt).backward()
        env.torch_sync()
        xt.grad = None

    return call


def _torch_linear_call(env, h, k, y, chunked):
    torch = env.torch
    F = torch.nn.functional
    ht = env.to_torch(h).requires_grad_()
    wt = env.to_torch(k).T.contiguous().requires_grad_()  # torch's [V, D] layout
    yt = env.to_torch(y).long()
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None

    def call():
        F.linear_cross_entropy(ht, wt, yt, options=options).backward()
        env.torch_sync()
        ht.grad = wt.grad = None

    return call


def _timing_rows(times, failed, base):
    rows = []
    med = {n: statistics.median(ts) * 1e3 for n, ts in times.items()}
    for name in [*times, *failed]:
        row = dict(base, provider=name)
        if name in med:
            ts = times[name]
            row.update(
                median_ms=round(med[name], 3),
                min_ms=round(min(ts) * 1e3, 3),
                max_ms=round(max(ts) * 1e3, 3),
                rounds=len(ts),
                status="ok",
            )
        else:
            row.update(median_ms="", min_ms="", max_ms="", rounds=0, status=failed[name])
        rows.append((row, med))
    return rows


def ce_time(sizes, env, log):
    """Forward+backward time per provider, per dtype and class count; see the docstring."""
    rows = []
    n = sizes.ce_tokens
    for dtype in sizes.dtypes:
        for c in sizes.ce_classes:
            x, y = ce_inputs(n, c, jnp.dtype(dtype))
            calls = {
                name: partial(_jax_call, jax.jit(jax.value_and_grad(f)), x, y)
                for name, f in CE_LOSSES.items()
            }
            if env.torch is not None:
                calls["torch"] = _torch_ce_call(env, x, y)
            calls["floor"] = partial(_jax_call, jax.jit(floor_pass), x)
            calls["lse pass"] = partial(_jax_call, jax.jit(lse_pass), x)
            times, failed = interleaved(calls, sizes.repeats, sizes.warmup)
            base = {"dtype": dtype, "tokens": n, "classes": c}
            for row, med in _timing_rows(times, failed, base):
                ms = med.get(row["provider"])
                row["x_floor"] = _ratio(ms, med.get("floor"))
                row["x_optax"] = _ratio(ms, med.get("optax"))
                rows.append(row)
            log(
                f"ce_time {dtype} [{n}, {c}]: "
                + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
                + "".join(f", {k} {v}" for k, v in failed.items())
            )
            del calls, x, y
            env.free()
    return rows


def _ratio(a, b):
    return "" if a is None or not b else round(a / b, 3)


# ----------------------------------------------------------------------------- memory


def compiled_memory(fn, *specs):
    """Compile-only `memory_analysis()` of jit(fn) on ShapeDtypeStructs, in bytes."""
    try:
        m = jax.jit(fn).lower(*specs).compile().memory_analysis()
    except Exception as err:
        return {"status": failure(err)}
    return {
        "temp_bytes": m.temp_size_in_bytes,
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "status": "ok",
    }


def ce_memory(sizes, log):
    rows = []
    n = sizes.mem_tokens
    for dtype in sizes.dtypes:
        dt = jnp.dtype(dtype)
        for c in sizes.mem_classes:
            specs = (jax.ShapeDtypeStruct((n, c), dt), jax.ShapeDtypeStruct((n,), jnp.int32))
            for name, f in CE_LOSSES.items():
                mem = compiled_memory(jax.value_and_grad(f), *specs)
                row = {"dtype": dtype, "tokens": n, "classes": c, "variant": name, **mem}
                row["logits_bytes"] = n * c * dt.itemsize
                row["temp_x_logits"] = (
                    round(mem["temp_bytes"] / row["logits_bytes"], 4) if "temp_bytes" in mem else ""
                )
                rows.append(row)
        log(f"ce_memory {dtype}: {len(sizes.mem_classes)} class counts compiled")
    return rows


def residuals(sizes):
    """`print_saved_residuals` of every variant, with a count of logits-sized residuals."""
    from jax.ad_checkpoint import print_saved_residuals

    n, c = sizes.residual_shape
    d = 16
    out = [
        "Saved residuals (jax.ad_checkpoint.print_saved_residuals) of the mean loss.",
        "'logits-sized' counts residuals with the logits' shape other than the input itself.",
        "",
    ]
    cases = []
    for dtype in sizes.dtypes:
        dt = jnp.dtype(dtype)
        x, y = jnp.zeros((n, c), dt), jnp.zeros((n,), jnp.int32)
        for name, f in CE_LOSSES.items():
            cases.append((f"cross-entropy: {name}, {dtype} [{n}, {c}]", partial(f, y=y), (x,)))
        h, k = jnp.zeros((n, d), dt), jnp.zeros((d, c), dt)
        for name, f in LINEAR_LOSSES.items():
            cases.append(
                (f"linear: {name}, {dtype} [{n}, {d}] x [{d}, {c}]", partial(f, y=y), (h, k))
            )
    for title, f, args in cases:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(f, *args)
        lines = [line.replace(str(REPO) + "/", "") for line in buf.getvalue().splitlines()]
        big = [ln for ln in lines if f"[{n},{c}]" in ln and "from the argument" not in ln]
        out.append(f"## {title}: {len(lines)} residuals, {len(big)} logits-sized")
        out.extend("    " + ln for ln in lines)
        out.append("")
    return "\n".join(out)


def run_child(spec, timeout):
    """Runs benchmarks/peak_child.py with `spec`; returns its JSON result (or an error)."""
    cmd = [sys.executable, str(HERE / "peak_child.py"), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def _peak_rows(kind, frameworks, shapes, env, timeout, log):
    """One child per (variant, shape) and one baseline per (framework, shape)."""
    rows = []
    for shape, dtype in shapes:
        base_spec = {"kind": kind, "dtype": dtype, "shape": list(shape), "device": env.child_device}
        baselines = {}
        for variant in frameworks:
            fw = "torch" if variant.startswith("torch") else "jax"
            if fw not in baselines:
                baselines[fw] = run_child(dict(base_spec, variant=variant, baseline=True), timeout)
            base = baselines[fw]
            res = run_child(dict(base_spec, variant=variant, baseline=False), timeout)
            row = {"variant": variant, "dtype": dtype, "shape": "x".join(map(str, shape))}
            row["measure"] = res.get("measure", base.get("measure", ""))
            err = res.get("error") or base.get("error")
            if err:
                row["status"] = err
                rows.append(row)
                log(f"peak {kind} {variant} {row['shape']} {dtype}: {err}")
                continue
            peak, b = res["peak_bytes"], base["baseline_bytes"]
            row.update(
                peak_mib=round(peak / MIB, 1),
                baseline_mib=round(b / MIB, 1),
                net_mib=round((peak - b) / MIB, 1),
                step_mib=round(res["step_bytes"] / MIB, 1) if "step_bytes" in res else "",
                ru_maxrss_mib=round(res["ru_maxrss_bytes"] / MIB, 1),
                step_ms=round(res["step_ms"], 1),
                status="ok",
            )
            rows.append(row)
            log(
                f"peak {kind} {variant} {row['shape']} {dtype}: net {row['net_mib']} MiB"
                f" (peak {row['peak_mib']}, baseline {row['baseline_mib']},"
                f" step alone {row['step_mib']})"
            )
    return rows


def ce_peak(sizes, env, log):
    variants = ["jaxce", "optax"] + (["torch"] if env.torch is not None else [])
    shapes = [((sizes.ce_tokens, c), dt) for dt in sizes.dtypes for c in sizes.rss_classes]
    rows = _peak_rows("ce", variants, shapes, env, sizes.child_timeout, log)
    for row in rows:
        n, c = map(int, row["shape"].split("x"))
        row["logits_mib"] = round(n * c * jnp.dtype(row["dtype"]).itemsize / MIB, 1)
    return rows


def _torch_linear_variants(env):
    if env.torch is None or not hasattr(env.torch.nn.functional, "linear_cross_entropy"):
        return []
    chunked = ["torch chunked"] if hasattr(env.torch.nn, "LinearCrossEntropyOptions") else []
    return ["torch reference", *chunked]


def linear_peak(sizes, env, log):
    variants = list(LINEAR_LOSSES) + _torch_linear_variants(env)
    shapes = [((n, d, v), dt) for n, d, v, dt in sizes.linear_peak]
    return _peak_rows("linear", variants, shapes, env, sizes.child_timeout, log)


def linear_memory(sizes, log):
    rows = []
    for dtype in sizes.dtypes:
        dt = jnp.dtype(dtype)
        for name, n, d, v in sizes.linear_memory:
            specs = (
                jax.ShapeDtypeStruct((n, d), dt),
                jax.ShapeDtypeStruct((d, v), dt),
                jax.ShapeDtypeStruct((n,), jnp.int32),
            )
            found = {}
            for variant, f in LINEAR_LOSSES.items():
                mem = compiled_memory(jax.value_and_grad(f, argnums=(0, 1)), *specs)
                row = {"shape_name": name, "tokens": n, "hidden": d, "vocab": v, "dtype": dtype}
                row.update(variant=variant, **mem)
                if mem["status"] == "ok":
                    total = (
                        mem["temp_bytes"]
                        + mem["argument_bytes"]
                        + mem["output_bytes"]
                        - mem["alias_bytes"]
                    )
                    row["total_bytes"] = total
                    found[variant] = row
                rows.append(row)
            fused = found.get("jaxce fused")
            for row in found.values():
                if fused:
                    row["total_x_fused"] = round(row["total_bytes"] / fused["total_bytes"], 3)
                    row["temp_x_fused"] = round(row["temp_bytes"] / max(fused["temp_bytes"], 1), 3)
            log(
                f"linear_memory {name} {dtype}: "
                + ", ".join(f"{k} {r['total_bytes'] / GIB:.2f} GiB" for k, r in found.items())
            )
    return rows


def linear_time(sizes, env, log):
    rows = []
    for n, d, v, dtype in sizes.linear_time:
        # float32 matmuls at full precision on every device (torch's CUDA default is no TF32).
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            h, k, y = linear_inputs(n, d, v, jnp.dtype(dtype))
            calls = {
                name: partial(_jax_call, jax.jit(jax.value_and_grad(f, argnums=(0, 1))), h, k, y)
                for name, f in LINEAR_LOSSES.items()
            }
            for variant in _torch_linear_variants(env):
                calls[variant] = _torch_linear_call(env, h, k, y, variant == "torch chunked")
            times, failed = interleaved(calls, sizes.repeats, sizes.warmup)
        base = {"dtype": dtype, "tokens": n, "hidden": d, "vocab": v}
        for row, med in _timing_rows(times, failed, base):
            row["x_fused"] = _ratio(med.get(row["provider"]), med.get("jaxce fused"))
            rows.append(row)
        log(
            f"linear_time {dtype} {n}x{d}x{v}: "
            + ", ".join(f"{k} {statistics.median(t) * 1e3:.1f} ms" for k, t in times.items())
            + "".join(f", {k} {v}" for k, v in failed.items())
        )
        del calls, h, k, y
        env.free()
    return rows


# ----------------------------------------------------------------------------- files


def write_csv(path, rows):
    keys = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- plots

STYLE = {
    "jaxce": ("C0", "o", "-"),
    "optax": ("C1", "s", "-."),
    "plain log_softmax": ("C2", "^", "-"),
    "torch": ("C3", "D", "-"),
    "floor": ("0.4", "", "--"),
    "lse pass": ("0.6", "", ":"),
    "jaxce fused": ("C0", "o", "-"),
    "jaxce unfused": ("C4", "v", "-"),
    "plain unfused": ("C2", "^", "-"),
    "torch reference": ("C3", "D", "-"),
    "torch chunked": ("C5", "P", "-"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100})
    return plt


def _class_axis(ax):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("classes")
    ax.xaxis.set_major_formatter(
        __import__("matplotlib").ticker.FuncFormatter(lambda v, _: f"{v / 1024:g}k")
    )


def _lines(ax, rows, key, x="classes", y="median_ms", scale=1.0):
    for name in dict.fromkeys(r[key] for r in rows):
        pts = sorted(
            (_num(r[x]), _num(r[y]) * scale)
            for r in rows
            if r[key] == name and not math.isnan(_num(r[y]))
        )
        if pts:
            color, marker, ls = STYLE.get(name, ("k", ".", "-"))
            ours = name.startswith("jaxce")  # drawn on top: it can coincide with optax
            ax.plot(
                *zip(*pts, strict=True),
                color=color,
                marker=marker,
                ls=ls,
                ms=4,
                lw=2.0 if ours else 1.2,
                zorder=3 if ours else 2,
                label=name,
            )


def _ce_time_axes(ax, rows, dtype, relative, title):
    sel = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok"]
    _lines(ax, sel, "provider", y="x_floor" if relative else "median_ms")
    _class_axis(ax)
    if relative:
        ax.axhline(1.2, color="C0", lw=0.8, ls=":", label="goal: 1.2× floor")
        ax.set_ylabel("time / memory-traffic floor")
        ax.set_ylim(bottom=0)
    else:
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_ce_time(rows, out, label):
    plt = _pyplot()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(2, len(dtypes), figsize=(4.6 * len(dtypes), 6.4), squeeze=False)
    n = rows[0]["tokens"]
    for j, dtype in enumerate(dtypes):
        _ce_time_axes(axes[0][j], rows, dtype, True, f"{dtype}: time relative to the floor")
        _ce_time_axes(axes[1][j], rows, dtype, False, f"{dtype}: time")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"cross-entropy jit(value_and_grad), {n} tokens, {label}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _ce_memory_axes(ax, rows, dtype, title):
    sel = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok"]
    _lines(ax, sel, "variant", y="temp_bytes", scale=1 / MIB)
    pts = sorted({(_num(r["classes"]), _num(r["logits_bytes"]) / MIB) for r in sel})
    ax.plot(
        *zip(*pts, strict=True), color="0.5", ls="--", lw=0.8, label=f"one {dtype} logits array"
    )
    _class_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel("temporaries, MiB (compile-only)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_ce_memory(rows, peak_rows, out, label):
    plt = _pyplot()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    ncol = len(dtypes) + (1 if peak_rows else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(4.6 * ncol, 3.6), squeeze=False)
    n = rows[0]["tokens"]
    for j, dtype in enumerate(dtypes):
        _ce_memory_axes(axes[0][j], rows, dtype, f"{dtype} [{n}, classes]: XLA temporaries")
    axes[0][0].legend(fontsize=7)
    if peak_rows:
        _peak_axes(axes[0][-1], peak_rows)
    fig.suptitle(f"cross-entropy value_and_grad memory, {label}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _peak_axes(ax, rows):
    """Per (variant, dtype): the step's growth of the peak (net of baseline where absent)."""
    ok = [r for r in rows if r["status"] == "ok"]
    step = all(r.get("step_mib") not in ("", None) for r in ok)
    key = "step_mib" if step else "net_mib"
    for r in ok:
        r["classes"] = r["shape"].split("x")[1]
        r["series"] = f"{r['variant']} {r['dtype']}"
    for name in dict.fromkeys(r["series"] for r in ok):
        variant, dtype = name.rsplit(" ", 1)
        pts = sorted((_num(r["classes"]), _num(r[key])) for r in ok if r["series"] == name)
        color, marker, _ = STYLE.get(variant, ("k", ".", "-"))
        ls = "-" if dtype == "float32" else ":"
        ours = variant.startswith("jaxce")
        ax.plot(
            *zip(*pts, strict=True),
            color=color,
            marker=marker,
            ls=ls,
            ms=4,
            lw=2.5 if ours else 1.2,
            zorder=3 if ours else 2,
            label=name,
        )
    f32 = sorted(
        {(_num(r["classes"]), _num(r["logits_mib"])) for r in ok if r["dtype"] == "float32"}
    )
    if f32:
        ax.plot(
            *zip(*f32, strict=True),
            color="k",
            ls="--",
            lw=0.7,
            zorder=4,
            label="one f32 logits array",
        )
    _class_axis(ax)
    ax.set_yscale("log")
    ax.set_ylabel(
        "peak growth over the step, MiB" if step else "peak − baseline process's peak, MiB"
    )
    tokens = ok[0]["shape"].split("x")[0] if ok else "?"
    ax.set_title(f"one process, one forward+backward ({tokens} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_peak(rows, out, label):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    _peak_axes(ax, rows)
    fig.suptitle(f"cross-entropy peak memory, {label}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _linear_memory_axes(ax, rows, dtype):
    sel = [r for r in rows if r["dtype"] == dtype and r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape_name"] for r in sel))
    variants = list(dict.fromkeys(r["variant"] for r in sel))
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        xs, found = [], []
        for j, shape in enumerate(shapes):
            r = next((r for r in sel if r["shape_name"] == shape and r["variant"] == variant), None)
            if r:
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                found.append(r)
        color = STYLE.get(variant, ("k",))[0]
        totals = [_num(r["total_bytes"]) / GIB for r in found]
        ax.bar(xs, totals, width, color=color, alpha=0.45, label=f"{variant}: total")
        temps = [_num(r["temp_bytes"]) / GIB for r in found]
        ax.bar(xs, temps, width, color=color, label=f"{variant}: temporaries")
        if variant != "jaxce fused":
            for x, total, r in zip(xs, totals, found, strict=True):
                label = f"{_num(r.get('total_x_fused')):.1f}×"
                ax.annotate(label, (x, total), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(
        [
            f"{s}\n{r['tokens']}×{r['hidden']}×{r['vocab']}"
            for s in shapes
            for r in [next(r for r in sel if r["shape_name"] == s)]
        ],
        fontsize=7,
    )
    ax.set_ylabel("GiB (compile-only)")
    ax.set_title(f"{dtype}: inputs + gradients + temporaries (labels: ÷ fused)")
    ax.grid(alpha=0.3, axis="y")


def _linear_peak_axes(ax, rows):
    ok = [r for r in rows if r["status"] == "ok"]
    shapes = list(dict.fromkeys((r["shape"], r["dtype"]) for r in ok))
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    step = all(r.get("step_mib") not in ("", None) for r in ok)
    key = "step_mib" if step else "net_mib"
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        for j, (shape, dtype) in enumerate(shapes):
            r = _find(ok, variant=variant, shape=shape, dtype=dtype)
            if r is None:
                continue
            x, y = j + (i - (len(variants) - 1) / 2) * width, _num(r[key])
            color = STYLE.get(variant, ("k",))[0]
            ax.bar([x], [y], width, color=color, label=variant if j == 0 else None)
            ax.annotate(f"{y:,.0f}", (x, y), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{s.replace('x', '×')}\n{dt}" for s, dt in shapes], fontsize=7)
    ax.set_ylabel(
        "peak growth over the step, MiB" if step else "peak − baseline process's peak, MiB"
    )
    ax.set_title("measured: one process, one forward+backward")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6)


def plot_linear_memory(rows, peak_rows, out, label):
    plt = _pyplot()
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    ncol = len(dtypes) + (1 if peak_rows else 0)
    widths = [5.4] * len(dtypes) + ([3.6] if peak_rows else [])
    fig, axes = plt.subplots(
        1, ncol, figsize=(sum(widths), 3.9), squeeze=False, width_ratios=widths
    )
    for j, dtype in enumerate(dtypes):
        _linear_memory_axes(axes[0][j], rows, dtype)
    axes[0][0].legend(fontsize=6)
    if peak_rows:
        _linear_peak_axes(axes[0][-1], peak_rows)
    fig.suptitle(f"fused linear cross-entropy value_and_grad wrt (hidden, kernel), {label}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_linear_time(rows, out, label):
    plt = _pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    shapes = list(dict.fromkeys((r["tokens"], r["hidden"], r["vocab"], r["dtype"]) for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    fig, ax = plt.subplots(figsize=(1.6 + 2.2 * len(shapes), 3.4))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        xs, ys = [], []
        for j, s in enumerate(shapes):
            r = next(
                (
                    r
                    for r in ok
                    if r["provider"] == p
                    and (r["tokens"], r["hidden"], r["vocab"], r["dtype"]) == s
                ),
                None,
            )
            if r:
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                ys.append(_num(r["median_ms"]))
        ax.bar(xs, ys, width, color=STYLE.get(p, ("k",))[0], label=p)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{n}×{d}×{v}\n{dt}" for n, d, v, dt in shapes], fontsize=7)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"fused linear cross-entropy forward+backward time, {label}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_headline(ce_rows, mem_rows, lin_rows, out, label):
    plt = _pyplot()
    panels = [bool(ce_rows), bool(mem_rows), bool(lin_rows)]
    if not any(panels):
        return
    fig, axes = plt.subplots(1, sum(panels), figsize=(4.8 * sum(panels), 3.8), squeeze=False)
    axes = iter(axes[0])
    if ce_rows:
        ax = next(axes)
        n = ce_rows[0]["tokens"]
        _ce_time_axes(ax, ce_rows, "float32", True, f"CE fwd+bwd time ÷ floor, float32, {n} tokens")
        ax.legend(fontsize=7)
    if mem_rows:
        ax = next(axes)
        dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in mem_rows) else "float32"
        n = mem_rows[0]["tokens"]
        _ce_memory_axes(ax, mem_rows, dtype, f"CE temporaries, {dtype}, {n} tokens")
        ax.legend(fontsize=7)
    if lin_rows:
        ax = next(axes)
        dtype = "bfloat16" if any(r["dtype"] == "bfloat16" for r in lin_rows) else "float32"
        _linear_memory_axes(ax, lin_rows, dtype)
        ax.set_title(
            f"fused linear CE memory, {dtype} (÷ fused; Liger's claim: {LIGER_RATIO:.1f}×)"
        )
        ax.legend(fontsize=6)
    fig.suptitle(f"jaxce vs optax vs PyTorch — {label}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def make_plots(out, label):
    """Draws every PNG from the CSVs in `out` (skipping sections that were not run)."""
    ce = read_csv(out / "ce_time.csv")
    mem = read_csv(out / "ce_memory.csv")
    peak = read_csv(out / "peak_rss.csv")
    lin = read_csv(out / "linear.csv")
    lin_t = read_csv(out / "linear_time.csv")
    if ce:
        plot_ce_time(ce, out / "ce_time.png", label)
    if mem:
        plot_ce_memory(mem, [dict(r) for r in peak], out / "ce_memory.png", label)
    if peak:
        plot_peak([dict(r) for r in peak], out / "peak_rss.png", label)
    if lin:
        plot_linear_memory(lin, read_csv(out / "linear_peak.csv"), out / "linear_memory.png", label)
    if lin_t:
        plot_linear_time(lin_t, out / "linear_time.png", label)
    plot_headline(ce, mem, lin, out / "headline.png", label)


# ----------------------------------------------------------------------------- summary


def _find(rows, **kw):
    return next((r for r in rows if all(str(r.get(k)) == str(v) for k, v in kw.items())), None)


def summary(out, label):
    """summary.md: the key numbers and each goal, met or not, from the CSVs in `out`."""
    ce = read_csv(out / "ce_time.csv")
    lin = read_csv(out / "linear.csv")
    mem = read_csv(out / "ce_memory.csv")
    peak = read_csv(out / "peak_rss.csv")
    lines = [f"# Benchmark summary — {label}", ""]
    if ce:
        n = int(ce[0]["tokens"])
        c = 32768 if _find(ce, classes=32768) else int(ce[-1]["classes"])
        lines += [
            f"## Cross-entropy forward+backward, [{n}, {c}] (median ms; ÷ floor; ÷ optax)",
            "",
            "| dtype | " + " | ".join(p for p in STYLE if _find(ce, provider=p)) + " |",
            "|---|" + "---|" * sum(1 for p in STYLE if _find(ce, provider=p)),
        ]
        for dtype in dict.fromkeys(r["dtype"] for r in ce):
            cells = []
            for p in STYLE:
                if not _find(ce, provider=p):
                    continue
                r = _find(ce, provider=p, dtype=dtype, classes=c)
                if r is None or r["status"] != "ok":
                    cells.append(r["status"] if r else "")
                else:
                    cells.append(
                        f"{_num(r['median_ms']):.1f} ({_num(r['x_floor']):.2f}×; {_num(r['x_optax']):.2f}×)"
                    )
            lines.append(f"| {dtype} | " + " | ".join(cells) + " |")
        j = _find(ce, provider="jaxce", dtype="float32", classes=c)
        if j and j["status"] == "ok":
            xf, xo = _num(j["x_floor"]), _num(j["x_optax"])
            lines += [
                "",
                f"Goal ≤ 1.2× floor at [{n}, {c}] float32: {xf:.2f}× — "
                + ("met" if xf <= 1.2 else "NOT met"),
                f"Goal never slower than optax there: {xo:.2f}× optax — "
                + ("met" if xo <= 1.0 else "NOT met"),
            ]
            lse = _find(ce, provider="lse pass", dtype="float32", classes=c)
            if lse and lse["status"] == "ok":
                two_pass = 1 + _num(lse["x_floor"])
                lines.append(
                    f"A one-pass log-sum-exp (one read, one exp per element) alone takes "
                    f"{_num(lse['x_floor']):.2f}× the floor, so separate forward and backward "
                    f"passes need at least {two_pass:.2f}× the floor; jaxce takes "
                    f"{xf / two_pass:.2f}× that."
                )
            lines.append("")
        worst = [
            (r["dtype"], int(r["classes"]), _num(r["x_floor"]), _num(r["x_optax"]))
            for r in ce
            if r["provider"] == "jaxce" and r["status"] == "ok"
        ]
        if worst:
            lines.append("jaxce over the sweep (dtype, classes, ÷ floor, ÷ optax):")
            lines += [f"- {d} {c}: {a:.2f}×, {b:.2f}×" for d, c, a, b in worst]
            lines.append("")
    if mem:
        big = max(int(r["classes"]) for r in mem)
        lines += [f"## Compile-only temporaries at [{mem[0]['tokens']}, {big}]", ""]
        for r in mem:
            if int(r["classes"]) == big and r["status"] == "ok":
                lines.append(
                    f"- {r['dtype']} {r['variant']}: {_num(r['temp_bytes']) / MIB:,.2f} MiB"
                    f" ({_num(r['temp_x_logits']):.3f}× the logits)"
                )
        lines.append("")
    if peak:
        lines += ["## Peak memory of one forward+backward process (MiB)", ""]
        for r in peak:
            if r["status"] == "ok":
                lines.append(
                    f"- {r['variant']} {r['dtype']} {r['shape']}: step {r['step_mib']}, net {r['net_mib']}"
                    f" (peak {r['peak_mib']}, baseline {r['baseline_mib']};"
                    f" logits {r['logits_mib']})"
                )
            else:
                lines.append(f"- {r['variant']} {r['dtype']} {r['shape']}: {r['status']}")
        lines.append("")
    if lin:
        lines += [
            "## Fused linear: compile-only memory (inputs + gradients + temporaries)",
            "",
            "| shape | dtype | jaxce fused | jaxce unfused | plain unfused | plain ÷ fused |",
            "|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(r["shape_name"] for r in lin):
            for dtype in dict.fromkeys(r["dtype"] for r in lin):
                cells = []
                for v in LINEAR_LOSSES:
                    r = _find(lin, shape_name=name, dtype=dtype, variant=v)
                    cells.append(
                        f"{_num(r['total_bytes']) / GIB:.2f} GiB (temp {_num(r['temp_bytes']) / GIB:.2f})"
                        if r and r["status"] == "ok"
                        else (r["status"] if r else "")
                    )
                p = _find(lin, shape_name=name, dtype=dtype, variant="plain unfused")
                ratio = f"{_num(p['total_x_fused']):.2f}×" if p and p.get("total_x_fused") else ""
                lines.append(f"| {name} | {dtype} | " + " | ".join(cells) + f" | {ratio} |")
        p = _find(lin, shape_name=LIGER_FLCE[0], dtype="bfloat16", variant="plain unfused")
        u = _find(lin, shape_name=LIGER_FLCE[0], dtype="bfloat16", variant="jaxce unfused")
        if p and p.get("total_x_fused"):
            r = _num(p["total_x_fused"])
            lines += [
                "",
                f"Goal: memory advantage ≥ Liger's {LIGER_RATIO:.2f}× at {LIGER_FLCE[1]}×"
                f"{LIGER_FLCE[2]}×{LIGER_FLCE[3]} bf16: {r:.2f}× vs the plain unfused"
                f" formula — {'met' if r >= LIGER_RATIO else 'NOT met'}"
                + (f"; {_num(u['total_x_fused']):.2f}× vs jaxce unfused" if u else ""),
            ]
        lines.append("")
    lin_t = read_csv(out / "linear_time.csv")
    if lin_t:
        lines += ["## Fused linear: time (median ms; ÷ jaxce fused)", ""]
        for r in lin_t:
            shape = f"{r['tokens']}×{r['hidden']}×{r['vocab']} {r['dtype']}"
            if r["status"] == "ok":
                lines.append(
                    f"- {shape} {r['provider']}: {_num(r['median_ms']):,.1f} ms"
                    f" ({_num(r['x_fused']):.2f}×)"
                )
            else:
                lines.append(f"- {shape} {r['provider']}: {r['status']}")
        lines.append("")
    lin_p = read_csv(out / "linear_peak.csv")
    if lin_p:
        lines += ["## Fused linear: one process, one forward+backward (MiB)", ""]
        for r in lin_p:
            head = f"- {r['shape']} {r['dtype']} {r['variant']}"
            if r["status"] == "ok":
                lines.append(
                    f"{head}: step {r['step_mib']}, net {r['net_mib']}"
                    f" (peak {r['peak_mib']}, baseline {r['baseline_mib']})"
                )
            else:
                lines.append(f"{head}: {r['status']}")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main

SECTIONS = (
    "ce_time",
    "ce_memory",
    "residuals",
    "peak",
    "linear_memory",
    "linear_time",
    "linear_peak",
)


def _git(*args):
    try:
        cmd = ["git", "-C", str(REPO), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run(sizes, env, out, sections, label):
    """Runs the chosen sections, writing each file as soon as it is measured."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(
        {
            "label": label,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "git_commit": _git("rev-parse", "--short", "HEAD"),
            "jaxce_uncommitted_changes": bool(_git("status", "--porcelain", "jaxce")),
            "jax": jax.__version__,
            "jax_backend": env.backend,
            "device_kind": env.device_kind,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "optax": optax.__version__,
            "torch": env.torch.__version__ if env.torch is not None else env.torch_note,
            "torch_device": env.torch_device if env.torch is not None else "",
            "torch_threads": env.torch.get_num_threads() if env.torch is not None else "",
            "sizes": {k: v for k, v in sizes.__dict__.items()},
        }
    )
    meta.setdefault("seconds", {})

    def log(msg):
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    steps = {
        "ce_time": ("ce_time.csv", lambda: ce_time(sizes, env, log)),
        "ce_memory": ("ce_memory.csv", lambda: ce_memory(sizes, log)),
        "residuals": ("residuals.txt", lambda: residuals(sizes)),
        "peak": ("peak_rss.csv", lambda: ce_peak(sizes, env, log)),
        "linear_memory": ("linear.csv", lambda: linear_memory(sizes, log)),
        "linear_time": ("linear_time.csv", lambda: linear_time(sizes, env, log)),
        "linear_peak": ("linear_peak.csv", lambda: linear_peak(sizes, env, log)),
    }
    for name in sections:
        fname, fn = steps[name]
        t0 = time.time()
        result = fn()
        if isinstance(result, str):
            (out / fname).write_text(result)
        else:
            write_csv(out / fname, result)
        meta["seconds"][name] = round(time.time() - t0, 1)
        log(f"{name}: wrote {fname} ({meta['seconds'][name]:.0f} s)")
        meta_path.write_text(json.dumps(meta, indent=1, default=str))
    meta["seconds"]["total_this_run"] = round(time.time() - t_start, 1)
    meta_path.write_text(json.dumps(meta, indent=1, default=str))
    make_plots(out, label)
    summary(out, label)
    log(f"plots and summary.md written to {out}")


def parse_args(argv, mode):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (default: see the docstring)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    parser.add_argument("--repeats", type=int, help="timed rounds per shape (median of these)")
    parser.add_argument(
        "--only", help=f"comma-separated subset of: {','.join(SECTIONS)} (default: all)"
    )
    parser.add_argument("--plots-only", action="store_true", help="redraw PNGs from --out's CSVs")
    if mode is None:
        parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args(argv)
    if mode is not None:
        args.device = mode
    return args


def main(argv=None, mode=None):
    """Entry point of report.py (mode None: --device chooses) and gpu.py (mode "gpu")."""
    args = parse_args(argv, mode)
    if args.plots_only:
        if args.out is None:
            raise SystemExit("--plots-only needs --out")
        label = json.loads((args.out / "meta.json").read_text())["label"]
        make_plots(args.out, label)
        summary(args.out, label)
        return
    env = Env(args.device)
    sizes = QUICK if args.quick else (GPU if args.device == "gpu" else CPU)
    if args.repeats:
        sizes = Sizes(**dict(sizes.__dict__, repeats=args.repeats))
    slug = device_slug(env)
    if args.device == "gpu" and env.backend != "gpu" and not args.quick and args.out is None:
        raise SystemExit("no GPU: run with --quick, or name an --out folder for the GPU sizes")
    if args.out is None:
        args.out = Path("/tmp/jaxce-bench-quick") / slug if args.quick else HERE / "results" / slug
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {sorted(unknown)}")
    label = f"{env.device_kind} ({env.backend}, {os.cpu_count()} cores)"
    if env.backend == "cpu":
        label = f"{slug} ({os.cpu_count()} cores)"
    print(
        f"[report] {label}; jax {jax.__version__}; torch: {env.torch_note or 'yes'}; out {args.out}"
    )
    run(sizes, env, args.out, sections, label)


if __name__ == "__main__":
    main()
