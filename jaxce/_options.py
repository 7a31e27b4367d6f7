"""The options object that travels between internal functions, and the dtype policy."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np


class Options(NamedTuple):
    """The static options of one loss call.

    Hashable: it is the ``jax.jit`` static argument of the entry points and the
    non-differentiable argument of every ``custom_jvp`` core, which read the fields they
    need. Arrays (logits, targets, ``weight``, ε, ``z``) travel as arguments.
    """

    axis: int = -1  # the class axis of the logits (dense losses)
    ignore_index: int = -100  # class-index targets equal to it are skipped
    cap: float | None = None  # logit soft-cap: the loss sees cap * tanh(z / cap)
    stats: bool = False  # the cores also return the per-element lse and argmax
    reduction: str = "mean"
    return_aux: bool = False
    check: bool = False  # trace a checkify check of the class indices
    out_dtype: Any = None  # the loss's dtype (None: the logits')
    chunk: int = 0  # vocabulary chunk of the fused losses
    chunk_by: tuple = ()  # (implementation, chunk) where a backend's default differs
    axis_name: str | None = None  # the vocabulary-parallel mesh axis (fused losses)
    vocab_size: int | None = None  # vocabulary-parallel: the classes in all (None: even split)
    batch_axis: str | None = None  # reductions also sum over this mesh axis (in shard_map)
    implementation: str | None = None  # the passes' spelling (None: the platform's; _backends)
    strategy: str = "min_memory"  # the fused losses' algorithm, resolved: or "min_work"
    block: int = 0  # token block of strategy="min_work" (rows of hidden per block)
    tempered: bool = False  # a temperature is given: the losses see softcap(x) / T
    entropy: bool = False  # the cores also return the per-element entropy (aux.entropy)
    acc: Any = None  # min_work's d-kernel accumulator dtype (None: compute_dtype's)


def promote_float_dtypes(*dtypes: Any) -> np.dtype:
    """PyTorch's promotion among float dtypes: f16 + bf16 -> f32, anything + f64 -> f64."""
    names = {np.dtype(d).name for d in dtypes}
    if "float64" in names:
        return np.dtype(jnp.float64)
    if "float32" in names or names == {"float16", "bfloat16"}:
        return np.dtype(jnp.float32)
    return np.dtype(dtypes[0])


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype the loss is computed in: at least float32, float64 stays float64."""
    return np.dtype(jnp.float64) if np.dtype(dtype).name == "float64" else np.dtype(jnp.float32)


def checked_z(z_loss: Any, dtype: Any) -> Any:
    """``z_loss`` as a ``dtype`` array; a traced z < 0 (or NaN) becomes NaN, so the loss is
    NaN, never finite."""
    z = jnp.asarray(z_loss, dtype)
    return jnp.where(z >= 0, z, jnp.full_like(z, jnp.nan))


def checked_eps(eps: Any) -> Any:
    """A traced ε outside [0, 1] (or NaN) becomes NaN, so the loss is NaN, never finite."""
    if eps is None:
        return None
    eps = jnp.asarray(eps)
    ok = (eps >= 0) & (eps <= 1)
    return jnp.where(ok, eps, jnp.full_like(eps, jnp.nan))
