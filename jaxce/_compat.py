"""Spellings that differ between the JAX versions jaxce supports (0.7.2 ... 0.12).

Each entry names the versions it serves, so it can go when the oldest supported JAX
(``pyproject.toml``'s ``jax>=`` bound, tested in CI) moves past them.
"""

from __future__ import annotations

from typing import Any

import jax


def varying_axes(x: Any) -> frozenset:
    """The ``shard_map`` mesh axes over which ``x`` varies (empty outside shard_map).

    jax >= 0.10: ``aval.manual_axis_type.varying``; jax 0.7 - 0.9: ``aval.vma``.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def cast_varying(x: Any, axes: frozenset) -> Any:
    """``x`` made to vary over ``axes`` too, with JAX's own cast (whose transpose sums
    over the added axes).

    jax >= 0.9: ``lax.pcast(x, axes, to="varying")``; jax 0.7 - 0.8: ``lax.pvary(x, axes)``
    (removed in 0.10).
    """
    missing = tuple(sorted(axes - varying_axes(x)))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)


def row_major(x: Any) -> Any:
    """``x`` held in XLA's default (row-major) layout: a layout constraint, the values
    unchanged.

    jax >= 0.7: ``jax.experimental.layout.with_layout_constraint`` with
    ``Layout(major_to_minor=(0, 1, ...))``; without it, ``x`` as it is (the constraint only
    steers the compiler's layout assignment).
    """
    try:
        from jax.experimental.layout import Layout, with_layout_constraint
    except ImportError:
        return x
    return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


def struct_like(x: Any, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    """A ``jax.ShapeDtypeStruct`` of ``shape`` and ``dtype`` varying over the ``shard_map``
    mesh axes ``x`` varies over (a ``pallas_call``'s ``out_shape`` inside ``shard_map``).

    jax >= 0.10: ``manual_axis_type=aval.manual_axis_type``; jax 0.7 - 0.9:
    ``vma=aval.vma``.
    """
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
    vma = getattr(aval, "vma", None)
    if vma:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)
    return jax.ShapeDtypeStruct(shape, dtype)


# jax >= 0.12: lax.reduce's generic JVP (a variadic reduction with a user combiner, as
# _backends/xla_gpu.py's one-pass row statistics) takes a symbolic-zero tangent and, inside
# shard_map, operands varying over mesh axes. jax 0.10.2 raises on both (a reshape of a
# symbolic Zero; "eq requires varying manual axes to match" from the combiner's constant),
# so there XLA:GPU keeps the portable two-pass statistics.
ONE_PASS_JVP = jax.__version_info__ >= (0, 12)
