"""Fused linear + cross-entropy that never materialises the ``[tokens, vocab]`` logits.

``linear_cross_entropy(hidden, kernel, target)`` equals
``cross_entropy(hidden @ kernel + bias, target)`` but walks the vocabulary in chunks:

* forward: one pass over vocabulary chunks with an online log-sum-exp (running max and
  rescaled sum), also picking the target logit and, with smoothing, ``Σ_c w_c z_c``;
  only per-token statistics are kept;
* backward: a second pass recomputes each chunk's logits, forms its logit gradient
  ``dz = p coef - a onehot - b w`` in float32, writes the finished ``dkernel`` (and
  ``dbias``/``dweight``) slice for that chunk, and accumulates ``dhidden`` in float32.

Live memory is a few ``[tokens, chunk]`` float32 blocks plus a float32 ``[tokens, D]``
accumulator: no ``[tokens, vocab]`` array and no float32 copy of the kernel. Matmuls run
in the input dtype with float32 accumulation (``preferred_element_type``); softmax math is
float32; gradients come back in the inputs' dtypes. The cost is one extra matmul (the
recomputed logits): four instead of three.

* tangent (forward mode): one chunked pass, ``Σ_c dz_c (dhidden @ k_c + hidden @ dk_c +
  db_c)``; the backward pass above is its hand-written transpose (see ``_linear_map.py``),
  and both are plain differentiable JAX, so Hessian-vector products stay chunked too.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _validate
from jaxce._chunking import (
    accumulate_chunk_grads,
    auto_chunk,
    chunk_logits,
    chunk_logits_tangent,
    chunk_loop,
    chunk_stats,
    chunks,
)
from jaxce._core import (
    checked_eps,
    combine_index_loss,
    debug_check_targets,
    index_eps_grad,
    index_grad_rows,
    lean_tangent,
    mask_targets,
    no_tangent,
    softcap,
    softcap_slope,
    sum_weight,
    target_info,
    target_weight,
    times_slope,
)
from jaxce._reduction import CrossEntropyAux, finish_loss, index_denominator, reduce_loss
from jaxce._validate import compute_dtype
from jaxce._vocab_parallel import shard_targets, vocab_parallel_loss


@partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9))
def _linear_index_loss(
    hidden, kernel, bias, target, weight, eps, chunk, ignore_index, cap=None, stats=False
):
    return _fwd(hidden, kernel, bias, target, weight, eps, chunk, ignore_index, cap, stats)[0]


def _jvp(chunk, ignore_index, cap, stats, primals, tangents):
    out, res = _fwd(*primals, chunk, ignore_index, cap, stats)
    static = (chunk, ignore_index, cap, stats)
    tangent = lean_tangent(
        partial(_tangent, *static),
        partial(_transpose, *static),
        res,
        tangents,
        out[:2] if stats else out,
    )
    return out, ((*tangent, no_tangent(out[2])) if stats else tangent)


_linear_index_loss.defjvp(_jvp, symbolic_zeros=True)


def _fwd(hidden, kernel, bias, target, weight, eps, chunk, ignore_index, cap=None, stats=False):
    eps = checked_eps(eps)
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    valid, in_range, idx = target_info(target, vocab, ignore_index)
    lse, z_y, wz, _, arg = chunk_stats(
        hidden, kernel, bias, idx, in_range, weight, eps is not None, chunk, cap, stats
    )
    nll = lse - z_y
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    smooth = None
    if eps is not None:
        smooth = lse * sum_weight(weight, vocab, dtype) - wz  # Σ_c w_c (lse - z_c)
    loss = combine_index_loss(valid, w_y, nll, smooth, eps, vocab)
    res = (hidden, kernel, bias, target, weight, eps, lse, nll, smooth)
    if stats:
        return (loss, lse, valid & in_range & (arg == idx)), res
    return loss, res


def _bwd(chunk, ignore_index, cap, stats, res, ct):
    hidden, kernel, bias, target, weight, eps, lse, nll, smooth = res
    g, g_lse = ct if stats else (ct, None)
    dtype = compute_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], kernel.shape[1]
    valid, in_range, idx = target_info(target, vocab, ignore_index)
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    g = g.astype(dtype)
    zero = jnp.zeros_like(lse)
    w = None if weight is None else weight.astype(dtype)
    rows = index_grad_rows(g, valid, w_y, lse, eps, weight, vocab, dtype, g_lse)
    keep, a, b, coef, lse_sel = rows

    def body(start, size, carry, kernel):
        dh, dk, db, dw = carry
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype)
        z = softcap(raw, cap)
        dz = jnp.exp(z - lse_sel[:, None]) * coef[:, None]
        cls = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
        dz = dz - jnp.where(cls == idx[:, None], a[:, None], 0)
        if b is not None:
            wc = 1 if w is None else lax.dynamic_slice_in_dim(w, start, size)[None, :]
            dz = dz - b[:, None] * wc
        dz = times_slope(dz, softcap_slope(raw, cap))
        dh, dk, db = accumulate_chunk_grads(hidden, kernel, dz, start, size, dh, dk, db, dtype)
        if dw is not None:
            # d l_n / d w_c = (1 - eps) nll_n [y_n = c] + (eps / V) (lse_n - z_nc), valid n.
            onehot_term = jnp.where(
                cls == idx[:, None], jnp.where(valid, g * keep * nll, zero)[:, None], 0
            )
            dw_c = jnp.sum(onehot_term, axis=0)
            if b is not None:
                gap = jnp.where(valid[:, None], b[:, None] * (lse[:, None] - z), 0)
                dw_c = dw_c + jnp.sum(gap, axis=0)
            dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, 0)
        return dh, dk, db, dw

    init = (
        jnp.zeros((n, hidden.shape[1]), dtype),
        jnp.zeros_like(kernel),
        None if bias is None else jnp.zeros_like(bias),
        None if weight is None else jnp.zeros_like(weight),
    )
    dh, dk, db, dw = chunk_loop(chunks(vocab, chunk), body, init, (kernel,))
    deps = index_eps_grad(g, valid, w_y, nll, smooth, eps, vocab)
    return dh.astype(hidden.dtype), dk, db, None, dw, deps


def _transpose(chunk, ignore_index, cap, stats, res, ct, present):
    return _bwd(chunk, ignore_index, cap, stats, res, ct)


def _tangent(chunk, ignore_index, cap, stats, res, tangents):
    """``d l_n`` (and with ``stats`` ``d lse_n``) for tangents ``(dhidden, dkernel, dbias,
    -, dweight, deps)`` (None: zero), chunk by chunk like the backward pass (whose
    cotangent transpose it is)."""
    hidden, kernel, bias, target, weight, eps, lse, nll, smooth = res
    dh, dk, db, _, dw, deps = tangents
    dtype = compute_dtype(hidden.dtype)
    vocab = kernel.shape[1]
    valid, in_range, idx = target_info(target, vocab, ignore_index)
    w_y = target_weight(weight, idx, valid, in_range, dtype)
    zero = jnp.zeros_like(lse)
    w = None if weight is None else weight.astype(dtype)
    keep, a, b, coef, lse_sel = index_grad_rows(
        jnp.ones_like(lse), valid, w_y, lse, eps, weight, vocab, dtype
    )

    def body(start, size, acc, kernel, dk):
        acc, d_lse = acc
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype)
        z = softcap(raw, cap)
        dz = chunk_logits_tangent(hidden, kernel, dh, dk, db, start, size, dtype)
        if dz is not None:
            dz = times_slope(dz, softcap_slope(raw, cap))
            g = jnp.exp(z - lse_sel[:, None]) * coef[:, None]
            cls = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
            g = g - jnp.where(cls == idx[:, None], a[:, None], 0)
            if b is not None:
                wc = 1 if w is None else lax.dynamic_slice_in_dim(w, start, size)[None, :]
                g = g - b[:, None] * wc
            acc = acc + jnp.sum(g * dz, axis=1)
            if stats:
                d_lse = d_lse + jnp.sum(jnp.exp(z - lse[:, None]) * dz, axis=1)
        if dw is not None and b is not None:
            dwc = lax.dynamic_slice_in_dim(dw.astype(dtype), start, size)[None, :]
            gap = jnp.where(valid[:, None], b[:, None] * (lse[:, None] - z), 0)
            acc = acc + jnp.sum(dwc * gap, axis=1)
        return acc, d_lse

    out, d_lse = chunk_loop(chunks(vocab, chunk), body, (zero, zero), (kernel, dk))
    if dw is not None:
        out = out + jnp.where(valid, keep * nll * dw.astype(dtype)[idx], zero)
    if deps is not None:
        out = out + jnp.where(valid, smooth / vocab - w_y * nll, zero) * deps.astype(dtype)
    return (out, d_lse) if stats else out


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
      where, z_loss, logit_softcap, return_aux, check_targets: as in
        :func:`jaxce.cross_entropy`
        (``where`` has ``target``'s shape; the cap applies to ``hidden @ kernel + bias``
        chunk by chunk, nothing logits-sized is stored).

    Returns:
      The loss: ``target.shape`` for ``'none'``, else a scalar; dtype ``hidden.dtype``.
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
    return _linear(
        hidden, kernel, bias, target, weight, eps, z,
        chunk=chunk, ignore_index=ignore_index, reduction=reduction, axis_name=axis_name,
        cap=cap, return_aux=return_aux, check=check_targets,
    )  # fmt: skip


@partial(
    jax.jit,
    static_argnames=(
        "chunk", "ignore_index", "reduction", "axis_name", "cap", "return_aux", "check"
    ),
)  # fmt: skip
def _linear(
    hidden, kernel, bias, target, weight, eps, z, *, chunk, ignore_index, reduction, axis_name,
    cap, return_aux, check,
):  # fmt: skip
    shape = target.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1)
    stats = return_aux or z is not None
    want_denominator = reduction == "mean" or return_aux
    if axis_name is not None:
        vocab = kernel.shape[1] * lax.axis_size(axis_name)
        if check:
            debug_check_targets(t1, vocab, ignore_index)
        loss, valid, w_y, st = vocab_parallel_loss(
            h2, kernel, bias, t1, weight, eps,
            chunk=chunk, ignore_index=ignore_index, axis_name=axis_name, cap=cap, stats=stats,
        )  # fmt: skip
        denominator = None
        if want_denominator:
            denominator = jnp.sum(jnp.where(valid, w_y, jnp.zeros_like(w_y)))
    else:
        vocab = kernel.shape[1]
        if check:
            debug_check_targets(t1, vocab, ignore_index)
        out = _linear_index_loss(h2, kernel, bias, t1, weight, eps, chunk, ignore_index, cap, stats)
        loss, st = (out[0], out[1:]) if stats else (out, None)
        valid = target_info(t1, vocab, ignore_index)[0] if stats else None
        denominator = None
        if want_denominator:
            dtype = compute_dtype(hidden.dtype)
            denominator = index_denominator(t1, weight, vocab, ignore_index, dtype)
    out = finish_loss(loss, st, valid, denominator, z, reduction, return_aux, hidden.dtype)
    if reduction != "none":
        return out
    if not return_aux:
        return out.reshape(shape)
    loss, aux = out
    return loss.reshape(shape), aux._replace(
        lse=aux.lse.reshape(shape), z_loss=aux.z_loss.reshape(shape)
    )


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
            denominator = batch_sum(jnp.sum(jnp.where(valid, w_y, jnp.zeros_like(w_y))))
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
