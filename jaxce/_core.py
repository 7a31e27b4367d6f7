"""Per-element cross-entropy with memory-lean derivatives in every mode.

Both cores return the *unreduced* per-element loss (the class axis removed) in the
compute dtype; reductions live in ``_reduction.py`` and are differentiated by plain
autodiff (they only touch element-sized arrays).

Each core is a ``jax.custom_jvp``: ``_*_fwd`` computes the loss and the residuals,
``_*_tangent`` the loss tangent (forward mode), and ``_*_bwd`` -- the tangent's transpose,
written by hand -- is what reverse mode runs (wired through ``_linear_map.linear_map``).
Everything is plain differentiable JAX, so second-order derivatives compose.

The forward passes keep, besides the inputs themselves, only per-element statistics
(the log-sum-exp, and for probability targets Σ_c w_c t'_c). The backward passes
recompute ``softmax = exp(x - lse)`` on the fly inside one fused elementwise
expression: no softmax, log-softmax, one-hot or upcast copy of the logits is saved.

Notation (see ``shared/SEMANTICS.md``): logits ``x``, class axis ``axis`` with ``C``
classes, weight ``w`` (all ones when absent), smoothing ``eps``, ``lse`` the per-element
log-sum-exp, ``m`` the per-element max (0 for all ``-inf`` rows).

Numerics: sums of ``lse - x_c`` are computed as ``Σ_c w_c (m - x_c) + (lse - m) Σ_c w_c``,
two non-negative terms (no cancellation), in the same pass as the log-sum-exp. Non-finite
logits propagate as in PyTorch: a ``+inf`` or NaN logit makes its row NaN, an all
``-inf`` row is NaN, a ``-inf`` logit in a non-target class is harmless without
smoothing and makes the smoothed loss ``+inf`` (its gradient stays finite).
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.experimental import checkify

from jaxce._linear_map import linear_map
from jaxce._validate import compute_dtype, promote_float_dtypes

# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _class_shape(ndim: int, axis: int, num_classes: int) -> tuple[int, ...]:
    return tuple(num_classes if i == axis else 1 for i in range(ndim))


def _weight_along(weight: Any, ndim: int, axis: int, dtype: Any) -> Any:
    """``weight`` reshaped to broadcast along ``axis`` (None stays None)."""
    if weight is None:
        return None
    return weight.astype(dtype).reshape(_class_shape(ndim, axis, weight.shape[0]))


def sum_weight(weight: Any, num_classes: int, dtype: Any) -> Any:
    return jnp.asarray(num_classes, dtype) if weight is None else jnp.sum(weight.astype(dtype))


def softcap(z: Any, cap: float | None) -> Any:
    """``cap * tanh(z / cap)`` (Gemma 2's logit soft-capping); ``z`` unchanged for None."""
    return z if cap is None else cap * jnp.tanh(z / cap)


def softcap_slope(z: Any, cap: float | None) -> Any:
    """``d softcap(z) / dz = 1 - tanh(z / cap)^2``; None without a cap."""
    if cap is None:
        return None
    t = jnp.tanh(z / cap)
    return 1 - t * t


def times_slope(dz: Any, slope: Any) -> Any:
    """Chain rule through the cap: a logit-space gradient times ``softcap_slope``."""
    return dz if slope is None else dz * slope


def no_tangent(x: Any) -> Any:
    """The (float0) zero tangent of an integer or boolean output."""
    return np.zeros(x.shape, jax.dtypes.float0)


# ---------------------------------------------------------------------------------------
# How the arithmetic is spelled, and why (XLA CPU fusion)
#
# The lean residuals only pay off if XLA also keeps its *temporaries* small. On CPU
# (jaxlib 0.10) two fusion behaviours materialise logits-sized float32 arrays unless the
# code is spelled carefully; `tests/test_memory.py` pins the result compile-only:
#
# 1. CSE merges identical upcasts ``convert(x)`` of a bf16/f16 input into one instruction.
#    When its consumers land in different fusions, the f32 copy is materialised. So each
#    pass upcasts with its own spelling: a plain convert (only in the log-sum-exp sum),
#    a bit shift (backward), an integer multiply (the forward's multi-output reduce).
# 2. The YNNPACK fusion starts at reductions and absorbs supported elementwise producers
#    and single-user consumers, turning anything it cannot absorb (selects, compares,
#    integer ops, shared broadcasts) into full-size inputs. So a second reduction over the
#    same input goes into one classic multi-output ``lax.reduce`` (YNN takes single-operand
#    reduces only), and every per-row vector entering the backward's dense pass ends in a
#    ``where`` (YNN cannot absorb a select), which keeps reductions from growing into it.
#
# None of this changes a value: every spelling is exact.
# ---------------------------------------------------------------------------------------


# The bit-level spellings below are invisible to autodiff (integer intermediates would
# silently drop derivatives), so each one is a ``linear_map`` (see ``_linear_map.py``):
# computed as spelled, differentiated and transposed as the plain operation. A primitive,
# unlike a nested ``custom_jvp``, cannot be inlined away by partial evaluation.


def lean_spelling(lean, plain, res, lin):
    """``lean(res, lin)``, linear in ``lin`` and equal to ``plain(res, lin)``, whose
    derivatives are those of ``plain``. Both take and return tuples."""
    avals = tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in lin)

    def transpose(res, ct):
        return tuple(jax.linear_transpose(lambda *v: plain(res, v), *avals)(tuple(ct)))

    return linear_map(lean, transpose, tuple(res), tuple(lin))


def _bits_to_f32(x: Any, spelling: str) -> Any:
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    if spelling == "shift":
        bits = bits.astype(jnp.uint32) << 16
    else:
        bits = bits.astype(jnp.int32) * jnp.int32(65536)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _upcast_bits(x: Any, dtype: Any, spelling: str) -> Any:
    if x.dtype != jnp.bfloat16 or dtype != jnp.float32:
        return x.astype(dtype)
    return lean_spelling(
        lambda _, v: (_bits_to_f32(v[0], spelling),),
        lambda _, v: (v[0].astype(jnp.float32),),
        (),
        (x,),
    )[0]


def _upcast_shift(x: Any, dtype: Any) -> Any:
    """Exact upcast, spelled as a bit shift for bf16 (used by the backward pass)."""
    return _upcast_bits(x, dtype, "shift")


def _upcast_mul(x: Any, dtype: Any) -> Any:
    """Exact upcast, spelled as an integer multiply for bf16 (used by multi-output reduces)."""
    return _upcast_bits(x, dtype, "mul")


# XLA:CPU's (YNN) row reductions slow down 6-9x once a row exceeds 32,768 elements
# (measured: sum(exp(x)) over [1024, 131072] f32 557 ms vs 60 ms over the same data viewed
# as [4096, 32768]). Long contiguous rows are therefore reduced as rows of at most this
# many elements, then the partial results once more; the view goes through an
# optimization barrier so XLA keeps the short rows (a bitcast, no copy).
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


def _reduce_rows(
    fn: Any, x: Any, axis: int, elementwise: Any = None, shift: Any = None, per_class: Any = None
) -> Any:
    """``fn(elementwise(x, shift, per_class), axis)`` with keepdims (``elementwise`` None:
    ``x``). ``shift``: per row (keepdims); ``per_class``: broadcastable to ``x``, varying
    along ``axis`` only.

    Long rows (see ``_split_rows``) are reduced as sub-rows of a barrier-held view of
    ``x``, with the per-row ``shift`` repeated for each sub-row and ``per_class`` tiled
    over the rows, then once more.
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


def _row_max(x: Any, axis: int, dtype: Any) -> tuple[Any, Any]:
    """``(mx, m)``: the row max (in the input dtype, exact) and the shift ``m``.

    ``m`` is the max except 0 for an all ``-inf`` row (so that row's lse is -inf and its
    loss NaN, as in PyTorch); a ``+inf``/NaN max is kept so the row turns NaN.
    """
    mx = _reduce_rows(jnp.max, x, axis).astype(dtype)
    m = lax.stop_gradient(jnp.where(jnp.isneginf(mx), jnp.zeros_like(mx), mx))
    return mx, m


def _sum_exp(x: Any, m: Any, axis: int, dtype: Any) -> Any:
    """``Σ_c exp(x_c - m)`` (keepdims): the one pass that upcasts with a plain convert."""
    return _reduce_rows(jnp.sum, x, axis, lambda v, shift, _: jnp.exp(v.astype(dtype) - shift), m)


def _add_reduce(operands: tuple[Any, ...], axis: int) -> tuple[Any, ...]:
    """Sums several same-shaped arrays over ``axis`` in one multi-output reduce (keepdims)."""

    def lean(_, ops):
        zeros = tuple(jnp.zeros((), op.dtype) for op in ops)
        sums = lax.reduce(
            ops, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b, strict=True)), (axis,)
        )
        return tuple(jnp.expand_dims(v, axis) for v in sums)

    def plain(_, ops):
        return tuple(jnp.sum(op, axis=axis, keepdims=True) for op in ops)

    return lean_spelling(lean, plain, (), operands)


def _keep_alive(value: Any, other: Any) -> Any:
    """``value``, but data-dependent on ``other`` (NaN iff ``other`` is NaN).

    Stops XLA from dropping an output of a multi-output reduce that only the forward's
    value needs: under ``jax.grad`` the reduce would otherwise shrink to one output and
    be re-fused (see 2. above). Used only where ``value`` is NaN whenever ``other`` is.
    """
    return jnp.where(other <= jnp.inf, value, jnp.full_like(value, jnp.nan))


def _take_class(x: Any, idx: Any, axis: int) -> Any:
    """``x`` at class ``idx`` along ``axis`` (keepdims), in ``x``'s dtype.

    16-bit inputs are gathered through a same-width integer bitcast. A plain gather lets
    XLA rewrite ``convert(gather(x))`` into ``gather(convert(x))``, whose upcast copy is
    then shared with the log-sum-exp reduction and materialised (+8 GiB at 16,384 x
    131,072 bf16, measured with ``memory_analysis()``).
    """
    idx = jnp.expand_dims(idx, axis)
    if x.dtype.itemsize != 2:
        return jnp.take_along_axis(x, idx, axis=axis)

    def lean(res, v):
        bits = lax.bitcast_convert_type(v[0], jnp.uint16)
        picked = jnp.take_along_axis(bits, res[0], axis=axis)
        return (lax.bitcast_convert_type(picked, v[0].dtype),)

    def plain(res, v):
        return (jnp.take_along_axis(v[0], res[0], axis=axis),)

    return lean_spelling(lean, plain, (idx,), (x,))[0]


def _put_class(dx: Any, idx: Any, value: Any, axis: int) -> Any:
    """``dx`` with ``value`` (keepdims) written at class ``idx`` along ``axis``, in place.

    One unique-index scatter: cheaper on CPU than an ``iota == target`` select over the
    whole dense pass. ``idx`` is always in range (out-of-range targets map to class 0).
    """
    index = []
    for i in range(dx.ndim):
        if i == axis:
            index.append(jnp.expand_dims(idx, axis))
        else:
            shape = tuple(dx.shape[i] if j == i else 1 for j in range(dx.ndim))
            index.append(lax.broadcasted_iota(jnp.int32, shape, i))
    return dx.at[tuple(index)].set(value, unique_indices=True, mode="promise_in_bounds")


def target_info(target: Any, num_classes: int, ignore_index: int) -> tuple[Any, Any, Any]:
    """Returns ``(valid, in_range, idx)`` for class-index targets.

    ``valid``: the element counts (target != ignore_index). ``in_range``: the target is a
    class in [0, C). ``idx``: a safe int32 gather index (the target when in range, else 0).
    Comparisons are made without casting the target, so uint8 targets work with the
    default ignore_index=-100 and int64 targets are not wrapped.
    """
    info = jnp.iinfo(target.dtype)
    if info.min <= ignore_index <= info.max:
        valid = target != jnp.asarray(ignore_index, target.dtype)
    else:  # ignore_index cannot occur in this dtype
        valid = jnp.ones(target.shape, bool)
    in_range = (
        target >= jnp.asarray(0, target.dtype) if info.min < 0 else jnp.ones(target.shape, bool)
    )
    if num_classes <= info.max:
        in_range = in_range & (target < jnp.asarray(num_classes, target.dtype))
    idx = jnp.where(in_range, target, jnp.zeros_like(target)).astype(jnp.int32)
    return valid, in_range, idx


def mask_targets(target: Any, where: Any, ignore_index: int) -> Any:
    """Class-index targets with ``ignore_index`` wherever the mask ``where`` is False.

    A masked element is then exactly an ignored one (loss 0, not in the 'mean'
    denominator, zero gradient). The target is widened to int32 when its dtype cannot
    hold ``ignore_index`` (a uint8 target with the default -100).
    """
    if where is None:
        return target
    candidates = [jnp.dtype(target.dtype), jnp.dtype(jnp.int32)]
    if jax.config.jax_enable_x64:
        candidates.append(jnp.dtype(jnp.int64))
    fits = [d for d in candidates if jnp.iinfo(d).min <= ignore_index <= jnp.iinfo(d).max]
    if not fits:
        raise ValueError(
            f"where needs ignore_index ({ignore_index}) to fit the target's dtype "
            f"{candidates[0].name} or int32"
        )
    dtype = fits[0]
    fill = jnp.asarray(ignore_index, dtype)
    return jnp.where(where, target.astype(dtype), fill)


def target_weight(weight: Any, idx: Any, valid: Any, in_range: Any, dtype: Any) -> Any:
    """``w[y]`` per element; NaN where a counted target is out of range, so that its loss
    and gradient are NaN (never a plausible finite value). Ignored elements get a finite
    placeholder: they are masked out everywhere."""
    w_y = jnp.ones(idx.shape, dtype) if weight is None else weight.astype(dtype)[idx]
    return jnp.where(in_range | ~valid, w_y, jnp.full_like(w_y, jnp.nan))


def debug_check_targets(target: Any, num_classes: int, ignore_index: int) -> None:
    """Reports an out-of-range class index under ``jax.experimental.checkify``.

    A no-op unless the caller is checkified (``checkify.checkify(f,
    errors=checkify.user_checks)``); then the error names the first bad index and its
    flat position. Without checkify the loss and gradient are NaN instead.
    """
    valid, in_range, _ = target_info(target, num_classes, ignore_index)
    bad = (valid & ~in_range).reshape(-1)
    if bad.size == 0:
        return
    first = jnp.argmax(bad)
    checkify.debug_check(
        ~jnp.any(bad),
        f"target holds class index {{}} at flat position {{}}, outside the valid range "
        f"[0, {num_classes}) and not ignore_index ({ignore_index})",
        target.reshape(-1)[first],
        first,
    )


class IndexGradRows(NamedTuple):
    """Per-element coefficients of the index-target gradient w.r.t. the logits:
    ``dz = p coef - a onehot - b w_c`` with ``p = exp(z - lse_for_p)``."""

    keep: Any  # 1 - eps (1 without smoothing)
    a: Any  # g w[y] (1 - eps): coefficient of -onehot
    b: Any  # g eps / C: coefficient of -w_c (None without smoothing)
    coef: Any  # a + b Σ_c w_c: coefficient of p
    lse_for_p: Any  # lse, or +inf at ignored elements (p = 0 there)


def index_grad_rows(
    g, valid, w_y, lse, eps, weight, num_classes, dtype, g_lse=None
) -> IndexGradRows:
    """The row coefficients shared by the index backward passes (plain and fused linear).

    Everything is masked with ``where``, not ``*``: ``g`` may be inf (a 'mean' with W = 0)
    and ignored elements must still get exactly 0. ``coef`` is computed in one expression
    rather than as ``a + b * Σw``: on CPU the latter lets XLA fuse the ``Σw`` reduction
    into the dense backward pass and materialise its broadcasts (see the note above).

    ``g_lse``: an optional cotangent of the per-element log-sum-exp output (whose gradient
    is ``softmax``), added to ``coef`` at every element, ignored ones included.
    """
    zero = jnp.zeros_like(lse)
    keep = 1 if eps is None else 1 - eps.astype(dtype)
    a = jnp.where(valid, g * w_y * keep, zero)
    b = None
    coef = a
    if eps is not None:
        per_class = eps.astype(dtype) / num_classes
        b = jnp.where(valid, g * per_class, zero)
        coef = jnp.where(
            valid, g * (w_y * keep + per_class * sum_weight(weight, num_classes, dtype)), zero
        )
    # Ignored rows: p = exp(z - inf) = 0 for finite logits; non-finite rows stay NaN.
    lse_for_p = jnp.where(valid, lse, lse + jnp.inf)
    if g_lse is not None:
        g_lse = g_lse.astype(dtype)
        coef = coef + g_lse
        lse_for_p = jnp.where(valid | (g_lse != 0), lse, lse + jnp.inf)
    return IndexGradRows(keep, a, b, coef, lse_for_p)


def index_eps_grad(g, valid, w_y, nll, smooth, eps, num_classes):
    """``d/d eps`` of the index loss: ``Σ_n g_n (smooth_n / C - w[y_n] nll_n)``, valid n."""
    if eps is None:
        return None
    per = jnp.where(valid, g * (smooth / num_classes - w_y * nll), jnp.zeros_like(nll))
    return jnp.sum(per).astype(eps.dtype)


def _reduce_to_classes(v: Any, axis: int) -> Any:
    """Sums a logits-shaped array over every axis but the class axis -> ``[C]``."""
    return jnp.sum(v, axis=tuple(i for i in range(v.ndim) if i != axis))


# ---------------------------------------------------------------------------------------
# Class-index targets
# ---------------------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def index_loss(
    x: Any,
    target: Any,
    weight: Any,
    eps: Any,
    axis: int,
    ignore_index: int,
    cap: float | None = None,
    stats: bool = False,
) -> Any:
    """Per-element loss for class-index targets; 0 at ignored elements.

    ``l_n = (1 - eps) w[y_n] (lse_n - x_{n,y_n}) + (eps / C) Σ_c w_c (lse_n - x_{n,c})``
    for non-ignored ``n`` (``eps`` None: no smoothing term). Shape: ``target.shape``.
    ``cap``: the logits are soft-capped first (:func:`softcap`). ``stats``: returns
    ``(loss, lse, correct)``: also the per-element log-sum-exp of the (capped) logits
    (differentiable: its gradient is the softmax) and whether a counted element's argmax is
    its target (boolean, no derivative).
    """
    return _index_fwd(x, target, weight, eps, axis, ignore_index, cap, stats)[0]


def _index_jvp(axis, ignore_index, cap, stats, primals, tangents):
    x, target, weight, eps = primals
    out, res = _index_fwd(x, target, weight, eps, axis, ignore_index, cap, stats)
    static = (axis, ignore_index, cap, stats)
    tangent = lean_tangent(
        partial(_index_tangent, *static),
        partial(_index_transpose, *static),
        res,
        (tangents[0], None, tangents[2], tangents[3]),
        out[:2] if stats else out,
    )
    return out, ((*tangent, no_tangent(out[2])) if stats else tangent)


index_loss.defjvp(_index_jvp, symbolic_zeros=True)


def _index_stats(x, target, weight, eps, axis, ignore_index, cap=None):
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[axis]
    valid, in_range, idx = target_info(target, num_classes, ignore_index)
    mx, m = _row_max(x, axis, dtype)
    x_y = softcap(_take_class(x, idx, axis).astype(dtype), cap)
    smooth_gap = None
    w = _weight_along(weight, x.ndim, axis, dtype)
    if cap is not None:
        # The capped logits are recomputed elementwise inside each reduction; the capped
        # row max (tanh is increasing) is the shift.
        m = lax.stop_gradient(softcap(mx, cap))
        # float16 has no bit-trick upcast: read the input through a barrier so CSE cannot
        # share one capped float32 copy with the backward pass (measured: +512 MiB at
        # 4,096 x 32,768). A no-op on the values.
        xs = lax.optimization_barrier(x) if x.dtype == jnp.float16 else x
        s = softcap(xs.astype(dtype), cap)
        # One multi-output reduce either way: a single-output one is fused by YNN, which
        # then materialises the capped logits (measured: a full float32 copy).
        gap = m - s if w is None else w * (m - s)
        sum_exp, gap = _add_reduce((jnp.exp(s - m), gap), axis)
        sum_exp = _keep_alive(sum_exp, gap)
        if eps is not None:
            smooth_gap = gap
    elif eps is None and x.dtype == jnp.float16:
        # float16 has no exact bit-trick upcast, so the backward's convert is CSE'd with
        # this one: keep this pass out of YNN (a multi-output reduce) so both fuse it.
        xf = x.astype(dtype)
        sum_exp, shifted = _add_reduce((jnp.exp(xf - m), xf - m), axis)
        sum_exp = _keep_alive(sum_exp, shifted)
    elif eps is None:
        sum_exp = _sum_exp(x, m, axis, dtype)
    elif x.dtype.itemsize == 2:
        # Σ exp(x - m) and Σ w (m - x) in one multi-output reduce over a distinct upcast.
        xf = _upcast_mul(x, dtype)
        gap = m - xf if w is None else w * (m - xf)
        sum_exp, smooth_gap = _add_reduce((jnp.exp(xf - m), gap), axis)
        sum_exp = _keep_alive(sum_exp, smooth_gap)
    else:
        sum_exp = _sum_exp(x, m, axis, dtype)
        neg_m = lax.stop_gradient(jnp.where(jnp.isneginf(mx), jnp.zeros_like(mx), -mx))

        def gap(v, shift, w):  # m - x, spelled apart from the sum_exp pass
            g = (-v).astype(dtype) - shift
            return g if w is None else -w * g

        smooth_gap = _reduce_rows(jnp.sum, x, axis, gap, neg_m, w)
        if w is not None:
            smooth_gap = -smooth_gap
    lse = m + jnp.log(sum_exp)
    nll = jnp.squeeze(lse - x_y, axis)
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    smooth = None
    if eps is not None:
        # Σ_c w_c (lse - x_c) = Σ_c w_c (m - x_c) + (lse - m) Σ_c w_c: two non-negative
        # terms, no cancellation.
        sum_w = sum_weight(weight, num_classes, dtype)
        smooth = jnp.squeeze(smooth_gap + (lse - m) * sum_w, axis)
    return valid, w_y, jnp.squeeze(lse, axis), nll, smooth


def index_correct(x, target, axis, ignore_index):
    """Counted elements whose argmax (the first maximal class, as ``jnp.argmax``) is the
    target: one extra reduction over the logits, traced only when asked for."""
    valid, in_range, idx = target_info(target, x.shape[axis], ignore_index)
    return valid & in_range & (jnp.argmax(x, axis=axis).astype(jnp.int32) == idx)


def combine_index_loss(valid, w_y, nll, smooth, eps, num_classes):
    loss = w_y * nll
    if eps is not None:
        eps = eps.astype(loss.dtype)
        # torch takes the smoothing path only for eps > 0: at eps == 0 an infinite
        # smoothing sum (a -inf logit) must not turn the loss into 0 * inf = NaN. Spelled
        # so that autodiff still sees d/d eps = smooth / C at eps == 0 (as the custom rules
        # do), not the zero derivative of a select.
        finite = jnp.where(jnp.isfinite(smooth), smooth, jnp.zeros_like(smooth))
        smooth_term = (eps / num_classes) * jnp.where(eps > 0, smooth, finite)
        loss = (1 - eps) * loss + smooth_term
    return jnp.where(valid, loss, jnp.zeros_like(loss))


def _index_fwd(x, target, weight, eps, axis, ignore_index, cap=None, stats=False):
    eps = checked_eps(eps)
    valid, w_y, lse, nll, smooth = _index_stats(x, target, weight, eps, axis, ignore_index, cap)
    loss = combine_index_loss(valid, w_y, nll, smooth, eps, x.shape[axis])
    # Residuals: the inputs, plus element-sized statistics only.
    res = (x, target, weight, eps, lse, nll, smooth)
    if stats:
        return (loss, lse, index_correct(x, target, axis, ignore_index)), res
    return loss, res


def _index_bwd(axis, ignore_index, cap, stats, res, ct):
    x, target, weight, eps, lse, nll, smooth = res
    g, g_lse = ct if stats else (ct, None)
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[axis]
    valid, in_range, idx = target_info(target, num_classes, ignore_index)
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    g = g.astype(dtype)
    zero = jnp.zeros_like(lse)
    rows = index_grad_rows(g, valid, w_y, lse, eps, weight, num_classes, dtype, g_lse)
    keep, a, b, coef = rows.keep, rows.a, rows.b, rows.coef
    lse_k = jnp.expand_dims(rows.lse_for_p, axis)
    coef_k = jnp.expand_dims(coef, axis)
    a_k = jnp.expand_dims(a, axis)
    w = _weight_along(weight, x.ndim, axis, dtype)
    xc = _upcast_shift(x, dtype)
    slope = softcap_slope(xc, cap)
    dx = jnp.exp(softcap(xc, cap) - lse_k) * coef_k
    if b is not None:
        b_k = jnp.expand_dims(b, axis)
        dx = dx - (b_k if w is None else b_k * w)
    if x.dtype.itemsize == 2:
        # A 16-bit scatter is upcast to f32 by XLA CPU: subtract the one-hot term densely.
        is_target = lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(idx, axis)
        dx = dx - jnp.where(is_target, a_k, jnp.zeros_like(a_k))
        dx = times_slope(dx, slope).astype(x.dtype)
    else:
        # The target column, recomputed in the compute dtype and rounded once.
        x_y = _take_class(x, idx, axis).astype(dtype)
        value = jnp.exp(softcap(x_y, cap) - lse_k) * coef_k - a_k
        if b is not None:
            b_y = b if weight is None else b * w_y
            value = value - jnp.expand_dims(b_y, axis)
        value = times_slope(value, softcap_slope(x_y, cap))
        dx = _put_class(times_slope(dx, slope).astype(x.dtype), idx, value.astype(x.dtype), axis)

    dweight = None
    if weight is not None:
        # d l_n / d w_k = (1 - eps) nll_n [y_n = k] + (eps / C) (lse_n - x_{n,k}), valid n only.
        nll_term = jnp.where(valid, g * keep * nll, zero)
        dweight = jnp.zeros((num_classes,), dtype).at[idx.reshape(-1)].add(nll_term.reshape(-1))
        if b is not None:
            s = softcap(x.astype(dtype), cap)
            gap = jnp.expand_dims(b, axis) * (jnp.expand_dims(lse, axis) - s)
            gap = jnp.where(jnp.expand_dims(valid, axis), gap, jnp.zeros_like(gap))
            dweight = dweight + _reduce_to_classes(gap, axis)
        dweight = dweight.astype(weight.dtype)

    deps = index_eps_grad(g, valid, w_y, nll, smooth, eps, num_classes)
    return dx, None, dweight, deps


def _index_transpose(axis, ignore_index, cap, stats, res, ct, present):
    return _index_bwd(axis, ignore_index, cap, stats, res, ct)


def _index_tangent(axis, ignore_index, cap, stats, res, tangents):
    """``d l_n`` (and with ``stats`` ``d lse_n``) for tangents ``(dx, -, dweight, deps)``
    (None: zero); the transpose of ``_index_bwd`` in its cotangent."""
    x, target, weight, eps, lse, nll, smooth = res
    dx, _, dweight, deps = tangents
    dtype = compute_dtype(x.dtype)
    num_classes = x.shape[axis]
    valid, in_range, idx = target_info(target, num_classes, ignore_index)
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    zero = jnp.zeros_like(lse)
    rows = index_grad_rows(jnp.ones_like(lse), valid, w_y, lse, eps, weight, num_classes, dtype)
    xf = x.astype(dtype)
    s = softcap(xf, cap)
    out = zero
    d_lse = zero
    if dx is not None:
        dxf = times_slope(dx.astype(dtype), softcap_slope(xf, cap))
        p = jnp.exp(s - jnp.expand_dims(rows.lse_for_p, axis))
        dx_y = jnp.squeeze(jnp.take_along_axis(dxf, jnp.expand_dims(idx, axis), axis), axis)
        t = rows.coef * jnp.sum(p * dxf, axis=axis) - rows.a * dx_y
        if rows.b is not None:
            w = _weight_along(weight, x.ndim, axis, dtype)
            t = t - rows.b * jnp.sum(dxf if w is None else w * dxf, axis=axis)
        out = out + t
        if stats:
            d_lse = jnp.sum(jnp.exp(s - jnp.expand_dims(lse, axis)) * dxf, axis=axis)
    if dweight is not None:
        dw = dweight.astype(dtype)
        t = rows.keep * nll * dw[idx]
        if rows.b is not None:
            gap = jnp.expand_dims(lse, axis) - s
            t = t + rows.b * jnp.sum(_weight_along(dw, x.ndim, axis, dtype) * gap, axis=axis)
        out = out + jnp.where(valid, t, zero)
    if deps is not None:
        out = out + jnp.where(valid, smooth / num_classes - w_y * nll, zero) * deps.astype(dtype)
    return (out, d_lse) if stats else out


# ---------------------------------------------------------------------------------------
# Class-probability targets
# ---------------------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def prob_loss(
    x: Any,
    target: Any,
    weight: Any,
    eps: Any,
    axis: int,
    cap: float | None = None,
    stats: bool = False,
) -> Any:
    """Per-element loss for class-probability targets.

    ``l_n = Σ_c w_c t'_{n,c} (lse_n - x_{n,c})`` with ``t' = (1 - eps) t + eps / C``
    (``t' = t`` when ``eps`` is None). Shape: the input's shape without ``axis``.
    ``cap`` and ``stats`` as in :func:`index_loss` (``correct``: the logits' argmax is the
    target's argmax).
    """
    return _prob_fwd(x, target, weight, eps, axis, cap, stats)[0]


def _prob_jvp(axis, cap, stats, primals, tangents):
    out, res = _prob_fwd(*primals, axis, cap, stats)
    static = (axis, cap, stats)
    tangent = lean_tangent(
        partial(_prob_tangent, *static),
        partial(_prob_transpose, *static),
        res,
        tangents,
        out[:2] if stats else out,
    )
    return out, ((*tangent, no_tangent(out[2])) if stats else tangent)


prob_loss.defjvp(_prob_jvp, symbolic_zeros=True)


def _smoothed_target(t, eps, num_classes):
    if eps is None:
        return t
    eps = eps.astype(t.dtype)
    return t * (1 - eps) + eps / num_classes


def _prob_fwd(x, target, weight, eps, axis, cap=None, stats=False):
    eps = checked_eps(eps)
    dtype = compute_dtype(promote_float_dtypes(x.dtype, target.dtype))
    num_classes = x.shape[axis]
    mx, m = _row_max(x, axis, dtype)
    xf = _upcast_mul(x, dtype)
    if cap is not None:
        m = lax.stop_gradient(softcap(mx, cap))
        xf = softcap(xf, cap)
    wt = _smoothed_target(_upcast_mul(target, dtype), eps, num_classes)
    w = _weight_along(weight, x.ndim, axis, dtype)
    if w is not None:
        wt = w * wt
    # One multi-output pass: Σ exp(x - m), Σ w t' (m - x) and q = Σ w t'.
    # Σ w t' (lse - x) = Σ w t' (m - x) + (lse - m) q; 0 * inf stays NaN as in torch.
    sum_exp, gap, q = _add_reduce((jnp.exp(xf - m), wt * (m - xf), wt), axis)
    lse = m + jnp.log(sum_exp)
    loss = jnp.squeeze(gap + (lse - m) * q, axis)
    lse = jnp.squeeze(lse, axis)
    res = (x, target, weight, eps, lse, jnp.squeeze(q, axis))
    if stats:
        correct = jnp.argmax(x, axis=axis) == jnp.argmax(target, axis=axis)
        return (loss, lse, correct), res
    return loss, res


def _prob_bwd(axis, cap, stats, res, ct):
    x, target, weight, eps, lse, q = res
    g, g_lse = ct if stats else (ct, None)
    dtype = compute_dtype(promote_float_dtypes(x.dtype, target.dtype))
    num_classes = x.shape[axis]
    x_raw = _upcast_shift(x, dtype)
    xc = softcap(x_raw, cap)
    tc = _upcast_shift(target, dtype)
    g_k = jnp.expand_dims(g.astype(dtype), axis)
    lse_k = jnp.expand_dims(lse, axis)
    w = _weight_along(weight, x.ndim, axis, dtype)
    tp = _smoothed_target(tc, eps, num_classes)
    wt = tp if w is None else w * tp
    p = jnp.exp(xc - lse_k)
    dx = g_k * (p * jnp.expand_dims(q, axis) - wt)
    if g_lse is not None:
        dx = dx + p * jnp.expand_dims(g_lse.astype(dtype), axis)
    dx = times_slope(dx, softcap_slope(x_raw, cap)).astype(x.dtype)

    gap = lse_k - xc  # -log_softmax, recomputed elementwise
    keep = 1 if eps is None else 1 - eps.astype(dtype)
    dt = g_k * keep * gap
    if w is not None:
        dt = w * dt
    dt = dt.astype(target.dtype)

    dweight = None
    if weight is not None:
        dweight = _reduce_to_classes(g_k * tp * gap, axis).astype(weight.dtype)
    deps = None
    if eps is not None:
        d_tp = 1 / num_classes - tc  # d t' / d eps
        if w is not None:
            d_tp = w * d_tp
        deps = jnp.sum(g_k * d_tp * gap).astype(eps.dtype)
    return dx, dt, dweight, deps


def _prob_transpose(axis, cap, stats, res, ct, present):
    return _prob_bwd(axis, cap, stats, res, ct)


def _prob_tangent(axis, cap, stats, res, tangents):
    """``d l_n`` (and with ``stats`` ``d lse_n``) for tangents ``(dx, dtarget, dweight,
    deps)`` (None: zero); the transpose of ``_prob_bwd`` in its cotangent."""
    x, target, weight, eps, lse, q = res
    dx, dt, dweight, deps = tangents
    dtype = compute_dtype(promote_float_dtypes(x.dtype, target.dtype))
    num_classes = x.shape[axis]
    x_raw = x.astype(dtype)
    xc = softcap(x_raw, cap)
    tc = target.astype(dtype)
    lse_k = jnp.expand_dims(lse, axis)
    gap = lse_k - xc
    w = _weight_along(weight, x.ndim, axis, dtype)
    tp = _smoothed_target(tc, eps, num_classes)
    terms = []
    d_lse = jnp.zeros_like(lse)
    if dx is not None:
        wt = tp if w is None else w * tp
        p = jnp.exp(xc - lse_k)
        dxs = times_slope(dx.astype(dtype), softcap_slope(x_raw, cap))
        terms.append((p * jnp.expand_dims(q, axis) - wt) * dxs)
        if stats:
            d_lse = jnp.sum(p * dxs, axis=axis)
    if dt is not None:
        keep = 1 if eps is None else 1 - eps.astype(dtype)
        term = keep * gap * dt.astype(dtype)
        terms.append(term if w is None else w * term)
    if dweight is not None:
        terms.append(_weight_along(dweight, x.ndim, axis, dtype) * tp * gap)
    if deps is not None:
        d_tp = 1 / num_classes - tc
        term = (d_tp if w is None else w * d_tp) * gap * deps.astype(dtype)
        terms.append(term)
    out = jnp.sum(sum(terms[1:], terms[0]), axis=axis)
    return (out, d_lse) if stats else out


def checked_eps(eps: Any) -> Any:
    """A traced eps outside [0, 1] (or NaN) becomes NaN, so the loss is NaN, never finite."""
    if eps is None:
        return None
    eps = jnp.asarray(eps)
    ok = (eps >= 0) & (eps <= 1)
    return jnp.where(ok, eps, jnp.full_like(eps, jnp.nan))


# ---------------------------------------------------------------------------------------
# Tangents with a lean transpose
# ---------------------------------------------------------------------------------------


def lean_tangent(tangent_fn, transpose_fn, res, tangents, like):
    """The loss tangent ``tangent_fn(res, tangents)``, whose transpose (used by reverse
    mode) is the hand-written backward pass ``transpose_fn(res, ct, present)``.

    ``tangents`` has one entry per differentiable input (None, a symbolic zero, or an
    array); ``transpose_fn`` returns a cotangent for each of them (None where absent) and
    only those with a nonzero tangent are kept. ``like``: the primal output, or a tuple of
    outputs (then ``tangent_fn`` returns, and ``transpose_fn`` receives, a tuple). See
    ``_linear_map.py`` for why this is not a ``custom_vjp``.
    """
    multi = isinstance(like, tuple)
    present = tuple(t is not None and not isinstance(t, SymbolicZero) for t in tangents)
    if not any(present):
        return tuple(map(jnp.zeros_like, like)) if multi else jnp.zeros_like(like)
    leaves, tree = jax.tree.flatten(res)
    lin = tuple(t for t, p in zip(tangents, present, strict=True) if p)

    def fun(leaves, lin):
        it = iter(lin)
        full = tuple(next(it) if p else None for p in present)
        out = tangent_fn(jax.tree.unflatten(tree, leaves), full)
        return tuple(out) if multi else (out,)

    def fun_t(leaves, cts):
        ct = tuple(cts) if multi else cts[0]
        out = transpose_fn(jax.tree.unflatten(tree, leaves), ct, present)
        return tuple(o for o, p in zip(out, present, strict=True) if p)

    out = linear_map(fun, fun_t, leaves, lin)
    return out if multi else out[0]
