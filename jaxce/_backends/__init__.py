"""Backend spellings, chosen when the program is lowered for a platform.

jaxce's math is written once, portably, in ``jaxce/_rows.py`` (and the chunk loop in
``jaxce/_chunked.py``); that is what TPUs and GPUs run. Where one backend's compiler needs
the same values spelled differently to keep its temporaries small or its passes fast, the
step is wrapped in :func:`by_platform`: the jaxpr holds one primitive, lowered with the
portable function by default and with the platform's own spelling on that platform, and
differentiated (forward mode, second order) as the portable function, so a spelling
needs no derivative of its own. Each spelling lives in this package, one module per
backend (``xla_cpu.py``), with the measurement that justifies it and the XLA version it
was measured on, so it can be deleted when XLA changes.

A Pallas kernel for a pass (the row statistics, the logit gradient, a chunk step) would
plug in the same way: ``by_platform(portable, tpu=kernel)``, keeping the portable
derivatives.

Not ``jax.default_backend()``: the platform is the one the program is compiled for (AOT
and cross-compilation included), known only at lowering.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def by_platform(default: Callable, **spellings: Callable | None) -> Callable:
    """``default``, computed on a platform named in ``spellings`` by that spelling.

    ``default`` and each spelling take the same arguments (pytrees of arrays; close over
    static values) and return equal values of identical shapes and dtypes. Derivatives,
    on every platform, are those of ``default``.
    """
    unknown = set(spellings) - set(PLATFORMS)
    if unknown:
        raise ValueError(f"unknown platforms {sorted(unknown)}; expected some of {PLATFORMS}")
    chosen = tuple((p, f) for p, f in spellings.items() if f is not None)
    if not chosen:
        return default

    def call(*args: Any) -> Any:
        leaves, in_tree = jax.tree.flatten(args)
        leaves = [jnp.asarray(v) for v in leaves]  # Python numbers too
        flat_default, out_tree = _flat(default, in_tree)
        spelled = tuple((p, _flat(f, in_tree)[0]) for p, f in chosen)
        out = _bind(leaves, flat_default, spelled)
        return jax.tree.unflatten(out_tree(), out)

    return call


def spelled(portable: Callable, static: dict[str, Any], **spellings: Callable | None) -> Callable:
    """:func:`by_platform` of ``portable`` and the ``spellings``, each given the keyword
    arguments ``static`` (options that are not arrays)."""
    return by_platform(
        partial(portable, **static),
        **{p: None if f is None else partial(f, **static) for p, f in spellings.items()},
    )


def _bind(args, default, spellings):
    # The output types come from tracing ``default`` on the arguments themselves, so that
    # inside shard_map they carry the arguments' varying mesh axes.
    out_avals = tuple(jax.make_jaxpr(default)(*args).out_avals)
    return _spelled_p.bind(*args, default=default, spellings=spellings, out_avals=out_avals)


def _flat(fn: Callable, in_tree: Any) -> tuple[Callable, Callable]:
    """``fn`` on flat leaves returning flat leaves, and a thunk giving its output tree
    (known once it has run)."""
    store = {}

    def flat(*leaves):
        out = fn(*jax.tree.unflatten(in_tree, leaves))
        leaves_out, store["tree"] = jax.tree.flatten(out)
        return leaves_out

    return flat, lambda: store["tree"]


def _abstract_eval(*avals, default, spellings, out_avals):
    del avals, default, spellings
    return list(out_avals)


def _impl(*args, default, spellings, out_avals):
    del spellings, out_avals
    return default(*args)


def _lowering_for(platform):
    def impl(*args, default, spellings, out_avals):
        del out_avals
        return dict(spellings).get(platform, default)(*args)

    return mlir.lower_fun(impl, multiple_results=True)


def _jvp(primals, tangents, *, default, spellings, out_avals):
    out = _spelled_p.bind(*primals, default=default, spellings=spellings, out_avals=out_avals)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, t_out = jax.jvp(lambda *a: tuple(default(*a)), tuple(primals), tuple(tangents))
    return out, list(t_out)


def _transpose(cts, *args, default, spellings, out_avals):
    del spellings, out_avals  # only linear uses are transposed, through the portable function
    avals = [a.aval if ad.is_undefined_primal(a) else jax.typeof(a) for a in args]
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    lin = [i for i, a in enumerate(args) if ad.is_undefined_primal(a)]

    def of_lin(*moving):
        full = list(args)
        for i, v in zip(lin, moving, strict=True):
            full[i] = v
        return tuple(default(*full))

    cts = tuple(ad.instantiate_zeros(ct) for ct in cts)
    grads = jax.linear_transpose(of_lin, *(specs[i] for i in lin))(cts)
    out = [None] * len(args)
    for i, g in zip(lin, grads, strict=True):
        out[i] = g
    return out


def _batch(args, dims, *, default, spellings, out_avals):
    del out_avals
    axes = tuple(dims)

    def batched(f):
        return lambda *a: list(jax.vmap(lambda *b: tuple(f(*b)), in_axes=axes)(*a))

    out = _bind(args, batched(default), tuple((p, batched(f)) for p, f in spellings))
    return out, [0] * len(out)


_spelled_p = Primitive("jaxce_by_platform")
_spelled_p.multiple_results = True
_spelled_p.def_impl(_impl)
_spelled_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_spelled_p] = _jvp
ad.primitive_transposes[_spelled_p] = _transpose
batching.primitive_batchers[_spelled_p] = _batch
mlir.register_lowering(_spelled_p, mlir.lower_fun(_impl, multiple_results=True))
for _platform in PLATFORMS:
    mlir.register_lowering(_spelled_p, _lowering_for(_platform), platform=_platform)
