"""XLA:GPU's spellings of jaxce's passes (CUDA; chosen at lowering, see ``__init__.py``).

Measured with jax/jaxlib 0.12.0.1 compiling deviceless for an H100 (``memory_analysis()``,
``value_and_grad`` of the mean, ``benchmarks/targets.py``); ``tests/test_budgets.py`` pins
the result.

* With ``logit_softcap``, the backward passes read a bfloat16 input through
  :func:`bits.upcast_shift`. With a plain convert, CSE merges it with the forward pass's
  convert of the same logits, and XLA:GPU then materialises a float32 copy of them
  ([8192, 131072] bf16: 4,104 MiB of temporaries; with the shift: 4 MiB). Not without a
  cap: there the plain convert fuses (4 MiB), and the shift would materialise logits cast
  to bfloat16 inside the same jit (+2,048 MiB).
* The fused loss's default chunk width, :func:`chunk_width` (below, with its measurement).
* The fused loss's forward chunk statistics in one pass over each chunk's logits,
  :func:`running_sums` (below, with its measurement), and likewise ``strategy="min_work"``'s
  per-block statistics, :func:`block_sums` (jax >= 0.12 only: ``_compat.ONE_PASS_JVP``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxce import _rows
from jaxce._backends import bits
from jaxce._backends.bits import index_dense_grad_shifted, prob_grads_shifted


def index_dense_grad(*args, cap, **kwargs):
    spelling = _rows.index_dense_grad if cap is None else index_dense_grad_shifted
    return spelling(*args, cap=cap, **kwargs)


def prob_grads(*args, cap, **kwargs):
    spelling = _rows.prob_grads if cap is None else prob_grads_shifted
    return spelling(*args, cap=cap, **kwargs)


# The fused loss's default chunk width (``jaxce._chunked.default_widths``; the portable
# rule elsewhere), for the reason given in xla_tpu.py (the d-hidden accumulator's traffic,
# 8 N D V / width bytes). Modelled time over the materialised loss's on an H100, portable
# -> this width (temporaries in MiB), ``python -m benchmarks.sweeps chunks``:
# 16384 x 4096 x 131072 bf16 (256 -> 1,024 columns) 3.11x -> 1.55x (266 -> 296);
# 8192 x 2048 x 131072 f32 (512 -> 1,024) 1.45x -> 1.38x (24 -> 40). Within the fused
# loss's budget of tests/test_budgets.py (bf16: 338 MiB; 2,048 columns would be 336).
# With running_sums (below) and the model's gather charge of 2026-12-08: 3.00x -> 1.458x
# and 1.37x -> 1.305x (2,048 columns: 1.346x at bf16, not taken: 99.4 % of the budget,
# and a width that does not divide the vocabulary holds more, 368 MiB at 1,536).
chunk_width = bits.wide_chunk


def running_sums(z, m, s):
    """``_chunked._running_sums`` in one pass over the chunk: a variadic reduction of
    ``(max, Σ exp)`` pairs, each combined as ``(max(a, b), s_a e^{a - m} + s_b e^{b - m})``,
    instead of the chunk's max and then its shifted sum (two reads of the float32 chunk).

    XLA:GPU fuses the chunk's matmul with neither reduction, so each reads the chunk's
    float32 logits from HBM. Modelled (``benchmarks/timemodel.py``, calibrated H100, jax
    0.12.0.1), ``value_and_grad`` of the mean of ``linear_cross_entropy(strategy=
    "min_memory")`` at 16384 x 4096 x 131072 bf16: 113.6 -> 109.8 ms (one 64 MiB read of
    each of the 128 chunks fewer), temporaries unchanged (296 MiB). The exponentials it
    adds (two per combine instead of one per logit) are not HBM traffic; the H100's
    special-function units run them in about half the time the read takes. XLA:TPU gains
    nothing from it (v6e 140.1 ms, v5p 191.8 ms either way, libtpu 0.0.52), so the TPU
    keeps the portable step.
    """
    ninf = jnp.array(-jnp.inf, z.dtype)

    def combine(a, b):
        (m_a, s_a), (m_b, s_b) = a, b
        top = jnp.maximum(m_a, m_b)
        shift = jnp.where(jnp.isneginf(top), jnp.zeros_like(top), top)
        return top, s_a * jnp.exp(m_a - shift) + s_b * jnp.exp(m_b - shift)

    # Each logit is the pair (z, 1), a masked (-inf) one (-inf, 0). Inside a chunk loop
    # spelled()'s derivative rule does not survive the loop's partial evaluation (see
    # _chunked._spelled_loop), so forward mode differentiates this reduction itself, with
    # lax.reduce's generic JVP through the combiner (jax >= 0.12: _compat.ONE_PASS_JVP).
    ones = (z > ninf).astype(z.dtype)
    chunk_m, chunk_s = lax.reduce((z, ones), (ninf, jnp.zeros((), z.dtype)), combine, (1,))
    return combine((m, s), (chunk_m, chunk_s))


def block_sums(z, *, axis_name):
    """``_token_blocks._block_sums`` from one pass over the block (:func:`running_sums`):
    the local max and the sum shifted by it, then, over ``axis_name``, the global max and
    the local sum rescaled to it (``s e^{m_local - m}``).

    Modelled (``benchmarks/timemodel.py``, calibrated H100, jax 0.12.0.1), ``value_and_grad``
    of the mean of ``linear_cross_entropy(strategy="min_work")`` at 16384 x 4096 x 131072
    bf16, default 1,024-row blocks: 86.9 -> 83.5 ms (1.155x -> 1.109x the materialised
    loss); with ``acc_dtype=jnp.bfloat16`` 79.2 -> 75.7 ms (1.052x -> 1.006x);
    temporaries unchanged (2,313 / 777 MiB).
    """
    n = z.shape[0]
    lowest = jnp.full((n,), -jnp.inf, z.dtype)
    local_m, local_s = running_sums(z, lowest, jnp.zeros((n,), z.dtype))
    shift = _rows.row_shift(local_m if axis_name is None else lax.pmax(local_m, axis_name), None)
    if axis_name is not None:  # a device whose columns are all masked has local_s = 0
        local_s = local_s * jnp.exp(local_m - shift)
    return shift, local_s
