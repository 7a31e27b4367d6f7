"""Drop-in replacements for optax's softmax cross-entropy losses, with lean gradients.

Same signatures and results as ``optax.softmax_cross_entropy`` and
``optax.softmax_cross_entropy_with_integer_labels`` (optax 0.2.8), tuple ``axis`` and
``where`` included, computed by jaxce's cores: the backward pass keeps the per-row
log-sum-exp, not a log-softmax copy of the logits.

``where`` follows optax: either the batch shape (a row mask: masked rows give 0) or the
logits' shape (a class mask: masked classes are left out of the normaliser; rows with no
class left give 0). A class mask costs one logits-sized masked copy in the residuals.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxce import _validate
from jaxce._index import index_loss
from jaxce._options import Options
from jaxce._prob import prob_loss
from jaxce._targets import target_info

Axis = int | tuple[int, ...]


def _class_axes(axis: Any, ndim: int, allow_none: bool) -> tuple[int, ...]:
    if axis is None and allow_none:
        return tuple(range(ndim))
    if isinstance(axis, bool) or not isinstance(axis, (int, tuple)):
        expected = "an int, a tuple of ints or None" if allow_none else "an int or a tuple of ints"
        raise TypeError(f"axis must be {expected}; got {type(axis).__name__} {axis!r}")
    axes = (axis,) if isinstance(axis, int) else axis
    out = tuple(_validate.normalize_axis(a, ndim) for a in axes)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis; got {axis!r}")
    return out


def _to_last(x: Any, axes: tuple[int, ...]) -> Any:
    """Moves ``axes`` (in the given order) to the end and flattens them into one axis."""
    rest = tuple(i for i in range(x.ndim) if i not in axes)
    if axes != tuple(range(x.ndim - len(axes), x.ndim)):
        x = jnp.transpose(x, rest + axes)
    return x.reshape((*x.shape[: len(rest)], -1))


def _masks(where: Any, logits: Any, axes: tuple[int, ...]) -> tuple[Any, Any]:
    """``(row_mask, class_mask)`` (each None or an array in the flattened layout)."""
    if where is None:
        return None, None
    where = _validate.as_array(where, "where")
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask; got dtype {where.dtype.name}")
    batch = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
    if tuple(where.shape) == batch:
        return where, None
    if tuple(where.shape) == tuple(logits.shape):
        return None, _to_last(where, axes)
    raise ValueError(
        f"where must have the batch shape {batch} or the logits' shape "
        f"{tuple(logits.shape)}; got {tuple(where.shape)}"
    )


def _masked_lse(x: Any, class_mask: Any) -> Any:
    """Per-row log-sum-exp over the unmasked classes, with the lean gradient (softmax over
    them). Rows with no class left get a finite placeholder (the callers zero them)."""
    alive = jnp.any(class_mask, axis=-1, keepdims=True)
    x = jnp.where(class_mask | ~alive, x, jnp.full_like(x, -jnp.inf))
    ignored = jnp.full(x.shape[:-1], -1, jnp.int32)  # every row ignored: only lse is used
    return index_loss(
        x, ignored, None, None, Options(axis=x.ndim - 1, ignore_index=-1, stats=True)
    )[1]


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
) -> jax.Array:
    r"""``optax.softmax_cross_entropy_with_integer_labels``, with jaxce's lean gradient.

    ``σ_n = lse(x_n) - x_{n, y_n}`` per row, no reduction. One deliberate difference:
    a label outside ``[0, C)`` gives NaN (optax wraps ``-1 … -C`` to a class, so a
    PyTorch-style ``-100`` label silently becomes class ``C - 100``; it gives NaN for the
    others). Masked rows may hold any label.

    Args:
      logits: ``[..., num_classes]`` (classes along ``axis``), floating.
      labels: integer class indices, ``logits``' shape without the class axes. With a
        tuple ``axis`` a label is a flat (row-major) index into those axes, taken in the
        order given.
      axis: the class axis, or a tuple of axes.
      where: optional boolean mask of the batch shape (masked rows give 0) or of the
        logits' shape (masked classes leave the normaliser; rows with none left give 0).

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
    batch = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
    if tuple(labels.shape) != batch:
        raise ValueError(
            f"labels must have shape {batch} (logits' shape without axis {axis!r}); got "
            f"{tuple(labels.shape)}"
        )
    row_mask, class_mask = _masks(where, logits, axes)
    x = _to_last(logits, axes)
    if class_mask is None:
        return _integer_rows(x, labels, row_mask)
    return _integer_class_mask(x, labels, class_mask)


# An ignore_index no integer dtype can hold: every label counts.
_NEVER = -(2**70)


@jax.jit
def _integer_rows(x, labels, row_mask):
    if row_mask is not None:  # masked rows: any in-range label, then zeroed (no gradient)
        labels = jnp.where(row_mask, labels, jnp.zeros_like(labels))
    loss = index_loss(x, labels, None, None, Options(axis=x.ndim - 1, ignore_index=_NEVER))
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, jnp.zeros_like(loss))
    return loss.astype(x.dtype)


@jax.jit
def _integer_class_mask(x, labels, class_mask):
    lse = _masked_lse(x, class_mask)
    _, in_range, idx = target_info(labels, x.shape[-1], _NEVER)
    x_y = jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0].astype(lse.dtype)
    out = jnp.where(in_range, lse - x_y, jnp.full_like(lse, jnp.nan))
    out = jnp.where(jnp.any(class_mask, axis=-1), out, jnp.zeros_like(lse))
    return out.astype(x.dtype)


def softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    axis: Axis | None = -1,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""``optax.softmax_cross_entropy``, with jaxce's lean gradient.

    ``σ_n = -Σ_c y_{n,c} log softmax(x_n)_c`` per row, no reduction; ``labels`` are any
    real class weights (probabilities, one-hot), differentiable.

    Args:
      logits: floating logits, classes along ``axis``.
      labels: ``logits``' shape.
      axis: the class axis, a tuple of axes, or None (all axes: one scalar).
      where: optional boolean mask of the batch shape or of the logits' shape (masked
        classes leave the normaliser and the sum), as in optax.

    Returns:
      ``[batch...]`` losses, dtype the promotion of ``logits`` and ``labels``.

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
    if not _validate.is_float_dtype(labels.dtype):
        raise TypeError(
            f"labels must have a floating dtype; got {_validate.dtype_name(labels.dtype)}"
        )
    if tuple(labels.shape) != tuple(logits.shape):
        raise ValueError(
            f"labels must have the logits' shape {tuple(logits.shape)}; got {tuple(labels.shape)}"
        )
    axes = _class_axes(axis, logits.ndim, allow_none=True)
    row_mask, class_mask = _masks(where, logits, axes)
    x, t = _to_last(logits, axes), _to_last(labels, axes)
    if class_mask is None:
        return _prob_rows(x, t, row_mask)
    return _prob_class_mask(x, t, class_mask)


@jax.jit
def _prob_rows(x, t, row_mask):
    out_dtype = jnp.promote_types(x.dtype, t.dtype)
    loss = prob_loss(x, t, None, None, Options(axis=x.ndim - 1))
    if row_mask is not None:
        loss = jnp.where(row_mask, loss, jnp.zeros_like(loss))
    return loss.astype(out_dtype)


@jax.jit
def _prob_class_mask(x, t, class_mask):
    out_dtype = jnp.promote_types(x.dtype, t.dtype)
    lse = _masked_lse(x, class_mask)
    dtype = lse.dtype
    terms = t.astype(dtype) * (lse[..., None] - x.astype(dtype))
    return jnp.sum(jnp.where(class_mask, terms, jnp.zeros_like(terms)), axis=-1).astype(out_dtype)
