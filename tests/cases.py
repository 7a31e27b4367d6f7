"""Test helpers around the shared case grid (``parity/grid.py``: option names, layouts,
seeded inputs): the pairwise cover that turns a grid into pytest parameters, a float64
switch for every supported JAX, and the determinism checks' inputs."""

from __future__ import annotations

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce
from jaxce._backends import IMPLEMENTATIONS

# A context manager switching float64 on or off: jax.enable_x64 (jax >= 0.8), or
# jax.experimental.enable_x64 (jax 0.7, the oldest supported).
enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64

# The implementations whose dense losses (cross_entropy, its module form, the optax
# drop-ins) are distinct programs, which the grids of dense losses run: the TPU compiler
# respells only the fused loss's chunk loop (jaxce/_backends/xla_tpu.py; "pallas_tpu" adds
# kernels for it alone), so under "xla_tpu" and "pallas_tpu" a dense loss lowers to the
# portable ("xla") program exactly, and running it again would compile and check the
# same program twice. tests/test_implementations.py
# (test_dense_losses_lower_alike_under_implementations_not_in_the_dense_grids) fails
# once a left-out implementation respells a dense pass.
DENSE_IMPLEMENTATIONS = tuple(n for n in IMPLEMENTATIONS if n not in ("xla_tpu", "pallas_tpu"))

_COLLECTIVE = re.compile(
    r"= (.*?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
)


def compiled_collectives(fn, *args):
    """(kind, element count of its largest result) for every cross-device collective in
    ``fn`` (a ``jax.jit``-ed function) compiled for ``args``."""
    found = []
    for m in _COLLECTIVE.finditer(fn.lower(*args).compile().as_text()):
        shapes = re.findall(r"\[([0-9,]*)\]", m.group(1))
        counts = [int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes]
        found.append((m.group(2), max(counts, default=1)))
    return found


def covering_grid(*factors):
    """Every combination of ``factors`` (lists of values) as ``pytest.param``s, the ones
    outside a pairwise cover marked ``slow``.

    The cover is a greedy, deterministic choice of combinations in which every pair of
    values of any two factors appears at least once (bugs that need one or two options to
    show up are caught by the default run); ``python -m pytest -m ""`` runs the full
    product.
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
        values = [factor[k] for factor, k in zip(factors, combo, strict=True)]
        marks = () if combo in chosen else (pytest.mark.slow,)
        params.append(pytest.param(*values, id="-".join(map(str, values)), marks=marks))
    return params


def determinism_inputs(rng, prob, dtype):
    """``(x, t, w)`` for the eager-vs-jit determinism checks (``tests/test_transforms.py``
    and ``tests/scripts/determinism_no_fma.py``): logits ``[64, 3, 33]`` in ``dtype``,
    class indices with one ``-100`` (or probabilities when ``prob``), float32 weights."""
    x = jnp.asarray(rng.standard_normal((64, 3, 33)), dtype)
    if prob:
        t = jnp.asarray(rng.random((64, 3, 33)), dtype)
    else:
        t = jnp.asarray(rng.integers(0, 33, (64, 3))).at[0, 0].set(-100)
    w = jnp.asarray(rng.uniform(0.5, 2, 33), jnp.float32)
    return x, t, w


def cpu_mesh(shape, names):
    """A mesh of ``shape`` over the simulated CPU devices (tests/conftest.py: 8 of them),
    whatever JAX's default backend."""
    devices = jax.devices("cpu")[: math.prod(shape)]
    return jax.sharding.Mesh(np.array(devices).reshape(shape), names)


def weighted_sum(out):
    """``Σ_i (i + 1) out_i``: a scalar through which every element of ``out`` gets its own
    cotangent (a 'none' loss's gradient then checks each element, not just their sum)."""
    return jnp.sum(out * jnp.arange(1, out.size + 1, dtype=out.dtype).reshape(out.shape))


def linear_reference(h, k, b, y, w, **options):
    """The unfused loss of ``h @ k + b`` (``b`` None: no bias), by ``jaxce.cross_entropy``."""
    return jaxce.cross_entropy(h @ k + (0 if b is None else b[None, :]), y, w, **options)


def entry_points(num_classes=9):
    """Every public loss entry point, by name, as ``fn(x, t, **keywords)`` on ``[N, C]``
    logits (as ``hidden @ eye`` for the fused ones, so ``x`` must be bfloat16 there) and
    class indices ``t`` (one-hot labels for the probability forms); a scalar loss."""
    mesh = cpu_mesh((1,), ("model",))
    eye = jnp.eye(num_classes, dtype=jnp.bfloat16)
    return {
        "cross_entropy": lambda x, t, **kw: jaxce.cross_entropy(x, t, **kw),
        "probabilities": lambda x, t, **kw: jaxce.cross_entropy(
            x, jax.nn.one_hot(t, num_classes, dtype=x.dtype), **kw
        ),
        "module": lambda x, t, **kw: jaxce.CrossEntropyLoss(**kw)(x, t),
        "linear": lambda x, t, **kw: jaxce.linear_cross_entropy(x, eye, t, **kw),
        "sharded": lambda x, t, **kw: jaxce.sharded_linear_cross_entropy(
            x, eye, t, mesh=mesh, vocab_axis="model", **kw
        ),
        "optax_integer": lambda x, t, **kw: jnp.mean(
            jaxce.softmax_cross_entropy_with_integer_labels(x, t, **kw)
        ),
        "optax_probabilities": lambda x, t, **kw: jnp.mean(
            jaxce.softmax_cross_entropy(x, jax.nn.one_hot(t, num_classes, dtype=x.dtype), **kw)
        ),
    }
