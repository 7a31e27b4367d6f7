"""Vocabulary-parallel losses over a vocabulary that does not divide evenly over the
devices (507 classes over 4, 50 over 8): exact against the single-device loss in float64,
padding columns never counted, and no gather of the kernel or the logits.

Runs in-process on 8 simulated CPU devices (``jax_num_cpu_devices``, set in conftest.py);
skipped where fewer devices exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cases import collective_sizes
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 (simulated) devices: see tests/conftest.py"
)

N, D = 16, 6
IGNORE = -100


def _problem(vocab, seed, bias=True, weight=True):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((N, D)))
    k = jnp.asarray(rng.standard_normal((D, vocab)) * 0.7)
    b = jnp.asarray(rng.standard_normal(vocab)) if bias else None
    w = jnp.asarray(rng.uniform(0.5, 2.0, vocab)) if weight else None
    y = rng.integers(0, vocab, N)
    y[::5] = IGNORE
    y[1] = vocab - 1  # the last class lives in the padded slice
    mask = jnp.asarray(rng.random(N) > 0.2)
    return h, k, b, w, jnp.asarray(y), mask


def _reference(h, k, b, w, y, reduction, **options):
    logits = h @ k + (0 if b is None else b[None, :])
    return jaxce.cross_entropy(logits, y, w, reduction=reduction, **options)


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "everything": {"label_smoothing": 0.2, "z_loss": 1e-2, "logit_softcap": 3.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_sharded_linear_cross_entropy_507_classes_over_4_devices(options, reduction):
    vocab = 507  # Cut Cross-Entropy's uneven example: 127 + 127 + 127 + 126
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    h, k, b, w, y, mask = _problem(vocab, seed=len(options) + len(reduction))
    kw = dict(OPTIONS[options], where=mask)

    def sharded(h, k, b, w):
        # A vocabulary of 507 cannot be a committed P(None, 'model') array (jax.Array
        # shardings divide evenly); inside jit, GSPMD shards it unevenly.
        k = jax.lax.with_sharding_constraint(k, NamedSharding(mesh, P(None, "model")))
        out = jaxce.sharded_linear_cross_entropy(
            h, k, y, w, reduction=reduction, mesh=mesh, vocab_axis="model",
            batch_axis="data", bias=b, chunk_size=32, **kw,
        )  # fmt: skip
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

    def reference(h, k, b, w):
        out = _reference(h, k, b, w, y, reduction, **kw)
        return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

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
    sizes = collective_sizes(step.lower(h, k, b, w).compile())
    assert not [s for s in sizes if s[1] > max(N * D, D * 508)], sizes
    assert not [s for s in sizes if s[0] != "all-reduce" and s[1] > D * 508], sizes


@pytest.mark.parametrize("fused_stats", [False, True], ids=["loss", "aux"])
def test_linear_cross_entropy_with_vocab_size_in_shard_map(fused_stats):
    """The shard_map form: 50 classes over 8 devices as slices of 7 padded to 56; the
    padding holds garbage, never counted, and gets zero gradient."""
    vocab, shards = 50, 8
    v_local = -(-vocab // shards)
    mesh = Mesh(np.array(jax.devices()[:shards]), ("model",))
    h, k, b, w, y, mask = _problem(vocab, seed=3)
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
        out = _reference(h, k, b, w, y, "mean", return_aux=fused_stats, **kw)
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


def test_uneven_shards_aux_outputs_match_single_device():
    vocab = 507
    mesh = Mesh(np.array(jax.devices()[:4]), ("model",))
    h, k, _b, w, y, mask = _problem(vocab, seed=9, bias=False)
    k = k.at[:, 300].set(k[:, 5])  # a tie across devices: the first class wins
    options = {"where": mask, "z_loss": 1e-3, "return_aux": True}
    for reduction in ("none", "mean"):
        loss, aux = jaxce.sharded_linear_cross_entropy(
            h, k, y, w, reduction=reduction, mesh=mesh, vocab_axis="model", chunk_size=16,
            **options,
        )  # fmt: skip
        ref_loss, ref_aux = jaxce.cross_entropy(h @ k, y, w, reduction=reduction, **options)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        for name, got, ref in zip(aux._fields, aux, ref_aux, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=name)
