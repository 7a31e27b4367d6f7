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
from jaxce._compat import row_major
from jaxce._options import compute_dtype
from jaxce._rows import class_ids, softcap

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

    def body(start, size, carry, hidden, kernel, probs):
        m, s, z_y, wz, tz, wt, top, arg, u = carry
        real = real_columns(start, size, n_real)
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype, opts.implementation)
        raw = mask_columns(raw, real, -jnp.inf)
        z = mask_columns(softcap(raw, opts.cap), real, -jnp.inf)
        if temperature is not None:
            z = z * (1 / temperature)
        new_m = jnp.maximum(m, jnp.max(z, axis=1))
        safe = jnp.where(jnp.isneginf(new_m), jnp.zeros_like(new_m), new_m)
        e = jnp.exp(z - safe[:, None])
        if entropy:  # rescaled to the new shift: e^{z-m'} (m'-z) = e^{m-m'} e^{z-m} (m'-m + m-z)
            moved = jnp.where(s > 0, safe - m, jnp.zeros_like(s))
            gap = jnp.where(jnp.isneginf(z), jnp.zeros_like(z), safe[:, None] - z)
            u = jnp.exp(m - safe) * (u + moved * s) + jnp.sum(e * gap, axis=1)
        s = s * jnp.exp(m - safe) + jnp.sum(e, axis=1)
        if idx is not None:
            # A gather, not a masked sum over the chunk (as _rows.pick_class). Measured
            # (jax 0.12.0.1, libtpu 0.0.52; MiB of temporaries, gather / masked sum):
            # XLA:CPU materialises the masked sum (forward at 16384 x 4096 x 131072 bf16:
            # 18 / 32); TPU v5p prefers the gather (forward 17 / 32, value_and_grad 267 /
            # 273), v5e and v6e the masked sum (forward 0.2 / 0.2 on v5e, 17 / 0.2 on v6e;
            # value_and_grad on v5e 273 / 257); H100 does not care. One TPU spelling
            # serves every generation: the gather stays the portable one.
            local = idx - start
            hit = here & (local >= 0) & (local < size)
            picked = jnp.take_along_axis(z, jnp.clip(local, 0, size - 1)[:, None], axis=1)[:, 0]
            z_y = z_y + jnp.where(hit, picked, jnp.zeros_like(picked))
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
