"""'none' / 'sum' / 'mean' with PyTorch's denominators.

Reductions act on the per-element losses from ``_core.py`` and are differentiated by
plain autodiff: everything here is element-sized, never logits-sized.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from jaxce._core import target_info, target_weight


def index_denominator(
    target: Any, weight: Any, num_classes: int, ignore_index: int, dtype: Any
) -> Any:
    """``W = Σ_{n not ignored} w[y_n]`` (the count of non-ignored elements if unweighted).

    Not N and not Σ_c w_c: PyTorch's weighted mean. 0 (all ignored, empty batch, or zero
    weights on every present class) makes the mean NaN. A counted out-of-range target
    contributes NaN.
    """
    valid, in_range, idx = target_info(target, num_classes, ignore_index)
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    return jnp.sum(jnp.where(valid, w_y, jnp.zeros_like(w_y)))


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


def prob_denominator(loss: Any) -> Any:
    """Probability targets: 'mean' divides by the number of elements (numel / C), never
    by the weights (PyTorch issue #61309)."""
    return jnp.asarray(loss.size, loss.dtype)
