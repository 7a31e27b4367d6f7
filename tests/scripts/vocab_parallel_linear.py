"""Run in a fresh process with 8 simulated CPU devices (see tests/test_sharding.py).

linear_cross_entropy(axis_name='model') inside jax.shard_map, kernel/bias/weight split
over the vocabulary: loss, gradients (hidden, kernel, bias, weight, smoothing) and a
Hessian-vector product equal the single-device loss for every option, and the compiled
program communicates only per-token vectors plus the [tokens, D] sum of dhidden.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import sys

import jax
import jax.numpy as jnp
import numpy as np
from hlo import collective_sizes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

jax.config.update("jax_enable_x64", True)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
N, D, V = 16, 8, 256


def check(reduction, weighted, eps, with_bias, ignore, extra=False):
    rng = np.random.default_rng(abs(hash((reduction, weighted, eps, with_bias, ignore))) % 2**32)
    h = jnp.asarray(rng.standard_normal((N, D)))
    k = jnp.asarray(rng.standard_normal((D, V)) * 0.5)
    b = jnp.asarray(rng.standard_normal(V)) if with_bias else None
    w = jnp.asarray(rng.uniform(0.5, 2.0, V)) if weighted else None
    y = rng.integers(0, V, N)
    if ignore:
        y[::4] = -100
    y = jnp.asarray(y)
    e = jnp.asarray(eps)
    # The options beyond PyTorch: a mask (replicated), z-loss and a soft cap.
    options = {}
    if extra:
        options = {"where": jnp.asarray(rng.random(N) > 0.2), "z_loss": 1e-2, "logit_softcap": 3.0}
    # 'none' and 'sum' split the tokens over 'data' too; 'mean' needs the global
    # denominator, so its tokens are replicated.
    split = reduction != "mean"
    hs, ys = (P("data"), P("data")) if split else (P(), P())
    specs = (hs, P(None, "model"), P("model"), P("model"), ys, P())
    out_spec = P("data") if reduction == "none" else P()

    def local(h, k, b, w, y, e):
        loss = jaxce.linear_cross_entropy(
            h, k, y, w, reduction=reduction, label_smoothing=e, bias=b, chunk_size=16,
            axis_name="model", **options,
        )  # fmt: skip
        return jax.lax.psum(loss, "data") if reduction == "sum" else loss

    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_spec)

    def ours(h, k, b, w, e):
        return sharded(h, k, b, w, y, e)

    def ref(h, k, b, w, e):
        return jaxce.cross_entropy(
            h @ k + (0 if b is None else b[None, :]), y, w, reduction=reduction,
            label_smoothing=e, **options,
        )  # fmt: skip

    ct = jnp.asarray(rng.standard_normal(jax.eval_shape(ref, h, k, b, w, e).shape))

    def scalar(f):
        return lambda *p: jnp.sum(f(*p) * ct)

    primals = (h, k, b, w, e)
    argnums = tuple(i for i, p in enumerate(primals) if p is not None)
    np.testing.assert_allclose(ours(*primals), ref(*primals), rtol=1e-12, atol=1e-13)
    g_ours = jax.jit(jax.grad(scalar(ours), argnums))(*primals)
    g_ref = jax.grad(scalar(ref), argnums)(*primals)
    for a, r in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)
    if not weighted or extra:  # the second-order and HLO checks on the weighted cases only
        return
    v = tuple(jnp.asarray(rng.standard_normal(jnp.shape(p))) for p in (h, k))

    def hvp(f):
        return jax.jvp(lambda h, k: jax.grad(scalar(f), (0, 1))(h, k, b, w, e), (h, k), v)[1]

    for a, r in zip(hvp(ours), hvp(ref), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-11)
    # Communication: all-reduces of per-token vectors, of dhidden [N, D] over 'model' and
    # (data parallelism) of this device's parameter gradients [D, V/4] over 'data'; never
    # an all-gather of anything but per-token data, never the [D, V] kernel or logits.
    step = jax.jit(jax.value_and_grad(scalar(ours), argnums))
    sizes = collective_sizes(step.lower(*primals).compile().as_text())
    assert sizes
    big = [s for s in sizes if s[1] > max(N * D, D * V // 4)]
    gathers = [s for s in sizes if s[0] != "all-reduce" and s[1] > 4 * N]
    assert not big, sizes
    assert not gathers, sizes


def check_gspmd(reduction, weighted, eps, extra=False):
    """sharded_linear_cross_entropy on GSPMD-sharded arrays under plain jax.jit."""
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.standard_normal((N, D)))
    k = jnp.asarray(rng.standard_normal((D, V)) * 0.5)
    w = jnp.asarray(rng.uniform(0.5, 2.0, V)) if weighted else None
    y = jnp.asarray(rng.integers(0, V, N)).at[1].set(-100)

    def put(x, *spec):
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    hs, ks, ys = put(h, "data", None), put(k, None, "model"), put(y, "data")
    ws = None if w is None else put(w, "model")
    options, ref_options = {}, {}
    if extra:
        mask = jnp.asarray(rng.random(N) > 0.2)
        ref_options = {"where": mask, "z_loss": 1e-2, "logit_softcap": 3.0}
        options = dict(ref_options, where=put(mask, "data"))

    def ours(h, k, w):
        out = jaxce.sharded_linear_cross_entropy(
            h, k, ys, w, reduction=reduction, label_smoothing=eps, mesh=mesh,
            vocab_axis="model", batch_axis="data", chunk_size=16, **options,
        )  # fmt: skip
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

    def ref(h, k, w):
        out = jaxce.cross_entropy(
            h @ k, y, w, reduction=reduction, label_smoothing=eps, **ref_options
        )
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

    argnums = (0, 1) if w is None else (0, 1, 2)
    step = jax.jit(jax.value_and_grad(ours, argnums))
    value, grads = step(hs, ks, ws)
    ref_value, ref_grads = jax.value_and_grad(ref, argnums)(h, k, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r, x in zip(grads, ref_grads, (hs, ks, ws), strict=False):
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-12)
        assert g.sharding.spec == x.sharding.spec, (g.sharding.spec, x.sharding.spec)
    sizes = collective_sizes(step.lower(hs, ks, ws).compile().as_text())
    assert not [s for s in sizes if s[0] != "all-reduce" and s[1] > 4 * N], sizes
    assert not [s for s in sizes if s[1] > max(N * D, D * V // 4)], sizes
    if extra:  # auxiliary outputs: sums over the whole batch, lse split like the tokens
        _, aux = jaxce.sharded_linear_cross_entropy(
            hs, ks, ys, ws, reduction=reduction, label_smoothing=eps, mesh=mesh,
            vocab_axis="model", batch_axis="data", chunk_size=16, return_aux=True, **options,
        )  # fmt: skip
        _, ref_aux = jaxce.cross_entropy(
            h @ k, y, w, reduction=reduction, label_smoothing=eps, return_aux=True, **ref_options
        )
        for a, r in zip(aux, ref_aux, strict=True):
            np.testing.assert_allclose(a, r, rtol=1e-12)


def check_bf16():
    """bfloat16 inside shard_map: the 16-bit kernel-gradient path (an identity-matmul
    transpose behind a lax.cond) against the float64 unfused loss, to bf16 accuracy."""
    rng = np.random.default_rng(16)
    h = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((D, V)) * 0.5, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, V, N)).at[2].set(-100)
    specs = (P(), P(None, "model"), P())

    def local(h, k, y):
        return jaxce.linear_cross_entropy(
            h, k, y, label_smoothing=0.1, chunk_size=16, axis_name="model"
        )

    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(sharded, (0, 1)))(h, k, y)

    def ref(h, k):
        h64, k64 = h.astype(jnp.float64), k.astype(jnp.float64)
        return jaxce.cross_entropy(h64 @ k64, y, label_smoothing=0.1)

    ref_value, ref_grads = jax.value_and_grad(ref, (0, 1))(h, k)
    np.testing.assert_allclose(np.float64(value), ref_value, rtol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16
        scale = float(np.abs(r).max())
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2e-2, atol=2e-2 * scale)


cases = [  # (reduction, weighted, eps, bias, ignore)
    ("none", False, 0.0, False, True),
    ("none", True, 0.1, True, True),
    ("sum", True, 0.1, False, True),
    ("mean", False, 0.0, True, True),
    ("mean", True, 0.1, True, True),
    ("mean", True, 0.1, True, True, True),
]
for case in cases:
    try:
        check(*case)
    except Exception:
        print("failed case:", case)
        raise
for case in [
    ("mean", True, 0.1),
    ("none", False, 0.0),
    ("sum", True, 0.0),
    ("mean", True, 0.1, True),
]:
    try:
        check_gspmd(*case)
    except Exception:
        print("failed GSPMD case:", case)
        raise
check_bf16()
print(f"vocab-parallel linear_cross_entropy ok ({len(cases)} + 4 + 1 cases)")
sys.exit(0)
