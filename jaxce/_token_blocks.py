"""``strategy="min_work"``: the fused loss with its gradient formed in the forward pass,
over token blocks (three vocabulary-sized matmuls for ``value_and_grad``).

The ``'mean'``/``'sum'`` loss is a weighted sum of per-token statistics of the (capped)
logits ``z = softcap(hidden @ kernel + bias)``::

    L = Σ_n  c_nll nll_n + c_lse lse_n + c_sq lse_n² + c_wz Σ_c w_c z_nc
             + c_tz Σ_c w_c t_nc z_nc + c_tlse lse_n Σ_c w_c t_nc

with ``nll = lse - z_y`` (class indices), ``t`` the class probabilities, and per-token
coefficients that depend only on the targets, ``weight``, ``eps``, ``z_loss`` and the
'mean' denominator (:func:`index_coefs`, :func:`prob_coefs`; plain JAX, so autodiff gives
their derivatives in ``weight``, ``eps`` and ``z_loss``). :func:`block_loss` is a
``custom_jvp`` of ``L`` in the arrays and the coefficients. Its rule runs one loop over
token blocks of ``block`` rows: a block's logits ``[rows, V]`` (float32 accumulation),
their row statistics, and at once the logit gradient ``∂L/∂z`` (softmax, one-hot and
weight terms), which gives that block's ``dhidden = dz @ kernel.T`` and adds
``hidden.T @ dz`` to a ``dkernel`` accumulator (float32 for 16-bit kernels) -- only for the
inputs whose tangent is not a symbolic zero. The tangent is the linear map ``Σ <grad,
tangent>``: forward mode evaluates it, reverse mode transposes it into ``g * grad``, so
``value_and_grad`` does three vocabulary-sized matmuls (logits, d-hidden, d-kernel) and a
gradient in ``hidden`` alone two. Second order differentiates the rule itself (plain
autodiff of the block loop).

Vocabulary parallelism (``opts.axis_name``): each device holds a slice of the classes;
per block, the row max is combined with ``pmax`` and the exponential sums and the
per-token statistics with one ``psum`` of ``[rows]`` vectors before the softmax is formed;
the partial d-hidden of each device is summed across the axis by the transpose of the
tangent's ``psum``.

Memory: one block's float32 logits and their gradient (in the inputs' dtype, what the
matmuls read), and the ``[D, V]`` d-kernel accumulator (float32 where the kernel is 16-bit);
the gradients are kept from the forward to the backward pass (``g * grad`` there, in place
where the compiler can: the outputs' own buffers on XLA:CPU and XLA:GPU).
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxce._backends import spelled, xla_cpu, xla_gpu, xla_tpu
from jaxce._chunked import (
    _target_logit,
    chunk_classes,
    chunk_loop,
    chunks,
    mask_columns,
    real_columns,
)
from jaxce._compat import ONE_PASS_JVP, cast_varying, row_major, varying_axes
from jaxce._derivatives import is_present
from jaxce._options import Options, checked_eps, checked_z, compute_dtype
from jaxce._reduction import finish_loss, index_stats, undefined_mean
from jaxce._rows import row_shift, softcap, softcap_slope, times_slope
from jaxce._targets import batch_total, counted_sum

# Why ``auto`` may keep ``min_memory``: the fused loss is chosen for its memory, so
# ``auto`` takes min_work's speed only where its extra temporaries (a block's float32
# logits and, for 16-bit kernels, the float32 [D, V] accumulator) stay within the fused
# loss's own budget: 5 % of the float32 [N, V] logits it never forms (0.2 bytes per
# logit). At 16384 x 4096 x 131072 bf16 min_work holds about 2.8 GiB more than min_memory
# (compile-only H100), ten times that budget, so ``auto`` runs min_memory there and
# ``strategy="min_work"`` is the explicit trade of memory for a third fewer matmuls.
AUTO_BYTES_PER_LOGIT = 0.2


# The fewest rows a default block has: below about this, the float32 d-kernel accumulator
# (read and written once per block, 8 D V bytes) outweighs the block's matmuls
# (6 rows D V FLOPs) on accelerators. Compile-only H100 time model (jax 0.12.0.1),
# value_and_grad of the mean: 8192 x 2048 x 131072 f32, 128 rows (PyTorch's rule) 126 ms,
# 256 rows 69 ms, 1024 rows 53.3 ms (materialised loss 53.0 ms); 16384 x 4096 x 131072
# bf16, 512 rows 118 ms, 1024 rows 90 ms, 2048 rows 84 ms (materialised 75 ms). Not larger:
# no one block is best on every chip (docs/performance.md: v5p is slower at 2048 rows, v6e
# faster at the same memory, the H100 faster for 264 MiB more).
MIN_BLOCK_ROWS = 1024


def block_rows(num_tokens: int, dim: int, vocab: int) -> int:
    """The default token block: PyTorch's ``chunking_method="aspect_ratio"`` rule, a
    block's ``[rows, V]`` logits about the size of ``hidden [N, D]``
    (``next_pow2(ceil(N / ceil(V / D)))``), but at least :data:`MIN_BLOCK_ROWS`; at most
    N."""
    if num_tokens <= 1:
        return 1
    ratio = -(-vocab // max(dim, 1))
    target = -(-num_tokens // ratio)
    rows = max(1 << (target - 1).bit_length(), MIN_BLOCK_ROWS)
    return int(min(rows, num_tokens))


def min_work_bytes(
    num_tokens: int, dim: int, vocab: int, rows: int, itemsize: int, acc_itemsize: int = 4
) -> int:
    """min_work's temporaries beyond min_memory's: one block's float32 logits and, where
    the accumulator is wider than the kernel (``acc_itemsize`` > ``itemsize``: a 16-bit
    kernel, float32 accumulation), the ``[D, V]`` d-kernel accumulator."""
    del num_tokens
    acc = acc_itemsize * dim * vocab if itemsize < acc_itemsize else 0
    return 4 * rows * vocab + acc


def auto_picks_min_work(
    num_tokens: int,
    dim: int,
    vocab: int,
    rows: int,
    itemsize: int,
    acc_itemsize: int = 4,
    entropy: bool = False,
) -> bool:
    """``strategy="auto"``'s rule (the options min_work supports aside): never with the
    entropy, else the memory rule. With the entropy, min_memory alone differentiates
    ``aux.lse`` and ``aux.z_loss``, and where ``aux.entropy`` is differentiated min_work
    forms a second gradient set: five matmuls to min_memory's four, and (compile-only,
    value_and_grad of ``loss + 0.01 * aux.entropy``) 1.6 / 2.1 GiB more at 8192 x 2048 x
    131072 f32 on H100 / TPU v5p, 2.4 / 1.8 GiB more at 16384 x 4096 x 131072 bf16: a
    float32 ``[D, V]`` d-kernel, an ``[N, D]`` d-hidden and a block's ``[rows, V]``
    gradient beside the loss's. (XLA drops them where ``aux.entropy`` is only read.)"""
    if entropy:
        return False
    extra = min_work_bytes(num_tokens, dim, vocab, rows, itemsize, acc_itemsize)
    return extra <= AUTO_BYTES_PER_LOGIT * num_tokens * vocab


class Coefs(NamedTuple):
    """Per-token coefficients ``[N]`` of the statistics summed by :func:`block_loss`
    (None: the term is absent)."""

    nll: Any  # of lse - z_y (class indices)
    lse: Any  # of lse
    sq: Any  # of lse² (the z-loss)
    wz: Any  # of Σ_c w_c z_c (smoothing)
    tz: Any  # of Σ_c w_c t_c z_c (probabilities)
    tlse: Any  # of lse Σ_c w_c t_c (probabilities)


class Rows(NamedTuple):
    """Per-token statistics ``[N]`` (the coefficients' derivatives)."""

    nll: Any
    lse: Any
    sq: Any
    wz: Any
    tz: Any
    tlse: Any


class Entropy(NamedTuple):
    """What :func:`block_loss` adds with per-token entropy coefficients ``ent``: ``H = Σ_n
    ent_n H_n`` (a scalar), the per-token ``lse`` and first ``argmax`` of the raw logits
    (global classes) ``[N]``, and ``grads``, ``H``'s gradients (as ``L``'s). The argmax is
    held as a float (exact below 2**24 classes): an integer output of a ``custom_jvp``
    needs a float0 tangent, which has no type that varies over a ``shard_map`` axis."""

    total: Any
    lse: Any
    argmax: Any
    grads: Any


# The inputs the entropy depends on (not the class weight, the probabilities or the
# coefficients).
_ENTROPY_INPUTS = ("hidden", "kernel", "bias", "temperature")


@partial(jax.custom_jvp, nondiff_argnums=(11,))
def block_loss(
    hidden, kernel, bias, weight, probs, coefs, idx, here, n_real, temperature, ent,
    opts: Options,
):  # fmt: skip
    """``L`` of the module doc (a scalar, float32; float64 for float64 inputs) over
    ``hidden [N, D]`` and this device's ``kernel [D, V]``; ``idx``/``here``: the local
    target index and whether it is on this device (class indices; else None); ``probs``
    ``[N, V]`` or None; ``n_real``: None or this slice's real columns; ``temperature``:
    None or ``T`` (the statistics are those of ``softcap(logits) / T``).

    ``ent``: None, or per-token coefficients ``[N]`` of the entropy ``H_n`` of the
    softmax (no derivative is taken in them): then ``(L, H, lse, argmax)`` with ``H =
    Σ_n ent_n H_n`` from the same pass, its own gradients formed beside ``L``'s (its
    tangent is ``Σ <grad_H, tangent>``, so reverse mode gives ``ct_L grad_L + ct_H
    grad_H``). ``lse`` ``[N]`` is for the aux outputs only: its tangent is NaN (its
    derivative needs the recompute path, ``strategy="min_memory"``)."""
    args = (hidden, kernel, bias, weight, probs, coefs, idx, here, n_real, temperature, ent)
    total, _, _, entropy = _run(*args, opts, ())
    if entropy is None:
        return total
    return total, entropy.total, entropy.lse, entropy.argmax


def _block_loss_jvp(opts, primals, tangents):
    dh, dk, db, dw, dt, dc = tangents[:6]
    arrays = {"hidden": dh, "kernel": dk, "bias": db, "weight": dw, "probs": dt}
    arrays["temperature"] = tangents[9]
    wanted = tuple(name for name, t in arrays.items() if is_present(t))
    total, rows, grads, entropy = _run(*primals, opts, wanted)
    tangent = _inner(grads, arrays, total, opts.axis_name)
    # Tokens whose coefficients are all zero (ignored) count for nothing, even where their
    # statistics are not finite.
    counted = functools.reduce(jnp.logical_or, [k != 0 for k in primals[5] if k is not None])
    for stat, t in zip(rows, dc, strict=True):
        if stat is not None and is_present(t):  # the statistics are the same on every device
            stat = jnp.where(counted, stat, jnp.zeros_like(stat))
            tangent = tangent + jnp.sum(stat * t.astype(stat.dtype))
    if entropy is None:
        return total, tangent
    t_h = _inner(entropy.grads, arrays, total, opts.axis_name)
    # aux.lse: a NaN tangent wherever the inputs it depends on have one.
    t_lse = jnp.zeros_like(entropy.lse)
    if any(name in entropy.grads for name in wanted):
        t_lse = t_lse + jnp.nan * t_h
    t_arg = jnp.zeros_like(entropy.argmax)
    return (total, entropy.total, entropy.lse, entropy.argmax), (tangent, t_h, t_lse, t_arg)


block_loss.defjvp(_block_loss_jvp, symbolic_zeros=True)


def _inner(grads, arrays, total, axis_name):
    """``Σ <grad, tangent>`` over the inputs in ``grads`` (``total``'s type), summed across
    ``axis_name``."""
    dtype = total.dtype
    parts = [jnp.sum(g.astype(dtype) * arrays[name].astype(dtype)) for name, g in grads.items()]
    if not parts:
        return jnp.zeros_like(total)
    local = sum(parts)
    return lax.psum(local, axis_name) if axis_name else local


def _block_max(z, *, axis_name):
    """The row max of a block's logits ``z`` ``[rows, V]``, over ``axis_name``'s devices
    too, 0 where it is -inf (no derivative)."""
    m = lax.stop_gradient(jnp.max(z, axis=1))
    return row_shift(m if axis_name is None else lax.pmax(m, axis_name), None)


def _block_sums(z, *, axis_name):
    """``(m, Σ_c e^{z - m})``: :func:`_block_max` and this device's sum of exponentials
    shifted by it. Two passes over the block: its max, then the sum."""
    m = _block_max(z, axis_name=axis_name)
    return m, jnp.sum(jnp.exp(z - m[:, None]), axis=1)


def _run(
    hidden, kernel, bias, weight, probs, coefs, idx, here, n_real, temperature, ent, opts, wanted
):  # fmt: skip
    """One loop over token blocks: ``(L, Rows, {name: gradient}, entropy)`` for the
    ``wanted`` inputs (``'hidden'``, ``'kernel'``, ``'bias'``, ``'weight'``, ``'probs'``,
    ``'temperature'``); ``entropy``: None, or an :class:`Entropy` with ``ent``."""
    from jaxce._fused import _global_argmax  # _fused imports nothing of this module

    dtype = compute_dtype(hidden.dtype)
    n, v_local = hidden.shape[0], kernel.shape[1]
    axis_name, cap = opts.axis_name, opts.cap
    c = Coefs(*(None if x is None else x.astype(dtype) for x in coefs))
    w = None if weight is None else weight.astype(dtype)[None, :]
    want = set(wanted)
    dims = (((1,), (0,)), ((), ()))
    inv = None if temperature is None else (1 / temperature).astype(dtype)

    one_pass = xla_gpu.block_sums if ONE_PASS_JVP else None
    block_sums = spelled(
        _block_sums, {"axis_name": axis_name}, opts.implementation, xla_gpu=one_pass
    )

    target_logit = spelled(
        _target_logit, {}, opts.implementation, xla_tpu=xla_tpu.chunk_target_logit
    )

    def body(start, size, carry, hidden, kernel, probs):
        held, total, stats, grads, extra = carry
        h = lax.dynamic_slice_in_dim(hidden, start, size, axis=0)
        raw = lax.dot_general(h, kernel, dims, preferred_element_type=dtype)
        if bias is not None:
            raw = raw + bias.astype(dtype)[None, :]
        real = real_columns(0, v_local, n_real)
        z = softcap(raw, cap)
        z = mask_columns(z if inv is None else z * inv, real, -jnp.inf)
        z0 = mask_columns(z, real, 0)
        cb = Coefs(*(None if x is None else lax.dynamic_slice_in_dim(x, start, size) for x in c))
        t = None if probs is None else lax.dynamic_slice_in_dim(probs, start, size).astype(dtype)
        wt_c = None if t is None else (t if w is None else w * t)  # w_c t_c

        # Row statistics, combined across the axis before the softmax is formed.
        if ent is None:
            m, local_s = block_sums(z)
            partial_sums = {"s": local_s}
        else:  # the entropy's log s + u / s: u = Σ e^{z - m} (m - z) >= 0
            m = _block_max(z, axis_name=axis_name)
            e = jnp.exp(z - m[:, None])
            gap = jnp.where(jnp.isneginf(z), jnp.zeros_like(z), m[:, None] - z)
            partial_sums = {"s": jnp.sum(e, axis=1), "u": jnp.sum(e * gap, axis=1)}
        if idx is not None:
            # The target logit: a gather (no [rows, V] mask is formed), on TPUs a masked sum
            # fused into the Σ exp pass (jaxce/_backends/xla_tpu.py::chunk_target_logit).
            i_b = lax.dynamic_slice_in_dim(idx, start, size)
            hit = lax.dynamic_slice_in_dim(here, start, size)
            partial_sums["zy"] = target_logit(z, i_b, hit)
        if cb.wz is not None:
            partial_sums["wz"] = jnp.sum(z0 if w is None else w * z0, axis=1)
        if t is not None:
            partial_sums["tz"] = jnp.sum(mask_columns(wt_c * z0, real, 0), axis=1)
            partial_sums["wt"] = jnp.sum(mask_columns(wt_c, real, 0), axis=1)
        if axis_name is not None:
            partial_sums = lax.psum(partial_sums, axis_name)
        s = partial_sums["s"]
        lse = m + jnp.log(s)
        r = Rows(
            nll=None if cb.nll is None else lse - partial_sums["zy"],
            lse=lse if cb.lse is not None else None,
            sq=None if cb.sq is None else lse * lse,
            wz=partial_sums.get("wz") if cb.wz is not None else None,
            tz=partial_sums.get("tz") if cb.tz is not None else None,
            tlse=None if cb.tlse is None else lse * partial_sums["wt"],
        )
        for x, k in zip(r, cb, strict=True):
            if x is not None:
                # A zero coefficient (an ignored token, eps = 0) never turns inf into NaN.
                total = total + jnp.sum(jnp.where(k == 0, jnp.zeros_like(x), k * x))
        stats = tuple(
            None if a is None else lax.dynamic_update_slice_in_dim(a, x, start, 0)
            for a, x in zip(stats, r, strict=True)
        )
        if ent is not None:
            e_b = lax.dynamic_slice_in_dim(ent, start, size)
            h_n = jnp.log(s) + partial_sums["u"] / s
            h_n = jnp.where(e_b == 0, jnp.zeros_like(h_n), h_n)  # as the loss's terms
            raw_real = mask_columns(raw, real, -jnp.inf)
            arg = _global_argmax(
                jnp.max(raw_real, axis=1), jnp.argmax(raw_real, axis=1), v_local, axis_name
            )
            extra = Entropy(
                extra.total + jnp.sum(e_b * h_n),
                lax.dynamic_update_slice_in_dim(extra.lse, lse, start, 0),
                lax.dynamic_update_slice_in_dim(extra.argmax, arg.astype(dtype), start, 0),
                extra.grads,
            )
        if not want:
            return held, total, stats, grads, extra

        # ∂L/∂z over the block: p (softmax) times its coefficient, the one-hot and the
        # weight terms; zero coefficients (ignored tokens) give exactly 0 for finite logits.
        p_coef = jnp.zeros_like(lse)
        for k, term in (
            (cb.nll, 1),
            (cb.lse, 1),
            (cb.sq, 2 * lse),
            (cb.tlse, partial_sums.get("wt")),
        ):
            if k is not None:
                p_coef = p_coef + k * term
        lse_p = jnp.where(p_coef == 0, jnp.full_like(lse, jnp.inf), lse)
        dz = jnp.exp(z - lse_p[:, None]) * p_coef[:, None]
        if cb.nll is not None:
            onehot = hit[:, None] & (chunk_classes(0, v_local) == i_b[:, None])
            # A select of two computed values: jnp.where(onehot, nll, 0) makes XLA hoist a
            # zero [rows, V] float32 block out of the loop, held and read every block.
            dz = jnp.where(onehot, dz - cb.nll[:, None], dz)
        if cb.wz is not None:
            dz = dz + cb.wz[:, None] * (1 if w is None else w)
        if cb.tz is not None:
            dz = dz + cb.tz[:, None] * wt_c

        def spread(dz, grads):
            """The inputs' gradients from a block's ``∂/∂z`` (to the raw logits, then
            through the matmul), added to ``grads``."""
            grads = dict(grads)
            if "temperature" in grads:  # z = s / T: dL/dT = -Σ (∂L/∂z) z / T
                by_t = jnp.sum(mask_columns(dz, real, 0) * z0)
                grads["temperature"] = grads["temperature"] - inv * by_t
            dz = mask_columns(times_slope(dz, softcap_slope(raw, cap)), real, 0)
            dz = dz if inv is None else dz * inv
            dz_in = dz.astype(hidden.dtype)
            if "hidden" in grads:
                dh_b = lax.dot_general(
                    dz_in, kernel, (((1,), (1,)), ((), ())), preferred_element_type=dtype
                )
                grads["hidden"] = lax.dynamic_update_slice_in_dim(
                    grads["hidden"], dh_b.astype(hidden.dtype), start, 0
                )
            if "kernel" in grads:
                add_kernel_grad_b = spelled(
                    add_kernel_grad, {"dtype": dtype}, opts.implementation,
                    xla_cpu=xla_cpu.add_kernel_grad,
                )  # fmt: skip
                grads["kernel"] = add_kernel_grad_b(grads["kernel"], h, dz_in)
            if "bias" in grads:
                grads["bias"] = grads["bias"] + jnp.sum(dz, axis=0)
            return grads

        if extra is not None and extra.grads:
            # ∂H_n/∂z_c = p_c (lse - z_c - H_n): 0 at -inf logits and zero coefficients.
            lse_h = jnp.where(e_b == 0, jnp.full_like(lse, jnp.inf), lse)
            dz_h = jnp.exp(z - lse_h[:, None]) * ((lse - h_n)[:, None] - z0)
            dz_h = jnp.where(jnp.isneginf(z), jnp.zeros_like(dz_h), dz_h) * e_b[:, None]
            extra = extra._replace(grads=spread(dz_h, extra.grads))
        grads = spread(dz, grads)
        if "weight" in want:
            by_w = jnp.zeros_like(z0)
            if cb.wz is not None:
                by_w = by_w + cb.wz[:, None] * z0
            if t is not None and cb.tz is not None:
                by_w = by_w + cb.tz[:, None] * t * z0
            if t is not None and cb.tlse is not None:
                by_w = by_w + (cb.tlse * lse)[:, None] * t
            grads["weight"] = grads["weight"] + jnp.sum(mask_columns(by_w, real, 0), axis=0)
        if "probs" in want:
            by_t = jnp.zeros_like(z0)
            if cb.tz is not None:
                by_t = by_t + cb.tz[:, None] * z0
            if cb.tlse is not None:
                by_t = by_t + (cb.tlse * lse)[:, None]
            by_t = mask_columns(by_t if w is None else w * by_t, real, 0)
            grads["probs"] = lax.dynamic_update_slice_in_dim(
                grads["probs"], by_t.astype(probs.dtype), start, 0
            )
        return held, total, stats, grads, extra

    # d-kernel accumulates in float32 (float64) whatever the kernel's dtype, or in the
    # 16-bit kernel's own dtype with acc_dtype (opts.acc).
    acc = dtype if opts.acc is None else opts.acc
    init_grads = {
        "hidden": lambda: jnp.zeros(hidden.shape, hidden.dtype),
        "kernel": lambda: jnp.zeros(kernel.shape, acc),
        "bias": lambda: jnp.zeros((v_local,), dtype),
        "weight": lambda: jnp.zeros((v_local,), dtype),
        "probs": lambda: jnp.zeros(probs.shape, probs.dtype),
        "temperature": lambda: jnp.zeros((), dtype),
    }
    grads = {name: init_grads[name]() for name in wanted}
    stats = tuple(None if k is None else jnp.zeros((n,), dtype) for k in c)
    # ``held`` takes chunk_loop's exact zero (computed from the kernel after the loop, so
    # that no compiler hoists a converted kernel out of it); it varies over the vocabulary
    # axis, which the loss must not, hence its psum.
    # Of the inputs' type, as the zero it may receive (else the spellings' types differ).
    every = frozenset().union(*(varying_axes(a) for a in (hidden, kernel, probs) if a is not None))
    extra = None
    if ent is not None:
        extra = Entropy(
            jnp.zeros((), dtype), jnp.zeros((n,), dtype), jnp.zeros((n,), dtype),
            {name: init_grads[name]() for name in wanted if name in _ENTROPY_INPUTS},
        )  # fmt: skip
    carry = (cast_varying(jnp.zeros((), dtype), every), jnp.zeros((), dtype), stats, grads, extra)
    held, total, stats, grads, extra = chunk_loop(
        chunks(n, opts.block), body, carry, (hidden, kernel, probs), opts.implementation
    )
    total = total + (held if axis_name is None else lax.psum(held, axis_name))
    return total, Rows(*stats), grads, extra


def add_kernel_grad(dk, h, dz, *, dtype):
    """``dk += h.T @ dz`` (``dtype`` accumulation): a block's share of the kernel
    gradient. The GPU and TPU compilers fuse the sum into the matmul (the accumulator is
    read and written once per block). Held row-major: TPU v6e otherwise lays the
    accumulator out column-major and copies it after the loop (libtpu 0.0.52, value_and_grad
    of the mean: 8192 x 2048 x 131072 f32 1,536 -> 512 MiB of temporaries, 16384 x 4096 x
    131072 bf16 4,608 -> 3,072; v5e, v5p and H100 unchanged).

    A 16-bit ``dk`` (``acc_dtype``) takes the share rounded to its dtype, then the rounded
    sum. The compilers fold that rounding into the matmul (H100, TPU: the program of a
    matmul with a 16-bit result plus the add); rounding only the sum instead makes XLA:GPU
    hold the float32 ``[D, V]`` product (16384 x 4096 x 131072 bf16: 1,289 -> 2,833 MiB)."""
    part = lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=dtype)
    return row_major(dk + part.astype(dk.dtype))


def index_coefs(valid, w_y, sum_w, eps, z, vocab, denominator, count, reduction, dtype):
    """The coefficients of class-index targets (``l_n = (1 - eps) w_y nll + eps / C
    (lse Σw - Σ w z)``, ``'mean'`` over ``denominator``; z-loss over ``count``)."""
    g, keep, lse, wz = _common_coefs(valid, sum_w, eps, vocab, denominator, reduction, dtype)
    nll = jnp.where(valid, g * keep * w_y, jnp.zeros_like(w_y))
    return Coefs(nll, lse, _z_coef(valid, z, count, reduction, dtype), wz, None, None)


def prob_coefs(valid, sum_w, eps, z, vocab, count, reduction, dtype):
    """The coefficients of class probabilities (``l_n = (1 - eps)(lse Σ w t - Σ w t z) +
    eps / C (lse Σw - Σ w z)``; ``'mean'`` over the counted elements)."""
    g, keep, lse, wz = _common_coefs(valid, sum_w, eps, vocab, count, reduction, dtype)
    tlse = jnp.where(valid, g * keep, jnp.zeros(valid.shape, dtype))
    return Coefs(None, lse, _z_coef(valid, z, count, reduction, dtype), wz, -tlse, tlse)


def _common_coefs(valid, sum_w, eps, vocab, denominator, reduction, dtype):
    """``(g, keep, lse, wz)``: the reduction's factor ``g`` (1, or ``1 / denominator``),
    ``1 - eps``, and the smoothing's coefficients ``g eps / C Σw`` of lse and ``-g eps / C``
    of ``Σ w z`` (None without smoothing)."""
    g = jnp.ones((), dtype) if reduction == "sum" else 1 / denominator.astype(dtype)
    if eps is None:
        return g, 1, None, None
    zero = jnp.zeros(valid.shape, dtype)
    per_class = g * eps.astype(dtype) / vocab
    lse = jnp.where(valid, per_class * sum_w, zero)
    wz = jnp.where(valid, -per_class, zero)
    return g, 1 - eps.astype(dtype), lse, wz


def _z_coef(valid, z, count, reduction, dtype):
    """The z-loss ``z lse²`` summed, or averaged over the counted elements."""
    if z is None:
        return None
    z = checked_z(z, dtype)
    per = z if reduction == "sum" else z / count.astype(dtype)
    return jnp.where(valid, per, jnp.zeros(valid.shape, dtype))


def _sample_weighted(coefs: Coefs, valid, sample_weight) -> Coefs:
    """Each counted token's coefficients (its loss and z-loss terms) times its sample
    weight; the 'mean' denominators do not depend on them (as ``finish_loss``)."""
    if sample_weight is None:
        return coefs
    return Coefs(*(
        None if c is None else jnp.where(valid, c * sample_weight.astype(c.dtype), jnp.zeros_like(c))
        for c in coefs
    ))  # fmt: skip


def min_work_loss(
    hidden, kernel, bias, target, weight, eps, z, where, opts: Options, sample_weight=None,
    temperature=None,
):  # fmt: skip
    """The scalar ``'mean'``/``'sum'`` loss of :func:`jaxce.linear_cross_entropy` with
    ``strategy="min_work"`` (``hidden [N, D]``, flat targets, ``sample_weight [N]`` or
    None, ``temperature`` None or a checked ``T``; see the module doc). With
    ``opts.entropy``: ``(loss, aux)``, the aux outputs of the same pass (flat ``[N]``
    per-token fields), ``aux.entropy`` reduced like the loss over ``aux.count``."""
    # Imported here: _fused imports nothing of this module, and shard_targets lives there.
    from jaxce._fused import _class_weight_sum, shard_targets, split_vocab, target_argmax

    axis_name = opts.axis_name
    eps = checked_eps(eps)
    dtype = compute_dtype(hidden.dtype)
    v_local = kernel.shape[1]
    vocab, n_real = (v_local, None) if axis_name is None else split_vocab(v_local, opts)
    sum_w = None
    if eps is not None:
        sum_w = _class_weight_sum(weight, v_local, vocab, n_real, axis_name, dtype)
    probs = target.ndim == 2  # class probabilities [N, V]
    if probs:
        valid = jnp.ones(target.shape[:1], bool) if where is None else where
        count = batch_total(valid, opts.batch_axis, dtype)
        coefs = prob_coefs(valid, sum_w, eps, z, vocab, count, opts.reduction, dtype)
        denominator = count
        idx = here = None
    else:
        valid, here, idx, w_y = shard_targets(
            target, weight, v_local, vocab, opts.ignore_index, axis_name, dtype
        )
        denominator = counted_sum(valid, w_y, opts.batch_axis)
        want_count = z is not None or opts.entropy
        count = batch_total(valid, opts.batch_axis, dtype) if want_count else None
        coefs = index_coefs(
            valid, w_y, sum_w, eps, z, vocab, denominator, count, opts.reduction, dtype
        )
    coefs = _sample_weighted(coefs, valid, sample_weight)
    ent = None
    if opts.entropy:  # verl's masked mean: over the count, whatever the weights
        g = 1 if opts.reduction == "sum" else 1 / count
        ent = lax.stop_gradient(jnp.where(valid, g, 0).astype(dtype))
    t = target if probs else None
    out = block_loss(
        hidden, kernel, bias, weight, t, coefs, idx, here, n_real, temperature, ent, opts
    )
    out = out if opts.entropy else (out,)
    total = _mean_or_nan(batch_total(out[0], opts.batch_axis), denominator, opts.reduction)
    total = total.astype(opts.out_dtype)
    if not opts.entropy:
        return total
    entropy = _mean_or_nan(batch_total(out[1], opts.batch_axis), count, opts.reduction)
    lse, argmax = out[2], lax.stop_gradient(out[3]).astype(jnp.int32)
    if probs:
        real = real_columns(0, v_local, n_real)
        stats = (lse, argmax, argmax == target_argmax(target, real, v_local, axis_name, dtype))
    else:
        stats, valid = index_stats(target, vocab, opts.ignore_index, lse, argmax)
    per_token = jnp.zeros(valid.shape, dtype)  # the loss is ``total``: only the aux is used
    _, aux = finish_loss(per_token, stats, valid, denominator, z, opts, sample_weight)
    return total, aux._replace(entropy=entropy)


def _mean_or_nan(total, denominator, reduction):
    """A ``'mean'`` (already divided by its coefficients) whose ``denominator`` is 0
    (nothing counted) is NaN, as in ``reduce_loss``."""
    if reduction != "mean":
        return total
    return total + undefined_mean(total, denominator)
