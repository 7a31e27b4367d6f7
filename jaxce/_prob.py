"""Per-element cross-entropy for class-probability targets, with lean derivatives.

The same construction as ``_index.py``: a ``jax.custom_jvp`` whose residuals are the
inputs plus the per-element log-sum-exp and ``q = Σ_c w_c t'_c``, and whose hand-written
backward pass recomputes the softmax elementwise.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxce import _rows
from jaxce._backends import spelled, xla_cpu, xla_gpu
from jaxce._derivatives import lean_jvp_rule
from jaxce._options import Options, checked_eps, compute_dtype, promote_float_dtypes


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def prob_loss(x: Any, target: Any, weight: Any, eps: Any, opts: Options) -> Any:
    """Per-element loss for class-probability targets.

    ``l_n = Σ_c w_c t'_{n,c} (lse_n - z_{n,c})`` with ``t' = (1 - eps) t + eps / C``
    (``t' = t`` when ``eps`` is None). Shape: the input's shape without ``opts.axis``.
    ``opts.cap`` and ``opts.stats`` as in :func:`jaxce._index.index_loss`.
    """
    return _fwd(x, target, weight, eps, opts)[0]


class _Res(NamedTuple):
    x: Any
    target: Any
    weight: Any
    eps: Any
    lse: Any  # per element
    q: Any  # Σ_c w_c t'_c per element


def _dtype(x, target):
    return compute_dtype(promote_float_dtypes(x.dtype, target.dtype))


def _fwd(x, target, weight, eps, opts):
    eps = checked_eps(eps)
    static = dict(axis=opts.axis, cap=opts.cap, dtype=_dtype(x, target))
    row_stats = spelled(
        _rows.prob_row_stats, static, opts.implementation, xla_cpu=xla_cpu.prob_row_stats
    )
    stats = row_stats(x, target, weight, eps)
    lse = jnp.squeeze(stats.lse, opts.axis)
    loss = jnp.squeeze(stats.loss, opts.axis)
    res = _Res(x, target, weight, eps, lse, jnp.squeeze(stats.q, opts.axis))
    if opts.stats:
        return (loss, lse, jnp.argmax(x, axis=opts.axis).astype(jnp.int32)), res
    return loss, res


def _bwd(opts, res: _Res, ct):
    """Cotangents ``(dx, dtarget, dweight, deps)`` of the loss (and ``lse``) cotangent."""
    x, target, weight, eps, lse, q = res
    g, g_lse = ct if opts.stats else (ct, None)
    static = dict(axis=opts.axis, cap=opts.cap, dtype=_dtype(x, target))
    grads = spelled(
        _rows.prob_grads,
        static,
        opts.implementation,
        xla_cpu=xla_cpu.prob_grads,
        xla_gpu=xla_gpu.prob_grads,
    )
    expand = partial(jnp.expand_dims, axis=opts.axis)
    return grads(x, target, weight, eps, expand(lse), expand(q), g, g_lse)


def _tangent(opts, res: _Res, tangents):
    """``d l_n`` (and with ``stats`` ``d lse_n``) for tangents ``(dx, dtarget, dweight,
    deps)`` (None: zero); the transpose of ``_bwd`` in its cotangent."""
    x, target, weight, eps, lse, q = res
    dx, dt, dweight, deps = tangents
    axis, cap = opts.axis, opts.cap
    dtype = _dtype(x, target)
    num_classes = x.shape[axis]
    x_raw = x.astype(dtype)
    z = _rows.softcap(x_raw, cap)
    tc = target.astype(dtype)
    lse_k = jnp.expand_dims(lse, axis)
    gap = lse_k - z
    w = _rows.weight_along(weight, x.ndim, axis, dtype)
    tp = _rows.smoothed_target(tc, eps, num_classes)
    terms = []
    d_lse = jnp.zeros_like(lse)
    if dx is not None:
        wt = tp if w is None else w * tp
        p = jnp.exp(z - lse_k)
        dxs = _rows.times_slope(dx.astype(dtype), _rows.softcap_slope(x_raw, cap))
        terms.append((p * jnp.expand_dims(q, axis) - wt) * dxs)
        if opts.stats:
            d_lse = jnp.sum(p * dxs, axis=axis)
    if dt is not None:
        keep = 1 if eps is None else 1 - eps.astype(dtype)
        term = keep * gap * dt.astype(dtype)
        terms.append(term if w is None else w * term)
    if dweight is not None:
        terms.append(_rows.weight_along(dweight, x.ndim, axis, dtype) * tp * gap)
    if deps is not None:
        d_tp = 1 / num_classes - tc
        terms.append((d_tp if w is None else w * d_tp) * gap * deps.astype(dtype))
    out = jnp.sum(sum(terms[1:], terms[0]), axis=axis)
    return (out, d_lse) if opts.stats else out


prob_loss.defjvp(lean_jvp_rule(_fwd, _tangent, _bwd), symbolic_zeros=True)
