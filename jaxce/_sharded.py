"""Public ``sharded_linear_cross_entropy``: the vocabulary-parallel fused loss for GSPMD
code (a ``shard_map`` around :func:`jaxce.linear_cross_entropy` with ``axis_name``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _validate
from jaxce._linear import linear_cross_entropy
from jaxce._options import compute_dtype
from jaxce._reduction import CrossEntropyAux, reduce_loss
from jaxce._targets import counted_sum, mask_targets
from jaxce._vocab_parallel import shard_targets


def sharded_linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    *,
    mesh: jax.sharding.Mesh,
    vocab_axis: str,
    batch_axis: str | None = None,
    bias: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    where: jax.typing.ArrayLike | None = None,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_softcap: float | None = None,
    return_aux: bool = False,
    check_targets: bool = False,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    """:func:`jaxce.linear_cross_entropy` over a device mesh, vocabulary-parallel.

    For jitted (GSPMD) code whose ``kernel`` is sharded ``P(None, vocab_axis)``: runs the
    fused loss under ``jax.shard_map`` so that each device walks only its vocabulary slice
    and devices exchange per-token statistics, instead of XLA all-gathering the kernel
    (what plain ``linear_cross_entropy`` gets from GSPMD). The result and gradients equal
    the single-device loss; gradients come back sharded like their inputs.

    Args:
      hidden: ``[N, D]`` activations; tokens split over ``batch_axis`` (or replicated when
        ``batch_axis`` is None).
      kernel: ``[D, V]``, split over ``vocab_axis``; ``V`` must divide evenly.
      target: ``[N]`` global class indices, split like ``hidden``'s tokens.
      weight, bias: optional ``[V]``, split over ``vocab_axis``.
      ignore_index, reduction, label_smoothing, chunk_size: as in
        :func:`jaxce.linear_cross_entropy` (``chunk_size`` applies per device).
      mesh: the ``jax.sharding.Mesh`` holding ``vocab_axis`` (and ``batch_axis``).
      where: optional ``[N]`` boolean mask, split like ``target``.
      z_loss, logit_softcap, return_aux, check_targets: as in :func:`jaxce.cross_entropy`.

    Returns:
      The loss: ``[N]`` for ``'none'`` (split over ``batch_axis``), else a scalar. With
      ``return_aux``: ``(loss, aux)`` (``aux.lse`` split like the tokens; the counts and
      sums over the whole batch).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> import jaxce
      >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> h = jnp.ones((4, 8))
      >>> k = jnp.zeros((8, 16))
      >>> loss = jaxce.sharded_linear_cross_entropy(h, k, jnp.arange(4), mesh=mesh,
      ...                                           vocab_axis="model")
      >>> print(f"{loss:.4f}")  # log(16)
      2.7726

    PyTorch equivalent: Megatron-LM's vocab-parallel cross-entropy (same values as
    ``F.linear_cross_entropy`` on the full kernel).
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    for name, axis in (("vocab_axis", vocab_axis), ("batch_axis", batch_axis)):
        if axis is not None and axis not in mesh.shape:
            raise ValueError(f"{name} must name an axis of mesh {dict(mesh.shape)}; got {axis!r}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum'; got {reduction!r}")
    kernel = jnp.asarray(kernel)
    hidden = jnp.asarray(hidden)
    target = jnp.asarray(target)
    shards = mesh.shape[vocab_axis]
    if kernel.ndim != 2 or kernel.shape[1] % shards:
        raise ValueError(
            f"kernel must be [D, V] with V divisible by mesh axis {vocab_axis!r} of size "
            f"{shards}; got shape {tuple(kernel.shape)}"
        )
    if hidden.ndim != 2 or target.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, D] and target [N]; got {tuple(hidden.shape)} and "
            f"{tuple(target.shape)}"
        )
    if batch_axis is not None and hidden.shape[0] % mesh.shape[batch_axis]:
        raise ValueError(
            f"the number of tokens ({hidden.shape[0]}) must divide evenly over mesh axis "
            f"{batch_axis!r} of size {mesh.shape[batch_axis]}"
        )
    where = _validate.check_where(where, tuple(target.shape), "target's shape")
    P = jax.sharding.PartitionSpec
    rows, vocab = P(batch_axis), P(vocab_axis)
    eps = jnp.asarray(label_smoothing)
    local_reduction = "none" if reduction == "none" else "sum"
    options = {
        "z_loss": z_loss,
        "logit_softcap": logit_softcap,
        "return_aux": return_aux,
        "check_targets": check_targets,
    }

    def batch_sum(v):
        return v if batch_axis is None else lax.psum(v, batch_axis)

    def local(h, k, t, w, b, e, m):
        out = linear_cross_entropy(
            h, k, t, w, ignore_index, local_reduction, e,
            bias=b, chunk_size=chunk_size, axis_name=vocab_axis, where=m, **options,
        )  # fmt: skip
        if reduction == "none" and not return_aux:
            return out
        loss, aux = out if return_aux else (out, None)
        if reduction == "none":
            return loss, aux._replace(
                denominator=batch_sum(aux.denominator), correct=batch_sum(aux.correct)
            )
        dtype = compute_dtype(h.dtype)
        total = batch_sum(loss.astype(dtype))
        if return_aux:
            denominator = batch_sum(aux.denominator)
            z_part = batch_sum(aux.z_loss.astype(dtype))
        elif reduction == "mean":
            t = t if m is None else mask_targets(t, m, ignore_index)
            valid, _, _, w_y = shard_targets(t, w, k.shape[1], ignore_index, vocab_axis, dtype)
            denominator = batch_sum(counted_sum(valid, w_y))
        if reduction == "mean":
            total = reduce_loss(total, "mean", denominator)
        if not return_aux:
            return total.astype(h.dtype)
        if reduction == "mean":
            z_part = reduce_loss(z_part, "mean", denominator)
        aux = aux._replace(
            z_loss=z_part.astype(h.dtype),
            denominator=denominator,
            correct=batch_sum(aux.correct),
        )
        return total.astype(h.dtype), aux

    in_specs = (rows, P(None, vocab_axis), rows, None if weight is None else vocab,
                None if bias is None else vocab, P(), None if where is None else rows)  # fmt: skip
    scalar = rows if reduction == "none" else P()
    out_specs = scalar
    if return_aux:
        out_specs = (scalar, CrossEntropyAux(rows, scalar, P(), P()))
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return fn(hidden, kernel, target, weight, bias, eps, where)
