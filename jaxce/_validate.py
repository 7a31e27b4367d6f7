"""Trace-time argument checks and their error messages.

Everything here runs in Python before any array computation is staged, so a bad
argument raises eagerly *and* under ``jax.jit`` (at trace time). Messages name the
argument, what was expected and what arrived. The only value-dependent check,
:func:`check_target_values`, runs only when the target is concrete (outside jit).
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxce._options import compute_dtype

REDUCTIONS = ("none", "mean", "sum")
TargetKind = Literal["index", "prob"]


def is_float_dtype(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def is_int_dtype(dtype: Any) -> bool:
    # bool is not an integer here: a boolean target is almost always a mask by mistake.
    return jnp.issubdtype(dtype, jnp.integer)


def as_array(value: Any, name: str) -> Any:
    """Returns ``value`` as something with ``.shape``/``.dtype`` (arrays pass through)."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an array; got {type(value).__name__} {value!r}")
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array; got {type(value).__name__}") from e


def dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def check_input(input: Any) -> Any:
    """Checks the logits: a floating array of rank >= 1."""
    input = as_array(input, "input")
    if not is_float_dtype(input.dtype):
        raise TypeError(
            "input (the logits) must have a floating dtype (float16, bfloat16, float32 or "
            f"float64); got {dtype_name(input.dtype)}"
        )
    if input.ndim == 0:
        raise ValueError(
            "input (the logits) must have at least 1 dimension, the class axis; got a 0-d array"
        )
    return input


def normalize_axis(axis: Any, ndim: int) -> int:
    """Returns ``axis`` in ``[0, ndim)`` or raises."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int; got {type(axis).__name__} {axis!r}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of bounds for input of rank {ndim}: expected an int in "
            f"[{-ndim}, {ndim})"
        )
    return axis % ndim


def check_reduction(reduction: Any) -> str:
    if not isinstance(reduction, str):
        raise TypeError(
            f"reduction must be one of {REDUCTIONS}; got {type(reduction).__name__} {reduction!r}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return reduction


def check_ignore_index(ignore_index: Any) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(
            f"ignore_index must be an int; got {type(ignore_index).__name__} {ignore_index!r}"
        )
    return int(ignore_index)


def _scalar_option(value: Any, name: str, expected: str, check_range: Any) -> Any:
    """A real scalar option: None for a Python 0, a Python float, or a scalar array.

    A Python 0 returns None, so its term is not even traced. Any other Python number, and
    any array, is passed on as a traced value: changing it does not recompile. Concrete
    values go through ``check_range``; traced ones cannot, so the loss turns an
    out-of-range traced value into NaN instead.
    """
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be {expected}; got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Real):
        number = float(value)
        check_range(number)
        return None if number == 0.0 else number
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise TypeError(f"{name} must be {expected} or a scalar array; got {type(value).__name__}")
    if value.shape != ():
        raise ValueError(f"{name} must be a scalar; got an array of shape {value.shape}")
    if not (is_float_dtype(value.dtype) or is_int_dtype(value.dtype)):
        raise TypeError(f"{name} must have a real dtype; got " + dtype_name(value.dtype))
    try:
        number = float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return value  # traced: range enforced in the computation (NaN if outside)
    check_range(number)
    return value


def check_label_smoothing(label_smoothing: Any) -> Any:
    """Validates ε: None (no smoothing), a Python float, or a scalar array; concrete
    values must lie in [0, 1] (a traced ε outside gives NaN)."""
    return _scalar_option(label_smoothing, "label_smoothing", "a float in [0, 1]", _smoothing_range)


def _smoothing_range(value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"label_smoothing must be in [0, 1]; got {value}")


class TargetSpec(NamedTuple):
    kind: TargetKind
    num_classes: int


def check_target(input: Any, target: Any, axis: int, ignore_index: int) -> tuple[Any, TargetSpec]:
    """Decides index vs probability targets (PyTorch: by shape equality) and checks them."""
    target = as_array(target, "target")
    num_classes = input.shape[axis]
    if tuple(target.shape) == tuple(input.shape):
        if not is_float_dtype(target.dtype):
            raise TypeError(
                f"target has the input's shape {tuple(input.shape)}, so it is read as class "
                "probabilities and must have a floating dtype; got "
                f"{dtype_name(target.dtype)} (class indices have the input's shape without "
                f"the class axis: {_without_axis(input.shape, axis)})"
            )
        if ignore_index >= 0:
            raise ValueError(
                "ignore_index is not supported for class-probability targets: it must be "
                f"negative (default -100); got ignore_index={ignore_index}"
            )
        return target, TargetSpec("prob", num_classes)
    expected = _without_axis(input.shape, axis)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} (input's shape {tuple(input.shape)} without "
            f"the class axis {axis}) for class indices, or {tuple(input.shape)} for class "
            f"probabilities; got {tuple(target.shape)}"
        )
    if not is_int_dtype(target.dtype):
        raise TypeError(
            "target holds class indices and must have an integer dtype; got "
            f"{dtype_name(target.dtype)}"
            + (
                f" (class probabilities must have the input's shape {tuple(input.shape)})"
                if is_float_dtype(target.dtype)
                else ""
            )
        )
    return target, TargetSpec("index", num_classes)


def _without_axis(shape: Any, axis: int) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if i != axis)


def check_weight(weight: Any, num_classes: int) -> Any:
    if weight is None:
        return None
    weight = as_array(weight, "weight")
    if not is_float_dtype(weight.dtype):
        raise TypeError(f"weight must have a floating dtype; got {dtype_name(weight.dtype)}")
    if tuple(weight.shape) != (num_classes,):
        raise ValueError(
            f"weight must have shape ({num_classes},), one entry per class; got "
            f"{tuple(weight.shape)}"
        )
    return weight


def check_target_values(target: Any, num_classes: int, ignore_index: int) -> None:
    """Raises if a concrete target holds an index outside [0, C) that is not ignore_index.

    Does nothing for traced targets (under jit/vmap), where the loss is NaN instead.
    """
    try:
        values = np.asarray(target)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    if values.size == 0:
        return
    # Compare in a wide signed type so that uint8 targets and ignore_index=-100 mix safely.
    wide = values.astype(np.int64) if values.dtype != np.uint64 else values
    bad = ((wide < 0) | (wide >= num_classes)) & (wide != ignore_index)
    if bad.any():
        first = wide[bad].flat[0]
        position = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"target holds class index {int(first)} at position {position}, outside the "
            f"valid range [0, {num_classes}) and not ignore_index ({ignore_index}); "
            f"{int(bad.sum())} such entries in all"
        )


def check_where(where: Any, shape: tuple[int, ...], what: str) -> Any:
    """A boolean mask of exactly ``shape`` (the loss's element shape), or None."""
    if where is None:
        return None
    where = as_array(where, "where")
    if where.dtype != np.bool_:
        raise TypeError(f"where must be a boolean mask; got dtype {dtype_name(where.dtype)}")
    if tuple(where.shape) != tuple(shape):
        raise ValueError(f"where must have shape {tuple(shape)} ({what}); got {tuple(where.shape)}")
    return where


def check_z_loss(z_loss: Any) -> Any:
    """Validates the z-loss coefficient: None for 0, a Python float, or a scalar array.

    Concrete values must be finite and >= 0; a traced negative value makes the loss NaN.
    """
    return _scalar_option(z_loss, "z_loss", "a float >= 0", _z_loss_range)


def _z_loss_range(value: float) -> None:
    if not 0.0 <= value < float("inf"):  # also rejects NaN
        raise ValueError(f"z_loss must be a finite float >= 0; got {value}")


def check_temperature(temperature: Any) -> Any:
    """``temperature``: None (no temperature), a Python float or a scalar array; concrete
    values must be finite and > 0 (a traced value that is not gives NaN)."""
    if temperature is None:
        return None
    return _scalar_option(temperature, "temperature", "a float > 0", _temperature_range)


def _temperature_range(value: float) -> None:
    if not 0.0 < value < float("inf"):  # also rejects NaN
        raise ValueError(f"temperature must be a finite float > 0; got {value}")


def check_sample_weight(sample_weight: Any, shape: tuple[int, ...], what: str) -> Any:
    """Per-element float weights of exactly ``shape`` (the loss's element shape), or None."""
    if sample_weight is None:
        return None
    sample_weight = as_array(sample_weight, "sample_weight")
    if not is_float_dtype(sample_weight.dtype):
        raise TypeError(
            "sample_weight must have a floating dtype; got " + dtype_name(sample_weight.dtype)
        )
    if tuple(sample_weight.shape) != tuple(shape):
        raise ValueError(
            f"sample_weight must have shape {tuple(shape)} ({what}); "
            f"got {tuple(sample_weight.shape)}"
        )
    return sample_weight


def check_softcap(logit_softcap: Any) -> float | None:
    """``logit_softcap``: None or a positive finite Python float (a static option)."""
    if logit_softcap is None:
        return None
    if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real):
        raise TypeError(
            "logit_softcap must be None or a positive Python float (a static option, not an "
            f"array); got {type(logit_softcap).__name__} {logit_softcap!r}"
        )
    value = float(logit_softcap)
    if not (0.0 < value < float("inf")):
        raise ValueError(f"logit_softcap must be a positive finite float; got {value}")
    return value


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


def check_loss_dtype(loss_dtype: Any, default: Any) -> Any:
    """``loss_dtype``: None (``default``) or a floating dtype for the returned loss."""
    if loss_dtype is None:
        return np.dtype(default)
    try:
        dtype = np.dtype(loss_dtype)
    except TypeError as e:
        raise TypeError(
            f"loss_dtype must be None or a floating dtype (e.g. jnp.float32); got {loss_dtype!r}"
        ) from e
    if not is_float_dtype(dtype):
        raise TypeError(
            f"loss_dtype must be None or a floating dtype (e.g. jnp.float32); got {dtype.name}"
        )
    return dtype


def check_vocab_size(vocab_size: Any, axis_name: Any) -> int | None:
    """``vocab_size``: None, or (with ``axis_name``) the positive number of classes."""
    if vocab_size is None:
        return None
    if axis_name is None:
        raise ValueError(
            "vocab_size is for the vocabulary-parallel loss (with axis_name): it says how "
            "many of the devices' kernel columns are real classes; got axis_name=None"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int or None; got {vocab_size!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive; got {vocab_size}")
    return int(vocab_size)


def check_vocab_fits(vocab_size, v_local, axis_name):
    """``vocab_size`` classes fit in the ``n`` devices' kernel slices of ``v_local``
    columns along ``axis_name`` (known while tracing inside ``jax.shard_map``)."""
    try:
        shards = jax.lax.axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"axis_name {axis_name!r} is not a mesh axis in scope: call linear_cross_entropy "
            "with axis_name inside jax.shard_map over that axis"
        ) from e
    if vocab_size > v_local * shards:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be at most the columns of all devices' kernel "
            f"slices ({v_local} x {shards})"
        )


def check_kernel(kernel, hidden, max_ndim=2):
    """The kernel: ``hidden``'s floating dtype, ``[D, V]`` (``[D, C, d1, ...]`` up to
    ``max_ndim`` dimensions)."""
    kernel = as_array(kernel, "kernel")
    if not is_float_dtype(kernel.dtype):
        raise TypeError(f"kernel must have a floating dtype; got {dtype_name(kernel.dtype)}")
    if kernel.dtype != hidden.dtype:
        raise TypeError(
            f"kernel must have hidden's dtype {dtype_name(hidden.dtype)}; got "
            f"{dtype_name(kernel.dtype)}"
        )
    if not 2 <= kernel.ndim <= max_ndim or kernel.shape[0] != hidden.shape[-1]:
        expected = "(D, V)" if max_ndim == 2 else "(D, V) or (D, C, d1, ..., dK)"
        raise ValueError(
            f"kernel must have shape {expected} with D = hidden.shape[-1] = "
            f"{hidden.shape[-1]}; got {tuple(kernel.shape)}"
        )
    return kernel


def check_bias(bias, classes):
    """The optional bias: floating, one entry per class (``classes``: the kernel's shape
    without ``D``)."""
    if bias is None:
        return None
    bias = as_array(bias, "bias")
    if tuple(bias.shape) != tuple(classes):
        raise ValueError(
            f"bias must have shape {tuple(classes)} (the kernel's shape without D), one entry "
            f"per class; got {tuple(bias.shape)}"
        )
    if not is_float_dtype(bias.dtype):
        raise TypeError(f"bias must have a floating dtype; got {dtype_name(bias.dtype)}")
    return bias


def check_linear_ignore_index(ignore_index, probs):
    """PyTorch's ``F.linear_cross_entropy`` rule: None means -100 for class indices, and
    class probabilities take no ``ignore_index`` at all."""
    if ignore_index is None:
        return -100
    ignore_index = check_ignore_index(ignore_index)
    if probs:
        raise ValueError(
            "ignore_index cannot be given when target holds class probabilities (it has the "
            f"logits' shape); got ignore_index={ignore_index}, expected None"
        )
    return ignore_index


STRATEGIES = ("auto", "min_memory", "min_work")


def check_strategy(strategy: Any) -> str:
    """``strategy``: one of :data:`STRATEGIES`."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    return strategy


def min_work_unsupported(reduction: str, return_aux: bool, kernel_ndim: int) -> str | None:
    """Why ``strategy="min_work"`` cannot run these options (None: it can)."""
    if kernel_ndim > 2:
        return f"a 2-D kernel [D, V]; got a {kernel_ndim}-D kernel (K-dimensional out-features)"
    if reduction == "none":
        return "reduction 'mean' or 'sum'; got reduction='none'"
    if return_aux:
        return "return_aux=False (the aux outputs' derivatives need the recompute path)"
    return None


def resolve_strategy(strategy: str, unsupported: str | None, fits: bool) -> str:
    """The algorithm that runs: ``"min_memory"`` or ``"min_work"``. ``"auto"`` takes
    min_work where it is supported and ``fits`` (the memory rule), else min_memory; an
    explicit ``"min_work"`` that is not supported raises."""
    if strategy == "min_work" and unsupported is not None:
        raise ValueError(
            f"strategy='min_work' supports {unsupported}; use strategy='min_memory' (or "
            "'auto', which falls back to it)"
        )
    if strategy == "auto":
        return "min_work" if unsupported is None and fits else "min_memory"
    return strategy


def check_acc_dtype(acc_dtype: Any, kernel_dtype: Any, strategy: str) -> np.dtype | None:
    """``acc_dtype``: None, or the dtype of min_work's d-kernel accumulator (PyTorch's
    ``LinearCrossEntropyOptions.acc_dtype``): the kernel's float32/float64 compute dtype,
    or the kernel's own 16-bit dtype. None where it is the compute dtype (the default)."""
    if acc_dtype is None:
        return None
    kernel_dtype = np.dtype(kernel_dtype)
    wide = compute_dtype(kernel_dtype)
    allowed = (wide.name,) if kernel_dtype.itemsize >= 4 else (wide.name, kernel_dtype.name)
    expected = f"None or one of {allowed} for a {kernel_dtype.name} kernel"
    try:
        dtype = np.dtype(jnp.dtype(acc_dtype))
    except TypeError as e:
        raise TypeError(f"acc_dtype must be {expected}; got {acc_dtype!r}") from e
    if not is_float_dtype(dtype):
        raise TypeError(f"acc_dtype must be {expected}; got {dtype.name}")
    if dtype.name not in allowed:
        raise ValueError(
            f"acc_dtype must be {expected} (float32, float64 for float64 inputs, or a 16-bit "
            f"kernel's own dtype); got {dtype.name}"
        )
    if dtype == wide:
        return None
    if strategy == "min_memory":
        raise ValueError(
            f"acc_dtype={dtype.name} sets the d-kernel accumulator of strategy='min_work'; "
            "strategy='min_memory' holds no such accumulator (each d-kernel chunk is one "
            "matmul): pass strategy='min_work' or 'auto', or acc_dtype=None"
        )
    return dtype


def check_block_size(block_size: Any) -> int | None:
    """``block_size``: None or a positive int (token rows per block of min_work)."""
    if block_size is not None and (
        isinstance(block_size, bool)
        or not isinstance(block_size, numbers.Integral)
        or block_size < 1
    ):
        raise ValueError(f"block_size must be a positive int or None; got {block_size!r}")
    return None if block_size is None else int(block_size)
