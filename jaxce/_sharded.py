"""Public ``sharded_linear_cross_entropy``: the vocabulary-parallel fused loss for GSPMD
code (a ``shard_map`` around :func:`jaxce.linear_cross_entropy` with ``axis_name``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce._backends import check_implementation
from jaxce._linear import linear_loss, prepare
from jaxce._reduction import CrossEntropyAux


def sharded_linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
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
    temperature: float | jax.typing.ArrayLike | None = None,
    sample_weight: jax.typing.ArrayLike | None = None,
    return_aux: bool = False,
    return_entropy: bool = False,
    check_targets: bool = False,
    loss_dtype: jax.typing.DTypeLike | None = None,
    implementation: str | None = None,
    strategy: str = "auto",
    block_size: int | None = None,
    acc_dtype: jax.typing.DTypeLike | None = None,
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
      kernel: ``[D, V]``, split over ``vocab_axis``. ``V`` need not divide evenly (50,257
        classes over 4 devices, say): the kernel, ``bias`` and ``weight`` are then padded
        to ``n * ceil(V / n)`` columns, whose padding never enters the loss.
      target: ``[N]`` global class indices, split like ``hidden``'s tokens; or ``[N, V]``
        class probabilities, split like the tokens and like the kernel's classes.
      weight, bias: optional ``[V]``, split over ``vocab_axis``.
      ignore_index, reduction, label_smoothing, chunk_size: as in
        :func:`jaxce.linear_cross_entropy` (``chunk_size`` applies per device).
      mesh: the ``jax.sharding.Mesh`` holding ``vocab_axis`` (and ``batch_axis``).
      where: optional ``[N]`` boolean mask, split like ``target``.
      z_loss, logit_softcap, return_aux, check_targets, loss_dtype: as in
        :func:`jaxce.cross_entropy`.
      temperature, return_entropy: as in :func:`jaxce.linear_cross_entropy` (each device
        accumulates its slice's entropy; the slices' are combined with O(tokens)
        communication).
      sample_weight: optional ``[N]`` float per-token weights, split like ``target``
        (see :func:`jaxce.cross_entropy`).
      implementation: as in :func:`jaxce.linear_cross_entropy`.
      strategy, block_size, acc_dtype: as in :func:`jaxce.linear_cross_entropy`, per
        device: the token blocks hold this device's tokens (``N / batch_axis size``), each
        device's logits block covers its vocabulary slice (and its d-kernel accumulator its
        slice of the kernel), and ``"auto"`` applies its memory rule to those per-device
        sizes.

    Returns:
      The loss: ``[N]`` for ``'none'`` (split over ``batch_axis``), else a scalar. With
      ``return_aux``: ``(loss, aux)`` (per-token fields split like the tokens; counts,
      sums and ratios over the whole batch).

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
    implementation = check_implementation(implementation)
    if jnp.ndim(hidden) != 2:
        raise ValueError(f"hidden must be [N, D] (tokens, features); got shape {jnp.shape(hidden)}")
    # Every argument checked once, on the global arrays and with linear_cross_entropy's
    # own messages, before anything is split or traced.
    # Index targets come back with `where` folded in (then None): not folded twice.
    (hidden, kernel, _, target, _, _, _, where, temperature, sample_weight), opts = prepare(
        hidden, kernel, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, bias=bias, chunk_size=chunk_size, axis_name=None,
        where=where, z_loss=z_loss, logit_softcap=logit_softcap, return_aux=return_aux,
        check_targets=check_targets, loss_dtype=loss_dtype, vocab_size=None,
        strategy=strategy, block_size=block_size, acc_dtype=acc_dtype, temperature=temperature,
        sample_weight=sample_weight, return_entropy=return_entropy,
    )  # fmt: skip
    probs = target.ndim == hidden.ndim
    if batch_axis is not None and hidden.shape[0] % mesh.shape[batch_axis]:
        raise ValueError(
            f"the number of tokens ({hidden.shape[0]}) must divide evenly over mesh axis "
            f"{batch_axis!r} of size {mesh.shape[batch_axis]}"
        )
    # return_aux stays the caller's: each device's prepare derives the rest again.
    reduction, out_dtype = opts.reduction, opts.out_dtype
    if temperature is not None:
        temperature = jnp.asarray(temperature)
    vocab = kernel.shape[1]
    shards = mesh.shape[vocab_axis]
    padding = -vocab % shards
    if padding:  # an uneven split: pad to equal slices, whose extra columns never count
        kernel = jnp.pad(kernel, ((0, 0), (0, padding)))
        weight = None if weight is None else jnp.pad(jnp.asarray(weight), (0, padding))
        bias = None if bias is None else jnp.pad(jnp.asarray(bias), (0, padding))
        target = jnp.pad(target, ((0, 0), (0, padding))) if probs else target
    P = jax.sharding.PartitionSpec
    rows, classes = P(batch_axis), P(vocab_axis)

    def local(h, k, t, w, b, e, m, temp, sw):
        # Per device: its tokens against its vocabulary slice; the statistics are combined
        # along vocab_axis and the reductions summed along batch_axis (O(tokens) traffic).
        arrays, opts = prepare(
            h, k, t, weight=w, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=e, bias=b, chunk_size=chunk_size, axis_name=vocab_axis, where=m,
            z_loss=z_loss, logit_softcap=logit_softcap, return_aux=return_aux,
            check_targets=check_targets, loss_dtype=out_dtype,
            vocab_size=vocab if padding else None, strategy=strategy, block_size=block_size,
            acc_dtype=acc_dtype, temperature=temp, sample_weight=sw,
            return_entropy=return_entropy,
        )  # fmt: skip
        opts = opts._replace(batch_axis=batch_axis, implementation=implementation)
        return linear_loss(*arrays, opts=opts)

    in_specs = (rows, P(None, vocab_axis), P(batch_axis, vocab_axis) if probs else rows,
                None if weight is None else classes,
                None if bias is None else classes, P(), None if where is None else rows,
                None if temperature is None else P(),
                None if sample_weight is None else rows)  # fmt: skip
    scalar = rows if reduction == "none" else P()
    out_specs = scalar
    if opts.return_aux:
        entropy = scalar if opts.entropy else None
        aux_specs = CrossEntropyAux(rows, scalar, P(), P(), P(), scalar, rows, entropy)
        out_specs = (scalar, aux_specs)
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    eps = jnp.asarray(label_smoothing)
    return fn(hidden, kernel, target, weight, bias, eps, where, temperature, sample_weight)
