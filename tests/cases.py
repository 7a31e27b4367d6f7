"""Shared test inputs: layouts, option grids and random data."""

from __future__ import annotations

import itertools
import zlib

import jax
import numpy as np
import pytest

# A context manager switching float64 on or off: jax.enable_x64 (jax >= 0.8), or
# jax.experimental.enable_x64 (jax 0.7, the oldest supported).
enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64

# (name, input shape, class axis)
LAYOUTS = [
    ("C", (5,), -1),
    ("NC", (6, 5), -1),
    ("CN_axis0", (5, 6), 0),
    ("NCd", (3, 5, 4), 1),
    ("NdC", (3, 4, 5), -1),
    ("NCdd", (2, 5, 3, 2), 1),
]
LAYOUT_IDS = [name for name, _, _ in LAYOUTS]
REDUCTIONS = ["none", "mean", "sum"]
WEIGHTS = ["none", "positive", "some_zero"]
# ignore modes: default -100 absent; -1 present in targets; a valid class (2);
# out of range (255, never a class); every target ignored.
IGNORES = ["absent", "present", "valid_class", "out_of_range", "all"]
SMOOTHINGS = [0.0, 0.05, 1.0]


def class_count(shape, axis):
    return shape[axis]


def index_shape(shape, axis):
    axis = axis % len(shape)
    return tuple(d for i, d in enumerate(shape) if i != axis)


def make_logits(rng, shape, dtype=np.float64, scale=2.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def make_weight(rng, mode, num_classes):
    if mode == "none":
        return None
    w = rng.uniform(0.2, 3.0, size=num_classes)
    if mode == "some_zero":
        w[::2] = 0.0
    return w


def make_index_target(rng, shape, axis, num_classes, ignore_mode):
    """Returns (target int64 array, ignore_index)."""
    tshape = index_shape(shape, axis)
    y = rng.integers(0, num_classes, size=tshape)
    if ignore_mode == "absent":
        return y, -100
    if ignore_mode == "present":
        mask = rng.random(tshape) < 0.4
        if y.size:
            mask.flat[0] = True
        return np.where(mask, -1, y), -1
    if ignore_mode == "valid_class":
        if y.size:
            y.flat[0] = 2
        return y, 2
    if ignore_mode == "out_of_range":
        return y, 255
    if ignore_mode == "all":
        return np.full(tshape, -7), -7
    raise ValueError(ignore_mode)


def make_prob_target(rng, shape, axis):
    t = rng.random(shape)
    return t / t.sum(axis=axis, keepdims=True)


def rng_for(*key):
    """A NumPy Generator seeded from the test's parameters (stable across processes)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def covering_grid(*factors):
    """Every combination of ``factors`` (lists of values) as ``pytest.param``s, the ones
    outside a pairwise cover marked ``slow``.

    The cover is a greedy, deterministic choice of combinations in which every pair of
    values of any two factors appears at least once (bugs that need one or two options to
    show up are caught by the default run); ``python -m pytest -m ""`` runs the full
    product. A tuple value (a layout) is spread over several arguments.
    """
    sizes = [range(len(f)) for f in factors]
    combos = list(itertools.product(*sizes))
    axes = list(itertools.combinations(range(len(factors)), 2))

    def pairs(combo):
        return {(i, combo[i], j, combo[j]) for i, j in axes}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = set()
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        chosen.add(best)
        uncovered -= pairs(best)
    params = []
    for combo in combos:
        args, ids = [], []
        for factor, k in zip(factors, combo, strict=True):
            value = factor[k]
            args.extend(value if isinstance(value, tuple) else (value,))
            ids.append(str(value[0] if isinstance(value, tuple) else value))
        marks = () if combo in chosen else (pytest.mark.slow,)
        params.append(pytest.param(*args, id="-".join(ids), marks=marks))
    return params


def determinism_inputs(rng, prob, dtype):
    """``(x, t, w)`` for the eager-vs-jit determinism checks (``tests/test_transforms.py``
    and ``tests/scripts/determinism_no_fma.py``): logits ``[64, 3, 33]`` in ``dtype``,
    class indices with one ``-100`` (or probabilities when ``prob``), float32 weights."""
    import jax.numpy as jnp

    x = jnp.asarray(rng.standard_normal((64, 3, 33)), dtype)
    if prob:
        t = jnp.asarray(rng.random((64, 3, 33)), dtype)
    else:
        t = jnp.asarray(rng.integers(0, 33, (64, 3))).at[0, 0].set(-100)
    w = jnp.asarray(rng.uniform(0.5, 2, 33), jnp.float32)
    return x, t, w
