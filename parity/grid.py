"""The option and layout grid of the cross-entropy cases, and their seeded random inputs.

One home for both users: the parity harness (``parity/suites.py``) builds its cases from
it, and the test suite (``tests/``) parametrizes over the same names and draws its inputs
with the same functions. NumPy only — no torch, jaxce or pytest — so the tests import it in
every environment.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

# name -> (input shape in jaxce's layout, class axis). torch puts the classes on dim 1
# (dim 0 for a 1-D input); the harness moves jaxce's class axis there.
LAYOUTS: dict[str, tuple[tuple[int, ...], int]] = {
    "(C,)": ((7,), -1),
    "(N,C)": ((6, 7), -1),
    "(N,C,d1)": ((3, 7, 4), 1),
    "(N,C,d1,d2)": ((2, 7, 3, 2), 1),
    "channels-last": ((3, 2, 4, 7), -1),
    # Beyond the harness's grid: the class axis first in a 2-D input (jaxce's axis=0) ...
    "(C,N) axis=0": ((7, 6), 0),
    # ... and longer rows, for the 16-bit error statistics.
    "(64,33)": ((64, 33), -1),
}
# The layouts of the harness's option grid (python -m parity) ...
GRID_LAYOUTS = ("(C,)", "(N,C)", "(N,C,d1)", "(N,C,d1,d2)", "channels-last")
# ... and of the tests' option grids (tests/test_values.py, test_gradients.py, test_torch.py).
TEST_LAYOUTS = (*GRID_LAYOUTS, "(C,N) axis=0")

WEIGHTS = ("none", "random", "some-zero")
# absent: the default -100, no target ignored; present: -100 on some targets (the first,
# never the last); valid-class: 2, a class that occurs; out-of-range: 255, never a class;
# all: every target ignored (-1).
IGNORES = ("absent", "present", "valid-class", "out-of-range", "all")
REDUCTIONS = ("none", "mean", "sum")
SMOOTHINGS = (0.0, 0.05, 1.0)


def rng_for(*key: Any) -> np.random.Generator:
    """A NumPy Generator seeded from ``key`` (its repr: stable across processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_logits(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape) * 2


def class_weight(rng: np.random.Generator, mode: str, num_classes: int) -> np.ndarray | None:
    """Per-class weights for a ``WEIGHTS`` mode (``None`` for 'none')."""
    if mode == "none":
        return None
    w = rng.uniform(0.25, 3.0, num_classes)
    if mode == "some-zero":
        w[::2] = 0.0
    return w


def index_target(
    rng: np.random.Generator, shape: tuple[int, ...], axis: int, mode: str
) -> tuple[np.ndarray, int]:
    """Class indices for logits of ``shape`` and an ``IGNORES`` mode: (target, ignore_index)."""
    num_classes = shape[axis]
    tshape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    y = rng.integers(0, num_classes, tshape)
    if mode == "absent":
        return y, -100
    if mode == "present":
        mask = rng.random(tshape) < 0.3
        mask.flat[0] = True
        if y.size > 1:
            mask.flat[-1] = False
        return np.where(mask, -100, y), -100
    if mode == "valid-class":
        y.flat[0] = 2
        return y, 2
    if mode == "out-of-range":
        return y, 255
    if mode == "all":
        return np.full(tshape, -1), -1
    raise ValueError(f"unknown ignore mode {mode!r}")


def prob_target(rng: np.random.Generator, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Random class probabilities (summing to 1 along ``axis``)."""
    t = rng.random(shape)
    return t / t.sum(axis=axis, keepdims=True)


def ce_inputs(
    rng: np.random.Generator,
    kind: str,
    shape: tuple[int, ...],
    axis: int,
    weight_mode: str = "none",
    ignore: str = "absent",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """float64 ``(logits, target, weight, ignore_index)`` for ``kind`` 'index' or 'prob'
    (probability targets: ``ignore`` is not used, ``ignore_index`` is -100)."""
    x = random_logits(rng, shape)
    w = class_weight(rng, weight_mode, shape[axis])
    if kind == "index":
        target, ignore_index = index_target(rng, shape, axis, ignore)
    elif kind == "prob":
        target, ignore_index = prob_target(rng, shape, axis), -100
    else:
        raise ValueError(f"kind must be 'index' or 'prob'; got {kind!r}")
    return x, target, w, ignore_index
