"""Property-based fuzzing against torch: random shapes, class axes, options, dtypes and
ignore masks, judged by the parity harness's comparison core (``parity.compare``).

CI runs the bounded, derandomised "ci" profile; `JAXCE_HYPOTHESIS_PROFILE=long` runs more.
Every failure found becomes a regression test in test_edges.py / test_torch.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from parity import compare  # noqa: E402
from parity.suites import jax_ce, torch_ce  # noqa: E402

pytestmark = pytest.mark.torch


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    num_classes = draw(st.integers(1, 6))
    shape = tuple(num_classes if i == axis % ndim else d for i, d in enumerate(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal(shape) * draw(st.sampled_from([0.5, 3.0, 30.0]))
    prob = draw(st.booleans())
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    if prob:
        t = rng.random(shape)
        target = t / t.sum(axis=axis, keepdims=True)
        ignore_index = -100
    else:
        tshape = tuple(d for i, d in enumerate(shape) if i != axis % ndim)
        target = rng.integers(0, num_classes, tshape)
        target = np.where(rng.random(tshape) < 0.3, ignore_index, target)
    weight = rng.uniform(0.0, 2.0, num_classes) if draw(st.booleans()) else None
    options = dict(
        ignore_index=ignore_index,
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
    )
    dtype = draw(st.sampled_from(["float64", "float32", "bfloat16"]))
    return x, target, weight, axis, options, dtype


@given(problems())
def test_matches_torch(problem):
    x, target, weight, axis, options, dtype = problem
    inputs = {"input": x, "target": target} | ({} if weight is None else {"weight": weight})
    jax_fn, torch_fn = jax_ce(axis, **options), torch_ce(axis, x.ndim, **options)
    result = compare(jax_fn, torch_fn, inputs, ("input",), dtype)
    assert result.passed, result.message


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float32_logits_near_the_largest_float(sign, reduction):
    x = np.array([[3e38, 1e38, -3e38, 0.0], [2e38, 2.9e38, 1.0, -1e38]]) * sign
    y = np.array([1, 0])
    jax_fn, torch_fn = jax_ce(-1, reduction=reduction), torch_ce(-1, 2, reduction=reduction)
    result = compare(jax_fn, torch_fn, {"input": x, "target": y}, ("input",), "float32")
    assert result.passed, result.message


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_whole_rows_of_neg_inf_match_torch(eps):
    x = np.array([[-np.inf] * 4, [0.0, 1.0, -np.inf, 2.0]])
    y = np.array([2, 1])
    options = dict(reduction="none", label_smoothing=eps)
    jax_fn, torch_fn = jax_ce(-1, **options), torch_ce(-1, 2, **options)
    result = compare(jax_fn, torch_fn, {"input": x, "target": y}, ("input",), "float64")
    assert result.passed, result.message
