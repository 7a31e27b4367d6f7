"""Options beyond PyTorch: ``where``, ``z_loss``, ``logit_softcap``, ``return_aux``.

References are the plain formulas of ``tests/reference.py`` in float64, differentiated by
autodiff; the fused linear loss is checked against them through ``hidden @ kernel``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import DENSE_IMPLEMENTATIONS, entry_points
from reference import plain_cross_entropy

import jaxce
from parity.compare import compare

N, C = 12, 9
IGNORE = -100


def _data(seed=0, axis=-1, prob=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C)) * 3
    t = rng.integers(0, C, N)
    t[::5] = IGNORE
    w = rng.uniform(0.5, 2.0, C)
    mask = rng.random(N) > 0.3
    if prob:
        t = rng.random((N, C))
        t = t / t.sum(-1, keepdims=True)
    if axis == 0:
        x = x.T
        t = t.T if prob else t
    return jnp.asarray(x), jnp.asarray(t), jnp.asarray(w), jnp.asarray(mask)


def plain_loss(x, t, w, eps, reduction, *, mask=None, z=0.0, cap=None, axis=-1, prob=False):
    """:func:`reference.plain_cross_entropy` in this file's argument names (``prob``: ``t``
    holds probabilities; the reference tells by the shape)."""
    assert prob == (t.shape == x.shape)
    return plain_cross_entropy(
        x, t, w, IGNORE, reduction, eps, axis, where=mask, z_loss=z, logit_softcap=cap
    )


OPTION_SETS = {
    "where": {"mask": True},
    "z_loss": {"z": 1e-2},
    "softcap": {"cap": 2.5},
    "all": {"mask": True, "z": 1e-2, "cap": 2.5},
}


def _kwargs(options, mask):
    out = {}
    if options.get("mask"):
        out["where"] = mask
    if "z" in options:
        out["z_loss"] = options["z"]
    if "cap" in options:
        out["logit_softcap"] = options["cap"]
    return out


def _ref_kwargs(options, mask):
    return {
        "mask": mask if options.get("mask") else None,
        "z": options.get("z", 0.0),
        "cap": options.get("cap"),
    }


# Every option set with 'mean' (the weighted denominator); all options together with the
# other reductions.
@pytest.mark.parametrize(
    ("options", "reduction"),
    [(name, "mean") for name in OPTION_SETS] + [("all", "none"), ("all", "sum")],
)
@pytest.mark.parametrize(
    ("prob", "weighted", "eps", "axis"),
    [
        (False, False, 0.0, -1),
        (False, True, 0.1, -1),
        (False, True, 0.1, 0),
        (True, False, 0.0, -1),
        (True, True, 0.2, 0),
    ],
)
def test_cross_entropy_options_match_plain_formula(options, reduction, prob, weighted, eps, axis):
    x, t, w, mask = _data(axis=axis, prob=prob)
    w = w if weighted else None
    opts = OPTION_SETS[options]
    kw, rk = _kwargs(opts, mask), _ref_kwargs(opts, mask)

    def ours(x, t, w):
        out = jaxce.cross_entropy(
            x, t, w, IGNORE if not prob else -100, reduction, eps, axis=axis, **kw
        )
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

    def ref(x, t, w):
        out = plain_loss(x, t, w, eps, reduction, axis=axis, prob=prob, **rk)
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

    argnums = (0, 1) if prob else (0,)
    argnums += (2,) if weighted else ()
    value, grads = jax.jit(jax.value_and_grad(ours, argnums))(x, t, w)
    ref_value, ref_grads = jax.value_and_grad(ref, argnums)(x, t, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prob", [False, True])
def test_options_second_order_matches_plain_formula(prob):
    x, t, w, mask = _data(seed=3, prob=prob)
    opts = OPTION_SETS["all"]
    kw, rk = _kwargs(opts, mask), _ref_kwargs(opts, mask)
    v = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape))

    def hvp(f):
        return jax.jvp(jax.grad(f), (x,), (v,))[1]

    ours = hvp(lambda x: jaxce.cross_entropy(x, t, w, label_smoothing=0.1, **kw))
    ref = hvp(lambda x: plain_loss(x, t, w, 0.1, "mean", prob=prob, **rk))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_options_match_plain_formula(options, reduction):
    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((N, 6)))
    k = jnp.asarray(rng.standard_normal((6, 50)))
    b = jnp.asarray(rng.standard_normal(50))
    w = jnp.asarray(rng.uniform(0.5, 2.0, 50))
    t = jnp.asarray(rng.integers(0, 50, N)).at[::4].set(IGNORE)
    mask = jnp.asarray(rng.random(N) > 0.3)
    opts = OPTION_SETS[options]
    kw, rk = _kwargs(opts, mask), _ref_kwargs(opts, mask)
    ct = jnp.arange(1.0, N + 1) if reduction == "none" else 1.0

    def ours(h, k, b, w):
        out = jaxce.linear_cross_entropy(
            h, k, t, w, reduction=reduction, label_smoothing=0.1, bias=b, chunk_size=16, **kw
        )
        return jnp.sum(out * ct)

    def ref(h, k, b, w):
        return jnp.sum(plain_loss(h @ k + b[None, :], t, w, 0.1, reduction, **rk) * ct)

    value, grads = jax.value_and_grad(ours, (0, 1, 2, 3))(h, k, b, w)
    ref_value, ref_grads = jax.value_and_grad(ref, (0, 1, 2, 3))(h, k, b, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    if options == "all":  # second order through the chunked passes
        v = (jnp.ones_like(h), jnp.ones_like(k))

        def hvp(f):
            return jax.jvp(lambda h, k: jax.grad(f, (0, 1))(h, k, b, w), (h, k), v)[1]

        for a, r in zip(hvp(ours), hvp(ref), strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-11)


def test_where_combines_with_ignore_index_and_accepts_any_masked_value():
    x, t, w, mask = _data(seed=6)
    # Masked positions may hold anything, even an out-of-range class: they are ignored.
    bad = jnp.where(mask, t, 10_000)
    out = jaxce.cross_entropy(x, bad, w, where=mask, reduction="none")
    expected = plain_loss(x, t, w, 0.0, "none", mask=mask)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert np.all(np.asarray(out)[~np.asarray(mask)] == 0)
    # uint8 targets with the default ignore_index (-100 does not fit uint8).
    small = jnp.asarray(np.asarray(jnp.where(t < 0, 0, t)), jnp.uint8)
    np.testing.assert_allclose(
        jaxce.cross_entropy(x, small, where=mask),
        plain_loss(x, jnp.where(t < 0, 0, t), None, 0.0, "mean", mask=mask),
        rtol=1e-12,
    )


def test_all_masked_mean_is_nan_like_all_ignored():
    x, t, _, _ = _data()
    none = jnp.zeros((N,), bool)
    assert np.isnan(jaxce.cross_entropy(x, t, where=none))
    assert np.isnan(jaxce.cross_entropy(x, jax.nn.softmax(x), where=none))


@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_aux_outputs(prob, reduction):
    x, t, w, mask = _data(seed=7, prob=prob)
    x = x.at[0].set(0.0)  # a row of ties: argmax is the first class
    z, cap = 1e-2, 2.5
    loss, aux = jaxce.cross_entropy(
        x, t, w, reduction=reduction, where=mask, z_loss=z, logit_softcap=cap, return_aux=True
    )
    capped = cap * jnp.tanh(x / cap)
    lse = jax.nn.logsumexp(capped, axis=-1)
    np.testing.assert_allclose(aux.lse, lse, rtol=1e-12)
    counted = mask if prob else mask & (t != IGNORE)
    weight_n = jnp.ones(N) if prob else w[jnp.where(t < 0, 0, t)]
    denominator = jnp.sum(jnp.where(counted, weight_n, 0.0))
    np.testing.assert_allclose(aux.denominator, denominator, rtol=1e-12)
    count = int(np.sum(counted))
    assert float(aux.count) == count
    assert aux.count.dtype == aux.denominator.dtype
    assert aux.correct.dtype == jnp.int32
    target_class = jnp.argmax(t, -1) if prob else t
    hits = counted & (jnp.argmax(x, -1) == target_class)
    assert int(aux.correct) == int(jnp.sum(hits))
    np.testing.assert_array_equal(aux.predicted, jnp.where(counted, jnp.argmax(x, -1), -1))
    assert aux.predicted.dtype == jnp.int32
    expected_accuracy = hits.astype(float) if reduction == "none" else jnp.sum(hits) / count
    np.testing.assert_allclose(aux.accuracy, expected_accuracy, rtol=1e-15)
    z_el = jnp.where(counted, z * lse**2, 0.0)
    z_red = {"none": z_el, "sum": jnp.sum(z_el), "mean": jnp.sum(z_el) / count}[reduction]
    np.testing.assert_allclose(aux.z_loss, z_red, rtol=1e-12)
    # The loss minus the z-loss part is the cross-entropy alone.
    ce_only = jaxce.cross_entropy(x, t, w, reduction=reduction, where=mask, logit_softcap=cap)
    np.testing.assert_allclose(loss - aux.z_loss, ce_only, rtol=1e-10, atol=1e-13)


def test_aux_lse_and_z_loss_are_differentiable_the_counts_are_not():
    x, t, w, mask = _data(seed=11)
    cotangent = jnp.asarray(np.random.default_rng(11).standard_normal(N))

    def lse_penalty(x):  # a penalty of one's own on the log-sum-exp (as CCE's return_lse)
        _, aux = jaxce.cross_entropy(x, t, w, where=mask, logit_softcap=2.0, return_aux=True)
        return jnp.sum(aux.lse * cotangent)

    def lse_plain(x):
        return jnp.sum(jax.nn.logsumexp(2.0 * jnp.tanh(x / 2.0), axis=-1) * cotangent)

    np.testing.assert_allclose(jax.grad(lse_penalty)(x), jax.grad(lse_plain)(x), rtol=1e-12)

    def z_part(x):
        return jaxce.cross_entropy(x, t, w, where=mask, z_loss=0.1, return_aux=True)[1].z_loss

    def z_plain(x):
        return plain_loss(x, t, w, 0.0, "mean", mask=mask, z=0.1) - plain_loss(
            x, t, w, 0.0, "mean", mask=mask
        )

    np.testing.assert_allclose(jax.grad(z_part)(x), jax.grad(z_plain)(x), rtol=1e-10, atol=1e-15)

    def counts(x):
        _, aux = jaxce.cross_entropy(x, t, w, return_aux=True)
        return aux.denominator + aux.count + aux.correct.astype(x.dtype) + jnp.sum(aux.accuracy)

    np.testing.assert_array_equal(jax.grad(counts)(x), jnp.zeros_like(x))


@pytest.mark.parametrize(
    "weight", [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.2, -0.5, 1.0], [0.0, 0.0, 3.0]]
)
@pytest.mark.parametrize("fused", [False, True])
def test_z_loss_mean_ignores_the_class_weights(weight, fused):
    """PaLM / t5x / Liger-Kernel: the 'mean' z-term is z · Σ lse² / count, whatever the
    weights' scale or sign (a weighted denominator made it a reward for signed weights)."""
    x = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, -1.0, 3.0]])
    y = jnp.asarray([0, 1, IGNORE])
    w, z = jnp.asarray(weight), 1e-2
    if fused:
        h, k = x, jnp.eye(3)  # hidden @ I: the same logits through the fused loss
        _, aux = jaxce.linear_cross_entropy(h, k, y, w, z_loss=z, return_aux=True)
    else:
        _, aux = jaxce.cross_entropy(x, y, w, z_loss=z, return_aux=True)
    lse = jax.nn.logsumexp(x[:2], axis=-1)  # the two counted rows
    np.testing.assert_allclose(aux.z_loss, z * jnp.mean(lse**2), rtol=1e-12)
    assert float(aux.count) == 2


def test_linear_aux_matches_cross_entropy_aux():
    rng = np.random.default_rng(8)
    h = jnp.asarray(rng.standard_normal((N, 6)))
    k = jnp.asarray(rng.standard_normal((6, 50)))
    t = jnp.asarray(rng.integers(0, 50, N)).at[::4].set(IGNORE)
    k = k.at[:, 7].set(k[:, 3])  # duplicate columns: argmax ties resolve to the first
    mask = jnp.asarray(rng.random(N) > 0.3)
    options = {"where": mask, "z_loss": 1e-3, "logit_softcap": 4.0, "return_aux": True}
    for reduction in ("none", "mean"):
        ours = jaxce.linear_cross_entropy(h, k, t, reduction=reduction, chunk_size=16, **options)
        ref = jaxce.cross_entropy(h @ k, t, reduction=reduction, **options)
        for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_accumulation_recipe_is_exact(fused):
    """Micro-batches of reduction='sum' losses give the big-batch mean exactly: the
    cross-entropy (loss - aux.z_loss) over the summed denominators plus the z-loss over
    the summed counts."""
    rng = np.random.default_rng(9)
    h = jnp.asarray(rng.standard_normal((24, 6)))
    k = jnp.asarray(rng.standard_normal((6, 40)))
    t = jnp.asarray(rng.integers(0, 40, 24)).at[::3].set(IGNORE)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 40))
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}

    def loss(k, h, t, reduction):
        if fused:
            return jaxce.linear_cross_entropy(
                h, k, t, w, reduction=reduction, return_aux=True, **options
            )
        return jaxce.cross_entropy(h @ k, t, w, reduction=reduction, return_aux=True, **options)

    def big(k):
        return loss(k, h, t, "mean")[0]

    def accumulated(k):
        ce, z, denominator, count = 0.0, 0.0, 0.0, 0.0
        for part in range(3):  # micro-batches of 8 tokens
            rows = slice(8 * part, 8 * part + 8)
            value, aux = loss(k, h[rows], t[rows], "sum")
            ce, z = ce + (value - aux.z_loss), z + aux.z_loss
            denominator, count = denominator + aux.denominator, count + aux.count
        return ce / denominator + z / count

    np.testing.assert_allclose(accumulated(k), big(k), rtol=1e-13)
    np.testing.assert_allclose(jax.grad(accumulated)(k), jax.grad(big)(k), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_softcap_and_z_loss_low_precision_close_to_float64(dtype):
    x, t, w, mask = _data(seed=10)
    x = (x * 10).astype(dtype)  # large logits: the cap matters
    kw = {"where": mask, "z_loss": 1e-3, "logit_softcap": 15.0}
    rk = {"mask": mask, "z": 1e-3, "cap": 15.0}
    value, grad = jax.value_and_grad(lambda x: jaxce.cross_entropy(x, t, w, **kw))(x)
    x64 = x.astype(jnp.float64)
    ref_value, ref_grad = jax.value_and_grad(lambda x: plain_loss(x, t, w, 0.0, "mean", **rk))(x64)
    assert value.dtype == dtype
    assert grad.dtype == dtype
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}[dtype]
    np.testing.assert_allclose(np.float64(value), ref_value, rtol=tol)
    scale = float(jnp.max(jnp.abs(ref_grad)))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, atol=tol * scale)


def test_out_of_range_target_with_options_is_nan_under_jit():
    x, t, w, mask = _data()
    bad = t.at[1].set(C + 3)
    f = jax.jit(lambda x, t: jaxce.cross_entropy(x, t, w, where=mask.at[1].set(True), z_loss=1e-2))
    assert np.isnan(f(x, bad))
    assert np.all(np.isnan(jax.grad(f)(x, bad)[1]))


@pytest.mark.torch
@pytest.mark.parametrize("implementation", DENSE_IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softcap_matches_torch_on_capped_logits(eps, dtype, implementation):
    """The Gemma 2 recipe in PyTorch: cross_entropy(cap * tanh(logits / cap)), under every
    implementation of a dense loss (tests/cases.py; XLA:GPU respells the capped bfloat16
    backward pass)."""
    torch = pytest.importorskip("torch")
    x, t, w, _ = _data(seed=11)
    x = x * 20
    cap = 30.0

    def jax_fn(input, target, weight):
        return jaxce.cross_entropy(
            input, target, weight, IGNORE, label_smoothing=eps, logit_softcap=cap,
            implementation=implementation,
        )  # fmt: skip

    def torch_fn(input, target, weight):
        return torch.nn.functional.cross_entropy(
            cap * torch.tanh(input / cap), target, weight, ignore_index=IGNORE, label_smoothing=eps
        )

    inputs = {"input": np.asarray(x), "target": np.asarray(t), "weight": np.asarray(w)}
    tolerance = (1e-10, 1e-14) if dtype == "float64" else None  # bfloat16: the three-way rule
    result = compare(jax_fn, torch_fn, inputs, ("input",), dtype, "jit", tolerance=tolerance)
    assert result.passed, result.message
    assert result.checks[0].name == "output"
    if dtype == "float64":
        assert result.checks[0].max_rel <= 1e-12  # the value to rtol 1e-12


def test_module_form_takes_the_options():
    x, t, w, mask = _data(seed=12)
    loss_fn = jaxce.CrossEntropyLoss(w, z_loss=1e-3, logit_softcap=2.5)
    np.testing.assert_allclose(
        loss_fn(x, t, where=mask),
        plain_loss(x, t, w, 0.0, "mean", mask=mask, z=1e-3, cap=2.5),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="logit_softcap must be a positive finite float"):
        jaxce.CrossEntropyLoss(logit_softcap=-2.0)
    with pytest.raises(ValueError, match="z_loss must be a finite float >= 0"):
        jaxce.CrossEntropyLoss(z_loss=-1.0)


@pytest.mark.parametrize("entry", list(entry_points()))
def test_loss_dtype_float32_keeps_a_16_bit_loss_unrounded(entry):
    rng = np.random.default_rng(12)
    x64 = rng.standard_normal((N, C)) * 4
    t = jnp.asarray(rng.integers(0, C, N))
    x = jnp.asarray(x64, jnp.bfloat16)
    fn = entry_points()[entry]
    default = fn(x, t)
    wide = fn(x, t, loss_dtype=jnp.float32)
    assert default.dtype == jnp.bfloat16
    assert wide.dtype == jnp.float32
    # The same float32 computation, rounded once less: float64 of the bf16 logits agrees
    # to float32 accuracy, the default only to bfloat16's.
    exact = plain_loss(jnp.asarray(np.asarray(x, np.float64)), t, None, 0.0, "mean")
    np.testing.assert_allclose(wide, exact, rtol=2e-6)
    assert abs(float(default) - float(exact)) >= abs(float(wide) - float(exact))
    # The gradient keeps the logits' dtype.
    grad = jax.grad(lambda x: fn(x, t, loss_dtype=jnp.float32))(x)
    assert grad.dtype == jnp.bfloat16
