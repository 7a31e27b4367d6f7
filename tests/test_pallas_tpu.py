"""``implementation="pallas_tpu"``: the fused loss's Pallas kernels (``jaxce/_backends/
pallas_tpu.py``), executed on this CPU in Pallas's interpret mode under ``jax.jit``.

Each case runs ``strategy="min_memory"`` (the strategy whose chunk steps the kernels
spell) against the float64 reference of the materialised logits, checks that the kernels
ran (a count of their ``pallas_call``\\ s while tracing), and, for the options the kernels
do not cover, that the program falls back to the TPU's XLA passes with the same values.
Compiled by the TPU compiler (deviceless, v5e / v5p / v6e, single chip and 2 x 2 v5p):
``tests/test_budgets.py``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid, weighted_sum
from reference import plain_cross_entropy

import jaxce
from jaxce._backends import pallas_tpu
from parity.compare import ROUNDOFF
from parity.grid import rng_for


@pytest.fixture
def kernel_calls(monkeypatch):
    r"""{"stats": [w, ...], "grad": [w, ...]}: the column width of each of the kernels'
    ``pallas_call``\ s traced so far."""
    calls = {"stats": [], "grad": []}
    for name, key in (("_stats_pallas", "stats"), ("_grad_pallas", "grad")):
        original = getattr(pallas_tpu, name)

        def counted(hidden, kernel_c, *args, _original=original, _key=key, **kwargs):
            calls[_key].append(kernel_c.shape[1])
            return _original(hidden, kernel_c, *args, **kwargs)

        monkeypatch.setattr(pallas_tpu, name, counted)
    return calls


def _inputs(label, n, d, v, dtype):
    rng = rng_for("pallas_tpu", label)
    h = np.asarray(jnp.asarray(rng.standard_normal((n, d)), dtype).astype(jnp.float64))
    k = rng.standard_normal((d, v)) * 2 * d**-0.5
    k = np.asarray(jnp.asarray(k, dtype).astype(jnp.float64))
    b = np.asarray(jnp.asarray(rng.standard_normal(v) * 0.5, jnp.float32).astype(jnp.float64))
    w = rng.uniform(0.5, 2.0, v)
    y = rng.integers(0, v, n)
    y[n // 3] = -100
    return h, k, b, w, y


OPTIONS = {
    "plain": {},
    "weight-smoothing": {"weight": True, "label_smoothing": 0.1},
    "bias-softcap-zloss": {"bias": True, "logit_softcap": 4.0, "z_loss": 1e-2},
    "everything-sum": dict(
        weight=True,
        label_smoothing=0.2,
        bias=True,
        logit_softcap=3.0,
        z_loss=1e-3,
        reduction="sum",
    ),
    "none": {"reduction": "none", "label_smoothing": 0.1},
}


# (n, d, v, chunk_size): several token tiles and chunks with a remainder (40 rows: five
# 8-row tiles; 517 classes in 128-column chunks); one tile of a token count that is not a
# multiple of 8 (13, the whole tile); a chunk and a remainder.
SHAPES = {
    "tiles": (40, 64, 517, 128),
    "odd-rows": (13, 32, 300, 128),
    "two-chunks": (24, 32, 300, 256),
}


@pytest.mark.parametrize(
    ("option", "shape", "dtype"),
    covering_grid(list(OPTIONS), list(SHAPES), ["float32", "bfloat16"]),
)
def test_kernels_match_float64_reference(kernel_calls, option, shape, dtype):
    n, d, v, chunk = SHAPES[shape]
    h, k, b, w, y = _inputs(option + shape, n, d, v, dtype)
    opts = dict(OPTIONS[option])
    reduction = opts.pop("reduction", "mean")
    use_w, use_b = opts.pop("weight", False), opts.pop("bias", False)
    cap, z = opts.pop("logit_softcap", None), opts.pop("z_loss", 0.0)
    eps = opts.pop("label_smoothing", 0.0)

    def ours(h, k, b):
        loss = jaxce.linear_cross_entropy(
            h, k, jnp.asarray(y), jnp.asarray(w) if use_w else None, reduction=reduction,
            label_smoothing=eps, bias=b if use_b else None, chunk_size=chunk,
            logit_softcap=cap, z_loss=z, loss_dtype=jnp.float32, strategy="min_memory",
            implementation="pallas_tpu",
        )  # fmt: skip
        return weighted_sum(loss)

    def reference(h, k, b):
        loss = plain_cross_entropy(
            h @ k + (b[None, :] if use_b else 0), jnp.asarray(y),
            jnp.asarray(w) if use_w else None, reduction=reduction, label_smoothing=eps,
            z_loss=z, logit_softcap=cap,
        )  # fmt: skip
        return weighted_sum(loss) if reduction == "none" else loss

    args = (jnp.asarray(h, dtype), jnp.asarray(k, dtype), jnp.asarray(b, jnp.float32))
    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))(*args)
    assert kernel_calls["stats"]
    assert kernel_calls["grad"]
    ref_value, ref_grads = jax.value_and_grad(reference, (0, 1, 2))(
        jnp.asarray(h), jnp.asarray(k), jnp.asarray(b)
    )
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    names = ("hidden", "kernel", "bias") if use_b else ("hidden", "kernel")
    for g, r, arg, name in zip(grads, ref_grads, args, names, strict=False):
        assert g.dtype == arg.dtype, name
        rtol = 2e-5 if dtype == "float32" else 4 * ROUNDOFF[dtype]
        r = np.asarray(r)
        np.testing.assert_allclose(
            np.asarray(g.astype(jnp.float64)), r, rtol=rtol, atol=rtol * np.max(np.abs(r)),
            err_msg=name,
        )  # fmt: skip


def _both(loss, *args):
    """``jit(value_and_grad(loss))`` under implementation "xla_tpu" and "pallas_tpu"."""
    return [
        jax.jit(jax.value_and_grad(partial(loss, implementation=impl), (0, 1)))(*args)
        for impl in ("xla_tpu", "pallas_tpu")
    ]


FALLBACKS = {
    "class probabilities": dict(probs=True),
    "temperature": dict(temperature=1.5),
    "entropy": dict(return_entropy=True, return_aux=True),
    "no token tile (1001 rows)": dict(n=1001),
    "min_work": dict(strategy="min_work"),
    # Mosaic rejects the kernels' float16 loads (test_budgets compiles it for TPU).
    "float16": dict(dtype="float16"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_uncovered_options_run_the_tpu_xla_passes(kernel_calls, case):
    opts = dict(FALLBACKS[case])
    n = opts.pop("n", 24)
    probs = opts.pop("probs", False)
    strategy = opts.pop("strategy", "min_memory")
    dtype = opts.pop("dtype", "float32")
    h, k, _, _, y = _inputs(case, n, 16, 300, "float32")
    h, k = jnp.asarray(h, dtype), jnp.asarray(k, dtype)
    target = jnp.asarray(y % 300)
    if probs:
        target = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).standard_normal((n, 300))))

    def loss(h, k, implementation):
        out = jaxce.linear_cross_entropy(
            h, k, target, chunk_size=128, strategy=strategy, implementation=implementation,
            **opts,
        )  # fmt: skip
        return out[0] + jnp.sum(out[1].entropy) if isinstance(out, tuple) else out

    (v_xla, g_xla), (v_pl, g_pl) = _both(loss, h, k)
    assert kernel_calls == {"stats": [], "grad": []}
    np.testing.assert_array_equal(v_pl, v_xla)  # the same program
    for a, b in zip(g_pl, g_xla, strict=True):
        np.testing.assert_array_equal(a, b)


def test_forward_mode_and_second_order_take_the_portable_derivatives():
    # The kernels are spellings: their derivatives are the portable passes' (forward mode,
    # the Hessian-vector product through the backward kernel), equal to xla_tpu's to
    # rounding.
    h, k, _, _, y = _inputs("hvp", 24, 16, 300, "float32")
    h, k = jnp.asarray(h, jnp.float32), jnp.asarray(k, jnp.float32)
    rng = np.random.default_rng(1)
    th, tk = (jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in (h, k))

    def loss(h, k, implementation):
        return jaxce.linear_cross_entropy(
            h, k, jnp.asarray(y), label_smoothing=0.1, chunk_size=128, strategy="min_memory",
            implementation=implementation,
        )  # fmt: skip

    def hvp(implementation):
        grad = jax.grad(lambda h, k: loss(h, k, implementation), (0, 1))
        return jax.jit(lambda: jax.jvp(grad, (h, k), (th, tk)))()

    def jvp(implementation):
        return jax.jit(lambda: jax.jvp(lambda h, k: loss(h, k, implementation), (h, k), (th, tk)))()

    for ours, theirs in ((jvp("pallas_tpu"), jvp("xla_tpu")), (hvp("pallas_tpu"), hvp("xla_tpu"))):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))


def test_a_chunk_wider_than_the_vmem_budget_runs_in_column_blocks(kernel_calls, monkeypatch):
    # With room for 128 columns only, each 384-column chunk runs as three pallas_calls per
    # kernel; the values do not change.
    n, d, v = 16, 32, 768
    assert pallas_tpu.plan(n, d, 384, 4) == (16, 384)
    budget = pallas_tpu.vmem_bytes(16, d, 128, 4)  # the backward kernel's, 128 columns
    monkeypatch.setattr(pallas_tpu, "VMEM_BYTES", budget)
    assert pallas_tpu.plan(n, d, 384, 4) == (16, 128)
    h, k, _, _, y = _inputs("blocks", n, d, v, "float32")

    def loss(h, k, implementation):
        return jaxce.linear_cross_entropy(
            h, k, jnp.asarray(y), chunk_size=384, strategy="min_memory",
            implementation=implementation,
        )  # fmt: skip

    (v_xla, g_xla), (v_pl, g_pl) = _both(
        loss, jnp.asarray(h, jnp.float32), jnp.asarray(k, jnp.float32)
    )
    # Each 384-column chunk in 128-column blocks (and 384 columns without the budget).
    assert set(kernel_calls["stats"]) == set(kernel_calls["grad"]) == {128}
    np.testing.assert_allclose(v_pl, v_xla, rtol=1e-6)
    for a, b in zip(g_pl, g_xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize(
    ("n", "d", "width", "itemsize", "want"),
    [
        # 16384 x 4096 bf16, 1,024-column chunks: the backward kernel at 256 rows is
        # 4096·1024·(2·2 + 4) + 256·4096·(2·2 + 16) + 16·256·1024 + 1 MiB = 57 MiB <= 60;
        # at 512 rows 81 MiB.
        (16384, 4096, 1024, 2, (256, 1024)),
        # float32: 4096·1024·12 + 128·4096·24 + ... = 62 MiB > 60 at 1,024 columns; 896
        # columns at 128 rows: 42 + 12 + 1.75 + 1 = 56.75 MiB.
        (16384, 4096, 1024, 4, (128, 896)),
        # Small: the largest tile dividing 40 (8), the whole chunk.
        (40, 64, 128, 4, (8, 128)),
        # 13 rows: no tile of TILES divides it, the whole 13 rows are one tile.
        (13, 32, 128, 4, (13, 128)),
        # 1001 rows: no tile divides it and it is over 512 rows: not covered.
        (1001, 32, 128, 4, None),
    ],
)
def test_plan_picks_the_widest_block_and_largest_tile_within_vmem(n, d, width, itemsize, want):
    assert pallas_tpu.plan(n, d, width, itemsize) == want
    if want is not None:
        tn, block = want
        assert n % tn == 0
        assert pallas_tpu.vmem_bytes(tn, d, block, itemsize) <= pallas_tpu.VMEM_BYTES
