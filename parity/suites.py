"""The built-in case grids. A suite is a function returning a list of :class:`Case`.

Adding a function to the harness takes a few lines: write a generator of cases (a JAX
callable, its torch counterpart and NumPy inputs) and register it in ``SUITES``. The
cross-entropy options, layouts and inputs come from :mod:`parity.grid`, which the tests
share.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jaxce
from parity.compare import DTYPES, Result, compare
from parity.grid import (
    GRID_LAYOUTS,
    IGNORES,
    LAYOUTS,
    REDUCTIONS,
    SMOOTHINGS,
    WEIGHTS,
    ce_inputs,
    index_target,
    prob_target,
    rng_for,
)


@dataclasses.dataclass
class Case:
    id: str
    category: str
    dtype: str
    jax_fn: Callable[..., Any]
    torch_fn: Callable[..., Any]
    inputs: dict[str, np.ndarray]
    grad_wrt: Sequence[str] = ()
    transform: str = "eager"
    batched: Sequence[str] = ()

    def run(self) -> Result:
        """Judges the case with :func:`parity.compare`, the cotangent seeded by its id."""
        return compare(
            self.jax_fn,
            self.torch_fn,
            self.inputs,
            grad_wrt=self.grad_wrt,
            dtype=self.dtype,
            transform=self.transform,
            batched=self.batched,
            seed=zlib.crc32(self.id.encode()),
        )


# --------------------------------------------------------------------------------------
# jaxce.cross_entropy vs torch.nn.functional.cross_entropy
# --------------------------------------------------------------------------------------


def torch_ce(axis: int, ndim: int, **options: Any) -> Callable[..., Any]:
    """torch's cross_entropy on jaxce's layout: the class axis moved to dim 1 (0 if 1-D)."""
    import torch

    torch_axis = 0 if ndim == 1 else 1

    def fn(input, target, weight=None):
        x = torch.movedim(input, axis, torch_axis)
        if target.dtype.is_floating_point:
            target = torch.movedim(target, axis, torch_axis)
        return torch.nn.functional.cross_entropy(x, target, weight, **options)

    return fn


def jax_ce(axis: int, **options: Any) -> Callable[..., Any]:
    """jaxce.cross_entropy with the arguments of :func:`torch_ce`'s function."""

    def fn(input, target, weight=None):
        return jaxce.cross_entropy(input, target, weight, axis=axis, **options)

    return fn


def ce_case(
    *,
    kind: str,
    layout: str,
    weight: str,
    ignore: str,
    reduction: str,
    smoothing: float,
    dtype: str,
    transform: str = "eager",
    category: str | None = None,
) -> Case:
    """One cross-entropy case of the grid: ``kind`` 'index' or 'prob', a ``LAYOUTS`` name,
    the ``WEIGHTS`` / ``IGNORES`` modes, reduction, smoothing, dtype and transform."""
    shape, axis = LAYOUTS[layout]
    rng = rng_for(kind, layout, weight, ignore, reduction, smoothing)
    x, target, w, ii = ce_inputs(rng, kind, shape, axis, weight, ignore)
    grad_wrt = ("input",) if kind == "index" else ("input", "target")
    options = dict(ignore_index=ii, reduction=reduction, label_smoothing=smoothing)
    inputs = {"input": x, "target": target}
    if w is not None:
        inputs["weight"] = w
    batched: tuple[str, ...] = ()
    if transform == "vmap":
        # An extra leading axis of 2 on input and target; the weight is shared.
        inputs["input"] = np.stack([x, rng_for("vmap", layout).standard_normal(shape) * 2])
        other = (
            index_target(rng_for("vmap-t", layout), shape, axis, ignore)[0]
            if kind == "index"
            else prob_target(rng_for("vmap-t", layout), shape, axis)
        )
        inputs["target"] = np.stack([target, other])
        batched = ("input", "target")
    ident = (
        f"{kind}|{layout}|w={weight}|"
        + (f"ii={ignore}|" if kind == "index" else "")
        + f"{reduction}|ls={smoothing}|{dtype}|{transform}"
    )
    return Case(
        id=ident,
        category=category or f"{kind} targets",
        dtype=dtype,
        jax_fn=jax_ce(axis, **options),
        torch_fn=torch_ce(axis, len(shape), **options),
        inputs=inputs,
        grad_wrt=grad_wrt,
        transform=transform,
        batched=batched,
    )


def cross_entropy_suite() -> list[Case]:
    cases = []
    # A. Every option combination, every layout, in float64 (eager).
    for layout, weight, ignore, reduction, eps in itertools.product(
        GRID_LAYOUTS, WEIGHTS, IGNORES, REDUCTIONS, SMOOTHINGS
    ):
        cases.append(
            ce_case(kind="index", layout=layout, weight=weight, ignore=ignore,
                    reduction=reduction, smoothing=eps, dtype="float64")
        )  # fmt: skip
    for layout, weight, reduction, eps in itertools.product(
        GRID_LAYOUTS, WEIGHTS, REDUCTIONS, SMOOTHINGS
    ):
        cases.append(
            ce_case(kind="prob", layout=layout, weight=weight, ignore="absent",
                    reduction=reduction, smoothing=eps, dtype="float64")
        )  # fmt: skip
    # B. The other dtypes on a slice of the options (every layout and reduction).
    for dtype, layout, weight, ignore, reduction, eps in itertools.product(
        DTYPES[1:], GRID_LAYOUTS, ("none", "random"), ("absent", "present"), REDUCTIONS, (0.0, 0.05)
    ):
        cases.append(
            ce_case(kind="index", layout=layout, weight=weight, ignore=ignore,
                    reduction=reduction, smoothing=eps, dtype=dtype)
        )  # fmt: skip
    for dtype, layout, weight, reduction, eps in itertools.product(
        DTYPES[1:], GRID_LAYOUTS, ("none", "random"), REDUCTIONS, (0.0, 0.05)
    ):
        cases.append(
            ce_case(kind="prob", layout=layout, weight=weight, ignore="absent",
                    reduction=reduction, smoothing=eps, dtype=dtype)
        )  # fmt: skip
    # C. Transforms: jit and vmap over an extra leading axis.
    for transform, dtype, layout, weight, ignore, reduction, eps in itertools.product(
        ("jit", "vmap"), ("float64", "float32"), GRID_LAYOUTS, ("none", "random"),
        ("present", "all"), REDUCTIONS, (0.0, 0.05),
    ):  # fmt: skip
        cases.append(
            ce_case(kind="index", layout=layout, weight=weight, ignore=ignore,
                    reduction=reduction, smoothing=eps, dtype=dtype, transform=transform,
                    category=f"transform: {transform}")
        )  # fmt: skip
    for transform, dtype, layout, reduction in itertools.product(
        ("jit", "vmap"), ("float64", "float32"), GRID_LAYOUTS, REDUCTIONS
    ):
        cases.append(
            ce_case(kind="prob", layout=layout, weight="random", ignore="absent",
                    reduction=reduction, smoothing=0.05, dtype=dtype, transform=transform,
                    category=f"transform: {transform}")
        )  # fmt: skip
    cases += edge_cases()
    cases += error_cases()
    cases += module_cases()
    return cases


def simple_case(ident, category, dtype, x, target, axis=-1, weight=None, **options) -> Case:
    """A cross-entropy case on given inputs (``options``: cross_entropy's keywords);
    gradients w.r.t. the logits, and w.r.t. the target when it holds probabilities."""
    inputs = {"input": x, "target": target}
    if weight is not None:
        inputs["weight"] = weight
    prob = np.issubdtype(np.asarray(target).dtype, np.floating)
    return Case(
        id=f"{ident}|{dtype}",
        category=category,
        dtype=dtype,
        jax_fn=jax_ce(axis, **options),
        torch_fn=torch_ce(axis, np.ndim(x), **options),
        inputs=inputs,
        grad_wrt=("input", "target") if prob else ("input",),
    )


def edge_cases() -> list[Case]:
    cases = []
    for dtype, reduction, eps in itertools.product(DTYPES, REDUCTIONS, (0.0, 0.3)):
        rng = rng_for("edge", dtype, reduction, eps)
        opts = dict(reduction=reduction, label_smoothing=eps)
        x = rng.standard_normal((5, 6))
        y = rng.integers(0, 6, 5)
        x_inf = x.copy()
        x_inf[np.arange(5), (y + 1) % 6] = -np.inf  # -inf in non-target classes
        cases.append(
            simple_case(
                f"-inf non-target|{reduction}|ls={eps}", "edge inputs", dtype, x_inf, y, **opts
            )
        )
        big = rng.standard_normal((5, 6)) * 1e4
        if dtype in ("float64", "float32"):
            cases.append(
                simple_case(
                    f"±1e4 logits|{reduction}|ls={eps}", "edge inputs", dtype, big, y, **opts
                )
            )
        cases.append(
            simple_case(
                f"C=1|{reduction}|ls={eps}",
                "edge inputs",
                dtype,
                x[:, :1],
                np.zeros(5, np.int64),
                **opts,
            )
        )
        cases.append(
            simple_case(
                f"N=0|{reduction}|ls={eps}",
                "edge inputs",
                dtype,
                np.zeros((0, 6)),
                np.zeros(0, np.int64),
                **opts,
            )
        )
        odd_x = rng.standard_normal((3, 423))
        odd_y = rng.integers(0, 423, 3)
        cases.append(
            simple_case(f"(3,423)|{reduction}|ls={eps}", "edge inputs", dtype, odd_x, odd_y, **opts)
        )
        probs = prob_target(rng, (3, 423), -1)
        cases.append(
            simple_case(
                f"(3,423) prob|{reduction}|ls={eps}", "edge inputs", dtype, odd_x, probs, **opts
            )
        )
    return cases  # fmt: skip


def error_cases() -> list[Case]:
    """Combinations torch rejects: jaxce must reject them too."""
    rng = rng_for("errors")
    x = rng.standard_normal((4, 3))
    y = np.array([0, 1, 2, 0])
    p = prob_target(rng, (4, 3), -1)
    bad = [
        ("prob target with ignore_index>=0", dict(target=p, ignore_index=0)),
        ("label_smoothing>1 (index)", dict(target=y, label_smoothing=1.5)),
        ("label_smoothing>1 (prob)", dict(target=p, label_smoothing=1.5)),
        ("reduction='avg'", dict(target=y, reduction="avg")),
        ("weight of length 2", dict(target=y, weight=np.ones(2))),
        ("weight of shape (1,3)", dict(target=y, weight=np.ones((1, 3)))),
        ("batch size mismatch", dict(target=y[:3])),
        ("multi-target (N,2)", dict(target=np.zeros((4, 2), np.int64))),
        ("index target out of range", dict(target=np.array([0, 3, 1, 0]))),
        ("negative index target", dict(target=np.array([0, -2, 1, 0]))),
        ("integer target of input's shape", dict(target=np.zeros((4, 3), np.int64))),
    ]
    cases = []
    for ident, kw in bad:
        target = kw.pop("target")
        weight = kw.pop("weight", None)
        case = simple_case(ident, "error parity", "float64", x, target, weight=weight, **kw)
        case.grad_wrt = ()
        cases.append(case)
    return cases


def module_cases() -> list[Case]:
    """jaxce.CrossEntropyLoss vs torch.nn.CrossEntropyLoss."""
    import torch

    cases = []
    for reduction, eps, weighted in itertools.product(REDUCTIONS, (0.0, 0.1), (False, True)):
        rng = rng_for("module", reduction, eps, weighted)
        x = rng.standard_normal((2, 5, 3))
        y = rng.integers(0, 5, (2, 3))
        y[0, 0] = -100
        w = rng.uniform(0.5, 2.0, 5) if weighted else None

        def jax_fn(input, target, weight=None, reduction=reduction, eps=eps):
            return jaxce.CrossEntropyLoss(weight, reduction=reduction, label_smoothing=eps, axis=1)(
                input, target
            )

        def torch_fn(input, target, weight=None, reduction=reduction, eps=eps):
            return torch.nn.CrossEntropyLoss(weight, reduction=reduction, label_smoothing=eps)(
                input, target
            )

        inputs = {"input": x, "target": y} | ({"weight": w} if weighted else {})
        for dtype in ("float64", "float32"):
            cases.append(
                Case(
                    id=f"CrossEntropyLoss|{reduction}|ls={eps}|weighted={weighted}|{dtype}",
                    category="module",
                    dtype=dtype,
                    jax_fn=jax_fn,
                    torch_fn=torch_fn,
                    inputs=inputs,
                    grad_wrt=("input",),
                )
            )
    return cases  # fmt: skip


def torch_linear(**options: Any) -> Callable[..., Any]:
    """torch's linear_cross_entropy on jaxce's kernel layout ``[D, V]`` or ``[D, C, d1,
    ...]`` (torch: ``[V, D]`` or ``[C, d1, ..., D]``)."""
    import torch

    def fn(hidden, kernel, target, bias=None, weight=None):
        return torch.nn.functional.linear_cross_entropy(
            hidden, kernel.movedim(0, -1), target, linear_bias=bias, weight=weight, **options
        )

    return fn


def jax_linear(chunk_size: int | None = None, **options: Any) -> Callable[..., Any]:
    """jaxce.linear_cross_entropy with the arguments of :func:`torch_linear`'s function."""

    def fn(hidden, kernel, target, bias=None, weight=None):
        return jaxce.linear_cross_entropy(
            hidden, kernel, target, weight, bias=bias, chunk_size=chunk_size, **options
        )

    return fn


def _linear_case(ident, dtype, inputs, options, chunk_size=128, jax_only=None) -> Case:
    """``jax_only``: options of jaxce alone (``strategy``), not passed to torch."""
    grad_wrt = ["hidden", "kernel"] + (["bias"] if "bias" in inputs else [])
    if np.issubdtype(inputs["target"].dtype, np.floating):
        grad_wrt.append("target")
    return Case(
        id=f"linear|{ident}|{dtype}",
        category="linear_cross_entropy",
        dtype=dtype,
        jax_fn=jax_linear(chunk_size=chunk_size, **options, **(jax_only or {})),
        torch_fn=torch_linear(**options),
        inputs=inputs,
        grad_wrt=tuple(grad_wrt),
    )


LINEAR_DTYPES = ("float64", "float32", "bfloat16")


def linear_cross_entropy_suite() -> list[Case]:
    """jaxce.linear_cross_entropy vs torch.nn.functional.linear_cross_entropy: class
    indices and class probabilities over the option grid, unbatched hidden, torch's default
    ``ignore_index=None``, and K-dimensional out-features."""
    cases = []
    grid = itertools.product(
        ("index", "probs"), REDUCTIONS, (0.0, 0.1), ("none", "random"), (False, True),
        LINEAR_DTYPES,
    )  # fmt: skip
    for kind, reduction, eps, weight, with_bias, dtype in grid:
        key = ("linear", reduction, eps, weight, with_bias)
        rng = rng_for(*(key if kind == "index" else (*key, kind)))
        n, d, v = 9, 16, 517  # v spans several chunks and a remainder
        hidden = rng.standard_normal((n, d))
        kernel = rng.standard_normal((d, v)) * d**-0.5
        if kind == "index":
            y = rng.integers(0, v, n)
            y[2] = -100
            options = dict(reduction=reduction, ignore_index=-100, label_smoothing=eps)
            ident = f"{reduction}|ls={eps}|w={weight}|bias={with_bias}"
        else:
            y = rng.dirichlet(np.ones(v), n)
            options = dict(reduction=reduction, label_smoothing=eps)
            ident = f"probs|{reduction}|ls={eps}|w={weight}|bias={with_bias}"
        inputs = {"hidden": hidden, "kernel": kernel, "target": y}
        if with_bias:
            inputs["bias"] = rng.standard_normal(v) * 0.1
        if weight == "random":
            inputs["weight"] = rng.uniform(0.25, 3.0, v)
        cases.append(_linear_case(ident, dtype, inputs, options))
        if reduction != "none" and eps and with_bias:
            # strategy="min_work": the gradient formed over token blocks (4, 4, 1 rows).
            cases.append(
                _linear_case(f"{ident}|min_work", dtype, inputs, options,
                             jax_only={"strategy": "min_work", "block_size": 4})
            )  # fmt: skip
    for kind, dtype in itertools.product(("index", "probs"), LINEAR_DTYPES):
        rng = rng_for("linear forms", kind)
        d, v, c, out = 16, 517, 6, (3, 2)
        target = rng.integers(0, v, ()) if kind == "index" else rng.dirichlet(np.ones(v))
        inputs = {"hidden": rng.standard_normal(d), "kernel": rng.standard_normal((d, v)) * d**-0.5,
                  "target": np.asarray(target), "weight": rng.uniform(0.25, 3.0, v)}  # fmt: skip
        cases.append(_linear_case(f"unbatched|{kind}", dtype, inputs, dict(label_smoothing=0.1)))
        n = 9
        if kind == "index":
            target = rng.integers(0, c, (n, *out))
        else:
            target = rng.dirichlet(np.ones(c), (n, *out)).transpose(0, 3, 1, 2)
        inputs = {"hidden": rng.standard_normal((n, d)),
                  "kernel": rng.standard_normal((d, c, *out)) * d**-0.5, "target": target,
                  "bias": rng.standard_normal((c, *out)) * 0.1, "weight": rng.uniform(0.25, 3.0, c)}  # fmt: skip
        cases.append(_linear_case(f"k-dim|{kind}", dtype, inputs, dict(label_smoothing=0.1)))
    for reduction, dtype in itertools.product(REDUCTIONS, LINEAR_DTYPES):
        rng = rng_for("linear ignore_index=None", reduction)
        n, d, v = 9, 16, 517
        y = rng.integers(0, v, n)
        y[[1, 4]] = -100  # torch's None means -100 for class indices
        inputs = {"hidden": rng.standard_normal((n, d)), "kernel": rng.standard_normal((d, v)) * d**-0.5, "target": y}  # fmt: skip
        cases.append(_linear_case(f"ignore_index=None|{reduction}", dtype, inputs, dict(reduction=reduction)))  # fmt: skip
    return cases


SUITES: dict[str, Callable[[], list[Case]]] = {
    "cross_entropy": cross_entropy_suite,
    "linear_cross_entropy": linear_cross_entropy_suite,
}
