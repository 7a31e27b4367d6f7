"""Parity with torch 2.13 (the judge): values, input gradients and target gradients.

Every comparison goes through the parity harness's core (``parity.compare``: dtypes,
tolerances, NaN/inf placement, the three-way rule for 16-bit dtypes), on cases of the
shared grid (``parity/grid.py``, ``parity.suites.ce_case``) where one fits. The option
grids run every implementation whose dense loss is a program of its own
(``tests/cases.py``: ``DENSE_IMPLEMENTATIONS``; ``jaxce._backends``: the portable spelling
and each backend's), one more factor of their pairwise covers.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from cases import DENSE_IMPLEMENTATIONS, covering_grid

import jaxce
from jaxce._backends import default_implementation
from parity.compare import ROUNDOFF, compare, run_jax, run_torch
from parity.grid import (
    IGNORES,
    REDUCTIONS,
    SMOOTHINGS,
    TEST_LAYOUTS,
    WEIGHTS,
    prob_target,
    rng_for,
)
from parity.suites import ce_case, jax_ce, simple_case, torch_ce

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch


def _assert_parity(case, implementation=None):
    """Judges ``case``; with ``implementation``, the entry points' automatic implementation
    (None) is that one meanwhile (``jaxce._backends.default_implementation``)."""
    with default_implementation(implementation):
        result = case.run()
    assert not result.error_parity, result.message  # both raised: not a comparison
    assert result.passed, result.message


# The whole option grid in float64 (the parity harness, `python -m parity`, runs it in
# every dtype and transform); float32 on a slice of it.
@pytest.mark.parametrize(
    ("implementation", "layout", "reduction", "weight", "ignore", "eps"),
    covering_grid(DENSE_IMPLEMENTATIONS, TEST_LAYOUTS, REDUCTIONS, WEIGHTS, IGNORES, SMOOTHINGS),
)
def test_index_parity_float64(implementation, layout, reduction, weight, ignore, eps):
    _assert_parity(
        ce_case(kind="index", layout=layout, weight=weight, ignore=ignore, reduction=reduction,
                smoothing=eps, dtype="float64"),
        implementation,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("implementation", "layout", "reduction", "weight", "eps"),
    covering_grid(DENSE_IMPLEMENTATIONS, TEST_LAYOUTS, REDUCTIONS, WEIGHTS, SMOOTHINGS),
)
def test_prob_parity_float64(implementation, layout, reduction, weight, eps):
    _assert_parity(
        ce_case(kind="prob", layout=layout, weight=weight, ignore="absent", reduction=reduction,
                smoothing=eps, dtype="float64"),
        implementation,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("implementation", "layout", "reduction", "ignore", "eps"),
    covering_grid(DENSE_IMPLEMENTATIONS, TEST_LAYOUTS, REDUCTIONS, ["present", "all"], [0.0, 0.05]),
)
def test_index_parity_float32(implementation, layout, reduction, ignore, eps):
    _assert_parity(
        ce_case(kind="index", layout=layout, weight="random", ignore=ignore, reduction=reduction,
                smoothing=eps, dtype="float32"),
        implementation,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("implementation", "layout", "reduction", "eps"),
    covering_grid(DENSE_IMPLEMENTATIONS, TEST_LAYOUTS, REDUCTIONS, [0.0, 0.05]),
)
def test_prob_parity_float32(implementation, layout, reduction, eps):
    _assert_parity(
        ce_case(kind="prob", layout=layout, weight="random", ignore="absent", reduction=reduction,
                smoothing=eps, dtype="float32"),
        implementation,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("implementation", "kind", "reduction", "weight", "eps", "dtype"),
    covering_grid(DENSE_IMPLEMENTATIONS, ["index", "prob"], REDUCTIONS, ["none", "random"], [0.0, 0.1],
                  ["bfloat16", "float16"]),
)  # fmt: skip
def test_low_precision_no_worse_than_torch(implementation, kind, reduction, weight, eps, dtype):
    # The three-way rule: jaxce's error against torch's float64 result no worse than
    # torch's own error at this dtype plus two units of roundoff.
    _assert_parity(
        ce_case(kind=kind, layout="(64,33)", weight=weight, ignore="present", reduction=reduction,
                smoothing=eps, dtype=dtype),
        implementation,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("reduction", "printed"),
    [("none", [1.4639, 3.0493, 2.3056]), ("mean", 2.2729), ("sum", 6.8188)],
)
def test_seed_example_against_torch(reduction, printed):
    torch.manual_seed(0)
    x = torch.randn(3, 5).numpy()
    y = torch.randint(5, size=(3,)).numpy()
    # torch 2.13's printed values for these inputs ...
    got = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(y), reduction=reduction)
    np.testing.assert_allclose(got, printed, atol=1e-4)
    # ... and torch itself, in float32, to rtol 1e-6.
    result = compare(
        jax_ce(-1, reduction=reduction),
        torch_ce(-1, 2, reduction=reduction),
        {"input": x, "target": y},
        dtype="float32",
        tolerance=(1e-6, 0.0),
    )
    assert result.passed, result.message


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_form_matches_torch_module(reduction):
    rng = rng_for("module", reduction)
    x = rng.standard_normal((2, 4, 3))
    y = rng.integers(0, 4, (2, 3))
    y[0, 0] = 1
    w = rng.uniform(0.5, 2, 4)

    def jax_fn(input, target, weight):
        # Positional: weight, ignore_index (a valid class), reduction, label_smoothing.
        return jaxce.CrossEntropyLoss(weight, 1, reduction, 0.2, axis=1)(input, target)

    def torch_fn(input, target, weight):
        loss = torch.nn.CrossEntropyLoss(
            weight, ignore_index=1, reduction=reduction, label_smoothing=0.2
        )
        return loss(input, target)

    inputs = {"input": x, "target": y, "weight": w}
    result = compare(jax_fn, torch_fn, inputs, ("input",), "float64", tolerance=(1e-10, 0.0))
    assert result.passed, result.message


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_neg_inf_logits_match_torch(eps, reduction):
    # −inf in non-target classes: finite loss without smoothing, +inf with it; gradients finite.
    x = np.array([[0.5, -np.inf, 1.0, -np.inf], [2.0, 0.0, -np.inf, 1.0]])
    y = np.array([0, 3])
    _assert_parity(
        simple_case("-inf", "edge", "float64", x, y, reduction=reduction, label_smoothing=eps)
    )


def test_zero_probability_on_neg_inf_logit_is_nan_like_torch():
    x = np.array([[0.5, -np.inf, 1.0]])
    t = np.array([[0.5, 0.0, 0.5]])
    _assert_parity(simple_case("0 on -inf", "edge", "float64", x, t, reduction="none"))
    out = jaxce.cross_entropy(jnp.asarray(x), jnp.asarray(t), reduction="none")
    assert np.isnan(out[0])


def test_prob_target_dtype_promotion_like_torch():
    # float32 logits with float64 probabilities: a float64 result (compare checks that
    # torch's dtype is jaxce's), equal to torch's to rtol 1e-6.
    x = np.random.default_rng(0).standard_normal((3, 4))
    t = prob_target(np.random.default_rng(1), (3, 4), -1)
    result = compare(
        lambda input, target: jaxce.cross_entropy(input.astype(jnp.float32), target),
        lambda input, target: torch.nn.functional.cross_entropy(input.float(), target),
        {"input": x, "target": t},
        dtype="float64",
        tolerance=(1e-6, 0.0),
    )
    assert result.passed, result.message
    assert jaxce.cross_entropy(jnp.asarray(x, jnp.float32), jnp.asarray(t)).dtype == jnp.float64


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("margin", [4.0, 8.0, 12.0])
def test_confident_rows_true_class_gradient_no_worse_than_torch(margin, eps, dtype):
    # Rows whose target logit leads the others by `margin`: softmax_y = 1 - δ with δ down to
    # ~C e^-12, so the true-class gradient softmax_y - 1 (+ smoothing terms) is a small
    # difference of nearly equal numbers -- where a 16-bit loss loses precision. Measured
    # relative to each true-class gradient itself (not to the row's scale), on inputs
    # already rounded to the dtype, jaxce's error vs float64 must not exceed torch's own.
    rng = rng_for("confident", margin, eps, dtype)
    n, c = 48, 33
    target = rng.integers(0, c, n)
    x = rng.standard_normal((n, c)) * 0.5
    x[np.arange(n), target] += margin
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float64))
    inputs = {"input": x, "target": target}
    options = dict(reduction="none", label_smoothing=eps)
    ours = run_jax(jax_ce(-1, **options), inputs, ("input",), dtype, seed=0)
    theirs = run_torch(torch_ce(-1, 2, **options), inputs, ("input",), dtype, seed=0)
    # The float64 truth of the three-way rule: torch in float64, same inputs and cotangent.
    exact = run_torch(
        torch_ce(-1, 2, **options), inputs, ("input",), "float64", seed=0, cotangent_dtype=dtype
    )
    rows = np.arange(n)
    if eps == 0 and margin >= 8:  # the cancellation regime: |p_y - 1| < 10 %
        lse = np.log(np.sum(np.exp(x), axis=-1))
        assert np.all(1 - np.exp(x[rows, target] - lse) < 0.1)
    truth = exact.grads["input"][rows, target]
    normal = np.abs(truth) >= float(jnp.finfo(dtype).tiny)  # not subnormal
    rel = lambda g: np.max(np.abs(g[rows, target] - truth)[normal] / np.abs(truth[normal]))  # noqa: E731
    err_ours, err_torch = rel(ours.grads["input"]), rel(theirs.grads["input"])
    assert err_ours <= err_torch + 2 * ROUNDOFF[dtype], (err_ours, err_torch)
    # The difference is formed in float32 from x_y - lse, whose rounding (ulp(lse) ~ 1e-6
    # here) bounds what any float32 lse-based loss, torch's included, can reach: about 1 %
    # at δ ~ 1e-4. A difference formed in the 16-bit dtype would have no correct digit.
    assert err_ours <= 0.02, err_ours
