"""Public ``cross_entropy`` and ``CrossEntropyLoss``."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxce import _validate
from jaxce._backends import check_implementation
from jaxce._index import index_loss
from jaxce._options import Options, compute_dtype, promote_float_dtypes
from jaxce._prob import prob_loss
from jaxce._reduction import CrossEntropyAux, finish_loss, index_denominator, index_stats
from jaxce._targets import debug_check_targets, mask_targets, target_info
from jaxce._tempered import index_tempered_loss, prob_tempered_loss


def cross_entropy(
    input: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float | jax.typing.ArrayLike = 0.0,
    *,
    axis: int = -1,
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
) -> jax.Array | tuple[jax.Array, CrossEntropyAux]:
    r"""Cross-entropy between logits and targets, exactly as PyTorch defines it.

    For class-index targets ``y`` (ignoring ``ignore_index``), per element ``n``:

    .. math::
        \ell_n = (1-\varepsilon)\, w_{y_n} (\operatorname{lse}(x_n) - x_{n,y_n})
                 + \frac{\varepsilon}{C} \sum_c w_c (\operatorname{lse}(x_n) - x_{n,c})

    and ``'mean'`` divides the sum by ``Σ_n w_{y_n}`` over non-ignored elements (both terms,
    PyTorch's weighted mean). For class-probability targets ``t`` (same shape as
    ``input``), ``ℓ_n = Σ_c w_c t'_{n,c} (lse(x_n) - x_{n,c})`` with
    ``t' = (1-ε) t + ε/C``, and ``'mean'`` divides by the number of elements.

    Reverse mode runs a hand-written backward pass that keeps only the per-element
    log-sum-exp (and, for probability targets, ``Σ_c w_c t'_c``) besides the inputs: no
    softmax, one-hot or float32 copy of the logits is saved. Forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.linearize``) and second order (``jax.hessian``, grad of grad,
    Hessian-vector products) work too.

    Args:
      input: logits ``[..., C, ...]`` of dtype float16, bfloat16, float32 or float64,
        classes along ``axis``. A 1-D ``[C]`` input is one unbatched sample.
      target: class indices of any integer dtype, shaped like ``input`` without the class
        axis; or class probabilities (floating) of exactly ``input``'s shape — the shape
        decides, as in PyTorch. Probabilities are not checked (any real values work).
      weight: optional ``[C]`` per-class weights (any float dtype).
      ignore_index: class-index targets equal to it are skipped: their loss is exactly 0,
        they add nothing to the 'mean' denominator and get zero gradient. May be negative,
        out of range, or a valid class. Must be negative for probability targets.
      reduction: ``'none'`` (per-element losses, the target's shape), ``'mean'`` or
        ``'sum'`` (scalars).
      label_smoothing: ε in [0, 1]; a Python float or a scalar array (traced values do not
        recompile; a traced ε outside [0, 1] gives NaN).
      axis: the class axis of ``input``. Default -1 (JAX convention); ``axis=1`` is
        PyTorch's ``(N, C, d1, ..., dk)`` layout.
      where: optional boolean mask of the loss's element shape (``target.shape`` for
        class indices, ``input.shape`` without ``axis`` for probabilities). False
        elements count as ignored: loss 0, left out of the 'mean' denominator, zero
        gradient. Combines with ``ignore_index``.
      z_loss: coefficient ``z`` of the PaLM z-loss ``z · lse²`` added to each counted
        element's loss (0 at ignored/masked elements; not multiplied by ``weight``; its
        'mean' divides by the *number* of counted elements, as in PaLM, t5x and
        Liger-Kernel, whatever the class weights). A float >= 0 or a scalar array.
      logit_softcap: ``cap`` (a positive Python float): the loss is taken on
        ``cap · tanh(input / cap)`` (Gemma 2), with the exact derivative, without
        storing the capped logits. None (default): no cap.
      temperature: ``T`` (a float > 0 or a scalar array; traced values do not
        recompile): the loss, and every aux output, is that of ``z / T``, applied *after*
        the soft cap (``z = cap · tanh(input / cap) / T``), as ``logits / temperature`` in
        verl and Liger-Kernel's fused scaled cross-entropy. Differentiable in ``T``
        (exact, to any order). A concrete ``T`` that is not finite and > 0 raises; a traced
        one gives NaN. None (default): no temperature (``T = 1`` on the PyTorch-exact
        path). With a temperature, or with ``return_entropy``, the loss runs a per-element
        statistics core (``lse``, ``z_y``, ``Σ w z``, the entropy) whose backward pass
        recomputes the softmax elementwise: still nothing logits-sized is saved.
      sample_weight: optional per-element float weights ``s_n`` of the loss's element
        shape (like ``where``; any float dtype). Each counted element's loss (and its
        z-loss term) is multiplied by ``s_n``; the weights may be negative (advantages)
        and are differentiable. They do *not* enter the ``'mean'`` denominators (Keras's
        ``sample_weight`` with ``'sum_over_batch_size'``, and verl's token-mean): the mean
        is ``Σ_n s_n ℓ_n / D`` with ``D`` PyTorch's denominator (``Σ w[y_n]`` over counted
        elements, their count without class weights). Composes with ``weight``, ``where``
        and ``ignore_index`` (uncounted elements contribute 0 whatever ``s_n``).
      return_aux: also return a :class:`CrossEntropyAux` from the same pass: the
        per-element log-sum-exp (differentiable), the z-loss term (differentiable), the
        'mean' denominators (``denominator`` for the cross-entropy, ``count`` for the
        z-loss), the correct predictions (``correct``, ``accuracy``) and the predicted
        class per element (``predicted``, -1 where not counted). Exact gradient
        accumulation over micro-batches: with ``reduction='sum'``, the cross-entropy
        ``loss - aux.z_loss`` summed over micro-batches divided by the summed
        ``denominator``, plus ``aux.z_loss`` summed divided by the summed ``count`` (with
        ``sample_weight`` too: the denominators do not depend on it).
      return_entropy: also compute ``aux.entropy``, the entropy of the (soft-capped,
        tempered) softmax, in the same pass (differentiable: entropy-regularised RL), and
        return ``(loss, aux)`` (implies ``return_aux``). Liger-Kernel's name.
      check_targets: also trace a ``checkify.debug_check`` that names the first class
        index outside ``[0, C)`` (and not ``ignore_index``) and its flat position, for
        ``jax.experimental.checkify.checkify(f, errors=checkify.user_checks)``. Off by
        default: the check is an effect, and a jitted function with an effect loses
        JAX's C++ dispatch fast path. (Concrete targets outside jit are checked anyway.)
      loss_dtype: the dtype of the returned loss (and ``aux.z_loss``); None (default):
        PyTorch's (below). ``jnp.float32`` keeps a bfloat16/float16 loss, computed in
        float32, from being rounded to the input's precision.
      implementation: how the passes over the logits are spelled (the values are the same
        whichever is chosen; derivatives are always the portable spelling's). None
        (default): chosen for the platform the program is compiled for — XLA:CPU's
        spelling on CPUs, XLA:GPU's on CUDA GPUs, the portable one elsewhere (TPUs).
        ``'xla'``: the portable spelling on every platform. ``'xla_cpu'`` /
        ``'xla_gpu'`` / ``'xla_tpu'``: that compiler's spelling on any platform (its
        memory and speed are tuned for, and measured on, that compiler only).
        ``'pallas_tpu'``: ``'xla_tpu'`` (its kernels are the fused loss's; a dense loss
        runs the portable program).

    Returns:
      The loss: shape ``target.shape`` (index targets) or ``input.shape`` without ``axis``
      (probabilities) for ``'none'``, else a scalar. dtype: ``loss_dtype`` if given, else
      ``input.dtype`` for index targets and PyTorch's promotion of input, target and weight
      for probabilities. Math is done in float32 (float64 for float64 inputs). With
      ``return_aux``: ``(loss, aux)``.

    Raises:
      TypeError: a non-float ``input``/``weight``, a non-integer index target, a
        non-float probability target, or an option of the wrong type.
      ValueError: wrong shapes, an unknown ``reduction``, ``axis`` out of bounds,
        ``label_smoothing`` outside [0, 1] (PyTorch silently ignores negative values),
        a concrete ``temperature`` that is not finite and > 0, a ``sample_weight`` of the
        wrong shape (TypeError: of a non-float dtype),
        ``ignore_index >= 0`` with probability targets, an unknown ``implementation``,
        or — when ``target`` is concrete (outside jit) — a class index outside ``[0, C)``
        that is not ``ignore_index``.
        Under ``jax.jit`` such an index cannot be checked; the loss and gradient are then
        NaN (never a plausible finite number).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
      >>> labels = jnp.array([0, 1])
      >>> print(f"{jaxce.cross_entropy(logits, labels):.4f}")
      0.3964
      >>> loss, aux = jaxce.cross_entropy(
      ...     logits, labels, temperature=2.0, sample_weight=jnp.array([1.0, -0.5]),
      ...     reduction="none", return_entropy=True)
      >>> print(loss.round(4), aux.entropy.round(4))
      [ 0.528  -0.3972] [0.9343 1.0684]

    PyTorch equivalent:
      ``torch.nn.functional.cross_entropy(input, target, weight, ignore_index=ignore_index,
      reduction=reduction, label_smoothing=label_smoothing)`` with ``axis=1`` (or any
      input of rank ≤ 2 with the default ``axis=-1``). ``temperature=T``: the same on
      ``input / T``; ``sample_weight=s``: ``(F.cross_entropy(..., reduction='none') *
      s).sum() / D``; entropy: ``torch.distributions.Categorical(logits=input /
      T).entropy()``.
    """
    input = _validate.check_input(input)
    reduction = _validate.check_reduction(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index)
    eps = _validate.check_label_smoothing(label_smoothing)
    axis = _validate.normalize_axis(axis, input.ndim)
    z = _validate.check_z_loss(z_loss)
    cap = _validate.check_softcap(logit_softcap)
    temperature = _validate.check_temperature(temperature)
    return_entropy = _validate.check_flag(return_entropy, "return_entropy")
    return_aux = _validate.check_flag(return_aux, "return_aux") or return_entropy
    check_targets = _validate.check_flag(check_targets, "check_targets")
    implementation = check_implementation(implementation)
    target, spec = _validate.check_target(input, target, axis, ignore_index)
    weight = _validate.check_weight(weight, spec.num_classes)
    element_shape = tuple(d for i, d in enumerate(input.shape) if i != axis)
    where = _validate.check_where(where, element_shape, "the loss's element shape")
    sample_weight = _validate.check_sample_weight(
        sample_weight, element_shape, "the loss's element shape"
    )
    if spec.kind == "index":
        target = mask_targets(target, where, ignore_index)
        where = None
        _validate.check_target_values(target, spec.num_classes, ignore_index)
        out_dtype = input.dtype
    else:
        dtypes = [input.dtype, target.dtype] + ([] if weight is None else [weight.dtype])
        out_dtype = promote_float_dtypes(*dtypes)
    out_dtype = _validate.check_loss_dtype(loss_dtype, out_dtype)
    opts = Options(
        axis=axis,
        ignore_index=ignore_index,
        cap=cap,
        stats=return_aux or z is not None,
        reduction=reduction,
        return_aux=return_aux,
        check=check_targets,
        out_dtype=out_dtype,
        implementation=implementation,
        tempered=temperature is not None,
        entropy=return_entropy,
    )
    if spec.kind == "index":
        return _index_cross_entropy(
            input, target, weight, eps, z, temperature, sample_weight, opts=opts
        )
    return _prob_cross_entropy(
        input, target, weight, eps, where, z, temperature, sample_weight, opts=opts
    )


def _core(input, target, weight, eps, temperature, opts, tempered, plain):
    """``(loss, lse, argmax, entropy)`` per element (lse, argmax None unless
    ``opts.stats``; entropy None unless ``opts.entropy``): the tempered core (``_tempered``)
    when a temperature or the entropy is asked for, else the ``plain`` one."""
    if opts.tempered or opts.entropy:
        loss, lse, entropy = tempered(input, target, weight, eps, temperature, opts, opts.entropy)
        argmax = jnp.argmax(input, axis=opts.axis).astype(jnp.int32) if opts.stats else None
        return loss, lse, argmax, entropy
    out = plain(input, target, weight, eps, opts)
    return (*out, None) if opts.stats else (out, None, None, None)


@partial(jax.jit, static_argnames=("opts",))
def _index_cross_entropy(input, target, weight, eps, z, temperature, sample_weight, *, opts):
    num_classes = input.shape[opts.axis]
    if opts.check:
        debug_check_targets(target, num_classes, opts.ignore_index)
    loss, lse, argmax, entropy = _core(
        input, target, weight, eps, temperature, opts, index_tempered_loss, index_loss
    )
    stats, valid = None, None
    if opts.stats:
        stats, valid = index_stats(target, num_classes, opts.ignore_index, lse, argmax)
    elif sample_weight is not None:
        valid = target_info(target, num_classes, opts.ignore_index).valid
    denominator = None
    if opts.reduction == "mean" or opts.return_aux:
        dtype = compute_dtype(input.dtype)
        denominator = index_denominator(target, weight, num_classes, opts, dtype)
    return finish_loss(loss, stats, valid, denominator, z, opts, sample_weight, entropy)


@partial(jax.jit, static_argnames=("opts",))
def _prob_cross_entropy(input, target, weight, eps, where, z, temperature, sample_weight, *, opts):
    loss, lse, argmax, entropy = _core(
        input, target, weight, eps, temperature, opts, prob_tempered_loss, prob_loss
    )
    stats = None
    if opts.stats:
        stats = (lse, argmax, argmax == jnp.argmax(target, axis=opts.axis).astype(jnp.int32))
    if where is not None:
        loss = jnp.where(where, loss, jnp.zeros_like(loss))
    count = loss.size if where is None else jnp.sum(where)
    denominator = jnp.asarray(count, loss.dtype)  # PyTorch: numel / C, not the weights
    return finish_loss(loss, stats, where, denominator, z, opts, sample_weight, entropy)


class CrossEntropyLoss:
    """Callable module form of :func:`cross_entropy`, like ``torch.nn.CrossEntropyLoss``.

    Options are validated when the object is built; ``loss(input, target)`` then calls
    :func:`cross_entropy` with them.

    Args:
      weight: optional ``[C]`` per-class weights.
      ignore_index: see :func:`cross_entropy`.
      reduction: ``'none'``, ``'mean'`` or ``'sum'``.
      label_smoothing: ε in [0, 1].
      axis: the class axis of the input (default -1; ``axis=1`` is PyTorch's layout).
      z_loss, logit_softcap, temperature, check_targets, loss_dtype, implementation: see
        :func:`cross_entropy`
        (``where`` and ``sample_weight`` are given per call: ``loss(input, target,
        where=mask, sample_weight=s)``).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> loss_fn = jaxce.CrossEntropyLoss(label_smoothing=0.1, reduction="sum")
      >>> print(f"{loss_fn(jnp.zeros((2, 4)), jnp.array([1, 3])):.4f}")
      2.7726

    PyTorch equivalent:
      ``torch.nn.CrossEntropyLoss(weight, ignore_index=..., reduction=...,
      label_smoothing=...)``.
    """

    def __init__(
        self,
        weight: jax.typing.ArrayLike | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float | jax.typing.ArrayLike = 0.0,
        *,
        axis: int = -1,
        z_loss: float | jax.typing.ArrayLike = 0.0,
        logit_softcap: float | None = None,
        temperature: float | jax.typing.ArrayLike | None = None,
        check_targets: bool = False,
        loss_dtype: jax.typing.DTypeLike | None = None,
        implementation: str | None = None,
    ) -> None:
        _validate.check_flag(check_targets, "check_targets")
        _validate.check_loss_dtype(loss_dtype, jnp.float32)
        _validate.check_z_loss(z_loss)
        _validate.check_softcap(logit_softcap)
        _validate.check_temperature(temperature)
        check_implementation(implementation)
        _validate.check_reduction(reduction)
        _validate.check_ignore_index(ignore_index)
        _validate.check_label_smoothing(label_smoothing)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int; got {type(axis).__name__} {axis!r}")
        if weight is not None:
            weight = jnp.asarray(weight)
            if weight.ndim != 1:
                raise ValueError(
                    f"weight must be 1-D, one entry per class; got shape {tuple(weight.shape)}"
                )
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.axis = axis
        self.z_loss = z_loss
        self.logit_softcap = logit_softcap
        self.temperature = temperature
        self.check_targets = check_targets
        self.loss_dtype = loss_dtype
        self.implementation = implementation

    def __call__(
        self,
        input: jax.typing.ArrayLike,
        target: jax.typing.ArrayLike,
        *,
        where: jax.typing.ArrayLike | None = None,
        sample_weight: jax.typing.ArrayLike | None = None,
    ) -> jax.Array:
        return cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            axis=self.axis,
            where=where,
            z_loss=self.z_loss,
            logit_softcap=self.logit_softcap,
            temperature=self.temperature,
            sample_weight=sample_weight,
            check_targets=self.check_targets,
            loss_dtype=self.loss_dtype,
            implementation=self.implementation,
        )

    def __repr__(self) -> str:
        weight = None if self.weight is None else f"<{self.weight.shape[0]} classes>"
        return (
            f"CrossEntropyLoss(weight={weight}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
            f"axis={self.axis}"
            + ("" if not self.z_loss else f", z_loss={self.z_loss}")
            + ("" if self.logit_softcap is None else f", logit_softcap={self.logit_softcap}")
            + ("" if self.temperature is None else f", temperature={self.temperature}")
            + (", check_targets=True" if self.check_targets else "")
            + ("" if self.loss_dtype is None else f", loss_dtype={jnp.dtype(self.loss_dtype).name}")
            + ("" if self.implementation is None else f", implementation={self.implementation!r}")
            + ")"
        )
