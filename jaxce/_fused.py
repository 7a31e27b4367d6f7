"""The one fused linear + cross-entropy core: ``hidden @ kernel + bias`` never materialised,
on one device or with the vocabulary split over a ``shard_map`` mesh axis.

``shard_stats`` walks the kernel's vocabulary columns in chunks (``_chunked.chunk_stats``:
never even a ``[tokens, chunk]`` block beyond one chunk) and returns per-token statistics
of the (soft-capped) logits only: the log-sum-exp, the target logit (class indices), and,
with smoothing or class probabilities, the weighted sums ``Σ_c w_c z_c``, ``Σ_c w_c t_c
z_c`` and ``Σ_c w_c t_c``. The per-token losses are built from them with the same
formulas as the dense losses -- ``lse - z_y`` and the smoothing term for class indices
(:func:`index_linear_loss`), ``W lse - S`` for class probabilities
(:func:`prob_linear_loss`) -- so every option (weight, ignore_index, label smoothing,
soft-cap, reductions, aux outputs) matches ``cross_entropy`` of the materialised logits.

Vocabulary parallelism (``opts.axis_name``): each member of the mesh axis holds a
contiguous slice of the vocabulary (``kernel[:, r*V_local:(r+1)*V_local]``, the layout of
``P(None, axis_name)``; class probabilities and class weights likewise), its statistics
cover that slice, and the per-token statistics are combined with ``pmax``/``psum`` of
``[tokens]`` vectors -- O(tokens) communication. Without an axis the same code runs over
the one device's whole vocabulary.

Derivatives: ``shard_stats`` is a ``custom_jvp`` whose tangent (one chunked pass) is
paired, through ``linear_map``, with a hand-written chunked transpose (the backward pass:
it recomputes each chunk's logits, writes that chunk's ``dkernel`` slice and accumulates
``dhidden`` in float32 -- four vocabulary matmuls in all, against three for the
materialised loss); everything around it (the per-token formulas, the cross-device
combination) is plain autodiff, which gives the derivatives in ``weight``, ``eps`` and the
targets. The gradient w.r.t. a ``hidden`` replicated over the axis is summed across it by
``linear_map``'s cast. Live memory: a few ``[tokens, chunk]`` float32 blocks plus a float32
``[tokens, D]`` accumulator for 16-bit inputs; no ``[tokens, vocab]`` array and no float32
copy of the kernel.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxce._chunked import (
    CHUNK_BYTES,
    accumulate_chunk_grads,
    chunk_classes,
    chunk_logits,
    chunk_logits_tangent,
    chunk_stats,
    chunks,
    kernel_covers,
    kernel_grads,
    mask_columns,
    real_columns,
    vocab_loop,
    weight_chunk,
    zero_grads,
)
from jaxce._compat import cast_varying, varying_axes
from jaxce._derivatives import is_present, lean_tangent
from jaxce._options import Options, checked_eps, compute_dtype
from jaxce._rows import combine_index_loss, softcap, softcap_slope, times_slope
from jaxce._targets import nan_if_out_of_range, target_info


def _parts(kernel, start, size, dtype, hidden, bias, cap, n_real, inv, implementation):
    """A chunk's raw logits, its (soft-capped, divided by the temperature: times ``inv``
    unless None) logits (-inf at padding columns), its local class ids and which columns
    are real (None: all)."""
    real = real_columns(start, size, n_real)
    raw = chunk_logits(hidden, kernel, bias, start, size, dtype, implementation)
    cls = chunk_classes(start, size)
    z = softcap(raw, cap) if inv is None else softcap(raw, cap) * inv
    return raw, mask_columns(z, real, -jnp.inf), cls, real


@partial(jax.custom_jvp, nondiff_argnums=(9, 10))
def shard_stats(
    hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, with_wz, opts: Options
):
    """``(lse_d, z_y_d, wz_d, tz_d, wt_d, top_d, arg_d, ent_d)`` over this device's vocabulary
    slice: log-sum-exp, target logit (valid where ``here``; ``idx`` is the local target
    index; None without ``idx``), ``Σ w z`` (None without ``with_wz``), and ``Σ w t z`` and
    ``Σ w t`` for class probabilities ``probs [N, V_local]`` (None without ``probs``) of the
    (capped) logits,
    and the raw logits' row max and its local class (None unless ``opts.stats``; no
    derivative), and the entropy ``Σ_c p_c (lse_d - z_c)`` of the slice's softmax (None
    unless ``opts.entropy``). ``n_real``: None, or how many of the slice's columns are
    real classes (the rest pad an uneven split). ``temperature``: None, or ``T`` (a
    scalar): every statistic is that of ``z / T`` (after the cap), differentiable in ``T``.

    Derivatives in ``hidden``, ``kernel``, ``bias``, ``weight``, ``probs`` and
    ``temperature``; the tangent
    and its transpose compute only the terms of the inputs that are differentiated
    (symbolic zeros), so a weight or target gradient costs nothing unless asked for.
    """
    return _stats(
        hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, with_wz, opts
    )


def _stats(hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, with_wz, opts):
    lse, z_y, wz, tz, wt, top, arg, *ent = chunk_stats(
        hidden, kernel, bias, idx, here, weight, with_wz, opts, n_real, probs,
        temperature, opts.entropy,
    )  # fmt: skip
    if opts.stats:
        # The class as a float (exact below 2**24 classes): a float output can take the zero
        # tangent of its own (shard_map-varying) type; an integer's float0 tangent cannot.
        arg = arg.astype(lse.dtype)
    return lse, z_y, wz, tz, wt, top, arg, (ent[0] if ent else None)


def _stats_jvp(with_wz, opts, primals, tangents):
    hidden, kernel, bias, idx, here, weight, probs, n_real, temperature = primals
    out = _stats(hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, with_wz, opts)
    dh, dk, db, _, _, dw, dt, _, d_temp = tangents
    # The weight moves wz, tz and wt; the probabilities move tz and wt.
    dw = dw if (with_wz or probs is not None) and is_present(dw) else None
    dt = dt if probs is not None and is_present(dt) else None
    d_temp = d_temp if temperature is not None and is_present(d_temp) else None
    # The transpose forms only these.
    wanted = (dw is not None, dt is not None, d_temp is not None)
    moving_out = (*out[:5], out[7])
    moving = tuple(o for o in moving_out if o is not None)
    # Inside shard_map: the mesh axes each differentiable input varies over (the transpose
    # sums each gradient over the other axes itself; see _transpose).
    homes = tuple(
        frozenset() if x is None else varying_axes(x)
        for x in (hidden, kernel, bias, weight, probs, temperature)
    )
    widths = (opts.chunk, opts.chunk_by)
    t_out = lean_tangent(
        lambda res, t: _tangent(res, t, with_wz, widths, opts.cap, opts.implementation),
        lambda res, cts: _transpose(
            res, cts, wanted, homes, with_wz, widths, opts.cap, opts.implementation
        ),
        (hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, out[0], out[7]),
        (dh, dk, db, dw, dt, d_temp),
        moving,
        sums=True,
    )
    t_iter = iter(t_out)
    tangent = [None if o is None else next(t_iter) for o in moving_out]
    top_arg = (jnp.zeros_like(out[5]), jnp.zeros_like(out[6])) if opts.stats else (None, None)
    return out, (*tangent[:5], *top_arg, tangent[5])


shard_stats.defjvp(_stats_jvp, symbolic_zeros=True)


def _tangent(res, tangents, with_wz, widths, cap, implementation):
    hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, lse, ent = res
    dh, dk, db, dw, dt, d_temp = tangents
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    w = None if weight is None else weight.astype(dtype)
    dw = None if dw is None else dw.astype(dtype)
    inv = None if temperature is None else 1 / temperature

    def body(start, size, acc, hidden, kernel, dk, probs, dt):
        d_lse, d_zy, d_wz, d_tz, d_wt, d_ent = acc
        raw, z, cls, real = _parts(
            kernel, start, size, dtype, hidden, bias, cap, n_real, inv, implementation
        )
        z0 = mask_columns(z, real, 0)
        wc = weight_chunk(w, start, size)
        tc = None if probs is None else weight_chunk(probs, start, size).astype(dtype)
        dz = chunk_logits_tangent(hidden, kernel, dh, dk, db, start, size, dtype)
        if dz is not None:
            dz = mask_columns(times_slope(dz, softcap_slope(raw, cap)), real, 0)
            dz = dz if inv is None else dz * inv
        if d_temp is not None:  # z = s / T: dz = -z dT / T
            by_t = -z0 * (d_temp.astype(dtype) * inv)
            dz = by_t if dz is None else dz + by_t
        if dz is not None:  # None: only the weight or the probabilities move
            p = jnp.exp(z - lse[:, None])
            d_lse = d_lse + jnp.sum(p * dz, axis=1)
            if ent is not None:
                d_ent = d_ent + jnp.sum(p * (lse[:, None] - z0 - ent[:, None]) * dz, axis=1)
            if idx is not None:
                hit = here[:, None] & (cls == idx[:, None])
                d_zy = d_zy + jnp.sum(jnp.where(hit, dz, 0), axis=1)
            if with_wz:
                d_wz = d_wz + jnp.sum(wc * dz, axis=1)
            if tc is not None:
                d_tz = d_tz + jnp.sum(wc * tc * dz, axis=1)
        if dw is not None:
            dwc = weight_chunk(dw, start, size)
            if with_wz:
                d_wz = d_wz + jnp.sum(dwc * z0, axis=1)
            if tc is not None:
                d_tz = d_tz + jnp.sum(dwc * tc * z0, axis=1)
                d_wt = d_wt + jnp.sum(mask_columns(dwc * tc, real, 0), axis=1)
        if dt is not None:
            dtc = weight_chunk(dt, start, size).astype(dtype)
            d_tz = d_tz + jnp.sum(wc * dtc * z0, axis=1)
            d_wt = d_wt + jnp.sum(mask_columns(wc * dtc, real, 0), axis=1)
        return d_lse, d_zy, d_wz, d_tz, d_wt, d_ent

    zero = jnp.zeros_like(lse)
    pinned = (hidden, kernel, dk, probs, dt)
    out = vocab_loop(vocab, widths, body, (zero,) * 6, pinned, implementation)
    on = (True, idx is not None, with_wz, probs is not None, probs is not None, ent is not None)
    return tuple(t for t, o in zip(out, on, strict=True) if o)


def _transpose(res, cts, wanted, homes, with_wz, widths, cap, implementation):
    """The chunked backward pass: ``(dhidden, dkernel, dbias, dweight, dprobs, dtemperature)``.

    Inside ``shard_map`` each gradient comes back with its input's own type (``homes``:
    the mesh axes each input varies over), summed over the axes that the input is
    replicated over: each kernel chunk's gradient as it is formed (a ``[D, chunk]``
    all-reduce per chunk, in float32: no whole partial ``[D, V_local]`` kernel gradient is
    held), ``dhidden``'s float32 accumulator once at the end, the small ones at the end.
    """
    hidden, kernel, bias, idx, here, weight, probs, n_real, temperature, lse, ent = res
    cts = iter(cts)
    g_lse = next(cts)
    g_zy = next(cts) if idx is not None else None
    g_wz = next(cts) if with_wz else None
    g_tz = next(cts) if probs is not None else None
    g_wt = next(cts) if probs is not None else None
    g_ent = next(cts) if ent is not None else None
    want_dw, want_dt, want_d_temp = wanted
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    w = None if weight is None else weight.astype(dtype)
    inv = None if temperature is None else 1 / temperature
    # The cases pallas_tpu's kernel covers (pallas_tpu.py); the rest run the passes below.
    kernel_step = (
        implementation == "pallas_tpu"
        and probs is None
        and g_ent is None
        and temperature is None
        and n_real is None
        and not any(wanted)
        and dtype == jnp.float32
        and kernel_covers(hidden, kernel)
    )

    def body(start, size, carry, hidden, kernel, probs):
        dh, dk, db, dw, dt, d_temp, sink = carry
        raw, z, cls, real = _parts(
            kernel, start, size, dtype, hidden, bias, cap, n_real, inv, implementation
        )
        z0 = mask_columns(z, real, 0)
        wc = weight_chunk(w, start, size)
        tc = None if probs is None else weight_chunk(probs, start, size).astype(dtype)
        p = jnp.exp(z - lse[:, None])
        dz = p * g_lse[:, None]
        if g_ent is not None:
            dz = dz + p * (lse[:, None] - z0 - ent[:, None]) * g_ent[:, None]
        if g_zy is not None:
            dz = dz + jnp.where(here[:, None] & (cls == idx[:, None]), g_zy[:, None], 0)
        if g_wz is not None:
            dz = dz + wc * g_wz[:, None]
        if g_tz is not None:
            dz = dz + wc * tc * g_tz[:, None]
        if d_temp is not None:  # dT = -Σ G z / T, G the cotangent of z
            d_temp = d_temp + jnp.sum(mask_columns(dz, real, 0) * z0)
        dz = mask_columns(times_slope(dz, softcap_slope(raw, cap)), real, 0)
        dz = dz if inv is None else dz * inv
        dh, dk, db = accumulate_chunk_grads(
            hidden, kernel, dz, start, size, dh, dk, db, dtype, implementation, k_sum
        )
        # d/d(w_c t_c) of g_tz * tz + g_wt * wt, shared by the weight and target gradients.
        by_wt = None
        if g_tz is not None and (dw is not None or dt is not None):
            by_wt = g_tz[:, None] * z0 + g_wt[:, None]
        if dw is not None:
            spread = 0
            if g_wz is not None:
                spread = spread + g_wz[:, None] * z0
            if by_wt is not None:
                spread = spread + mask_columns(tc * by_wt, real, 0)
            dw_c = jnp.sum(spread, axis=0)
            dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, 0)
        if dt is not None:
            dt_c = mask_columns(wc * by_wt, real, 0)
            dt = lax.dynamic_update_slice_in_dim(dt, dt_c.astype(dt.dtype), start, 1)
        return dh, dk, db, dw, dt, d_temp, sink

    every = varying_axes(hidden)  # the residuals vary over every axis (linear_map)
    k_sum = tuple(sorted(every - homes[1]))
    dh, dk, db, dw = zero_grads(hidden, kernel, bias, weight if want_dw else None, dtype)
    dk = cast_varying(jnp.zeros(kernel.shape, kernel.dtype), homes[1])
    dt = jnp.zeros_like(probs) if want_dt else None
    d_temp = jnp.zeros((), dtype) if want_d_temp else None
    # A float scalar in the carry: chunk_loop's exact zero (where the implementation adds
    # one) lands on the smallest float array of the carry, which without it is dh, and the
    # TPU compiler writes dh + 0 to a second [tokens, D] float32 buffer when a loop reads it
    # (the sum below; 128 MiB per chip on 2 x 2 v5p chips at 16384 x 4096 x 131072, libtpu
    # 0.0.52). Added to each block of dh as it is read instead.
    # Of the residuals' type, as the zero it may receive (else the spellings' types differ).
    sink = cast_varying(jnp.zeros((), dtype), every)
    if kernel_step:  # then dw, dt and d_temp are None
        dh, dk, db, sink = kernel_grads(
            hidden, kernel, bias, w, idx, here, lse, g_lse, g_zy, g_wz, dh, dk, db, sink,
            cap=cap, dtype=dtype, widths=widths, implementation=implementation,
            kernel_sum=k_sum,
        )  # fmt: skip
    else:
        init = (dh, dk, db, dw, dt, d_temp, sink)
        dh, dk, db, dw, dt, d_temp, sink = vocab_loop(
            vocab, widths, body, init, (hidden, kernel, probs), implementation
        )
    h_home, _, b_home, w_home, t_home, temp_home = homes
    dh = _sum_over_replicas(dh, every, h_home, hidden.dtype, sink)
    db, dw, dt = (
        None if g is None else _sum_over_replicas(g, every, home, g.dtype)
        for g, home in ((db, b_home), (dw, w_home), (dt, t_home))
    )
    if d_temp is not None:
        d_temp = cast_varying(-inv * d_temp, every)
        axes = tuple(sorted(every - temp_home))
        d_temp = (lax.psum(d_temp, axes) if axes else d_temp).astype(temperature.dtype)
    return dh, dk, db, dw, dt, d_temp


def _sum_over_replicas(g, every, home, dtype, zero=None):
    """The gradient ``g`` (per device, varying over the mesh axes ``every``) of an input
    that varies over ``home`` only: summed over the other axes, plus ``zero`` (None, or a
    scalar 0), cast to ``dtype``.

    The sum goes a block of rows at a time (about ``CHUNK_BYTES``) into a ``dtype`` result
    of ``home``'s type: an all-reduce of the whole of ``g`` holds a second ``g``-sized
    buffer (measured on TPU v5p, libtpu 0.0.52: a second float32 ``[tokens, D]``, 128 MiB
    per chip at 16384 x 4096 x 131072 over 2 x 2 chips)."""
    g = cast_varying(g, every)
    axes = tuple(sorted(every - home))
    if not axes:
        return (g if zero is None else g + zero).astype(dtype)
    row = g.dtype.itemsize * math.prod(g.shape[1:])
    rows = max(1, min(g.shape[0], CHUNK_BYTES // max(row, 1)))

    def body(start, size, out):
        block = lax.dynamic_slice_in_dim(g, start, size, axis=0)
        block = lax.psum(block if zero is None else block + zero, axes)
        return lax.dynamic_update_slice_in_dim(out, block.astype(dtype), start, axis=0)

    out = cast_varying(jnp.zeros(g.shape, dtype), home)
    parts = chunks(g.shape[0], rows)
    full = [c for c in parts if c[1] == rows]
    out = lax.fori_loop(0, len(full), lambda i, out: body(i * rows, rows, out), out)
    for start, size in parts[len(full) :]:
        out = body(start, size, out)
    return out


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
    local = info.idx if axis_name is None else info.idx - lax.axis_index(axis_name) * v_local
    here = valid & info.in_range & (local >= 0) & (local < v_local)
    idx = jnp.where(here, local, 0)
    if weight is None:
        w_y = jnp.ones(target.shape, dtype)
    else:
        picked = weight.astype(dtype)[idx]
        w_y = _total(jnp.where(here, picked, jnp.zeros_like(picked)), axis_name)
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


def _combine_lse(lse_d, axis_name):
    """The log-sum-exp over every device's slice from each one's own (``axis_name`` None:
    the one device's)."""
    if axis_name is None:
        return lse_d
    top = lax.pmax(lax.stop_gradient(lse_d), axis_name)
    top = jnp.where(jnp.isneginf(top), jnp.zeros_like(top), top)
    return top + jnp.log(lax.psum(jnp.exp(lse_d - top), axis_name))


def _global_argmax(top_d, arg_d, v_local, axis_name):
    """The global first argmax from each device's row max ``top_d`` and its local class
    ``arg_d``: the smallest global class among the devices holding the row max."""
    arg_d = arg_d.astype(jnp.int32)
    if axis_name is None:
        return arg_d
    best = lax.pmax(top_d, axis_name)
    first = jnp.iinfo(jnp.int32).max
    gidx = arg_d + lax.axis_index(axis_name) * v_local
    return lax.pmin(jnp.where(top_d == best, gidx, first), axis_name)


def _total(v, axis_name):
    return v if axis_name is None else lax.psum(v, axis_name)


def _combine_entropy(lse_d, ent_d, lse, axis_name):
    """The entropy over every device's slice from each one's own: ``Σ_d π_d (H_d + lse -
    lse_d)`` with ``π_d = exp(lse_d - lse)`` (non-negative terms; ``axis_name`` None: the
    one device's)."""
    if axis_name is None:
        return ent_d
    share = jnp.exp(lse_d - lse)
    part = share * (ent_d + lse - lse_d)
    return lax.psum(jnp.where(share > 0, part, jnp.zeros_like(part)), axis_name)


def index_linear_loss(hidden, kernel, bias, target, weight, eps, opts: Options, temperature=None):
    """Per-token losses of ``hidden [N, D] @ kernel + bias`` against class indices
    ``target [N]`` (global indices; ``kernel`` this device's slice with ``opts.axis_name``,
    see the module doc), with ``(valid, w_y)`` and, with ``opts.stats``, ``(lse,
    argmax)`` (``(lse, argmax, entropy)`` with ``opts.entropy``). ``temperature``: None,
    or ``T``: the logits are ``softcap(hidden @ kernel + bias) / T``."""
    axis_name, ignore_index = opts.axis_name, opts.ignore_index
    eps = checked_eps(eps)
    dtype = compute_dtype(hidden.dtype)
    v_local = kernel.shape[1]
    vocab, n_real = (v_local, None) if axis_name is None else split_vocab(v_local, opts)
    valid, here, idx, w_y = shard_targets(
        target, weight, v_local, vocab, ignore_index, axis_name, dtype
    )
    lse_d, z_y_d, wz_d, _, _, top_d, arg_d, ent_d = shard_stats(
        hidden, kernel, bias, idx, here, weight, None, n_real, temperature, eps is not None, opts
    )
    lse = _combine_lse(lse_d, axis_name)
    nll = lse - _total(z_y_d, axis_name)
    smooth = None
    if eps is not None:
        smooth = lse * _class_weight_sum(weight, v_local, vocab, n_real, axis_name, dtype)
        smooth = smooth - _total(wz_d, axis_name)
    loss = combine_index_loss(valid, w_y, nll, smooth, eps, vocab)
    if not opts.stats:
        return loss, valid, w_y, None
    stats = (lse, _global_argmax(top_d, arg_d, v_local, axis_name))
    if opts.entropy:
        stats = (*stats, _combine_entropy(lse_d, ent_d, lse, axis_name))
    return loss, valid, w_y, stats


def _class_weight_sum(weight, v_local, vocab, n_real, axis_name, dtype):
    """``Σ_c w_c`` over the real classes of every slice (``vocab`` if unweighted)."""
    if weight is None:
        return vocab
    real = real_columns(0, v_local, n_real)
    return _total(jnp.sum(mask_columns(weight.astype(dtype)[None, :], real, 0)), axis_name)


def prob_linear_loss(hidden, kernel, bias, probs, weight, eps, opts: Options, temperature=None):
    """Per-token losses ``Σ_c w_c t'_c (lse - z_c)`` of ``hidden [N, D] @ kernel + bias``
    against class probabilities ``probs [N, V]`` (``t' = (1 - eps) t + eps / V``), as
    :func:`jaxce._prob.prob_loss` on those logits; and, with ``opts.stats``, ``(lse,
    argmax, hit)`` (``hit``: the argmax is the target's; ``(lse, argmax, hit, entropy)``
    with ``opts.entropy``). ``temperature`` as in :func:`index_linear_loss`.

    With ``opts.axis_name`` (inside ``shard_map``), ``kernel``, ``bias``, ``weight`` and
    ``probs`` are this device's vocabulary slice and the per-token statistics are combined
    across the axis; without it, one device holds the whole vocabulary. Both run the
    vocabulary-chunked :func:`shard_stats`: ``loss = W lse - S`` with ``W = Σ_c w_c t'_c``
    and ``S = Σ_c w_c t'_c z_c = (1 - eps) Σ_c w_c t_c z_c + eps / V Σ_c w_c z_c``, so the
    derivatives in ``eps``, ``weight`` and the probabilities are autodiff's through these
    per-token sums and :func:`shard_stats`'s own (nothing ``[N, V]`` is formed unless the
    probabilities themselves are differentiated).
    """
    axis_name = opts.axis_name
    eps = checked_eps(eps)
    dtype = compute_dtype(hidden.dtype)
    v_local = kernel.shape[1]
    vocab, n_real = (v_local, None) if axis_name is None else split_vocab(v_local, opts)
    lse_d, _, wz_d, tz_d, wt_d, top_d, arg_d, ent_d = shard_stats(
        hidden, kernel, bias, None, None, weight, probs, n_real, temperature, eps is not None, opts
    )
    lse = _combine_lse(lse_d, axis_name)
    real = real_columns(0, v_local, n_real)
    big_w, s = _total(wt_d, axis_name), _total(tz_d, axis_name)
    if eps is not None:
        keep, spread = 1 - eps.astype(dtype), eps.astype(dtype) / vocab
        sum_w = _class_weight_sum(weight, v_local, vocab, n_real, axis_name, dtype)
        big_w = keep * big_w + spread * sum_w
        s = keep * s + spread * _total(wz_d, axis_name)
    loss = big_w * lse - s
    if not opts.stats:
        return loss, None
    arg = _global_argmax(top_d, arg_d, v_local, axis_name)
    t_arg = target_argmax(probs, real, v_local, axis_name, dtype)
    if opts.entropy:
        return loss, (lse, arg, arg == t_arg, _combine_entropy(lse_d, ent_d, lse, axis_name))
    return loss, (lse, arg, arg == t_arg)


def target_argmax(probs, real, v_local, axis_name, dtype):
    """The first class of largest probability in each row of ``probs [N, V_local]`` (this
    device's slice; ``real``: its real columns), global over ``axis_name``."""
    t_max = mask_columns(lax.stop_gradient(probs), real, -jnp.inf)
    return _global_argmax(
        jnp.max(t_max, axis=1).astype(dtype), jnp.argmax(t_max, axis=1), v_local, axis_name
    )
