"""jaxce.linear_cross_entropy: equal to cross_entropy(hidden @ kernel + bias) for every
option, values and gradients, without a [tokens, vocab] array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid

import jaxce
from jaxce._backends import xla_cpu
from parity.compare import compare
from parity.grid import rng_for
from parity.suites import jax_linear, torch_linear

N, D, V = 7, 5, 300  # V not a multiple of the chunk sizes below


def _problem(seed, ignore=True, batch=(N,)):
    rng = rng_for("linear", seed)
    h = jnp.asarray(rng.standard_normal((*batch, D)))
    k = jnp.asarray(rng.standard_normal((D, V)) * 0.7)
    b = jnp.asarray(rng.standard_normal(V))
    y = rng.integers(0, V, batch)
    if ignore:
        y.flat[1] = -100
    w = jnp.asarray(rng.uniform(0.3, 2.0, V))
    return h, k, b, jnp.asarray(y), w


@pytest.mark.parametrize(
    ("reduction", "with_bias", "weighted", "eps", "chunk_size"),
    covering_grid(["none", "mean", "sum"], [False, True], [False, True], [0.0, 0.2],
                  [64, 128, 300, None]),
)  # fmt: skip
def test_matches_unfused_values_and_gradients(reduction, with_bias, weighted, eps, chunk_size):
    h, k, b, y, w = _problem((reduction, with_bias, weighted, eps))
    w = w if weighted else None

    def fused(h, k, b, w):
        return jaxce.linear_cross_entropy(
            h, k, y, w, reduction=reduction, label_smoothing=eps,
            bias=b if with_bias else None, chunk_size=chunk_size,
        )  # fmt: skip

    def unfused(h, k, b, w):
        logits = h @ k + (b[None, :] if with_bias else 0.0)
        return jaxce.cross_entropy(logits, y, w, reduction=reduction, label_smoothing=eps)

    args = (h, k, b, w if weighted else jnp.ones(V))
    if not weighted:
        fused_w = fused
        unfused_w = unfused
        fused = lambda h, k, b, w: fused_w(h, k, b, None)  # noqa: E731
        unfused = lambda h, k, b, w: unfused_w(h, k, b, None)  # noqa: E731
    out_f, vjp_f = jax.vjp(fused, *args)
    out_u, vjp_u = jax.vjp(unfused, *args)
    np.testing.assert_allclose(out_f, out_u, rtol=1e-12, atol=1e-12)
    ct = jnp.asarray(rng_for("ct", reduction).standard_normal(out_u.shape))
    for gf, gu in zip(vjp_f(ct), vjp_u(ct), strict=True):
        np.testing.assert_allclose(gf, gu, rtol=1e-10, atol=1e-12)


def test_batched_hidden_and_jit_vmap():
    h, k, _b, y, _w = _problem("batched", batch=(2, 3))
    fused = jax.jit(lambda h: jaxce.linear_cross_entropy(h, k, y, reduction="none", chunk_size=128))
    want = jaxce.cross_entropy(h @ k, y, reduction="none")
    np.testing.assert_allclose(fused(h), want, rtol=1e-12)
    per_row = jax.vmap(lambda h, y: jaxce.linear_cross_entropy(h, k, y, chunk_size=100))(h, y)
    np.testing.assert_allclose(
        per_row, jax.vmap(lambda h, y: jaxce.cross_entropy(h @ k, y))(h, y), rtol=1e-12
    )


@pytest.mark.parametrize("strategy", ["min_memory", "min_work"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_low_precision_gradients_come_back_in_input_dtype(dtype, strategy):
    h, k, _b, y, _w = _problem("lowp", ignore=False)
    h, k = h.astype(dtype), k.astype(dtype)
    value, (dh, dk) = jax.value_and_grad(
        lambda h, k: jaxce.linear_cross_entropy(h, k, y, strategy=strategy), argnums=(0, 1)
    )(h, k)
    assert value.dtype == dtype
    assert dh.dtype == dtype
    assert dk.dtype == dtype
    ref_value, (rh, rk) = jax.value_and_grad(
        lambda h, k: jaxce.cross_entropy(h.astype(jnp.float64) @ k.astype(jnp.float64), y),
        argnums=(0, 1),
    )(h, k)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.float64(value), ref_value, rtol=tol)
    np.testing.assert_allclose(
        np.asarray(dh, np.float64), rh, rtol=tol, atol=tol * np.abs(rh).max()
    )
    np.testing.assert_allclose(
        np.asarray(dk, np.float64), rk, rtol=tol, atol=tol * np.abs(rk).max()
    )


@pytest.mark.parametrize("strategy", ["min_memory", "min_work"])
def test_out_of_range_target_is_nan_under_jit_and_an_error_outside(strategy):
    h, k, _b, y, _w = _problem("oor", ignore=False)
    bad = y.at[2].set(V + 5)

    def loss(h, y):
        return jaxce.linear_cross_entropy(h, k, y, strategy=strategy)

    value, grad = jax.jit(jax.value_and_grad(loss))(h, bad)
    assert np.isnan(value)
    assert np.all(np.isnan(grad[2]))
    with pytest.raises(ValueError, match=f"class index {V + 5}"):
        jaxce.linear_cross_entropy(h, k, bad)


@pytest.mark.parametrize("strategy", ["min_memory", "min_work"])
def test_all_ignored_mean_is_nan_with_zero_gradients(strategy):
    h, k, _b, y, _w = _problem("allign")
    y = jnp.full_like(y, -100)
    value, (dh, dk) = jax.value_and_grad(
        lambda h, k: jaxce.linear_cross_entropy(h, k, y, strategy=strategy), argnums=(0, 1)
    )(h, k)
    assert np.isnan(value)
    assert np.all(np.asarray(dh) == 0)
    assert np.all(np.asarray(dk) == 0)


def test_transposed_chunk_is_exact_with_non_finite_entries():
    # The 16-bit kernel gradient transposes dz through an identity matmul; a chunk holding
    # inf/NaN takes the branch that keeps them out of the product (0 * inf = NaN).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 256)).astype(np.float32)
    finite = jnp.asarray(x, jnp.bfloat16)
    x[5, 7], x[9, 2], x[11, 0] = np.inf, np.nan, -np.inf
    non_finite = jnp.asarray(x, jnp.bfloat16)
    transpose = jax.jit(lambda v: xla_cpu.transposed(v, jnp.float32))
    for chunk in (finite, non_finite):
        got = np.asarray(transpose(chunk), np.float32)
        np.testing.assert_array_equal(got, np.asarray(chunk, np.float32).T)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (dict(kernel=np.ones((4, 9))), ValueError, r"kernel must have shape \(D, V\) with D = hidden.shape\[-1\] = 5; got \(4, 9\)"),
        (dict(target=np.zeros((3,), np.int32)), ValueError, r"target must have shape \(7,\).*got \(3,\)"),
        (dict(target=np.zeros((7,), np.float32)), TypeError, r"target must hold integer class indices; got float32"),
        (dict(bias=np.ones(8)), ValueError, r"bias must have shape \(300,\).*got \(8,\)"),
        (dict(weight=np.ones(8)), ValueError, r"weight must have shape \(300,\)"),
        (dict(kernel=np.ones((5, 300), np.float32)), TypeError, r"kernel must have hidden's dtype float64; got float32"),
        (dict(chunk_size=0), ValueError, r"chunk_size must be a positive int or None; got 0"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_error(kwargs, exc, pattern):
    h, k, _b, y, _w = _problem("errors")
    args = dict(hidden=h, kernel=k, target=y) | kwargs
    with pytest.raises(exc, match=pattern):
        jaxce.linear_cross_entropy(**args)


@pytest.mark.torch
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torch_linear_cross_entropy(reduction, eps):
    pytest.importorskip("torch")
    h, k, b, y, w = _problem(("torch", reduction, eps))
    options = dict(reduction=reduction, ignore_index=-100, label_smoothing=eps)
    inputs = {"hidden": h, "kernel": k, "target": y, "bias": b, "weight": w}
    result = compare(
        jax_linear(chunk_size=128, **options),
        torch_linear(**options),
        {name: np.asarray(a) for name, a in inputs.items()},
        ("hidden", "kernel", "bias"),
        "float64",
    )
    assert result.passed, result.message
