"""The optax drop-ins against optax itself (0.2.8): values and gradients."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

import jaxce

SHAPE = (3, 4, 6)  # batch 3, then 4 x 6: classes along one or two axes


def _logits(dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE) * 2, dtype)


def _batch_shape(axis):
    axes = {a % len(SHAPE) for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(d for i, d in enumerate(SHAPE) if i not in axes)


def _num_classes(axis):
    return int(np.prod(SHAPE)) // int(np.prod(_batch_shape(axis)))


def _masks(axis, kind, seed=1):
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "rows":
        return jnp.asarray(rng.random(_batch_shape(axis)) > 0.3)
    mask = rng.random(SHAPE) > 0.4
    return jnp.asarray(mask)


def _tolerance(dtype):
    return {"float32": (2e-6, 2e-6), "bfloat16": (2e-2, 2e-2)}[jnp.dtype(dtype).name]


AXES = [-1, 1, (1, 2), (2, 1), (0, 2)]


@pytest.mark.parametrize("where", [None, "rows", "classes"])
@pytest.mark.parametrize("axis", AXES)
def test_integer_labels_match_optax(axis, where):
    x = _logits()
    labels = jnp.asarray(
        np.random.default_rng(2).integers(0, _num_classes(axis), _batch_shape(axis))
    )
    mask = _masks(axis, where)

    def total(fn):
        def f(x):
            out = fn(x, labels, axis=axis, where=mask)
            return jnp.sum(
                out * jnp.arange(1, out.size + 1, dtype=out.dtype).reshape(out.shape)
            ), out

        return jax.value_and_grad(f, has_aux=True)(x)

    (_, ours), g_ours = total(jaxce.softmax_cross_entropy_with_integer_labels)
    (_, ref), g_ref = total(optax.softmax_cross_entropy_with_integer_labels)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(g_ours, g_ref, rtol=2e-6, atol=2e-6)


# axis=None leaves no batch axes, so only a logits-shaped mask applies there.
@pytest.mark.parametrize(
    ("axis", "where"),
    [
        (a, m)
        for a in [*AXES, None]
        for m in (None, "rows", "classes")
        if a is not None or m != "rows"
    ],
)
def test_probability_labels_match_optax(axis, where):
    x = _logits()
    labels = jax.nn.softmax(_logits(seed=3), axis=-1)
    mask = None if axis is None and where is None else _masks(axis or tuple(range(3)), where)

    def total(fn):
        def f(x, t):
            out = fn(x, t, axis=axis, where=mask)
            return jnp.sum(
                out * jnp.arange(1, out.size + 1, dtype=out.dtype).reshape(out.shape)
            ), out

        return jax.value_and_grad(f, (0, 1), has_aux=True)(x, labels)

    (_, ours), (gx, gt) = total(jaxce.softmax_cross_entropy)
    (_, ref), (rx, rt) = total(optax.softmax_cross_entropy)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(gx, rx, rtol=2e-6, atol=2e-6)
    # Label gradients: optax gives NaN at masked entries (it multiplies the mask's zeros
    # by a -inf log-probability); the loss does not depend on them, so jaxce gives 0.
    finite = np.isfinite(np.asarray(rt))
    np.testing.assert_allclose(np.asarray(gt)[finite], np.asarray(rt)[finite], rtol=2e-6, atol=2e-6)
    assert np.all(np.asarray(gt)[~finite] == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_close_to_optax_and_float64(dtype):
    x = _logits(dtype)
    labels = jnp.asarray(np.random.default_rng(4).integers(0, 6, SHAPE[:2]))
    ours = jaxce.softmax_cross_entropy_with_integer_labels(x, labels)
    ref64 = optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), labels)
    assert ours.dtype == dtype
    rtol, atol = _tolerance(dtype)
    np.testing.assert_allclose(np.float32(ours), ref64, rtol=rtol, atol=atol)


def test_out_of_range_labels_are_nan_not_wrapped():
    """optax wraps -1..-C to a class (a PyTorch -100 becomes class C - 100); jaxce: NaN."""
    x = _logits()[:, 0, :]
    labels = jnp.array([-1, 6, 2])
    ours = jaxce.softmax_cross_entropy_with_integer_labels(x, labels)
    assert np.isnan(ours[0])
    assert np.isnan(ours[1])
    np.testing.assert_allclose(
        ours[2], optax.softmax_cross_entropy_with_integer_labels(x, labels)[2], rtol=1e-6
    )
    assert np.isfinite(optax.softmax_cross_entropy_with_integer_labels(x, labels)[0])


def test_drop_in_keeps_no_logits_sized_residual():
    x = jnp.ones((16, 1000), jnp.float32)
    labels = jnp.zeros((16,), jnp.int32)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(
            lambda x: jnp.sum(jaxce.softmax_cross_entropy_with_integer_labels(x, labels)), x
        )
    big = [line for line in buf.getvalue().splitlines() if "[16,1000]" in line]
    assert len(big) == 1, big  # the logits argument itself
    assert "from the argument" in big[0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y.astype(float)),
         TypeError, "labels must have an integer dtype"),
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x.astype(int), y),
         TypeError, "logits must have a floating dtype"),
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y[:2]),
         ValueError, r"labels must have shape \(3, 4\)"),
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis="1"),
         TypeError, "axis must be an int or a tuple"),
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=3),
         ValueError, "axis"),
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=y),
         TypeError, "where must be a boolean mask"),
        (lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=x[0] > 0),
         ValueError, "where must have the batch shape"),
        (lambda x, y: jaxce.softmax_cross_entropy(x, y), TypeError,
         "labels must have a floating dtype"),
        (lambda x, y: jaxce.softmax_cross_entropy(x, x[0]), ValueError,
         "labels must have the logits' shape"),
    ],
)  # fmt: skip
def test_drop_in_errors(call, error, match):
    x = _logits()
    y = jnp.zeros(SHAPE[:2], jnp.int32)
    with pytest.raises(error, match=match):
        call(x, y)
