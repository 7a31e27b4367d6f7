"""Derivatives: a linear map with a hand-written transpose that stays differentiable.

Why: ``jax.custom_vjp`` gives the lean backward passes but refuses forward mode
(``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``). So each loss is a ``jax.custom_jvp``
whose tangent is :func:`linear_map` ``(fun, fun_t, res, lin)``: ``fun(res, lin)`` is linear
in ``lin`` (the tangent computation, used by forward mode), ``fun_t(res, ct)`` is its
transpose (the memory-lean backward pass, used by reverse mode in place of autodiff's
transpose). ``jax.custom_derivatives.linear_call`` does the same but refuses derivatives
with respect to ``res``, which second-order differentiation needs; here they are the
autodiff derivatives of ``fun`` (or ``fun_t``) in ``res``, so ``jax.hessian``,
``jax.grad(jax.grad(...))`` and Hessian-vector products work, and so does ``jax.vmap``.

Rules of the primitive (``res`` and ``lin`` are flat tuples of arrays):

* evaluation / lowering: ``fun(res, lin)``, inlined into the surrounding program;
* JVP: ``P(res; dlin) + ∂_res fun(res, lin)·dres`` (the first term is the primitive again);
* transpose in ``lin``: the primitive with ``fun`` and ``fun_t`` swapped, so transposing
  twice gives back ``fun``;
* batching: the primitive with ``jax.vmap``-ed functions (the transpose sums over the
  batch for a ``lin`` input that was not batched).

Under reverse mode the residuals saved for the backward pass are exactly ``res``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.extend.core import Primitive

# The one use of jax.interpreters in jaxce/; why public API cannot do this instead:
# tests/test_higher_order.py, test_linear_map_does_what_public_api_cannot.
from jax.interpreters import ad, batching, mlir

from jaxce._compat import cast_varying, varying_axes

Flat = tuple[Any, ...]
FlatFn = Callable[[Flat, Flat], Flat]


def linear_map(
    fun: FlatFn, fun_t: FlatFn, res: Sequence[Any], lin: Sequence[Any], *, sums: bool = False
) -> Flat:
    """``fun(res, lin)``, linear in ``lin``, with transpose ``fun_t(res, ct)``.

    ``res``/``lin`` are flat sequences of arrays; both functions take and return tuples.
    ``fun_t`` must return one array per ``lin`` entry, of that entry's shape and dtype.

    Inside ``shard_map``, every ``res`` entry is first made to vary over all the mesh axes
    that any input varies over. ``sums=False``: so is every ``lin`` entry (with JAX's own
    cast, whose transpose sums over the added axes), so ``fun_t`` returns cotangents of
    that common type and JAX sums each one over the axes its input is replicated over,
    whole, after ``fun_t``. ``sums=True``: the ``lin`` entries keep their own types and
    ``fun_t`` returns cotangents of exactly those types, summing over those axes itself
    (so it can sum as it goes, a slice at a time, instead of holding a whole partial).
    """
    res, lin = tuple(res), tuple(lin)
    # Inside shard_map, give the inputs the same varying mesh axes first: the hand-written
    # transpose then returns cotangents of the inputs' exact types, and an input that is
    # replicated over an axis receives the sum of the per-device cotangents.
    axes = frozenset().union(*(varying_axes(v) for v in (*res, *lin)))
    if axes:
        res = tuple(cast_varying(v, axes) for v in res)
        if not sums:
            lin = tuple(cast_varying(v, axes) for v in lin)
    out_avals = tuple(jax.make_jaxpr(fun)(res, lin).out_avals)
    params = dict(fun=fun, fun_t=fun_t, num_res=len(res), out_avals=out_avals, sums=sums)
    return tuple(_linear_map_p.bind(*res, *lin, **params))


def _split(args, num_res):
    return tuple(args[:num_res]), tuple(args[num_res:])


def _impl(*args, fun, fun_t, num_res, out_avals, sums):
    del fun_t, out_avals, sums
    res, lin = _split(args, num_res)
    return list(fun(res, lin))


def _abstract_eval(*args, fun, fun_t, num_res, out_avals, sums):
    del args, fun, fun_t, num_res, sums
    return list(out_avals)


def _jvp(primals, tangents, *, fun, fun_t, num_res, out_avals, sums):
    res, lin = _split(primals, num_res)
    dres, dlin = _split(tangents, num_res)
    params = dict(fun=fun, fun_t=fun_t, num_res=num_res, out_avals=out_avals, sums=sums)
    out = _linear_map_p.bind(*res, *lin, **params)
    t_out = None
    if any(type(t) is not ad.Zero for t in dlin):
        dlin = [ad.instantiate_zeros(t) for t in dlin]
        t_out = list(_linear_map_p.bind(*res, *dlin, **params))
    if any(type(t) is not ad.Zero for t in dres):
        # Derivative through the residuals: plain autodiff of ``fun`` (second order).
        idx = [i for i, t in enumerate(dres) if type(t) is not ad.Zero]

        def of_res(*moving):
            full = list(res)
            for i, v in zip(idx, moving, strict=True):
                full[i] = v
            return tuple(fun(tuple(full), lin))

        _, t_res = jax.jvp(of_res, tuple(res[i] for i in idx), tuple(dres[i] for i in idx))
        t_out = list(t_res) if t_out is None else [a + b for a, b in zip(t_out, t_res, strict=True)]
    if t_out is None:  # not reached: JAX calls a JVP rule only with some nonzero tangent
        t_out = [jnp.zeros_like(o) for o in out]
    return out, t_out


def _transpose(cts, *args, fun, fun_t, num_res, out_avals, sums):
    del out_avals
    res, lin = _split(args, num_res)
    if any(ad.is_undefined_primal(r) for r in res):
        raise NotImplementedError("linear_map is not linear in its residual arguments")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    lin_avals = tuple(x.aval if ad.is_undefined_primal(x) else jax.typeof(x) for x in lin)
    params = dict(fun=fun_t, fun_t=fun, num_res=num_res, out_avals=lin_avals, sums=sums)
    out = _linear_map_p.bind(*res, *cts, **params)
    grads = [o if ad.is_undefined_primal(x) else None for o, x in zip(out, lin, strict=True)]
    return [None] * num_res + grads


def _batch(args, dims, *, fun, fun_t, num_res, out_avals, sums):
    del out_avals
    args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
    dims = [None if d is None else 0 for d in dims]
    res_dims, lin_dims = _split(dims, num_res)
    res, lin = _split(args, num_res)

    def batched(f):
        return lambda r, x: tuple(jax.vmap(f, in_axes=(res_dims, lin_dims))(r, x))

    def vfun_t(r, ct):
        out = jax.vmap(fun_t, in_axes=(res_dims, 0))(r, ct)
        # An unbatched linear input receives the sum over the batch.
        return tuple(
            o if d == 0 else jnp.sum(o, axis=0) for o, d in zip(out, lin_dims, strict=True)
        )

    out = linear_map(batched(fun), vfun_t, res, lin, sums=sums)
    return list(out), [0] * len(out)


_linear_map_p = Primitive("jaxce_linear_map")
_linear_map_p.multiple_results = True
_linear_map_p.def_impl(_impl)
_linear_map_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_linear_map_p] = _jvp
ad.primitive_transposes[_linear_map_p] = _transpose
batching.primitive_batchers[_linear_map_p] = _batch
mlir.register_lowering(_linear_map_p, mlir.lower_fun(_impl, multiple_results=True))


def is_present(tangent: Any) -> bool:
    """Whether a ``custom_jvp`` tangent (with ``symbolic_zeros``) is a real array: not
    None and not a symbolic zero."""
    return tangent is not None and not isinstance(tangent, SymbolicZero)


def lean_tangent(tangent_fn, transpose_fn, res, tangents, like, *, sums=False):
    """The loss tangent ``tangent_fn(res, tangents)``, whose transpose (used by reverse
    mode) is the hand-written backward pass ``transpose_fn(res, ct)``.

    ``tangents`` has one entry per differentiable input (None, a symbolic zero, or an
    array); ``tangent_fn`` receives None for the absent ones, and ``transpose_fn`` returns
    a cotangent for each input (None where not computed), of which only those with a
    tangent are kept. ``like``: the primal output, or a tuple of outputs (then
    ``tangent_fn`` returns, and ``transpose_fn`` receives, a tuple). ``sums``: as in
    :func:`linear_map` (``transpose_fn`` sums each cotangent over the ``shard_map`` axes
    its input is replicated over).
    """
    multi = isinstance(like, tuple)
    present = tuple(map(is_present, tangents))
    if not any(present):
        return tuple(map(jnp.zeros_like, like)) if multi else jnp.zeros_like(like)
    leaves, tree = jax.tree.flatten(res)
    lin = tuple(t for t, p in zip(tangents, present, strict=True) if p)

    def fun(leaves, lin):
        it = iter(lin)
        full = tuple(next(it) if p else None for p in present)
        out = tangent_fn(jax.tree.unflatten(tree, leaves), full)
        return tuple(out) if multi else (out,)

    def fun_t(leaves, cts):
        out = transpose_fn(jax.tree.unflatten(tree, leaves), tuple(cts) if multi else cts[0])
        return tuple(o for o, p in zip(out, present, strict=True) if p)

    out = linear_map(fun, fun_t, leaves, lin, sums=sums)
    return out if multi else out[0]


def lean_jvp_rule(fwd, tangent_fn, transpose_fn):
    """The ``custom_jvp`` rule ``(opts, primals, tangents)`` of a loss core.

    ``fwd(*primals, opts)`` returns ``(out, res)``: ``out`` is the loss, or with
    ``opts.stats`` ``(loss, lse, argmax)``; ``tangent_fn(opts, res, tangents)`` is the
    tangent of ``out`` (its first two parts with ``opts.stats``) and
    ``transpose_fn(opts, res, ct)`` its hand-written transpose (:func:`lean_tangent`).
    The integer argmax gets the zero (float0) tangent.
    """

    def rule(opts, primals, tangents):
        out, res = fwd(*primals, opts)
        tangent = lean_tangent(
            partial(tangent_fn, opts),
            partial(transpose_fn, opts),
            res,
            tangents,
            out[:2] if opts.stats else out,
        )
        return out, ((*tangent, no_tangent(out[2])) if opts.stats else tangent)

    return rule


def no_tangent(x: Any) -> Any:
    """The (float0) zero tangent of an integer or boolean output."""
    return np.zeros(x.shape, jax.dtypes.float0)
