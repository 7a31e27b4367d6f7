"""Independent references for PyTorch's cross_entropy semantics (torch 2.13).

* :func:`numpy_cross_entropy`: float64 NumPy, written straight from torch's definition with
  ``log_softmax`` and a gather, class axis moved last. No code shared with jaxce.
* :func:`plain_cross_entropy`: the same formula in plain JAX (autodiff through the
  log-softmax), the reference for gradients, with jaxce's options beyond PyTorch
  (``where``, ``z_loss``, ``logit_softcap``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def numpy_cross_entropy(
    x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, axis=-1
):
    """float64 reference. Returns a float64 NumPy array (0-d for 'mean'/'sum')."""
    x = np.asarray(x, np.float64)
    target = np.asarray(target)
    with np.errstate(all="ignore"):
        xl = np.moveaxis(x, axis, -1)
        num_classes = xl.shape[-1]
        lp = _np_log_softmax(xl)
        w = np.ones(num_classes) if weight is None else np.asarray(weight, np.float64)
        eps = float(label_smoothing)
        if target.shape == x.shape:
            t = np.moveaxis(target.astype(np.float64), axis, -1)
            if eps > 0:
                t = t * (1 - eps) + eps / num_classes
            losses = -np.sum(w * t * lp, axis=-1)
            denominator = losses.size
        else:
            # torch's structure: NLL term and smoothing term reduced separately, then mixed.
            y = target.astype(np.int64)
            valid = y != ignore_index
            ys = np.where(valid, y, 0)
            picked = np.take_along_axis(lp, ys[..., None], axis=-1)[..., 0]
            nll = np.where(valid, -w[ys] * picked, 0.0)
            smooth = np.where(valid, -np.sum(w * lp, axis=-1), 0.0)
            denominator = np.sum(np.where(valid, w[ys], 0.0))
            if eps <= 0:
                return _reduce(nll, reduction, denominator)
            return (1 - eps) * _reduce(nll, reduction, denominator) + eps / num_classes * _reduce(
                smooth, reduction, denominator
            )
        return _reduce(losses, reduction, denominator)


def _reduce(losses, reduction, denominator):
    with np.errstate(all="ignore"):
        if reduction == "none":
            return losses
        total = np.sum(losses)
        if reduction == "sum":
            return np.asarray(total)
        return np.asarray(np.float64(total) / np.float64(denominator))


def plain_cross_entropy(
    x,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    axis=-1,
    *,
    where=None,
    z_loss=0.0,
    logit_softcap=None,
):
    """The textbook formula in plain JAX, differentiated by autodiff (reference only).

    With jaxce's options beyond PyTorch: ``logit_softcap`` (the loss of
    ``cap * tanh(x / cap)``), ``where`` (False elements count as ignored) and ``z_loss``
    (``z * lse**2`` per counted element; its 'mean' divides by the number of counted
    elements, as in PaLM, t5x and Liger-Kernel, whatever the weights).
    """
    if logit_softcap is not None:
        x = logit_softcap * jnp.tanh(x / logit_softcap)
    num_classes = x.shape[axis]
    lse = jax.nn.logsumexp(x, axis=axis)
    lp = x - jnp.expand_dims(lse, axis)
    w = jnp.ones((num_classes,), x.dtype) if weight is None else weight
    w_b = w.reshape(tuple(num_classes if i == axis % x.ndim else 1 for i in range(x.ndim)))
    eps = label_smoothing
    if target.shape == x.shape:
        t = target * (1 - eps) + eps / num_classes
        losses = -jnp.sum(w_b * t * lp, axis=axis)
        valid = jnp.ones(losses.shape, bool)
        if where is not None:
            valid = valid & where
        w_n = jnp.ones(losses.shape, losses.dtype)  # PyTorch: numel / C, not the weights
    else:
        valid = target != ignore_index
        if where is not None:
            valid = valid & where
        ys = jnp.where(valid, target, 0)
        picked = jnp.squeeze(jnp.take_along_axis(lp, jnp.expand_dims(ys, axis), axis=axis), axis)
        smooth = -jnp.sum(w_b * lp, axis=axis)
        losses = (1 - eps) * (-w[ys] * picked) + eps / num_classes * smooth
        w_n = w[ys]
    losses = jnp.where(valid, losses, 0.0)
    z_terms = jnp.where(valid, z_loss * lse**2, 0.0)
    with_z = not (isinstance(z_loss, float) and z_loss == 0.0)
    if reduction == "none":
        return losses + z_terms if with_z else losses
    if reduction == "sum":
        return jnp.sum(losses) + jnp.sum(z_terms) if with_z else jnp.sum(losses)
    mean = jnp.sum(losses) / jnp.sum(jnp.where(valid, w_n, 0.0))
    return mean + jnp.sum(z_terms) / jnp.sum(valid, dtype=losses.dtype) if with_z else mean
