"""``implementation="pallas_tpu"``: the TPU's spellings (``xla_tpu``), with Pallas (Mosaic)
kernels for ``strategy="min_memory"``'s chunk steps.

Opt-in only; the automatic choice stays ``"xla_tpu"`` on TPUs until the kernels have been
timed on one (no TPU has been lent to this project: every TPU number here is from XLA's
own TPU compiler running deviceless, and every time is the model's,
``benchmarks/timemodel.py``, whose entry for a kernel ``python -m
benchmarks.timemodel_kernels`` checks against tokamax's measured Mosaic kernel).

**The passes.** ``min_memory`` walks the vocabulary in chunks of ``w`` columns twice. The
forward pass keeps per-token statistics (:func:`jaxce._chunked.stats_step`: online
log-sum-exp, target logit, ``Σ_c w_c z_c``, the raw argmax); the backward pass recomputes
each chunk's logits, forms their gradient ``dz`` from per-token coefficients
(:func:`jaxce._chunked.grad_step`), adds ``dz @ kernel_c.T`` to the float32 ``[N, D]``
d-hidden accumulator and writes ``hidden.T @ dz`` as the chunk's kernel gradient. As XLA
ops, each chunk's ``[N, w]`` float32 logits, their exponentials and ``dz`` go to HBM and
back, and nothing overlaps the accumulator's traffic with the matmuls.

**The kernels** (:func:`stats_step`, :func:`grad_step`) run one chunk as a ``pallas_call``
over token tiles of ``tn`` rows. A tile's logits and everything formed from them stay in
VMEM; the backward kernel reads, adds to and writes the tile's d-hidden rows (aliased in
place) and sums the chunk's kernel gradient over the tiles in its float32 output block,
which stays in VMEM and is written once. The DMA of the next tile overlaps this tile's
matmuls. No output block is revisited after it was written back, so the pipeline has no
read-after-write hazard. HBM traffic per chunk: ``hidden`` once, d-hidden read and written
once (backward), the kernel chunk once and its gradient written once, against ``2 N D w``
(forward) and ``6 N D w`` (backward) matmul FLOPs, declared to the compiler as each
call's ``CostEstimate``. A chunk whose blocks do not fit :data:`VMEM_BYTES` runs as
several calls over column blocks (:func:`plan`).

The spelled passes are the whole chunk loops (``_chunked.kernel_stats``,
``_chunked.kernel_grads``), not single steps: a spelled step inside the loop would lose
its portable derivative rule to the loop's partial evaluation under second-order
differentiation, and a Pallas kernel that aliases its output has no derivative of its own.

**What they cover** (:func:`covers`, and the callers' checks; everything else runs the
``xla_tpu`` passes, in the same program, with the same values): class-index targets with
``weight``, ``ignore_index``, label smoothing, ``z_loss``, ``bias``, ``softcap``,
``return_aux``, float32 / bfloat16 / float16 ``hidden`` and ``kernel`` of one dtype, single
device or vocabulary-parallel with an even split. Not: class-probability targets,
``temperature``, ``return_entropy``, gradients in ``weight``, an uneven vocabulary split,
``strategy="min_work"``, forward-mode tangents (XLA), and token counts no tile divides (not
a multiple of 8, above 512 rows).

Off a TPU the kernels run in Pallas's interpret mode (that is how CI executes them, on a
CPU), except inside ``shard_map``, where the interpreter cannot run (see :func:`_on_tpu`)
and the portable passes do; on a TPU inside ``shard_map`` the kernels are compiled (CI
compiles them so for a 2 x 2 TPU v5p, deviceless). Their derivatives are the portable
passes' (``_backends.spelled``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxce import _chunked
from jaxce._chunked import ARG, G_LSE, G_WZ, G_ZY, LSE, MAX, ROWS, SUM, TARGET, TOP, WZ, ZY
from jaxce._compat import cast_varying, struct_like, varying_axes

# VMEM a kernel may use (its estimate, :func:`vmem_bytes`). TPU v5p has 64 MiB of VMEM,
# v5e and v6e 128 MiB (the compilers' "Ran out of memory in memory space vmem" reports,
# libtpu 0.0.52): one budget fits every generation.
VMEM_BYTES = 60 * 2**20

# Token tiles tried, largest first: a tile divides the token count exactly (no padding
# rows, whose garbage would enter the kernel gradient).
TILES = (512, 256, 128, 64, 32, 16, 8)
# The fewest rows a tile has where one fits: the MXU's 128 (v5e) or 256 (v6e) rows.
MIN_TILE = 128


def vmem_bytes(tn: int, dim: int, width: int, itemsize: int, backward: bool = True) -> int:
    """A kernel's VMEM. The forward kernel's: the kernel chunk, ``s D w`` bytes, the
    double-buffered ``hidden`` tiles, ``2 s tn D``, and the ``[tn, w]`` float32 logits and
    their exponentials. The backward kernel's: the kernel chunk (single-buffered: its block never
    moves) and the float32 kernel-gradient block it accumulates in, ``(s + 4) D w`` bytes
    with a little more measured; the double-buffered ``hidden`` and d-hidden tiles (in and
    out), ``(2 s + 16) tn D``; and the ``[tn, w]`` float32 logits and their gradient. Fitted
    to what the TPU compiler allocates (libtpu 0.0.52, ``D = 4096`` bfloat16, within 3 %:
    ``w = 1024, tn = 256`` 54.0 MiB, ``tn = 512`` 78.2; ``w = 2048, tn = 256`` 87.2,
    ``tn = 512`` 111.2)."""
    if not backward:
        return dim * width * itemsize + tn * dim * 2 * itemsize + 16 * tn * width + 2**20
    return (
        dim * width * (2 * itemsize + 4) + tn * dim * (2 * itemsize + 16) + 16 * tn * width + 2**20
    )


def plan(
    num_tokens: int, dim: int, width: int, itemsize: int, backward: bool = True
) -> tuple[int, int] | None:
    """``(tn, block)``: the token tile and the column block (``width`` split into blocks of
    at most ``block`` columns, each its own ``pallas_call``) that fit :data:`VMEM_BYTES`;
    None when no token tile divides ``num_tokens``. Prefers wide column blocks (each block
    reads and writes d-hidden once) with tiles of at least :data:`MIN_TILE` rows, then the
    larger tile; the narrowest block and tile when nothing fits (a very wide ``hidden``)."""
    tiles = [t for t in TILES if num_tokens % t == 0] or (
        [num_tokens] if num_tokens <= TILES[0] else []
    )
    if not tiles:
        return None
    blocks = sorted({width, *range(128, width, 128)}, reverse=True)
    for floor in (min(MIN_TILE, tiles[0]), 0):  # a full MXU's rows where they fit
        for block in blocks:
            for tn in (t for t in tiles if t >= floor):
                if vmem_bytes(tn, dim, block, itemsize, backward) <= VMEM_BYTES:
                    return tn, block
    return tiles[-1], min(128, width)


def covers(hidden: Any, kernel: Any) -> bool:
    """Whether :func:`stats_step` and :func:`grad_step` take these operands (dtype and token count; the options
    it covers are checked by its caller).

    float16 is not covered: Mosaic rejects the kernels' float16 loads ("Invalid vector type
    for load", libtpu 0.0.52, v5e/v5p/v6e), so float16 operands run ``"xla_tpu"``'s passes.
    """
    dtypes = {np.dtype(hidden.dtype).name, np.dtype(kernel.dtype).name}
    if len(dtypes) != 1 or dtypes.pop() not in ("float32", "bfloat16"):
        return False
    return plan(hidden.shape[0], hidden.shape[1], 128, hidden.dtype.itemsize) is not None


def stats_step(hidden, kernel_c, cols, rows, *, cap, dtype, argmax):
    """One chunk's forward step: the running row statistics updated with the chunk's
    logits ``z = softcap(hidden @ kernel_c + bias)``, as :func:`jaxce._chunked.stats_step`
    computes them.

    Args:
        hidden: ``[N, D]``.
        kernel_c: ``[D, w]``, the chunk's kernel columns (``hidden``'s dtype).
        cols: ``[2, w]`` float32: the chunk's class weights and bias.
        rows: ``[N, ROWS]`` float32: per token the running max, the sum of exponentials
            below it, the target's logit, ``Σ_c w_c z_c``, the target's column in the
            chunk (-1: none), and the raw logits' running max and its class relative to
            the chunk, at ``_chunked``'s ``MAX``, ``SUM``, ``ZY``, ``WZ``, ``TARGET``,
            ``TOP``, ``ARG``.
        cap: the soft-cap (None: none).
        dtype: float32, the accumulation dtype.
        argmax: whether to update ``TOP`` and ``ARG``.

    Returns:
        ``rows``, updated.
    """
    n, d = hidden.shape
    width = kernel_c.shape[1]
    portable = partial(_chunked.stats_step, cap=cap, dtype=dtype, argmax=argmax)
    tn, block = plan(n, d, width, hidden.dtype.itemsize, backward=False)

    def blocks(interpret, hidden, kernel_c, cols, rows):
        for start in range(0, width, block):
            size = min(block, width - start)
            k = lax.slice_in_dim(kernel_c, start, start + size, axis=1)
            c = lax.slice_in_dim(cols, start, start + size, axis=1)
            rows = _stats_pallas(
                hidden, k, c, rows, tn=tn, cap=cap, argmax=argmax, offset=start,
                interpret=interpret,
            )  # fmt: skip
        return rows

    return _on_tpu(blocks, portable, hidden, kernel_c, cols, rows)


def _stats_pallas(hidden, kernel_c, cols, rows, *, tn, cap, argmax, offset, interpret):
    n, d = hidden.shape
    width = kernel_c.shape[1]
    itemsize = hidden.dtype.itemsize
    traffic = n * d * itemsize + d * width * itemsize + 2 * n * ROWS * 4 + 2 * width * 4
    return pl.pallas_call(
        partial(_stats_kernel, cap=cap, argmax=argmax, offset=offset),
        grid=(n // tn,),
        in_specs=[
            pl.BlockSpec((tn, d), _row_tile),
            pl.BlockSpec((d, width), _fixed, pipeline_mode=pl.Buffered(1)),
            pl.BlockSpec((2, width), _fixed, pipeline_mode=pl.Buffered(1)),
            pl.BlockSpec((tn, ROWS), _row_tile),
        ],
        out_specs=pl.BlockSpec((tn, ROWS), _row_tile),
        out_shape=struct_like(hidden, rows.shape, rows.dtype),
        input_output_aliases={3: 0},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=VMEM_BYTES + 4 * 2**20
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * n * d * width,
            transcendentals=n * width * (2 if cap else 1),
            bytes_accessed=traffic,
        ),
        interpret=interpret,
    )(hidden, kernel_c, cols, rows)


def _stats_kernel(h_ref, k_ref, cols_ref, rows_ref, out_ref, *, cap, argmax, offset):
    rows = rows_ref[...]
    raw = lax.dot_general(
        h_ref[...], k_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    raw = raw + cols_ref[1:2, :]
    z = raw if cap is None else cap * jnp.tanh(raw / cap)
    m = rows[:, MAX : MAX + 1]
    new_m = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
    safe = jnp.where(jnp.isneginf(new_m), 0.0, new_m)
    total = rows[:, SUM : SUM + 1] * jnp.exp(m - safe)
    total = total + jnp.sum(jnp.exp(z - safe), axis=1, keepdims=True)
    column = lax.broadcasted_iota(jnp.int32, z.shape, 1) + offset
    target = rows[:, TARGET : TARGET + 1].astype(jnp.int32)
    picked = jnp.sum(jnp.where(column == target, z, 0.0), axis=1, keepdims=True)
    z_y = rows[:, ZY : ZY + 1] + picked
    wz = rows[:, WZ : WZ + 1] + jnp.sum(cols_ref[0:1, :] * z, axis=1, keepdims=True)
    top, arg = rows[:, TOP : TOP + 1], rows[:, ARG : ARG + 1]
    if argmax:  # the first maximal column (a NaN row: its first NaN), as jnp.argmax
        block_top = jnp.max(raw, axis=1, keepdims=True)
        is_top = (raw == block_top) | (jnp.isnan(raw) & jnp.isnan(block_top))
        first = jnp.min(jnp.where(is_top, column, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        better = block_top > top
        top = jnp.where(better, block_top, top)
        arg = jnp.where(better, first.astype(jnp.float32), arg)
    out_ref[...] = jnp.concatenate([new_m, total, z_y, wz, rows[:, TARGET:TOP], top, arg,
                                    rows[:, ARG + 1 :]], axis=1)  # fmt: skip


def grad_step(hidden, kernel_c, cols, rows, dh, *, cap, dtype):
    """One chunk's backward step: ``(dh + dz @ kernel_c.T, hidden.T @ dz, dz.sum(0))``.

    Args:
        hidden: ``[N, D]``.
        kernel_c: ``[D, w]``, the chunk's kernel columns (``hidden``'s dtype).
        cols: ``[2, w]`` float32: the chunk's class weights and bias.
        rows: ``[N, ROWS]`` float32: per token the log-sum-exp, the coefficients of the
            softmax, of the target's one-hot and of the class weights, and the target's
            column in the chunk (-1: none).
        dh: ``[N, D]`` float32 d-hidden accumulator (updated in place where the compiler
            can: the kernel aliases it to its output).
        cap: the soft-cap (None: none).
        dtype: float32, the accumulation dtype.

    Returns:
        ``(dh, dk_c [D, w] in dtype, db_c [w] in dtype)``, as
        :func:`jaxce._chunked.grad_step` computes them.
    """
    n, d = hidden.shape
    width = kernel_c.shape[1]
    portable = partial(_chunked.grad_step, cap=cap, dtype=dtype)
    tn, block = plan(n, d, width, hidden.dtype.itemsize)

    def blocks(interpret, hidden, kernel_c, cols, rows, dh):
        dks, dbs = [], []
        for start in range(0, width, block):
            size = min(block, width - start)
            k = lax.slice_in_dim(kernel_c, start, start + size, axis=1)
            c = lax.slice_in_dim(cols, start, start + size, axis=1)
            dh, dk, db = _grad_pallas(
                hidden, k, c, rows, dh, tn=tn, cap=cap, dtype=dtype, offset=start,
                interpret=interpret,
            )  # fmt: skip
            dks.append(dk)
            dbs.append(db[0])
        return dh, jnp.concatenate(dks, axis=1), jnp.concatenate(dbs)

    return _on_tpu(blocks, portable, hidden, kernel_c, cols, rows, dh)


def _row_tile(i):
    """The block index of token tile ``i`` (int32 even where float64 mode makes Python
    integers 64-bit, which Mosaic's index maps do not take)."""
    return i, np.int32(0)


def _fixed(i):
    """The one block of an operand every step reads whole."""
    del i
    return np.int32(0), np.int32(0)


def _on_tpu(kernels, portable, *args):
    """``kernels(interpret, *args)`` compiled for TPUs, chosen when the program is lowered;
    elsewhere in Pallas's interpret mode, or, inside ``shard_map``, ``portable(*args)``:
    the interpreter (jax <= 0.12.0.1) evaluates the kernel with blocks that vary over the
    mesh axes and index iotas that do not, which ``shard_map``'s type check rejects. For
    the TPU, every operand is cast to vary over the mesh axes any of them varies over, and
    so are the outputs (``_compat.struct_like``)."""
    every = frozenset().union(*(varying_axes(a) for a in args))
    args = tuple(cast_varying(a, every) for a in args)
    off_tpu = portable if every else partial(kernels, True)
    return lax.platform_dependent(*args, default=off_tpu, tpu=partial(kernels, False))


def _grad_pallas(hidden, kernel_c, cols, rows, dh, *, tn, cap, dtype, offset, interpret):
    n, d = hidden.shape
    width = kernel_c.shape[1]
    steps = n // tn
    itemsize = hidden.dtype.itemsize
    flops = 6 * n * d * width
    traffic = (
        n * d * (itemsize + 8)  # hidden read, d-hidden read and written
        + d * width * 2 * itemsize  # kernel chunk read, its gradient written
        + n * ROWS * 4
        + 2 * width * 4
    )
    return pl.pallas_call(
        partial(_grad_kernel, cap=cap, offset=offset),
        grid=(steps,),
        in_specs=[
            pl.BlockSpec((tn, d), _row_tile),
            pl.BlockSpec((d, width), _fixed, pipeline_mode=pl.Buffered(1)),
            pl.BlockSpec((2, width), _fixed, pipeline_mode=pl.Buffered(1)),
            pl.BlockSpec((tn, ROWS), _row_tile),
            pl.BlockSpec((tn, d), _row_tile),
        ],
        out_specs=[
            pl.BlockSpec((tn, d), _row_tile),
            pl.BlockSpec((d, width), _fixed),
            pl.BlockSpec((1, width), _fixed),
        ],
        out_shape=[
            struct_like(hidden, (n, d), dh.dtype),
            struct_like(hidden, (d, width), dtype),
            struct_like(hidden, (1, width), dtype),
        ],
        input_output_aliases={4: 0},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",),
            vmem_limit_bytes=VMEM_BYTES + 4 * 2**20,
        ),
        cost_estimate=pl.CostEstimate(
            flops=flops, transcendentals=n * width * (2 if cap else 1), bytes_accessed=traffic
        ),
        interpret=interpret,
    )(hidden, kernel_c, cols, rows, dh)


def _grad_kernel(
    h_ref, k_ref, cols_ref, rows_ref, dh_in_ref, dh_ref, dk_ref, db_ref, *, cap, offset
):
    @pl.when(pl.program_id(0) == 0)
    def _():
        dk_ref[...] = jnp.zeros_like(dk_ref)
        db_ref[...] = jnp.zeros_like(db_ref)

    h = h_ref[...]
    k = k_ref[...]
    rows = rows_ref[...]
    f32 = jnp.float32
    z = lax.dot_general(h, k, (((1,), (0,)), ((), ())), preferred_element_type=f32)
    z = z + cols_ref[1:2, :]
    if cap is not None:
        t = jnp.tanh(z / cap)
        z = cap * t
    p = jnp.exp(z - rows[:, LSE : LSE + 1])
    dz = p * rows[:, G_LSE : G_LSE + 1]
    column = lax.broadcasted_iota(jnp.int32, z.shape, 1) + offset
    target = rows[:, TARGET : TARGET + 1].astype(jnp.int32)
    dz = dz + jnp.where(column == target, rows[:, G_ZY : G_ZY + 1], 0.0)
    dz = dz + cols_ref[0:1, :] * rows[:, G_WZ : G_WZ + 1]
    if cap is not None:
        dz = dz * (1 - t * t)
    dz_in = dz.astype(h.dtype)
    dh_ref[...] = dh_in_ref[...] + lax.dot_general(
        dz_in, k, (((1,), (1,)), ((), ())), preferred_element_type=f32
    )
    # The kernel gradient's output block is the same at every step: it stays in VMEM and
    # accumulates there (float32), and is written to HBM once, after the last step.
    dk_ref[...] += lax.dot_general(h, dz_in, (((0,), (0,)), ((), ())), preferred_element_type=f32)
    db_ref[...] += jnp.sum(dz, axis=0, keepdims=True)
