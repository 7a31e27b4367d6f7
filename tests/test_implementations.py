"""Every implementation, executed under ``jax.jit`` on this CPU: the portable spelling
(``"xla"``), XLA:CPU's, XLA:GPU's and the TPU compiler's (``jaxce/_backends``).

Each is checked against the float64 references of ``tests/reference.py`` (values and
gradients, every dtype, the options a backend respells for: weights, smoothing, the soft
cap, 16-bit inputs), for every entry point. PyTorch parity on the harness's quick grid
runs per implementation in ``tests/test_parity.py``, and the residual checks in
``tests/test_memory.py``. The dense losses run only the implementations whose dense
program is one of its own (``tests/cases.py``: ``DENSE_IMPLEMENTATIONS``); the last test
here checks that every other one lowers them to the portable program.
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import DENSE_IMPLEMENTATIONS, covering_grid, entry_points, weighted_sum
from jax.sharding import PartitionSpec as P
from reference import numpy_cross_entropy, plain_cross_entropy

import jaxce
import jaxce._chunked
from jaxce._backends import AUTOMATIC, IMPLEMENTATIONS, default_implementation
from jaxce._chunked import default_widths
from jaxce._compat import ONE_PASS_JVP
from parity.compare import ROUNDOFF
from parity.grid import LAYOUTS, ce_inputs, rng_for


def _automatic():
    """The implementation the automatic choice (None) takes on JAX's default backend."""
    platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    return next((name for name, ps in AUTOMATIC.items() if platform in ps), "xla")


def _implementation_params(names):
    # The automatic choice's on this backend is what every other test runs, so here it
    # runs with the slow tests (-m "").
    return [
        pytest.param(name, id=name, marks=(pytest.mark.slow,) if name == _automatic() else ())
        for name in names
    ]


# Every named spelling; for the dense losses, those whose dense program is one of its own
# (tests/cases.py).
IMPLEMENTATION_PARAMS = _implementation_params(IMPLEMENTATIONS)
DENSE_PARAMS = _implementation_params(DENSE_IMPLEMENTATIONS)


def _tolerance(dtype):
    """(rtol, atol scale) of a gradient in ``dtype`` against float64: its own rounding
    (the math is float32 or wider)."""
    return {"float64": (1e-10, 1e-12), "float32": (2e-5, 1e-6)}.get(
        dtype, (0, 2 * ROUNDOFF.get(dtype, 0))
    )


@pytest.mark.parametrize("implementation", DENSE_PARAMS)
@pytest.mark.parametrize(
    ("kind", "dtype", "layout", "weight", "eps", "cap", "reduction"),
    covering_grid(["index", "prob"], ["float64", "float32", "bfloat16", "float16"],
                  ["(N,C)", "(N,C,d1)"], ["none", "random"], [0.0, 0.1], [None, 4.0],
                  ["none", "mean"]),
)  # fmt: skip
def test_cross_entropy_matches_float64_reference(
    implementation, kind, dtype, layout, weight, eps, cap, reduction
):
    shape, axis = LAYOUTS[layout]
    rng = rng_for("implementation", kind, dtype, layout, weight, eps, cap, reduction)
    x, t, w, ignore_index = ce_inputs(rng, kind, shape, axis, weight, "present")
    # The inputs rounded to dtype once: the reference sees exactly what the loss sees.
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float64))
    if kind == "prob":
        t = np.asarray(jnp.asarray(t, dtype).astype(jnp.float64))
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=eps, axis=axis)

    def ours(x, t):
        loss = jaxce.cross_entropy(
            x, t, None if w is None else jnp.asarray(w), **options, logit_softcap=cap,
            loss_dtype=jnp.float32 if dtype != "float64" else None,
            implementation=implementation,
        )  # fmt: skip
        return weighted_sum(loss)

    def reference(x, t):
        z = x if cap is None else cap * jnp.tanh(x / cap)
        return weighted_sum(
            plain_cross_entropy(z, t, None if w is None else jnp.asarray(w), **options)
        )

    argnums = (0, 1) if kind == "prob" else (0,)
    xj = jnp.asarray(x, dtype)
    tj = jnp.asarray(t, dtype) if kind == "prob" else jnp.asarray(t)
    value, grads = jax.jit(jax.value_and_grad(ours, argnums))(xj, tj)
    ref_grads = jax.grad(reference, argnums)(jnp.asarray(x), jnp.asarray(t))

    # The value: against the NumPy reference, in float32 or wider whatever the dtype.
    z = x if cap is None else cap * np.tanh(x / cap)
    want = weighted_sum(jnp.asarray(numpy_cross_entropy(z, t, w, **options)))
    np.testing.assert_allclose(value, want, rtol=1e-12 if dtype == "float64" else 2e-6)
    for g, r, arg in zip(grads, ref_grads, (xj, tj), strict=False):
        assert g.dtype == arg.dtype  # gradients in their input's dtype, as in torch
        rtol, atol = _tolerance(dtype)
        g = np.asarray(g.astype(jnp.float64))
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol * max(1.0, np.max(np.abs(r))))


@pytest.mark.parametrize("implementation", IMPLEMENTATION_PARAMS)
def test_linear_cross_entropy_matches_float64_reference(implementation):
    # bfloat16 (where XLA:CPU respells the chunk matmuls), D = 128 >= the chunk (so it
    # takes its identity-matmul transpose); V = 517: four full chunks and a remainder.
    # The vocabulary-parallel loss runs the same chunk step (test_every_entry_point_...).
    dtype, eps, cap = "bfloat16", 0.1, 3.0
    rng = rng_for("linear implementation")
    n, d, v = 16, 128, 517
    h = np.asarray(jnp.asarray(rng.standard_normal((n, d)), dtype).astype(jnp.float64))
    k = np.asarray(jnp.asarray(rng.standard_normal((d, v)) * d**-0.5, dtype).astype(jnp.float64))
    b = rng.standard_normal(v) * 0.1
    w = rng.uniform(0.5, 2.0, v)
    y = rng.integers(0, v, n)
    y[3] = -100

    def ours(h, k, b):
        loss = jaxce.linear_cross_entropy(
            h, k, jnp.asarray(y), jnp.asarray(w), reduction="none", label_smoothing=eps,
            bias=b, chunk_size=128, logit_softcap=cap, loss_dtype=jnp.float32,
            implementation=implementation,
        )  # fmt: skip
        return weighted_sum(loss)

    def reference(h, k, b):
        z = h @ k + b[None, :]
        z = z if cap is None else cap * jnp.tanh(z / cap)
        loss = plain_cross_entropy(z, jnp.asarray(y), jnp.asarray(w), reduction="none",
                                   label_smoothing=eps)  # fmt: skip
        return weighted_sum(loss)

    args = (jnp.asarray(h, dtype), jnp.asarray(k, dtype), jnp.asarray(b, jnp.float32))
    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))(*args)
    ref_value, ref_grads = jax.value_and_grad(reference, (0, 1, 2))(
        jnp.asarray(h), jnp.asarray(k), jnp.asarray(np.asarray(args[2], np.float64))
    )
    np.testing.assert_allclose(value, ref_value, rtol=2e-5)
    for g, r, arg in zip(grads, ref_grads, args, strict=True):
        assert g.dtype == arg.dtype
        # The matmuls round their inputs and products to dtype (bfloat16 products: 2^-8).
        rtol = 4 * ROUNDOFF[dtype]
        r = np.asarray(r)
        atol = rtol * np.max(np.abs(r))
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float64)), r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("implementation", DENSE_PARAMS)
@pytest.mark.parametrize("entry", list(entry_points()))
def test_every_entry_point_takes_every_implementation(entry, implementation):
    # bfloat16 logits, under jit, against the float64 loss of the same (rounded) logits.
    # At 9 classes the fused entry points run no chunk loop, the one pass the TPU's
    # spelling changes (tested above, at 517), so every entry runs DENSE_PARAMS.
    rng = rng_for("entry implementation", entry)
    x = jnp.asarray(rng.standard_normal((12, 9)) * 3, jnp.bfloat16)
    t = jnp.asarray(rng.integers(0, 9, 12))
    fn = entry_points()[entry]
    loss = partial(fn, t=t, loss_dtype=jnp.float32, implementation=implementation)
    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    want = numpy_cross_entropy(np.asarray(x.astype(jnp.float64)), np.asarray(t))
    np.testing.assert_allclose(value, want, rtol=2e-6)
    assert grad.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: plain_cross_entropy(x, t))(x.astype(jnp.float64))
    np.testing.assert_allclose(
        np.asarray(grad.astype(jnp.float64)),
        ref,
        atol=2 * ROUNDOFF["bfloat16"] * float(np.max(np.abs(ref))),
    )


@pytest.mark.parametrize("entry", list(entry_points()))
@pytest.mark.parametrize("name", ["cuda", "XLA", "pallas", 1])
def test_unknown_implementation_names_the_supported_ones(entry, name):
    x = jnp.zeros((12, 9), jnp.bfloat16)
    t = jnp.zeros((12,), jnp.int32)
    match = r"implementation must be None \(automatic\) or one of 'xla', 'xla_cpu', 'xla_gpu', 'xla_tpu', 'pallas_tpu'; got "
    with pytest.raises(ValueError, match=match + repr(name)):
        entry_points()[entry](x, t, implementation=name)


def test_automatic_choice_is_made_at_lowering_for_the_target_platform():
    # One traced program holds the choice; lowering picks the target platform's spelling.
    # The probe: the gradient of bfloat16 soft-capped logits, which XLA:CPU and XLA:GPU
    # both read through a bit-shift upcast (jaxce/_backends/bits.py), the portable
    # spelling through a plain convert. Lowering for CUDA needs no GPU.
    x = jax.ShapeDtypeStruct((8, 64), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((8,), jnp.int32)

    def grad(implementation=None):
        def loss(x, t):
            out = jaxce.cross_entropy(x, t, logit_softcap=30.0, implementation=implementation)
            return out.astype(jnp.float32)

        return jax.jit(jax.grad(loss)).trace(x, t)

    def shifts(implementation, platform):
        text = grad(implementation).lower(lowering_platforms=(platform,)).as_text()
        return text.count("stablehlo.shift_left")

    for platform in ("cpu", "cuda"):
        assert shifts(None, platform) == shifts(f"xla_{platform.replace('cuda', 'gpu')}", platform)
        assert shifts(None, platform) > 0
        assert shifts("xla", platform) == 0
    # Lowered for TPU, which respells no dense pass: the portable one.
    assert shifts(None, "tpu") == 0
    # StableHLO keeps a one-branch case on a constant; XLA removes it before compiling.
    assert "conditional" not in grad().lower().compile().as_text()


def _fused_lowered(target, implementation, platform):
    """The lowered value_and_grad of the fused loss at 8 x 16 x 64 float32 (chunks of 16)
    with ``target`` (a spec), for ``platform``."""
    specs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((8, 16), (16, 64))]

    def loss(h, k, y):
        return jaxce.linear_cross_entropy(h, k, y, chunk_size=16, implementation=implementation)

    traced = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(*specs, target)
    return traced.lower(lowering_platforms=(platform,)).as_text()


def test_chunk_loop_hold_is_chosen_at_lowering_for_cpu_and_tpu_only():
    # The fused loss's chunk loop holds hidden and the kernel with optimization barriers
    # on XLA:CPU and TPUs (jaxce/_backends/xla_tpu.py); the portable loop, which XLA:GPU
    # takes, has none. float32, so that no other XLA:CPU spelling adds a barrier.
    target = jax.ShapeDtypeStruct((8,), jnp.int32)

    def barriers(implementation, platform):
        text = _fused_lowered(target, implementation, platform)
        return text.count("stablehlo.optimization_barrier")

    for platform in ("cpu", "tpu"):
        assert barriers(None, platform) == barriers(f"xla_{platform}", platform) > 0
    assert barriers(None, "cuda") == barriers("xla", "cpu") == barriers("xla_gpu", "tpu") == 0


def test_forward_chunk_sums_in_one_pass_chosen_at_lowering_for_cuda_only():
    # XLA:GPU's forward chunk step reduces each chunk's logits to (max, shifted sum) pairs
    # in one variadic reduction (jaxce/_backends/xla_gpu.py::running_sums); the portable
    # step takes the max, then the sum.
    target = jax.ShapeDtypeStruct((8,), jnp.int32)
    variadic = re.compile(r"stablehlo\.reduce\(%\S+ init: %\S+\), \(%\S+ init: ")

    def pairs(implementation, platform):
        return len(variadic.findall(_fused_lowered(target, implementation, platform)))

    assert pairs(None, "cpu") == pairs(None, "tpu") == pairs("xla", "cuda") == 0
    # jax < 0.12 cannot differentiate the reduction (jaxce/_compat.py: ONE_PASS_JVP), so
    # there the GPU keeps the portable step too.
    if ONE_PASS_JVP:
        assert pairs(None, "cuda") == pairs("xla_gpu", "cpu") > 0
    else:
        assert pairs(None, "cuda") == pairs("xla_gpu", "cpu") == 0


RUNNING_SUMS = {
    "finite": dict(),
    "masked columns": dict(masked=slice(5, 9)),
    "a fully masked chunk": dict(masked=slice(None)),
    "first chunk (m = -inf)": dict(first=True),
    "first chunk, fully masked": dict(first=True, masked=slice(None)),
    "chunk far above the running max": dict(shift=80.0),
    "chunk far below the running max": dict(shift=-80.0),
}


@pytest.mark.parametrize("case", list(RUNNING_SUMS))
def test_one_pass_running_sums_match_float64(case):
    from jaxce._backends import xla_gpu
    from jaxce._chunked import _running_sums

    opts = RUNNING_SUMS[case]
    rng = np.random.default_rng(7)
    z = rng.standard_normal((6, 13)) * 3 + opts.get("shift", 0.0)
    z[:, opts.get("masked", slice(0))] = -np.inf
    m = np.full(6, -np.inf) if opts.get("first") else rng.standard_normal(6)
    s = np.zeros(6) if opts.get("first") else rng.uniform(1, 5, 6)
    z, m, s = (np.float32(a).astype(np.float64) for a in (z, m, s))  # the inputs, as run
    # float64 reference: m' = max(m, max z); s e^{m - m'} + sum e^{z - m'} (shift 0 at -inf)
    want_m = np.maximum(m, z.max(axis=1))
    shift = np.where(np.isneginf(want_m), 0.0, want_m)
    want_s = s * np.exp(m - shift) + np.exp(z - shift[:, None]).sum(axis=1)
    args = [jnp.asarray(a, jnp.float32) for a in (z, m, s)]
    for spelling in (_running_sums, xla_gpu.running_sums):
        got_m, got_s = jax.jit(spelling)(*args)
        np.testing.assert_array_equal(got_m, want_m.astype(np.float32))
        np.testing.assert_allclose(got_s, want_s, rtol=1e-6, atol=0)


def test_chunk_logits_held_row_major_on_tpu_only():
    # The TPU compiler otherwise lays a logits chunk out tokens-minor and copies whole
    # [N, V] class probabilities to match it (jaxce/_backends/xla_tpu.py): the chunk loops'
    # logits carry a layout constraint in the TPU spelling only. The portable program has
    # its own (the loop-carried kernel gradient), the same on every platform.
    probabilities = jax.ShapeDtypeStruct((8, 64), jnp.float32)

    def constraints(implementation, platform):
        return _fused_lowered(probabilities, implementation, platform).count("@LayoutConstraint")

    portable = constraints("xla", "tpu")
    assert constraints(None, "tpu") == constraints("xla_tpu", "cpu") > portable
    assert constraints(None, "cpu") == constraints(None, "cuda") == portable


def test_default_implementation_hook_sets_the_automatic_choice():
    x = jax.ShapeDtypeStruct((8, 64), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((8,), jnp.int32)

    def lowered(**kw):
        fn = jax.jit(lambda x, t: jaxce.cross_entropy(x, t, label_smoothing=0.1, **kw))
        return fn.trace(x, t).lower(lowering_platforms=("cpu",)).as_text()

    with default_implementation("xla"):
        hooked = lowered()
        explicit = lowered(implementation="xla_cpu")  # a named one wins
    assert hooked == lowered(implementation="xla")
    assert explicit == lowered(implementation="xla_cpu")
    assert hooked != explicit
    with pytest.raises(ValueError, match="got 'tpu'"), default_implementation("tpu"):
        pass


# Dense-loss programs, fn(logits, probabilities, labels, implementation) -> a scalar, over
# the options the backends respell passes for: weights, smoothing, the soft cap, z-loss,
# a temperature, 'none' reductions, ignored labels, masks, probability targets (not with
# a temperature: no backend respells a pass of that path, so every implementation is alike).
_W = jnp.linspace(0.5, 2.0, 40, dtype=jnp.float32)
_DENSE_PROGRAMS = {
    "index": lambda x, p, y, i: jnp.sum(jaxce.cross_entropy(
        x, y, _W, label_smoothing=0.1, logit_softcap=4.0, z_loss=1e-4, reduction="none",
        loss_dtype=jnp.float32, implementation=i)),
    "index_tempered": lambda x, p, y, i: jaxce.cross_entropy(
        x, y, label_smoothing=0.1, temperature=2.0, loss_dtype=jnp.float32, implementation=i),
    "probabilities": lambda x, p, y, i: jaxce.cross_entropy(
        x, p, _W, label_smoothing=0.1, logit_softcap=4.0, loss_dtype=jnp.float32,
        implementation=i),
    "module": lambda x, p, y, i: jaxce.CrossEntropyLoss(
        ignore_index=3, label_smoothing=0.05, loss_dtype=jnp.float32, implementation=i)(x, y),
    "optax_integer": lambda x, p, y, i: jnp.sum(jaxce.softmax_cross_entropy_with_integer_labels(
        x, y, loss_dtype=jnp.float32, implementation=i)),
    "optax_integer_where": lambda x, p, y, i: jnp.sum(
        jaxce.softmax_cross_entropy_with_integer_labels(
            x, y, where=x > -1, loss_dtype=jnp.float32, implementation=i)),
    "optax_probabilities": lambda x, p, y, i: jnp.sum(jaxce.softmax_cross_entropy(
        x, p, loss_dtype=jnp.float32, implementation=i)),
    "optax_probabilities_where": lambda x, p, y, i: jnp.sum(jaxce.softmax_cross_entropy(
        x, p, where=x > -1, loss_dtype=jnp.float32, implementation=i)),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("program", list(_DENSE_PROGRAMS))
def test_dense_losses_lower_alike_under_implementations_not_in_the_dense_grids(program, dtype):
    # Why the grids of dense losses run tests/cases.py's DENSE_IMPLEMENTATIONS only: every
    # implementation left out lowers each dense loss, value and gradients, to the portable
    # program (an identical program compiles identically). Lowered only: nothing compiled.
    specs = (
        jax.ShapeDtypeStruct((8, 40), dtype),
        jax.ShapeDtypeStruct((8, 40), dtype),
        jax.ShapeDtypeStruct((8,), jnp.int32),
    )

    def lowered(implementation):
        fn = partial(_DENSE_PROGRAMS[program], i=implementation)
        return jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*specs).as_text()

    portable = lowered("xla")
    assert lowered("xla_cpu") != portable  # the comparison sees a respelled pass
    left_out = [name for name in IMPLEMENTATIONS if name not in DENSE_IMPLEMENTATIONS]
    assert left_out  # else this test has nothing to check: delete it with the constant
    assert [name for name in left_out if lowered(name) != portable] == []


# The fused loss's default chunk width per platform (jaxce/_backends: xla_gpu's and
# xla_tpu's chunk_width). At 16,384 tokens and 131,072 classes, derived here: the portable
# rule, 16 MiB of float32 logits per chunk, is 2**24 / (4 * 16384) = 256 columns; the
# accelerators' is the least of 64 MiB of them (2**26 / (4 * 16384) = 1,024), 2,048
# columns and 1/128 of the vocabulary (131072 / 128 = 1,024).
_WIDTH_SPECS = (
    jax.ShapeDtypeStruct((16384, 8), jnp.float32),
    jax.ShapeDtypeStruct((8, 131072), jnp.float32),
    jax.ShapeDtypeStruct((16384,), jnp.int32),
)


def _chunk_widths_lowered(implementation, platform, chunk_size=None):
    """The widths of the [16384, w] float32 chunk blocks in the lowered program."""

    def loss(h, k, y):
        return jaxce.linear_cross_entropy(
            h, k, y, chunk_size=chunk_size, strategy="min_memory", implementation=implementation
        )

    traced = jax.jit(jax.value_and_grad(loss, (0, 1))).trace(*_WIDTH_SPECS)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    return {int(w) for w in re.findall(r"tensor<16384x(\d+)xf32>", text)} - {1, 8}


@pytest.mark.parametrize(
    ("implementation", "platform", "width"),
    [
        (None, "cpu", 256),
        (None, "cuda", 1024),
        (None, "tpu", 1024),
        ("xla", "tpu", 256),
        ("xla_cpu", "cuda", 256),
        ("xla_gpu", "cpu", 1024),
        ("xla_tpu", "cpu", 1024),
    ],
)
def test_default_chunk_width_is_the_platform_s_chosen_at_lowering(implementation, platform, width):
    assert _chunk_widths_lowered(implementation, platform) == {width}
    # An explicit chunk_size is every implementation's.
    assert _chunk_widths_lowered(implementation, platform, chunk_size=512) == {512}


@pytest.mark.parametrize(
    ("tokens", "vocab", "portable", "accelerators"),
    [
        (16384, 131072, 256, 1024),  # 64 MiB and V / 128 both give 1,024
        (8192, 131072, 512, 1024),  # V / 128 = 1,024 < 64 MiB's 2,048
        (4096, 524288, 1024, 2048),  # 64 MiB's 4,096 and V / 128 = 4,096 capped at 2,048
        (32768, 262144, 256, 512),  # 64 MiB: 2**26 / (4 * 32768) = 512
        (8192, 65536, 512, 512),  # V / 128 = 512: never below the portable width
        (64, 1000, 1000, 1000),  # one chunk: the vocabulary
    ],
)
def test_default_widths_rule(tokens, vocab, portable, accelerators):
    chunk, by = default_widths(tokens, vocab)
    assert chunk == portable
    expected = (
        () if accelerators == portable else (("xla_gpu", accelerators), ("xla_tpu", accelerators))
    )
    assert by == expected


@pytest.mark.parametrize("implementation", [None, "xla_gpu", "xla_tpu"])
def test_platform_chunk_widths_compute_the_float64_loss(implementation, monkeypatch):
    # The accelerators' widths differ from the portable one only at shapes too large to
    # check here (N V > 2**29), so the rules are replaced by ones that differ at a small
    # shape: 32 columns (portable), 48 on GPUs, 80 on TPUs (V = 200: chunks and a
    # remainder). Under None the CPU runs the portable width with the others traced
    # beside it; named, the backend's width runs.
    monkeypatch.setattr(jaxce._chunked, "auto_chunk", lambda n, v: 32)
    monkeypatch.setattr(
        jaxce._chunked, "WIDTHS", (("xla_gpu", lambda n, v: 48), ("xla_tpu", lambda n, v: 80))
    )
    rng = rng_for("platform chunk widths")
    n, d, v = 12, 16, 200
    h, k = rng.standard_normal((n, d)), rng.standard_normal((d, v)) * 0.3
    y = rng.integers(0, v, n)

    def ours(h, k):
        return jaxce.linear_cross_entropy(
            h, k, jnp.asarray(y), label_smoothing=0.1, strategy="min_memory",
            implementation=implementation,
        )  # fmt: skip

    def reference(h, k):
        return plain_cross_entropy(h @ k, jnp.asarray(y), label_smoothing=0.1)

    f32 = (jnp.asarray(h, jnp.float32), jnp.asarray(k, jnp.float32))
    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(*f32)
    ref_value, ref_grads = jax.value_and_grad(reference, (0, 1))(jnp.asarray(h), jnp.asarray(k))
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6 * np.max(np.abs(r)))
    # The width that ran: the chunk blocks' shapes in the lowered program.
    text = jax.jit(jax.value_and_grad(ours, (0, 1))).lower(*f32).as_text()
    width = {None: 32, "xla_gpu": 48, "xla_tpu": 80}[implementation]
    assert f"tensor<12x{width}xf32>" in text


@pytest.mark.parametrize("implementation", [None, "xla_tpu"])
def test_platform_chunk_widths_over_a_vocabulary_parallel_mesh(implementation, monkeypatch):
    # As above, inside shard_map (2 x 2 devices: 100 classes each, chunks of 16 portable,
    # 40 on TPUs, and a remainder), value, gradients and a Hessian-vector product against
    # float64 autodiff of the plain formula.
    monkeypatch.setattr(jaxce._chunked, "auto_chunk", lambda n, v: 16)
    monkeypatch.setattr(
        jaxce._chunked, "WIDTHS", (("xla_gpu", lambda n, v: 24), ("xla_tpu", lambda n, v: 40))
    )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    rng = rng_for("platform chunk widths, mesh")
    n, d, v = 16, 8, 200
    h, k = jnp.asarray(rng.standard_normal((n, d))), jnp.asarray(rng.standard_normal((d, v)))
    k = k * 0.3
    y = jnp.asarray(rng.integers(0, v, n))
    tangent = jnp.asarray(rng.standard_normal((n, d)))

    def ours(h, k):
        return jaxce.sharded_linear_cross_entropy(
            h, k, y, mesh=mesh, vocab_axis="model", batch_axis="data", strategy="min_memory",
            implementation=implementation,
        )  # fmt: skip

    def reference(h, k):
        return plain_cross_entropy(h @ k, y)

    def hvp(loss):
        return jax.jvp(lambda h: jax.grad(loss)(h, k), (h,), (tangent,))[1]

    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(h, k)
    ref_value, ref_grads = jax.value_and_grad(reference, (0, 1))(h, k)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(jax.jit(partial(hvp, ours))(), hvp(reference), rtol=1e-9, atol=1e-13)
    # Each device's chunk blocks: 8 tokens by the width that ran.
    text = jax.jit(jax.value_and_grad(ours, (0, 1))).lower(h, k).as_text()
    assert f"tensor<8x{16 if implementation is None else 40}xf64>" in text


@pytest.mark.parametrize("implementation", ["xla", "xla_gpu", "xla_tpu"])
@pytest.mark.parametrize("strategy", ["min_memory", "min_work"])
@pytest.mark.parametrize("mesh_shape", [None, (2, 2)], ids=["one device", "2x2 mesh"])
def test_one_pass_statistics_compute_the_float64_loss(implementation, strategy, mesh_shape):
    # XLA:GPU's one-pass row statistics (xla_gpu.running_sums for min_memory's chunks,
    # xla_gpu.block_sums for min_work's blocks, over the vocabulary axis on a mesh) and
    # the TPU's masked-sum target logit (xla_tpu.chunk_target_logit, chunks and blocks),
    # executed here, against the float64 formula: smoothing, an ignored token, a class
    # weight and, on the mesh, 201 classes over two devices (101 + 100: a padding column,
    # whose logit is -inf, on the second).
    rng = rng_for("one-pass statistics")
    n, d, v = 16, 8, 201
    h = jnp.asarray(rng.standard_normal((n, d)))
    k = jnp.asarray(rng.standard_normal((d, v)) * 0.5)
    w = jnp.asarray(rng.uniform(0.5, 2.0, v))
    y = rng.integers(0, v, n)
    y[5] = -100
    y = jnp.asarray(y)
    options = dict(label_smoothing=0.1, strategy=strategy, chunk_size=32)
    if strategy == "min_work":
        options["block_size"] = 4

    def ours(h, k):
        if mesh_shape is None:
            return jaxce.linear_cross_entropy(h, k, y, w, implementation=implementation, **options)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(mesh_shape), ("b", "v"))
        k = jax.lax.with_sharding_constraint(k, jax.sharding.NamedSharding(mesh, P(None, "v")))
        return jaxce.sharded_linear_cross_entropy(
            h, k, y, w, mesh=mesh, vocab_axis="v", batch_axis="b",
            implementation=implementation, **options,
        )  # fmt: skip

    def reference(h, k):
        return plain_cross_entropy(h @ k, y, w, label_smoothing=0.1)

    value, grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(h, k)
    ref_value, ref_grads = jax.value_and_grad(reference, (0, 1))(h, k)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)
    # Forward mode over the hidden states differentiates the statistics' loop itself
    # (the one-pass reduction's own JVP under "xla_gpu").
    tangent = jnp.asarray(rng.standard_normal((n, d)))

    def hvp(loss):
        return jax.jvp(lambda h: jax.grad(loss)(h, k), (h,), (tangent,))[1]

    np.testing.assert_allclose(jax.jit(partial(hvp, ours))(), hvp(reference), rtol=1e-9, atol=1e-12)
