"""Bad input: a clear TypeError/ValueError at trace time, eagerly and under jax.jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import cpu_mesh

import jaxce

X = jnp.zeros((4, 3), jnp.float32)
Y = jnp.array([0, 1, 2, 0], jnp.int32)


def _eager(**kw):
    return jaxce.cross_entropy(**kw)


def _jitted(**kw):
    arrays = {k: v for k, v in kw.items() if k in ("input", "target", "weight")}
    static = {k: v for k, v in kw.items() if k not in arrays}
    return jax.jit(lambda a: jaxce.cross_entropy(**a, **static))(arrays)


BAD = [
    # (id, kwargs, exception, message pattern)
    ("int_logits", dict(input=jnp.zeros((4, 3), jnp.int32), target=Y), TypeError,
     r"input \(the logits\) must have a floating dtype .* got int32"),
    ("bool_logits", dict(input=jnp.zeros((4, 3), bool), target=Y), TypeError,
     r"input \(the logits\) must have a floating dtype .* got bool"),
    ("complex_logits", dict(input=jnp.zeros((4, 3), jnp.complex64), target=Y), TypeError,
     r"must have a floating dtype .* got complex64"),
    ("0d_logits", dict(input=jnp.float32(1.0), target=jnp.int32(0)), ValueError,
     r"input \(the logits\) must have at least 1 dimension.*got a 0-d array"),
    ("batch_mismatch", dict(input=X, target=Y[:3]), ValueError,
     r"target must have shape \(4,\) \(input's shape \(4, 3\) without the class axis 1\).*got \(3,\)"),
    ("0d_target_for_2d", dict(input=X, target=jnp.int32(0)), ValueError,
     r"target must have shape \(4,\).*got \(\)"),
    ("multi_target", dict(input=X, target=jnp.zeros((4, 2), jnp.int32)), ValueError,
     r"target must have shape \(4,\).*got \(4, 2\)"),
    ("unbatched_with_1d_target", dict(input=jnp.zeros((3,)), target=jnp.zeros((1,), jnp.int32)),
     ValueError, r"target must have shape \(\).*got \(1,\)"),
    ("spatial_mismatch", dict(input=jnp.zeros((2, 3, 5)), target=jnp.zeros((2, 4), jnp.int32), axis=1),
     ValueError, r"target must have shape \(2, 5\).*got \(2, 4\)"),
    ("float_index_target", dict(input=X, target=jnp.zeros((4,), jnp.float32)), TypeError,
     r"target holds class indices and must have an integer dtype; got float32 \(class probabilities must have the input's shape \(4, 3\)\)"),
    ("bool_index_target", dict(input=X, target=jnp.zeros((4,), bool)), TypeError,
     r"target holds class indices and must have an integer dtype; got bool"),
    ("int_prob_target", dict(input=X, target=jnp.zeros((4, 3), jnp.int32)), TypeError,
     r"target has the input's shape \(4, 3\), so it is read as class probabilities and must have a floating dtype; got int32"),
    ("prob_with_ignore_index", dict(input=X, target=jnp.zeros((4, 3)), ignore_index=0), ValueError,
     r"ignore_index is not supported for class-probability targets: it must be negative.*got ignore_index=0"),
    ("weight_wrong_length", dict(input=X, target=Y, weight=jnp.ones(2)), ValueError,
     r"weight must have shape \(3,\), one entry per class; got \(2,\)"),
    ("weight_2d", dict(input=X, target=Y, weight=jnp.ones((1, 3))), ValueError,
     r"weight must have shape \(3,\).*got \(1, 3\)"),
    ("weight_0d", dict(input=X, target=Y, weight=jnp.float32(1.0)), ValueError,
     r"weight must have shape \(3,\).*got \(\)"),
    ("weight_int", dict(input=X, target=Y, weight=jnp.ones(3, jnp.int32)), TypeError,
     r"weight must have a floating dtype; got int32"),
    ("smoothing_above_1", dict(input=X, target=Y, label_smoothing=1.5), ValueError,
     r"label_smoothing must be in \[0, 1\]; got 1.5"),
    ("smoothing_negative", dict(input=X, target=Y, label_smoothing=-0.1), ValueError,
     r"label_smoothing must be in \[0, 1\]; got -0.1"),
    ("smoothing_nan", dict(input=X, target=Y, label_smoothing=float("nan")), ValueError,
     r"label_smoothing must be in \[0, 1\]; got nan"),
    ("smoothing_str", dict(input=X, target=Y, label_smoothing="0.1"), TypeError,
     r"label_smoothing must be a float in \[0, 1\]; got str '0.1'"),
    ("smoothing_vector", dict(input=X, target=Y, label_smoothing=jnp.ones(2) * 0.1), ValueError,
     r"label_smoothing must be a scalar; got an array of shape \(2,\)"),
    ("reduction_unknown", dict(input=X, target=Y, reduction="avg"), ValueError,
     r"reduction must be one of \('none', 'mean', 'sum'\); got 'avg'"),
    ("reduction_case", dict(input=X, target=Y, reduction="MEAN"), ValueError,
     r"reduction must be one of .*; got 'MEAN'"),
    ("reduction_none_object", dict(input=X, target=Y, reduction=None), TypeError,
     r"reduction must be one of .*; got NoneType None"),
    ("ignore_index_float", dict(input=X, target=Y, ignore_index=1.5), TypeError,
     r"ignore_index must be an int; got float 1.5"),
    ("axis_out_of_range", dict(input=X, target=Y, axis=2), ValueError,
     r"axis 2 is out of bounds for input of rank 2: expected an int in \[-2, 2\)"),
    ("axis_tuple", dict(input=X, target=Y, axis=(0, 1)), TypeError,
     r"axis must be an int; got tuple \(0, 1\)"),
    ("target_none", dict(input=X, target=None), TypeError, r"target must be an array; got NoneType"),
    ("where_int", dict(input=X, target=Y, where=jnp.ones(4, jnp.int32)), TypeError,
     r"where must be a boolean mask; got dtype int32"),
    ("where_shape", dict(input=X, target=Y, where=jnp.ones((4, 3), bool)), ValueError,
     r"where must have shape \(4,\) \(the loss's element shape\); got \(4, 3\)"),
    ("z_loss_negative", dict(input=X, target=Y, z_loss=-1e-4), ValueError,
     r"z_loss must be a finite float >= 0; got -0.0001"),
    ("z_loss_nan", dict(input=X, target=Y, z_loss=float("nan")), ValueError,
     r"z_loss must be a finite float >= 0; got nan"),
    ("z_loss_str", dict(input=X, target=Y, z_loss="1e-4"), TypeError,
     r"z_loss must be a float >= 0; got str '1e-4'"),
    ("z_loss_vector", dict(input=X, target=Y, z_loss=jnp.ones(2)), ValueError,
     r"z_loss must be a scalar; got an array of shape \(2,\)"),
    ("softcap_array", dict(input=X, target=Y, logit_softcap=jnp.float32(30.0)), TypeError,
     r"logit_softcap must be None or a positive Python float \(a static option, not an array\)"),
    ("softcap_zero", dict(input=X, target=Y, logit_softcap=0.0), ValueError,
     r"logit_softcap must be a positive finite float; got 0.0"),
    ("softcap_inf", dict(input=X, target=Y, logit_softcap=float("inf")), ValueError,
     r"logit_softcap must be a positive finite float; got inf"),
    ("return_aux_int", dict(input=X, target=Y, return_aux=1), TypeError,
     r"return_aux must be a bool; got int 1"),
    ("check_targets_str", dict(input=X, target=Y, check_targets="yes"), TypeError,
     r"check_targets must be a bool; got str 'yes'"),
]  # fmt: skip


def _traceable(kw):
    return all(hasattr(v, "shape") for k, v in kw.items() if k in ("input", "target", "weight"))


JIT_BAD = [b for b in BAD if _traceable(b[1])]


@pytest.mark.parametrize(("kw", "exc", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error_eagerly(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _eager(**kw)


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"), [b[1:] for b in JIT_BAD], ids=[b[0] for b in JIT_BAD]
)
def test_bad_input_raises_clear_error_under_jit(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _jitted(**kw)


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=2.0), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (dict(ignore_index="x"), TypeError, "ignore_index must be an int"),
        (dict(weight=np.ones((2, 2))), ValueError, "weight must be 1-D"),
        (dict(axis=1.0), TypeError, "axis must be an int"),
        (dict(check_targets=1), TypeError, "check_targets must be a bool"),
    ],
)
def test_module_validates_options_at_construction(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        jaxce.CrossEntropyLoss(**kw)


@pytest.mark.parametrize("target", [[0, 3, 1, 0], [0, -1, 1, 0], [0, 1, 2, 200]])
def test_out_of_range_index_outside_jit_names_the_value(target):
    bad = next(t for t in target if not 0 <= t < 3)
    with pytest.raises(
        ValueError,
        match=rf"target holds class index {bad} at position .*outside the valid range \[0, 3\) and not ignore_index \(-100\)",
    ):
        jaxce.cross_entropy(X, jnp.asarray(target))


def test_out_of_range_check_sees_int64_values_before_any_int32_wrap():
    # 2**32 + 1 would wrap to 1 (a valid class) if converted to int32 first.
    target = np.array([0, 2**32 + 1, 1, 0], np.int64)
    with pytest.raises(ValueError, match=f"class index {2**32 + 1}"):
        jaxce.cross_entropy(X, target)


def test_ignore_index_is_not_range_checked():
    for ii in (-1, 3, 255, -100):
        target = jnp.array([0, ii, 1, 2])
        assert np.isfinite(float(jaxce.cross_entropy(X, target, ignore_index=ii)))


def _mesh():
    return cpu_mesh((1, 1), ("data", "model"))


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        (dict(mesh="mesh"), TypeError, r"mesh must be a jax.sharding.Mesh; got str"),
        (dict(vocab_axis="vocab"), ValueError, r"vocab_axis must name an axis of mesh .*'vocab'"),
        (dict(batch_axis="batch"), ValueError, r"batch_axis must name an axis of mesh"),
        (dict(reduction="avg"), ValueError, r"reduction must be .*'avg'"),
        (
            dict(kernel=jnp.zeros((8,))),
            ValueError,
            r"kernel must have shape \(D, V\) with D = hidden.shape\[-1\] = 8; got \(8,\)",
        ),
        (dict(hidden=jnp.zeros((2, 4, 8))), ValueError, r"hidden must be \[N, D\]"),
    ],
)
def test_sharded_linear_cross_entropy_bad_input(kw, exc, pattern):
    args = dict(hidden=jnp.zeros((4, 8)), kernel=jnp.zeros((8, 16)), target=jnp.arange(4))
    opts = dict(mesh=_mesh(), vocab_axis="model", batch_axis="data")
    for name in ("hidden", "kernel"):
        if name in kw:
            args[name] = kw.pop(name)
    opts.update(kw)
    with pytest.raises(exc, match=pattern):
        jaxce.sharded_linear_cross_entropy(args["hidden"], args["kernel"], args["target"], **opts)


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        (
            dict(loss_dtype=jnp.int32),
            TypeError,
            r"loss_dtype must be None or a floating dtype .*int32",
        ),
        (
            dict(loss_dtype="bogus"),
            TypeError,
            r"loss_dtype must be None or a floating dtype .*'bogus'",
        ),
        (
            dict(vocab_size=5),
            ValueError,
            r"vocab_size is for the vocabulary-parallel loss .*axis_name=None",
        ),
    ],
)
def test_loss_dtype_and_vocab_size_errors(kw, exc, pattern):
    h, k, y = jnp.zeros((2, 3)), jnp.zeros((3, 5)), jnp.arange(2)
    with pytest.raises(exc, match=pattern):
        jaxce.linear_cross_entropy(h, k, y, **kw)
    if "loss_dtype" in kw:
        with pytest.raises(exc, match=pattern):
            jaxce.cross_entropy(h @ k, y, **kw)
        with pytest.raises(exc, match=pattern):
            jaxce.CrossEntropyLoss(**kw)


@pytest.mark.parametrize(
    ("vocab_size", "exc", "pattern"),
    [
        (True, TypeError, r"vocab_size must be an int or None; got True"),
        (0, ValueError, r"vocab_size must be positive; got 0"),
        (
            17,
            ValueError,
            r"vocab_size \(17\) must be at most the columns of all devices' kernel slices \(16 x 1\)",
        ),
    ],
)
def test_vocab_size_must_fit_the_slices(vocab_size, exc, pattern):
    mesh = cpu_mesh((1,), ("model",))
    P = jax.sharding.PartitionSpec

    def local(h, k, y):
        return jaxce.linear_cross_entropy(h, k, y, axis_name="model", vocab_size=vocab_size)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P())
    with pytest.raises(exc, match=pattern):
        fn(jnp.zeros((2, 3)), jnp.zeros((3, 16)), jnp.arange(2))


def test_linear_cross_entropy_axis_name_must_be_a_string():
    with pytest.raises(TypeError, match=r"axis_name must be a mesh axis name \(str\) or None"):
        jaxce.linear_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3, 5)), jnp.arange(2), axis_name=1)


@pytest.mark.parametrize(
    ("kw", "exc", "pattern"),
    [
        (dict(where=jnp.ones((4, 1), bool)), ValueError,
         r"where must have shape \(4,\) \(hidden's shape without D\); got \(4, 1\)"),
        (dict(logit_softcap=-1.0), ValueError, r"logit_softcap must be a positive finite float"),
        (dict(z_loss=-1.0), ValueError, r"z_loss must be a finite float >= 0"),
        (dict(return_aux="yes"), TypeError, r"return_aux must be a bool"),
        (dict(check_targets=None), TypeError, r"check_targets must be a bool; got NoneType"),
    ],
)  # fmt: skip
def test_linear_cross_entropy_option_errors(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        jaxce.linear_cross_entropy(jnp.zeros((4, 2)), jnp.zeros((2, 3)), Y, **kw)
