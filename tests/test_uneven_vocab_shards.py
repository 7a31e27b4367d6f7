"""Vocabulary-parallel losses over a vocabulary that does not divide evenly over the
devices (507 classes over 4, 50 over 8): exact against the single-device loss in float64,
padding columns never counted, and no gather of the kernel or the logits.

Runs in-process on the 8 simulated CPU devices that conftest.py sets up
(``jax_num_cpu_devices``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import compiled_collectives, cpu_mesh, linear_reference, weighted_sum
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce
from parity.grid import rng_for

N, D = 16, 6
IGNORE = -100


def _problem(vocab, rng, bias=True, weight=True):
    h = jnp.asarray(rng.standard_normal((N, D)))
    k = jnp.asarray(rng.standard_normal((D, vocab)) * 0.7)
    b = jnp.asarray(rng.standard_normal(vocab)) if bias else None
    w = jnp.asarray(rng.uniform(0.5, 2.0, vocab)) if weight else None
    y = rng.integers(0, vocab, N)
    y[::5] = IGNORE
    y[1] = vocab - 1  # the last class lives in the padded slice
    mask = jnp.asarray(rng.random(N) > 0.2)
    return h, k, b, w, jnp.asarray(y), mask


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "everything": {"label_smoothing": 0.2, "z_loss": 1e-2, "logit_softcap": 3.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_sharded_linear_cross_entropy_507_classes_over_4_devices(options, reduction):
    vocab = 507  # Cut Cross-Entropy's uneven example: 127 + 127 + 127 + 126
    mesh = cpu_mesh((2, 4), ("data", "model"))
    h, k, b, w, y, mask = _problem(vocab, rng_for("uneven 507 over 4", options, reduction))
    kw = dict(OPTIONS[options], where=mask)

    def sharded(h, k, b, w):
        # A vocabulary of 507 cannot be a committed P(None, 'model') array (jax.Array
        # shardings divide evenly); inside jit, GSPMD shards it unevenly.
        k = jax.lax.with_sharding_constraint(k, NamedSharding(mesh, P(None, "model")))
        out = jaxce.sharded_linear_cross_entropy(
            h, k, y, w, reduction=reduction, mesh=mesh, vocab_axis="model",
            batch_axis="data", bias=b, chunk_size=32, **kw,
        )  # fmt: skip
        return weighted_sum(out)

    def reference(h, k, b, w):
        return weighted_sum(linear_reference(h, k, b, y, w, reduction=reduction, **kw))

    step = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))
    value, grads = step(h, k, b, w)
    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(h, k, b, w)
    np.testing.assert_allclose(value, want, rtol=1e-12)
    for got, ref in zip(grads, want_grads, strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-12)
    # Only per-token statistics, dhidden and the parameter gradients cross devices (the
    # kernel's gradient is gathered once at the end: these inputs are replicated); nothing
    # logits-sized (16 x 507).
    sizes = compiled_collectives(step, h, k, b, w)
    assert not [s for s in sizes if s[1] > max(N * D, D * 508)], sizes
    assert not [s for s in sizes if s[0] != "all-reduce" and s[1] > D * 508], sizes


@pytest.mark.parametrize("fused_stats", [False, True], ids=["loss", "aux"])
def test_linear_cross_entropy_with_vocab_size_in_shard_map(fused_stats):
    """The shard_map form: 50 classes over 8 devices as slices of 7 padded to 56; the
    padding holds garbage, never counted, and gets zero gradient."""
    vocab, shards = 50, 8
    v_local = -(-vocab // shards)
    mesh = cpu_mesh((shards,), ("model",))
    h, k, b, w, y, mask = _problem(vocab, rng_for("uneven 50 over 8"))
    pad = v_local * shards - vocab
    garbage = np.random.default_rng(4)
    k_pad = jnp.concatenate([k, jnp.asarray(garbage.standard_normal((D, pad)) * 50)], axis=1)
    b_pad = jnp.concatenate([b, jnp.asarray(garbage.standard_normal(pad) * 50)])
    w_pad = jnp.concatenate([w, jnp.asarray(garbage.uniform(1, 9, pad))])
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "where": mask}
    specs = (P(), P(None, "model"), P("model"), P("model"))

    def local(h, k, b, w):
        out = jaxce.linear_cross_entropy(
            h, k, y, w, bias=b, axis_name="model", vocab_size=vocab, chunk_size=4,
            return_aux=fused_stats, **kw,
        )  # fmt: skip
        return out[0] + jnp.sum(out[1].lse) if fused_stats else out

    def reference(h, k, b, w):
        out = linear_reference(h, k, b, y, w, return_aux=fused_stats, **kw)
        return out[0] + jnp.sum(out[1].lse) if fused_stats else out

    sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(
        h, k_pad, b_pad, w_pad
    )
    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(h, k, b, w)
    np.testing.assert_allclose(value, want, rtol=1e-12)
    for i, (got, ref) in enumerate(zip(grads, want_grads, strict=True)):
        real = got if i == 0 else got[..., :vocab]
        np.testing.assert_allclose(real, ref, rtol=1e-11, atol=1e-12)
        if i:
            np.testing.assert_array_equal(got[..., vocab:], 0.0)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_uneven_shards_aux_outputs_match_single_device(reduction):
    vocab = 507
    mesh = cpu_mesh((4,), ("model",))
    h, k, _b, w, y, mask = _problem(vocab, rng_for("uneven aux"), bias=False)
    k = k.at[:, 300].set(k[:, 5])  # a tie across devices: the first class wins
    options = {"where": mask, "z_loss": 1e-3, "return_aux": True}
    loss, aux = jaxce.sharded_linear_cross_entropy(
        h, k, y, w, reduction=reduction, mesh=mesh, vocab_axis="model", chunk_size=16,
        **options,
    )  # fmt: skip
    ref_loss, ref_aux = linear_reference(h, k, None, y, w, reduction=reduction, **options)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    for name, got, ref in zip(aux._fields, aux, ref_aux, strict=True):
        if ref is None:  # aux.entropy without return_entropy
            assert got is None, name
            continue
        np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=name)
