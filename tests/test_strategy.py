"""linear_cross_entropy's ``strategy``: ``"min_work"`` (the gradient formed in the forward
pass over token blocks) against the plain float64 formula and ``"min_memory"``, its
matmul work read from the compiled program, and the errors of what it does not do.

The vocabulary-parallel and sharded forms of both strategies are in test_sharding.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid
from reference import plain_cross_entropy

import jaxce
from benchmarks import targets, timemodel
from parity.grid import rng_for

N, D, V = 13, 6, 300  # N not a multiple of the block sizes below


def _problem(kind, seed):
    rng = rng_for("strategy", kind, seed)
    h = jnp.asarray(rng.standard_normal((N, D)))
    k = jnp.asarray(rng.standard_normal((D, V)) * 0.7)
    b = jnp.asarray(rng.standard_normal(V))
    w = jnp.asarray(rng.uniform(0.3, 2.0, V))
    if kind == "probs":
        t = jnp.asarray(rng.dirichlet(np.ones(V), N))
    else:
        y = rng.integers(0, V, N)
        y[[1, 7]] = -100
        t = jnp.asarray(y)
    where = jnp.asarray(rng.random(N) > 0.25)
    return h, k, b, w, t, where


@pytest.mark.parametrize(
    ("kind", "reduction", "weighted", "eps", "with_bias", "extra", "block_size"),
    covering_grid(["index", "probs"], ["mean", "sum"], [False, True], [0.0, 0.2],
                  [False, True], [False, True], [None, 1, 4, N]),
)  # fmt: skip
def test_min_work_matches_the_plain_formula_and_min_memory(
    kind, reduction, weighted, eps, with_bias, extra, block_size
):
    """Value and gradients in hidden, kernel, bias, weight and the smoothing (and the
    probabilities), float64: min_work = plain autodiff of the formula = min_memory."""
    h, k, b, w, t, where = _problem(kind, (reduction, weighted, eps, with_bias, extra))
    # The options beyond PyTorch: a mask, the z-loss and a soft cap.
    options = {"where": where, "z_loss": 1e-3, "logit_softcap": 3.0} if extra else {}

    def loss(strategy):
        def f(h, k, b, w, e, t):
            return jaxce.linear_cross_entropy(
                h, k, t, w if weighted else None, reduction=reduction, label_smoothing=e,
                bias=b if with_bias else None, strategy=strategy, block_size=block_size,
                **options,
            )  # fmt: skip

        return f

    def plain(h, k, b, w, e, t):
        logits = h @ k + (b[None, :] if with_bias else 0.0)
        return plain_cross_entropy(
            logits, t, w if weighted else None, reduction=reduction, label_smoothing=e,
            **options,
        )  # fmt: skip

    args = (h, k, b, w, jnp.asarray(eps), t)
    argnums = (0, 1, 2, 3, 4, 5) if kind == "probs" else (0, 1, 2, 3, 4)
    value, grads = jax.jit(jax.value_and_grad(loss("min_work"), argnums))(*args)
    # All three under jax.jit: traced once, not dispatched op by op.
    ref_value, ref_grads = jax.jit(jax.value_and_grad(plain, argnums))(*args)
    mem_value, mem_grads = jax.jit(jax.value_and_grad(loss("min_memory"), argnums))(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(value, mem_value, rtol=1e-12)
    for ours, ref, mem in zip(grads, ref_grads, mem_grads, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ours, mem, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_min_work_forward_mode_and_second_order(kind):
    """jax.jvp (the rule's tangent Σ <grad, tangent>), a Hessian-vector product and
    grad-of-grad equal the plain formula's."""
    h, k, b, w, t, _ = _problem(kind, "orders")
    eps = jnp.asarray(0.1)

    def f(h, k):
        return jaxce.linear_cross_entropy(
            h, k, t, w, label_smoothing=eps, bias=b, strategy="min_work", block_size=4
        )

    def plain(h, k):
        return plain_cross_entropy(h @ k + b[None, :], t, w, label_smoothing=eps)

    rng = rng_for("strategy tangents", kind)
    dh, dk = (jnp.asarray(rng.standard_normal(x.shape)) for x in (h, k))
    # Each under jax.jit: traced and compiled once, not dispatched op by op.
    out, tangent = jax.jit(lambda *p: jax.jvp(f, p[:2], p[2:]))(h, k, dh, dk)
    ref_out, ref_tangent = jax.jit(lambda *p: jax.jvp(plain, p[:2], p[2:]))(h, k, dh, dk)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-11)

    def hvp(loss):
        return jax.jit(lambda *p: jax.jvp(jax.grad(loss, (0, 1)), p[:2], p[2:])[1])(h, k, dh, dk)

    for ours, ref in zip(hvp(f), hvp(plain), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)

    def grad_grad(loss):
        return jax.jit(jax.grad(lambda h, k: jnp.sum(jax.grad(loss)(h, k) ** 2)))(h, k)

    np.testing.assert_allclose(grad_grad(f), grad_grad(plain), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["min_memory", "min_work"])
def test_bfloat16_logits_near_640_accumulate_in_float32(strategy):
    """Logits of 400...640 from bfloat16 inputs: a bfloat16 logit there is off by up to 2
    (its spacing is 4), which moves the softmax by tens of percent. Both strategies form
    the logits in float32 (these products of small integers are exact in float32), so the
    loss and gradients equal the float64 formula on the same (bfloat16) inputs."""
    rng = rng_for("strategy 640")
    n, d, v = 64, 32, 512
    h = np.ones((n, d))
    h[rng.random((n, d)) < 0.03] = -1.0
    k = 20.0 - rng.integers(0, 4, (d, v))  # integers 17..20: logits up to 640
    y = jnp.asarray(rng.integers(0, v, n))
    h16, k16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    logits = h @ k
    assert np.min(np.abs(logits)) > 400
    assert np.max(np.abs(logits)) <= 640

    def f(h, k):
        return jaxce.linear_cross_entropy(h, k, y, strategy=strategy, loss_dtype=jnp.float32)

    def plain(h, k):
        return plain_cross_entropy(h @ k, y)

    value, (gh, gk) = jax.jit(jax.value_and_grad(f, (0, 1)))(h16, k16)
    ref, (rh, rk) = jax.jit(jax.value_and_grad(plain, (0, 1)))(jnp.asarray(h), jnp.asarray(k))
    # What bfloat16 logits would give: a softmax off by tens of percent.
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)
    p, p_rounded = (np.asarray(jax.nn.softmax(x)) for x in (logits, rounded))
    assert np.max(np.abs(p_rounded - p) / np.max(p, axis=1, keepdims=True)) > 0.3
    np.testing.assert_allclose(value, ref, rtol=1e-5)
    # The logit gradient goes into the matmuls in bfloat16 (relative spacing 2**-8, as in
    # PyTorch), and d-hidden sums it against kernel entries of about 20 with cancellation.
    for ours, ref in ((gh, rh), (gk, rk)):
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=0, atol=0.03 * scale)


# ---------------------------------------------------------------------------------------
# Matmul work of value_and_grad (XLA:CPU program; loops weighted by their trip counts)
# ---------------------------------------------------------------------------------------


def _matmul_work(strategy, argnums, n=256, d=64, v=4096, dtype=jnp.float32, **options):
    specs = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(h, k, y):
        return jaxce.linear_cross_entropy(h, k, y, strategy=strategy, chunk_size=1024, **options)

    fn = jax.value_and_grad(loss, argnums)
    hlo = targets.compile_for("cpu", fn, *specs).as_text()
    return timemodel.matmul_work(hlo, n, d, v)


@pytest.mark.parametrize(
    ("strategy", "argnums", "expected"),
    [
        ("min_work", (0, 1), 3.0),  # logits, d-hidden, d-kernel: the materialised loss's
        ("min_work", 0, 2.0),  # the d-kernel matmul skipped
        ("min_work", 1, 2.0),  # the d-hidden matmul skipped
        # and the recomputed logits, but for the first of 4 chunks (XLA shares its logits
        # between the passes): 4 - 1/4
        ("min_memory", (0, 1), 3.75),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_work_in_units_of_one_vocabulary_matmul(strategy, argnums, expected, dtype):
    options = {"label_smoothing": 0.1, "z_loss": 1e-4} if strategy == "min_work" else {}
    work = _matmul_work(strategy, argnums, dtype=dtype, **options)
    assert work == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize(
    ("n", "d", "dtype", "expected"),
    [
        # 32 blocks of 1024 rows: one block's 16 MiB of float32 logits <= 5 % of the
        # 512 MiB float32 logits (25.6 MiB)
        (32768, 64, jnp.float32, 3.0),
        # 4 blocks: 16 MiB > 5 % of 64 MiB
        (4096, 64, jnp.float32, 3.75),
        # one block, all 256 tokens: its float32 logits are more than 5 % of the logits
        (256, 64, jnp.float32, 3.75),
        # 16-bit: the float32 [D, V] accumulator (4 MiB) > 5 % of the logits
        (64, 256, jnp.bfloat16, 3.75),
    ],
)
def test_auto_runs_min_work_where_its_memory_rule_allows(n, d, dtype, expected):
    """ "auto": min_work (3 matmuls) where its extra temporaries are at most 5 % of the
    float32 logits, else min_memory (4, less its first chunk shared by both passes)."""
    work = _matmul_work("auto", (0, 1), n=n, d=d, v=4096, dtype=dtype)
    assert work == pytest.approx(expected, abs=0.02)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"strategy": "fast"}, r"strategy must be one of \('auto', 'min_memory', 'min_work'\)"),
        ({"strategy": None}, r"strategy must be one of .*; got None"),
        (
            {"strategy": "min_work", "reduction": "none"},
            r"strategy='min_work' supports reduction 'mean' or 'sum'; got reduction='none'",
        ),
        (
            {"strategy": "min_work", "return_aux": True},
            r"strategy='min_work' supports return_aux=False",
        ),
        ({"block_size": 0}, r"block_size must be a positive int or None; got 0"),
        ({"block_size": 2.0}, r"block_size must be a positive int or None; got 2.0"),
    ],
)
def test_bad_strategy_raises_clear_error(kwargs, pattern):
    h, k, _, _, y, _ = _problem("index", "errors")
    with pytest.raises(ValueError, match=pattern):
        jaxce.linear_cross_entropy(h, k, y, **kwargs)


@pytest.mark.parametrize(("kind", "cap"), [("index", None), ("index", 3.0), ("probs", 3.0)])
def test_min_work_with_temperature_matches_the_formula_and_min_memory(kind, cap):
    """z = softcap(logits) / T: min_work's value and gradients in hidden, kernel and T
    (formed in its forward pass), and its jvp in T, equal plain autodiff of the formula
    and min_memory's, float64."""
    h, k, _, w, t, _ = _problem(kind, ("temperature", cap))
    sw = jnp.asarray(rng_for("strategy", "sw", kind).uniform(0.0, 2.0, N))
    temp = jnp.asarray(1.7)

    def loss(strategy):
        return lambda h, k, temp: jaxce.linear_cross_entropy(
            h, k, t, w, label_smoothing=0.1, logit_softcap=cap, temperature=temp,
            sample_weight=sw, strategy=strategy, block_size=4,
        )  # fmt: skip

    def formula(h, k, temp):
        s = h @ k if cap is None else cap * jnp.tanh((h @ k) / cap)
        per = plain_cross_entropy(s / temp, t, w, reduction="none", label_smoothing=0.1)
        if kind == "index":  # 'mean' over the weighted count of the counted targets
            denominator = jnp.sum(jnp.where(t != -100, w[jnp.clip(t, 0)], 0.0))
        else:
            denominator = N
        return jnp.sum(sw * per) / denominator

    args = (h, k, temp)
    want = jax.jit(jax.value_and_grad(formula, argnums=(0, 1, 2)))(*args)
    for strategy in ("min_work", "min_memory"):
        got = jax.jit(jax.value_and_grad(loss(strategy), argnums=(0, 1, 2)))(*args)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    _, jvp = jax.jit(lambda *a: jax.jvp(loss("min_work"), a, (h * 0, k * 0, jnp.asarray(1.0))))(
        *args
    )
    np.testing.assert_allclose(jvp, want[1][2], rtol=1e-10)


@pytest.mark.parametrize("strategy", ["min_work", "min_memory", "auto"])
def test_sample_weight_in_every_strategy_equals_the_formula(strategy):
    """Per-token weights multiply each token's loss (the 'mean' denominator is the count):
    min_work forms them into its coefficients, min_memory into its per-token losses."""
    n, d, v = 32768, 4, 64
    h = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
    k = jax.random.normal(jax.random.key(1), (d, v), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (n,), 0, v)
    sw = jax.random.uniform(jax.random.key(3), (n,), jnp.float32)
    out, grads = jax.value_and_grad(
        lambda h, sw: jaxce.linear_cross_entropy(
            h, k, y, sample_weight=sw, strategy=strategy, block_size=1024
        ),
        argnums=(0, 1),
    )(h, sw)
    logits = np.asarray(h, np.float64) @ np.asarray(k, np.float64)
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    nll = lse - logits[np.arange(n), np.asarray(y)]
    np.testing.assert_allclose(out, np.sum(np.asarray(sw, np.float64) * nll) / n, rtol=1e-5)
    np.testing.assert_allclose(grads[1], nll / n, rtol=1e-4, atol=1e-9)  # d/d sw_n = nll_n / N
    p = np.exp(logits - lse[:, None])
    p[np.arange(n), np.asarray(y)] -= 1
    dh = (np.asarray(sw, np.float64)[:, None] * p / n) @ np.asarray(k, np.float64).T
    np.testing.assert_allclose(grads[0], dh, rtol=1e-4, atol=1e-9)


def test_min_work_with_a_k_dimensional_kernel_raises():
    h = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"strategy='min_work' supports a 2-D kernel \[D, V\]"):
        jaxce.linear_cross_entropy(
            h, jnp.ones((3, 5, 2)), jnp.zeros((4, 2), int), strategy="min_work"
        )


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_auto_falls_back_to_min_memory_where_min_work_cannot_run(reduction):
    """'none' and aux outputs: "auto" runs min_memory (same values as the formula)."""
    h, k, _, w, y, _ = _problem("index", ("auto", reduction))
    out, aux = jaxce.linear_cross_entropy(h, k, y, w, reduction=reduction, return_aux=True)
    ref = plain_cross_entropy(h @ k, y, w, reduction=reduction)
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    assert aux.lse.shape == (N,)


def test_min_work_under_vmap_and_jvp_in_the_probabilities():
    """vmap over a leading axis equals the formula's, problem by problem; a tangent in
    the class probabilities (their gradient formed in the block loop) equals the formula's."""
    h, k, b, w, t, _ = _problem("probs", "vmap")
    hs = jnp.stack([h, -h])

    def f(h, t):
        return jaxce.linear_cross_entropy(h, k, t, w, bias=b, strategy="min_work", block_size=4)

    def plain(h, t):
        return plain_cross_entropy(h @ k + b[None, :], t, w)

    value, grad = jax.jit(jax.vmap(jax.value_and_grad(f), in_axes=(0, None)))(hs, t)
    ref_value, ref_grad = jax.jit(jax.vmap(jax.value_and_grad(plain), in_axes=(0, None)))(hs, t)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-10, atol=1e-13)
    dt = jnp.asarray(rng_for("strategy dt").standard_normal(t.shape))
    ours = jax.jit(lambda t, dt: jax.jvp(lambda t: f(h, t), (t,), (dt,)))(t, dt)
    ref = jax.jit(lambda t, dt: jax.jvp(lambda t: plain(h, t), (t,), (dt,)))(t, dt)
    np.testing.assert_allclose(ours, ref, rtol=1e-11)


# ---------------------------------------------------------------------------------------
# return_entropy under min_work: aux.entropy with its own gradients, formed in the pass
# ---------------------------------------------------------------------------------------

CAP, TEMP = 3.0, 0.7


def _entropy_problem(kind, seed):
    h, k, b, w, t, where = _problem(kind, ("entropy", seed))
    sw = jnp.asarray(rng_for("strategy", "entropy sw", kind, seed).uniform(-1.0, 2.0, N))
    return h, k, b, w, t, where, sw


def _entropy_loss(t, w, where, sw, reduction, strategy):
    """(loss, aux) of the fused loss with every option that touches the entropy."""

    def f(h, k, b, temp):
        return jaxce.linear_cross_entropy(
            h, k, t, w, reduction=reduction, label_smoothing=0.1, bias=b, where=where,
            z_loss=1e-3, logit_softcap=CAP, temperature=temp, sample_weight=sw,
            return_entropy=True, strategy=strategy, block_size=4,
        )  # fmt: skip

    return f


@pytest.mark.parametrize(("kind", "reduction"), [("index", "mean"), ("probs", "sum")])
def test_min_work_entropy_matches_the_float64_formula_and_min_memory(kind, reduction):
    """aux.entropy of softmax(softcap(h @ k + b) / T) over the counted tokens ('mean' over
    aux.count, 'sum'), float64: the value, and the gradients of loss + 0.3 * entropy in
    hidden, kernel, bias and T, equal plain autodiff of the formula; every aux field equals
    min_memory's."""
    h, k, b, w, t, where, sw = _entropy_problem(kind, reduction)
    counted = where if kind == "probs" else where & (t != -100)

    def formula(h, k, b, temp):
        logits = h @ k + b[None, :]
        z = CAP * jnp.tanh(logits / CAP) / temp
        logp = jax.nn.log_softmax(z, axis=-1)
        per = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        total = jnp.sum(jnp.where(counted, per, 0.0))
        return total / jnp.sum(counted, dtype=total.dtype) if reduction == "mean" else total

    def objective(f):
        def g(*args):
            loss, aux = f(*args)
            return loss + 0.3 * aux.entropy, (loss, aux)

        return g

    args = (h, k, b, jnp.asarray(TEMP))
    grad = jax.value_and_grad(
        objective(_entropy_loss(t, w, where, sw, reduction, "min_work")), range(4), has_aux=True
    )
    (_, (loss, aux)), grads = jax.jit(grad)(*args)
    mem_loss_of = _entropy_loss(t, w, where, sw, reduction, "min_memory")
    mem = jax.value_and_grad(objective(mem_loss_of), range(4), has_aux=True)
    (_, (mem_loss, mem_aux)), mem_grads = mem(*args)
    np.testing.assert_allclose(aux.entropy, formula(*args), rtol=1e-12)
    np.testing.assert_allclose(loss, mem_loss, rtol=1e-12)
    for ours, ref in zip(aux, mem_aux, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)
    # The loss's own gradients: min_memory's (checked against float64 formulas in
    # test_rl.py); the entropy's: plain autodiff of the formula.
    loss_grads = jax.grad(lambda *a: mem_loss_of(*a)[0], range(4))(*args)
    entropy_grads = jax.grad(formula, range(4))(*args)
    want = [g + 0.3 * e for g, e in zip(loss_grads, entropy_grads, strict=True)]
    for ours, mem_g, ref in zip(grads, mem_grads, want, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ours, mem_g, rtol=1e-10, atol=1e-13)


def test_min_work_entropy_forward_mode_and_second_order():
    """jax.jvp of (loss, aux.entropy) and a Hessian-vector product of loss - 0.1 *
    entropy in (hidden, kernel, T) equal min_memory's (the rule's tangent Σ <grad_H,
    tangent>, and plain autodiff of the block loop)."""
    h, k, b, w, t, where, sw = _entropy_problem("index", "orders")
    rng = rng_for("strategy entropy tangents")
    dh, dk = (jnp.asarray(rng.standard_normal(x.shape)) for x in (h, k))
    primals, tangents = (h, k, jnp.asarray(TEMP)), (dh, dk, jnp.asarray(0.3))

    def pair(strategy):
        f = _entropy_loss(t, w, where, sw, "mean", strategy)
        return lambda h, k, temp: (lambda out: (out[0], out[1].entropy))(f(h, k, b, temp))

    def hvp(strategy):
        def objective(h, k, temp):
            loss, entropy = pair(strategy)(h, k, temp)
            return loss - 0.1 * entropy

        return jax.jit(lambda p, v: jax.jvp(jax.grad(objective, range(3)), p, v)[1])(
            primals, tangents
        )

    # Under jax.jit: traced and compiled once, not dispatched op by op.
    ours, ref = (
        jax.jit(lambda p, v, s=s: jax.jvp(pair(s), p, v))(primals, tangents)
        for s in ("min_work", "min_memory")
    )
    for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-13)
    for a, r in zip(hvp("min_work"), hvp("min_memory"), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("bonus", "expected"),
    [
        (0.0, 3.0),  # aux.entropy not differentiated: XLA drops its gradients
        (0.01, 5.0),  # the entropy's own d-hidden and d-kernel matmuls
    ],
)
def test_min_work_entropy_matmul_work(bonus, expected):
    """value_and_grad in (hidden, kernel) with return_entropy=True, optimized XLA:CPU
    program: the loss alone keeps min_work's three matmuls; loss + bonus * entropy adds
    the entropy's two gradient matmuls (min_memory: 4 either way)."""

    def loss(h, k, y):
        out, aux = jaxce.linear_cross_entropy(
            h, k, y, strategy="min_work", return_entropy=True, block_size=64
        )
        return out + bonus * aux.entropy if bonus else out

    n, d, v = 256, 64, 4096
    specs = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    hlo = targets.compile_for("cpu", jax.value_and_grad(loss, (0, 1)), *specs).as_text()
    assert timemodel.matmul_work(hlo, n, d, v) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("strategy", ["min_work", "auto"])
def test_aux_lse_under_min_work_has_a_nan_gradient_and_auto_keeps_min_memory(strategy):
    """With return_entropy, "auto" runs min_memory (aux.lse differentiable: its gradient
    is the formula's); a named "min_work" returns aux.lse's value with a NaN derivative,
    never a silent zero, while the loss's stays exact."""
    h, k, _, w, y, _ = _problem("index", ("lse", strategy))

    def f(h):
        loss, aux = jaxce.linear_cross_entropy(
            h, k, y, w, return_entropy=True, strategy=strategy, block_size=4
        )
        return loss, jnp.sum(aux.lse)

    def plain(h):
        return jnp.sum(jax.nn.logsumexp(h @ k, axis=-1))

    np.testing.assert_allclose(f(h)[1], plain(h), rtol=1e-12)
    np.testing.assert_allclose(
        jax.grad(lambda h: f(h)[0])(h), jax.grad(lambda h: plain_cross_entropy(h @ k, y, w))(h),
        rtol=1e-10, atol=1e-13,
    )  # fmt: skip
    d_lse = jax.grad(lambda h: f(h)[1])(h)
    if strategy == "auto":
        np.testing.assert_allclose(d_lse, jax.grad(plain)(h), rtol=1e-10, atol=1e-13)
    else:
        assert np.isnan(np.asarray(d_lse)).all()


# acc_dtype: min_work's d-kernel accumulator in a 16-bit kernel's own dtype
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "block_size", "max_error"),
    [
        (jnp.bfloat16, 256, None),  # one block: nothing is summed across blocks
        (jnp.bfloat16, 32, 0.02),  # 8 blocks
        (jnp.float16, 32, 0.01),
    ],
)
def test_min_work_16bit_accumulator_costs_only_the_d_kernel_precision(dtype, block_size, max_error):
    """acc_dtype=the kernel's 16-bit dtype: the loss and d-hidden are those of float32
    accumulation, bit for bit; d-kernel is the same with one block, and within
    ``max_error`` (relative, Frobenius) of the float64 formula with several."""
    rng = rng_for("strategy acc_dtype", jnp.dtype(dtype).name)
    n, d, v = 256, 32, 1024
    h = jnp.asarray(rng.standard_normal((n, d)), dtype)
    k = jnp.asarray(rng.standard_normal((d, v)) * 0.5, dtype)
    y = jnp.asarray(rng.integers(0, v, n))

    def grads(acc_dtype):
        def f(h, k):
            return jaxce.linear_cross_entropy(
                h, k, y, strategy="min_work", block_size=block_size, acc_dtype=acc_dtype,
                loss_dtype=jnp.float32,
            )  # fmt: skip

        return jax.value_and_grad(f, (0, 1))(h, k)

    value, (gh, gk) = grads(dtype)
    value32, (gh32, gk32) = grads(None)
    assert gk.dtype == dtype
    np.testing.assert_array_equal(value, value32)
    np.testing.assert_array_equal(gh, gh32)
    if max_error is None:
        np.testing.assert_array_equal(gk, gk32)
        return
    ref = jax.grad(lambda k: plain_cross_entropy(np.asarray(h, np.float64) @ k, y))(
        jnp.asarray(k, jnp.float64)
    )
    error = np.linalg.norm(np.asarray(gk, np.float64) - ref) / np.linalg.norm(ref)
    error32 = np.linalg.norm(np.asarray(gk32, np.float64) - ref) / np.linalg.norm(ref)
    assert error <= max_error
    assert error32 <= error  # float32 accumulation is never the less precise here


def test_auto_counts_a_16bit_accumulator_in_its_memory_rule():
    """32,768 x 1,024 x 4,096 bf16, 1,024-row blocks: one block's float32 logits (16 MiB)
    plus the float32 [D, V] accumulator (16 MiB) exceed 5 % of the float32 logits (25.6
    MiB), so "auto" runs min_memory; with acc_dtype=bfloat16 the block alone fits, and it
    runs min_work (three matmuls)."""
    options = {"n": 32768, "d": 1024, "v": 4096, "dtype": jnp.bfloat16, "block_size": 1024}
    work32 = _matmul_work("auto", (0, 1), **options)
    work16 = _matmul_work("auto", (0, 1), acc_dtype=jnp.bfloat16, **options)
    assert work32 > 3.5  # min_memory: the recompute's fourth matmul
    assert work16 == pytest.approx(3.0, abs=0.02)


@pytest.mark.parametrize(
    ("dtype", "kwargs", "error", "pattern"),
    [
        (jnp.bfloat16, {"acc_dtype": jnp.float16}, ValueError,
         r"acc_dtype must be None or one of \('float32', 'bfloat16'\) for a bfloat16 kernel"
         r" .*; got float16"),
        (jnp.float32, {"acc_dtype": jnp.bfloat16}, ValueError,
         r"acc_dtype must be None or one of \('float32',\) for a float32 kernel .*; got "
         r"bfloat16"),
        (jnp.bfloat16, {"acc_dtype": jnp.int32}, TypeError,
         r"acc_dtype must be None or one of .*; got int32"),
        (jnp.bfloat16, {"acc_dtype": "fast"}, TypeError,
         r"acc_dtype must be None or one of .*; got 'fast'"),
        (jnp.bfloat16, {"acc_dtype": jnp.bfloat16, "strategy": "min_memory"}, ValueError,
         r"acc_dtype=bfloat16 sets the d-kernel accumulator of strategy='min_work'; "
         r"strategy='min_memory' holds no such accumulator"),
    ],
)  # fmt: skip
def test_bad_acc_dtype_raises_clear_error(dtype, kwargs, error, pattern):
    h, k, _, _, y, _ = _problem("index", "errors")
    with pytest.raises(error, match=pattern):
        jaxce.linear_cross_entropy(h.astype(dtype), k.astype(dtype), y, **kwargs)
