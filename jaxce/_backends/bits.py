"""Spellings shared by several backends: exact upcasts spelled with integer instructions,
the chunk loop's hold on its pinned arrays (:func:`hold`, :func:`settle`), and the
accelerators' default chunk width (:func:`wide_chunk`).

``x.astype(float32)`` of a bfloat16 array, written as the bit pattern moved into the high
half of a float32 (bfloat16 is float32's top 16 bits): the same values, but a different
instruction. XLA's common-subexpression elimination merges identical upcasts of one
input across passes; where the merged upcast then feeds fusions that cannot share it,
XLA materialises a float32 copy of the logits. A pass that reads its input through its
own spelling keeps its upcast to itself.

:func:`index_dense_grad_shifted` and :func:`prob_grads_shifted` are the portable passes of
``jaxce/_rows.py`` fed such upcasts of their dense inputs and rounded back to the inputs'
dtypes: the portable pass's own ``astype`` is then a no-op, so the program is the portable
one with only the upcast respelled (and ``_rows.py`` needs no hook for it).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _rows
from jaxce._compat import varying_axes


def _bits_to_f32(x: Any, spelling: str) -> Any:
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    if spelling == "shift":
        bits = bits.astype(jnp.uint32) << 16
    else:
        bits = bits.astype(jnp.int32) * jnp.int32(65536)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _upcast_bits(x: Any, dtype: Any, spelling: str) -> Any:
    if x.dtype != jnp.bfloat16 or dtype != jnp.float32:
        return x.astype(dtype)
    return _bits_to_f32(x, spelling)


def upcast_shift(x: Any, dtype: Any) -> Any:
    """``x.astype(dtype)``, spelled as a bit shift for bfloat16 to float32."""
    return _upcast_bits(x, dtype, "shift")


def upcast_mul(x: Any, dtype: Any) -> Any:
    """``x.astype(dtype)``, spelled as an integer multiply for bfloat16 to float32."""
    return _upcast_bits(x, dtype, "mul")


def index_dense_grad_shifted(x: Any, *args: Any, dtype: Any, **static: Any) -> Any:
    """:func:`jaxce._rows.index_dense_grad` reading ``x`` through :func:`upcast_shift`."""
    dx = _rows.index_dense_grad(upcast_shift(x, dtype), *args, dtype=dtype, **static)
    return dx.astype(x.dtype)


def prob_grads_shifted(x: Any, target: Any, *args: Any, dtype: Any, **static: Any) -> Any:
    """:func:`jaxce._rows.prob_grads` reading ``x`` and ``target`` through
    :func:`upcast_shift`."""
    read = (upcast_shift(x, dtype), upcast_shift(target, dtype))
    dx, dt, dweight, deps = _rows.prob_grads(*read, *args, dtype=dtype, **static)
    return dx.astype(x.dtype), dt.astype(target.dtype), dweight, deps


def hold(held: tuple[Any, ...]) -> tuple[Any, ...]:
    """The chunk loop's pinned arrays (``jaxce._chunked._hold``), each through its own
    optimization barrier (an alias, no copy), so that XLA sees no loop-invariant operand
    whose conversion it could move before the loop. One barrier per array: inside
    ``shard_map`` a joint one would make each output vary over the mesh axes of all."""
    return tuple(None if a is None else lax.optimization_barrier(a) for a in held)


def settle(carry: Any, held: tuple[Any, ...]) -> Any:
    """``jaxce._chunked._settle``: the carry, with an exact zero computed from each held
    array added to its smallest floating array: a use of each pinned array, in its own
    dtype, after the loop, which no compiler folds away.

    Inside ``shard_map`` only an array that already varies over the zero's mesh axes may
    take it (the portable spelling's carry must keep its type): with none, the carry is
    returned as it is."""
    zero = sum(_exact_zero(a) for a in held if a is not None)
    leaves, treedef = jax.tree.flatten(carry)
    axes = varying_axes(zero)
    floats = [
        i
        for i, leaf in enumerate(leaves)
        if jnp.issubdtype(leaf.dtype, jnp.floating) and axes <= varying_axes(leaf)
    ]
    if not floats:
        return carry
    i = min(floats, key=lambda i: leaves[i].size)
    leaves[i] = leaves[i] + jnp.asarray(zero).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, leaves)


def _exact_zero(a: Any) -> Any:
    """0, computed from ``a``: ``0 * a[0, ...]`` (0 for a non-finite entry)."""
    e = a[(0,) * a.ndim].astype(jnp.float32)
    return 0 * jnp.where(jnp.isfinite(e), e, jnp.zeros_like(e))


def wide_chunk(num_tokens: int, vocab: int) -> int:
    """An accelerator's default chunk width for the fused loss (``xla_gpu``, ``xla_tpu``:
    their measurements): about 64 MiB of float32 logits per chunk, at most 2,048 columns
    (the chips need no more to hide the d-hidden accumulator's traffic) and 1/128 of the
    vocabulary (so that a chunk's blocks stay within 2 % of the unfused loss's
    temporaries, the fused loss's budget), a multiple of 128 and at least 256 columns.
    ``jaxce._chunked.default_widths`` never takes it below the portable width."""
    width = min(64 * 2**20 // (4 * max(num_tokens, 1)), 2048, vocab // 128)
    return max(256, width // 128 * 128)
