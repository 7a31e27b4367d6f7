"""Drop-in replacements for optax's softmax cross-entropy losses, with lean gradients.

Same signatures and results as ``optax.softmax_cross_entropy`` and
``optax.softmax_cross_entropy_with_integer_labels`` (optax 0.2.8), tuple ``axis`` and
``where`` included, computed by jaxce's cores: the backward pass keeps the per-row
log-sum-exp, not a log-softmax copy of the logits.

``where`` follows optax: a boolean mask that broadcasts to the logits' shape, after
size-1 class axes are inserted when its rank differs from the logits' (so a batch-shaped
mask works). A mask constant along the class axes (the batch shape, ``[B, 1]``, ...) is a
row mask: masked rows give 0. Any other is a class mask: masked classes are left out of
the normaliser (and of the sum for probability labels); rows with no class left give 0.
A class mask costs one logits-sized masked copy in the residuals; a row mask nothing.

Empty inputs give optax's results without computing anything: no rows give an empty
result, no classes give -0.0 (probability labels: an empty sum) or -inf (integer labels:
the log-sum-exp of an empty row; 0 at masked rows).
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _validate
from jaxce._backends import check_implementation
from jaxce._index import index_loss
from jaxce._options import Options, compute_dtype, promote_float_dtypes
from jaxce._prob import prob_loss
from jaxce._targets import target_info

Axis = int | tuple[int, ...]


def _class_axes(axis: Any, ndim: int, allow_none: bool) -> tuple[int, ...]:
    """The class axes in ``[0, ndim)``, in the order given. Raises ValueError, as optax
    does for an axis of the wrong type."""
    if axis is None and allow_none:
        return tuple(range(ndim))
    expected = "an int, a tuple of ints or None" if allow_none else "an int or a tuple of ints"
    items = axis if isinstance(axis, tuple) else (axis,)
    if not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in items):
        raise ValueError(f"axis must be {expected}; got {type(axis).__name__} {axis!r}")
    if not items and not allow_none:
        raise ValueError("axis must name at least one class axis; got ()")
    out = tuple(_validate.normalize_axis(a, ndim) for a in items)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis; got {axis!r}")
    return out


def _batch_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _to_last(x: Any, axes: tuple[int, ...]) -> Any:
    """Moves ``axes`` (in the given order) to the end and flattens them into one axis."""
    rest = tuple(i for i in range(x.ndim) if i not in axes)
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
        x = jnp.transpose(x, rest + axes)
    num_classes = math.prod(x.shape[len(rest) :])
    return jnp.reshape(x, (*x.shape[: len(rest)], num_classes))


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


def _expanded_shape(shape: tuple[int, ...], axis: Any) -> tuple[int, ...] | None:
    """The shape of ``jnp.expand_dims(where, axis)`` (None where that raises)."""
    axis = axis if isinstance(axis, tuple) else (axis,)
    ndim = len(shape) + len(axis)
    if not all(-ndim <= a < ndim for a in axis):
        return None
    ones = {a % ndim for a in axis}
    if len(ones) != len(axis):
        return None
    dims = iter(shape)
    return tuple(1 if i in ones else next(dims) for i in range(ndim))


def _masks(where: Any, logits: Any, axis: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """``(row_mask, class_mask)``: None, a batch-shaped row mask, or a class mask in the
    flattened ``[batch..., C]`` layout."""
    if where is None:
        return None, None
    where = _validate.as_array(where, "where")
    if where.dtype != jnp.bool_:
        raise ValueError(
            f"where must be a boolean mask; got dtype {_validate.dtype_name(where.dtype)}"
        )
    shape = tuple(where.shape)
    if len(shape) != logits.ndim:  # optax: jnp.expand_dims(where, axis)
        shape = _expanded_shape(shape, axes if axis is None else axis)
    if shape is None or not _broadcasts_to(shape, tuple(logits.shape)):
        batch = _batch_shape(tuple(logits.shape), axes)
        raise ValueError(
            f"where must broadcast to the logits' shape {tuple(logits.shape)} (a mask of "
            f"the batch shape {batch} gets size-1 class axes, as in optax); got "
            f"{tuple(where.shape)}"
        )
    where = jnp.reshape(where, (1,) * (logits.ndim - len(shape)) + shape)
    if all(where.shape[a] == 1 for a in axes):  # constant along the classes: a row mask
        rows = jnp.reshape(where, _batch_shape(where.shape, axes))
        return jnp.broadcast_to(rows, _batch_shape(tuple(logits.shape), axes)), None
    return None, _to_last(jnp.broadcast_to(where, logits.shape), axes)


def _lse(x: Any, implementation: str | None) -> Any:
    """Per-row log-sum-exp along the last axis, with the lean gradient (the softmax)."""
    ignored = jnp.full(x.shape[:-1], -1, jnp.int32)  # every row ignored: only lse is used
    opts = Options(axis=x.ndim - 1, ignore_index=-1, stats=True, implementation=implementation)
    return index_loss(x, ignored, None, None, opts)[1]


def _masked_lse(x: Any, class_mask: Any, implementation: str | None) -> Any:
    """Per-row log-sum-exp over the unmasked classes, with the lean gradient (softmax over
    them). Rows with no class left get a finite placeholder (the callers zero them)."""
    alive = jnp.any(class_mask, axis=-1, keepdims=True)
    return _lse(jnp.where(class_mask | ~alive, x, jnp.full_like(x, -jnp.inf)), implementation)


def _check_logits(logits: Any) -> Any:
    logits = _validate.as_array(logits, "logits")
    if not _validate.is_float_dtype(logits.dtype):
        raise TypeError(
            f"logits must have a floating dtype; got {_validate.dtype_name(logits.dtype)}"
        )
    return logits


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    loss_dtype: jax.typing.DTypeLike | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""``optax.softmax_cross_entropy_with_integer_labels``, with jaxce's lean gradient.

    ``σ_n = lse(x_n) - x_{n, y_n}`` per row, no reduction. One deliberate difference:
    a label outside ``[0, C)`` gives NaN (optax wraps ``-1 … -C`` to a class, so a
    PyTorch-style ``-100`` label silently becomes class ``C - 100``; it gives NaN for the
    others). Masked rows may hold any label. With no classes (``C = 0``) every row gives
    -inf, the log-sum-exp of an empty row, as in optax; no rows give an empty result.

    Args:
      logits: ``[..., num_classes]`` (classes along ``axis``), floating.
      labels: integer class indices of the logits' shape without the class axes (size-1
        dimensions broadcast, as in optax). With a tuple ``axis`` a label is a flat
        (row-major) index into those axes, taken in the order given.
      axis: the class axis, or a non-empty tuple of axes. NumPy integers work (optax
        raises ValueError for them); anything else (a list, None, a string, a bool)
        raises ValueError, as optax does for all of these but a bool.
      where: optional boolean mask that broadcasts to the logits' shape once size-1
        class axes are inserted where its rank differs: constant along the classes
        (e.g. the batch shape or ``[B, 1]``), masked rows give 0; otherwise masked
        classes leave the normaliser and rows with none left give 0. A non-boolean mask
        raises ValueError, as in optax.
      loss_dtype: the losses' dtype (jaxce only; default: the logits', as optax), e.g.
        ``jnp.float32`` to keep bfloat16 logits' losses unrounded.
      implementation: how the passes over the logits are spelled (jaxce only; the values
        are the same whichever is chosen), as in :func:`jaxce.cross_entropy`: None
        (default) for the platform compiled for, ``'xla'`` the portable spelling
        everywhere, ``'xla_cpu'`` / ``'xla_gpu'`` that compiler's spelling on any platform.

    Returns:
      ``[batch...]`` losses in ``logits``' dtype (computed in float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> loss = jaxce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      >>> print([round(float(v), 4) for v in loss])
      [0.2761, 2.9518]

    PyTorch equivalent:
      ``F.cross_entropy(logits, labels, reduction="none")`` (``where``: no equivalent).
    """
    logits = _check_logits(logits)
    labels = _validate.as_array(labels, "labels")
    if not _validate.is_int_dtype(labels.dtype):
        raise TypeError(
            f"labels must have an integer dtype; got {_validate.dtype_name(labels.dtype)}"
        )
    axes = _class_axes(axis, logits.ndim, allow_none=False)
    batch = _batch_shape(tuple(logits.shape), axes)
    if labels.ndim != len(batch) or not _broadcasts_to(tuple(labels.shape), batch):
        raise ValueError(
            f"labels must have shape {batch} (logits' shape without axis {axis!r}; size-1 "
            f"dimensions broadcast); got {tuple(labels.shape)}"
        )
    row_mask, class_mask = _masks(where, logits, axis, axes)
    dtype = jax.dtypes.canonicalize_dtype(logits.dtype)  # NumPy float64 logits without x64
    out_dtype = _validate.check_loss_dtype(loss_dtype, dtype)
    impl = check_implementation(implementation)
    if math.prod(logits.shape) == 0:
        return _integer_empty(batch, out_dtype, row_mask, class_mask)
    labels = jnp.broadcast_to(labels, batch)
    x = _to_last(logits, axes)
    if class_mask is None:
        return _integer_rows(x, labels, row_mask, out_dtype=out_dtype, implementation=impl)
    return _integer_class_mask(x, labels, class_mask, out_dtype=out_dtype, implementation=impl)


def _integer_empty(batch, dtype, row_mask, class_mask):
    """No rows: an empty result. No classes: -inf (an empty row's lse), 0 where masked."""
    if math.prod(batch) == 0 or class_mask is not None:  # a class mask leaves no class
        return jnp.zeros(batch, dtype)
    loss = jnp.full(batch, -jnp.inf, dtype)
    if row_mask is None:
        return loss
    return jnp.where(row_mask, loss, jnp.zeros_like(loss))


# An ignore_index no integer dtype can hold: every label counts.
_NEVER = -(2**70)


@partial(jax.jit, static_argnames=("out_dtype", "implementation"))
def _integer_rows(x, labels, row_mask, *, out_dtype, implementation):
    if row_mask is not None:  # masked rows: any in-range label, then zeroed (no gradient)
        labels = jnp.where(row_mask, labels, jnp.zeros_like(labels))
    opts = Options(axis=x.ndim - 1, ignore_index=_NEVER, implementation=implementation)
    loss = index_loss(x, labels, None, None, opts)
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, jnp.zeros_like(loss))
    return loss.astype(out_dtype)


@partial(jax.jit, static_argnames=("out_dtype", "implementation"))
def _integer_class_mask(x, labels, class_mask, *, out_dtype, implementation):
    lse = _masked_lse(x, class_mask, implementation)
    _, in_range, idx = target_info(labels, x.shape[-1], _NEVER)
    x_y = jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0].astype(lse.dtype)
    out = jnp.where(in_range, lse - x_y, jnp.full_like(lse, jnp.nan))
    out = jnp.where(jnp.any(class_mask, axis=-1), out, jnp.zeros_like(lse))
    return out.astype(out_dtype)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
    *,
    loss_dtype: jax.typing.DTypeLike | None = None,
    implementation: str | None = None,
) -> jax.Array:
    r"""``optax.softmax_cross_entropy``, with jaxce's lean gradient.

    ``σ_n = -Σ_c y_{n,c} log softmax(x_n)_c`` per row, no reduction; ``labels`` are any
    real class weights (probabilities, one-hot), differentiable when floating. Masked
    rows, and rows with no classes (``C = 0``), give -0.0 as in optax; no rows give an
    empty result.

    Args:
      logits: floating logits, classes along ``axis``.
      labels: floating, integer or boolean (one-hot) labels that broadcast to the
        logits' shape (e.g. one distribution ``[C]`` for every row), as in optax; they
        do not broadcast the logits up (optax does; jaxce raises ValueError). Broadcast
        labels are not copied to the logits' shape in the residuals.
      axis: the class axis, a tuple of axes, or None (all axes: one scalar). Anything
        else (a list, a string, a bool) raises ValueError, as optax does for a list.
      where: optional boolean mask that broadcasts to the logits' shape once size-1
        class axes are inserted where its rank differs: constant along the classes
        (e.g. the batch shape or ``[B, 1]``), masked rows give -0.0; otherwise masked
        classes leave the normaliser and the sum, as in optax. A non-boolean mask raises
        ValueError, as in optax.
      loss_dtype: the losses' dtype (jaxce only; default: as optax, below).
      implementation: how the passes over the logits are spelled (jaxce only; the values
        are the same whichever is chosen), as in :func:`jaxce.cross_entropy`: None
        (default) for the platform compiled for, ``'xla'`` the portable spelling
        everywhere, ``'xla_cpu'`` / ``'xla_gpu'`` that compiler's spelling on any platform.

    Returns:
      ``[batch...]`` losses, dtype the promotion of ``logits`` and ``labels`` (the
      logits' dtype for integer or boolean labels).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> print([round(float(v), 4) for v in jaxce.softmax_cross_entropy(logits, labels)])
      [0.2761, 2.9518]

    PyTorch equivalent:
      ``F.cross_entropy(logits, labels, reduction="none")`` with probability targets.
    """
    logits = _check_logits(logits)
    labels = _validate.as_array(labels, "labels")
    real = (jnp.floating, jnp.integer, jnp.bool_)
    if not any(jnp.issubdtype(labels.dtype, kind) for kind in real):
        raise TypeError(
            "labels must have a floating, integer or boolean dtype; got "
            f"{_validate.dtype_name(labels.dtype)}"
        )
    if not _broadcasts_to(tuple(labels.shape), tuple(logits.shape)):
        raise ValueError(
            f"labels must have (or broadcast to) the logits' shape {tuple(logits.shape)}; "
            f"got {tuple(labels.shape)}"
        )
    axes = _class_axes(axis, logits.ndim, allow_none=True)
    row_mask, class_mask = _masks(where, logits, axis, axes)
    if not _validate.is_float_dtype(labels.dtype):
        labels = jnp.asarray(labels).astype(jax.dtypes.canonicalize_dtype(logits.dtype))
    out_dtype = jax.dtypes.canonicalize_dtype(promote_float_dtypes(logits.dtype, labels.dtype))
    out_dtype = _validate.check_loss_dtype(loss_dtype, out_dtype)
    impl = check_implementation(implementation)
    if math.prod(logits.shape) == 0:  # no rows, or empty rows: -(an empty sum)
        return jnp.full(_batch_shape(tuple(logits.shape), axes), -0.0, out_dtype)
    x = _to_last(logits, axes)
    if tuple(labels.shape) == tuple(logits.shape):
        t = _to_last(labels, axes)
        if class_mask is None:
            return _prob_rows(x, t, row_mask, out_dtype=out_dtype, implementation=impl)
    else:
        t = _broadcast_labels(labels, tuple(logits.shape), axes)
    return _prob_terms(x, t, row_mask, class_mask, out_dtype=out_dtype, implementation=impl)


def _broadcast_labels(labels: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """Labels that broadcast to ``shape``, in the flattened ``[batch..., C]`` layout
    without being broadcast: size-1 batch dimensions stay, and labels constant along
    all class axes keep one class entry (broadcast only along some: broadcast there)."""
    labels = jnp.reshape(labels, (1,) * (len(shape) - labels.ndim) + tuple(labels.shape))
    if any(labels.shape[a] == 1 for a in axes) and any(labels.shape[a] != 1 for a in axes):
        full = tuple(shape[i] if i in axes else d for i, d in enumerate(labels.shape))
        labels = jnp.broadcast_to(labels, full)
    return _to_last(labels, axes)


@partial(jax.jit, static_argnames=("out_dtype", "implementation"))
def _prob_rows(x, t, row_mask, *, out_dtype, implementation):
    loss = prob_loss(x, t, None, None, Options(axis=x.ndim - 1, implementation=implementation))
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, jnp.full_like(loss, -0.0))
    return loss.astype(out_dtype)


@partial(jax.jit, static_argnames=("out_dtype", "implementation"))
def _prob_terms(x, t, row_mask, class_mask, *, out_dtype, implementation):
    """``Σ_c t_c (lse - x_c)`` from the (masked) lse. ``t`` may keep size-1 dimensions
    (broadcast labels): the product broadcasts them, so the residual is ``t`` itself."""
    dtype = compute_dtype(promote_float_dtypes(x.dtype, t.dtype))
    # The lse in the logits' compute dtype (wider labels do not widen a copy of the logits;
    # optax's log-softmax is in the logits' dtype too).
    lse = (
        _lse(x, implementation)
        if class_mask is None
        else _masked_lse(x, class_mask, implementation)
    )
    lse = lse.astype(dtype)
    terms = t.astype(dtype) * (lse[..., None] - x.astype(dtype))
    if class_mask is not None:
        terms = jnp.where(class_mask, terms, jnp.zeros_like(terms))
    loss = jnp.sum(terms, axis=-1)
    if class_mask is not None:  # rows with no class left: -(an empty sum), as optax
        row_mask = jnp.any(class_mask, axis=-1)  # (_masks gives a row or a class mask)
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, jnp.full_like(loss, -0.0))
    return loss.astype(out_dtype)
