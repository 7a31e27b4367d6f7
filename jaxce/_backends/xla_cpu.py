"""XLA:CPU's spellings of jaxce's passes (chosen at lowering; see ``__init__.py``).

Same values as the portable passes in ``jaxce/_rows.py`` and ``jaxce/_chunked.py``; only
the spelling differs, so that XLA:CPU keeps its temporaries far below the logits' size
and its reductions fast. No derivative is taken of anything here: derivatives are the
portable passes'. Measured with jaxlib 0.10.2 (and holding on 0.12.0.1) with
``memory_analysis()`` at [4096, 32768] and [16384, 131072]; ``tests/test_budgets.py``
pins the results. Delete a spelling when XLA:CPU no longer needs it (its budget test
then still passes with the portable pass).

Why XLA:CPU needs them (jaxlib 0.10):

1. CSE merges identical upcasts ``convert(x)`` of a bf16/f16 input into one instruction.
   When its consumers land in different fusions, the f32 copy is materialised. So each
   pass upcasts with its own spelling: a plain convert (only in the log-sum-exp sum), a
   bit shift (backward), an integer multiply (the forward's multi-output reduce).
2. The YNNPACK fusion starts at reductions and absorbs supported elementwise producers
   and single-user consumers, turning anything it cannot absorb (selects, compares,
   integer ops, shared broadcasts) into full-size inputs. So a second reduction over the
   same input goes into one classic multi-output ``lax.reduce`` (YNN takes single-operand
   reduces only), and every per-row vector entering the backward's dense pass ends in a
   ``where`` (YNN cannot absorb a select), which keeps reductions from growing into it.
3. Row reductions slow down 6-9x once a row exceeds 32,768 elements (``sum(exp(x))`` over
   [1024, 131072] f32: 557 ms vs 60 ms over the same data viewed as [4096, 32768]), so
   long rows are reduced as sub-rows.
4. The target column of the gradient is written by a unique-index scatter, cheaper than
   an ``iota == target`` select over the whole dense pass (float32/float64 only: a 16-bit
   scatter is upcast to f32).
5. A 16-bit ``hidden.T @ dz`` is not a native XLA:CPU product: both operands are upcast
   and the ``hidden`` upcast is hoisted out of the chunk loop (see :func:`chunk_kernel_grad`).
6. XLA:CPU does not fuse an add into a matmul's output: ``dh + dz @ k.T`` materialises
   the ``[tokens, D]`` product before adding it (see :func:`add_hidden_grad`), and
   min_work's ``dk + h.T @ dz`` the ``[D, V]`` one (see :func:`add_kernel_grad`).
7. The fused loss's chunk loop (``jaxce._chunked.chunk_loop``) holds its pinned arrays
   (``hidden``, the kernel) with :func:`hold` and :func:`settle`, as the TPU compiler
   needs (``xla_tpu.py``). jaxlib 0.10.2 upcasts a 16-bit ``dynamic-slice``'s operand and
   moves that convert out of the loop without the barrier (``value_and_grad`` of the
   mean at 16384 x 4096 x 131072 bf16: 2,331 instead of 283 MiB; class probabilities
   10,523 instead of 283); jaxlib 0.12.0.1 does not (272 MiB either way). Without the
   exact zero, jaxlib 0.12.0.1 keeps a float32 copy of ``hidden`` at 1024 x 256 x 8192
   float32 with label smoothing, weights and the cap (9.0 instead of 8.0 MiB).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from jaxce import _rows
from jaxce._backends import bits
from jaxce._backends.bits import prob_grads_shifted, upcast_mul, upcast_shift
from jaxce._compat import cast_varying, varying_axes
from jaxce._rows import IndexGradRows, IndexStats, ProbStats, softcap, softcap_slope, times_slope

# ---------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------


# Rows longer than this are reduced as sub-rows (3. above).
_LONG_ROW = 32768


def _split_rows(x: Any, axis: int) -> int | None:
    """The sub-row length for reducing ``x`` along ``axis`` in two steps, or None."""
    num_classes = x.shape[axis]
    if axis != x.ndim - 1 or num_classes <= _LONG_ROW:
        return None
    for k in range(_LONG_ROW, 1023, -1):
        if num_classes % k == 0:
            return k
    return None


def reduce_rows(
    fn: Any, x: Any, axis: int, elementwise: Any = None, shift: Any = None, per_class: Any = None
) -> Any:
    """``fn(elementwise(x, shift, per_class), axis)`` with keepdims (``elementwise`` None:
    ``x``). ``shift``: per row (keepdims); ``per_class``: broadcastable to ``x``, varying
    along ``axis`` only.

    Long rows (see ``_split_rows``) are reduced as sub-rows of a view of ``x`` held by an
    optimization barrier (so XLA keeps the short rows: a bitcast, no copy), with the
    per-row ``shift`` repeated for each sub-row and ``per_class`` tiled over the rows,
    then once more.
    """
    k = _split_rows(x, axis)
    if k is None:
        values = x if elementwise is None else elementwise(x, shift, per_class)
        return fn(values, axis=axis, keepdims=True)
    per_row = x.shape[-1] // k
    parts = lax.optimization_barrier(x.reshape(-1, k))
    if elementwise is not None:
        sub_shift = None if shift is None else jnp.repeat(shift.reshape(-1), per_row)[:, None]
        sub_class = None
        if per_class is not None:
            rows = parts.shape[0] // per_row
            sub_class = jnp.broadcast_to(per_class.reshape(per_row, k), (rows, per_row, k))
            sub_class = sub_class.reshape(-1, k)
        parts = elementwise(parts, sub_shift, sub_class)
    partial_ = fn(parts, axis=1).reshape((*x.shape[:-1], per_row))
    return fn(partial_, axis=-1, keepdims=True)


def _sum_exp(x: Any, m: Any, axis: int, dtype: Any) -> Any:
    """``Σ_c exp(x_c - m)`` (keepdims): the one pass that upcasts with a plain convert."""
    return reduce_rows(jnp.sum, x, axis, lambda v, shift, _: jnp.exp(v.astype(dtype) - shift), m)


def add_reduce(operands: tuple[Any, ...], axis: int) -> tuple[Any, ...]:
    """Sums several same-shaped arrays over ``axis`` in one multi-output reduce (keepdims:
    2. above)."""
    zeros = tuple(jnp.zeros((), op.dtype) for op in operands)
    sums = lax.reduce(
        operands, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (axis,)
    )
    return tuple(jnp.expand_dims(v, axis) for v in sums)


def _keep_alive(value: Any, other: Any) -> Any:
    """``value``, but data-dependent on ``other`` (NaN iff ``other`` is NaN).

    Stops XLA from dropping an output of a multi-output reduce that only the forward's
    value needs: under ``jax.grad`` the reduce would otherwise shrink to one output and
    be re-fused (2. above). Used only where ``value`` is NaN whenever ``other`` is.
    """
    return jnp.where(other <= jnp.inf, value, jnp.full_like(value, jnp.nan))


def take_class(x: Any, idx: Any, axis: int) -> Any:
    """``x`` at class ``idx`` along ``axis`` (keepdims), in ``x``'s dtype.

    16-bit inputs are gathered through a same-width integer bitcast. A plain gather lets
    XLA rewrite ``convert(gather(x))`` into ``gather(convert(x))``, whose upcast copy is
    then shared with the log-sum-exp reduction and materialised (+8 GiB at 16,384 x
    131,072 bf16).
    """
    idx = jnp.expand_dims(idx, axis)
    if x.dtype.itemsize != 2:
        return jnp.take_along_axis(x, idx, axis=axis)
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    picked = jnp.take_along_axis(bits, idx, axis=axis)
    return lax.bitcast_convert_type(picked, x.dtype)


def _put_class(dx: Any, idx: Any, value: Any, axis: int) -> Any:
    """``dx`` with ``value`` (keepdims) written at class ``idx`` along ``axis``, in place,
    by one unique-index scatter (4. above). ``idx`` is always in range."""
    index = []
    for i in range(dx.ndim):
        if i == axis:
            index.append(jnp.expand_dims(idx, axis))
        else:
            shape = tuple(dx.shape[i] if j == i else 1 for j in range(dx.ndim))
            index.append(lax.broadcasted_iota(jnp.int32, shape, i))
    return dx.at[tuple(index)].set(value, unique_indices=True, mode="promise_in_bounds")


# ---------------------------------------------------------------------------------------
# Passes (same contracts as jaxce._rows)
# ---------------------------------------------------------------------------------------


def _row_max(x: Any, axis: int, dtype: Any, cap: float | None) -> tuple[Any, Any]:
    """``(mx, m)``: the row max (exact, in the input dtype, then ``dtype``) and the shift."""
    mx = reduce_rows(jnp.max, x, axis).astype(dtype)
    return mx, _rows.row_shift(mx, cap)


def index_row_stats(x, idx, weight, *, axis, cap, smooth, dtype) -> IndexStats:
    """:func:`jaxce._rows.index_row_stats`, spelled for XLA:CPU by case."""
    mx, m = _row_max(x, axis, dtype, cap)
    z_y = softcap(take_class(x, idx, axis).astype(dtype), cap)
    w = _rows.weight_along(weight, x.ndim, axis, dtype)
    gap = None
    if cap is not None:
        # The capped logits are recomputed elementwise inside each reduction. float16 has
        # no bit-trick upcast: it is read through a barrier so CSE cannot share one capped
        # float32 copy with the backward pass (+512 MiB at 4,096 x 32,768). One
        # multi-output reduce either way: a single-output one is fused by YNN, which then
        # materialises the capped logits (a full float32 copy).
        xs = lax.optimization_barrier(x) if x.dtype == jnp.float16 else x
        s = softcap(xs.astype(dtype), cap)
        sum_exp, gap = add_reduce((jnp.exp(s - m), m - s if w is None else w * (m - s)), axis)
        sum_exp = _keep_alive(sum_exp, gap)
    elif not smooth and x.dtype == jnp.float16:
        # float16 has no exact bit-trick upcast, so the backward's convert is CSE'd with
        # this one: keep this pass out of YNN (a multi-output reduce) so both fuse it.
        xf = x.astype(dtype)
        sum_exp, shifted = add_reduce((jnp.exp(xf - m), xf - m), axis)
        sum_exp = _keep_alive(sum_exp, shifted)
    elif not smooth:
        sum_exp = _sum_exp(x, m, axis, dtype)
    elif x.dtype.itemsize == 2:
        # Σ exp(x - m) and Σ w (m - x) in one multi-output reduce over a distinct upcast.
        xf = upcast_mul(x, dtype)
        sum_exp, gap = add_reduce((jnp.exp(xf - m), m - xf if w is None else w * (m - xf)), axis)
        sum_exp = _keep_alive(sum_exp, gap)
    else:
        sum_exp = _sum_exp(x, m, axis, dtype)
        neg_m = lax.stop_gradient(jnp.where(jnp.isneginf(mx), jnp.zeros_like(mx), -mx))

        def gap_terms(v, shift, w):  # m - x (weighted: w (x - m)), apart from sum_exp
            g = (-v).astype(dtype) - shift
            return g if w is None else -w * g

        gap = reduce_rows(jnp.sum, x, axis, gap_terms, neg_m, w)
        if w is not None:
            gap = -gap
    if not smooth:
        gap = None
    return IndexStats(m, m + jnp.log(sum_exp), z_y, gap)


def index_dense_grad(x, idx, rows: IndexGradRows, weight, *, axis, cap, dtype) -> Any:
    """:func:`jaxce._rows.index_dense_grad`, spelled for XLA:CPU: a bit-shift upcast, and
    for float32/float64 the target column written by a scatter (4. above)."""
    w = _rows.weight_along(weight, x.ndim, axis, dtype)
    xc = upcast_shift(x, dtype)
    slope = softcap_slope(xc, cap)
    if x.dtype.itemsize == 2:
        is_target = _rows.class_ids(x.shape, axis) == jnp.expand_dims(idx, axis)
        dz = _rows.index_logit_grad(softcap(xc, cap), rows, is_target, w)
        return times_slope(dz, slope).astype(x.dtype)
    dz = _rows.index_logit_grad(softcap(xc, cap), rows, None, w)
    dx = times_slope(dz, slope).astype(x.dtype)
    # The target column, recomputed in the compute dtype and rounded once.
    x_y = take_class(x, idx, axis).astype(dtype)
    w_y = None if weight is None else jnp.expand_dims(weight.astype(dtype)[idx], axis)
    value = _rows.index_logit_grad(softcap(x_y, cap), rows, True, w_y)
    value = times_slope(value, softcap_slope(x_y, cap))
    return _put_class(dx, idx, value.astype(x.dtype), axis)


def prob_row_stats(x, target, weight, eps, *, axis, cap, dtype) -> ProbStats:
    """:func:`jaxce._rows.prob_row_stats` in one multi-output pass over distinct upcasts."""
    _, m = _row_max(x, axis, dtype, cap)
    z = softcap(upcast_mul(x, dtype), cap)
    wt = _rows.smoothed_target(upcast_mul(target, dtype), eps, x.shape[axis])
    w = _rows.weight_along(weight, x.ndim, axis, dtype)
    if w is not None:
        wt = w * wt
    sum_exp, gap, q = add_reduce((jnp.exp(z - m), wt * (m - z), wt), axis)
    lse = m + jnp.log(sum_exp)
    return ProbStats(lse, gap + (lse - m) * q, q)


# :func:`jaxce._rows.prob_grads` reading its inputs with bit-shift upcasts.
prob_grads = prob_grads_shifted

# The chunk loop's pinned arrays (7. above).
hold = bits.hold
settle = bits.settle


# ---------------------------------------------------------------------------------------
# The fused linear loss's chunk step
# ---------------------------------------------------------------------------------------

# The identity transpose costs tokens x chunk^2 multiply-adds (the kernel-gradient matmul:
# tokens x chunk x D) and a chunk^2 identity. It is used only for chunks no wider than D and
# this bound: wide chunks come from few tokens, where the float32 upcast of ``hidden`` that
# it avoids is small anyway.
_MAX_EYE = 2048


def transposed(x, dtype):
    """``x.T`` as a row-major array, exactly (non-finite entries included).

    An identity matmul writes the transposed chunk for real: each output is one product
    ``1 * x`` (exact). Non-finite entries would spread through the zeros (``0 * inf``):
    in a chunk holding any, they are kept out of the product and added back transposed
    elementwise (a ``lax.cond``: the slower branch, never taken in training).
    """
    eye = jnp.eye(x.shape[1], dtype=x.dtype)
    dims = (((1,), (1,)), ((), ()))

    def by_matmul(x):
        return lax.dot_general(eye, x, dims, preferred_element_type=dtype).astype(x.dtype)

    def non_finite_apart(x):
        finite = jnp.isfinite(x)
        t = lax.dot_general(eye, jnp.where(finite, x, 0), dims, preferred_element_type=dtype)
        return (t + jnp.where(finite, 0, x).T.astype(dtype)).astype(x.dtype)

    return lax.cond(jnp.all(jnp.isfinite(x)), by_matmul, non_finite_apart, x)


def chunk_kernel_grad(hidden, dz, *, dtype):
    """``hidden.T @ dz`` (a chunk's kernel gradient, ``dtype`` accumulation), spelled for
    XLA:CPU (5. above).

    XLA:CPU multiplies 16-bit matrices natively only when both are row-major with the
    contracted dimension of the left one last. ``hidden.T @ dz`` is not such a product,
    so XLA upcasts both operands to float32 and hoists the whole ``hidden`` upcast out of
    the chunk loop (+256 MiB at 16,384 x 4,096 bf16); ``dz.T @ hidden`` is, but a plain
    ``.T`` is only a layout change, which XLA rejects the same way: :func:`transposed`
    writes it.
    """
    size = dz.shape[1]
    if hidden.dtype.itemsize == 2 and size <= min(hidden.shape[1], _MAX_EYE):
        dk_t = lax.dot_general(
            transposed(dz, dtype), hidden, (((1,), (0,)), ((), ())), preferred_element_type=dtype
        )
        # The barrier keeps XLA from folding this transpose back into the matmul.
        return lax.optimization_barrier(dk_t).T
    return lax.dot_general(hidden, dz, (((0,), (0,)), ((), ())), preferred_element_type=dtype)


# Token rows per block of the hidden-gradient update (6. above): [rows, D] float32 blocks.
_HIDDEN_BLOCK_BYTES = 16 * 2**20


def add_hidden_grad(dh, dz, k, *, dtype):
    """``dh + dz @ k.T`` (a chunk's share of the hidden gradient), spelled for XLA:CPU
    (6. above): token blocks of at most 16 MiB of float32 products, each added into its
    rows of ``dh`` in place. Measured (jaxlib 0.12.0.1, value_and_grad of
    ``linear_cross_entropy`` at 16384 x 4096 x 131072 f32): temporaries 276 -> 44 MiB.
    """
    n, d = dh.shape
    rows = max(1, _HIDDEN_BLOCK_BYTES // (4 * d))
    if n <= rows:
        return dh + lax.dot_general(dz, k, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
    blocks = [(s, min(rows, n - s)) for s in range(0, n, rows)]

    def add_block(start, size, dh):
        dz_b = lax.dynamic_slice_in_dim(dz, start, size, axis=0)
        prod = lax.dot_general(dz_b, k, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
        old = lax.dynamic_slice_in_dim(dh, start, size, axis=0)
        return lax.dynamic_update_slice_in_dim(dh, old + prod, start, axis=0)

    full = [b for b in blocks if b[1] == rows]
    # Inside shard_map the loop's carry must already vary over the mesh axes its updates
    # vary over (this spelling is traced on every platform: lax.platform_dependent).
    dh = cast_varying(dh, varying_axes(dz) | varying_axes(k))
    dh = lax.fori_loop(0, len(full), lambda i, dh: add_block(i * rows, rows, dh), dh)
    for start, size in blocks[len(full) :]:
        dh = add_block(start, size, dh)
    return dh


def add_kernel_grad(dk, h, dz, *, dtype):
    """XLA:CPU's spelling of min_work's ``dk += h.T @ dz`` per token block
    (``jaxce._token_blocks.add_kernel_grad``): over column chunks of ``dk``, each
    added in place. XLA:CPU does not fuse the sum into the matmul, so the whole ``[D, V]``
    product is a second accumulator-sized temporary (jaxlib 0.10.2 and 0.12.0.1: 16 MiB
    more at 2048 x 256 x 16384 f32). The chunks hold about a sixteenth of the block's
    logits, at least 128 columns."""
    # Imported here: jaxce._chunked and jaxce._token_blocks import this module.
    from jaxce._chunked import chunk_loop, chunks
    from jaxce._token_blocks import add_kernel_grad as portable

    dim, vocab = dk.shape
    cols = max(128, (h.shape[0] * vocab // (16 * max(dim, 1))) // 128 * 128)

    def add(start, size, carry, h, dz):
        dk, zero = carry
        dz_c = lax.dynamic_slice_in_dim(dz, start, size, axis=1)
        old = lax.dynamic_slice_in_dim(dk, start, size, axis=1)
        new = portable(old, h, dz_c, dtype=dtype)
        return lax.dynamic_update_slice_in_dim(dk, new, start, 1), zero

    # The scalar takes chunk_loop's exact zero (added to the smallest float of the carry),
    # which would otherwise rewrite the whole accumulator.
    carry = (dk, jnp.zeros((), dk.dtype))
    # XLA:CPU's own spelling: its loop takes XLA:CPU's hold and settle.
    pieces = chunks(vocab, min(cols, vocab))
    return chunk_loop(pieces, add, carry, (h, dz), "xla_cpu")[0]
