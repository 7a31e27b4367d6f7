"""temperature=, return_entropy= (aux.entropy) and sample_weight= on cross_entropy and
CrossEntropyLoss: values, first and second derivatives (d/dT included) against float64
plain formulas, the micro-batch accumulation recipe, the residuals, the errors, and a torch
reference of verl's / Liger-Kernel's documented semantics (``logits / T``, per-token NLL and
entropy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_memory import _residuals, _shape

import jaxce

N, C = 6, 7
IGNORE = -100


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, C)) * 2.0)
    t = jnp.asarray([0, 3, 6, IGNORE, 2, 5])
    w = jnp.asarray(rng.uniform(0.5, 2.0, C))
    s = jnp.asarray(rng.normal(size=N))  # advantages: negative weights too
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(N, C))))
    return x, t, w, s, probs


def _tempered(x, cap, temp):
    z = x if cap is None else cap * jnp.tanh(x / cap)
    return z / temp


def _plain_index(x, t, w, eps, temp, s, z, cap, where, reduction):
    """Float64 plain formulas (autodiff gives their derivatives): PyTorch's loss on
    ``softcap(x) / T``, times ``s``, over PyTorch's denominator; and the entropy."""
    zl = _tempered(x, cap, temp)
    logp = jax.nn.log_softmax(zl, axis=-1)
    valid = (t != IGNORE) & where
    idx = jnp.where(valid, t, 0)
    ww = jnp.ones((C,)) if w is None else w
    w_y = ww[idx]
    nll = -jnp.take_along_axis(logp, idx[:, None], axis=-1)[:, 0] * w_y
    smooth = -jnp.sum(ww[None, :] * logp, axis=-1)
    loss = (1 - eps) * nll + eps / C * smooth
    lse = jax.scipy.special.logsumexp(zl, axis=-1)
    loss = loss + z * lse**2
    loss = jnp.where(valid, loss * s, 0.0)
    ent = jnp.where(valid, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0)
    if reduction == "none":
        return loss, ent
    ce_den = jnp.sum(jnp.where(valid, w_y, 0.0))
    count = jnp.sum(valid).astype(x.dtype)
    if reduction == "sum":
        return jnp.sum(loss), jnp.sum(ent)
    # The z-loss part divides by the count, the cross-entropy by Σ w[y].
    z_part = jnp.sum(jnp.where(valid, z * lse**2 * s, 0.0))
    return (jnp.sum(loss) - z_part) / ce_den + z_part / count, jnp.sum(ent) / count


OPTIONS = {
    "plain": dict(),
    "weight_smooth": dict(weight=True, eps=0.1),
    "cap_z": dict(cap=5.0, z=1e-2),
    "all": dict(weight=True, eps=0.2, cap=3.0, z=1e-3, where=True),
}


def _call(opts, x, t, w, eps, temp, s, reduction):
    where = (jnp.arange(N) != 4) if opts.get("where") else None
    return jaxce.cross_entropy(
        x,
        t,
        w if opts.get("weight") else None,
        label_smoothing=eps,
        z_loss=opts.get("z", 0.0),
        logit_softcap=opts.get("cap"),
        where=where,
        temperature=temp,
        sample_weight=s,
        reduction=reduction,
        return_entropy=True,
    )


def _ref(opts, x, t, w, eps, temp, s, reduction):
    where = (jnp.arange(N) != 4) if opts.get("where") else jnp.ones((N,), bool)
    return _plain_index(
        x,
        t,
        w if opts.get("weight") else None,
        eps,
        temp,
        s,
        opts.get("z", 0.0),
        opts.get("cap"),
        where,
        reduction,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_index_values_and_gradients_match_float64_formulas(name, reduction):
    opts = OPTIONS[name]
    x, t, w, s, _ = _inputs()
    eps, temp = jnp.asarray(opts.get("eps", 0.0)), jnp.asarray(1.7)
    ours = _call(opts, x, t, w, eps, temp, s, reduction)
    loss_ref, ent_ref = _ref(opts, x, t, w, eps, temp, s, reduction)
    np.testing.assert_allclose(ours[0], loss_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours[1].entropy, ent_ref, rtol=1e-12, atol=1e-12)

    # Gradients of a scalar mix of the loss and the entropy in x, w, eps, T and s.
    mix = jnp.linspace(-1.0, 1.0, N)

    def scalar(out):
        loss, ent = out
        return jnp.sum(loss * mix) - 0.3 * jnp.sum(ent) if reduction == "none" else loss - ent

    def f_ours(*a):
        out = _call(opts, *a[:1], t, *a[1:], reduction)
        return scalar((out[0], out[1].entropy))

    def f_ref(*a):
        return scalar(_ref(opts, *a[:1], t, *a[1:], reduction))

    args = (x, w, eps, temp, s)
    argnums = tuple(range(5))
    for g_ours, g_ref in zip(
        jax.grad(f_ours, argnums)(*args), jax.grad(f_ref, argnums)(*args), strict=True
    ):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["plain", "all"])
def test_second_order_in_logits_and_temperature(name):
    opts = OPTIONS[name]
    x, t, w, s, _ = _inputs(1)
    eps = jnp.asarray(opts.get("eps", 0.0))

    def f_ours(x, temp):
        loss, aux = _call(opts, x, t, w, eps, temp, s, "mean")
        return loss + 0.5 * aux.entropy

    def f_ref(x, temp):
        loss, ent = _ref(opts, x, t, w, eps, temp, s, "mean")
        return loss + 0.5 * ent

    temp = jnp.asarray(0.8)
    for ours, ref in zip(
        jax.tree.leaves(jax.jit(jax.hessian(f_ours, (0, 1)))(x, temp)),
        jax.tree.leaves(jax.jit(jax.hessian(f_ref, (0, 1)))(x, temp)),
        strict=True,
    ):
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-11)
    # Forward mode: a jvp of the gradient (a Hessian-vector product).
    v = (jnp.ones_like(x) * 0.3, jnp.asarray(0.7))
    hvp_ours = jax.jit(lambda x, t: jax.jvp(jax.grad(f_ours, (0, 1)), (x, t), v)[1])(x, temp)
    hvp_ref = jax.jit(lambda x, t: jax.jvp(jax.grad(f_ref, (0, 1)), (x, t), v)[1])(x, temp)
    for ours, ref in zip(hvp_ours, hvp_ref, strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_probability_targets_match_float64_formulas(smoothing):
    x, _, w, s, probs = _inputs(2)

    def f_ours(x, w, probs, temp, s):
        loss, aux = jaxce.cross_entropy(
            x, probs, w, label_smoothing=smoothing, temperature=temp, sample_weight=s,
            logit_softcap=4.0, return_entropy=True,
        )  # fmt: skip
        return loss, aux.entropy

    def f_ref(x, w, probs, temp, s):
        logp = jax.nn.log_softmax(_tempered(x, 4.0, temp), axis=-1)
        tp = (1 - smoothing) * probs + smoothing / C
        loss = -jnp.sum(w[None, :] * tp * logp, axis=-1) * s
        return jnp.mean(loss), jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))

    args = (x, w, probs, jnp.asarray(1.3), s)
    for ours, ref in zip(f_ours(*args), f_ref(*args), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-12)

    def mixed(f):
        return lambda *a: f(*a)[0] - 0.7 * f(*a)[1]

    for ours, ref in zip(
        jax.grad(mixed(f_ours), range(5))(*args), jax.grad(mixed(f_ref), range(5))(*args),
        strict=True,
    ):  # fmt: skip
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_temperature_one_and_unit_weights_give_the_pytorch_exact_loss():
    x, t, w, _, _ = _inputs(3)
    plain = jax.value_and_grad(lambda x: jaxce.cross_entropy(x, t, w, label_smoothing=0.1))(x)
    tempered = jax.value_and_grad(
        lambda x: jaxce.cross_entropy(
            x, t, w, label_smoothing=0.1, temperature=1.0, sample_weight=jnp.ones((N,))
        )
    )(x)
    for a, b in zip(plain, tempered, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_traced_temperature_does_not_recompile_and_bad_traced_values_give_nan():
    x, t, _, _, _ = _inputs(4)
    f = jax.jit(lambda x, temp: jaxce.cross_entropy(x, t, temperature=temp))
    ref = _plain_index(x, t, None, 0.0, 2.5, 1.0, 0.0, None, jnp.ones((N,), bool), "mean")[0]
    np.testing.assert_allclose(f(x, jnp.asarray(2.5)), ref, rtol=1e-12)
    for bad in (0.0, -1.0, np.inf, np.nan):
        assert np.isnan(f(x, jnp.asarray(bad)))


def test_sample_weighted_micro_batches_accumulate_exactly():
    """The documented recipe: per micro-batch the 'sum' loss (minus aux.z_loss) and
    aux.denominator (plus aux.z_loss and aux.count), summed, give the full batch's mean."""
    x, t, w, s, _ = _inputs(5)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, temperature=0.9)
    full = jaxce.cross_entropy(x, t, sample_weight=s, **kw)
    ce = den = zl = cnt = 0.0
    for part in (slice(0, 2), slice(2, N)):
        loss, aux = jaxce.cross_entropy(
            x[part], t[part], sample_weight=s[part], reduction="sum", return_aux=True, **kw
        )
        ce, den = ce + loss - aux.z_loss, den + aux.denominator
        zl, cnt = zl + aux.z_loss, cnt + aux.count
    np.testing.assert_allclose(ce / den + zl / cnt, full, rtol=1e-13)


def test_module_form_takes_temperature_and_per_call_sample_weight():
    x, t, w, s, _ = _inputs(6)
    loss_fn = jaxce.CrossEntropyLoss(w, temperature=2.0, reduction="sum")
    assert "temperature=2.0" in repr(loss_fn)
    ref = jaxce.cross_entropy(x, t, w, temperature=2.0, reduction="sum", sample_weight=s)
    np.testing.assert_allclose(loss_fn(x, t, sample_weight=s), ref, rtol=1e-14)


def test_entropy_at_a_minus_inf_logit_is_finite_and_its_gradient_too():
    x = jnp.asarray([[0.0, 1.0, -jnp.inf], [2.0, 2.0, 2.0]])
    t = jnp.asarray([1, 0])

    def ent(x):
        return jaxce.cross_entropy(x, t, temperature=1.5, return_entropy=True)[1].entropy

    p = jax.nn.softmax(jnp.asarray([0.0, 1.0]) / 1.5)
    expected = (-jnp.sum(p * jnp.log(p)) + jnp.log(3.0)) / 2
    np.testing.assert_allclose(ent(x), expected, rtol=1e-13)
    assert np.all(np.isfinite(jax.grad(ent)(x)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
def test_no_logits_sized_residual_with_the_new_options(target_kind, dtype):
    n, c = 16, 1000
    x = jnp.ones((n, c), dtype)
    if target_kind == "index":
        t = jnp.zeros((n,), jnp.int32)
    else:
        t = jnp.full((n, c), 1.0 / c, jnp.float32)
    s = jnp.linspace(-1.0, 1.0, n)

    def f(x, temp):
        loss, aux = jaxce.cross_entropy(
            x, t, jnp.ones((c,)), label_smoothing=0.1, temperature=temp, sample_weight=s,
            z_loss=1e-4, logit_softcap=30.0, return_entropy=True,
        )  # fmt: skip
        return loss - 0.01 * aux.entropy.astype(loss.dtype)

    lines = _residuals(f, x, jnp.asarray(1.5))
    big = [line for line in lines if _shape(line) == (n, c)]
    # The logits argument, and for probabilities the closed-over target (a constant).
    assert len([line for line in big if "from the argument" in line]) == 1, lines
    assert all("from the argument" in line or "from a constant" in line for line in big)
    assert len(big) == (1 if target_kind == "index" else 2), lines


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(temperature=0.0), ValueError, "temperature must be a finite float > 0; got 0.0"),
        (dict(temperature=-2.0), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite float > 0"),
        (dict(temperature=jnp.asarray(-1.0)), ValueError, "temperature must be a finite"),
        (dict(temperature=True), TypeError, "temperature must be a float > 0; got bool"),
        (dict(temperature=jnp.ones(2)), ValueError, "temperature must be a scalar"),
        (dict(sample_weight=jnp.ones(5)), ValueError, r"sample_weight must have shape \(6,\)"),
        (dict(sample_weight=jnp.ones((6, 1))), ValueError, "sample_weight must have shape"),
        (dict(sample_weight=jnp.ones(6, jnp.int32)), TypeError, "sample_weight must have a float"),
        (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
    ],
)
def test_bad_new_options_raise_naming_the_argument(kwargs, error, match):
    x, t, _, _, _ = _inputs()
    with pytest.raises(error, match=match):
        jaxce.cross_entropy(x, t, **kwargs)


def test_module_form_validates_temperature_when_built():
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        jaxce.CrossEntropyLoss(temperature=0.0)


@pytest.mark.torch
def test_matches_a_torch_reference_of_verl_and_liger_semantics():
    """Per-token NLL and entropy of ``logits / T`` (verl's ``logprobs_from_logits`` and
    ``entropy_from_logits``, Liger-Kernel's fused scaled cross-entropy), a token-mean of
    advantage-weighted NLL (Keras's sample-weight mean), written in plain torch; values
    and gradients in the logits and ``T``."""
    torch = pytest.importorskip("torch")
    x, t, _, s, _ = _inputs(7)
    t = jnp.where(t == IGNORE, 1, t)
    temp = 0.7

    xt = torch.tensor(np.asarray(x), requires_grad=True)
    tt = torch.tensor(temp, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(xt / tt, dim=-1)
    nll = -logp.gather(-1, torch.tensor(np.asarray(t))[:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    st = torch.tensor(np.asarray(s))
    torch_loss = (nll * st).mean() - 0.1 * entropy.mean()
    torch_loss.backward()

    def ours(x, temp):
        loss, aux = jaxce.cross_entropy(
            x, t, temperature=temp, sample_weight=s, return_entropy=True
        )
        return loss - 0.1 * aux.entropy

    value, (dx, dtemp) = jax.value_and_grad(ours, (0, 1))(x, jnp.asarray(temp))
    np.testing.assert_allclose(value, torch_loss.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dtemp, tt.grad.numpy(), rtol=1e-10)
    per_token = jaxce.cross_entropy(x, t, temperature=temp, reduction="none", return_entropy=True)
    np.testing.assert_allclose(per_token[0], nll.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(per_token[1].entropy, entropy.detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("which", ["loss", "entropy"])
def test_float32_temperature_derivative_of_near_uniform_rows_is_accurate(which):
    """d/dT of the dense loss and entropy on float32 logits of 32,768 near-uniform classes
    (scale 0.1) against float64: the row sums behind it are compensated (an uncompensated
    one-loop row reduction on XLA:CPU gave 1.8e-5 for the loss)."""
    rng = np.random.default_rng(27)
    x32 = jnp.asarray(rng.normal(size=(64, 32768)) * 0.1, jnp.float32)
    y = jnp.asarray(rng.integers(0, 32768, 64))

    def f(x, t):
        loss, aux = jaxce.cross_entropy(x, y, temperature=t, return_entropy=True)
        return loss if which == "loss" else aux.entropy

    def formula(x, t):  # float64
        logp = jax.nn.log_softmax(x / t, axis=-1)
        if which == "loss":
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
        return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))

    t = jnp.float32(0.7)
    ours = jax.jit(jax.grad(f, 1))(x32, t)
    ref = jax.grad(formula, 1)(x32.astype(jnp.float64), t.astype(jnp.float64))
    np.testing.assert_allclose(ours, ref, rtol=2e-6)


# ---------------------------------------------------------------------------------------
# The fused loss: linear_cross_entropy, its axis_name form, sharded_linear_cross_entropy
# ---------------------------------------------------------------------------------------

V, D = 37, 5  # an odd vocabulary: uneven chunks and an uneven split over 4 devices


def _fused_inputs(seed=8):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(8, D)))
    k = jnp.asarray(rng.normal(size=(D, V)))
    b = jnp.asarray(rng.normal(size=V))
    t = jnp.asarray([0, 3, 36, IGNORE, 2, 5, 9, 30])
    w = jnp.asarray(rng.uniform(0.5, 2.0, V))
    s = jnp.asarray(rng.normal(size=8))
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(8, V))))
    return h, k, b, t, w, s, probs


RL = dict(label_smoothing=0.1, logit_softcap=4.0, z_loss=1e-3, return_entropy=True)


def _scalar(out, reduction):
    loss, aux = out
    return jnp.sum(loss * jnp.linspace(-1.0, 1.0, loss.size).reshape(loss.shape)) - 0.3 * jnp.sum(
        aux.entropy
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
def test_fused_equals_dense_on_the_materialised_logits(target_kind, reduction):
    """linear_cross_entropy with temperature, entropy and sample weights is the dense loss
    (itself checked against the float64 formulas above) of hidden @ kernel + bias: values,
    gradients in every input (T included) and, for the mean, the Hessian in (hidden, T)."""
    h, k, b, t, w, s, probs = _fused_inputs()
    target = t if target_kind == "index" else probs

    def fused(h, k, b, w, temp, s):
        out = jaxce.linear_cross_entropy(
            h, k, target, w, bias=b, temperature=temp, sample_weight=s, reduction=reduction,
            chunk_size=8, **RL,
        )  # fmt: skip
        return _scalar(out, reduction)

    def dense(h, k, b, w, temp, s):
        out = jaxce.cross_entropy(
            h @ k + b[None, :], target, w, temperature=temp, sample_weight=s,
            reduction=reduction, **RL,
        )  # fmt: skip
        return _scalar(out, reduction)

    args = (h, k, b, w, jnp.asarray(1.3), s)
    np.testing.assert_allclose(jax.jit(fused)(*args), jax.jit(dense)(*args), rtol=1e-12)
    grads = [jax.jit(jax.grad(f, range(6)))(*args) for f in (fused, dense)]
    for a, r in zip(*grads, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)
    if reduction != "mean":
        return
    for a, r in zip(
        jax.tree.leaves(jax.jit(jax.hessian(fused, (0, 4)))(*args)),
        jax.tree.leaves(jax.jit(jax.hessian(dense, (0, 4)))(*args)),
        strict=True,
    ):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-11)


def test_fused_per_token_entropy_and_nll_with_temperature():
    h, k, _, t, _, _, _ = _fused_inputs(9)
    loss, aux = jaxce.linear_cross_entropy(
        h, k, t, temperature=0.6, reduction="none", return_entropy=True, chunk_size=8
    )
    logp = jax.nn.log_softmax(h @ k / 0.6, axis=-1)
    idx = jnp.where(t == IGNORE, 0, t)
    nll = -jnp.take_along_axis(logp, idx[:, None], axis=-1)[:, 0]
    counted = t != IGNORE
    np.testing.assert_allclose(loss, jnp.where(counted, nll, 0.0), rtol=1e-12)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    np.testing.assert_allclose(aux.entropy, jnp.where(counted, entropy, 0.0), rtol=1e-12)


@pytest.mark.parametrize(
    ("target_kind", "strategy"),
    [("index", "min_memory"), ("probabilities", "min_memory"), ("index", "min_work"),
     ("probabilities", "min_work")],
)  # fmt: skip
def test_vocabulary_parallel_forms_equal_the_single_device_loss(target_kind, strategy):
    """The axis_name form (an uneven split: vocab_size over 4 devices) and
    sharded_linear_cross_entropy (tokens over 2 devices, the vocabulary over 4): values and
    gradients in hidden, kernel, T and the sample weights of loss - 0.3 * aux.entropy, in
    both strategies (min_work forms the entropy's gradients in its pass beside the
    loss's)."""
    from jax.sharding import PartitionSpec as P

    h, k, _, t, _, s, probs = _fused_inputs(10)
    target = t if target_kind == "index" else probs
    kw = dict(label_smoothing=0.1, return_entropy=True, strategy=strategy)
    kw |= {"chunk_size": 4} if strategy == "min_memory" else {"block_size": 4}

    def objective(out):
        return out[0] - 0.3 * out[1].entropy

    def single(h, k, temp, s):
        out = jaxce.linear_cross_entropy(h, k, target, temperature=temp, sample_weight=s, **kw)
        return objective(out)

    pad = -V % 4
    kp = jnp.pad(k, ((0, 0), (0, pad)))
    tp = target if target_kind == "index" else jnp.pad(target, ((0, 0), (0, pad)))
    model = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("model",))

    def local(h, k, tgt, temp, s):
        out = jaxce.linear_cross_entropy(
            h, k, tgt, temperature=temp, sample_weight=s, axis_name="model", vocab_size=V, **kw
        )
        return objective(out)

    tspec = P() if target_kind == "index" else P(None, "model")
    parallel = jax.shard_map(
        local, mesh=model, in_specs=(P(), P(None, "model"), tspec, P(), P()), out_specs=P()
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def sharded(h, k, temp, s):
        out = jaxce.sharded_linear_cross_entropy(
            h, k, target, temperature=temp, sample_weight=s, mesh=mesh, vocab_axis="model",
            batch_axis="data", **kw,
        )  # fmt: skip
        return objective(out)

    args = (h, k, jnp.asarray(0.8), s)
    # Under jit: traced once, not dispatched op by op (the eager form took ~50 s a case).
    ref_value, ref_grads = jax.jit(jax.value_and_grad(single, range(4)))(*args)
    value, grads = jax.jit(jax.value_and_grad(lambda h, k, *a: parallel(h, k, tp, *a), range(4)))(
        h, kp, *args[2:]
    )
    grads = (grads[0], grads[1][:, :V], *grads[2:])
    s_value, s_grads = jax.jit(jax.value_and_grad(sharded, range(4)))(*args)
    for v_, g_ in ((value, grads), (s_value, s_grads)):
        np.testing.assert_allclose(v_, ref_value, rtol=1e-12)
        for a, r in zip(g_, ref_grads, strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-12)


def test_fused_errors_name_the_argument():
    h, k, _, t, _, _, _ = _fused_inputs()
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        jaxce.linear_cross_entropy(h, k, t, temperature=-1.0)
    with pytest.raises(ValueError, match=r"sample_weight must have shape \(8,\)"):
        jaxce.linear_cross_entropy(h, k, t, sample_weight=jnp.ones(7))
    with pytest.raises(TypeError, match="sample_weight must have a floating dtype"):
        jaxce.linear_cross_entropy(h, k, t, sample_weight=jnp.ones(8, jnp.int32))


@pytest.mark.parametrize(
    ("argnums", "expected"),
    [((0,), "one"), ((1,), "one"), ((0, 1), "both"), ((3,), "neither")],
)
def test_fused_matmul_work_skips_what_is_not_differentiated(argnums, expected):
    """Optimized XLA:CPU HLO of value_and_grad, matmul work in units of 2·N·D·V: with
    temperature, entropy and sample weights on, differentiating only hidden (or only the
    kernel) does exactly the matmul work of the plain loss's same gradient, and only T
    does no d-hidden or d-kernel matmul at all."""
    from benchmarks import targets, timemodel

    n, d, v = 256, 128, 4096
    S = jax.ShapeDtypeStruct
    specs = (S((n, d), jnp.float32), S((d, v), jnp.float32), S((n,), jnp.int32))
    specs = (*specs, S((), jnp.float32), S((n,), jnp.float32))

    def rl(h, k, t, temp, s):
        out = jaxce.linear_cross_entropy(
            h, k, t, temperature=temp, sample_weight=s, return_entropy=True,
            label_smoothing=0.1, chunk_size=1024,
        )  # fmt: skip
        return out[0] - 0.1 * out[1].entropy

    def plain(h, k, t, temp, s):
        return jaxce.linear_cross_entropy(h, k, t, label_smoothing=0.1, chunk_size=1024)

    def work(fn, argnums):
        hlo = targets.compile_for("cpu", jax.value_and_grad(fn, argnums), *specs).as_text()
        return timemodel.matmul_work(hlo, n, d, v)

    forward_only = work(plain, (3,))  # plain ignores T: the forward pass alone
    if expected == "neither":
        # The forward pass and one recomputation of the logits for dT, no gradient matmul.
        assert work(rl, argnums) <= forward_only + 1.0
        assert work(rl, argnums) < work(plain, (0,))
    else:
        assert work(rl, argnums) == pytest.approx(work(plain, argnums))
        assert work(plain, (0, 1)) == pytest.approx(work(plain, (0,)) + 1.0)
