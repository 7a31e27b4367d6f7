"""What the backward pass keeps: no logits-sized residual besides the input itself (every
entry point: cross_entropy and the optax drop-ins), under every implementation (the
portable spelling and each backend's; tests/cases.py's DENSE_IMPLEMENTATIONS). Backend-independent; the compilers' temporaries
are pinned in test_budgets.py."""

from __future__ import annotations

import contextlib
import io
import re

import jax.numpy as jnp
import numpy as np
import pytest
from cases import DENSE_IMPLEMENTATIONS
from jax.ad_checkpoint import print_saved_residuals

import jaxce
from jaxce._backends import default_implementation

N, C = 16, 1000


@pytest.fixture(autouse=True, params=DENSE_IMPLEMENTATIONS)
def implementation(request):
    """Every test here runs once per implementation (the entry points' automatic choice
    set to it) whose dense losses are programs of their own (tests/cases.py)."""
    with default_implementation(request.param):
        yield request.param


def _residuals(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    return buf.getvalue().strip().splitlines()


def _shape(line):
    m = re.match(r"\w+\[([\d,]*)\]", line)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else None


CASES = {
    "plain_mean": lambda x, t, w: jaxce.cross_entropy(x, t),
    "weighted_smoothed_mean": lambda x, t, w: jaxce.cross_entropy(x, t, w, label_smoothing=0.1),
    "none": lambda x, t, w: jnp.sum(jaxce.cross_entropy(x, t, reduction="none")),
    "weighted_smoothed_none": lambda x, t, w: jnp.sum(
        jaxce.cross_entropy(x, t, w, reduction="none", label_smoothing=0.1)
    ),
    "ignore_sum": lambda x, t, w: jaxce.cross_entropy(x, t, ignore_index=3, reduction="sum"),
    "softcap_z_where_aux": lambda x, t, w: jaxce.cross_entropy(
        x, t, w, where=t >= 0, z_loss=1e-4, logit_softcap=30.0, return_aux=True
    )[0],
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_no_logits_sized_residual_index_targets(name, dtype):
    x = jnp.ones((N, C), dtype)
    t = jnp.zeros((N,), jnp.int32)
    w = jnp.ones((C,), jnp.float32)
    lines = _residuals(lambda x: CASES[name](x, t, w), x)
    big = [line for line in lines if _shape(line) == (N, C)]
    # Exactly one: the logits themselves, in their own dtype (no float32 upcast copy).
    assert len(big) == 1, lines
    assert "from the argument" in big[0]
    assert big[0].startswith(jnp.dtype(dtype).name.replace("float", "f").replace("bf16", "bf16"))
    assert all(_shape(line) is None or len(_shape(line)) <= 1 for line in lines if line not in big)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_logits_sized_residual_probability_targets(reduction):
    x = jnp.ones((N, C), jnp.float32)
    t = jnp.full((N, C), 1.0 / C, jnp.float32)
    w = jnp.ones((C,), jnp.float32)

    def f(x, t):
        return jnp.sum(jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1))

    lines = _residuals(f, x, t)
    big = [line for line in lines if _shape(line) == (N, C)]
    assert len(big) == 2, lines  # the logits and the target: both arguments
    assert all("from the argument" in line for line in big)


def test_kdim_axis1_keeps_no_transposed_copy():
    x = jnp.ones((2, 50, 3, 4), jnp.float32)
    t = jnp.zeros((2, 3, 4), jnp.int32)
    lines = _residuals(lambda x: jaxce.cross_entropy(x, t, axis=1, label_smoothing=0.2), x)
    big = [line for line in lines if _shape(line) is not None and len(_shape(line)) == 4]
    assert len(big) == 1, lines
    assert "from the argument" in big[0]


# (logits shape, where shape): integer labels have the batch shape; probability labels
# come in these shapes too (None: the logits').
DROP_IN_SHAPES = [((16, 1000), None), ((4, 8, 1000), None), ((16, 1000), (16, 1)),
                  ((4, 8, 1000), (4, 8, 1))]  # fmt: skip
PROB_LABEL_SHAPES = {(16, 1000): [None, (1000,), (16, 1)], (4, 8, 1000): [None, (8, 1000)]}


@pytest.mark.parametrize(
    ("integer", "shape", "labels_shape", "where_shape"),
    [(True, s, None, m) for s, m in DROP_IN_SHAPES]
    + [(False, s, t, m) for s, m in DROP_IN_SHAPES for t in PROB_LABEL_SHAPES[s]],
)
def test_optax_drop_ins_keep_no_logits_sized_residual(integer, shape, labels_shape, where_shape):
    """The optax drop-ins save nothing logits-sized but the logits argument: a mask constant
    along the classes is a row mask, and broadcast probability labels stay unbroadcast."""
    rng = np.random.default_rng(0)
    x = jnp.ones(shape, jnp.float32)
    if integer:
        loss = jaxce.softmax_cross_entropy_with_integer_labels
        labels = jnp.zeros(shape[:-1], jnp.int32)  # integer labels: the batch shape
    else:
        loss = jaxce.softmax_cross_entropy
        labels = jnp.asarray(rng.random(labels_shape or shape), jnp.float32)
    where = None if where_shape is None else jnp.asarray(rng.random(where_shape) > 0.3)
    lines = _residuals(lambda x: jnp.sum(loss(x, labels, where=where)), x)
    big = [line for line in lines if _shape(line) == shape]
    assert len([line for line in big if "from the argument" in line]) == 1, lines
    # Full-shaped labels are closed over: listed "from a constant", not made by the loss.
    assert all("from the argument" in line or "from a constant" in line for line in big), lines
