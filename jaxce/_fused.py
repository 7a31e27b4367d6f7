"""The fused linear + cross-entropy core: ``hidden @ kernel + bias`` never materialised.

* forward: one pass over vocabulary chunks with an online log-sum-exp (running max and
  rescaled sum), also picking the target logit and, with smoothing, ``Σ_c w_c z_c``;
  only per-token statistics are kept (``_chunked.chunk_stats``);
* backward: a second pass recomputes each chunk's logits, forms its logit gradient
  (``_rows.index_logit_grad``) in float32, writes the finished ``dkernel`` (and
  ``dbias``/``dweight``) slice for that chunk, and accumulates ``dhidden`` in float32;
* tangent (forward mode): one chunked pass, ``Σ_c dz_c (dhidden @ k_c + hidden @ dk_c +
  db_c)``; the backward pass above is its hand-written transpose (see
  ``_derivatives.py``), and both are plain differentiable JAX, so Hessian-vector
  products stay chunked too.

Live memory is a few ``[tokens, chunk]`` float32 blocks plus a float32 ``[tokens, D]``
accumulator: no ``[tokens, vocab]`` array and no float32 copy of the kernel. Matmuls run
in the input dtype with float32 accumulation (``preferred_element_type``); softmax math is
float32; gradients come back in the inputs' dtypes. The cost is one extra matmul (the
recomputed logits): four instead of three.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _rows
from jaxce._chunked import (
    accumulate_chunk_grads,
    chunk_classes,
    chunk_logits,
    chunk_logits_tangent,
    chunk_loop,
    chunk_stats,
    chunks,
    zero_grads,
)
from jaxce._derivatives import lean_jvp_rule
from jaxce._options import Options, checked_eps, compute_dtype
from jaxce._targets import target_info, target_weight


@partial(jax.custom_jvp, nondiff_argnums=(6,))
def fused_index_loss(hidden, kernel, bias, target, weight, eps, opts: Options):
    """Per-token losses of ``hidden [N, D] @ kernel [D, V] + bias`` against ``target
    [N]``, as :func:`jaxce._index.index_loss` on those logits (``opts.stats`` too)."""
    return _fwd(hidden, kernel, bias, target, weight, eps, opts)[0]


class _Res(NamedTuple):
    hidden: Any
    kernel: Any
    bias: Any
    target: Any
    weight: Any
    eps: Any
    lse: Any
    nll: Any
    smooth: Any


def _fwd(hidden, kernel, bias, target, weight, eps, opts):
    eps = checked_eps(eps)
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    info = target_info(target, vocab, opts.ignore_index)
    lse, z_y, wz, _, arg = chunk_stats(
        hidden, kernel, bias, info.idx, info.in_range, weight, eps is not None, opts
    )
    nll = lse - z_y
    w_y = target_weight(weight, info, dtype)
    smooth = None
    if eps is not None:
        smooth = lse * _rows.sum_weight(weight, vocab, dtype) - wz  # Σ_c w_c (lse - z_c)
    loss = _rows.combine_index_loss(info.valid, w_y, nll, smooth, eps, vocab)
    res = _Res(hidden, kernel, bias, target, weight, eps, lse, nll, smooth)
    if opts.stats:
        return (loss, lse, arg), res
    return loss, res


def _chunk_rows(rows, start, size, idx, weight):
    """A chunk's view of the gradient rows: ``(rows [N, 1], is_target, w_c)``."""
    cls = chunk_classes(start, size)
    w_c = None if weight is None else lax.dynamic_slice_in_dim(weight, start, size)[None, :]
    return _rows.expand_rows(rows, 1), cls == idx[:, None], w_c


def _bwd(opts, res: _Res, ct):
    hidden, kernel, bias, target, weight, eps, lse, nll, smooth = res
    g, g_lse = ct if opts.stats else (ct, None)
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    info = target_info(target, vocab, opts.ignore_index)
    w_y = target_weight(weight, info, dtype)
    g = g.astype(dtype)
    w = None if weight is None else weight.astype(dtype)
    rows = _rows.index_grad_rows(g, info.valid, w_y, lse, eps, weight, vocab, dtype, g_lse)

    def body(start, size, carry, hidden, kernel):
        dh, dk, db, dw = carry
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype)
        z = _rows.softcap(raw, opts.cap)
        rows_k, is_target, w_c = _chunk_rows(rows, start, size, info.idx, w)
        dz = _rows.index_logit_grad(z, rows_k, is_target, w_c)
        dz = _rows.times_slope(dz, _rows.softcap_slope(raw, opts.cap))
        dh, dk, db = accumulate_chunk_grads(
            hidden, kernel, dz, start, size, dh, dk, db, dtype, opts.implementation
        )
        if dw is not None:
            at_target, spread = _rows.weight_grad_terms(
                g, info.valid, rows.keep, nll, rows.b, lse, z, 1
            )
            dw_c = jnp.sum(jnp.where(is_target, at_target[:, None], 0), axis=0)
            if spread is not None:
                dw_c = dw_c + jnp.sum(spread, axis=0)
            dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, 0)
        return dh, dk, db, dw

    init = zero_grads(hidden, kernel, bias, weight, dtype)
    dh, dk, db, dw = chunk_loop(chunks(vocab, opts.chunk), body, init, (hidden, kernel))
    deps = _rows.index_eps_grad(g, info.valid, w_y, nll, smooth, eps, vocab)
    return dh.astype(hidden.dtype), dk, db, None, dw, deps


def _tangent(opts, res: _Res, tangents):
    """``d l_n`` (and with ``stats`` ``d lse_n``) for tangents ``(dhidden, dkernel, dbias,
    -, dweight, deps)`` (None: zero), chunk by chunk like the backward pass (whose
    cotangent transpose it is)."""
    hidden, kernel, bias, target, weight, eps, lse, nll, smooth = res
    dh, dk, db, _, dw, deps = tangents
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    info = target_info(target, vocab, opts.ignore_index)
    w_y = target_weight(weight, info, dtype)
    zero = jnp.zeros_like(lse)
    w = None if weight is None else weight.astype(dtype)
    rows = _rows.index_grad_rows(
        jnp.ones_like(lse), info.valid, w_y, lse, eps, weight, vocab, dtype
    )

    def body(start, size, acc, hidden, kernel, dk):
        acc, d_lse = acc
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype)
        z = _rows.softcap(raw, opts.cap)
        dz = chunk_logits_tangent(hidden, kernel, dh, dk, db, start, size, dtype)
        if dz is not None:
            dz = _rows.times_slope(dz, _rows.softcap_slope(raw, opts.cap))
            rows_k, is_target, w_c = _chunk_rows(rows, start, size, info.idx, w)
            acc = acc + jnp.sum(_rows.index_logit_grad(z, rows_k, is_target, w_c) * dz, axis=1)
            if opts.stats:
                d_lse = d_lse + jnp.sum(jnp.exp(z - lse[:, None]) * dz, axis=1)
        if dw is not None and rows.b is not None:
            dwc = lax.dynamic_slice_in_dim(dw.astype(dtype), start, size)[None, :]
            spread = _rows.weight_grad_terms(1, info.valid, 1, nll, rows.b, lse, z, 1)[1]
            acc = acc + jnp.sum(dwc * spread, axis=1)
        return acc, d_lse

    pinned = (hidden, kernel, dk)
    out, d_lse = chunk_loop(chunks(vocab, opts.chunk), body, (zero, zero), pinned)
    if dw is not None:
        out = out + jnp.where(info.valid, rows.keep * nll * dw.astype(dtype)[info.idx], zero)
    if deps is not None:
        out = out + _rows.index_eps_rows(info.valid, w_y, nll, smooth, vocab) * deps.astype(dtype)
    return (out, d_lse) if opts.stats else out


fused_index_loss.defjvp(lean_jvp_rule(_fwd, _tangent, _bwd), symbolic_zeros=True)
