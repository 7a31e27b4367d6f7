"""Sharded inputs on meshes of the 8 simulated CPU devices that tests/conftest.py sets up.

* linear_cross_entropy, hidden over 'data' and the kernel over the vocabulary ('model'),
  2x2 mesh, plain jax.jit: equals the single-device result.
* cross_entropy on logits P('data', 'model'), 2x4 mesh, every option: equals the
  single-device result, keeps the gradient's sharding, and the compiled HLO moves only
  O(tokens) data between devices (no logits-sized all-gather).
* linear_cross_entropy(axis_name='model') inside shard_map and sharded_linear_cross_entropy
  under jax.jit: equal to the single-device loss (values, gradients, HVP) with only
  per-token / dhidden / parameter-gradient all-reduces.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import compiled_collectives, cpu_mesh, linear_reference, weighted_sum
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce
from jaxce._backends import IMPLEMENTATIONS
from parity.grid import prob_target, random_logits, rng_for

# The options beyond PyTorch that the "extra" cases add (with a random mask).
BEYOND_TORCH = {"z_loss": 1e-2, "logit_softcap": 3.0}


def test_eight_cpu_devices_and_cpu0_stays_the_default():
    cpus = jax.devices("cpu")
    assert len(cpus) == 8  # tests/conftest.py: jax_num_cpu_devices
    if jax.default_backend() == "cpu":
        # Single-device tests are unaffected: their arrays and programs live on cpu:0.
        assert jnp.zeros(3).devices() == {cpus[0]}
        assert jax.jit(jnp.sin)(jnp.zeros(3)).devices() == {cpus[0]}


def test_linear_cross_entropy_with_vocab_sharded_kernel():
    mesh = cpu_mesh((2, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((16, 1024)) * 0.25, jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 1024), jnp.float32)
    y = jnp.asarray(rng.integers(0, 1024, 8)).at[3].set(-100)

    def loss(h, k):
        return jaxce.linear_cross_entropy(h, k, y, w, label_smoothing=0.1, chunk_size=256)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    ref_value, (ref_dh, ref_dk) = step(h, k)
    hs = jax.device_put(h, NamedSharding(mesh, P("data", None)))
    ks = jax.device_put(k, NamedSharding(mesh, P(None, "model")))
    value, (dh, dk) = step(hs, ks)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# cross_entropy on logits sharded P('data', 'model') under plain jax.jit, 2x4 mesh
# --------------------------------------------------------------------------------------


def _sharded_ce_params():
    """Weight and ignore_index together, smoothing on and off, 'none' and 'mean' ('sum' is
    the same per-element losses, summed); float32 once per target kind; the options beyond
    PyTorch (a mask, z-loss, a soft cap) once per target kind."""
    grid = itertools.product(
        ["index", "prob"], ["none", "mean"], [False, True], [False, True], [0.0, 0.1],
        ["float64", "float32"],
    )  # fmt: skip
    rows = [
        (kind, reduction, weighted, ignore, eps, dtype, False)
        for kind, reduction, weighted, ignore, eps, dtype in grid
        if not (kind == "prob" and ignore)
        and (weighted == ignore or kind == "prob")
        and (dtype == "float64" or (weighted and eps and reduction == "mean"))
    ]
    rows += [
        (kind, "mean", True, kind == "index", 0.1, "float64", True) for kind in ("index", "prob")
    ]
    return [
        pytest.param(
            *row,
            id=f"{row[0]}-{row[1]}-w{int(row[2])}-ii{int(row[3])}-ls{row[4]}-{row[5]}"
            + ("-where-z-softcap" if row[6] else ""),
        )
        for row in rows
    ]


@pytest.mark.parametrize(
    ("kind", "reduction", "weighted", "ignore", "eps", "dtype", "extra"), _sharded_ce_params()
)
def test_cross_entropy_with_vocab_sharded_logits(
    kind, reduction, weighted, ignore, eps, dtype, extra
):
    mesh = cpu_mesh((2, 4), ("data", "model"))
    n, c = 64, 1024
    rng = rng_for("sharded cross_entropy", kind, reduction, weighted, ignore, eps, dtype, extra)
    x = jnp.asarray(random_logits(rng, (n, c)), dtype)
    if kind == "prob":
        t = jnp.asarray(prob_target(rng, (n, c), -1), dtype)
        t_spec = P("data", "model")
    else:
        t = rng.integers(0, c, n)
        if ignore:
            t[::5] = -100
        t = jnp.asarray(t)
        t_spec = P("data")
    w = jnp.asarray(rng.uniform(0.5, 2.0, c), dtype) if weighted else None
    # The options beyond PyTorch: a mask (replicated), z-loss and a soft cap.
    options = {}
    if extra:
        options = {"where": jnp.asarray(rng.random(n) > 0.2), **BEYOND_TORCH}

    def loss(x, t, w):
        return jaxce.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps, **options)

    def total(x, t, w):
        out = loss(x, t, w)
        return weighted_sum(out)

    argnums = (0, 1) if kind == "prob" else (0,)
    step = jax.jit(jax.value_and_grad(total, argnums))
    ref_value, ref_grads = step(x, t, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    ts = jax.device_put(t, NamedSharding(mesh, t_spec))
    ws = None if w is None else jax.device_put(w, NamedSharding(mesh, P("model")))
    value, grads = step(xs, ts, ws)
    # Shards sum in another order: equal up to rounding, relative to each array's scale
    # (a gradient term lse - x_c loses digits when x_c is close to lse).
    eps_d = float(jnp.finfo(dtype).eps)

    def assert_close(a, b):
        b = np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * eps_d * float(np.max(np.abs(b))))

    assert_close(value, ref_value)
    for g, r in zip(grads, ref_grads, strict=True):
        assert_close(g, r)
        assert g.sharding.spec == P("data", "model"), g.sharding.spec
    assert_close(jax.jit(loss)(xs, ts, ws), jax.jit(loss)(x, t, w))
    # Communication (checked on the smoothed float64 cases): nothing logits-sized crosses
    # devices, only per-token vectors.
    if dtype == "float64" and eps:
        for fn in (step, jax.jit(loss)):
            sizes = compiled_collectives(fn, xs, ts, ws)
            assert sizes, "expected some cross-device reduction"
            assert not [s for s in sizes if s[1] > 4 * n], sizes


# --------------------------------------------------------------------------------------
# Vocabulary-parallel linear_cross_entropy, 2x4 mesh, float64 (bfloat16 once)
# --------------------------------------------------------------------------------------

N, D, V = 16, 8, 256


@pytest.mark.parametrize(
    ("reduction", "weighted", "eps", "with_bias", "ignore", "extra", "strategy"),
    [
        ("none", False, 0.0, False, True, False, "min_memory"),
        ("none", True, 0.1, True, True, False, "min_memory"),
        ("sum", True, 0.1, False, True, False, "min_memory"),
        ("sum", True, 0.1, False, True, False, "min_work"),
        ("mean", False, 0.0, True, True, False, "min_memory"),
        ("mean", True, 0.1, True, True, False, "min_memory"),
        ("mean", True, 0.1, True, True, False, "min_work"),
        ("mean", True, 0.1, True, True, True, "min_memory"),
        ("mean", True, 0.1, True, True, True, "min_work"),
    ],
    ids=["none", "none-w-ls-bias", "sum-w-ls", "sum-w-ls-min_work", "mean-bias",
         "mean-w-ls-bias", "mean-w-ls-bias-min_work", "mean-w-ls-bias-where-z-softcap",
         "mean-w-ls-bias-where-z-softcap-min_work"],
)  # fmt: skip
def test_vocab_parallel_linear_cross_entropy_in_shard_map(
    reduction, weighted, eps, with_bias, ignore, extra, strategy
):
    """Kernel, bias and weight split over the vocabulary: loss, gradients (hidden, kernel,
    bias, weight, smoothing) and a Hessian-vector product equal the single-device loss, and
    the compiled program communicates only per-token vectors plus the [tokens, D] sum of
    dhidden (and, data parallelism, each device's parameter gradients)."""
    mesh = cpu_mesh((2, 4), ("data", "model"))
    rng = rng_for("vocab parallel", reduction, weighted, eps, with_bias, ignore, extra)
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
        options = {"where": jnp.asarray(rng.random(N) > 0.2), **BEYOND_TORCH}
    # 'none' and 'sum' split the tokens over 'data' too; 'mean' needs the global
    # denominator, so its tokens are replicated.
    hs, ys = (P("data"), P("data")) if reduction != "mean" else (P(), P())
    specs = (hs, P(None, "model"), P("model"), P("model"), ys, P())
    out_spec = P("data") if reduction == "none" else P()

    def local(h, k, b, w, y, e):
        loss = jaxce.linear_cross_entropy(
            h, k, y, w, reduction=reduction, label_smoothing=e, bias=b, chunk_size=16,
            axis_name="model", strategy=strategy, block_size=3, **options,
        )  # fmt: skip
        return jax.lax.psum(loss, "data") if reduction == "sum" else loss

    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_spec)

    def ours(h, k, b, w, e):
        return sharded(h, k, b, w, y, e)

    def ref(h, k, b, w, e):
        return linear_reference(h, k, b, y, w, reduction=reduction, label_smoothing=e, **options)

    ct = jnp.asarray(rng.standard_normal(jax.eval_shape(ref, h, k, b, w, e).shape))

    def scalar(f):
        return lambda *p: jnp.sum(f(*p) * ct)

    primals = (h, k, b, w, e)
    argnums = tuple(i for i, p in enumerate(primals) if p is not None)
    # Everything under jax.jit: traced and compiled once, not dispatched op by op.
    step = jax.jit(jax.value_and_grad(scalar(ours), argnums))
    value, g_ours = step(*primals)
    ref_value, g_ref = jax.jit(jax.value_and_grad(scalar(ref), argnums))(*primals)
    np.testing.assert_allclose(jax.jit(ours)(*primals), ref(*primals), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for a, r in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12)
    if not weighted or extra:  # the second-order and HLO checks on the weighted cases only
        return
    v = tuple(jnp.asarray(rng.standard_normal(jnp.shape(p))) for p in (h, k))

    def hvp(f):
        def tangent(h, k, b, w, e):
            return jax.jvp(lambda h, k: jax.grad(scalar(f), (0, 1))(h, k, b, w, e), (h, k), v)[1]

        return jax.jit(tangent)(*primals)

    for a, r in zip(hvp(ours), hvp(ref), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-11)
    # Communication: all-reduces of per-token vectors, of dhidden [N, D] over 'model' and
    # (data parallelism) of this device's parameter gradients [D, V/4] over 'data'; never
    # an all-gather of anything but per-token data, never the [D, V] kernel or logits.
    sizes = compiled_collectives(step, *primals)  # the program above, from jit's cache
    assert sizes
    assert not [s for s in sizes if s[1] > max(N * D, D * V // 4)], sizes
    assert not [s for s in sizes if s[0] != "all-reduce" and s[1] > 4 * N], sizes


@pytest.mark.parametrize(
    ("reduction", "weighted", "eps", "extra", "strategy"),
    [
        ("mean", True, 0.1, False, "min_memory"),
        ("mean", True, 0.1, False, "min_work"),
        ("none", False, 0.0, False, "min_memory"),
        ("sum", True, 0.0, False, "min_work"),
        ("mean", True, 0.1, True, "min_memory"),
        ("mean", True, 0.1, True, "min_work"),
    ],
    ids=["mean-w-ls", "mean-w-ls-min_work", "none", "sum-w-min_work",
         "mean-w-ls-where-z-softcap", "mean-w-ls-where-z-softcap-min_work"],
)  # fmt: skip
def test_sharded_linear_cross_entropy_under_jit(reduction, weighted, eps, extra, strategy):
    """sharded_linear_cross_entropy on GSPMD-sharded arrays under plain jax.jit: the
    single-device loss and gradients, the inputs' shardings kept, no gather."""
    mesh = cpu_mesh((2, 4), ("data", "model"))
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
        ref_options = {"where": mask, **BEYOND_TORCH}
        options = dict(ref_options, where=put(mask, "data"))

    def ours(h, k, w):
        out = jaxce.sharded_linear_cross_entropy(
            h, k, ys, w, reduction=reduction, label_smoothing=eps, mesh=mesh,
            vocab_axis="model", batch_axis="data", chunk_size=16, strategy=strategy,
            block_size=3, **options,
        )  # fmt: skip
        return weighted_sum(out)

    def ref(h, k, w):
        out = linear_reference(
            h, k, None, y, w, reduction=reduction, label_smoothing=eps, **ref_options
        )
        return weighted_sum(out)

    argnums = (0, 1) if w is None else (0, 1, 2)
    step = jax.jit(jax.value_and_grad(ours, argnums))
    value, grads = step(hs, ks, ws)
    ref_value, ref_grads = jax.value_and_grad(ref, argnums)(h, k, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r, x in zip(grads, ref_grads, (hs, ks, ws), strict=False):
        np.testing.assert_allclose(g, r, rtol=1e-11, atol=1e-12)
        assert g.sharding.spec == x.sharding.spec, (g.sharding.spec, x.sharding.spec)
    sizes = compiled_collectives(step, hs, ks, ws)
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
            if r is None:  # aux.entropy without return_entropy
                assert a is None
                continue
            np.testing.assert_allclose(a, r, rtol=1e-12)


def test_vocab_parallel_bfloat16_in_shard_map():
    """bfloat16 inside shard_map: the 16-bit kernel-gradient path (an identity-matmul
    transpose behind a lax.cond) against the float64 unfused loss, to bf16 accuracy."""
    mesh = cpu_mesh((2, 4), ("data", "model"))
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


@pytest.mark.parametrize("implementation", [None, *IMPLEMENTATIONS])
def test_sharded_backward_lowers_at_blocked_hidden_gradient_sizes(implementation):
    # Every spelling is traced when the program is lowered (lax.platform_dependent);
    # XLA:CPU's hidden-gradient update loops over token blocks once a device holds more
    # than 16 MiB / (4 D) tokens, and shard_map's type check must accept that loop (it
    # once rejected its carry). Lowered only: nothing is compiled or allocated.
    mesh = cpu_mesh((2, 4), ("data", "model"))
    n, d, v = 2048, 8192, 4096  # 1024 tokens per device, 512-token blocks

    def loss(h, k, y):
        return jaxce.sharded_linear_cross_entropy(
            h, k, y, mesh=mesh, vocab_axis="model", batch_axis="data",
            implementation=implementation,
        )  # fmt: skip

    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(mesh, P("data"))),
        jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data"))),
    )
    lowered = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args)
    assert "dot_general" in lowered.as_text()
