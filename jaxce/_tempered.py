"""Dense cross-entropy with a temperature and the softmax's entropy, from per-element
statistics.

Used by ``cross_entropy`` when ``temperature`` is given or the entropy is asked for.
:func:`dense_stats` is a ``custom_jvp`` returning per-element statistics of the tempered
logits ``z = softcap(x) / T`` along the class axis: the log-sum-exp, the target logit
``z_y`` (class indices), ``Σ_c w_c z_c`` (smoothing), ``Σ_c w_c t_c z_c`` and ``Σ_c w_c
t_c`` (class probabilities) and the entropy ``H = Σ_c p_c (lse - z_c)`` of ``p =
softmax(z)``. Its tangent is one pass over the logits, paired through ``lean_tangent``
with a hand-written transpose that recomputes ``p`` elementwise (the backward pass); the
residuals are the inputs plus the element-sized ``lse`` and ``H``. The losses are built
from the statistics by plain autodiff (the formulas of ``_fused.py``), so the derivatives
in ``T``, the class weights, ε and the probabilities come out exactly, to any order.

With ``z = s / T`` (``s`` the soft-capped logits), a cotangent ``G`` of ``z`` gives
``dx = G s' / T`` and ``dT = -Σ G z / T``; the entropy's gradient in ``z`` is ``-p (z -
Σ p z) = p (lse - z - H)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxce._backends import spelled, xla_cpu
from jaxce._derivatives import is_present, lean_tangent
from jaxce._options import Options, checked_eps, compute_dtype, promote_float_dtypes
from jaxce._rows import (
    class_ids,
    combine_index_loss,
    pick_class,
    reduce_to_classes,
    row_shift,
    softcap,
    softcap_slope,
    sum_weight,
    times_slope,
    weight_along,
)
from jaxce._targets import target_info, target_weight


def checked_temperature(temperature: Any, dtype: Any) -> Any:
    """``T`` in ``dtype``; a traced ``T`` that is not finite and > 0 becomes NaN (so is
    the loss), never a plausible finite value."""
    t = jnp.asarray(1.0 if temperature is None else temperature).astype(dtype)
    return jnp.where(jnp.isfinite(t) & (t > 0), t, jnp.full_like(t, jnp.nan))


class _Flags(NamedTuple):
    smooth: bool  # Σ w z is wanted
    entropy: bool  # H is wanted


def _dtype(x, probs):
    return compute_dtype(x.dtype if probs is None else promote_float_dtypes(x.dtype, probs.dtype))


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _add_reduce(operands, axis):
    """Sums same-shaped arrays along ``axis`` in one multi-output reduction (keepdims),
    each compensated (TwoSum: every addition's rounding error carried beside the sum).

    XLA:CPU runs a multi-output reduction as one sequential loop over the row, whose
    rounding error grows with its length: uncompensated, ``Σ e`` over 32,768 float32
    classes was off by 8.6e-6 (a plain ``jnp.sum``: 1.7e-7) and ``d/dT`` of the 'mean'
    loss of near-uniform rows by 1.8e-5 relative, 1.8e-7 compensated (jaxlib 0.10.2;
    ``benchmarks/temperature_grad_error.py``). Separate ``jnp.sum`` calls would be exact
    enough but make XLA:CPU materialise ``e`` (``tests/test_budgets.py``)."""
    k = len(operands)
    zeros = tuple(jnp.zeros((), op.dtype) for op in operands)

    def add(a, b):  # (sums, errors) + (sums, errors), the sums' rounding kept by TwoSum
        sums, errs = [], []
        for x, ex, y, ey in zip(a[:k], a[k:], b[:k], b[k:], strict=True):
            s = x + y
            back = s - x
            err = (x - (s - back)) + (y - back)
            sums.append(s)
            errs.append(ex + ey + err)
        return (*sums, *errs)

    out = lax.reduce((*operands, *(jnp.zeros_like(op) for op in operands)), zeros * 2, add, (axis,))
    return tuple(jnp.expand_dims(s + e, axis) for s, e in zip(out[:k], out[k:], strict=True))


def _add_reduce_jvp(axis, primals, tangents):
    # The sums' tangents are sums (a reduction with a custom computation has no
    # derivative rule of its own); second order differentiates through here.
    (operands,), (dots,) = primals, tangents
    out = _add_reduce(operands, axis)
    return out, tuple(jnp.sum(d, axis=axis, keepdims=True) for d in dots)


_add_reduce.defjvp(_add_reduce_jvp)


def _expand(v, axis):
    return None if v is None else jnp.expand_dims(v, axis)


@partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def dense_stats(x, idx, weight, probs, temperature, flags: _Flags, opts: Options):
    """``(lse, z_y, wz, tz, wt, ent)`` per element (``x``'s shape without ``opts.axis``) of
    ``z = softcap(x, opts.cap) / temperature``; ``z_y`` None without ``idx``, ``wz`` None
    without ``flags.smooth``, ``tz`` and ``wt`` None without ``probs``, ``ent`` None without
    ``flags.entropy``. Derivatives in ``x``, ``weight``, ``probs`` and ``temperature``
    (the symbolic zeros of the others are skipped)."""
    return _stats(x, idx, weight, probs, temperature, flags, opts)[0]


def _stats(x, idx, weight, probs, temperature, flags, opts, moments=False):
    """The statistics, and with ``moments`` (the temperature is differentiated) ``(mu,
    var)``: the softmax mean ``Σ p z`` and (with the entropy) variance of ``z``, from which
    the derivatives in ``T`` follow per element (``d lse / dT = -mu / T``, ``d H / dT =
    var / T``, the other statistics are homogeneous in ``1 / T``)."""
    axis, cap = opts.axis, opts.cap
    dtype = _dtype(x, probs)
    inv = 1 / temperature
    mx = jnp.max(x, axis=axis, keepdims=True).astype(dtype)
    m = row_shift(mx, cap) * inv
    z = softcap(x.astype(dtype), cap) * inv
    e = jnp.exp(z - m)
    z_y = wz = tz = wt = ent = extra = None
    if flags.entropy or moments:
        # H = log Σ e + Σ e (m - z) / Σ e with e = exp(z - m): two non-negative terms
        # (no cancellation), the sums in one multi-output reduction over the row. A -inf
        # logit adds 0 (e = 0; its m - z is read as 0, not inf).
        d = jnp.where(jnp.isneginf(z), jnp.zeros_like(z), m - z)
        second = (e * d * d,) if moments and flags.entropy else ()
        total, spread, *sq = _add_reduce((e, e * d, *second), axis)
        lse = m + jnp.log(total)
        if flags.entropy:
            ent = jnp.log(total) + spread / total
        if moments:
            mean_gap = spread / total  # E_p[m - z]
            var = sq[0] / total - mean_gap * mean_gap if sq else None
            extra = (m - mean_gap, var)
    else:
        lse = m + jnp.log(jnp.sum(e, axis=axis, keepdims=True))
    w = weight_along(weight, x.ndim, axis, dtype)
    if idx is not None:
        # XLA:CPU materialises the select of pick_class's masked sum here (512 MiB at
        # 4096 x 32768): its spelling gathers the target logit instead.
        pick = spelled(pick_class, {"axis": axis}, opts.implementation, xla_cpu=xla_cpu.take_class)
        z_y = softcap(pick(x, idx).astype(dtype), cap) * inv
    if flags.smooth:
        wz = jnp.sum(z if w is None else w * z, axis=axis, keepdims=True)
    if probs is not None:
        wtc = probs.astype(dtype) if w is None else w * probs.astype(dtype)
        tz = jnp.sum(wtc * z, axis=axis, keepdims=True)
        wt = jnp.sum(wtc, axis=axis, keepdims=True)
    out = tuple(None if v is None else jnp.squeeze(v, axis) for v in (lse, z_y, wz, tz, wt, ent))
    if extra is not None:
        extra = tuple(None if v is None else jnp.squeeze(v, axis) for v in extra)
    return out, extra


def _stats_jvp(flags, opts, primals, tangents):
    x, idx, weight, probs, temperature = primals
    dx, _, dw, dt, d_temp = tangents
    out, extra = _stats(x, idx, weight, probs, temperature, flags, opts, is_present(d_temp))
    dw = dw if (flags.smooth or probs is not None) and is_present(dw) else None
    dt = dt if probs is not None and is_present(dt) else None
    moving = tuple(o for o in out if o is not None)
    lse, ent = out[0], out[5]
    t_out = lean_tangent(
        lambda res, t: _tangent(res, t, flags, opts),
        lambda res, cts: _transpose(res, cts, flags, opts),
        (x, idx, weight, probs, temperature, lse, ent, extra, out[1:4]),
        (dx, dw, dt, d_temp),
        moving,
    )
    t_iter = iter(t_out)
    return out, tuple(None if o is None else next(t_iter) for o in out)


dense_stats.defjvp(_stats_jvp, symbolic_zeros=True)


def _recompute(res, opts):
    """The tempered logits ``z`` (-inf kept), ``z0`` (0 at -inf), the cap's slope, the
    class weights along the axis, the probabilities in the compute dtype and ``1 / T``."""
    x, _, weight, probs, temperature = res[:5]
    axis, cap = opts.axis, opts.cap
    dtype = _dtype(x, probs)
    inv = 1 / temperature
    # Read through a barrier (an alias, no copy): XLA then cannot merge this pass's
    # tempered logits with the forward pass's into one shared, materialised array.
    xf = lax.optimization_barrier(x).astype(dtype)
    z = softcap(xf, cap) * inv
    z0 = jnp.where(jnp.isneginf(z), jnp.zeros_like(z), z)
    w = weight_along(weight, x.ndim, axis, dtype)
    t = None if probs is None else probs.astype(dtype)
    return z, z0, softcap_slope(xf, cap), w, t, inv, dtype


def _tangent(res, tangents, flags, opts):
    x, idx, _, _, _, lse, ent, extra, (z_y, wz, tz) = res
    dx, dw, dt, d_temp = tangents
    axis = opts.axis
    z, z0, slope, w, t, inv, dtype = _recompute(res, opts)
    lse_k = jnp.expand_dims(lse, axis)

    def total(v):
        return jnp.sum(v, axis=axis)

    dz = None
    if dx is not None:
        dz = times_slope(dx.astype(dtype), slope) * inv
    zero = jnp.zeros_like(lse)
    d_lse = d_zy = d_wz = d_tz = d_wt = d_ent = zero
    if dz is not None:
        p = jnp.exp(z - lse_k)
        d_lse = total(p * dz)
        if idx is not None:
            d_zy = jnp.squeeze(pick_class(dz, idx, axis), axis)
        if flags.smooth:
            d_wz = total(dz if w is None else w * dz)
        if t is not None:
            d_tz = total((t if w is None else w * t) * dz)
        if flags.entropy:
            coef = p * (lse_k - z0 - jnp.expand_dims(ent, axis))
            d_ent = total(coef * dz)
    if dw is not None:
        dwc = weight_along(dw, x.ndim, axis, dtype)
        if flags.smooth:
            d_wz = d_wz + total(dwc * z0)
        if t is not None:
            d_tz = d_tz + total(dwc * t * z0)
            d_wt = d_wt + total(dwc * t)
    if dt is not None:
        dtc = dt.astype(dtype)
        wdt = dtc if w is None else w * dtc
        d_tz = d_tz + total(wdt * z0)
        d_wt = d_wt + total(wdt)
    if d_temp is not None:  # z = s / T: each statistic's derivative in T, per element
        c = d_temp.astype(dtype) * inv
        mu, var = extra
        d_lse = d_lse - c * mu
        d_zy = d_zy if z_y is None else d_zy - c * z_y
        d_wz = d_wz if wz is None else d_wz - c * wz
        d_tz = d_tz if tz is None else d_tz - c * tz
        d_ent = d_ent if var is None else d_ent + c * var
    on = (True, idx is not None, flags.smooth, t is not None, t is not None, flags.entropy)
    return tuple(v for v, o in zip((d_lse, d_zy, d_wz, d_tz, d_wt, d_ent), on, strict=True) if o)


def _transpose(res, cts, flags, opts):
    x, idx, weight, probs, temperature, lse, ent, extra, (z_y, wz, tz) = res
    axis = opts.axis
    cts = iter(cts)
    g_lse = next(cts)
    g_zy = next(cts) if idx is not None else None
    g_wz = next(cts) if flags.smooth else None
    g_tz = next(cts) if probs is not None else None
    g_wt = next(cts) if probs is not None else None
    g_ent = next(cts) if flags.entropy else None
    z, z0, slope, w, t, inv, _ = _recompute(res, opts)
    k = partial(_expand, axis=axis)
    # Rows whose softmax terms get no cotangent read p = exp(z - inf) = 0 (ignored rows).
    active = g_lse != 0 if g_ent is None else (g_lse != 0) | (g_ent != 0)
    p = jnp.exp(z - k(jnp.where(active, lse, lse + jnp.inf)))
    g = p * k(g_lse)
    if g_ent is not None:
        coef = p * (k(lse) - z0 - k(ent))
        g = g + coef * k(g_ent)
    if g_zy is not None:
        is_target = class_ids(x.shape, axis) == k(idx)
        g = g + jnp.where(is_target, k(g_zy), jnp.zeros_like(g))
    if g_wz is not None:
        g = g + (k(g_wz) if w is None else w * k(g_wz))
    if g_tz is not None:
        g = g + (t if w is None else w * t) * k(g_tz)
    dx = (times_slope(g, slope) * inv).astype(x.dtype)
    d_temp = None
    if extra is not None:  # dT = -Σ G z / T, from the per-element statistics
        mu, var = extra
        terms = [(g_lse, mu), (g_zy, z_y), (g_wz, wz), (g_tz, tz), (g_ent, var)]
        total = 0
        for ct, stat in terms:
            if ct is not None and stat is not None:
                sign = -1 if stat is var else 1
                term = jnp.where(ct != 0, ct * stat, jnp.zeros_like(stat))
                total = total + sign * jnp.sum(term)
        d_temp = (-inv * total).astype(temperature.dtype)
    dw = dt = None
    if weight is not None and (g_wz is not None or g_tz is not None):
        spread = 0
        if g_wz is not None:
            spread = spread + k(g_wz) * z0
        if g_tz is not None:
            spread = spread + t * (k(g_tz) * z0 + k(g_wt))
        dw = reduce_to_classes(spread, axis).astype(weight.dtype)
    if probs is not None:
        by_t = k(g_tz) * z0 + k(g_wt)
        dt = (by_t if w is None else w * by_t).astype(probs.dtype)
    return dx, dw, dt, d_temp


def index_tempered_loss(x, target, weight, eps, temperature, opts: Options, entropy: bool):
    """``(loss, lse, ent)`` per element for class-index targets (``ent`` None unless
    ``entropy``): the formulas of ``_index.py`` on ``z = softcap(x) / T``, built from
    :func:`dense_stats`."""
    eps = checked_eps(eps)
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[opts.axis]
    info = target_info(target, num_classes, opts.ignore_index)
    temp = checked_temperature(temperature, dtype)
    flags = _Flags(smooth=eps is not None, entropy=entropy)
    lse, z_y, wz, _, _, ent = dense_stats(x, info.idx, weight, None, temp, flags, opts)
    smooth = None
    if eps is not None:
        smooth = lse * sum_weight(weight, num_classes, dtype) - wz
    w_y = target_weight(weight, info, dtype)
    loss = combine_index_loss(info.valid, w_y, lse - z_y, smooth, eps, num_classes)
    return loss, lse, ent


def prob_tempered_loss(x, target, weight, eps, temperature, opts: Options, entropy: bool):
    """``(loss, lse, ent)`` per element for class-probability targets: ``W lse - S`` with
    ``W = Σ_c w_c t'_c`` and ``S = Σ_c w_c t'_c z_c`` (``t' = (1 - eps) t + eps / C``) on
    ``z = softcap(x) / T``, built from :func:`dense_stats`."""
    eps = checked_eps(eps)
    dtype = _dtype(x, target)
    num_classes = x.shape[opts.axis]
    temp = checked_temperature(temperature, dtype)
    flags = _Flags(smooth=eps is not None, entropy=entropy)
    lse, _, wz, tz, wt, ent = dense_stats(x, None, weight, target, temp, flags, opts)
    big_w, s = wt, tz
    if eps is not None:
        keep, spread = 1 - eps.astype(dtype), eps.astype(dtype) / num_classes
        big_w = keep * big_w + spread * sum_weight(weight, num_classes, dtype)
        s = keep * s + spread * wz
    return big_w * lse - s, lse, ent
