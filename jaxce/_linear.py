"""Public ``linear_cross_entropy``: fused linear + cross-entropy (core in ``_fused.py``,
vocabulary-parallel form in ``_vocab_parallel.py``)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _validate
from jaxce._backends import check_implementation
from jaxce._chunked import auto_chunk
from jaxce._fused import fused_index_loss
from jaxce._options import Options, compute_dtype
from jaxce._reduction import CrossEntropyAux, finish_loss, index_denominator, index_stats
from jaxce._targets import counted_sum, debug_check_targets, mask_targets
from jaxce._vocab_parallel import vocab_parallel_loss


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    *,
    bias: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: str | None = None,
    where: jax.typing.ArrayLike | None = None,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_softcap: float | None = None,
    return_aux: bool = False,
    check_targets: bool = False,
    loss_dtype: jax.typing.DTypeLike | None = None,
    vocab_size: int | None = None,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    """Cross-entropy of ``hidden @ kernel + bias`` without materialising the logits.

    Equal (to float tolerance) to ``cross_entropy(hidden @ kernel + bias, target, weight,
    ignore_index, reduction, label_smoothing)`` for every option, with memory that does not
    grow with ``tokens x vocab``: the vocabulary is processed in chunks in the forward pass
    (online log-sum-exp) and again in the backward pass (recomputing each chunk's logits).

    Args:
      hidden: ``[..., D]`` activations (float16/bfloat16/float32/float64).
      kernel: ``[D, V]`` output projection (Flax ``Dense`` layout; tied embeddings pass
        ``embedding.T``). Same dtype as ``hidden``.
      target: ``[...]`` integer class indices (``hidden``'s shape without ``D``).
      weight: optional ``[V]`` per-class weights.
      ignore_index, reduction, label_smoothing: as in :func:`jaxce.cross_entropy`.
      bias: optional ``[V]`` bias.
      chunk_size: vocabulary chunk; default: about 16 MiB of float32 logits per chunk
        (at least 256 classes).
      axis_name: for use inside ``jax.shard_map`` with the vocabulary split over this mesh
        axis: ``kernel`` (and ``bias``, ``weight``) are then this device's contiguous
        slice ``[D, V / n]`` (the ``P(None, axis_name)`` layout), ``target`` holds global
        class indices, and the per-token statistics are combined with ``psum``/``pmax``
        (O(tokens) communication). Every device returns the full loss; the gradient
        w.r.t. a ``hidden`` replicated over the axis is summed across it.
      where, z_loss, logit_softcap, return_aux, check_targets, loss_dtype: as in
        :func:`jaxce.cross_entropy`
        (``where`` has ``target``'s shape; the cap applies to ``hidden @ kernel + bias``
        chunk by chunk, nothing logits-sized is stored).
      vocab_size: with ``axis_name``, for a vocabulary that does not divide evenly over
        the ``n`` devices: each device passes an equal slice of ``ceil(V / n)`` columns of
        the kernel padded at the end to ``n * ceil(V / n)`` (any values), and
        ``vocab_size=V``; the padding columns never enter the loss and get zero gradient.
        None: every column is a class.
      implementation: how the backward pass's chunk matmuls are spelled (the values are
        the same whichever is chosen), as in :func:`jaxce.cross_entropy`: None (default)
        for the platform compiled for, ``'xla'`` the portable spelling everywhere,
        ``'xla_cpu'`` / ``'xla_gpu'`` that compiler's spelling on any platform.

    Returns:
      The loss: ``target.shape`` for ``'none'``, else a scalar; dtype ``hidden.dtype``
      (or ``loss_dtype``).
      With ``return_aux``: ``(loss, aux)``, a :class:`jaxce.CrossEntropyAux`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> h = jax.random.normal(jax.random.key(0), (8, 16))
      >>> k = jax.random.normal(jax.random.key(1), (16, 1000)) * 0.1
      >>> y = jnp.arange(8)
      >>> fused = jaxce.linear_cross_entropy(h, k, y, chunk_size=256)
      >>> bool(jnp.allclose(fused, jaxce.cross_entropy(h @ k, y), rtol=1e-5))
      True

    PyTorch equivalent:
      ``torch.nn.functional.linear_cross_entropy(hidden, kernel.T, target, bias, ...)``
      (torch's weight has the ``[V, D]`` layout).
    """
    arrays, opts = prepare(
        hidden, kernel, target, weight, ignore_index, reduction, label_smoothing, bias,
        chunk_size, axis_name, where, z_loss, logit_softcap, return_aux, check_targets,
        loss_dtype, vocab_size,
    )  # fmt: skip
    opts = opts._replace(implementation=check_implementation(implementation))
    return linear_loss(*arrays, opts=opts)


def prepare(
    hidden, kernel, target, weight, ignore_index, reduction, label_smoothing, bias, chunk_size,
    axis_name, where, z_loss, logit_softcap, return_aux, check_targets, loss_dtype, vocab_size,
):  # fmt: skip
    """Checks :func:`linear_cross_entropy`'s arguments: ``((hidden, kernel, bias, target,
    weight, eps, z), opts)`` for :func:`linear_loss`."""
    hidden = _validate.check_input(hidden)
    kernel = _validate.as_array(kernel, "kernel")
    if not _validate.is_float_dtype(kernel.dtype):
        raise TypeError(
            f"kernel must have a floating dtype; got {_validate.dtype_name(kernel.dtype)}"
        )
    if kernel.dtype != hidden.dtype:
        raise TypeError(
            f"kernel must have hidden's dtype {_validate.dtype_name(hidden.dtype)}; got "
            f"{_validate.dtype_name(kernel.dtype)}"
        )
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"kernel must have shape (D, V) with D = hidden.shape[-1] = {hidden.shape[-1]}; "
            f"got {tuple(kernel.shape)}"
        )
    vocab = kernel.shape[1]
    reduction = _validate.check_reduction(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index)
    eps = _validate.check_label_smoothing(label_smoothing)
    target = _validate.as_array(target, "target")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} (hidden's shape without D); "
            f"got {tuple(target.shape)}"
        )
    if not _validate.is_int_dtype(target.dtype):
        raise TypeError(
            f"target must hold integer class indices; got {_validate.dtype_name(target.dtype)}"
        )
    weight = _validate.check_weight(weight, vocab)
    if bias is not None:
        bias = _validate.as_array(bias, "bias")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(
                f"bias must have shape ({vocab},), one entry per class; got {tuple(bias.shape)}"
            )
        if not _validate.is_float_dtype(bias.dtype):
            raise TypeError(
                f"bias must have a floating dtype; got {_validate.dtype_name(bias.dtype)}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a mesh axis name (str) or None; got {axis_name!r}")
    vocab_size = _validate.check_vocab_size(vocab_size, axis_name)
    out_dtype = _validate.check_loss_dtype(loss_dtype, hidden.dtype)
    z = _validate.check_z_loss(z_loss)
    cap = _validate.check_softcap(logit_softcap)
    return_aux = _validate.check_flag(return_aux, "return_aux")
    check_targets = _validate.check_flag(check_targets, "check_targets")
    where = _validate.check_where(where, tuple(target.shape), "target's shape")
    target = mask_targets(target, where, ignore_index)
    if axis_name is None:
        _validate.check_target_values(target, vocab, ignore_index)
    num_tokens = int(jnp.size(target)) if target.ndim else 1
    chunk = min(chunk_size or auto_chunk(num_tokens, vocab), max(vocab, 1))
    opts = Options(
        ignore_index=ignore_index,
        cap=cap,
        stats=return_aux or z is not None,
        reduction=reduction,
        return_aux=return_aux,
        check=check_targets,
        out_dtype=out_dtype,
        chunk=chunk,
        axis_name=axis_name,
        vocab_size=vocab_size,
    )
    return (hidden, kernel, bias, target, weight, eps, z), opts


@partial(jax.jit, static_argnames=("opts",))
def linear_loss(hidden, kernel, bias, target, weight, eps, z, *, opts):
    shape = target.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1)
    dtype = compute_dtype(hidden.dtype)
    want_denominator = opts.reduction == "mean" or opts.return_aux
    if opts.axis_name is not None:
        vocab = kernel.shape[1] * lax.axis_size(opts.axis_name)
        if opts.vocab_size is not None:
            if opts.vocab_size > vocab:
                raise ValueError(
                    f"vocab_size ({opts.vocab_size}) must be at most the columns of all "
                    f"devices' kernel slices ({kernel.shape[1]} x {vocab // kernel.shape[1]})"
                )
            vocab = opts.vocab_size
        if opts.check:
            debug_check_targets(t1, vocab, opts.ignore_index)
        loss, valid, w_y, stats = vocab_parallel_loss(h2, kernel, bias, t1, weight, eps, opts)
        denominator = counted_sum(valid, w_y, opts.batch_axis) if want_denominator else None
    else:
        vocab = kernel.shape[1]
        if opts.check:
            debug_check_targets(t1, vocab, opts.ignore_index)
        out = fused_index_loss(h2, kernel, bias, t1, weight, eps, opts)
        loss, stats = (out[0], out[1:]) if opts.stats else (out, None)
        denominator = None
        if want_denominator:
            denominator = index_denominator(t1, weight, vocab, opts, dtype)
    valid = None
    if opts.stats:
        stats, valid = index_stats(t1, vocab, opts.ignore_index, *stats)
    out = finish_loss(loss, stats, valid, denominator, z, opts)
    if not opts.return_aux:
        return out.reshape(shape) if opts.reduction == "none" else out
    loss, aux = out
    per_element = {"lse": aux.lse.reshape(shape), "predicted": aux.predicted.reshape(shape)}
    if opts.reduction == "none":
        loss = loss.reshape(shape)
        per_element.update(z_loss=aux.z_loss.reshape(shape), accuracy=aux.accuracy.reshape(shape))
    return loss, aux._replace(**per_element)
