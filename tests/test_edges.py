"""Degenerate inputs and the behaviours PyTorch (2.13) defines for them: all-ignored and
zero-weight means, C = 1, empty batches, out-of-range targets, non-finite logits, dtypes."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import enable_x64
from reference import numpy_cross_entropy, plain_cross_entropy

import jaxce
from parity.grid import REDUCTIONS, rng_for


def _maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (3,)], ids=["batched", "unbatched"])
def test_all_ignored_mean_is_nan_with_zero_gradient(shape, weighted, eps, use_jit):
    x = jnp.asarray(rng_for("allign", shape).standard_normal(shape))
    target = jnp.full(shape[:-1], -100)
    weight = jnp.asarray([1.0, 2.0, 3.0]) if weighted else None

    def loss(x):
        return jaxce.cross_entropy(x, target, weight, label_smoothing=eps)

    value, grad = _maybe_jit(jax.value_and_grad(loss), use_jit)(x)
    assert np.isnan(value)
    assert np.all(np.asarray(grad) == 0.0)
    grad_sum = _maybe_jit(
        jax.grad(lambda x: jaxce.cross_entropy(x, target, reduction="sum")), use_jit
    )(x)
    assert np.all(np.asarray(grad_sum) == 0.0)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize(
    ("shape", "axis"), [((0, 4), -1), ((2, 4, 0), 1), ((0, 3, 2), -1)], ids=["N0", "d0", "N0_kdim"]
)
def test_empty_batch(shape, axis, eps):
    x = jnp.zeros(shape)
    target = jnp.zeros(tuple(d for i, d in enumerate(shape) if i != axis % len(shape)), jnp.int32)
    assert np.isnan(jaxce.cross_entropy(x, target, axis=axis, label_smoothing=eps))
    assert float(jaxce.cross_entropy(x, target, axis=axis, reduction="sum")) == 0.0
    none = jaxce.cross_entropy(x, target, axis=axis, reduction="none")
    assert none.shape == target.shape
    grad = jax.grad(lambda x: jaxce.cross_entropy(x, target, axis=axis, reduction="sum"))(x)
    assert grad.shape == shape
    probs = jnp.zeros(shape)
    assert np.isnan(jaxce.cross_entropy(x, probs, axis=axis))
    assert float(jaxce.cross_entropy(x, probs, axis=axis, reduction="sum")) == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_class_loss_and_gradient_are_zero(reduction):
    x = jnp.asarray(rng_for("c1").standard_normal((5, 1)))
    target = jnp.zeros((5,), jnp.int32)
    value, grad = jax.value_and_grad(
        lambda x: jnp.sum(jaxce.cross_entropy(x, target, reduction=reduction))
    )(x)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", [3, -1, 1000])
def test_out_of_range_target_under_jit_is_nan_never_finite(bad, reduction, eps, weighted):
    x = jnp.asarray(rng_for("oor").standard_normal((4, 3)))
    target = jnp.array([0, bad, 1, 2])
    weight = jnp.asarray([1.0, 2.0, 3.0]) if weighted else None

    @jax.jit
    def loss_and_grad(x, target):
        def f(x):
            return jnp.sum(
                jaxce.cross_entropy(x, target, weight, reduction=reduction, label_smoothing=eps)
            )

        return jaxce.cross_entropy(
            x, target, weight, reduction=reduction, label_smoothing=eps
        ), jax.grad(f)(x)

    value, grad = loss_and_grad(x, target)
    value, grad = np.asarray(value), np.asarray(grad)
    if reduction == "none":
        assert np.isnan(value[1])
        assert np.all(np.isfinite(np.delete(value, 1)))
        assert np.all(np.isnan(grad[1]))
        assert np.all(np.isfinite(np.delete(grad, 1, axis=0)))
    else:
        assert np.isnan(value)
        assert np.all(np.isnan(grad[1]))


@pytest.mark.parametrize(
    "dtype", [jnp.int8, jnp.int16, jnp.int32, jnp.int64, jnp.uint8, jnp.uint16]
)
def test_any_integer_target_dtype(dtype):
    rng = rng_for("dtypes")
    x = jnp.asarray(rng.standard_normal((6, 4)))
    y = np.array([0, 3, 2, 1, 3, 0])
    want = jaxce.cross_entropy(x, jnp.asarray(y, jnp.int32), reduction="none")
    got = jaxce.cross_entropy(x, jnp.asarray(y, dtype), reduction="none")
    np.testing.assert_array_equal(got, want)


def test_uint8_targets_default_ignore_index_never_matches_and_255_does():
    x = jnp.asarray(rng_for("u8").standard_normal((3, 4)))
    y = jnp.asarray([0, 255, 1], jnp.uint8)
    with pytest.raises(ValueError, match="class index 255"):
        jaxce.cross_entropy(x, y)  # -100 cannot be a uint8: 255 is a real (bad) index
    got = jaxce.cross_entropy(x, y, ignore_index=255, reduction="none")
    want = numpy_cross_entropy(
        np.asarray(x), np.array([0, 255, 1]), ignore_index=255, reduction="none"
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_class_count_above_target_dtype_range():
    # uint8 targets with C = 300: every uint8 value is a valid class.
    x = jnp.asarray(rng_for("c300").standard_normal((2, 300)))
    y = np.array([255, 7])
    got = jaxce.cross_entropy(x, jnp.asarray(y, jnp.uint8), reduction="none")
    np.testing.assert_allclose(
        got, numpy_cross_entropy(np.asarray(x), y, reduction="none"), rtol=1e-12
    )


def test_traced_label_smoothing_out_of_range_gives_nan():
    x = jnp.asarray(rng_for("eps").standard_normal((3, 4)))
    y = jnp.array([0, 1, 2])
    f = jax.jit(lambda e: jaxce.cross_entropy(x, y, label_smoothing=e))
    assert np.isfinite(f(0.5))
    assert np.isnan(f(-0.1))
    assert np.isnan(f(1.5))
    assert np.isnan(f(jnp.nan))


def test_unnormalised_and_negative_probability_targets_are_accepted():
    rng = rng_for("probs")
    x = rng.standard_normal((3, 4))
    t = rng.standard_normal((3, 4)) * 3
    got = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(t), reduction="none", label_smoothing=0.2)
    want = numpy_cross_entropy(x, t, reduction="none", label_smoothing=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_large_magnitude_logits_float32(eps):
    rng = rng_for("big")
    x = (rng.standard_normal((8, 16)) * 1e4).astype(np.float32)
    y = rng.integers(0, 16, 8)
    got = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), reduction="none", label_smoothing=eps)
    want = numpy_cross_entropy(x.astype(np.float64), y, reduction="none", label_smoothing=eps)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    grad = jax.grad(lambda x: jaxce.cross_entropy(x, jnp.asarray(y), label_smoothing=eps))(
        jnp.asarray(x)
    )
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("row", [[-np.inf] * 4, [0.0, np.inf, 1.0, 2.0], [0.0, np.nan, 1.0, 2.0]])
def test_non_finite_rows_are_nan_like_torch(row):
    x = jnp.asarray([row, [0.0, 1.0, 2.0, 3.0]])
    y = jnp.array([0, 1])
    out = jaxce.cross_entropy(x, y, reduction="none")
    assert np.isnan(out[0])
    assert np.isfinite(out[1])
    want = numpy_cross_entropy(np.asarray(x), np.asarray(y), reduction="none")
    np.testing.assert_allclose(out, want, rtol=1e-12)


@pytest.mark.parametrize("ignore_index", [-1, 2, 255])
def test_ignore_index_variants_drop_exactly_those_elements(ignore_index):
    rng = rng_for("ii", ignore_index)
    x = rng.standard_normal((6, 4))
    y = (
        np.array([0, ignore_index, 1, 2, ignore_index, 3])
        if ignore_index != 255
        else np.array([0, 1, 2, 3, 1, 0])
    )
    got = jaxce.cross_entropy(
        jnp.asarray(x), jnp.asarray(y), ignore_index=ignore_index, reduction="none"
    )
    np.testing.assert_array_equal(np.asarray(got)[y == ignore_index], 0.0)
    want = numpy_cross_entropy(x, y, ignore_index=ignore_index, reduction="mean")
    np.testing.assert_allclose(
        jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), ignore_index=ignore_index),
        want,
        rtol=1e-12,
    )


def test_float32_without_x64():
    with enable_x64(False):
        x = jnp.asarray(rng_for("x32").standard_normal((5, 7)), jnp.float32)
        y = jnp.asarray([0, 6, 3, 2, 1])
        value, grad = jax.value_and_grad(lambda x: jaxce.cross_entropy(x, y, label_smoothing=0.1))(
            x
        )
        assert value.dtype == jnp.float32
        assert grad.dtype == jnp.float32
        want = numpy_cross_entropy(np.asarray(x, np.float64), np.asarray(y), label_smoothing=0.1)
        np.testing.assert_allclose(value, want, rtol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_checkify_reports_the_offending_index(fused):
    from jax.experimental import checkify

    rng = rng_for("checkify")
    h = jnp.asarray(rng.standard_normal((4, 3)))
    k = jnp.asarray(rng.standard_normal((3, 5)))

    def loss(target, check=True):
        if fused:
            return jaxce.linear_cross_entropy(h, k, target, check_targets=check)
        return jaxce.cross_entropy(h @ k, target, check_targets=check)

    checked = checkify.checkify(jax.jit(loss), errors=checkify.user_checks)
    err, value = checked(jnp.array([0, 4, 7, -100]))
    assert np.isnan(value)
    message = err.get()
    assert message is not None
    assert "class index 7 at flat position 2, outside the valid range [0, 5)" in message
    err, value = checked(jnp.array([0, 4, 1, -100]))
    assert err.get() is None
    assert np.isfinite(value)
    # Without check_targets nothing is reported; without checkify the loss stays NaN.
    unchecked = checkify.checkify(jax.jit(partial(loss, check=False)), errors=checkify.user_checks)
    err, value = unchecked(jnp.array([0, 4, 7, -100]))
    assert err.get() is None
    assert np.isnan(value)
    assert np.isnan(jax.jit(loss)(jnp.array([0, 4, 7, -100])))


@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
def test_traced_losses_carry_no_effect_unless_check_targets(fused):
    # An effect in a jitted program (such as a checkify.debug_check) disables JAX's C++
    # dispatch fast path for the user's whole jitted step, so the check is opt-in.
    h = jnp.ones((4, 3))
    k = jnp.ones((3, 5))
    t = jnp.array([0, 4, 1, -100])

    def step(h, t, check):
        if fused:
            return jax.value_and_grad(jaxce.linear_cross_entropy)(h, k, t, check_targets=check)
        return jax.value_and_grad(jaxce.cross_entropy)(h @ k, t, check_targets=check)

    assert not jax.make_jaxpr(partial(step, check=False))(h, t).effects
    assert jax.make_jaxpr(partial(step, check=True))(h, t).effects


@pytest.mark.parametrize("num_classes", [40_000, 98_304])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_long_rows_reduced_in_parts_match_float64(num_classes, dtype):
    # Rows longer than 32,768 classes are reduced as sub-rows (an XLA:CPU speed fix in
    # jaxce/_backends/xla_cpu.py, _split_rows): same values, gradients and non-finite behaviour.
    rng = np.random.default_rng(num_classes)
    x = rng.standard_normal((4, num_classes)) * 3
    x[1, 5] = 40.0  # the row max in the first sub-row
    x[2, -1] = 40.0  # ... and in the last one
    x[3, :] = -np.inf  # an all -inf row: NaN, as in PyTorch
    t = np.array([0, 5, num_classes - 1, 3])
    xj = jnp.asarray(x, dtype)
    xf = np.asarray(xj.astype(jnp.float64))
    m = np.max(xf[:3], axis=1, keepdims=True)
    lse = (m + np.log(np.sum(np.exp(xf[:3] - m), axis=1, keepdims=True)))[:, 0]
    loss = jaxce.cross_entropy(xj, jnp.asarray(t), reduction="none")
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.float64(loss[:3]), lse - xf[np.arange(3), t[:3]], rtol=tol, atol=tol
    )
    assert np.isnan(loss[3])
    grad = jax.grad(lambda x: jnp.sum(jaxce.cross_entropy(x, jnp.asarray(t[:3]))))(xj[:3])
    expected = np.exp(xf[:3] - lse[:, None])
    expected[np.arange(3), t[:3]] -= 1
    np.testing.assert_allclose(np.float64(grad) * 3, expected, atol=tol)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_long_rows_smoothed_reduced_in_parts_match_float64(dtype, weighted):
    # The smoothing sum Σ_c w_c (m - x_c) of long rows is also reduced as sub-rows (the
    # class weights tiled over them): same values and gradients as the plain formula.
    num_classes, eps = 98_304, 0.2
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, num_classes)) * 3
    x[1, 5] = 40.0
    x[2, -1] = 40.0
    t = np.array([0, 5, num_classes - 1])
    w = rng.uniform(0.5, 2.0, num_classes) if weighted else np.ones(num_classes)
    xj = jnp.asarray(x, dtype)
    wj = jnp.asarray(w, dtype) if weighted else None

    def plain(x):  # float64, differentiated by autodiff
        lse = jax.nn.logsumexp(x, axis=1, keepdims=True)
        gap = lse - x
        nll = jnp.take_along_axis(gap, jnp.asarray(t)[:, None], axis=1)[:, 0]
        smooth = jnp.sum(jnp.asarray(w)[None, :] * gap, axis=1)
        return jnp.sum((1 - eps) * jnp.asarray(w)[t] * nll + eps / num_classes * smooth)

    def ours(x):
        return jaxce.cross_entropy(x, jnp.asarray(t), wj, reduction="sum", label_smoothing=eps)

    x64 = jnp.asarray(np.asarray(xj.astype(jnp.float64)))
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(np.float64(ours(xj)), np.float64(plain(x64)), rtol=tol)
    np.testing.assert_allclose(
        np.float64(jax.grad(ours)(xj)), np.float64(jax.grad(plain)(x64)), rtol=0, atol=tol
    )
    x[0, :] = -np.inf  # an all -inf row: NaN, as in PyTorch
    assert np.isnan(
        jaxce.cross_entropy(jnp.asarray(x, dtype), jnp.asarray(t), wj, label_smoothing=eps)
    )


# Rows at the edges of the log-sum-exp's range: a target far below the row max, logits
# near +-1000, -inf logits, an ignored row whose placeholder class 0 is -inf, a confident
# row. Values and gradients against float64, and every row independent of the others.
def _edge_rows(num_classes):
    """Logits [8, C] and targets for the rows described above, as float64 NumPy."""
    rng = np.random.default_rng(num_classes)
    x = rng.standard_normal((8, num_classes)) * 2
    t = rng.integers(1, num_classes, 8)
    x[1, t[1]] = x[1].max() - 120.0  # a target far below the max (exp(120) overflows)
    x[2] = 1000.0 + x[2]  # large logits, target at the max
    t[2] = int(np.argmax(x[2]))
    x[3] = -1000.0 + x[3]  # very negative logits
    t[4] = -100  # ignored, with the placeholder class 0 at -inf
    x[4, 0] = -np.inf
    x[5, :] = -np.inf  # -inf everywhere but the target: loss exactly 0 unsmoothed
    x[5, t[5]] = 3.0
    x[6, t[6]] = 25.0  # a confident row: a loss below float32 resolution near 1
    return x, t


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("num_classes", [33, 40_000])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_at_the_edges_of_the_lse_range_match_float64(dtype, num_classes, weighted, eps):
    x, t = _edge_rows(num_classes)
    w = np.random.default_rng(1).uniform(0.5, 2.0, num_classes) if weighted else None
    xj = jnp.asarray(x, dtype)
    wj = None if w is None else jnp.asarray(w, jnp.float32)
    x64 = np.asarray(xj.astype(jnp.float64))  # the rounded inputs, exactly
    loss = np.float64(
        jaxce.cross_entropy(xj, jnp.asarray(t), wj, reduction="none", label_smoothing=eps)
    )
    expected = numpy_cross_entropy(x64, t, w, reduction="none", label_smoothing=eps)
    if eps > 0:  # a -inf logit makes the smoothing sum +inf, as in PyTorch
        assert np.isposinf(loss[5])
        assert np.isposinf(expected[5])
    else:
        assert loss[5] == 0.0
    assert loss[4] == 0.0
    # lse is rounded once to float32: an absolute error of ~ulp(lse) where the smoothing
    # sum uses it, largest in the rows of logits near +-1000.
    scale = np.maximum(1.0, np.max(np.abs(np.where(np.isfinite(x64), x64, 0)), axis=1))
    finite = np.isfinite(expected)
    err = np.abs(loss[finite] - expected[finite])
    rtol = 1e-6 if dtype == jnp.float32 else 8e-3
    assert np.all(err <= rtol * np.abs(expected[finite]) + 2e-7 * scale[finite]), err

    def ours(x):
        return jaxce.cross_entropy(x, jnp.asarray(t), wj, reduction="sum", label_smoothing=eps)

    def plain(x):
        wp = None if w is None else jnp.asarray(w)
        return plain_cross_entropy(x, jnp.asarray(t), wp, reduction="sum", label_smoothing=eps)

    grad = np.float64(jax.grad(ours)(xj))
    expected_grad = np.asarray(jax.grad(plain)(jnp.asarray(x64)))
    # The softmax is exp(x - lse): the same ~ulp(lse) error.
    err = np.abs(grad - expected_grad)
    assert np.all(err <= (1e-6 if dtype == jnp.float32 else 1e-2) * scale[:, None]), np.max(err)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rows_do_not_depend_on_an_extreme_row(eps):
    # Every row's loss and gradient are bit-identical with or without a row whose target
    # lies far below its max in the batch, and under vmap with or without it in another
    # batch element.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 33)).astype(np.float32)
    t = rng.integers(0, 33, (2, 6))
    x[1, 2, t[1, 2]] = -150.0

    def f(x, t):
        def total(x):
            return jnp.sum(jaxce.cross_entropy(x, t, reduction="none", label_smoothing=eps))

        return jaxce.cross_entropy(x, t, reduction="none", label_smoothing=eps), jax.grad(total)(x)

    keep = np.array([0, 1, 3, 4, 5])
    alone = jax.jit(f)(x[1][keep], t[1][keep])
    mixed = jax.jit(f)(x[1], t[1])
    for a, b in zip(alone, mixed, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b)[keep])
    batched = jax.jit(jax.vmap(f))(x, t)
    for a, b in zip(jax.jit(f)(x[0], t[0]), batched, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b)[0])
