"""Vocabulary chunks shared by the fused linear losses (single-device and vocab-parallel).

The chunk loop, a chunk's logits and their tangent, the backward pass's per-chunk
gradient updates, and the forward pass's online statistics: the portable spelling. The
passes a backend respells here (the loop's hold on its pinned arrays, the chunk matmuls)
go through ``_backends.spelled``; the list is in ``_backends/__init__.py``.
"""

from __future__ import annotations

from functools import partial

import jax.numpy as jnp
from jax import lax

from jaxce._backends import choose, spelled, xla_cpu, xla_gpu, xla_tpu
from jaxce._compat import ONE_PASS_JVP, row_major
from jaxce._options import compute_dtype
from jaxce._rows import class_ids, softcap, softcap_slope, times_slope

# Default chunk: about this many bytes of float32 logits per chunk (tokens x chunk x 4).
CHUNK_BYTES = 16 * 2**20


def auto_chunk(num_tokens: int, vocab: int) -> int:
    """The portable default chunk width: about :data:`CHUNK_BYTES` of float32 logits per
    chunk, a multiple of 128 and at least 256 columns, at most ``vocab``."""
    chunk = CHUNK_BYTES // (4 * max(num_tokens, 1))
    chunk = max(256, (chunk // 128) * 128)
    return int(min(chunk, vocab))


def default_widths(num_tokens: int, vocab: int) -> tuple[int, tuple[tuple[str, int], ...]]:
    """``(chunk, by)``: the portable default width (:func:`auto_chunk`), and ``(name,
    width)`` for each backend whose own default (its ``chunk_width`` in
    ``jaxce/_backends/``, with the measurement; never narrower than the portable one) gives
    another width. :func:`vocab_loop` picks among them."""
    chunk = auto_chunk(num_tokens, vocab)
    own = ((name, min(max(chunk, rule(num_tokens, vocab)), vocab)) for name, rule in WIDTHS)
    return chunk, tuple((name, w) for name, w in own if w != chunk)


WIDTHS = (("xla_gpu", xla_gpu.chunk_width), ("xla_tpu", xla_tpu.chunk_width))


def vocab_loop(vocab, widths, body, carry, pinned=(), implementation=None):
    """:func:`chunk_loop` over ``vocab`` columns in chunks of ``widths = (chunk, by)``:
    ``chunk`` columns, or on a backend named in ``by`` (see :func:`default_widths`) that
    backend's width, chosen as a spelling is (``_backends.choose``: the named
    implementation's width, or each platform's when the program is lowered). The values
    agree across widths up to the order of the sums; every width has its own derivatives
    (the callers' custom rules), so none is differentiated through the choice."""
    chunk, by = widths

    def loop(width, carry, pinned):
        return chunk_loop(chunks(vocab, min(width, vocab)), body, carry, pinned, implementation)

    default = partial(loop, chunk)
    loops = {min(chunk, vocab): default}  # one branch per width
    own = {name: loops.setdefault(min(w, vocab), partial(loop, w)) for name, w in by}
    own = {name: f for name, f in own.items() if f is not default}
    return choose(implementation, default, own)(carry, tuple(pinned))


def chunks(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """Static (start, size) list: full chunks, then the remainder."""
    starts = list(range(0, vocab, chunk))
    return [(s, min(chunk, vocab - s)) for s in starts]


def kernel_chunk(kernel, start, size):
    """``kernel[:, start:start+size]``. Inside :func:`chunk_loop` the kernel comes in
    through ``pinned`` (see there)."""
    return lax.dynamic_slice_in_dim(kernel, start, size, axis=1)


def chunk_logits(hidden, kernel, bias, start, size, dtype, implementation=None):
    """``hidden @ kernel[:, start:start+size] + bias[...]`` in float32 (``dtype``), laid
    out by :func:`_lay_out` (as ``implementation`` spells it)."""
    k = kernel_chunk(kernel, start, size)
    z = lax.dot_general(hidden, k, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    if bias is not None:
        z = z + lax.dynamic_slice_in_dim(bias, start, size).astype(dtype)[None, :]
    return spelled(_lay_out, {}, implementation, xla_tpu=xla_tpu.lay_out)(z)


def _lay_out(z):
    """A chunk's logits as the compiler lays them out (portable: unchanged)."""
    return z


def chunk_loop(chunks, body, carry, pinned=(), implementation=None):
    """Runs ``body(start, size, carry, *pinned)`` over static chunks: the first chunk, a
    fori_loop over the other full ones (a dynamic start), then the remainder.

    The first chunk is peeled off so that the loop's carry is built from the data: inside
    ``shard_map`` its type then already varies over the same mesh axes as the body's
    output (a zero-initialised carry would not, and the loop would be rejected).

    ``pinned``: the arrays the body reads every chunk (``hidden``, the kernel). They
    travel in the loop's carry, through :func:`_hold` each iteration and :func:`_settle`
    after the loop: both are the identity in the portable spelling; compilers that convert
    a loop-invariant operand once, before the loop (a whole converted copy of the kernel),
    respell them as ``implementation`` picks (``jaxce/_backends/``, with the measurements).
    """
    if not chunks:
        return carry
    full = [c for c in chunks if c[1] == chunks[0][1]]
    size = chunks[0][1]
    carry = body(0, size, carry, *pinned)
    if len(full) > 1:
        hold = spelled(_hold, {}, implementation, xla_cpu=xla_cpu.hold, xla_tpu=xla_tpu.hold)

        def step(i, state):
            carry, held = state
            held = hold(held)
            return body(i * size, size, carry, *held), held

        carry, held = lax.fori_loop(1, len(full), step, (carry, tuple(pinned)))
        settle = spelled(
            _settle, {}, implementation, xla_cpu=xla_cpu.settle, xla_tpu=xla_tpu.settle
        )
        carry = settle(carry, held)
    for start, rest in chunks[len(full) :]:
        carry = body(start, rest, carry, *pinned)
    return carry


def _hold(held):
    """The pinned arrays at the top of a chunk-loop iteration (portable: unchanged)."""
    return held


def _settle(carry, held):
    """The chunk loop's carry once the loop is done, given the pinned arrays it held
    (portable: the carry, unchanged)."""
    del held
    return carry


def chunk_logits_tangent(hidden, kernel, dh, dk, db, start, size, dtype):
    """Tangent of a chunk's logits, ``dh @ k_c + hidden @ dk_c + db_c`` (None: zero), in
    ``dtype``; None when every tangent is absent."""
    if dh is None and dk is None and db is None:
        return None
    dims = (((1,), (0,)), ((), ()))
    dz = jnp.zeros((hidden.shape[0], size), dtype)
    if dh is not None:
        dz = dz + lax.dot_general(
            dh, kernel_chunk(kernel, start, size), dims, preferred_element_type=dtype
        )
    if dk is not None:
        dz = dz + lax.dot_general(
            hidden, kernel_chunk(dk, start, size), dims, preferred_element_type=dtype
        )
    if db is not None:
        dz = dz + lax.dynamic_slice_in_dim(db, start, size).astype(dtype)[None, :]
    return dz


def _add_hidden_grad(dh, dz, k, dtype):
    """``dh + dz @ k.T`` (``dtype`` accumulation): a chunk's share of the hidden gradient."""
    return dh + lax.dot_general(dz, k, (((1,), (1,)), ((), ())), preferred_element_type=dtype)


def _kernel_grad(hidden, dz, dtype):
    """``hidden.T @ dz`` with ``dtype`` accumulation: a chunk's kernel gradient."""
    return lax.dot_general(hidden, dz, (((0,), (0,)), ((), ())), preferred_element_type=dtype)


def zero_grads(hidden, kernel, bias, weight, dtype):
    """The backward pass's initial carry ``(dhidden [N, D] in dtype, dkernel, dbias,
    dweight)``, None for an absent ``bias`` / ``weight``."""
    return (
        jnp.zeros(hidden.shape, dtype),
        jnp.zeros_like(kernel),
        None if bias is None else jnp.zeros_like(bias),
        None if weight is None else jnp.zeros_like(weight),
    )


def accumulate_chunk_grads(
    hidden, kernel, dz, start, size, dh, dk, db, dtype, implementation=None, kernel_sum=()
):
    """Adds a chunk's logit gradient ``dz`` to the backward carries: ``dh += dz @ k_c.T``
    (float32 accumulator), writes ``dk[:, chunk] = hidden.T @ dz`` and ``db[chunk]`` (None:
    not wanted). Matmuls take ``dz`` in ``hidden``'s dtype with ``dtype`` accumulation;
    ``implementation`` spells them (``Options.implementation``). ``kernel_sum``: the
    ``shard_map`` axes to sum each chunk's ``dtype`` kernel gradient over before it is
    written (those the kernel is replicated over)."""
    dz_in = dz.astype(hidden.dtype)
    k = kernel_chunk(kernel, start, size)
    static = {"dtype": dtype}
    add_hidden_grad = spelled(
        _add_hidden_grad, static, implementation, xla_cpu=xla_cpu.add_hidden_grad
    )
    dh = add_hidden_grad(dh, dz_in, k)
    kernel_grad = spelled(_kernel_grad, static, implementation, xla_cpu=xla_cpu.chunk_kernel_grad)
    dk_c = kernel_grad(hidden, dz_in)
    if kernel_sum:
        dk_c = lax.psum(dk_c, kernel_sum)
    # The kernel gradient stays row-major, the layout of the output it becomes: TPU v6e
    # otherwise lays the loop-carried array out column-major (its chunk product comes out
    # [chunk, D]) and copies it to the output after the loop (libtpu 0.0.52, 8192 x 2048 x
    # 131072 f32: 1,105 -> 81 MiB of temporaries; 16384 x 4096 x 131072 bf16: 1,297 -> 273).
    dk = row_major(lax.dynamic_update_slice_in_dim(dk, dk_c.astype(dk.dtype), start, axis=1))
    if db is not None:
        db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, axis=0).astype(db.dtype), start, 0)
    return dh, dk, db


# The columns of the packed per-row operand ``rows`` of :func:`stats_step` (the running
# max, sum of exponentials, target logit, Σ_c w_c z_c, raw max and its class relative to
# the chunk) and :func:`grad_step` (the lse and the coefficients of dz); both hold the
# target's column in the chunk at TARGET.
MAX, SUM, ZY, WZ = range(4)
LSE, G_LSE, G_ZY, G_WZ = range(4)
TARGET, TOP, ARG = 4, 5, 6
ROWS = 8


def stats_step(hidden, kernel_c, cols, rows, *, cap, dtype, argmax):
    """A forward chunk's step for class-index targets, on packed operands: the running row
    statistics (``rows``' columns :data:`MAX`, :data:`SUM`, :data:`ZY`, :data:`WZ` and,
    with ``argmax``, :data:`TOP`/:data:`ARG`) updated with the chunk's logits ``z =
    softcap(hidden @ kernel_c + bias)``, as :func:`chunk_stats` does (``cols``: ``[2, w]``,
    the chunk's class weights and bias; the target's column in the chunk at
    :data:`TARGET`, -1: none; :data:`ARG` relative to the chunk's first column). The
    portable pass; ``pallas_tpu`` spells it as a kernel."""
    raw = lax.dot_general(hidden, kernel_c, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    raw = raw + cols[1][None, :]
    z = softcap(raw, cap)
    m = rows[:, MAX]
    new_m = jnp.maximum(m, jnp.max(z, axis=1))
    safe = jnp.where(jnp.isneginf(new_m), jnp.zeros_like(new_m), new_m)
    total = rows[:, SUM] * jnp.exp(m - safe) + jnp.sum(jnp.exp(z - safe[:, None]), axis=1)
    hit = chunk_classes(0, kernel_c.shape[1]) == rows[:, TARGET, None].astype(jnp.int32)
    z_y = rows[:, ZY] + jnp.sum(jnp.where(hit, z, jnp.zeros_like(z)), axis=1)
    wz = rows[:, WZ] + jnp.sum(cols[0][None, :] * z, axis=1)
    top, arg = rows[:, TOP], rows[:, ARG]
    if argmax:
        top, arg = running_argmax(raw, 0, top, arg.astype(jnp.int32))
    out = [new_m, total, z_y, wz, rows[:, TARGET], top, arg.astype(dtype), rows[:, ROWS - 1]]
    return jnp.stack(out, axis=1)


def grad_step(hidden, kernel_c, cols, rows, dh, *, cap, dtype):
    """A backward chunk's step for class-index targets, from packed per-row and per-column
    operands: the chunk's logits ``z = softcap(hidden @ kernel_c + bias)``, their gradient
    ``dz = (p g_lse + [c = target] g_zy + w_c g_wz) * softcap'`` with ``p = exp(z - lse)``,
    and ``(dh + dz @ kernel_c.T, hidden.T @ dz, dz.sum(0))`` (``dtype`` accumulation;
    the matmuls read ``dz`` in ``hidden``'s dtype).

    ``cols``: ``[2, w]``, the chunk's class weights and bias; ``rows``: ``[N, ROWS]``, per
    token ``lse``, ``g_lse``, ``g_zy``, ``g_wz`` and the target's column in the chunk
    (-1: none) at :data:`LSE`, :data:`G_LSE`, :data:`G_ZY`, :data:`G_WZ`, :data:`TARGET`.
    The portable pass; ``pallas_tpu`` spells it as a kernel.
    """
    raw = lax.dot_general(hidden, kernel_c, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    raw = raw + cols[1][None, :]
    z = softcap(raw, cap)
    dz = jnp.exp(z - rows[:, LSE, None]) * rows[:, G_LSE, None]
    target = rows[:, TARGET, None].astype(jnp.int32)
    hit = chunk_classes(0, kernel_c.shape[1]) == target
    dz = dz + jnp.where(hit, rows[:, G_ZY, None], jnp.zeros_like(dz))
    dz = dz + cols[0][None, :] * rows[:, G_WZ, None]
    dz = times_slope(dz, softcap_slope(raw, cap))
    dz_in = dz.astype(hidden.dtype)
    return (
        _add_hidden_grad(dh, dz_in, kernel_c, dtype),
        _kernel_grad(hidden, dz_in, dtype),
        (jnp.sum(dz, axis=0)),
    )


def _packed(hidden, bias, w, idx, here, start, size, columns, dtype, extra=()):
    """:func:`stats_step`'s and :func:`grad_step`'s packed operands: ``rows`` ``[N, ROWS]``
    (``columns``, four ``[N]`` vectors or None for zeros, the target's column in the
    chunk, -1 where there is none, then ``extra`` columns) and ``cols`` ``[2, size]``
    (class weights, 1 for None; bias, 0 for None)."""
    n = hidden.shape[0]
    zeros = jnp.zeros((n,), dtype)
    target = jnp.full((n,), -1, jnp.int32)
    if idx is not None:
        local = idx - start
        target = jnp.where(here & (local >= 0) & (local < size), local, target)
    columns = [zeros if c is None else c for c in (*columns, target.astype(dtype), *extra)]
    rows = jnp.stack(columns + [zeros] * (ROWS - len(columns)), axis=1)
    ones = jnp.ones((size,), dtype)
    w_c = ones if w is None else weight_chunk(w, start, size)[0]
    b_c = ones * 0 if bias is None else lax.dynamic_slice_in_dim(bias, start, size).astype(dtype)
    return rows, jnp.stack([w_c, b_c])


def stats_loop(hidden, kernel, bias, w, idx, here, *, cap, dtype, argmax, widths,
               implementation, step=stats_step):  # fmt: skip
    """``(m, s, z_y, wz, top, arg)`` of :func:`chunk_stats` for class indices ``idx`` where
    ``here`` (``w``/``bias``: None for none; ``top``/``arg``, the raw logits' row max and
    its first class, -inf and 0 unless ``argmax``), one :func:`stats_step` (or ``step``, a
    spelling of it) per chunk."""
    n = hidden.shape[0]

    def body(start, size, carry, hidden, kernel):
        top, arg = carry[4:]
        extra = (top, (arg - start).astype(dtype))  # the class relative to the chunk
        rows, cols = _packed(hidden, bias, w, idx, here, start, size, carry[:4], dtype, extra)
        rows = step(
            hidden, kernel_chunk(kernel, start, size), cols, rows, cap=cap, dtype=dtype,
            argmax=argmax,
        )  # fmt: skip
        arg = rows[:, ARG].astype(jnp.int32) + start
        return rows[:, MAX], rows[:, SUM], rows[:, ZY], rows[:, WZ], rows[:, TOP], arg

    zeros = jnp.zeros((n,), dtype)
    lowest = jnp.full((n,), -jnp.inf, dtype)
    init = (lowest, zeros, zeros, zeros, lowest, jnp.zeros((n,), jnp.int32))
    return vocab_loop(kernel.shape[1], widths, body, init, (hidden, kernel), implementation)


def grad_loop(
    hidden, kernel, bias, w, idx, here, lse, g_lse, g_zy, g_wz, dh, dk, db, sink,
    *, cap, dtype, widths, implementation, kernel_sum, step=grad_step,
):  # fmt: skip
    """The backward chunk loop of class indices (``_fused._transpose``) on the ``dz``
    that :func:`grad_step` (or ``step``, a spelling of it) forms: ``(dh, dk, db, sink)``
    from their initial values, as :func:`accumulate_chunk_grads` adds them (``kernel_sum``:
    the axes each chunk's kernel gradient is summed over). ``sink``: a float scalar carried
    along (see ``_fused._transpose``)."""

    def body(start, size, carry, hidden, kernel):
        dh, dk, db, sink = carry
        columns = (lse, g_lse, g_zy, g_wz)
        rows, cols = _packed(hidden, bias, w, idx, here, start, size, columns, dtype)
        k = kernel_chunk(kernel, start, size)
        dh, dk_c, db_c = step(hidden, k, cols, rows, dh, cap=cap, dtype=dtype)
        if kernel_sum:
            dk_c = lax.psum(dk_c, kernel_sum)
        dk = row_major(lax.dynamic_update_slice_in_dim(dk, dk_c.astype(dk.dtype), start, axis=1))
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_c.astype(db.dtype), start, 0)
        return dh, dk, db, sink

    init = (dh, dk, db, sink)
    return vocab_loop(kernel.shape[1], widths, body, init, (hidden, kernel), implementation)


def _spelled_loop(loop, step, static, *args):
    """``loop(*args, **static)`` as ``static["implementation"]`` spells it: the whole loop
    is the pass (``pallas_tpu``: the loop with ``pallas_tpu.<step>``, a kernel per chunk),
    so that its derivatives are the portable loop's in every order (a spelled step inside
    the loop would lose its rule to the loop's partial evaluation, and a Pallas kernel has
    none of its own)."""
    from jaxce._backends import pallas_tpu  # Pallas is imported only where it is named

    kernels = partial(loop, step=getattr(pallas_tpu, step))
    return spelled(loop, static, static["implementation"], pallas_tpu=kernels)(*args)


def kernel_stats(hidden, kernel, bias, w, idx, here, **static):
    """:func:`stats_loop` (keyword options ``static``), as the implementation spells it."""
    return _spelled_loop(stats_loop, "stats_step", static, hidden, kernel, bias, w, idx, here)


def kernel_grads(hidden, kernel, bias, w, idx, here, lse, g_lse, g_zy, g_wz, dh, dk, db, sink,
                 **static):  # fmt: skip
    """:func:`grad_loop` (keyword options ``static``), as the implementation spells it."""
    args = (hidden, kernel, bias, w, idx, here, lse, g_lse, g_zy, g_wz, dh, dk, db, sink)
    return _spelled_loop(grad_loop, "grad_step", static, *args)


def running_argmax(z, start, top, arg):
    """Updates the running row max ``top`` and its class ``arg`` with a chunk's logits
    ``z`` (classes ``start...``). Only a strictly larger chunk max moves ``arg``, so the
    first maximal class wins, as in ``jnp.argmax``."""
    chunk_top = jnp.max(z, axis=1)
    chunk_arg = start + jnp.argmax(z, axis=1).astype(jnp.int32)
    better = chunk_top > top
    return jnp.where(better, chunk_top, top), jnp.where(better, chunk_arg, arg)


def real_columns(start, size, n_real):
    """Which of a chunk's columns are real classes (``[1, size]``), or None: all are.

    ``n_real``: None, or the number of real classes in the kernel slice (a traced int32
    scalar); the columns after them pad an uneven vocabulary split and never count.
    """
    if n_real is None:
        return None
    return chunk_classes(start, size) < n_real


def chunk_classes(start, size):
    """The classes of a chunk's columns, ``[1, size]`` int32."""
    return class_ids((1, size), 1, start)


def mask_columns(v, real, fill):
    """``v`` with ``fill`` at the padding columns (``real`` None: unchanged)."""
    return v if real is None else jnp.where(real, v, jnp.full_like(v, fill))


def weight_chunk(w, start, size):
    """A chunk's columns of class weights ``w`` (None: 1): ``[1, size]`` of a ``[V]``
    vector, ``[N, size]`` of per-token ``[N, V]`` values (class-probability targets)."""
    if w is None:
        return 1
    if w.ndim == 1:
        return lax.dynamic_slice_in_dim(w, start, size)[None, :]
    return lax.dynamic_slice_in_dim(w, start, size, axis=1)


def kernel_covers(hidden, kernel):
    """Whether ``pallas_tpu``'s kernels take these operands (``pallas_tpu.covers``)."""
    from jaxce._backends import pallas_tpu  # Pallas is imported only where it is named

    return pallas_tpu.covers(hidden, kernel)


def _running_sums(z, m, s):
    """The running row max and shifted sum of exponentials after one chunk of logits ``z``
    ``[N, w]``: ``m' = max(m, max_c z)`` and ``s e^{m - m'} + Σ_c e^{z - m'}`` (the shift
    0 where ``m'`` is -inf). Two passes over the chunk: its max, then the sum."""
    new_m = jnp.maximum(m, jnp.max(z, axis=1))
    safe = jnp.where(jnp.isneginf(new_m), jnp.zeros_like(new_m), new_m)
    return new_m, s * jnp.exp(m - safe) + jnp.sum(jnp.exp(z - safe[:, None]), axis=1)


def _target_logit(z, local, hit):
    """The logit of each row's target in a chunk ``z`` ``[N, w]``: ``z[n, local[n]]`` where
    ``hit`` (the target is in the chunk), else 0. A gather, not a masked sum over the
    chunk (as _rows.pick_class). Measured (jax 0.12.0.1, libtpu 0.0.52; MiB of temporaries,
    gather / masked sum, 256-column chunks): XLA:CPU materialises the masked sum (forward
    at 16384 x 4096 x 131072 bf16: 18 / 32); TPU v5p then preferred the gather (forward 17
    / 32, value_and_grad 267 / 273), v5e and v6e the masked sum (forward 0.2 / 0.2 on v5e,
    17 / 0.2 on v6e; value_and_grad on v5e 273 / 257); the H100 does not care. At the TPUs'
    own 1,024-column chunks every generation takes the masked sum
    (``xla_tpu.chunk_target_logit``, with its measurement)."""
    picked = jnp.take_along_axis(z, jnp.clip(local, 0, z.shape[1] - 1)[:, None], axis=1)[:, 0]
    return jnp.where(hit, picked, jnp.zeros_like(picked))


def chunk_stats(
    hidden,
    kernel,
    bias,
    idx,
    here,
    weight,
    with_wz,
    opts,
    n_real=None,
    probs=None,
    temperature=None,
    entropy=False,
):
    """One pass over the vocabulary chunks (``opts.chunk``) of ``hidden @ kernel + bias``
    (soft-capped by ``opts.cap``), keeping per-token statistics only: ``(lse, z_y, wz, tz,
    wt, top, arg)``.

    ``lse``: online log-sum-exp (running max and rescaled sum); ``z_y``: the logit of
    class ``idx`` where ``here`` (else 0; None without ``idx``); ``wz``: ``Σ_c w_c z_c``
    (None unless ``with_wz``); ``tz`` and ``wt``: ``Σ_c w_c t_c z_c`` and ``Σ_c w_c t_c``
    for class probabilities ``probs`` ``[N, V]`` (None without ``probs``; ``wt`` summed
    here, chunk by chunk, since XLA:CPU materialises a float32 copy of 16-bit
    probabilities for a whole-row sum beside this loop); ``top``/``arg``: the raw logits' row max
    and its first class (None unless ``opts.stats``). Columns past ``n_real`` (see
    :func:`real_columns`) are left out of all of them.

    ``temperature``: None, or ``T`` (a scalar): the statistics are those of ``z / T``
    (after the cap; ``top``/``arg`` stay the raw logits'). With ``entropy``, an eighth
    output: the entropy ``Σ_c p_c (lse - z_c)`` of the slice's softmax ``p``, accumulated
    online as ``log s + u / s`` with ``u = Σ_c e^{z_c - m} (m - z_c)`` (non-negative
    terms, no cancellation).
    """
    dtype = compute_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], kernel.shape[1]
    w = None if weight is None else weight.astype(dtype)

    # The cases pallas_tpu's kernel covers (pallas_tpu.py); the rest run the passes below.
    kernel_step = (
        opts.implementation == "pallas_tpu"
        and idx is not None
        and probs is None
        and temperature is None
        and not entropy
        and n_real is None
        and dtype == jnp.float32
        and kernel_covers(hidden, kernel)
    )

    if kernel_step:
        m, s, z_y, wz, top, arg = kernel_stats(
            hidden, kernel, bias, w, idx, here, cap=opts.cap, dtype=dtype, argmax=opts.stats,
            widths=(opts.chunk, opts.chunk_by), implementation=opts.implementation,
        )  # fmt: skip
        lse = jnp.where(jnp.isneginf(m), m, m + jnp.log(s))
        top, arg = (top, arg) if opts.stats else (None, None)
        return lse, z_y, wz if with_wz else None, None, None, top, arg

    one_pass = xla_gpu.running_sums if ONE_PASS_JVP else None
    running_sums = spelled(_running_sums, {}, opts.implementation, xla_gpu=one_pass)
    target_logit = spelled(
        _target_logit, {}, opts.implementation, xla_tpu=xla_tpu.chunk_target_logit
    )

    def body(start, size, carry, hidden, kernel, probs):
        m, s, z_y, wz, tz, wt, top, arg, u = carry
        real = real_columns(start, size, n_real)
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype, opts.implementation)
        raw = mask_columns(raw, real, -jnp.inf)
        z = mask_columns(softcap(raw, opts.cap), real, -jnp.inf)
        if temperature is not None:
            z = z * (1 / temperature)
        if entropy:  # rescaled to the new shift: e^{z-m'} (m'-z) = e^{m-m'} e^{z-m} (m'-m + m-z)
            new_m = jnp.maximum(m, jnp.max(z, axis=1))
            safe = jnp.where(jnp.isneginf(new_m), jnp.zeros_like(new_m), new_m)
            e = jnp.exp(z - safe[:, None])
            moved = jnp.where(s > 0, safe - m, jnp.zeros_like(s))
            gap = jnp.where(jnp.isneginf(z), jnp.zeros_like(z), safe[:, None] - z)
            u = jnp.exp(m - safe) * (u + moved * s) + jnp.sum(e * gap, axis=1)
            s = s * jnp.exp(m - safe) + jnp.sum(e, axis=1)
        else:
            new_m, s = running_sums(z, m, s)
        if idx is not None:
            local = idx - start
            hit = here & (local >= 0) & (local < size)
            z_y = z_y + target_logit(z, local, hit)
        if with_wz:
            wz = wz + jnp.sum(mask_columns(weight_chunk(w, start, size) * z, real, 0), axis=1)
        if probs is not None:
            tc = weight_chunk(probs, start, size).astype(dtype) * weight_chunk(w, start, size)
            tz = tz + jnp.sum(mask_columns(tc * z, real, 0), axis=1)
            wt = wt + jnp.sum(mask_columns(tc, real, 0), axis=1)
        if opts.stats:
            top, arg = running_argmax(raw, start, top, arg)
        return new_m, s, z_y, wz, tz, wt, top, arg, u

    zeros = jnp.zeros((n,), dtype)
    lowest = jnp.full((n,), -jnp.inf, dtype)
    init = (lowest, zeros, zeros, zeros, zeros, zeros, lowest, jnp.zeros((n,), jnp.int32), zeros)
    pinned = (hidden, kernel, probs)
    m, s, z_y, wz, tz, wt, top, arg, u = vocab_loop(
        vocab, (opts.chunk, opts.chunk_by), body, init, pinned, opts.implementation
    )
    lse = jnp.where(jnp.isneginf(m), m, m + jnp.log(s))
    if not opts.stats:
        top = arg = None
    ent = (jnp.log(s) + u / s,) if entropy else ()
    return (
        lse,
        None if idx is None else z_y,
        wz if with_wz else None,
        None if probs is None else tz,
        None if probs is None else wt,
        top,
        arg,
        *ent,
    )
