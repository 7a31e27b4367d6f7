"""Vocabulary-parallel fused linear cross-entropy, for use inside ``shard_map``.

Each member of the mesh axis ``axis_name`` holds a contiguous slice of the vocabulary
(``kernel[:, r*V_local:(r+1)*V_local]``, the layout of ``P(None, axis_name)``). Per
device, ``shard_stats`` walks its own slice in chunks (never materialising even the local
``[tokens, V_local]`` logits) and returns three per-token statistics: the local
log-sum-exp, the target logit if the target lives in this slice (else 0), and, with
smoothing, ``Σ_c w_c z_c``. The loss combines them across the axis with ``pmax``/``psum``
of ``[tokens]`` vectors -- O(tokens) communication -- using exactly the single-device
formulas, so every option (weight, ignore_index, label smoothing, reductions) matches.

Derivatives: ``shard_stats`` is a ``custom_jvp`` whose tangent (one chunked pass) is
paired, through ``linear_map``, with a hand-written chunked transpose; everything around it
(the cross-device combination) is plain autodiff through the collectives. The gradient
w.r.t. a ``hidden`` replicated over the axis is summed across it by ``linear_map``'s cast.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxce._chunked import (
    accumulate_chunk_grads,
    chunk_classes,
    chunk_logits,
    chunk_logits_tangent,
    chunk_loop,
    chunk_stats,
    chunks,
    mask_columns,
    real_columns,
    zero_grads,
)
from jaxce._derivatives import lean_tangent
from jaxce._options import Options, checked_eps, compute_dtype
from jaxce._rows import combine_index_loss, softcap, softcap_slope, times_slope
from jaxce._targets import nan_if_out_of_range, target_info


def _parts(kernel, start, size, dtype, hidden, bias, cap, n_real):
    """A chunk's raw logits, its (soft-capped) logits (-inf at padding columns), its
    local class ids and which columns are real (None: all)."""
    real = real_columns(start, size, n_real)
    raw = chunk_logits(hidden, kernel, bias, start, size, dtype)
    cls = chunk_classes(start, size)
    return raw, mask_columns(softcap(raw, cap), real, -jnp.inf), cls, real


@partial(jax.custom_jvp, nondiff_argnums=(7, 8))
def shard_stats(hidden, kernel, bias, idx, here, weight, n_real, with_wz, opts: Options):
    """``(lse_d, z_y_d, wz_d, top_d, arg_d)`` over this device's vocabulary slice:
    log-sum-exp, target logit (valid where ``here``; ``idx`` is the local target index),
    ``Σ w z`` (None without smoothing) of the (capped) logits, and the raw logits' row max
    and its local class (None unless ``opts.stats``; no derivative). ``n_real``: None, or
    how many of the slice's columns are real classes (the rest pad an uneven split)."""
    return _stats(hidden, kernel, bias, idx, here, weight, n_real, with_wz, opts)


def _stats(hidden, kernel, bias, idx, here, weight, n_real, with_wz, opts):
    lse, z_y, wz, top, arg = chunk_stats(
        hidden, kernel, bias, idx, here, weight, with_wz, opts, n_real
    )
    if opts.stats:
        # The class as a float (exact below 2**24 classes): a float output can take the zero
        # tangent of its own (shard_map-varying) type; an integer's float0 tangent cannot.
        arg = arg.astype(lse.dtype)
    return lse, z_y, wz, top, arg


@shard_stats.defjvp
def _stats_jvp(with_wz, opts, primals, tangents):
    hidden, kernel, bias, idx, here, weight, n_real = primals
    out = _stats(hidden, kernel, bias, idx, here, weight, n_real, with_wz, opts)
    dh, dk, db, _, _, dw, _ = tangents
    t_out = lean_tangent(
        lambda res, t: _tangent(res, t, with_wz, opts.chunk, opts.cap),
        lambda res, cts: _transpose(res, cts, with_wz, opts.chunk, opts.cap, opts.implementation),
        (hidden, kernel, bias, idx, here, weight, n_real, out[0]),
        (dh, dk, db, dw if with_wz else None),
        tuple(o for o in out[:3] if o is not None),
    )
    t_iter = iter(t_out)
    tangent = tuple(None if o is None else next(t_iter) for o in out[:3])
    if opts.stats:
        tangent = (*tangent, jnp.zeros_like(out[3]), jnp.zeros_like(out[4]))
    else:
        tangent = (*tangent, None, None)
    return out, tangent


def _tangent(res, tangents, with_wz, chunk, cap):
    hidden, kernel, bias, idx, here, weight, n_real, lse = res
    dh, dk, db, dw = tangents
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    w = None if weight is None else weight.astype(dtype)

    def body(start, size, acc, hidden, kernel, dk):
        d_lse, d_zy, d_wz = acc
        raw, z, cls, real = _parts(kernel, start, size, dtype, hidden, bias, cap, n_real)
        dz = chunk_logits_tangent(hidden, kernel, dh, dk, db, start, size, dtype)
        if dz is not None:  # None: only the weight moves
            dz = mask_columns(times_slope(dz, softcap_slope(raw, cap)), real, 0)
            d_lse = d_lse + jnp.sum(jnp.exp(z - lse[:, None]) * dz, axis=1)
            hit = here[:, None] & (cls == idx[:, None])
            d_zy = d_zy + jnp.sum(jnp.where(hit, dz, 0), axis=1)
        if with_wz:
            if dz is not None:
                wc = 1 if w is None else lax.dynamic_slice_in_dim(w, start, size)[None, :]
                d_wz = d_wz + jnp.sum(wc * dz, axis=1)
            if dw is not None:
                dwc = lax.dynamic_slice_in_dim(dw.astype(dtype), start, size)[None, :]
                d_wz = d_wz + jnp.sum(mask_columns(dwc * z, real, 0), axis=1)
        return d_lse, d_zy, d_wz

    zero = jnp.zeros_like(lse)
    pinned = (hidden, kernel, dk)
    d_lse, d_zy, d_wz = chunk_loop(chunks(vocab, chunk), body, (zero, zero, zero), pinned)
    return (d_lse, d_zy, d_wz) if with_wz else (d_lse, d_zy)


def _transpose(res, cts, with_wz, chunk, cap, implementation):
    hidden, kernel, bias, idx, here, weight, n_real, lse = res
    g_lse, g_zy = cts[0], cts[1]
    g_wz = cts[2] if with_wz else None
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    w = None if weight is None else weight.astype(dtype)

    def body(start, size, carry, hidden, kernel):
        dh, dk, db, dw = carry
        raw, z, cls, real = _parts(kernel, start, size, dtype, hidden, bias, cap, n_real)
        dz = jnp.exp(z - lse[:, None]) * g_lse[:, None]
        dz = dz + jnp.where(here[:, None] & (cls == idx[:, None]), g_zy[:, None], 0)
        if with_wz:
            wc = 1 if w is None else lax.dynamic_slice_in_dim(w, start, size)[None, :]
            dz = dz + wc * g_wz[:, None]
        dz = mask_columns(times_slope(dz, softcap_slope(raw, cap)), real, 0)
        dh, dk, db = accumulate_chunk_grads(
            hidden, kernel, dz, start, size, dh, dk, db, dtype, implementation
        )
        if dw is not None:
            dw_c = jnp.sum(g_wz[:, None] * mask_columns(z, real, 0), axis=0)
            dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, 0)
        return dh, dk, db, dw

    init = zero_grads(hidden, kernel, bias, weight if with_wz else None, dtype)
    dh, dk, db, dw = chunk_loop(chunks(vocab, chunk), body, init, (hidden, kernel))
    return dh.astype(hidden.dtype), dk, db, dw


class ShardTargets(NamedTuple):
    """Where each target lives when the vocabulary is split over ``axis_name``."""

    valid: Any  # counted (not ignore_index)
    here: Any  # counted, in range, and in this device's slice
    idx: Any  # index into this device's slice (0 where not ``here``)
    w_y: Any  # w[y] gathered across the axis (ones if unweighted; NaN if out of range)


def shard_targets(target, weight, v_local, vocab, ignore_index, axis_name, dtype) -> ShardTargets:
    """Where each of ``target``'s global class indices lives, for contiguous slices of
    ``v_local`` classes per device along ``axis_name`` (``vocab`` classes in all)."""
    info = target_info(target, vocab, ignore_index)
    valid = info.valid
    local = info.idx - lax.axis_index(axis_name) * v_local
    here = valid & info.in_range & (local >= 0) & (local < v_local)
    idx = jnp.where(here, local, 0)
    if weight is None:
        w_y = jnp.ones(target.shape, dtype)
    else:
        picked = weight.astype(dtype)[idx]
        w_y = lax.psum(jnp.where(here, picked, jnp.zeros_like(picked)), axis_name)
    # A counted target outside [0, V) is NaN, never a plausible finite loss.
    return ShardTargets(valid, here, idx, nan_if_out_of_range(w_y, info))


def split_vocab(v_local: int, opts: Options) -> tuple[int, Any]:
    """``(vocab, n_real)``: the global vocabulary size, and None (an even split) or how
    many of this device's ``v_local`` columns are real classes (the rest are padding)."""
    padded = v_local * lax.axis_size(opts.axis_name)
    vocab = padded if opts.vocab_size is None else opts.vocab_size
    if vocab == padded:
        return vocab, None
    start = lax.axis_index(opts.axis_name) * v_local
    return vocab, jnp.clip(vocab - start, 0, v_local).astype(jnp.int32)


def vocab_parallel_loss(hidden, kernel, bias, target, weight, eps, opts: Options):
    """Per-token losses over the whole vocabulary from per-device slices (see the module
    doc), with ``(valid, w_y)`` and, with ``opts.stats``, ``(lse, argmax)``."""
    axis_name, ignore_index = opts.axis_name, opts.ignore_index
    eps = checked_eps(eps)
    dtype = compute_dtype(hidden.dtype)
    v_local = kernel.shape[1]
    vocab, n_real = split_vocab(v_local, opts)
    valid, here, idx, w_y = shard_targets(
        target, weight, v_local, vocab, ignore_index, axis_name, dtype
    )
    lse_d, z_y_d, wz_d, top_d, arg_d = shard_stats(
        hidden, kernel, bias, idx, here, weight, n_real, eps is not None, opts
    )
    top = lax.pmax(lax.stop_gradient(lse_d), axis_name)
    top = jnp.where(jnp.isneginf(top), jnp.zeros_like(top), top)
    lse = top + jnp.log(lax.psum(jnp.exp(lse_d - top), axis_name))
    nll = lse - lax.psum(z_y_d, axis_name)
    smooth = None
    if eps is not None:
        sum_w = vocab
        if weight is not None:
            real = real_columns(0, v_local, n_real)
            local_w = mask_columns(weight.astype(dtype)[None, :], real, 0)
            sum_w = lax.psum(jnp.sum(local_w), axis_name)
        smooth = lse * sum_w - lax.psum(wz_d, axis_name)
    loss = combine_index_loss(valid, w_y, nll, smooth, eps, vocab)
    if not opts.stats:
        return loss, valid, w_y, None
    # Global argmax: the smallest global class among the devices holding the row max.
    best = lax.pmax(top_d, axis_name)
    first = jnp.iinfo(jnp.int32).max
    gidx = arg_d.astype(jnp.int32) + lax.axis_index(axis_name) * v_local
    arg = lax.pmin(jnp.where(top_d == best, gidx, first), axis_name)
    return loss, valid, w_y, (lse, arg)
