"""linear_cross_entropy with every target form of PyTorch's ``F.linear_cross_entropy``:
class probabilities (fused, vocabulary-chunked, vocabulary-parallel), unbatched
``hidden``, ``ignore_index=None`` and K-dimensional out-features. Exact in float64 against
the materialised loss ``jaxce.cross_entropy(hidden @ kernel + bias, ...)``: values, the
gradient of every input (probabilities, class weights and a traced ε included), forward
mode and second order; nothing ``[tokens, vocab]``-sized formed for 16-bit inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import covering_grid, cpu_mesh, weighted_sum
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce
from parity.grid import rng_for

N, D, V = 7, 5, 300  # V not a multiple of the chunk sizes below


def _problem(seed, batch=(N,), vocab=V):
    rng = rng_for("linear targets", seed)
    h = jnp.asarray(rng.standard_normal((*batch, D)))
    k = jnp.asarray(rng.standard_normal((D, vocab)) * 0.7)
    b = jnp.asarray(rng.standard_normal(vocab))
    # Unnormalised, like PyTorch's own samples: the loss is linear in the target.
    t = jnp.asarray(rng.uniform(0.0, 1.0, (*batch, vocab)))
    w = jnp.asarray(rng.uniform(0.3, 2.0, vocab))
    mask = jnp.asarray(rng.random(batch) > 0.3)
    return h, k, b, t, w, mask


def _scalar(out):
    return weighted_sum(out) if out.ndim else out


OPTIONS = {
    "plain": {},
    "where": {"where": True},
    "cap+z": {"logit_softcap": 2.0, "z_loss": 1e-2},
}


@pytest.mark.parametrize(
    ("reduction", "weighted", "eps", "chunk_size", "options"),
    covering_grid(["none", "mean", "sum"], [False, True], [0.0, 0.2], [64, 300, None],
                  list(OPTIONS)),
)  # fmt: skip
def test_probability_targets_match_unfused(reduction, weighted, eps, chunk_size, options):
    h, k, b, t, w, mask = _problem((reduction, weighted, eps, chunk_size, options))
    kw = dict(OPTIONS[options])
    if kw.pop("where", False):
        kw["where"] = mask

    def fused(h, k, b, t, w, e):
        return jaxce.linear_cross_entropy(
            h, k, t, w if weighted else None, reduction=reduction, label_smoothing=e, bias=b,
            chunk_size=chunk_size, **kw,
        )  # fmt: skip

    def unfused(h, k, b, t, w, e):
        return jaxce.cross_entropy(
            h @ k + b[None, :], t, w if weighted else None, reduction=reduction,
            label_smoothing=e, **kw,
        )  # fmt: skip

    args = (h, k, b, t, w, jnp.asarray(eps))
    out_f, grads_f = jax.value_and_grad(lambda *a: _scalar(fused(*a)), range(6))(*args)
    out_u, grads_u = jax.value_and_grad(lambda *a: _scalar(unfused(*a)), range(6))(*args)
    np.testing.assert_allclose(out_f, out_u, rtol=1e-12, atol=1e-12)
    names = ("hidden", "kernel", "bias", "target", "weight", "eps")
    for name, g_f, g_u in zip(names, grads_f, grads_u, strict=True):
        np.testing.assert_allclose(g_f, g_u, rtol=1e-10, atol=1e-12, err_msg=name)


def test_probability_targets_aux_outputs_match_unfused():
    h, k, b, t, w, mask = _problem("aux")
    kw = dict(weight=w, label_smoothing=0.1, where=mask, z_loss=1e-3, return_aux=True)
    loss_f, aux_f = jaxce.linear_cross_entropy(h, k, t, bias=b, chunk_size=64, **kw)
    loss_u, aux_u = jaxce.cross_entropy(h @ k + b[None, :], t, **kw)
    np.testing.assert_allclose(loss_f, loss_u, rtol=1e-12)
    for name, f, u in zip(aux_f._fields, aux_f, aux_u, strict=True):
        if u is None:  # aux.entropy without return_entropy
            assert f is None, name
            continue
        np.testing.assert_allclose(f, u, rtol=1e-12, atol=1e-12, err_msg=name)
    assert int(aux_f.count) == int(np.sum(mask))


def test_probability_targets_forward_mode_and_second_order():
    h, k, b, t, w, _ = _problem("higher order")

    def loss(fn, h, k, b, t):
        if fn == "fused":
            return jaxce.linear_cross_entropy(
                h, k, t, w, label_smoothing=0.1, bias=b, chunk_size=64
            )
        return jaxce.cross_entropy(h @ k + b[None, :], t, w, label_smoothing=0.1)

    args = (h, k, b, t)
    rng = np.random.default_rng(0)
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
    _, jvp_f = jax.jvp(lambda *a: loss("fused", *a), args, tangents)
    _, jvp_u = jax.jvp(lambda *a: loss("unfused", *a), args, tangents)
    np.testing.assert_allclose(jvp_f, jvp_u, rtol=1e-10)

    def hvp(fn):
        grad = jax.grad(lambda *a: loss(fn, *a), range(4))
        return jax.jvp(grad, args, tangents)[1]

    for name, a, u in zip(("hidden", "kernel", "bias", "target"), hvp("fused"), hvp("unfused"), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, u, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets_under_vmap(reduction):
    h, k, b, t, w, _ = _problem(("vmap", reduction), batch=(3, N))

    def one(h, t):
        return jaxce.linear_cross_entropy(h, k, t, w, reduction=reduction, bias=b, chunk_size=64)

    got = jax.vmap(one)(h, t)
    want = jnp.stack([jaxce.cross_entropy(h[i] @ k + b[None, :], t[i], w, reduction=reduction) for i in range(3)])  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_probability_targets_bfloat16_form_nothing_logits_sized():
    # Compile-only on XLA:CPU: value_and_grad in hidden and kernel at 1024 x 256 x 16384
    # bf16; the probabilities are 32 MiB, a float32 copy of them or of the logits 64 MiB,
    # a float32 block of 512-class chunks 2 MiB.
    n, d, v = 1024, 256, 16384
    spec = jax.ShapeDtypeStruct
    args = (spec((n, d), jnp.bfloat16), spec((d, v), jnp.bfloat16), spec((n, v), jnp.bfloat16))

    def f(h, k, t):
        return jaxce.linear_cross_entropy(
            h, k, t, label_smoothing=0.1, chunk_size=512, strategy="min_memory"
        )

    compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < n * v * 2 / 2, f"{temp / 2**20:.1f} MiB of temporaries"


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_unbatched_hidden(kind):
    h, k, b, t, w, _ = _problem(("unbatched", kind), batch=())
    y = jnp.asarray(17) if kind == "index" else t
    got, grads = jax.value_and_grad(
        lambda h, k: jaxce.linear_cross_entropy(h, k, y, w, label_smoothing=0.1, bias=b), (0, 1)
    )(h, k)
    want_y = y[None] if kind == "index" else y[None, :]
    want, want_grads = jax.value_and_grad(
        lambda h, k: jaxce.cross_entropy((h @ k + b)[None, :], want_y, w, label_smoothing=0.1),
        (0, 1),
    )(h, k)
    assert got.shape == ()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, u in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, u, rtol=1e-12, atol=1e-14)


def test_ignore_index_none_means_minus_100():
    h, k, b, _, w, _ = _problem("ignore none")
    y = jnp.asarray(np.r_[-100, np.arange(1, N)])
    got = jaxce.linear_cross_entropy(h, k, y, w, None, bias=b)
    want = jaxce.cross_entropy(h @ k + b[None, :], y, w, ignore_index=-100)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    default = jaxce.linear_cross_entropy(h, k, y, w, bias=b)
    np.testing.assert_array_equal(got, default)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_k_dimensional_out_features(kind):
    # torch's linear_weight [C, d1, d2, D] is jaxce's kernel [D, C, d1, d2].
    rng = rng_for("k-dim", kind)
    c, d1, d2 = 6, 3, 2
    h = jnp.asarray(rng.standard_normal((N, D)))
    k = jnp.asarray(rng.standard_normal((D, c, d1, d2)))
    b = jnp.asarray(rng.standard_normal((c, d1, d2)))
    w = jnp.asarray(rng.uniform(0.5, 2.0, c))
    if kind == "index":
        t = jnp.asarray(rng.integers(0, c, (N, d1, d2)))
    else:
        t = jnp.asarray(rng.uniform(0, 1, (N, c, d1, d2)))

    def fused(h, k, b):
        return jaxce.linear_cross_entropy(h, k, t, w, label_smoothing=0.1, bias=b)

    def by_hand(h, k, b):  # PyTorch's layout: logits [N, C, d1, d2], classes on axis 1
        logits = jnp.einsum("nd,dcij->ncij", h, k) + b[None]
        return jaxce.cross_entropy(logits, t, w, label_smoothing=0.1, axis=1)

    got, grads = jax.value_and_grad(fused, (0, 1, 2))(h, k, b)
    want, want_grads = jax.value_and_grad(by_hand, (0, 1, 2))(h, k, b)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for g, u in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, u, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sharded_probability_targets_507_classes_over_4_devices(reduction):
    vocab = 507  # uneven: 127 + 127 + 127 + 126 columns
    mesh = cpu_mesh((2, 4), ("data", "model"))
    h, k, b, t, w, mask = _problem(("sharded", reduction), batch=(8,), vocab=vocab)
    kw = dict(label_smoothing=0.1, where=mask, z_loss=1e-3, logit_softcap=3.0)

    def sharded(h, k, b, t, w):
        k = jax.lax.with_sharding_constraint(k, NamedSharding(mesh, P(None, "model")))
        out = jaxce.sharded_linear_cross_entropy(
            h, k, t, w, reduction=reduction, mesh=mesh, vocab_axis="model",
            batch_axis="data", bias=b, chunk_size=32, **kw,
        )  # fmt: skip
        return _scalar(out)

    def single(h, k, b, t, w):
        return _scalar(jaxce.cross_entropy(h @ k + b[None, :], t, w, reduction=reduction, **kw))

    args = (h, k, b, t, w)
    got, grads = jax.jit(jax.value_and_grad(sharded, range(5)))(*args)
    want, want_grads = jax.value_and_grad(single, range(5))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for name, g, u in zip(("hidden", "kernel", "bias", "target", "weight"), grads, want_grads, strict=True):  # fmt: skip
        np.testing.assert_allclose(g, u, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    ("change", "exc", "pattern"),
    [
        (dict(ignore_index=-100), ValueError, r"ignore_index cannot be given when target holds class probabilities .* got ignore_index=-100, expected None"),
        (dict(target=np.zeros((N, V), np.int32)), TypeError, r"read as class probabilities and must have a floating dtype; got int32"),
        (dict(target=np.zeros((N, V + 1))), ValueError, r"target must have shape \(7,\) .* or \(7, 300\) \(the logits' shape\) for class probabilities; got \(7, 301\)"),
        (dict(kernel=np.ones((D, 4, 3)), target=np.zeros((N, 3), np.int32), bias=np.ones(4)), ValueError, r"bias must have shape \(4, 3\) \(the kernel's shape without D\)"),
        (dict(hidden=np.ones(D), kernel=np.ones((D, 4, 3)), target=np.zeros(3, np.int32)), ValueError, r"needs batched hidden \[N, D\]; got shape \(5,\)"),
        (dict(kernel=np.ones((D, 4, 3)), target=np.zeros((N, 3), np.int32), axis_name="model"), ValueError, r"axis_name and vocab_size .* need a 2-D kernel"),
    ],
)  # fmt: skip
def test_bad_target_forms_raise_clear_errors(change, exc, pattern):
    h, k, _, t, _, _ = _problem("errors")
    args = dict(hidden=h, kernel=k, target=t) | {
        name: jnp.asarray(v) if isinstance(v, np.ndarray) else v for name, v in change.items()
    }
    with pytest.raises(exc, match=pattern):
        jaxce.linear_cross_entropy(**args)
