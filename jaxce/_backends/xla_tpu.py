"""The TPU compiler's spellings of jaxce's passes (chosen at lowering, see ``__init__.py``).

Measured with jax/jaxlib 0.12.0.1 and libtpu 0.0.52 compiling deviceless for TPU v5e, v5p
and v6e (``memory_analysis()``, ``value_and_grad`` of the mean of
``linear_cross_entropy`` w.r.t. hidden and kernel, ``benchmarks/targets.py``);
``tests/test_budgets.py`` pins the result.

* The fused loss's chunk loop (``jaxce._chunked.chunk_loop``): :func:`hold` and
  :func:`settle`. The TPU compiler feeds float32 matmuls bfloat16 operands (default
  precision) and converts a loop-invariant operand once, before the loop: a bfloat16 copy
  of the whole kernel and ``hidden``, even when they travel in the loop's carry. At 8192 x
  2048 x 131072 float32 that is 544 MiB more temporaries. An optimization barrier on each
  pinned array every iteration and an exact zero computed from each after the loop keep
  them float32 to the end, and each is needed: temporaries in MiB with both / without the
  barrier / without the zero / neither (the portable loop): v5e 65 / 625 / 625 / 625, v5p
  81 / 625 / 577 / 577, v6e 1,105 / 1,649 / 1,649 / 1,649. At 16384 x 4096 x 131072
  bfloat16 neither changes anything.
"""

from __future__ import annotations

from jaxce._backends import bits

hold = bits.hold
settle = bits.settle
