"""'none' / 'sum' / 'mean' with PyTorch's denominators.

Reductions act on the per-element losses from ``_core.py`` and are differentiated by
plain autodiff: everything here is element-sized, never logits-sized.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jax import lax

from jaxce._options import Options
from jaxce._targets import counted_sum, target_info, target_weight


def index_denominator(target: Any, weight: Any, num_classes: int, opts: Options, dtype) -> Any:
    """``W = Σ_{n not ignored} w[y_n]`` (the count of non-ignored elements if unweighted).

    Not N and not Σ_c w_c: PyTorch's weighted mean. 0 (all ignored, empty batch, or zero
    weights on every present class) makes the mean NaN. A counted out-of-range target
    contributes NaN.
    """
    info = target_info(target, num_classes, opts.ignore_index)
    return counted_sum(info.valid, target_weight(weight, info, dtype))


def reduce_loss(loss: Any, reduction: str, denominator: Any) -> Any:
    """Applies ``reduction`` to per-element ``loss``; ``denominator`` is used by 'mean'."""
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    # W = 0 means NaN, as in torch (whose smoothing path divides the NLL part 0 / 0 too),
    # even when the smoothing term alone would give x / 0 = inf. Added as a constant so
    # the gradient still flows through total / W: zeros for ignored elements, NaN for
    # counted elements of zero weight, like torch.
    undefined = lax.stop_gradient(
        jnp.where(denominator == 0, jnp.full_like(total, jnp.nan), jnp.zeros_like(total))
    )
    return total / denominator + undefined


class CrossEntropyAux(NamedTuple):
    """Auxiliary outputs of a loss call (``return_aux=True``), computed in the same pass.

    None of them carries a gradient (they are ``stop_gradient``-ed).

    Attributes:
      lse: per-element log-sum-exp of the (soft-capped) logits, the loss's element shape,
        float32 (float64 for float64 inputs). Present at ignored/masked elements too.
      z_loss: the z-loss term alone, reduced like the loss (per element for ``'none'``;
        the loss minus this is the cross-entropy alone). 0 when ``z_loss`` is 0.
      denominator: what ``'mean'`` divides by, whatever the reduction: ``Σ w[y]`` over
        counted elements (class indices; their count if unweighted), or the number of
        counted elements (probabilities).
      correct: int32 number of counted elements whose argmax (the first maximal class,
        as ``jnp.argmax``) is the target (for probabilities: the target's argmax).
    """

    lse: Any
    z_loss: Any
    denominator: Any
    correct: Any


def finish_loss(
    loss: Any, stats: tuple[Any, Any] | None, valid: Any, denominator: Any, z_loss: Any, opts
) -> Any:
    """Adds the z-loss, reduces (``opts.reduction``), casts to ``opts.out_dtype`` and with
    ``opts.return_aux`` packs the auxiliary outputs.

    ``loss``: per-element losses; ``stats``: ``(lse, correct)`` per element (None when
    neither z-loss nor aux outputs are wanted); ``valid``: counted elements (None: all);
    ``denominator``: the 'mean' denominator (may be None unless needed).
    """
    reduction, out_dtype = opts.reduction, opts.out_dtype
    z_term = None
    if z_loss is not None:
        lse = stats[0]
        z = jnp.asarray(z_loss, lse.dtype)
        z = jnp.where(z >= 0, z, jnp.full_like(z, jnp.nan))  # a traced z < 0 (or NaN): NaN
        z_term = z * (lse * lse)
        if valid is not None:
            z_term = jnp.where(valid, z_term, jnp.zeros_like(z_term))
        loss = loss + z_term
    out = reduce_loss(loss, reduction, denominator).astype(out_dtype)
    if not opts.return_aux:
        return out
    lse, correct = stats
    if valid is not None:
        correct = correct & valid
    z_part = jnp.zeros_like(loss) if z_term is None else z_term
    aux = CrossEntropyAux(
        lse=lax.stop_gradient(lse),
        z_loss=lax.stop_gradient(reduce_loss(z_part, reduction, denominator)).astype(out_dtype),
        denominator=lax.stop_gradient(denominator),
        correct=jnp.sum(correct, dtype=jnp.int32),
    )
    return out, aux
