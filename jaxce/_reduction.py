"""'none' / 'sum' / 'mean' with PyTorch's denominators.

Reductions act on the per-element losses of the cores (``_index.py``, ``_prob.py``,
``_fused.py``) and are differentiated by plain autodiff:
everything here is element-sized, never logits-sized.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from jaxce._options import Options, checked_z
from jaxce._targets import batch_total, counted_sum, target_info, target_weight


def index_denominator(target: Any, weight: Any, num_classes: int, opts: Options, dtype) -> Any:
    """``W = Σ_{n not ignored} w[y_n]`` (the count of non-ignored elements if unweighted).

    Not N and not Σ_c w_c: PyTorch's weighted mean. 0 (all ignored, empty batch, or zero
    weights on every present class) makes the mean NaN. A counted out-of-range target
    contributes NaN.
    """
    info = target_info(target, num_classes, opts.ignore_index)
    return counted_sum(info.valid, target_weight(weight, info, dtype), opts.batch_axis)


def index_stats(target: Any, num_classes: int, ignore_index: int, lse: Any, argmax: Any):
    """``(stats, valid)`` for :func:`finish_loss` from a class-index core's per-element
    ``lse`` and ``argmax``: ``stats = (lse, argmax, hit)``, ``hit`` where the argmax is the
    (in-range) target; ``valid``: the counted elements."""
    info = target_info(target, num_classes, ignore_index)
    return (lse, argmax, info.in_range & (argmax == info.idx)), info.valid


def reduce_loss(loss: Any, reduction: str, denominator: Any, batch_axis: str | None = None) -> Any:
    """Applies ``reduction`` to per-element ``loss``; ``denominator`` is used by 'mean'.
    ``batch_axis``: a ``shard_map`` mesh axis whose devices hold the other elements."""
    if reduction == "none":
        return loss
    total = batch_total(loss, batch_axis)
    if reduction == "sum":
        return total
    return total / denominator + undefined_mean(total, denominator)


def undefined_mean(total: Any, denominator: Any) -> Any:
    """The constant added to a ``'mean'``: NaN where ``denominator`` (W) is 0, else 0.

    W = 0 means NaN, as in torch (whose smoothing path divides the NLL part 0 / 0 too),
    even when the smoothing term alone would give x / 0 = inf. Added as a constant so the
    gradient still flows through total / W: zeros for ignored elements, NaN for counted
    elements of zero weight, like torch."""
    return lax.stop_gradient(
        jnp.where(denominator == 0, jnp.full_like(total, jnp.nan), jnp.zeros_like(total))
    )


class CrossEntropyAux(NamedTuple):
    """Auxiliary outputs of a loss call (``return_aux=True``), computed in the same pass.

    Attributes:
      lse: per-element log-sum-exp of the (soft-capped) logits, the loss's element shape,
        float32 (float64 for float64 inputs). Present at ignored/masked elements too.
        Differentiable (its gradient is the softmax), for penalties of one's own.
      z_loss: the z-loss term alone, reduced like the loss (per element for ``'none'``;
        for ``'mean'`` divided by ``count``), differentiable; the loss minus this is the
        cross-entropy alone. 0 when ``z_loss`` is 0. The loss's dtype.
      denominator: what the cross-entropy's ``'mean'`` divides by, whatever the
        reduction: ``Σ w[y]`` over counted elements (class indices; their count if
        unweighted), or the number of counted elements (probabilities). No gradient.
      correct: int32 number of counted elements whose prediction is the target (for
        probabilities: the target's argmax).
      count: the number of counted elements (not ignored, not masked), unweighted: what
        the z-loss's ``'mean'`` divides by; a float like ``denominator``. No gradient.
      accuracy: ``'none'``: per element, 1.0 where the prediction is the target and 0.0
        elsewhere (ignored/masked elements included); ``'mean'``/``'sum'``: ``correct /
        count`` (NaN when nothing is counted). float32 (float64 for float64 inputs).
      predicted: int32 per element: the predicted class, the first maximal logit (as
        ``jnp.argmax``; the soft cap and the temperature never change it), or -1 at
        ignored/masked elements.
      entropy: with ``return_entropy=True``, the entropy ``H = lse - Σ_c p_c z_c`` of the
        (soft-capped, tempered) softmax ``p``, from the same pass: per element for
        ``'none'`` (0 at ignored/masked elements), else summed over counted elements, and
        for ``'mean'`` divided by ``count`` (not by ``denominator``, and not multiplied by
        ``sample_weight``: verl's masked mean). Differentiable. float32 (float64 for
        float64 inputs). None without ``return_entropy``.
    """

    lse: Any
    z_loss: Any
    denominator: Any
    correct: Any
    count: Any
    accuracy: Any
    predicted: Any
    entropy: Any = None


def finish_loss(
    loss: Any,
    stats: Any,
    valid: Any,
    denominator: Any,
    z_loss: Any,
    opts,
    sample_weight: Any = None,
    entropy: Any = None,
) -> Any:
    """Adds the z-loss, reduces (``opts.reduction``), casts to ``opts.out_dtype`` and with
    ``opts.return_aux`` packs the auxiliary outputs.

    ``loss``: per-element cross-entropy; ``stats``: ``(lse, argmax, hit)`` per element
    (``hit``: the argmax is the target), None when neither the z-loss nor aux outputs are
    wanted; ``valid``: counted elements (None: all); ``denominator``: the cross-entropy's
    'mean' denominator (may be None unless needed); ``sample_weight``: per-element weights
    multiplying each counted element's loss and z-loss term (None: all ones; the
    denominators do not depend on them); ``entropy``: the per-element entropy for
    ``aux.entropy`` (None: not asked for).

    The z-loss ``z · lse²`` (PaLM) is averaged over the *count* of counted elements, not
    over the weighted denominator: the convention of PaLM, t5x and Liger-Kernel, under
    which the penalty does not depend on the scale (or sign) of the class weights.
    """
    reduction, out_dtype, batch_axis = opts.reduction, opts.out_dtype, opts.batch_axis
    counted = jnp.ones(loss.shape, bool) if valid is None else valid
    count = None
    if stats is not None:
        count = batch_total(counted, batch_axis, stats[0].dtype)
    if sample_weight is not None:
        loss = jnp.where(counted, loss * sample_weight.astype(loss.dtype), jnp.zeros_like(loss))
    out = reduce_loss(loss, reduction, denominator, batch_axis)
    z_part = None
    if z_loss is not None:
        lse = stats[0]
        z = checked_z(z_loss, lse.dtype)
        z_term = z * (lse * lse)
        if sample_weight is not None:
            z_term = z_term * sample_weight.astype(z_term.dtype)
        z_term = jnp.where(counted, z_term, jnp.zeros_like(lse))
        z_part = reduce_loss(z_term, reduction, count, batch_axis)
        out = out + z_part
    out = out.astype(out_dtype)
    if not opts.return_aux:
        return out
    lse, argmax, hit = stats
    correct = hit & counted
    num_correct = batch_total(correct, batch_axis, jnp.int32)
    if reduction == "none":
        accuracy = correct.astype(lse.dtype)
    else:
        accuracy = num_correct.astype(lse.dtype) / count
    if z_part is None:
        z_part = jnp.zeros(() if reduction != "none" else loss.shape, lse.dtype)
    aux = CrossEntropyAux(
        lse=lse,
        z_loss=z_part.astype(out_dtype),
        denominator=lax.stop_gradient(denominator),
        correct=num_correct,
        count=lax.stop_gradient(count),
        accuracy=lax.stop_gradient(accuracy),
        predicted=jnp.where(counted, argmax, jnp.full_like(argmax, -1)),
    )
    if entropy is not None:
        entropy = jnp.where(counted, entropy, jnp.zeros_like(entropy))
        aux = aux._replace(entropy=reduce_loss(entropy, reduction, count, batch_axis))
    return out, aux
