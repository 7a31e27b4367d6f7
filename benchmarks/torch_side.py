"""PyTorch's side: ``F.cross_entropy``, and ``F.linear_cross_entropy`` (its reference path,
and the chunked path with ``LinearCrossEntropyOptions()``), forward plus ``.backward()``.
Imports no JAX, so that a torch child of measure.py never loads it."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

LINEAR = ["torch reference"] if hasattr(F, "linear_cross_entropy") else []
LINEAR += ["torch chunked"] if hasattr(torch.nn, "LinearCrossEntropyOptions") else []


def step(variant, tensors):
    """A zero-argument forward+backward of ``variant`` on (x, y) or (h, w [V, D], y)."""
    sync = torch.cuda.synchronize if tensors[0].is_cuda else lambda: None
    inputs = [t.requires_grad_() for t in tensors[:-1]]
    options = torch.nn.LinearCrossEntropyOptions() if variant == "torch chunked" else None
    loss = (
        F.cross_entropy
        if variant == "torch"
        else lambda h, w, y: F.linear_cross_entropy(h, w, y, options=options)
    )

    def call():
        loss(*inputs, tensors[-1]).backward()
        sync()
        for t in inputs:
            t.grad = None

    return call


def from_jax(variant, arrays, dev):
    """``step`` on JAX arrays (x, y) or (h, k [D, V], y), read through DLPack."""

    def tensor(a):
        try:
            return torch.from_dlpack(a).to(dev)
        except Exception:  # a host copy
            arr = np.asarray(a)
            if arr.dtype.name == "bfloat16":
                return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16).to(dev)
            return torch.from_numpy(arr.copy()).to(dev)

    t = [tensor(a) for a in arrays]
    t[1:-1] = [w.T.contiguous() for w in t[1:-1]]  # torch's [V, D] layout
    return step(variant, [*t[:-1], t[-1].long()])


def child_step(spec):
    """(step, meter) for measure.child, on inputs that torch generates on its device."""
    from benchmarks.measure import host_memory

    dev = spec["device"]  # "cuda" or "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    dtype, gen, shape = (
        getattr(torch, spec["dtype"]),
        torch.Generator(dev).manual_seed(0),
        spec["shape"],
    )
    tensors = [torch.randint(0, shape[-1], shape[:1], device=dev, generator=gen)]
    if len(shape) == 3:
        n, d, v = shape
        tensors[:0] = [torch.randn(n, d, dtype=dtype, device=dev, generator=gen)]
        tensors[1:1] = [torch.randn(v, d, dtype=dtype, device=dev, generator=gen).mul_(d**-0.5)]
    else:
        tensors[:0] = [torch.randn(*shape, dtype=dtype, device=dev, generator=gen)]
    if dev == "cpu":
        return step(spec["variant"], tensors), host_memory()
    torch.cuda.synchronize()
    meter = ("max_memory_allocated", torch.cuda.max_memory_allocated, torch.cuda.memory_allocated)
    return step(spec["variant"], tensors), (*meter, torch.cuda.reset_peak_memory_stats)
