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
"""

from __future__ import annotations

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
chunk_width = bits.wide_chunk
