"""Vocabulary chunks shared by the fused linear losses (single-device and vocab-parallel)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxce._core import softcap
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
    """``kernel[:, start:start+size]``. Inside :func:`chunk_loop` the kernel must come in
    through ``pinned``, or XLA:CPU hoists a whole-kernel conversion out of the loop."""
    return lax.dynamic_slice_in_dim(kernel, start, size, axis=1)


def chunk_logits(hidden, kernel, bias, start, size, dtype):
    """``hidden @ kernel[:, start:start+size] + bias[...]`` in float32 (``dtype``)."""
    k = kernel_chunk(kernel, start, size)
    z = lax.dot_general(hidden, k, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    if bias is not None:
        z = z + lax.dynamic_slice_in_dim(bias, start, size).astype(dtype)[None, :]
    return z


def chunk_loop(chunks, body, carry, pinned=()):
    """Runs ``body(start, size, carry, *pinned)`` over static chunks: the first chunk, a
    fori_loop over the other full ones (a dynamic start), then the remainder.

    The first chunk is peeled off so that the loop's carry is built from the data: inside
    ``shard_map`` its type then already varies over the same mesh axes as the body's
    output (a zero-initialised carry would not, and the loop would be rejected).

    ``pinned``: the arrays the body slices chunks from (the kernel). Inside the loop they
    travel in the carry through an optimization barrier, so they are not loop-invariant
    for XLA, which then cannot hoist a whole-array conversion out of the loop: XLA:CPU
    upcasts a 16-bit ``dynamic-slice``'s operand to float32 and moves that convert out
    of the loop (a float32 copy of the kernel, 2 GiB at 4,096 x 131,072 bf16); a uint16
    bitcast, which avoids the f32 copy, is hoisted the same way (a 1 GiB copy). Pinned,
    only the chunk is converted. The barrier is an alias: the arrays are not copied.
    """
    if not chunks:
        return carry
    full = [c for c in chunks if c[1] == chunks[0][1]]
    size = chunks[0][1]
    carry = body(0, size, carry, *pinned)
    if len(full) > 1:

        def step(i, state):
            carry, held = state
            held = lax.optimization_barrier(held)
            return body(i * size, size, carry, *held), held

        carry = lax.fori_loop(1, len(full), step, (carry, tuple(pinned)))[0]
    for start, rest in chunks[len(full) :]:
        carry = body(start, rest, carry, *pinned)
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


# The identity transpose costs tokens x chunk^2 multiply-adds (the kernel-gradient matmul:
# tokens x chunk x D) and a chunk^2 identity. It is used only for chunks no wider than D and
# this bound: wide chunks come from few tokens, where the float32 upcast of ``hidden`` that
# it avoids is small anyway.
_MAX_EYE = 2048


def _transposed(x, dtype):
    """``x.T`` as a row-major array, exactly (non-finite entries included).

    XLA:CPU multiplies 16-bit matrices natively only when both are row-major with the
    contracted dimension of the left one last. ``hidden.T @ dz`` is not such a product,
    so XLA upcasts both operands to float32 and hoists the whole ``hidden`` upcast out of
    the chunk loop (+256 MiB at 16,384 x 4,096 bf16); ``dz.T @ hidden`` is, but a plain
    ``.T`` is only a layout change, which XLA rejects the same way. An identity matmul
    writes the transposed chunk for real: each output is one product ``1 * x`` (exact).
    Non-finite entries would spread through the zeros (``0 * inf``): in a chunk holding
    any, they are kept out of the product and added back transposed elementwise (a
    ``lax.cond``: the slower branch, never taken in training).
    """
    eye = jnp.eye(x.shape[1], dtype=x.dtype)
    dims = (((1,), (1,)), ((), ()))

    def by_matmul(x):
        return lax.dot_general(eye, x, dims, preferred_element_type=dtype).astype(x.dtype)

    def non_finite_apart(x):
        finite = jnp.isfinite(x)
        t = lax.dot_general(eye, jnp.where(finite, x, 0), dims, preferred_element_type=dtype)
        return (t + jnp.where(finite, 0, x).T.astype(dtype)).astype(x.dtype)

    return lax.cond(jnp.all(jnp.isfinite(x)), by_matmul, non_finite_apart, x)


def accumulate_chunk_grads(hidden, kernel, dz, start, size, dh, dk, db, dtype):
    """Adds a chunk's logit gradient ``dz`` to the backward carries: ``dh += dz @ k_c.T``
    (float32 accumulator), writes ``dk[:, chunk] = hidden.T @ dz`` and ``db[chunk]`` (None:
    not wanted). Matmuls take ``dz`` in ``hidden``'s dtype with ``dtype`` accumulation."""
    dz_in = dz.astype(hidden.dtype)
    k = kernel_chunk(kernel, start, size)
    dh = dh + lax.dot_general(dz_in, k, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
    if hidden.dtype.itemsize == 2 and size <= min(hidden.shape[1], _MAX_EYE):
        dk_t = lax.dot_general(
            _transposed(dz_in, dtype),
            hidden,
            (((1,), (0,)), ((), ())),
            preferred_element_type=dtype,
        )
        # The barrier keeps XLA from folding this transpose back into the matmul.
        dk_c = lax.optimization_barrier(dk_t).T
    else:
        dk_c = lax.dot_general(
            hidden, dz_in, (((0,), (0,)), ((), ())), preferred_element_type=dtype
        )
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

    def body(start, size, carry, kernel):
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
    m, s, z_y, wz, top, arg = chunk_loop(chunks(vocab, chunk), body, init, (kernel,))
    lse = jnp.where(jnp.isneginf(m), m, m + jnp.log(s))
    if not with_argmax:
        top = arg = None
    return lse, z_y, (wz if with_wz else None), top, arg
