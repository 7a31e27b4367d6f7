"""Implementations: the portable spelling of each pass, and the backends' own spellings.

jaxce's math is written once, portably, in ``jaxce/_rows.py`` (and the chunk loop in
``jaxce/_chunked.py``); that is what TPUs and GPUs run, the ``"xla"`` implementation.
Where one compiler needs the same values spelled differently to keep its temporaries
small or its passes fast, the pass is wrapped in :func:`spelled`, and the backend's
spelling lives in this package, one module per backend, with the measurement that
justifies it and the XLA version it was measured on, so it can be deleted when XLA
changes (its budget test in ``tests/test_budgets.py`` then still passes).

The ``implementation`` option of the public entry points (``Options.implementation``)
picks one:

* ``None`` (default): the choice is made when the program is lowered, for the platform it
  is compiled for (AOT and cross-compilation included; not ``jax.default_backend()``),
  with ``jax.lax.platform_dependent``: ``"xla_cpu"`` on CPUs, ``"xla_gpu"`` on CUDA GPUs,
  ``"xla_tpu"`` on TPUs, ``"xla"`` everywhere else.
  The compiler sees only the chosen spelling.
* ``"xla"``: the portable spelling, on every platform.
* ``"xla_cpu"`` / ``"xla_gpu"`` / ``"xla_tpu"``: that backend's spelling of the passes it
  respells (the portable one for the others), on whatever platform the program is
  compiled for. The values are the same on every platform (every spelling is plain JAX);
  only memory and speed are tuned for, and measured on, the named compiler. This is also
  how CI executes the GPU's and the TPU's spellings on a CPU. A name stays valid when its
  backend stops respelling a pass: it then means the portable pass.
* ``"pallas_tpu"`` (opt-in, never the automatic choice): ``"xla_tpu"``, with a Pallas
  (Mosaic) kernel for the passes that have one (``pallas_tpu.py``: the fused loss's
  backward chunk step, for the options it lists). Off a TPU the kernel runs in Pallas's
  interpret mode (how CI executes it); its values agree with the portable pass's up to
  the order of the sums.

Why users may name a platform's spelling (not only a private test hook): it is safe, as
every spelling computes the same values with the same (portable) derivatives on every
platform, and it is useful, as it reproduces on one machine the exact program another
platform runs (a GPU run's numerics on a CPU, say). Only the automatic choice is tuned.

Derivatives are always the portable spelling's: each chosen spelling is a
``jax.custom_jvp`` whose rule differentiates the portable function (forward mode, and
through it reverse mode and every higher order), so a spelling needs no derivative of its
own and every implementation has identical derivative programs. One exception: inside
the fused loss's chunk and block loops the rule does not survive the loop's partial
evaluation (``_chunked._spelled_loop``), so forward mode there differentiates the spelling
itself. Those spellings are plain differentiable JAX of the same math (dots, layout
identities, and XLA:GPU's one-pass row statistics, whose variadic reduction JAX
differentiates through its combiner; ``tests/test_implementations.py`` checks their
Hessian-vector products against float64).

The passes a backend may respell (same arguments, same values, same output structure),
the one list; each backend module says why, with its measurement:

===================================  =======================================  ================
pass (portable)                      what it computes                         respelled by
===================================  =======================================  ================
``_rows.index_row_stats``            max, lse, target logit, smoothing sum    xla_cpu
``_rows.index_dense_grad``           the dense logit gradient (index targets) xla_cpu, xla_gpu
``_rows.prob_row_stats``             lse and loss of probability targets      xla_cpu
``_rows.prob_grads``                 all cotangents of probability targets    xla_cpu, xla_gpu
``_chunked._add_hidden_grad``        a chunk's ``dh += dz @ k.T``             xla_cpu
``_chunked._kernel_grad``            a chunk's ``hidden.T @ dz``              xla_cpu
``_chunked._hold``                   the chunk loop's pinned arrays, each     xla_cpu, xla_tpu
                                     iteration (portable: unchanged)
``_chunked._settle``                 the chunk loop's carry after the loop    xla_cpu, xla_tpu
                                     (portable: unchanged)
``_chunked._lay_out``                 a chunk's logits (portable: unchanged)   xla_tpu
``_token_blocks.add_kernel_grad``    min_work's ``dk += h.T @ dz`` per block  xla_cpu
``_token_blocks._block_sums``        min_work's row max and shifted sum of    xla_gpu
                                     exponentials per block
``_chunked._running_sums``           a forward chunk's running max and        xla_gpu
                                     shifted sum of exponentials
``_chunked._target_logit``           a forward chunk's target logit           xla_tpu
``_chunked.vocab_loop``'s width      the fused loss's default chunk width     xla_gpu, xla_tpu
                                     (``chunk_width``; not ``chunk_size=``)
``_chunked.grad_step``               a backward chunk's logits, ``dz``, and   pallas_tpu
                                     its ``dh``/``dk``/``db`` updates
===================================  =======================================  ================

No other compiler workaround sits in the portable modules except ``_rows.pick_class``'s
masked sum, which is the portable spelling on its own merits (a TPU measurement, in its
docstring; XLA:CPU spells it as a gather in its ``index_row_stats``).

A Pallas kernel plugs in the same way: a further implementation name, its spelling given
to :func:`spelled`, and the portable derivatives. The ``pallas_tpu`` kernel does not take
every option: its caller (``_fused._transpose``) routes only the cases it covers to it
(``pallas_tpu.covers`` and the options listed there) and runs the ``xla_tpu`` passes for
the rest, in the same program, so naming ``pallas_tpu`` never changes what is computed.

Why public API and not a primitive: up to jaxce 0.2 this was a custom primitive (impl,
JVP, transpose, batching and per-platform lowerings on ``jax.interpreters``). A
``platform_dependent`` inside a ``custom_jvp`` does the same with public JAX: the XLA:CPU
temporaries pinned in ``tests/test_budgets.py`` and the residuals in
``tests/test_memory.py`` are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# The implementation names users may pass (None: automatic, see the module doc).
IMPLEMENTATIONS = ("xla", "xla_cpu", "xla_gpu", "xla_tpu", "pallas_tpu")

# The platforms on which the automatic choice (None) takes each backend's spelling.
AUTOMATIC = {"xla_cpu": ("cpu",), "xla_gpu": ("cuda",), "xla_tpu": ("tpu",)}

# Opt-in implementations (never the automatic choice): each names the implementation whose
# spelling it takes for the passes it does not spell itself.
FALLBACK = {"pallas_tpu": "xla_tpu"}


def check_implementation(implementation: Any) -> str | None:
    """``implementation`` if it names one; None resolved to :func:`default_implementation`'s
    name (None outside it); anything else a ValueError naming the supported ones."""
    if implementation is None:
        return _DEFAULT[0]
    if isinstance(implementation, str) and implementation in IMPLEMENTATIONS:
        return implementation
    names = ", ".join(map(repr, IMPLEMENTATIONS))
    raise ValueError(
        f"implementation must be None (automatic) or one of {names}; got {implementation!r}"
    )


_DEFAULT: list[str | None] = [None]


@contextlib.contextmanager
def default_implementation(implementation: str | None) -> Iterator[None]:
    """Test hook: entry points called inside the context with ``implementation=None``
    use ``implementation`` instead (so a whole test grid, such as the parity harness's,
    runs on one spelling). Read when an entry point is called, outside ``jax.jit``: the
    choice is part of the options, so compiled programs are never reused across it."""
    previous = _DEFAULT[0]
    _DEFAULT[0] = check_implementation(implementation)
    try:
        yield
    finally:
        _DEFAULT[0] = previous


def spelled(
    portable: Callable,
    static: dict[str, Any],
    implementation: str | None,
    **spellings: Callable | None,
) -> Callable:
    """``portable`` (given the keyword arguments ``static``), computed by the spelling of
    ``implementation`` (see the module doc).

    ``spellings``: implementation name -> that backend's spelling of the pass (None, or
    left out: the backend uses ``portable``). Each takes ``portable``'s arguments (pytrees
    of arrays, Python numbers, None) and returns equal values of identical structure,
    shapes and dtypes. Derivatives, of every spelling, are those of ``portable``.
    """
    unknown = set(spellings) - set(AUTOMATIC) - set(FALLBACK)
    if unknown:
        known = [*AUTOMATIC, *FALLBACK]
        raise ValueError(f"unknown spellings {sorted(unknown)}; expected some of {known}")
    default = partial(portable, **static)
    chosen = {name: partial(f, **static) for name, f in spellings.items() if f is not None}
    spelling = choose(implementation, default, chosen)
    return default if spelling is default else _portable_derivatives(spelling, default)


def choose(implementation: str | None, default: Callable, chosen: dict[str, Callable]) -> Callable:
    """What computes under ``implementation``: ``chosen[implementation]`` when it is
    there, else ``default``; for None, each platform's (``AUTOMATIC``) pick, made when
    the program is lowered with ``jax.lax.platform_dependent`` (the compiler sees only
    the chosen function). ``chosen``: implementation name -> a function taking
    ``default``'s arguments and returning values of identical structure, shapes and
    dtypes. Derivatives are each function's own (:func:`spelled` makes them portable)."""
    if implementation == "xla" or not chosen:
        return default
    if implementation is not None:
        while implementation not in chosen and implementation in FALLBACK:
            implementation = FALLBACK[implementation]
        return chosen.get(implementation, default)
    per_platform = {
        p: f for name, f in chosen.items() if name in AUTOMATIC for p in AUTOMATIC[name]
    }

    def by_platform(*args):
        return lax.platform_dependent(*args, default=default, **per_platform)

    return by_platform


def _portable_derivatives(spelling: Callable, portable: Callable) -> Callable:
    """``spelling``, differentiated (in every mode and order) as ``portable``."""

    @jax.custom_jvp
    def call(*args):
        return spelling(*args)

    @call.defjvp
    def _jvp(primals, tangents):
        _, out_tangents = jax.jvp(portable, primals, tangents)
        return call(*primals), out_tangents

    def wrapped(*args):
        # Python numbers (an IndexGradRows' ``keep = 1``) as arrays: custom_jvp arguments.
        leaves, tree = jax.tree.flatten(args)
        return call(*jax.tree.unflatten(tree, [jnp.asarray(v) for v in leaves]))

    return wrapped
