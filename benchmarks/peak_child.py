"""One forward+backward in a fresh process, then its peak memory as one JSON line.

Started by `benchmarks/report.py` (not meant to be run by hand):

    python benchmarks/peak_child.py '{"kind": "ce", "variant": "torch", "dtype": "float32",
                                      "shape": [4096, 32768], "device": "cpu", "baseline": false}'

Only the standard library is imported at the top, so a torch child never imports JAX and a
JAX child never imports torch. A *baseline* child imports the framework and allocates the
inputs (on the device, in their final dtype) and stops there. The others then (JAX) compile
the jitted `value_and_grad` ahead of time, reset the high-water mark, run one
forward+backward and read the peak again. Reported: the process's peak over its whole life
(compile included) and, where the mark can be reset, its growth over the one step alone
above the memory in use just before it.

Measures:
* CPU: the process's peak resident set, `VmHWM` from /proc/self/status, reset by writing 5
  to /proc/self/clear_refs. (`ru_maxrss` is reported too, but on Linux it survives
  fork+exec, so a child's value is at least its parent's resident size at the fork; VmHWM
  belongs to the new address space.)
* GPU: the allocator's peak: `memory_stats()["peak_bytes_in_use"]` (JAX; it cannot be reset,
  so there is no step figure) and `torch.cuda.max_memory_allocated()` (reset before the step).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

MIB = 2**20


def _status_kib(field):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class HostMeter:
    """Peak / current resident memory of this process (CPU runs)."""

    name = "VmHWM"

    def peak(self):
        kib = _status_kib("VmHWM")
        if kib is None:  # not Linux: fall back to ru_maxrss (KiB on Linux, bytes on macOS)
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib * 1024

    def current(self):
        kib = _status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def reset(self):
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False


class JaxGpuMeter:
    """JAX's device allocator statistics (cannot be reset)."""

    name = "peak_bytes_in_use"

    def __init__(self):
        import jax

        self.device = jax.devices()[0]

    def peak(self):
        return self.device.memory_stats()["peak_bytes_in_use"]

    def current(self):
        return self.device.memory_stats()["bytes_in_use"]

    def reset(self):
        return False


class TorchGpuMeter:
    """torch's CUDA caching-allocator statistics."""

    name = "max_memory_allocated"

    def __init__(self):
        import torch

        self.torch = torch

    def peak(self):
        return self.torch.cuda.max_memory_allocated()

    def current(self):
        return self.torch.cuda.memory_allocated()

    def reset(self):
        self.torch.cuda.reset_peak_memory_stats()
        return True


def _torch_setup(spec):
    import torch
    import torch.nn.functional as F

    dev = "cuda" if spec["device"] == "gpu" else "cpu"
    if dev == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator(device=dev).manual_seed(0)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    meter = TorchGpuMeter() if dev == "cuda" else HostMeter()

    if spec["kind"] == "ce":
        n, c = spec["shape"]
        x = torch.randn(n, c, dtype=dtype, device=dev, generator=gen).requires_grad_()
        y = torch.randint(0, c, (n,), device=dev, generator=gen)

        def step():
            F.cross_entropy(x, y).backward()
            sync()
            x.grad = None

    else:
        n, d, v = spec["shape"]
        h = torch.randn(n, d, dtype=dtype, device=dev, generator=gen).requires_grad_()
        w = torch.randn(v, d, dtype=dtype, device=dev, generator=gen)
        w = w.mul_(d**-0.5).requires_grad_()  # torch's [V, D] layout
        y = torch.randint(0, v, (n,), device=dev, generator=gen)
        options = (
            torch.nn.LinearCrossEntropyOptions() if spec["variant"] == "torch chunked" else None
        )

        def step():
            F.linear_cross_entropy(h, w, y, options=options).backward()
            sync()
            h.grad = w.grad = None

    sync()
    return step, meter, lambda: None


def _jax_setup(spec):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import jax.numpy as jnp
    import report  # the loss definitions

    gpu = spec["device"] == "gpu" and jax.default_backend() == "gpu"
    meter = JaxGpuMeter() if gpu else HostMeter()
    dtype = jnp.dtype(spec["dtype"])
    if spec["kind"] == "ce":
        args = report.ce_inputs(*spec["shape"], dtype)
        loss, argnums = report.CE_LOSSES[spec["variant"]], 0
    else:
        args = report.linear_inputs(*spec["shape"], dtype)
        loss, argnums = report.LINEAR_LOSSES[spec["variant"]], (0, 1)
    grad = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    jax.block_until_ready(args)
    compiled = []

    def prepare():  # compile ahead of time: the step below only runs
        compiled.append(grad.lower(*args).compile())

    def step():
        jax.block_until_ready(compiled[0](*args))

    return step, meter, prepare


def measure(spec):
    """Runs the spec (see the module docstring) and returns its result dict (bytes)."""
    torch_side = spec["variant"].startswith("torch")
    step, meter, prepare = (_torch_setup if torch_side else _jax_setup)(spec)
    out = {"measure": meter.name, "baseline_bytes": meter.peak()}
    if spec["baseline"]:
        out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out
    prepare()
    peak_before = meter.peak()
    before = meter.current()
    reset = meter.reset()
    t0 = time.perf_counter()
    step()
    out["step_ms"] = (time.perf_counter() - t0) * 1e3
    out["peak_bytes"] = max(peak_before, meter.peak())
    if reset:
        out["step_bytes"] = meter.peak() - before
    out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main():
    spec = json.loads(sys.argv[1])
    try:
        result = measure(spec)
    except Exception as err:  # OOM included: the parent records it and carries on
        text = f"{type(err).__name__}: {err}"
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        result = {"error": "OOM" if oom else text.splitlines()[0][:200]}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
