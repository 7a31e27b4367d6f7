"""jit / vmap / grad, no recompiles on value changes, and determinism."""

from __future__ import annotations

import os
import pathlib
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid, determinism_inputs

import jaxce
from jaxce import _cross_entropy
from parity.grid import REDUCTIONS, rng_for


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_jit_matches_eager_and_is_deterministic(prob, reduction):
    rng = rng_for("jit", prob, reduction)
    x = jnp.asarray(rng.standard_normal((5, 2, 7)), jnp.float32)
    t = (
        jnp.asarray(rng.random((5, 2, 7)), jnp.float32)
        if prob
        else jnp.asarray(rng.integers(0, 7, (5, 2)))
    )
    w = jnp.asarray(rng.uniform(0.5, 2, 7), jnp.float32)

    def f(x):
        return jnp.sum(jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1))

    eager = jax.value_and_grad(f)(x)
    jitted = jax.jit(jax.value_and_grad(f))(x)
    again = jax.jit(jax.value_and_grad(f))(x)
    again_eager = jax.value_and_grad(f)(x)
    for a, b, c, d in zip(eager, jitted, again, again_eager, strict=True):
        # Run to run: bit-identical. Eager vs jit: XLA may fuse (and so sum) differently.
        np.testing.assert_array_equal(b, c)
        np.testing.assert_array_equal(a, d)
        np.testing.assert_allclose(a, b, rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize(
    ("prob", "reduction", "dtype"),
    covering_grid([False, True], REDUCTIONS, [jnp.float32, jnp.bfloat16]),
)
def test_values_are_bit_identical_eager_and_jit_gradients_within_rounding(prob, reduction, dtype):
    # The documented determinism contract. Values: bit-identical between an eager call
    # and jax.jit when the inputs are passed as arguments (closed-over constants can be
    # constant-folded by XLA, which rounds differently). Gradients: bit-identical run to
    # run; eager vs jit within a couple of roundings, because XLA:CPU contracts
    # multiply-adds into FMAs differently when the backward is compiled with the forward
    # (bit-identical without FMA: the next test).
    rng = rng_for("determinism", prob, reduction, str(dtype))
    x, t, w = determinism_inputs(rng, prob, dtype)

    def loss(x, t, w, e):
        return jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=e)

    for eps in (0.0, 0.1):
        np.testing.assert_array_equal(loss(x, t, w, eps), jax.jit(loss)(x, t, w, eps))

        def total(x, t, w, e):
            return jnp.sum(loss(x, t, w, e)).astype(jnp.float32)

        eager = np.asarray(jax.grad(total)(x, t, w, eps), np.float32)
        jitted = np.asarray(jax.jit(jax.grad(total))(x, t, w, eps), np.float32)
        np.testing.assert_array_equal(jitted, jax.jit(jax.grad(total))(x, t, w, eps))
        # A few roundings of the gradient's scale (its terms cancel, so not of each element).
        scale = float(jnp.finfo(dtype).eps) * float(np.nanmax(np.abs(jitted)))
        np.testing.assert_allclose(eager, jitted, rtol=0, atol=2 * scale)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="--xla_cpu_max_isa=AVX is x86"
)
@pytest.mark.parametrize(
    ("grid", "cases"), [("cover", 9), pytest.param("full", 36, marks=pytest.mark.slow)]
)
def test_eager_and_jit_gradients_are_bit_identical_without_fma_contraction(grid, cases):
    # The rounding differences pinned above come from FMA contraction alone: with an ISA
    # that has no FMA (AVX), eager and jit values and gradients (logits, weight; hidden,
    # kernel, bias) must agree bit for bit over entry points x reductions x dtypes x
    # smoothing: a pairwise cover of them by default (it includes smoothed float32 class
    # indices, where contraction moves over a thousand elements when FMA is on), all 36
    # combinations under 'slow'. Runs in its own process: XLA reads XLA_FLAGS once, when
    # this process's CPU backend starts (long before this test), and an eager call's
    # per-operation programs cannot be compiled with options of their own.
    root = pathlib.Path(__file__).resolve().parents[1]
    script = root / "tests" / "scripts" / "determinism_no_fma.py"
    env = dict(os.environ, PYTHONPATH=str(root), XLA_FLAGS="--xla_cpu_max_isa=AVX")
    result = subprocess.run(
        [sys.executable, str(script), *(["--full"] if grid == "full" else [])],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    counts = {k: int(v) for k, v in re.findall(r"^(.+): (\d+) differing elements$", output, re.M)}
    assert len(counts) == cases, output  # every case ran
    assert {case: n for case, n in counts.items() if n} == {}
    assert result.returncode == 0, output


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vmap_over_extra_leading_axis(reduction):
    rng = rng_for("vmap", reduction)
    x = jnp.asarray(rng.standard_normal((3, 4, 5)))
    y = jnp.asarray(rng.integers(0, 5, (3, 4)))
    y = y.at[1, 2].set(-100)
    w = jnp.asarray(rng.uniform(0.5, 2, 5))

    def f(x, y):
        return jaxce.cross_entropy(x, y, w, reduction=reduction, label_smoothing=0.05)

    batched = jax.vmap(f)(x, y)
    looped = jnp.stack([f(x[i], y[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-13)
    g_batched = jax.vmap(jax.grad(lambda x, y: jnp.sum(f(x, y))))(x, y)
    g_looped = jnp.stack([jax.grad(lambda x, yi=y[i]: jnp.sum(f(x, yi)))(x[i]) for i in range(3)])
    np.testing.assert_allclose(g_batched, g_looped, rtol=1e-13)


def test_changing_label_smoothing_or_weight_values_does_not_recompile():
    rng = rng_for("recompile")
    x = jnp.asarray(rng.standard_normal((4, 6)))
    y = jnp.asarray(rng.integers(0, 6, 4))
    jaxce.cross_entropy(x, y, jnp.ones(6), label_smoothing=0.1)
    before = _cross_entropy._index_cross_entropy._cache_size()
    values = set()
    for eps in (0.2, 0.3, 0.75, 1.0):
        for w in (jnp.ones(6), jnp.arange(1.0, 7.0)):
            values.add(float(jaxce.cross_entropy(x, y, w, label_smoothing=eps)))
    assert _cross_entropy._index_cross_entropy._cache_size() == before
    assert len(values) == 8  # the values really changed

    user_jit = jax.jit(lambda x, e, w: jaxce.cross_entropy(x, y, w, label_smoothing=e))
    user_jit(x, 0.1, jnp.ones(6))
    user_jit(x, 0.9, jnp.arange(1.0, 7.0))
    assert user_jit._cache_size() == 1


def test_grad_wrt_label_smoothing_matches_finite_difference():
    rng = rng_for("deps")
    x = jnp.asarray(rng.standard_normal((4, 6)))
    y = jnp.asarray(rng.integers(0, 6, 4))

    def f(e):
        return jaxce.cross_entropy(x, y, label_smoothing=e)

    h = 1e-6
    fd = (f(0.3 + h) - f(0.3 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(0.3), fd, rtol=1e-7)


def test_module_is_usable_inside_jit_and_grad():
    loss_fn = jaxce.CrossEntropyLoss(weight=jnp.arange(1.0, 5.0), label_smoothing=0.1, axis=1)
    rng = rng_for("module-jit")
    x = jnp.asarray(rng.standard_normal((2, 4, 3)))
    y = jnp.asarray(rng.integers(0, 4, (2, 3)))
    eager = jax.value_and_grad(loss_fn)(x, y)
    jitted = jax.jit(jax.value_and_grad(loss_fn))(x, y)
    np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-14)
    np.testing.assert_allclose(eager[1], jitted[1], rtol=1e-14)
    assert "label_smoothing=0.1" in repr(loss_fn)
