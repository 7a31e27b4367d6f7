"""Hypothesis properties of the loss and its gradient (float64)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxce

shapes = st.tuples(st.integers(1, 6), st.integers(1, 9))
smoothing = st.sampled_from([0.0, 0.1, 0.5, 1.0])


@st.composite
def index_problem(draw):
    n, c = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) * draw(st.sampled_from([0.1, 1.0, 10.0]))
    y = rng.integers(0, c, n)
    ignored = rng.random(n) < draw(st.sampled_from([0.0, 0.3]))
    y = np.where(ignored, -100, y)
    w = rng.uniform(0.1, 3.0, c) if draw(st.booleans()) else None
    return jnp.asarray(x), jnp.asarray(y), None if w is None else jnp.asarray(w)


@given(index_problem(), smoothing, st.floats(-50, 50))
def test_shift_invariance(problem, eps, shift):
    x, y, w = problem
    for reduction in ("none", "sum"):
        a = jaxce.cross_entropy(x, y, w, reduction=reduction, label_smoothing=eps)
        b = jaxce.cross_entropy(x + shift, y, w, reduction=reduction, label_smoothing=eps)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@given(index_problem(), smoothing)
def test_mean_is_sum_over_target_weight_denominator(problem, eps):
    x, y, w = problem
    valid = np.asarray(y) != -100
    w_np = np.ones(x.shape[1]) if w is None else np.asarray(w)
    denominator = np.sum(w_np[np.asarray(y)[valid]])
    total = jaxce.cross_entropy(x, y, w, reduction="sum", label_smoothing=eps)
    mean = jaxce.cross_entropy(x, y, w, reduction="mean", label_smoothing=eps)
    if denominator == 0:
        assert np.isnan(mean)
    else:
        np.testing.assert_allclose(mean, total / denominator, rtol=1e-12)


@given(index_problem(), smoothing)
def test_unweighted_gradient_rows_sum_to_zero(problem, eps):
    x, y, _ = problem
    grad = jax.grad(lambda x: jaxce.cross_entropy(x, y, reduction="sum", label_smoothing=eps))(x)
    np.testing.assert_allclose(jnp.sum(grad, axis=-1), 0.0, atol=1e-12)


@functools.partial(jax.jit, static_argnums=3)
def _index_and_one_hot_forms(x, y, w, eps):
    """Each form of the loss (and the 'sum' gradient) for class indices ``y`` and for their
    one-hot probabilities, as pairs; one program per example (not one per call)."""
    onehot = jax.nn.one_hot(y, x.shape[1], dtype=x.dtype)
    pairs = []
    for reduction in ("none", "sum"):
        pairs.append(
            tuple(
                jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
                for t in (y, onehot)
            )
        )
    pairs.append(tuple(jaxce.cross_entropy(x, t, label_smoothing=eps) for t in (y, onehot)))
    grads = tuple(
        jax.grad(lambda x, t: jaxce.cross_entropy(x, t, w, reduction="sum", label_smoothing=eps))(
            x, t
        )
        for t in (y, onehot)
    )
    return pairs, grads


@given(index_problem(), smoothing)
def test_index_targets_equal_one_hot_probability_targets(problem, eps):
    # Where torch says they agree: 'none', 'sum' (any weight), and unweighted 'mean'
    # without ignored targets (probabilities have no ignore_index).
    x, y, w = problem
    y = jnp.where(y < 0, 0, y)
    pairs, (ga, gb) = _index_and_one_hot_forms(x, y, w, eps)
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)


@given(index_problem(), smoothing)
def test_loss_is_nonnegative_and_zero_where_ignored(problem, eps):
    x, y, w = problem
    losses = np.asarray(jaxce.cross_entropy(x, y, w, reduction="none", label_smoothing=eps))
    assert np.all(losses >= -1e-12)
    assert np.all(losses[np.asarray(y) == -100] == 0.0)
