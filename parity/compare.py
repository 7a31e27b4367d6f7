"""Reusable JAX-vs-PyTorch comparison: values, gradients, shapes, dtypes, NaN/inf placement.

Usable for any pair of functions, not only jaxce::

    import numpy as np, jax.numpy as jnp, torch
    from parity import compare

    x = np.random.default_rng(0).standard_normal((4, 3))
    result = compare(
        jax_fn=lambda x: jnp.tanh(x).sum(),
        torch_fn=lambda x: torch.tanh(x).sum(),
        inputs={"x": x},
        grad_wrt=("x",),
        dtype="float32",
    )
    assert result.passed, result.message

How a case is judged:

* both functions get the same inputs, floating ones cast to ``dtype`` (integers as they
  are); gradients come from torch autograd and ``jax.vjp`` with the same random cotangent;
* the output shape and dtype must match, and NaN/±inf must sit in the same places;
* each gradient must have torch's dtype (the dtype of its input);
* float64 / float32 compare with ``rtol``/``atol`` keyed by dtype (or the caller's
  ``tolerance``);
* bfloat16 / float16 use the three-way rule: a float64 truth (torch at float64 on the same,
  already-rounded inputs); our error against it must be no worse than torch's own error at
  that dtype plus ``margin × unit roundoff × scale``;
* if torch raises, JAX must raise too (an *error-parity* case), and vice versa.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float64", "float32", "bfloat16", "float16")
TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (2e-5, 2e-6)}  # (rtol, atol)
ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


@dataclasses.dataclass
class Check:
    """One compared quantity (the output, or a gradient)."""

    name: str
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    torch_err: float | None = None  # three-way rule: torch's own error vs float64 truth
    message: str = ""


@dataclasses.dataclass
class Result:
    passed: bool
    checks: list[Check]
    error_parity: bool = False  # both sides raised
    message: str = ""

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.checks), default=0.0)


class Run(NamedTuple):
    """What one side computed: the output and gradients as float64, with their dtypes."""

    out: np.ndarray
    dtype: str
    grads: dict[str, np.ndarray]
    grad_dtypes: dict[str, str]


def _torch():
    import torch

    return torch


def _torch_dtype(name: str):
    return getattr(_torch(), name)


def _as_inputs(inputs: Mapping[str, Any], dtype: str) -> dict[str, np.ndarray]:
    """Floating inputs rounded to ``dtype`` once, kept as float64 NumPy (exact)."""
    out = {}
    for name, value in inputs.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype(jnp.dtype(dtype)).astype(np.float64)
        out[name] = value
    return out


def _cotangent(shape: tuple[int, ...], seed: int, dtype: str) -> np.ndarray:
    """A seeded random cotangent, rounded to ``dtype`` (so the float64 truth uses the
    very same values as the low-precision runs)."""
    ct = np.random.default_rng(seed).standard_normal(shape)
    return ct.astype(jnp.dtype(dtype)).astype(np.float64)


def run_torch(
    torch_fn: Callable[..., Any],
    inputs: Mapping[str, np.ndarray],
    grad_wrt: Sequence[str],
    dtype: str,
    seed: int,
    batched: Sequence[str] = (),
    cotangent_dtype: str | None = None,
) -> Run:
    """Runs ``torch_fn`` on ``inputs`` (as from ``_as_inputs``: floating ones are cast to
    ``dtype``), with the cotangent of ``seed`` rounded to ``cotangent_dtype`` (default: the
    output's dtype).

    With ``batched`` names, the inputs carry an extra leading axis and torch is run once
    per slice (the reference for ``jax.vmap``), results stacked.
    """
    torch = _torch()
    tensors = {}
    for name, value in inputs.items():
        if np.issubdtype(value.dtype, np.floating):
            t = torch.tensor(value, dtype=_torch_dtype(dtype), requires_grad=name in grad_wrt)
        else:
            t = torch.tensor(value)
        tensors[name] = t
    if batched:
        size = next(iter(inputs[n] for n in batched)).shape[0]
        outs = [
            torch_fn(**{n: (t[i] if n in batched else t) for n, t in tensors.items()})
            for i in range(size)
        ]
        out = torch.stack(outs)
    else:
        out = torch_fn(**tensors)
    out_dtype = str(out.dtype).removeprefix("torch.")
    grads, grad_dtypes = {}, {}
    if grad_wrt:
        ct_dtype = cotangent_dtype or out_dtype
        ct = torch.tensor(_cotangent(tuple(out.shape), seed, ct_dtype), dtype=out.dtype)
        out.backward(ct)
        for name in grad_wrt:
            g = tensors[name].grad
            grads[name] = np.zeros(inputs[name].shape) if g is None else g.double().numpy()
            grad_dtypes[name] = str(tensors[name].dtype).removeprefix("torch.")
    return Run(out.detach().double().numpy(), out_dtype, grads, grad_dtypes)


def run_jax(
    jax_fn: Callable[..., Any],
    inputs: Mapping[str, np.ndarray],
    grad_wrt: Sequence[str],
    dtype: str,
    seed: int,
    transform: str = "eager",
    batched: Sequence[str] = (),
) -> Run:
    """Runs ``jax_fn`` under ``transform`` ('eager', 'jit' or 'vmap' over ``batched``)."""
    arrays = {
        n: jnp.asarray(v, dtype) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v)
        for n, v in inputs.items()
    }
    diff_names = list(grad_wrt)
    fixed = {n: a for n, a in arrays.items() if n not in diff_names}

    def call(fixed_args, *diff):
        return jax_fn(**fixed_args, **dict(zip(diff_names, diff, strict=True)))

    if transform == "eager":
        fn = partial(call, fixed)
    elif transform == "jit":
        fn = jax.jit(partial(call, fixed))
    elif transform == "vmap":
        fixed_axes = {n: (0 if n in batched else None) for n in fixed}
        diff_axes = tuple(0 if n in batched else None for n in diff_names)
        fn = partial(jax.vmap(call, in_axes=(fixed_axes, *diff_axes)), fixed)
    else:
        raise ValueError(f"transform must be 'eager', 'jit' or 'vmap'; got {transform!r}")
    primals = [arrays[n] for n in diff_names]
    out, vjp = jax.vjp(fn, *primals)
    out_dtype = jnp.dtype(out.dtype).name
    grads, grad_dtypes = {}, {}
    if diff_names:
        ct = jnp.asarray(_cotangent(tuple(out.shape), seed, out_dtype), out.dtype)
        for name, g in zip(diff_names, vjp(ct), strict=True):
            grads[name] = np.asarray(g).astype(np.float64)
            grad_dtypes[name] = jnp.dtype(g.dtype).name
    return Run(np.asarray(out).astype(np.float64), out_dtype, grads, grad_dtypes)


def _errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    finite = np.isfinite(ref) & np.isfinite(ours)
    if not finite.any():
        return 0.0, 0.0
    diff = np.abs(ours[finite] - ref[finite])
    rel = diff / np.maximum(np.abs(ref[finite]), np.finfo(np.float64).tiny)
    return float(diff.max()), float(np.where(diff == 0, 0.0, rel).max())


def _placement(name: str, ours: np.ndarray, ref: np.ndarray) -> str:
    if ours.shape != ref.shape:
        return f"{name}: shape {ours.shape} != torch's {ref.shape}"
    for label, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        if not np.array_equal(test(ours), test(ref)):
            return f"{name}: {label} placement differs from torch"
    return ""


def judge(
    name: str,
    ours: np.ndarray,
    theirs: np.ndarray,
    dtype: str,
    truth: np.ndarray | None = None,
    margin: float = 2.0,
    tolerance: tuple[float, float] | None = None,
) -> Check:
    """Compares one quantity; ``truth`` (float64) is required for bfloat16/float16;
    ``tolerance`` (rtol, atol) replaces ``TOLERANCES[dtype]`` for float64/float32."""
    problem = _placement(name, ours, theirs)
    if problem:
        return Check(name, False, message=problem)
    if dtype in ROUNDOFF:
        if truth is None:
            raise ValueError(f"judging {dtype} needs a float64 truth")
        problem = _placement(name, ours, truth)
        if problem:
            return Check(name, False, message=problem + " (float64 truth)")
        max_abs, max_rel = _errors(ours, truth)
        torch_err, _ = _errors(theirs, truth)
        finite = truth[np.isfinite(truth)]
        scale = max(1.0, float(np.max(np.abs(finite), initial=0.0)))
        bound = torch_err + margin * ROUNDOFF[dtype] * scale
        passed = max_abs <= bound
        msg = "" if passed else f"{name}: error {max_abs:.3g} > torch's {torch_err:.3g} + margin"
        return Check(name, passed, max_abs, max_rel, torch_err, msg)
    rtol, atol = tolerance or TOLERANCES[dtype]
    max_abs, max_rel = _errors(ours, theirs)
    finite = np.isfinite(theirs)
    ok = np.all(np.abs(ours[finite] - theirs[finite]) <= atol + rtol * np.abs(theirs[finite]))
    msg = "" if ok else f"{name}: max abs error {max_abs:.3g} (rtol {rtol}, atol {atol})"
    return Check(name, bool(ok), max_abs, max_rel, None, msg)


def compare(
    jax_fn: Callable[..., Any],
    torch_fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    grad_wrt: Sequence[str] = (),
    dtype: str = "float32",
    transform: str = "eager",
    batched: Sequence[str] = (),
    seed: int = 0,
    margin: float = 2.0,
    tolerance: tuple[float, float] | None = None,
) -> Result:
    """Runs both functions on the same inputs and judges outputs and gradients.

    Args:
      jax_fn: called with the inputs as keyword arguments (JAX arrays).
      torch_fn: called with the same keywords (torch tensors).
      inputs: name -> NumPy array. Floating arrays are cast to ``dtype`` for both sides.
      grad_wrt: names of floating inputs to differentiate with respect to.
      dtype: one of ``DTYPES``.
      transform: 'eager', 'jit' (``jax.jit``) or 'vmap' (``jax.vmap`` over the leading
        axis of the ``batched`` inputs; torch loops over it).
      batched: with ``transform='vmap'``, the inputs that carry the extra leading axis.
      seed: seeds the cotangent used for the gradients.
      margin: the three-way rule's margin, in units of the dtype's unit roundoff.
      tolerance: (rtol, atol) for float64/float32 instead of ``TOLERANCES[dtype]``.

    Returns:
      A :class:`Result`; ``result.passed`` and ``result.message`` say what happened.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype='float64' needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
            "before creating arrays"
        )
    inputs = _as_inputs(inputs, dtype)
    torch_batched = batched if transform == "vmap" else ()
    try:
        theirs = run_torch(torch_fn, inputs, grad_wrt, dtype, seed, torch_batched)
        torch_error = None
    except Exception as e:
        torch_error = e
    try:
        ours = run_jax(jax_fn, inputs, grad_wrt, dtype, seed, transform, batched)
        jax_error = None
    except (TypeError, ValueError, IndexError) as e:
        jax_error = e
    if torch_error is not None or jax_error is not None:
        both = torch_error is not None and jax_error is not None
        if both:
            msg = f"both raise: torch {type(torch_error).__name__}, jax {type(jax_error).__name__}: {jax_error}"
        elif torch_error is not None:
            msg = f"torch raises {type(torch_error).__name__}: {torch_error}; jax returns a value"
        else:
            msg = f"jax raises {type(jax_error).__name__}: {jax_error}; torch returns a value"
        return Result(both, [], error_parity=both, message=msg)

    checks = []
    if ours.dtype != theirs.dtype:
        checks.append(
            Check("dtype", False, message=f"output dtype {ours.dtype} != torch's {theirs.dtype}")
        )
    for name in grad_wrt:
        if ours.grad_dtypes[name] != theirs.grad_dtypes[name]:
            message = (
                f"d/d{name} dtype {ours.grad_dtypes[name]} != torch's {theirs.grad_dtypes[name]}"
            )
            checks.append(Check(f"d/d{name} dtype", False, message=message))
    truth = None
    if dtype in ROUNDOFF:
        truth = run_torch(
            torch_fn, inputs, grad_wrt, "float64", seed, torch_batched, cotangent_dtype=theirs.dtype
        )
    truth_out = None if truth is None else truth.out
    checks.append(judge("output", ours.out, theirs.out, dtype, truth_out, margin, tolerance))
    for name in grad_wrt:
        truth_grad = None if truth is None else truth.grads[name]
        checks.append(
            judge(f"d/d{name}", ours.grads[name], theirs.grads[name], dtype, truth_grad, margin,
                  tolerance)
        )  # fmt: skip
    passed = all(c.passed for c in checks)
    message = "; ".join(c.message for c in checks if c.message)
    return Result(passed, checks, message=message)
