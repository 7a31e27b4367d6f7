"""Public ``linear_cross_entropy``: fused linear + cross-entropy (the core, single-device
and vocabulary-parallel, in ``_fused.py``)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxce import _validate
from jaxce._backends import check_implementation
from jaxce._chunked import default_widths
from jaxce._cross_entropy import cross_entropy
from jaxce._fused import index_linear_loss, prob_linear_loss
from jaxce._options import Options, compute_dtype, promote_float_dtypes
from jaxce._reduction import CrossEntropyAux, finish_loss, index_stats
from jaxce._targets import batch_total, counted_sum, debug_check_targets, mask_targets
from jaxce._tempered import checked_temperature
from jaxce._token_blocks import auto_picks_min_work, block_rows, min_work_loss


def linear_cross_entropy(
    hidden: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    *,
    bias: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: str | None = None,
    where: jax.typing.ArrayLike | None = None,
    z_loss: float | jax.typing.ArrayLike = 0.0,
    logit_softcap: float | None = None,
    temperature: float | jax.typing.ArrayLike | None = None,
    sample_weight: jax.typing.ArrayLike | None = None,
    return_aux: bool = False,
    return_entropy: bool = False,
    check_targets: bool = False,
    loss_dtype: jax.typing.DTypeLike | None = None,
    vocab_size: int | None = None,
    implementation: str | None = None,
    strategy: str = "auto",
    block_size: int | None = None,
    acc_dtype: jax.typing.DTypeLike | None = None,
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    """Cross-entropy of ``hidden @ kernel + bias`` without materialising the logits.

    PyTorch's ``F.linear_cross_entropy`` in full: equal (to float tolerance) to
    ``cross_entropy(hidden @ kernel + bias, target, weight, ignore_index, reduction,
    label_smoothing)`` for class-index and class-probability targets, batched or unbatched
    ``hidden``, and K-dimensional out-features, with memory that does not grow with
    ``tokens x vocab``. Two algorithms (``strategy``): ``"min_memory"`` processes the
    vocabulary in chunks in the forward pass (online log-sum-exp) and again in the backward
    pass (recomputing each chunk's logits: four vocabulary-sized matmuls for
    ``value_and_grad``); ``"min_work"`` walks token blocks once, forming the gradient in the
    forward pass (three, as many as the materialised loss).

    Args:
      hidden: ``[..., D]`` activations (float16/bfloat16/float32/float64); ``[D]`` is one
        unbatched token.
      kernel: ``[D, V]`` output projection (Flax ``Dense`` layout; tied embeddings pass
        ``embedding.T``), same dtype as ``hidden``. Or ``[D, C, d1, ..., dK]`` for
        K-dimensional out-features (Flax ``DenseGeneral``'s layout of torch's ``[C, d1, ...,
        dK, D]``): the logits ``[..., C, d1, ..., dK]`` are then formed and passed to
        :func:`jaxce.cross_entropy` with the class axis after the tokens' -- as PyTorch's own
        chunked path falls back to its reference there; needs batched ``hidden``.
      target: class indices, ``[...]`` (``hidden``'s shape without ``D``; ``[..., d1, ...,
        dK]`` for K-dimensional out-features), integer; or class probabilities with the
        logits' shape, ``[..., V]`` (``[..., C, d1, ..., dK]``), floating (PyTorch's rule:
        a target of the logits' shape holds probabilities; the loss has the promoted dtype
        of ``hidden`` and ``target``). Probabilities are read chunk by chunk like the
        kernel: nothing of their size is formed unless they are themselves differentiated
        (then their gradient is).
      weight: optional ``[V]`` per-class weights.
      ignore_index: class-index targets equal to it are skipped; None (the default, as in
        torch) means -100. Class-probability targets take none: an int then raises, as in
        torch.
      reduction, label_smoothing: as in :func:`jaxce.cross_entropy` (``'mean'`` of
        probability targets divides by the number of counted elements).
      bias: optional ``[V]`` bias (``[C, d1, ..., dK]`` with a K-dimensional kernel).
      chunk_size: vocabulary chunk; default: about 16 MiB of float32 logits per chunk
        (at least 256 classes), and on GPUs and TPUs (the ``"xla_gpu"``/``"xla_tpu"``
        implementations) wider: about 64 MiB, at most 2,048 classes and 1/128 of the
        vocabulary, chosen when the program is lowered. Not used with a K-dimensional
        kernel.
      axis_name: for use inside ``jax.shard_map`` with the vocabulary split over this mesh
        axis: ``kernel`` (and ``bias``, ``weight``, and class-probability ``target``) are
        then this device's contiguous slice ``[D, V / n]`` (the ``P(None, axis_name)``
        layout), class-index ``target`` holds global class indices, and the per-token
        statistics are combined with ``psum``/``pmax`` (O(tokens) communication). Every
        device returns the full loss; the gradient w.r.t. a ``hidden`` replicated over the
        axis is summed across it.
      where, z_loss, logit_softcap, return_aux, check_targets, loss_dtype: as in
        :func:`jaxce.cross_entropy`
        (``where`` has ``hidden``'s shape without ``D``; the cap applies to ``hidden @
        kernel + bias`` chunk by chunk, nothing logits-sized is stored).
      temperature, sample_weight, return_entropy: as in :func:`jaxce.cross_entropy`
        (``sample_weight`` has ``hidden``'s shape without ``D``): the logits are
        ``softcap(hidden @ kernel + bias) / T`` chunk by chunk, the entropy is accumulated
        online in the same pass over the vocabulary (and combined across ``axis_name``
        with O(tokens) communication), and the derivative in ``T`` is one more per-chunk
        reduction of the backward pass, formed only when ``T`` is differentiated.
      vocab_size: with ``axis_name``, for a vocabulary that does not divide evenly over
        the ``n`` devices: each device passes an equal slice of ``ceil(V / n)`` columns of
        the kernel padded at the end to ``n * ceil(V / n)`` (any values), and
        ``vocab_size=V``; the padding columns never enter the loss and get zero gradient.
        None: every column is a class.
      implementation: how the passes are spelled (the values are the same whichever is
        chosen, to rounding), as in :func:`jaxce.cross_entropy`: None (default) for the
        platform compiled for, ``'xla'`` the portable spelling everywhere,
        ``'xla_cpu'`` / ``'xla_gpu'`` / ``'xla_tpu'`` that compiler's spelling on any
        platform, ``'pallas_tpu'`` (opt-in, never automatic) ``'xla_tpu'`` with Pallas
        kernels for ``"min_memory"``'s chunk steps where they cover the call (class
        indices; the docs' implementations guide lists what they cover), run in Pallas's
        interpret mode off a TPU. Both strategies' passes are spelled by it.
      strategy: the algorithm (the values are the same to float tolerance):

        * ``"min_memory"``: vocabulary chunks of ``chunk_size``, the backward pass
          recomputing each chunk's logits. Temporaries: a few ``[tokens, chunk]`` float32
          blocks and, for 16-bit inputs, a float32 ``[tokens, D]`` accumulator.
        * ``"min_work"``: for ``'mean'``/``'sum'``, blocks of ``block_size`` tokens
          against the whole (local) vocabulary; each block's float32 logits give the
          loss and, in the same pass, the gradients of the inputs being differentiated
          (``hidden``, ``kernel``, ``bias``, ``weight``, class-probability ``target``):
          ``value_and_grad`` does three vocabulary-sized matmuls, a gradient in
          ``hidden`` alone two. Temporaries: one block's float32 logits and, for a
          16-bit kernel differentiated, a float32 ``[D, V]`` d-kernel accumulator (none with
          ``acc_dtype`` the kernel's dtype). Every
          option works (class weight, ``ignore_index``, ``where``, label smoothing,
          ``z_loss``, ``logit_softcap``, ``loss_dtype``, ``bias``, probabilities,
          ``sample_weight``, ``temperature`` with its derivative, ``axis_name``), and so
          do ``jax.jvp`` and second order (which differentiate the block loop itself,
          without min_memory's lean transpose); ``reduction='none'``,
          ``return_aux=True`` and K-dimensional kernels are not supported (a
          ValueError). ``return_entropy=True`` is: ``aux.entropy`` is accumulated in the
          same pass and gets its own gradients there (in ``hidden``, ``kernel``,
          ``bias``, ``T``), two more matmuls and a second ``[D, V]`` d-kernel where it is
          differentiated (none where it is only read); the other aux fields are values
          from the same pass, ``aux.lse`` and ``aux.z_loss`` with a NaN derivative.
        * ``"auto"`` (default): ``"min_work"`` where it is supported, no
          ``return_entropy`` is asked for, and its extra
          temporaries (``4 * block_size * V`` bytes, plus ``4 * D * V`` for a 16-bit
          kernel with float32 ``acc_dtype``) are at most ``0.2 * N * V`` bytes -- 5 % of the float32 logits it
          never forms, the fused loss's own memory budget (``N`` tokens and ``V``
          classes on this device); ``"min_memory"`` otherwise. At language-model shapes
          (16,384 x 4,096 x 131,072 bf16: about 2.8 GiB more) that is ``"min_memory"``:
          pass ``"min_work"`` to trade that memory for a quarter fewer matmuls.
      block_size: ``"min_work"``'s token rows per block (PyTorch's
        ``LinearCrossEntropyOptions.batch_chunk_size``). Default: PyTorch's
        ``chunking_method="aspect_ratio"`` rule, a block's logits about the size of
        ``hidden``: ``next_pow2(ceil(N / ceil(V / D)))``, but at least 1,024 rows (smaller
        blocks make the float32 d-kernel accumulator's traffic, once per block, outweigh
        the matmuls on GPUs and TPUs); at most ``N``.
      acc_dtype: the dtype ``"min_work"`` accumulates the kernel gradient in across token
        blocks (PyTorch's ``LinearCrossEntropyOptions.acc_dtype``). None (default):
        float32 (float64 for float64 inputs). For a 16-bit kernel, its own dtype
        (``jnp.bfloat16``/``jnp.float16``): each block's share, formed in float32 by the
        matmul, is rounded to it and added, which drops the float32 ``[D, V]``
        accumulator (``4 * D * V`` bytes of temporaries, and its traffic once per block)
        at a precision cost that grows with the number of blocks (see the performance
        guide). The logits, the softmax and every other gradient stay float32.
        Otherwise a ValueError: other dtypes, and a 16-bit ``acc_dtype`` with
        ``strategy="min_memory"``, which holds no such accumulator (each of its d-kernel
        chunks is one matmul over all the tokens). Under ``"auto"`` it applies where
        ``"min_work"`` is picked (and counts in its memory rule) and is unused otherwise.

    Returns:
      The loss: the elements' shape (``hidden``'s without ``D``) for ``'none'``, else a
      scalar; dtype ``hidden.dtype`` (promoted with a probability target's; or
      ``loss_dtype``).
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
      >>> p = jax.nn.softmax(jax.random.normal(jax.random.key(2), (8, 1000)))
      >>> soft = jaxce.linear_cross_entropy(h, k, p, label_smoothing=0.1)
      >>> bool(jnp.allclose(soft, jaxce.cross_entropy(h @ k, p, label_smoothing=0.1)))
      True

    PyTorch equivalent:
      ``torch.nn.functional.linear_cross_entropy(hidden, kernel.T, target,
      linear_bias=bias, weight=weight, reduction=..., ignore_index=...,
      label_smoothing=...)`` (torch's ``linear_weight`` has the ``[V, D]`` layout:
      ``jnp.moveaxis(linear_weight, -1, 0)`` is jaxce's kernel, also for K dimensions).
      ``torch.nn.LinearCrossEntropyOptions`` picks torch's implementation, not the values:
      its token-chunked path (the gradient formed in the forward pass) is
      ``strategy="min_work"`` here, ``batch_chunk_size`` is ``block_size`` and
      ``chunking_method="aspect_ratio"`` the default block, ``acc_dtype`` is
      ``acc_dtype`` (its d-kernel accumulator; the logits always accumulate in float32, as
      under torch's ``"accurate"``/``"balanced"`` policies); ``allow_retain_graph`` has no meaning in JAX, whose derivatives
      (``grad``, ``jvp``, ``vmap``, second order) all work on the fused path.
    """
    if jnp.ndim(kernel) > 2:
        _validate.check_acc_dtype(acc_dtype, jnp.result_type(kernel), strategy)
        _validate.resolve_strategy(
            _validate.check_strategy(strategy), _validate.min_work_unsupported(
                reduction, return_aux, jnp.ndim(kernel)), fits=False,
        )  # fmt: skip
        return _out_features_loss(
            hidden, kernel, target, weight, ignore_index, reduction, label_smoothing, bias,
            axis_name, where, z_loss, logit_softcap, return_aux, check_targets, loss_dtype,
            vocab_size, implementation, temperature, sample_weight, return_entropy,
        )  # fmt: skip
    arrays, opts = prepare(
        hidden, kernel, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, bias=bias, chunk_size=chunk_size, axis_name=axis_name,
        where=where, z_loss=z_loss, logit_softcap=logit_softcap, return_aux=return_aux,
        check_targets=check_targets, loss_dtype=loss_dtype, vocab_size=vocab_size,
        strategy=strategy, block_size=block_size, acc_dtype=acc_dtype, temperature=temperature,
        sample_weight=sample_weight, return_entropy=return_entropy,
    )  # fmt: skip
    opts = opts._replace(implementation=check_implementation(implementation))
    return linear_loss(*arrays, opts=opts)


def _out_features_loss(
    hidden, kernel, target, weight, ignore_index, reduction, label_smoothing, bias, axis_name,
    where, z_loss, logit_softcap, return_aux, check_targets, loss_dtype, vocab_size,
    implementation, temperature, sample_weight, return_entropy,
):  # fmt: skip
    """K-dimensional out-features, ``kernel [D, C, d1, ..., dK]``: the logits ``[..., C,
    d1, ..., dK]`` are formed (as PyTorch's own chunked path falls back to its reference
    here) and :func:`jaxce.cross_entropy` takes them with the class axis after the
    tokens'."""
    hidden = _validate.check_input(hidden)
    kernel = _validate.check_kernel(kernel, hidden, max_ndim=kernel.ndim)
    if hidden.ndim < 2:
        raise ValueError(
            f"a K-dimensional loss (kernel of shape {tuple(kernel.shape)}) needs batched "
            f"hidden [N, D]; got shape {tuple(hidden.shape)}"
        )
    if axis_name is not None or vocab_size is not None:
        raise ValueError(
            "axis_name and vocab_size (vocabulary parallelism) need a 2-D kernel [D, V]; got "
            f"a kernel of shape {tuple(kernel.shape)}"
        )
    bias = _validate.check_bias(bias, kernel.shape[1:])
    logits = jnp.tensordot(hidden, kernel, axes=1)
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)[(None,) * (hidden.ndim - 1)]
    target = _validate.as_array(target, "target")
    probs = tuple(target.shape) == tuple(logits.shape)
    ignore_index = _validate.check_linear_ignore_index(ignore_index, probs)
    return cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing,
        axis=hidden.ndim - 1, where=where, z_loss=z_loss, logit_softcap=logit_softcap,
        return_aux=return_aux, check_targets=check_targets, loss_dtype=loss_dtype,
        implementation=implementation, temperature=temperature, sample_weight=sample_weight,
        return_entropy=return_entropy,
    )  # fmt: skip


def prepare(
    hidden, kernel, target, *, weight, ignore_index, reduction, label_smoothing, bias,
    chunk_size, axis_name, where, z_loss, logit_softcap, return_aux, check_targets, loss_dtype,
    vocab_size, strategy, block_size, acc_dtype, temperature, sample_weight, return_entropy,
):  # fmt: skip
    """Checks :func:`linear_cross_entropy`'s arguments (a 2-D ``kernel``): ``((hidden,
    kernel, bias, target, weight, eps, z, where, temperature, sample_weight), opts)`` for
    :func:`linear_loss`, the strategy resolved once from all of them.

    ``target`` is read as class probabilities when it has ``hidden``'s shape with ``D``
    replaced by the kernel's ``V`` columns (PyTorch's rule: the logits' shape), else as
    class indices; ``where`` is folded into index targets (None is passed on) and kept for
    probabilities.
    """
    hidden = _validate.check_input(hidden)
    kernel = _validate.check_kernel(kernel, hidden)
    vocab = kernel.shape[1]
    reduction = _validate.check_reduction(reduction)
    target = _validate.as_array(target, "target")
    probs = tuple(target.shape) == (*hidden.shape[:-1], vocab)
    ignore_index = _validate.check_linear_ignore_index(ignore_index, probs)
    eps = _validate.check_label_smoothing(label_smoothing)
    out_dtype = hidden.dtype
    if probs:
        if not _validate.is_float_dtype(target.dtype):
            raise TypeError(
                f"target has the logits' shape {tuple(target.shape)} (hidden's shape with D "
                "replaced by the kernel's V columns), so it is read as class probabilities and "
                f"must have a floating dtype; got {_validate.dtype_name(target.dtype)} (class "
                f"indices have hidden's shape without D: {tuple(hidden.shape[:-1])})"
            )
        # PyTorch promotes (float32 logits, float64 probabilities: a float64 loss).
        out_dtype = promote_float_dtypes(hidden.dtype, target.dtype)
        if compute_dtype(out_dtype) != compute_dtype(hidden.dtype):
            hidden, kernel = hidden.astype(out_dtype), kernel.astype(out_dtype)
    elif tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} (hidden's shape without D) "
            f"for class indices, or {(*hidden.shape[:-1], vocab)} (the logits' shape) for "
            f"class probabilities; got {tuple(target.shape)}"
        )
    elif not _validate.is_int_dtype(target.dtype):
        raise TypeError(
            f"target must hold integer class indices; got {_validate.dtype_name(target.dtype)}"
        )
    weight = _validate.check_weight(weight, vocab)
    bias = _validate.check_bias(bias, kernel.shape[1:])
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a mesh axis name (str) or None; got {axis_name!r}")
    vocab_size = _validate.check_vocab_size(vocab_size, axis_name)
    if vocab_size is not None:
        _validate.check_vocab_fits(vocab_size, vocab, axis_name)
    out_dtype = _validate.check_loss_dtype(loss_dtype, out_dtype)
    z = _validate.check_z_loss(z_loss)
    cap = _validate.check_softcap(logit_softcap)
    return_aux = _validate.check_flag(return_aux, "return_aux")
    check_targets = _validate.check_flag(check_targets, "check_targets")
    element_shape = tuple(hidden.shape[:-1])
    temperature = _validate.check_temperature(temperature)
    sample_weight = _validate.check_sample_weight(
        sample_weight, element_shape, "hidden's shape without D"
    )
    entropy = _validate.check_flag(return_entropy, "return_entropy")
    where = _validate.check_where(where, element_shape, "hidden's shape without D")
    if not probs:
        target = mask_targets(target, where, ignore_index)
        where = None
        if axis_name is None:
            _validate.check_target_values(target, vocab, ignore_index)
    num_tokens = int(np.prod(element_shape, dtype=np.int64))
    chunk, chunk_by = (chunk_size, ()) if chunk_size else default_widths(num_tokens, vocab)
    chunk = min(chunk, max(vocab, 1))
    strategy = _validate.check_strategy(strategy)
    block_size = _validate.check_block_size(block_size)
    dim = hidden.shape[-1]
    block = min(block_size or block_rows(num_tokens, dim, vocab), max(num_tokens, 1))
    acc = _validate.check_acc_dtype(acc_dtype, kernel.dtype, strategy)
    acc_size = compute_dtype(kernel.dtype).itemsize if acc is None else acc.itemsize
    fits = auto_picks_min_work(
        num_tokens, dim, vocab, block, kernel.dtype.itemsize, acc_size, entropy
    )
    # The aux outputs that return_entropy implies run on min_work (return_aux alone does not).
    unsupported = _validate.min_work_unsupported(reduction, return_aux and not entropy, kernel.ndim)
    strategy = _validate.resolve_strategy(strategy, unsupported, fits)
    opts = Options(
        ignore_index=ignore_index,
        cap=cap,
        stats=return_aux or entropy or z is not None,
        reduction=reduction,
        return_aux=return_aux or entropy,  # return_entropy implies the aux outputs
        check=check_targets and not probs,
        out_dtype=out_dtype,
        chunk=chunk,
        chunk_by=chunk_by,
        axis_name=axis_name,
        vocab_size=vocab_size,
        strategy=strategy,
        block=block,
        tempered=temperature is not None,
        entropy=entropy,
        acc=acc,
    )
    arrays = (hidden, kernel, bias, target, weight, eps, z, where, temperature, sample_weight)
    return arrays, opts


@partial(jax.jit, static_argnames=("opts",))
def linear_loss(
    hidden, kernel, bias, target, weight, eps, z, where, temperature=None, sample_weight=None, *,
    opts,
):  # fmt: skip
    h2 = hidden.reshape(-1, hidden.shape[-1])
    temp = None
    if opts.tempered:
        temp = checked_temperature(temperature, compute_dtype(h2.dtype))
    sw = None if sample_weight is None else sample_weight.reshape(-1)
    valid = None if where is None else where.reshape(-1)
    probs = target.ndim == hidden.ndim  # class probabilities, [..., V]
    t2 = target.reshape(-1, target.shape[-1]) if probs else target.reshape(-1)
    vocab = kernel.shape[1]  # all the classes, over every device of the axis
    if opts.axis_name is not None:
        vocab = opts.vocab_size or vocab * lax.axis_size(opts.axis_name)
    if opts.check:  # class indices only
        debug_check_targets(t2, vocab, opts.ignore_index)
    if opts.strategy == "min_work":  # 'mean' / 'sum' only: a scalar (and the aux)
        out = min_work_loss(h2, kernel, bias, t2, weight, eps, z, valid, opts, sw, temp)
        return _per_element_shapes(out, target.shape[:-1] if probs else target.shape, opts)
    entropy = None
    if probs:
        shape = target.shape[:-1]
        loss, stats = prob_linear_loss(h2, kernel, bias, t2, weight, eps, opts, temp)
        if opts.entropy:
            *stats, entropy = stats
        if valid is not None:
            loss = jnp.where(valid, loss, jnp.zeros_like(loss))
        counted = jnp.ones(loss.shape, bool) if valid is None else valid
        # PyTorch's 'mean' for probabilities: over the elements, not the weights.
        denominator = batch_total(counted, opts.batch_axis, loss.dtype)
        return _per_element_shapes(
            finish_loss(loss, stats, valid, denominator, z, opts, sw, entropy), shape, opts
        )
    shape = target.shape
    want_denominator = opts.reduction == "mean" or opts.return_aux
    loss, counted, w_y, stats = index_linear_loss(h2, kernel, bias, t2, weight, eps, opts, temp)
    denominator = counted_sum(counted, w_y, opts.batch_axis) if want_denominator else None
    valid = counted if sw is not None else None
    if opts.stats:
        if opts.entropy:
            *stats, entropy = stats
        stats, valid = index_stats(t2, vocab, opts.ignore_index, *stats)
    out = finish_loss(loss, stats, valid, denominator, z, opts, sw, entropy)
    return _per_element_shapes(out, shape, opts)


def _per_element_shapes(out, shape, opts):
    """The flat per-token outputs of :func:`finish_loss` in the elements' ``shape``."""
    if not opts.return_aux:
        return out.reshape(shape) if opts.reduction == "none" else out
    loss, aux = out
    per_element = {"lse": aux.lse.reshape(shape), "predicted": aux.predicted.reshape(shape)}
    if opts.reduction == "none":
        loss = loss.reshape(shape)
        per_element.update(z_loss=aux.z_loss.reshape(shape), accuracy=aux.accuracy.reshape(shape))
        if aux.entropy is not None:
            per_element.update(entropy=aux.entropy.reshape(shape))
    return loss, aux._replace(**per_element)
