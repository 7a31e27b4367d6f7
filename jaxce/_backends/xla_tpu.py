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
* The fused loss's chunk of logits, :func:`lay_out`: held row-major (a layout constraint).
  With class-probability targets the TPU compiler lays the float32 logits chunk out
  tokens-minor and, to multiply it with the probabilities' chunk, copies the whole
  row-major ``[N, V]`` probabilities to that layout once, before the loop: their own size
  again. value_and_grad of the mean (index targets unchanged), temporaries in MiB and
  modelled ms (``benchmarks/timemodel.py``), without -> with, 16384 x 4096 x 131072 bf16:
  v5e 4,160 -> 320 (437 -> 426 ms), v5p 4,225 -> 321 (189 -> 186), v6e 4,416 -> 320
  (140 -> 132); 8192 x 2048 x 131072 f32: v5e 4,192 -> 96 (125 -> 114), v5p 4,192 -> 96
  (54 -> 51), v6e 4,192 -> 97 (44 -> 38). Constraining the probabilities' chunk instead
  saves the same memory but costs 1–12 % of the time (a transpose of each logits chunk);
  an optimization barrier on it saved nothing. XLA:GPU keeps the logits row-major itself.
* The fused loss's default chunk width, :func:`chunk_width` (below, with its measurement).
* The target's logit in a forward chunk, :func:`chunk_target_logit` (below, with its
  measurement).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxce._backends import bits
from jaxce._compat import row_major

hold = bits.hold
settle = bits.settle
lay_out = row_major

# The fused loss's default chunk width (``jaxce._chunked.default_widths``; the portable
# rule, 16 MiB of float32 logits per chunk, elsewhere). Why: the backward pass reads and
# writes its float32 [N, D] d-hidden accumulator once per chunk, 8 N D V / width bytes
# against 8 N D V FLOPs, and 256-column chunks leave the TPU waiting on HBM. Modelled time
# of value_and_grad of the mean over the materialised loss's, portable -> this width
# (temporaries in MiB), libtpu 0.0.52, ``python -m benchmarks.sweeps chunks``:
# 16384 x 4096 x 131072 bf16 (256 -> 1,024 columns): v5e 2.23x -> 1.39x (273 -> 321),
# v5p 1.91x -> 1.42x (267 -> 329), v6e 3.35x -> 1.76x (273 -> 321); 8192 x 2048 x 131072
# f32 (512 -> 1,024): v5e 1.70x -> 1.43x (65 -> 97), v5p 1.70x -> 1.58x (81 -> 97), v6e
# 2.12x -> 1.75x (81 -> 97). Within the fused loss's budgets (tests/test_budgets.py). The
# 1/128 cap is the 2 x 2 v5p vocabulary-parallel case's (8,192 tokens x 65,536 classes per
# chip, budget 169.0 MiB): 512 columns (1/128) 149.1 MiB, 1,024 (1/64) 169.3, 2,048 (1/32,
# the 64 MiB rule alone) 209. With chunk_target_logit (below), at 1,024 columns: bf16 v5e
# 1.36x, v5p 1.36x, v6e 1.63x; f32 v5e 1.35x (65 MiB), v5p 1.47x, v6e 1.55x.
chunk_width = bits.wide_chunk


def chunk_target_logit(z, local, hit):
    """``_chunked._target_logit`` as a masked sum over the chunk, ``Σ_c [c = local] z_c``,
    which the TPU compiler fuses into the pass that already reads the chunk for its
    ``Σ exp``, instead of a gather (an offloaded gather of the float32 chunk beside it).

    ``value_and_grad`` of the mean of ``linear_cross_entropy(strategy="min_memory")`` at
    16384 x 4096 x 131072 bf16, default 1,024-column chunks, libtpu 0.0.52, modelled time
    (``benchmarks/timemodel.py``, which charges the gather its whole operand, as it does
    not know how the TPU lays a gather out) and temporaries, gather -> masked sum: v5p
    191.8 -> 184.8 ms (1.415x -> 1.36x the materialised loss), 329.2 -> 328.8 MiB; v6e
    140.1 -> 129.7 ms (1.76x -> 1.62x), 320.9 -> 320.7 MiB; v5e 432.0 -> 420.8 ms (1.39x ->
    1.36x), 320.9 -> 320.8 MiB. ``strategy="min_work"``'s blocks pick their target logit
    with it too (``_token_blocks``), default 1,024-row blocks, float32 / 16-bit
    accumulation: v5p 1.023x / 1.014x -> 0.998x / 0.989x, v6e 1.37x / 1.10x -> 1.30x /
    1.03x, v5e 1.068x / 1.055x -> 1.032x / 1.019x, temporaries unchanged; 8192 x 2048 x
    131072 f32: v5p 1.052x -> 1.003x, v6e 1.25x -> 1.148x, v5e 1.10x -> 1.03x. The fused
    loss's TPU budgets (tests/test_budgets.py) hold.
    What the TPU really pays for the offloaded gather is not known here; the masked sum
    adds only vector work to a pass that is bound by reading the chunk. (With 256-column chunks, before the TPU's wide default, v5p
    preferred the gather: forward 17 / 32 MiB of temporaries.)
    """
    hits = (lax.broadcasted_iota(jnp.int32, z.shape, 1) == local[:, None]) & hit[:, None]
    return jnp.sum(jnp.where(hits, z, jnp.zeros_like(z)), axis=1)
