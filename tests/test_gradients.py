"""Custom-VJP gradients against autodiff of the plain formula (float64, no torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid
from reference import plain_cross_entropy

import jaxce
from parity.grid import (
    IGNORES,
    LAYOUTS,
    REDUCTIONS,
    TEST_LAYOUTS,
    WEIGHTS,
    ce_inputs,
    prob_target,
    random_logits,
    rng_for,
)


def _vjp_all(fn, primals, cotangent_seed):
    out, vjp = jax.vjp(fn, *primals)
    ct = jnp.asarray(rng_for(cotangent_seed).standard_normal(out.shape), out.dtype)
    return out, vjp(ct)


def _compare(ours, plain, primals, seed):
    out_a, grads_a = _vjp_all(ours, primals, seed)
    out_b, grads_b = _vjp_all(plain, primals, seed)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-11, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("layout", "reduction", "weight_mode", "ignore_mode", "eps"),
    covering_grid(TEST_LAYOUTS, REDUCTIONS, WEIGHTS, IGNORES, [0.0, 0.1]),
)
def test_index_gradients(layout, reduction, weight_mode, ignore_mode, eps):
    shape, axis = LAYOUTS[layout]
    rng = rng_for("grad", layout, reduction, weight_mode, ignore_mode)
    x, target, weight, ii = ce_inputs(rng, "index", shape, axis, weight_mode, ignore_mode)
    x, target = jnp.asarray(x), jnp.asarray(target)
    eps_arr = jnp.asarray(eps)
    kw = dict(ignore_index=ii, reduction=reduction, axis=axis)
    if weight is None:
        primals = (x, eps_arr)

        def ours(x, e):
            return jaxce.cross_entropy(x, target, label_smoothing=e, **kw)

        def plain(x, e):
            return plain_cross_entropy(x, target, label_smoothing=e, **kw)
    else:
        primals = (x, jnp.asarray(weight), eps_arr)

        def ours(x, w, e):
            return jaxce.cross_entropy(x, target, w, label_smoothing=e, **kw)

        def plain(x, w, e):
            return plain_cross_entropy(x, target, w, label_smoothing=e, **kw)

    seed = (layout, reduction, weight_mode, ignore_mode, eps)
    t = np.asarray(target)
    w_np = np.ones(shape[axis]) if weight is None else weight
    denominator = np.sum(np.where(t != ii, w_np[np.where(t != ii, t, 0)], 0.0))
    if reduction == "mean" and denominator == 0:
        # The mean is undefined (x / 0): NaN. torch's rule for the input gradient: exactly
        # zero for ignored elements, NaN for counted elements (all of zero weight).
        # The gradients w.r.t. ε and weight of an undefined mean are not compared.
        # (The plain formula is not torch here: with smoothing it gives inf, not NaN.)
        assert np.isnan(float(ours(*primals)))
        grad_x = np.asarray(jax.grad(lambda x: ours(x, *primals[1:]))(x))
        ignored = np.broadcast_to(np.expand_dims(t == ii, axis), grad_x.shape)
        assert np.all(grad_x[ignored] == 0.0)
        assert np.all(np.isnan(grad_x[~ignored]))
    else:
        _compare(ours, plain, primals, seed)


@pytest.mark.parametrize(
    ("layout", "reduction", "weight_mode", "eps"),
    covering_grid(TEST_LAYOUTS, REDUCTIONS, WEIGHTS, [0.0, 0.1]),
)
def test_prob_gradients(layout, reduction, weight_mode, eps):
    shape, axis = LAYOUTS[layout]
    rng = rng_for("grad-prob", layout, reduction, weight_mode)
    x, t, weight, _ = ce_inputs(rng, "prob", shape, axis, weight_mode)
    x, t = jnp.asarray(x), jnp.asarray(t)
    w = jnp.asarray(weight if weight is not None else np.ones(shape[axis]))

    def ours(x, t, w, e):
        return jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=e, axis=axis)

    def plain(x, t, w, e):
        return plain_cross_entropy(x, t, w, reduction=reduction, label_smoothing=e, axis=axis)

    _compare(ours, plain, (x, t, w, jnp.asarray(eps)), (layout, reduction, weight_mode, eps))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unweighted_prob_gradients_without_weight_argument(reduction):
    rng = rng_for("prob-noweight", reduction)
    x = jnp.asarray(random_logits(rng, (4, 7)))
    t = jnp.asarray(prob_target(rng, (4, 7), -1))
    primals = (x, t)
    _compare(
        lambda x, t: jaxce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.3),
        lambda x, t: plain_cross_entropy(x, t, reduction=reduction, label_smoothing=0.3),
        primals,
        reduction,
    )


def test_seed_example_gradient_row_by_hand():
    # torch.manual_seed(0) inputs (torch.randn(3, 5), torch.randint(5, (3,))): d(mean)/dx
    # row 0 = (softmax(x0) - onehot(3)) / 3, derived here; torch 2.13 printed the values.
    x = np.array(
        [
            [1.5410, -0.2934, -2.1788, 0.5684, -1.0845],
            [-1.3986, 0.4033, 0.8380, -0.7193, -0.4033],
            [-0.5966, 0.1820, -0.8567, 1.1006, -1.0712],
        ]
    )
    y = np.array([3, 0, 0])
    grad = jax.grad(lambda x: jaxce.cross_entropy(x, jnp.asarray(y)))(jnp.asarray(x))
    softmax0 = np.exp(x[0]) / np.exp(x[0]).sum()
    np.testing.assert_allclose(grad[0], (softmax0 - np.eye(5)[3]) / 3, rtol=1e-12)
    np.testing.assert_allclose(grad[0], [0.2039, 0.0326, 0.0049, -0.2562, 0.0148], atol=1e-4)
