"""Per-element cross-entropy for class-index targets, with lean derivatives in every mode.

:func:`index_loss` is a ``jax.custom_jvp``: ``_fwd`` computes the loss and the residuals
(the inputs plus element-sized statistics: the log-sum-exp, the NLL and the smoothing
sum), ``_tangent`` the loss tangent (forward mode), and ``_bwd`` -- the tangent's
transpose, written by hand -- is what reverse mode runs (see ``_derivatives.py``). The
backward pass recomputes ``softmax = exp(z - lse)`` inside one elementwise pass: no
softmax, log-softmax, one-hot or upcast copy of the logits is saved. Everything is plain
differentiable JAX, so second-order derivatives compose.

The passes over the logits are ``_rows``'s portable ones, or a backend's spelling of the
same pass (``_backends``), chosen at lowering.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _rows
from jaxce._backends import spelled, xla_cpu, xla_gpu
from jaxce._derivatives import lean_jvp_rule
from jaxce._options import Options, checked_eps, compute_dtype
from jaxce._targets import target_info, target_weight


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def index_loss(x: Any, target: Any, weight: Any, eps: Any, opts: Options) -> Any:
    """Per-element loss for class-index targets; 0 at ignored elements.

    ``l_n = (1 - eps) w[y_n] (lse_n - z_{n,y_n}) + (eps / C) Σ_c w_c (lse_n - z_{n,c})``
    for non-ignored ``n`` (``eps`` None: no smoothing term), ``z`` the logits soft-capped
    by ``opts.cap``. Shape: ``target.shape``, in the compute dtype. With ``opts.stats``:
    ``(loss, lse, argmax)``, also the per-element log-sum-exp of ``z`` (differentiable:
    its gradient is the softmax) and the first maximal class of the raw logits (int32).
    """
    return _fwd(x, target, weight, eps, opts)[0]


class _Res(NamedTuple):
    x: Any
    target: Any
    weight: Any
    eps: Any
    lse: Any  # per element
    nll: Any  # lse - z_y per element
    smooth: Any  # Σ_c w_c (lse - z_c) per element (None without smoothing)


def _row_stats(x, idx, weight, opts, smooth, dtype):
    static = dict(axis=opts.axis, cap=opts.cap, smooth=smooth, dtype=dtype)
    row_stats = spelled(
        _rows.index_row_stats, static, opts.implementation, xla_cpu=xla_cpu.index_row_stats
    )
    return row_stats(x, idx, weight)


def _fwd(x, target, weight, eps, opts):
    eps = checked_eps(eps)
    axis = opts.axis
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[axis]
    info = target_info(target, num_classes, opts.ignore_index)
    stats = _row_stats(x, info.idx, weight, opts, eps is not None, dtype)
    lse = jnp.squeeze(stats.lse, axis)
    nll = jnp.squeeze(stats.lse - stats.z_y, axis)
    smooth = None
    if eps is not None:
        smooth = jnp.squeeze(_rows.smoothing_sum(stats, weight, num_classes, dtype), axis)
    w_y = target_weight(weight, info, dtype)
    loss = _rows.combine_index_loss(info.valid, w_y, nll, smooth, eps, num_classes)
    res = _Res(x, target, weight, eps, lse, nll, smooth)
    if opts.stats:
        return (loss, lse, jnp.argmax(x, axis=axis).astype(jnp.int32)), res
    return loss, res


def _bwd(opts, res: _Res, ct):
    """Cotangents ``(dx, -, dweight, deps)`` of the loss (and ``lse``) cotangent ``ct``."""
    x, target, weight, eps, lse, nll, smooth = res
    g, g_lse = ct if opts.stats else (ct, None)
    axis = opts.axis
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[axis]
    info = target_info(target, num_classes, opts.ignore_index)
    w_y = target_weight(weight, info, dtype)
    g = g.astype(dtype)
    rows = _rows.index_grad_rows(g, info.valid, w_y, lse, eps, weight, num_classes, dtype, g_lse)
    static = dict(axis=axis, cap=opts.cap, dtype=dtype)
    dense_grad = spelled(
        _rows.index_dense_grad,
        static,
        opts.implementation,
        xla_cpu=xla_cpu.index_dense_grad,
        xla_gpu=xla_gpu.index_dense_grad,
    )
    dx = dense_grad(x, info.idx, _rows.expand_rows(rows, axis), weight)

    dweight = None
    if weight is not None:
        z = None if rows.b is None else _rows.softcap(x.astype(dtype), opts.cap)
        at_target, spread = _rows.weight_grad_terms(
            g, info.valid, rows.keep, nll, rows.b, lse, z, axis
        )
        dweight = (
            jnp.zeros((num_classes,), dtype).at[info.idx.reshape(-1)].add(at_target.reshape(-1))
        )
        if spread is not None:
            dweight = dweight + _rows.reduce_to_classes(spread, axis)
        dweight = dweight.astype(weight.dtype)
    deps = _rows.index_eps_grad(g, info.valid, w_y, nll, smooth, eps, num_classes)
    return dx, None, dweight, deps


def _tangent(opts, res: _Res, tangents):
    """``d l_n`` (and with ``stats`` ``d lse_n``) for tangents ``(dx, -, dweight, deps)``
    (None: zero); the transpose of ``_bwd`` in its cotangent."""
    x, target, weight, eps, lse, nll, smooth = res
    dx, _, dweight, deps = tangents
    axis = opts.axis
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[axis]
    info = target_info(target, num_classes, opts.ignore_index)
    w_y = target_weight(weight, info, dtype)
    zero = jnp.zeros_like(lse)
    rows = _rows.index_grad_rows(
        jnp.ones_like(lse), info.valid, w_y, lse, eps, weight, num_classes, dtype
    )
    xf = x.astype(dtype)
    z = _rows.softcap(xf, opts.cap)
    out = zero
    d_lse = zero
    if dx is not None:
        dxf = _rows.times_slope(dx.astype(dtype), _rows.softcap_slope(xf, opts.cap))
        p = jnp.exp(z - jnp.expand_dims(rows.lse_for_p, axis))
        dx_y = jnp.squeeze(jnp.take_along_axis(dxf, jnp.expand_dims(info.idx, axis), axis), axis)
        t = rows.coef * jnp.sum(p * dxf, axis=axis) - rows.a * dx_y
        if rows.b is not None:
            w = _rows.weight_along(weight, x.ndim, axis, dtype)
            t = t - rows.b * jnp.sum(dxf if w is None else w * dxf, axis=axis)
        out = out + t
        if opts.stats:
            d_lse = jnp.sum(jnp.exp(z - jnp.expand_dims(lse, axis)) * dxf, axis=axis)
    if dweight is not None:
        dw = dweight.astype(dtype)
        t = rows.keep * nll * dw[info.idx]
        if rows.b is not None:
            gap = jnp.expand_dims(lse, axis) - z
            dw_c = _rows.weight_along(dw, x.ndim, axis, dtype)
            t = t + rows.b * jnp.sum(dw_c * gap, axis=axis)
        out = out + jnp.where(info.valid, t, zero)
    if deps is not None:
        eps_rows = _rows.index_eps_rows(info.valid, w_y, nll, smooth, num_classes)
        out = out + eps_rows * deps.astype(dtype)
    return (out, d_lse) if opts.stats else out


index_loss.defjvp(lean_jvp_rule(_fwd, _tangent, _bwd), symbolic_zeros=True)
