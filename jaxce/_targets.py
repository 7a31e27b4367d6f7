"""Class-index targets: which elements count, where out-of-range indices go, masks.

The rules (PyTorch's): an element whose target equals ``ignore_index`` is skipped (loss 0,
out of the 'mean' denominator, zero gradient), whatever ``ignore_index`` is (negative,
out of range, or a valid class); a counted target outside ``[0, C)`` cannot be checked
under jit, so its loss and gradient are NaN, never a plausible finite number.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import checkify


class TargetInfo(NamedTuple):
    valid: Any  # the element counts (target != ignore_index)
    in_range: Any  # the target is a class in [0, C)
    idx: Any  # a safe int32 gather index: the target when in range, else 0


def target_info(target: Any, num_classes: int, ignore_index: int) -> TargetInfo:
    """Where class-index targets count and where they point.

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
    return TargetInfo(valid, in_range, idx)


def target_weight(weight: Any, info: TargetInfo, dtype: Any) -> Any:
    """``w[y]`` per element; NaN where a counted target is out of range, so that its loss
    and gradient are NaN (never a plausible finite value). Ignored elements get a finite
    placeholder: they are masked out everywhere."""
    w_y = jnp.ones(info.idx.shape, dtype) if weight is None else weight.astype(dtype)[info.idx]
    return nan_if_out_of_range(w_y, info)


def nan_if_out_of_range(w_y: Any, info: TargetInfo) -> Any:
    """``w_y`` with NaN where a counted target lies outside ``[0, C)``."""
    return jnp.where(info.in_range | ~info.valid, w_y, jnp.full_like(w_y, jnp.nan))


def counted_sum(valid: Any, values: Any, batch_axis: str | None = None) -> Any:
    """``Σ values`` over counted elements: with ``values = w[y]`` the 'mean' denominator of
    class-index targets (PyTorch's weighted mean: not N, not Σ_c w_c). ``batch_axis``: a
    mesh axis (inside ``shard_map``) whose devices hold the other elements."""
    return batch_total(jnp.where(valid, values, jnp.zeros_like(values)), batch_axis)


def batch_total(values: Any, batch_axis: str | None, dtype: Any = None) -> Any:
    """``Σ values``, and across ``batch_axis`` (a ``shard_map`` mesh axis) when given."""
    total = jnp.sum(values, dtype=dtype)
    return total if batch_axis is None else jax.lax.psum(total, batch_axis)


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


def debug_check_targets(target: Any, num_classes: int, ignore_index: int) -> None:
    """Reports an out-of-range class index under ``jax.experimental.checkify``.

    A no-op unless the caller is checkified (``checkify.checkify(f,
    errors=checkify.user_checks)``); then the error names the first bad index and its
    flat position. Without checkify the loss and gradient are NaN instead.
    """
    info = target_info(target, num_classes, ignore_index)
    bad = (info.valid & ~info.in_range).reshape(-1)
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
