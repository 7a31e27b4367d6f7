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
"""

from __future__ import annotations

from jaxce import _rows
from jaxce._backends.bits import index_dense_grad_shifted, prob_grads_shifted


def index_dense_grad(*args, cap, **kwargs):
    spelling = _rows.index_dense_grad if cap is None else index_dense_grad_shifted
    return spelling(*args, cap=cap, **kwargs)


def prob_grads(*args, cap, **kwargs):
    spelling = _rows.prob_grads if cap is None else prob_grads_shifted
    return spelling(*args, cap=cap, **kwargs)
