"""Forward mode and second order through the lean losses, against autodiff of the plain
formula (float64): jvp, linearize, jacfwd, jacrev(jacfwd), hessian, grad-of-grad and
Hessian-vector products, for cross_entropy (index and probability targets) and
linear_cross_entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import plain_cross_entropy

import jaxce
from jaxce._derivatives import linear_map
from parity.grid import class_weight, index_target, prob_target, random_logits, rng_for

RTOL, ATOL = 1e-9, 1e-11

# linearize is the jvp's machinery with the linear map staged out: tested once per loss
# below rather than across the whole grid.
TRANSFORMS = ["jvp", "jacfwd", "jacrev_jacfwd", "hessian", "grad_grad", "hvp"]
# The full second-order set compiles slowly: every case gets the cheap transforms, the
# cases marked ``full`` below get all of them.
CHEAP = ["jvp", "hvp"]


def _grid(cases, full, transforms=TRANSFORMS, slow=()):
    """(case..., transform) rows: every transform for the names in ``full``, else CHEAP;
    the names in ``slow`` get every transform too, marked slow (run with ``-m ""``)."""
    rows = []
    for c in cases:
        name = f"{c[0]}-{c[-1]}"
        for t in transforms:
            if t in CHEAP or name in full:
                rows.append(pytest.param(*c, t, id=f"{name}-{t}"))
            elif name in slow:
                rows.append(pytest.param(*c, t, id=f"{name}-{t}", marks=pytest.mark.slow))
    return rows


def _random_like(rng, tree):
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


def _apply(transform, f, primals, rng):
    """Runs ``transform`` on ``f(*primals)`` (any output shape) with random directions."""
    out = jax.eval_shape(f, *primals)
    cot = jnp.asarray(rng.standard_normal(out.shape))
    argnums = tuple(range(len(primals)))

    def scalar(*p):
        return jnp.sum(f(*p) * cot)

    v = _random_like(rng, primals)
    if transform == "jvp":
        return jax.jvp(f, primals, v)
    if transform == "linearize":
        y, f_lin = jax.linearize(f, *primals)
        return y, f_lin(*v)
    if transform == "jacfwd":
        return jax.jacfwd(f, argnums)(*primals)
    if transform == "jacrev_jacfwd":
        return jax.jacrev(jax.jacfwd(scalar, argnums), argnums)(*primals)
    if transform == "hessian":
        return jax.hessian(scalar, argnums)(*primals)
    if transform == "grad_grad":
        u = _random_like(rng, primals)

        def inner(*p):
            g = jax.grad(scalar, argnums)(*p)
            return sum(jnp.vdot(a, b) ** 2 for a, b in zip(g, u, strict=True))

        return jax.grad(inner, argnums)(*primals)
    if transform == "hvp":
        return jax.jvp(jax.grad(scalar, argnums), primals, v)
    raise ValueError(transform)


def _check(transform, ours, plain, primals, seed):
    # Under jax.jit (the primals as arguments, the random directions as constants): traced
    # and compiled once, not dispatched op by op. linearize stays eager: its point is the
    # linear map staged out of the trace, called afterwards.
    def run(f):
        if transform == "linearize":
            return _apply(transform, f, primals, rng_for(seed))
        return jax.jit(lambda *p: _apply(transform, f, p, rng_for(seed)))(*primals)

    a, b = run(ours), run(plain)
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.all(np.isfinite(np.asarray(y)))
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


INDEX_CASES = [
    # (name, shape, axis, weight, ignore, eps)
    ("NC", (4, 5), -1, "none", "absent", None),
    ("NC_w_eps", (4, 5), -1, "random", "present", 0.1),
    ("NCd_eps", (2, 5, 3), 1, "none", "present", 0.2),
    ("C_w", (5,), -1, "random", "absent", None),
    ("CN_axis0_w_eps", (5, 3), 0, "some-zero", "valid-class", 0.05),
]


INDEX_GRID = [(*c, "mean") for c in INDEX_CASES] + [
    (*INDEX_CASES[1], "none"),
    (*INDEX_CASES[1], "sum"),
]


@pytest.mark.parametrize(
    ("name", "shape", "axis", "weight_mode", "ignore_mode", "eps", "reduction", "transform"),
    _grid(INDEX_GRID, {"NC_w_eps-mean"}, slow={"CN_axis0_w_eps-mean"}),
)
def test_index_target(name, shape, axis, weight_mode, ignore_mode, eps, reduction, transform):
    rng = rng_for("ho-index", name)
    x = jnp.asarray(random_logits(rng, shape))
    target, ii = index_target(rng, shape, axis, ignore_mode)
    target = np.array(target)
    target.flat[-1] = 1  # at least one counted element of nonzero weight: a finite mean
    target = jnp.asarray(target)
    weight = class_weight(rng, weight_mode, shape[axis])
    kw = dict(ignore_index=ii, reduction=reduction, axis=axis)
    # Differentiate with respect to every float input: logits, weight, smoothing.
    primals = [x]
    if weight is not None:
        primals.append(jnp.asarray(weight))
    if eps is not None:
        primals.append(jnp.asarray(eps))

    def split(p):
        w = p[1] if weight is not None else None
        e = p[-1] if eps is not None else 0.0
        return w, e

    def ours(*p):
        w, e = split(p)
        return jaxce.cross_entropy(p[0], target, w, label_smoothing=e, **kw)

    def plain(*p):
        w, e = split(p)
        return plain_cross_entropy(p[0], target, w, label_smoothing=e, **kw)

    _check(transform, ours, plain, tuple(primals), (name, reduction, transform))


@pytest.mark.parametrize("transform", ["jvp", "hvp", "hessian", "grad_grad"])
def test_index_target_rows_at_the_edges_of_the_lse_range(transform):
    # Row 1's target sits 800 below its max (exp(800) overflows float64), row 2 is
    # ignored with its placeholder class 0 at -1000: derivatives of every order stay
    # finite and match the plain formula.
    rng = rng_for("ho-fallback")
    x = random_logits(rng, (4, 5))
    x[1, 3] = 800.0
    x[2, 0] = -1000.0
    x = jnp.asarray(x)
    target = jnp.asarray([2, 0, -100, 4])
    weight = jnp.asarray(class_weight(rng, "random", 5))
    eps = jnp.asarray(0.1)

    def ours(x, w, e):
        return jaxce.cross_entropy(x, target, w, label_smoothing=e, reduction="sum")

    def plain(x, w, e):
        return plain_cross_entropy(x, target, w, label_smoothing=e, reduction="sum")

    _check(transform, ours, plain, (x, weight, eps), ("fallback", transform))


PROB_GRID = [
    ("NC", (4, 5), -1, False, None, "mean"),
    ("NCd_w_eps", (2, 5, 3), 1, True, 0.1, "none"),
]


@pytest.mark.parametrize(
    ("name", "shape", "axis", "weighted", "eps", "reduction", "transform"),
    _grid(PROB_GRID, {"NCd_w_eps-none"}),
)
def test_prob_target(name, shape, axis, weighted, eps, reduction, transform):
    rng = rng_for("ho-prob", shape)
    x = jnp.asarray(random_logits(rng, shape))
    t = jnp.asarray(prob_target(rng, shape, axis))
    primals = [x, t]
    if weighted:
        primals.append(jnp.asarray(class_weight(rng, "random", shape[axis])))
    if eps is not None:
        primals.append(jnp.asarray(eps))

    def split(p):
        w = p[2] if weighted else None
        e = p[-1] if eps is not None else 0.0
        return w, e

    def ours(*p):
        w, e = split(p)
        return jaxce.cross_entropy(p[0], p[1], w, reduction=reduction, label_smoothing=e, axis=axis)

    def plain(*p):
        w, e = split(p)
        return plain_cross_entropy(p[0], p[1], w, reduction=reduction, label_smoothing=e, axis=axis)

    _check(transform, ours, plain, tuple(primals), (shape, reduction, transform))


LINEAR_CASES = [
    # (name, weighted, eps, bias, ignore)
    ("plain", False, None, False, False),
    ("bias_ignore", False, None, True, True),
    ("w_eps_bias", True, 0.1, True, True),
]  # 'sum' is 'mean' times a constant; 'none' covers the per-element path


LINEAR_GRID = [(*c, "mean") for c in LINEAR_CASES] + [(*LINEAR_CASES[2], "none")]


# Reverse-over-forward (jacrev_jacfwd) is covered on the core losses; here it would only
# re-run the same linear_map rules at a much higher compile cost.
@pytest.mark.parametrize(
    ("name", "weighted", "eps", "with_bias", "ignore", "reduction", "transform"),
    _grid(
        LINEAR_GRID,
        {"w_eps_bias-mean"},
        [t for t in TRANSFORMS if t != "jacrev_jacfwd"],
    ),
)
def test_linear_cross_entropy(name, weighted, eps, with_bias, ignore, reduction, transform):
    rng = rng_for("ho-linear", name)
    n, d, v = 5, 3, 10
    h = jnp.asarray(rng.standard_normal((n, d)))
    k = jnp.asarray(rng.standard_normal((d, v)) * 0.7)
    y = rng.integers(0, v, n)
    if ignore:
        y[1] = -100
    y = jnp.asarray(y)
    primals = [h, k]
    if with_bias:
        primals.append(jnp.asarray(rng.standard_normal(v)))
    if weighted:
        primals.append(jnp.asarray(rng.uniform(0.3, 2.0, v)))
    if eps is not None:
        primals.append(jnp.asarray(eps))

    def split(p):
        p = list(p[2:])
        b = p.pop(0) if with_bias else None
        w = p.pop(0) if weighted else None
        e = p.pop(0) if eps is not None else 0.0
        return b, w, e

    def ours(*p):
        b, w, e = split(p)
        return jaxce.linear_cross_entropy(
            p[0], p[1], y, w, reduction=reduction, label_smoothing=e, bias=b, chunk_size=4
        )

    def plain(*p):
        b, w, e = split(p)
        logits = p[0] @ p[1] + (0.0 if b is None else b[None, :])
        return plain_cross_entropy(logits, y, w, reduction=reduction, label_smoothing=e)

    _check(transform, ours, plain, tuple(primals), (name, reduction, transform))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_low_precision_second_order_keeps_every_term(dtype, eps):
    # The bit-level spellings used for 16-bit inputs must not hide derivatives from
    # autodiff: the HVP of a 16-bit loss equals the float64 HVP at the same (rounded)
    # point to the dtype's precision, and the jvp too.
    rng = rng_for("ho-16bit", str(dtype), eps)
    x = jnp.asarray(rng.standard_normal((8, 33)), dtype)
    y = jnp.asarray(rng.integers(0, 33, 8))
    v = jnp.asarray(rng.standard_normal((8, 33)), dtype)

    def f(x):
        return jaxce.cross_entropy(x, y, label_smoothing=eps)

    def f64(x):
        return plain_cross_entropy(x, y, label_smoothing=eps)

    hvp = jax.jvp(jax.grad(f), (x,), (v,))[1]
    ref = jax.jvp(jax.grad(f64), (x.astype(jnp.float64),), (v.astype(jnp.float64),))[1]
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(hvp, np.float64), ref, atol=tol * np.abs(ref).max())
    tangent = jax.jvp(f, (x,), (v,))[1]
    ref_t = jax.jvp(f64, (x.astype(jnp.float64),), (v.astype(jnp.float64),))[1]
    np.testing.assert_allclose(float(tangent), float(ref_t), rtol=tol, atol=tol)


def test_linear_bfloat16_hvp_matches_float64():
    rng = rng_for("ho-linear-bf16")
    h = jnp.asarray(rng.standard_normal((6, 8)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((8, 40)) * 0.3, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, 40, 6))
    vh = jnp.asarray(rng.standard_normal((6, 8)), jnp.bfloat16)
    vk = jnp.asarray(rng.standard_normal((8, 40)), jnp.bfloat16)

    def f(h, k):
        return jaxce.linear_cross_entropy(h, k, y, chunk_size=16)

    def f64(h, k):
        return plain_cross_entropy(h @ k, y)

    hvp = jax.jvp(jax.grad(f, (0, 1)), (h, k), (vh, vk))[1]
    up = [a.astype(jnp.float64) for a in (h, k, vh, vk)]
    ref = jax.jvp(jax.grad(f64, (0, 1)), tuple(up[:2]), tuple(up[2:]))[1]
    for a, b in zip(hvp, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), b, atol=3e-2 * np.abs(b).max())


@pytest.mark.parametrize(
    ("prob", "eps"), [(False, 0.0), (False, 0.1), (True, 0.1)], ids=["index", "index_eps", "prob"]
)
def test_jvp_and_vjp_are_transposes_on_edge_inputs(prob, eps):
    # <J v, u> == <v, J^T u> with J^T the hand-written backward pass, on inputs with
    # ignored elements and zero weights, and a -inf logit where the loss stays finite
    # (index targets without smoothing), in float64.
    rng = rng_for("ho-transpose", prob, eps)
    x = np.asarray(random_logits(rng, (6, 5)))
    if not prob and eps == 0:
        x[2, 3] = -np.inf
    x = jnp.asarray(x)
    w = jnp.asarray(class_weight(rng, "some-zero", 5))
    if prob:
        t = jnp.asarray(prob_target(rng, (6, 5), -1))
    else:
        t = jnp.asarray(np.array([0, 1, 2, -100, 4, 1]))

    def f(x, w, *e):
        return jaxce.cross_entropy(x, t, w, reduction="none", label_smoothing=e[0] if e else 0.0)

    # Smoothing is differentiated where the loss is finite (no -inf logit).
    primals = (x, w, jnp.asarray(eps)) if eps else (x, w)
    v = _random_like(rng, primals)
    v = (jnp.where(jnp.isinf(x), 0.0, v[0]), *v[1:])
    u = jnp.asarray(rng.standard_normal(6))
    _, jv = jax.jvp(f, primals, v)
    _, vjp = jax.vjp(f, *primals)
    jtu = vjp(u)
    lhs = float(jnp.vdot(jv, u))
    rhs = sum(
        float(jnp.vdot(jnp.where(jnp.isinf(a), 0.0, a), b)) for a, b in zip(v, jtu, strict=True)
    )
    assert np.isfinite(lhs)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


def test_vmap_of_hessian_vector_products():
    rng = rng_for("ho-vmap")
    x = jnp.asarray(rng.standard_normal((3, 4, 6)))
    y = jnp.asarray(rng.integers(0, 6, (3, 4)))
    v = jnp.asarray(rng.standard_normal((3, 4, 6)))

    def hvp(f, x, y, v):
        return jax.jvp(jax.grad(lambda z: f(z, y)), (x,), (v,))[1]

    def ours(x, y):
        return jaxce.cross_entropy(x, y, label_smoothing=0.1)

    def plain(x, y):
        return plain_cross_entropy(x, y, label_smoothing=0.1)

    batched = jax.vmap(lambda *a: hvp(ours, *a))(x, y, v)
    expect = jnp.stack([hvp(plain, x[i], y[i], v[i]) for i in range(3)])
    np.testing.assert_allclose(batched, expect, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------
# The mechanism: linear_map
# ---------------------------------------------------------------------------------------


def _sin_with(fun_t):
    def fun(res, lin):
        return (jnp.cos(res[0]) * lin[0],)

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def _(primals, tangents):
        return f(primals[0]), linear_map(fun, fun_t, primals, tangents)[0]

    return f


def test_reverse_mode_uses_the_hand_written_transpose():
    # A transpose that is deliberately twice the true one shows up in jax.grad but not
    # in jax.jvp: reverse mode runs the given backward pass, not autodiff's transpose.
    f = _sin_with(lambda res, ct: (2 * jnp.cos(res[0]) * ct[0],))
    x = jnp.asarray([0.3, -1.2])
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(f(x)))(x), 2 * jnp.cos(x))
    np.testing.assert_allclose(jax.jvp(f, (x,), (jnp.ones(2),))[1], jnp.cos(x))


def test_linear_map_all_orders_and_batching():
    f = _sin_with(lambda res, ct: (jnp.cos(res[0]) * ct[0],))
    x = jnp.asarray([0.3, -1.2, 2.0])

    def s(x):
        return jnp.sum(f(x))

    np.testing.assert_allclose(jax.hessian(s)(x), jnp.diag(-jnp.sin(x)), rtol=1e-14)
    third = jax.jacfwd(jax.jacrev(jax.grad(s)))(x)
    np.testing.assert_allclose(jnp.einsum("iii->i", third), -jnp.cos(x), rtol=1e-14)
    xs = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(jax.grad(s))(xs), jnp.cos(xs), rtol=1e-14)
    # A batched residual with an unbatched linear input: its cotangent sums over the batch.
    g = jax.grad(lambda v: jnp.sum(jax.vmap(lambda r: jax.jvp(f, (r,), (v,))[1])(xs)))(x * 0)
    np.testing.assert_allclose(g, jnp.sum(jnp.cos(xs), axis=0), rtol=1e-14)


def test_linearize_both_losses():
    rng = rng_for("ho-linearize")
    x = jnp.asarray(rng.standard_normal((4, 6)))
    y = jnp.asarray([0, 5, -100, 2])
    h, k = jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((3, 6)))
    _check(
        "linearize",
        lambda x: jaxce.cross_entropy(x, y, label_smoothing=0.1),
        lambda x: plain_cross_entropy(x, y, label_smoothing=0.1),
        (x,),
        "ce",
    )
    _check(
        "linearize",
        lambda h, k: jaxce.linear_cross_entropy(h, k, y, label_smoothing=0.1, chunk_size=4),
        lambda h, k: plain_cross_entropy(h @ k, y, label_smoothing=0.1),
        (h, k),
        "linear",
    )


def test_linear_map_does_what_public_api_cannot():
    # Why jaxce/_derivatives.py keeps a primitive on jax.interpreters (the only one left in
    # jaxce/): a custom_vjp refuses forward mode, and jax.custom_derivatives.linear_call
    # (a linear function with a hand-written transpose) refuses derivatives with respect
    # to its residuals, which second order needs. linear_map takes both. If JAX's public
    # API starts doing either, this test fails: then revisit _derivatives.py.
    from jax.custom_derivatives import linear_call

    @jax.custom_vjp
    def sine(x):
        return jnp.sin(x)

    sine.defvjp(lambda x: (jnp.sin(x), x), lambda x, ct: (jnp.cos(x) * ct,))
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(sine, (1.0,), (1.0,))

    def scale(r, x):  # r * x, linear in x, its own transpose
        return r * x

    with pytest.raises((AssertionError, TypeError, NotImplementedError, ValueError)):
        jax.grad(lambda r: linear_call(scale, scale, r, 2.0))(3.0)

    def mapped(r, x):
        fun = lambda res, lin: (scale(res[0], lin[0]),)  # noqa: E731
        return linear_map(fun, fun, (r,), (x,))[0]

    assert jax.grad(lambda x: mapped(3.0, x))(2.0) == 3.0  # the transpose
    assert jax.grad(lambda r: mapped(r, 2.0))(3.0) == 2.0  # the residual
    assert jax.jvp(lambda x: mapped(3.0, x), (2.0,), (1.0,))[1] == 3.0  # forward mode
