"""Loss values against the float64 NumPy reference (no torch), every option."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid
from reference import numpy_cross_entropy

import jaxce
from parity.grid import (
    IGNORES,
    LAYOUTS,
    REDUCTIONS,
    SMOOTHINGS,
    TEST_LAYOUTS,
    WEIGHTS,
    ce_inputs,
    rng_for,
)


def _run(x, target, weight, ignore_index, reduction, eps, axis):
    got = jaxce.cross_entropy(
        jnp.asarray(x),
        jnp.asarray(target),
        None if weight is None else jnp.asarray(weight),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
        axis=axis,
    )
    want = numpy_cross_entropy(x, target, weight, ignore_index, reduction, eps, axis)
    return np.asarray(got), want


@pytest.mark.parametrize(
    ("layout", "reduction", "weight_mode", "ignore_mode", "eps"),
    covering_grid(TEST_LAYOUTS, REDUCTIONS, WEIGHTS, IGNORES, SMOOTHINGS),
)
def test_index_targets_match_reference(layout, reduction, weight_mode, ignore_mode, eps):
    shape, axis = LAYOUTS[layout]
    rng = rng_for(layout, reduction, weight_mode, ignore_mode)
    x, target, weight, ignore_index = ce_inputs(rng, "index", shape, axis, weight_mode, ignore_mode)
    got, want = _run(x, target, weight, ignore_index, reduction, eps, axis)
    assert got.shape == want.shape
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    if reduction == "none":
        # Ignored positions are exactly 0.
        assert np.all(got[target == ignore_index] == 0.0)


@pytest.mark.parametrize(
    ("layout", "reduction", "weight_mode", "eps"),
    covering_grid(TEST_LAYOUTS, REDUCTIONS, WEIGHTS, SMOOTHINGS),
)
def test_prob_targets_match_reference(layout, reduction, weight_mode, eps):
    shape, axis = LAYOUTS[layout]
    rng = rng_for(layout, reduction, weight_mode, "prob")
    x, target, weight, _ = ce_inputs(rng, "prob", shape, axis, weight_mode)
    got, want = _run(x, target, weight, -100, reduction, eps, axis)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_seed_example_hand_derivation():
    # torch.manual_seed(0); x = torch.randn(3, 5); y = torch.randint(5, (3,)) gives
    # x[0] below and y[0] = 3 (torch 2.13, CPU). Row 0 by hand: lse - x[3].
    x0 = np.array([1.5410, -0.2934, -2.1788, 0.5684, -1.0845])
    by_hand = np.log(np.sum(np.exp(x0))) - x0[3]
    got = jaxce.cross_entropy(jnp.asarray(x0), jnp.asarray(3))
    np.testing.assert_allclose(float(got), by_hand, rtol=1e-12)
    np.testing.assert_allclose(by_hand, 1.4639, atol=2e-4)  # torch's printed value


def test_weighted_mean_denominator_is_sum_of_target_weights():
    # Hand derivation: 'mean' = Σ w[y_n] l_n / Σ w[y_n] over non-ignored n, not / N.
    x = np.zeros((4, 3))  # every class has log-prob -log 3
    y = np.array([0, 1, 2, -100])
    w = np.array([1.0, 2.0, 5.0])
    got = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
    expected = (1 + 2 + 5) * np.log(3) / (1 + 2 + 5)
    np.testing.assert_allclose(float(got), expected, rtol=1e-12)
    got_sum = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), reduction="sum")
    np.testing.assert_allclose(float(got_sum), 8 * np.log(3), rtol=1e-12)


def test_smoothing_term_is_class_weighted_with_target_weight_denominator():
    # Hand derivation with uniform logits: lp_c = -log C for all c, so
    # l_n = (1-ε) w[y_n] log C + (ε/C) Σ_c w_c log C, mean divides by Σ w[y_n].
    num_classes, eps = 4, 0.2
    x = np.zeros((2, num_classes))
    y = np.array([1, 3])
    w = np.array([1.0, 2.0, 3.0, 4.0])
    log_c = np.log(num_classes)
    per = [(1 - eps) * w[yi] * log_c + eps / num_classes * w.sum() * log_c for yi in y]
    got = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), label_smoothing=eps)
    np.testing.assert_allclose(float(got), sum(per) / (w[1] + w[3]), rtol=1e-12)


def test_prob_mean_divides_by_element_count_even_with_weights():
    # Probability targets divide by N, index targets by Σ w[y]
    # (https://github.com/pytorch/pytorch/issues/61309).
    x = np.random.default_rng(0).standard_normal((4, 3))
    y = np.array([0, 2, 1, 2])
    w = np.array([0.5, 1.0, 3.0])
    onehot = np.eye(3)[y]
    by_index = float(jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))
    by_prob = float(jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(onehot), jnp.asarray(w)))
    total = float(
        jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w), reduction="sum")
    )
    np.testing.assert_allclose(by_index, total / w[y].sum(), rtol=1e-12)
    np.testing.assert_allclose(by_prob, total / 4, rtol=1e-12)
