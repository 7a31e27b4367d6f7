"""Vocabulary chunks shared by the fused linear losses (single-device and vocab-parallel)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxce._core import lean_spelling, softcap
from jaxce._validate import compute_dtype

# Default chunk: about this many bytes of float32 logits per chunk (tokens x chunk x 4).
CHUNK_BYTES = 16 * 2**20


def auto_chunk(num_tokens: int, vocab: int) -> int:
    chunk = CHUNK_BYTES // (4 * max(num_tokens, 1))
    chunk = max(256, (chunk // 128) * 128)
    return int(min(chunk, vocab))


def chunks(vocab: int, chunk: int) -> list[tuple[int, int]]:
    """Static (start, size) list: full chunks, then the remainder."""
    starts = list(range(0, vocab, chunk))
    return [(s, min(chunk, vocab - s)) for s in starts]


def kernel_chunk(kernel, start, size):
    """``kernel[:, start:start+size]``; 16-bit kernels are sliced as integer bits.

    XLA CPU computes 16-bit dots in float32: with a plain slice it rewrites
    ``convert(slice(kernel))`` into ``slice(convert(kernel))`` and hoists the upcast out
    of the loop, a float32 copy of the whole kernel (+2 GiB at 4,096 x 131,072). Slicing
    the bits avoids that, at the price of one 16-bit bitcast copy of the kernel on CPU
    (+1 GiB there; see the issue notes). Differentiated as the plain slice.
    """
    if kernel.dtype.itemsize != 2:
        return lax.dynamic_slice_in_dim(kernel, start, size, axis=1)

    def lean(res, v):
        bits = lax.bitcast_convert_type(v[0], jnp.uint16)
        chunk = lax.dynamic_slice_in_dim(bits, res[0], size, axis=1)
        return (lax.bitcast_convert_type(chunk, v[0].dtype),)

    def plain(res, v):
        return (lax.dynamic_slice_in_dim(v[0], res[0], size, axis=1),)

    return lean_spelling(lean, plain, (jnp.asarray(start, jnp.int32),), (kernel,))[0]


def chunk_logits(hidden, kernel, bias, start, size, dtype):
    """``hidden @ kernel[:, start:start+size] + bias[...]`` in float32 (``dtype``)."""
    k = kernel_chunk(kernel, start, size)
    z = lax.dot_general(hidden, k, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    if bias is not None:
        z = z + lax.dynamic_slice_in_dim(bias, start, size).astype(dtype)[None, :]
    return z


def chunk_loop(chunks, body, carry):
    """Runs ``body(start, size, carry)`` over static chunks: the first chunk, a fori_loop
    over the other full ones (a dynamic start), then the remainder.

    The first chunk is peeled off so that the loop's carry is built from the data: inside
    ``shard_map`` its type then already varies over the same mesh axes as the body's
    output (a zero-initialised carry would not, and the loop would be rejected).
    """
    if not chunks:
        return carry
    full = [c for c in chunks if c[1] == chunks[0][1]]
    size = chunks[0][1]
    carry = body(0, size, carry)
    if len(full) > 1:
        carry = lax.fori_loop(1, len(full), lambda i, c: body(i * size, size, c), carry)
    for start, rest in chunks[len(full) :]:
        carry = body(start, rest, carry)
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


def accumulate_chunk_grads(hidden, kernel, dz, start, size, dh, dk, db, dtype):
    """Adds a chunk's logit gradient ``dz`` to the backward carries: ``dh += dz @ k_c.T``
    (float32 accumulator), writes ``dk[:, chunk] = hidden.T @ dz`` and ``db[chunk]`` (None:
    not wanted). Matmuls take ``dz`` in ``hidden``'s dtype with ``dtype`` accumulation."""
    dz_in = dz.astype(hidden.dtype)
    k = kernel_chunk(kernel, start, size)
    dh = dh + lax.dot_general(dz_in, k, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
    dk_c = lax.dot_general(hidden, dz_in, (((0,), (0,)), ((), ())), preferred_element_type=dtype)
    dk = lax.dynamic_update_slice_in_dim(dk, dk_c.astype(dk.dtype), start, axis=1)
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


def chunk_stats(hidden, kernel, bias, idx, here, weight, with_wz, chunk, cap, with_argmax):
    """One pass over the vocabulary chunks of ``hidden @ kernel + bias`` (soft-capped by
    ``cap``), keeping per-token statistics only: ``(lse, z_y, wz, top, arg)``.

    ``lse``: online log-sum-exp (running max and rescaled sum); ``z_y``: the logit of
    class ``idx`` where ``here`` (else 0); ``wz``: ``Σ_c w_c z_c`` (None unless
    ``with_wz``); ``top``/``arg``: the raw logits' row max and its first class (None
    unless ``with_argmax``).
    """
    dtype = compute_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], kernel.shape[1]
    w = None if weight is None else weight.astype(dtype)

    def body(start, size, carry):
        m, s, z_y, wz, top, arg = carry
        raw = chunk_logits(hidden, kernel, bias, start, size, dtype)
        z = softcap(raw, cap)
        new_m = jnp.maximum(m, jnp.max(z, axis=1))
        safe = jnp.where(jnp.isneginf(new_m), jnp.zeros_like(new_m), new_m)
        s = s * jnp.exp(m - safe) + jnp.sum(jnp.exp(z - safe[:, None]), axis=1)
        # A gather, not a masked sum over the chunk (which XLA:CPU materialises).
        local = idx - start
        hit = here & (local >= 0) & (local < size)
        picked = jnp.take_along_axis(z, jnp.clip(local, 0, size - 1)[:, None], axis=1)[:, 0]
        z_y = z_y + jnp.where(hit, picked, jnp.zeros_like(picked))
        if with_wz:
            wc = 1 if w is None else lax.dynamic_slice_in_dim(w, start, size)[None, :]
            wz = wz + jnp.sum(wc * z, axis=1)
        if with_argmax:
            top, arg = running_argmax(raw, start, top, arg)
        return new_m, s, z_y, wz, top, arg

    zeros = jnp.zeros((n,), dtype)
    lowest = jnp.full((n,), -jnp.inf, dtype)
    init = (lowest, zeros, zeros, zeros, lowest, jnp.zeros((n,), jnp.int32))
    m, s, z_y, wz, top, arg = chunk_loop(chunks(vocab, chunk), body, init)
    lse = jnp.where(jnp.isneginf(m), m, m + jnp.log(s))
    if not with_argmax:
        top = arg = None
    return lse, z_y, (wz if with_wz else None), top, arg
