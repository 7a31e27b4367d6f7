"""The optax drop-ins against optax itself (0.2.8): values and gradients, the edge cases
(empty inputs, broadcasting masks and labels, one-hot integer labels, error types) against
optax's semantics written out in float64."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import pathlib
import types
import unittest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cases import enable_x64, weighted_sum

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
            return weighted_sum(out), out

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
            return weighted_sum(out), out

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


INT, PROB = jaxce.softmax_cross_entropy_with_integer_labels, jaxce.softmax_cross_entropy


# ValueError where optax raises ValueError (axis of the wrong type, a non-boolean mask,
# shapes that do not broadcast); TypeError for a wrong dtype, as optax.
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda x, y: INT(x, y.astype(float)), TypeError, "labels must have an integer dtype"),
        (lambda x, y: INT(x, y > 0), TypeError, "labels must have an integer dtype; got bool"),
        (lambda x, y: INT(x.astype(int), y), TypeError, "logits must have a floating dtype"),
        (lambda x, y: INT(x, y[:2]), ValueError, r"labels must have shape \(3, 4\)"),
        (lambda x, y: INT(x, y[0]), ValueError, r"labels must have shape \(3, 4\).*got \(4,\)"),
        (lambda x, y: INT(x, y, axis="1"), ValueError, "axis must be an int or a tuple of ints; got str"),
        (lambda x, y: INT(x, y, axis=[1]), ValueError, r"axis must be an int or a tuple of ints; got list \[1\]"),
        (lambda x, y: INT(x, y, axis=None), ValueError, "axis must be an int or a tuple of ints; got NoneType"),
        (lambda x, y: INT(x, y, axis=True), ValueError, "axis must be an int or a tuple of ints; got bool"),
        (lambda x, y: INT(x, y, axis=(1, 1.0)), ValueError, "axis must be an int or a tuple of ints"),
        (lambda x, y: INT(x, y, axis=()), ValueError, "axis must name at least one class axis"),
        (lambda x, y: INT(x, y, axis=3), ValueError, "axis 3 is out of bounds"),
        (lambda x, y: INT(x, y[:, 0], axis=(1, -2)), ValueError, "axis must not repeat an axis"),
        (lambda x, y: INT(x, y, where=y), ValueError, "where must be a boolean mask; got dtype int32"),
        (lambda x, y: INT(x, y, where=y.astype(float)), ValueError, "where must be a boolean mask; got dtype float"),
        (lambda x, y: INT(x, y, where=x[0] > 0), ValueError, r"where must broadcast to the logits' shape \(3, 4, 6\).*got \(4, 6\)"),
        (lambda x, y: INT(x, y, where=x[:2] > 0), ValueError, r"where must broadcast.*batch shape \(3, 4\).*got \(2, 4, 6\)"),
        (lambda x, y: INT(x, y, where=(x > 0)[None]), ValueError, r"where must broadcast.*got \(1, 3, 4, 6\)"),
        (lambda x, y: PROB(x, x.astype(jnp.complex64)), TypeError, "labels must have a floating, integer or boolean dtype; got complex64"),
        (lambda x, y: PROB(x, x[:2]), ValueError, r"labels must have \(or broadcast to\) the logits' shape \(3, 4, 6\); got \(2, 4, 6\)"),
        (lambda x, y: PROB(x[0], x), ValueError, r"labels must have \(or broadcast to\) the logits' shape \(4, 6\); got \(3, 4, 6\)"),
        (lambda x, y: PROB(x, x, axis=[1]), ValueError, "axis must be an int, a tuple of ints or None; got list"),
        (lambda x, y: PROB(x, x, axis="1"), ValueError, "axis must be an int, a tuple of ints or None; got str"),
        (lambda x, y: PROB(x, x, axis=(1, 1)), ValueError, "axis must not repeat an axis"),
        (lambda x, y: PROB(x, x, where=y), ValueError, "where must be a boolean mask; got dtype int32"),
        (lambda x, y: PROB(x, x, axis=None, where=y > 0), ValueError, r"where must broadcast.*got \(3, 4\)"),
    ],
)  # fmt: skip
def test_drop_in_errors(call, error, match):
    x = _logits()
    y = jnp.zeros(SHAPE[:2], jnp.int32)
    with pytest.raises(error, match=match):
        call(x, y)


@pytest.mark.parametrize("integer", [True, False])
def test_numpy_integer_axis_is_an_axis(integer):
    """A NumPy integer axis works like the int (optax's probability loss accepts it; its
    integer-label loss raises ValueError, a documented difference)."""
    fn = _drop_in(integer)
    x, labels, _ = _problem((3, 4, 6), 1, None, None, integer)
    np.testing.assert_array_equal(fn(x, labels, axis=np.int64(1)), fn(x, labels, axis=1))
    x, labels, _ = _problem((3, 4, 6), (1, 2), None, None, integer)
    np.testing.assert_array_equal(fn(x, labels, axis=(np.int32(1), 2)), fn(x, labels, axis=(1, 2)))


# ---------------------------------------------------------------------------------------
# Edge cases: empty inputs, broadcasting masks and labels, one-hot integer labels, against
# optax 0.2.8's semantics written out in float64.
# ---------------------------------------------------------------------------------------


def _canonical_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return tuple(int(a) % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def _classes_last(a, axes):
    """Moves ``axes`` (in the order given) last and flattens them (row-major)."""
    rest = [i for i in range(a.ndim) if i not in axes]
    a = (np if isinstance(a, np.ndarray) else jnp).transpose(a, [*rest, *axes])
    return a.reshape((*a.shape[: len(rest)], int(np.prod(a.shape[len(rest) :]))))


def _reference(x, labels, axis=-1, where=None, integer=False):
    """optax 0.2.8's semantics in plain float64 JAX (differentiable in ``x`` and float
    labels): a ``where`` whose rank differs from the logits' gets size-1 class axes
    (``np.expand_dims(where, axis)``) and then broadcasts; masked classes leave the
    normaliser (and, for probability labels, the sum); rows with no class left give 0,
    -0.0 for probability labels, -(an empty sum). Integer labels read the label's logit
    whatever the mask; with no classes at all the loss is lse(empty row) = -inf. Labels
    broadcast to the logits' shape (probabilities) or the batch shape (indices)."""
    x = jnp.asarray(x, jnp.float64)
    axes = _canonical_axes(axis, x.ndim)
    batch = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    if where is None:
        alive = np.ones(batch, bool)
        mask = np.ones(x.shape, bool)
    else:
        where = np.asarray(where)
        if where.ndim != x.ndim:
            where = np.expand_dims(where, axis if axis is not None else axes)
        where = where.reshape((1,) * (x.ndim - where.ndim) + where.shape)
        # optax tests any() on the mask as given: a [B, 1] mask keeps rows of 0 classes.
        alive = np.broadcast_to(np.any(where, axis=axes), batch)
        mask = np.broadcast_to(where, x.shape)
    xf = _classes_last(x, axes)
    mf = _classes_last(mask, axes)
    num_classes = xf.shape[-1]
    safe = jnp.where(mf & alive[..., None], xf, -jnp.inf)
    m = jnp.max(safe, axis=-1, initial=-jnp.inf, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = m[..., 0] + jnp.log(jnp.sum(jnp.where(mf, jnp.exp(safe - m), 0.0), axis=-1))
    lse = jnp.where(alive, lse, 0.0)
    if integer:
        if num_classes == 0:
            return jnp.where(alive, -jnp.inf, 0.0)
        labels = jnp.broadcast_to(labels, batch)
        x_y = jnp.take_along_axis(xf, labels[..., None], axis=-1)[..., 0]
        return jnp.where(alive, lse - x_y, 0.0)
    t = _classes_last(jnp.broadcast_to(jnp.asarray(labels, jnp.float64), x.shape), axes)
    loss = jnp.sum(jnp.where(mf, t * (lse[..., None] - xf), 0.0), axis=-1)
    return jnp.where(alive & (num_classes > 0), loss, -0.0)


def _optax(x, labels, axis=-1, where=None, integer=False):
    """optax itself, under its own (default) promotion rules."""
    fn = optax.softmax_cross_entropy_with_integer_labels if integer else optax.softmax_cross_entropy
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return fn(x, labels, axis=axis, where=where)


def _drop_in(integer):
    return INT if integer else PROB


def _problem(shape, axis, labels_shape, where_shape, integer, labels_dtype=None):
    """Logits (float32), labels of ``labels_shape`` (None: the full shape for
    probabilities, the batch shape for indices) and a random mask of ``where_shape``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape) * 2, jnp.float32)
    axes = _canonical_axes(axis, len(shape))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    num_classes = int(np.prod([shape[a] for a in axes]))
    if integer:
        labels_shape = batch if labels_shape is None else labels_shape
        labels = jnp.asarray(rng.integers(0, max(num_classes, 1), labels_shape), jnp.int32)
    else:
        labels_shape = shape if labels_shape is None else labels_shape
        labels = rng.random(labels_shape)
        labels = jnp.asarray(
            labels > 0.5 if labels_dtype is not None else labels,
            labels_dtype or jnp.float32,
        )
    where = None if where_shape is None else jnp.asarray(rng.random(where_shape) > 0.3)
    return x, labels, where


# (logits shape, axis, labels shape or None, where shape or None, integer labels)
EDGE_CASES = {
    "empty batch, integer": ((0, 3), -1, None, None, True),
    "empty batch, probabilities": ((0, 3), -1, None, None, False),
    "empty inner batch [B, 0, V], integer": ((2, 0, 3), -1, None, None, True),
    "empty inner batch [B, 0, V], probabilities": ((2, 0, 3), -1, None, None, False),
    "empty batch, row mask": ((0, 3), -1, None, (0,), True),
    "zero classes, 1-d, probabilities": ((0,), -1, None, None, False),
    "zero classes, integer": ((2, 0), -1, None, None, True),
    "zero classes, probabilities": ((2, 0), -1, None, None, False),
    "zero classes, tuple axis": ((2, 0, 3), (1, 2), None, None, True),
    "zero classes, row mask, integer": ((3, 0), -1, None, (3,), True),
    "zero classes, [B, 1] mask, integer": ((3, 0), -1, None, (3, 1), True),
    "zero classes, class mask, integer": ((3, 0), -1, None, (3, 0), True),
    "zero classes, row mask, probabilities": ((3, 0), -1, None, (3,), False),
    "where [B, 1], integer": ((4, 5), -1, None, (4, 1), True),
    "where [B, 1], probabilities": ((4, 5), -1, None, (4, 1), False),
    "where [B, T, 1], integer": ((2, 3, 5), -1, None, (2, 3, 1), True),
    "where [B, T, 1], probabilities": ((2, 3, 5), -1, None, (2, 3, 1), False),
    "where [B, 1, 1], tuple axis": ((2, 3, 5), (1, 2), None, (2, 1, 1), True),
    "where [1, 1], probabilities": ((4, 5), -1, None, (1, 1), False),
    "where [1, C] (a class mask for every row)": ((4, 5), -1, None, (1, 5), True),
    "where [1, T, C], probabilities": ((2, 3, 5), -1, None, (1, 3, 5), False),
    "where [T] on [B, T, C] (expanded to [T, 1])": ((2, 3, 5), -1, None, (3,), False),
    "where 0-d, probabilities": ((4, 5), -1, None, (), False),
    "labels [C]": ((4, 5), -1, (5,), None, False),
    "labels [1, C]": ((4, 5), -1, (1, 5), None, False),
    "labels [T, C]": ((2, 3, 5), -1, (3, 5), None, False),
    "labels [T, C], axis 0": ((5, 3, 2), 0, (3, 2), None, False),
    "labels [B, 1] (constant along the classes)": ((4, 5), -1, (4, 1), None, False),
    "labels 0-d": ((4, 5), -1, (), None, False),
    "labels [1, 4, 1], tuple axis (one class axis broadcast)": (
        (3, 4, 6), (1, 2), (1, 4, 1), None, False,
    ),
    "labels [C] with a class mask": ((4, 5), -1, (5,), (4, 5), False),
    "labels [T, C] with where [B, T, 1]": ((2, 3, 5), -1, (3, 5), (2, 3, 1), False),
    "integer labels [1] (size-1 batch)": ((4, 5), -1, (1,), None, True),
    "integer labels [B, 1], where [B, T, 1]": ((2, 3, 5), -1, (2, 1), (2, 3, 1), True),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_edge_cases_match_optax_semantics(case):
    shape, axis, labels_shape, where_shape, integer = EDGE_CASES[case]
    x, labels, where = _problem(shape, axis, labels_shape, where_shape, integer)
    fn = _drop_in(integer)
    ours = fn(x, labels, axis=axis, where=where)
    ref = _reference(x, labels, axis, where, integer)
    assert ours.shape == ref.shape
    assert ours.dtype == x.dtype
    np.testing.assert_allclose(ours, ref, rtol=2e-6, atol=2e-6)
    # Exact zeros carry optax's sign: -0.0 for probability labels (an empty sum, negated).
    zero = np.asarray(ref) == 0
    np.testing.assert_array_equal(np.signbit(ours)[zero], np.signbit(ref)[zero])
    np.testing.assert_allclose(ours, _optax(x, labels, axis, where, integer), rtol=2e-6)

    # Gradients (logits, and float labels, which broadcast back), under jit, against the
    # reference's autodiff.
    argnums = (0,) if integer else (0, 1)

    def grads(f):
        return jax.jit(jax.grad(lambda x, t: weighted_sum(f(x, t)), argnums))(x, labels)

    ours_g = grads(lambda x, t: fn(x, t, axis=axis, where=where))
    ref_g = grads(lambda x, t: _reference(x, t, axis, where, integer).astype(x.dtype))
    for got, want in zip(ours_g, ref_g, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("integer", [True, False])
def test_empty_batch_mean_is_nan(integer):
    x, labels, _ = _problem((0, 3), -1, None, None, integer)
    out = _drop_in(integer)(x, labels)
    assert out.shape == (0,)
    assert np.isnan(jnp.mean(out))


@pytest.mark.parametrize("integer", [True, False])
def test_zero_classes_give_optax_values(integer):
    """optax: -inf (the log-sum-exp of an empty row) for integer labels, -0.0 (an empty
    sum, negated) for probability labels; the same under jit, with an empty gradient."""
    x, labels, _ = _problem((3, 0), -1, None, None, integer)
    fn = _drop_in(integer)
    out = jax.jit(fn)(x, labels)
    if integer:
        np.testing.assert_array_equal(out, np.full(3, -np.inf, np.float32))
    else:
        np.testing.assert_array_equal(out, np.zeros(3, np.float32))
        assert np.all(np.signbit(out))
    assert jax.grad(lambda x: jnp.sum(fn(x, labels)))(x).shape == (3, 0)


@pytest.mark.parametrize(
    ("dtype", "labels_dtype"),
    [
        (jnp.float32, jnp.float64),
        (jnp.float32, jnp.float16),
        (jnp.bfloat16, jnp.float16),
        (jnp.float16, jnp.float32),
    ],
)
@pytest.mark.parametrize("where_shape", [None, (4, 1), (4, 5)])
def test_mixed_float_dtypes_promote_as_optax(dtype, labels_dtype, where_shape):
    """The result's dtype is the standard promotion of the two, as optax's, whatever the
    jax_numpy_dtype_promotion setting (strict here)."""
    x, labels, where = _problem((4, 5), -1, None, where_shape, False)
    x, labels = x.astype(dtype), labels.astype(labels_dtype)
    ours = jaxce.softmax_cross_entropy(x, labels, where=where)
    want = _optax(x, labels, where=where)
    assert ours.dtype == want.dtype
    rtol, atol = _tolerance(jnp.bfloat16 if want.dtype != jnp.float64 else jnp.float32)
    np.testing.assert_allclose(np.float64(ours), _reference(x, labels, -1, where), rtol, atol)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (2, 3)])
@pytest.mark.parametrize("labels_kind", ["index", "float", "one-hot int"])
def test_numpy_float64_inputs_without_x64(shape, labels_kind):
    """optax's default setting (x64 off) with NumPy float64 inputs, as optax's own tests
    pass them: float32 results, no dtype warning (warnings are errors here)."""
    x = np.random.default_rng(0).standard_normal(shape)
    labels = {
        "index": np.zeros(shape[:1], np.int64),
        "float": np.full(shape, 0.5),
        "one-hot int": np.ones(shape, np.int64),
    }[labels_kind]
    fn = _drop_in(labels_kind == "index")
    with enable_x64(False):
        out = fn(x, labels)
        want = _optax(x, labels, integer=labels_kind == "index")
    assert out.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
@pytest.mark.parametrize("labels_dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_one_hot_labels_of_integer_or_bool_dtype(dtype, labels_dtype):
    """optax multiplies the labels in: an integer or boolean one-hot gives the float
    one-hot's loss, in the logits' dtype."""
    x, labels, _ = _problem((4, 5), -1, None, None, False, labels_dtype=labels_dtype)
    x = x.astype(dtype)
    ours = jaxce.softmax_cross_entropy(x, labels)
    assert ours.dtype == dtype
    ref = _reference(x, labels.astype(jnp.float64))
    rtol, atol = _tolerance(dtype) if dtype != jnp.float64 else (1e-12, 1e-12)
    np.testing.assert_allclose(np.float64(ours), ref, rtol=rtol, atol=atol)
    g = jax.grad(lambda x: jnp.sum(jaxce.softmax_cross_entropy(x, labels)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(_reference(x, labels.astype(jnp.float64))))(x)
    np.testing.assert_allclose(np.float64(g), g_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("integer", [True, False])
def test_masked_rows_carry_optax_zero_sign(integer):
    """Masked rows give 0.0 for integer labels and -0.0 for probability labels (optax
    negates an empty sum), whether the mask is [B] or [B, 1]."""
    x, labels, _ = _problem((4, 5), -1, None, None, integer)
    row = jnp.array([True, False, True, False])
    for_rows = _drop_in(integer)(x, labels, where=row)
    for_cols = _drop_in(integer)(x, labels, where=row[:, None])
    np.testing.assert_array_equal(for_rows, for_cols)
    assert np.all(np.asarray(for_rows)[~np.asarray(row)] == 0)
    assert np.all(np.signbit(for_rows)[~np.asarray(row)] == (not integer))


# ---------------------------------------------------------------------------------------
# optax's own tests, run with the drop-ins in place of optax's two functions.
# ---------------------------------------------------------------------------------------

_OPTAX_TESTS = pathlib.Path(optax.losses.__file__).parent / "_classification_test.py"
_OPTAX_MODULE = "optax.losses._classification"  # what the test module calls _classification
_DROP_INS = {
    "softmax_cross_entropy": jaxce.softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels": jaxce.softmax_cross_entropy_with_integer_labels,
}
# NumPy seeds for the tests that draw from np.random (JAXCE_OPTAX_SEEDS=n: the first n).
_SEEDS = range(int(os.environ.get("JAXCE_OPTAX_SEEDS", "3")))
# A seed with which SoftmaxCrossEntropyTest.test_mask (size 5) draws an all-False mask, so
# that it calls softmax_cross_entropy with zero classes (test_optax_suite_zero_classes checks).
_ALL_MASKED_SEED = 9


def _names_in(code):
    """The global and attribute names a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_in(const)
    return names


@functools.cache
def _optax_suite():
    """A private copy of optax's test module (optax itself is left untouched), or ``(None,
    why)`` where it cannot be loaded."""
    if not _OPTAX_TESTS.is_file():
        return None, f"optax {optax.__version__} ships no {_OPTAX_TESTS.name}"
    if importlib.util.find_spec("absl") is None:
        return None, f"{_OPTAX_TESTS.name} needs absl-py"
    spec = importlib.util.spec_from_file_location("_optax_classification_test", _OPTAX_TESTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, ""


def _swap_in_drop_ins(module, calls):
    """Points ``module._classification`` at a copy of optax's module with the drop-ins in
    place of the two functions, each logging ``(name, logits shape)`` to ``calls`` (new
    functions each time, so no earlier jit trace hides a call)."""

    def logged(name, fn):
        def call(logits, *args, **kwargs):
            calls.append((name, tuple(np.shape(logits))))
            return fn(logits, *args, **kwargs)

        return call

    swapped = types.SimpleNamespace(**vars(importlib.import_module(_OPTAX_MODULE)))
    for name, fn in _DROP_INS.items():
        setattr(swapped, name, logged(name, fn))
    module._classification = swapped


def _optax_cases():
    """``(class, method, seed)`` for each of optax's test methods that calls one of the two
    functions; one per seed for those that draw from np.random, else seed None."""
    module, why = _optax_suite()
    if module is None:
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason=why))]
    cases = []
    for cls in vars(module).values():
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        for method in unittest.TestLoader().getTestCaseNames(cls):
            fn = getattr(cls, method)
            fn = getattr(fn, "__wrapped__", fn)  # absl's parameterized wrapper
            if not _names_in(fn.__code__) & set(_DROP_INS):
                continue
            seeds = _SEEDS if "np.random." in inspect.getsource(fn) else [None]
            ids = [f"{cls.__name__}.{method}" + ("" if s is None else f"-seed{s}") for s in seeds]
            cases += [
                pytest.param(cls.__name__, method, s, id=i) for s, i in zip(seeds, ids, strict=True)
            ]
    return cases


def _run_optax_test(cls_name, method, seed):
    """Runs one of optax's test methods with the drop-ins, as optax runs them (x64 off,
    standard promotion) and with ``seed`` for np.random; returns the drop-ins' calls."""
    module = _optax_suite()[0]
    calls = []
    _swap_in_drop_ins(module, calls)
    state = np.random.get_state()  # noqa: NPY002 (optax's tests draw from np.random)
    result = unittest.TestResult()
    try:
        if seed is not None:
            np.random.seed(seed)  # noqa: NPY002
        with (
            enable_x64(False),
            jax.numpy_dtype_promotion("standard"),
            jax.numpy_rank_promotion("allow"),
        ):
            getattr(module, cls_name)(method).run(result)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    problems = result.errors + result.failures
    assert not problems, "\n".join(text for _, text in problems)
    assert result.testsRun == 1
    assert not result.skipped, result.skipped
    return calls


@pytest.mark.parametrize(("cls_name", "method", "seed"), _optax_cases())
def test_optax_suite_passes_with_drop_ins(cls_name, method, seed):
    """optax's own tests that call softmax_cross_entropy[_with_integer_labels], with the
    drop-ins swapped in (their own classes, and the other losses' tests that compare
    with them), for several NumPy seeds where they draw random data."""
    assert _run_optax_test(cls_name, method, seed)  # the drop-ins were called


def test_optax_suite_zero_classes():
    """With this seed optax's test_mask masks every class: the drop-in sees zero classes
    (optax's result, -0.0, is what the test compares with)."""
    if _optax_suite()[0] is None:
        pytest.skip(_optax_suite()[1])
    calls = _run_optax_test("SoftmaxCrossEntropyTest", "test_mask0", _ALL_MASKED_SEED)
    assert ("softmax_cross_entropy", (0,)) in calls
