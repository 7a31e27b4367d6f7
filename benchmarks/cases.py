"""What is measured: the losses (jaxce's public API, optax, the plain formula, tokamax),
their inputs, and the compile-only case table."""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxce

S, F32 = jax.ShapeDtypeStruct, jnp.float32


def log_softmax(x):
    return jax.nn.log_softmax(x.astype(F32), axis=-1)


def plain_ce(x, y):
    """The textbook formula: float32 log_softmax, then pick the target (autodiff gradient)."""
    return -jnp.mean(jnp.take_along_axis(log_softmax(x), y[:, None], axis=-1))


def optax_ce(x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


CE_LOSSES = {"jaxce": jaxce.cross_entropy, "optax": optax_ce, "plain log_softmax": plain_ce}
LINEAR_LOSSES = {
    "jaxce fused": jaxce.linear_cross_entropy,  # the default, strategy="auto"
    "jaxce min_work": partial(jaxce.linear_cross_entropy, strategy="min_work"),
    "jaxce min_memory": partial(jaxce.linear_cross_entropy, strategy="min_memory"),
    "jaxce unfused": lambda h, k, y: jaxce.cross_entropy(h @ k, y),
    "optax unfused": lambda h, k, y: optax_ce(h @ k, y),
    "plain unfused": lambda h, k, y: plain_ce(jnp.dot(h, k, preferred_element_type=F32), y),
}


def floor_pass(x):
    """The memory-traffic floor: read the logits once, write an array of their size."""
    return x * 2


def lse_pass(x):
    """The least a forward computes: one read with one ``exp`` per element (a log-sum-exp
    shifted by a known logit). Rows longer than 32,768 are summed as sub-rows of a
    barrier-held view (XLA:CPU's long-row reductions are slow)."""
    (n, c), shift = x.shape, x[:, 0].astype(F32)
    parts = lax.optimization_barrier(x.reshape(-1, min(c, 32768))).astype(F32)
    sums = jnp.exp(parts - jnp.repeat(shift, parts.shape[0] // n)[:, None]).sum(1)
    return shift + jnp.log(sums.reshape(n, -1).sum(1))


def normal(key, shape, dtype, scale=1.0):
    """Standard normal (times ``scale``) ``[n, m]``, generated block by block in place: no
    full-size random bits or float32 copy, so allocating inputs peaks at their size."""
    (n, m), rows = shape, max(1, min(shape[0], 2**20 // shape[1]))
    while n % rows:
        rows -= 1

    def block(i, out):
        z = jax.random.normal(jax.random.fold_in(key, i), (rows, m), F32) * scale
        return lax.dynamic_update_slice(out, z.astype(dtype), (i * rows, 0))

    return jax.jit(lambda: lax.fori_loop(0, n // rows, block, jnp.zeros(shape, dtype)))()


def inputs(shape, dtype, seed=0):
    """(logits [n, c], targets) or (hidden [n, d], kernel [d, v] * d**-0.5, targets)."""
    k = jax.random.split(jax.random.key(seed), 3)
    y = jax.random.randint(k[2], shape[:1], 0, shape[-1])
    if len(shape) == 2:
        return normal(k[0], shape, dtype), y
    n, d, v = shape
    return normal(k[0], (n, d), dtype), normal(k[1], (d, v), dtype, d**-0.5), y


def _with_tokamax(variants, implementation):
    """``variants`` plus tokamax's fused op as ``(hidden, kernel, y)`` if it is installed."""
    if implementation is None:
        return variants
    try:
        from tokamax import linear_softmax_cross_entropy_loss as loss
    except ImportError:
        return variants
    tokamax = lambda h, k, y: loss(h, y, k, reduction="mean", implementation=implementation)  # noqa: E731
    return {**variants, "tokamax": tokamax}


def tokamax_loss(implementation):
    """tokamax's fused op as ``(hidden, kernel, y)`` with one implementation."""
    from tokamax import linear_softmax_cross_entropy_loss as loss

    return lambda h, k, y: loss(h, y, k, reduction="mean", implementation=implementation)


def tokamax_context(target, devices):
    """For tracing tokamax for a compile-only target: its device check off and, for its
    TPU kernel, the TPU generation named by an abstract mesh."""
    import tokamax

    logging.getLogger("absl").setLevel(logging.ERROR)  # its autotuning-cache misses
    stack = contextlib.ExitStack()
    stack.enter_context(tokamax.config.cross_compile(True))
    if target.startswith("tpu"):
        mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",)).abstract_mesh
        stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
    return stack


def _on(logits):
    """jaxce / optax / plain on logits computed in the same jit from the other inputs."""
    return {k: lambda *a, f=f: f(logits(*a[:-1]), a[-1]) for k, f in CE_LOSSES.items()}


def _smoothed(lp, y, w, eps=0.1):
    """torch's weighted mean with label smoothing, from log-probabilities."""
    nll = -jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0] * w[y]
    return ((1 - eps) * nll.sum() - eps * (lp * w).sum() / lp.shape[-1]) / w[y].sum()


def _capped(x, cap=30.0):
    return cap * jnp.tanh(x / cap)


def _optax_smoothed(x, y, w):  # optax has no class weights: rows weighted by w[y]
    t = optax.smooth_labels(jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), 0.1)
    return (optax.softmax_cross_entropy(x, t).astype(F32) * w[y]).sum() / w[y].sum()


def _optax_z_capped(x, y):
    z = _capped(x)
    lse = jax.nn.logsumexp(z, axis=-1)
    return (optax.softmax_cross_entropy_with_integer_labels(z, y) + 1e-4 * lse**2).mean()


def _plain_z_capped(x, y):
    z = _capped(x.astype(F32))
    return plain_ce(z, y) + 1e-4 * jnp.mean(jax.nn.logsumexp(z, axis=-1) ** 2)


def ce_cases(n, c, dtype, tokamax_impl=None, d=4096):
    """{case: (input specs, {variant: loss}, argnums, shardings)}: cross-entropy's mean at
    [n, c], differentiated w.r.t. the logits or whatever they are computed from."""
    dt = jnp.dtype(dtype)
    x, y, w, b = S((n, c), dt), S((n,), jnp.int32), S((c,), F32), S((c,), dt)
    other = S((n, c), jnp.bfloat16 if dt == F32 else F32)
    matmul = _with_tokamax(_on(lambda h, k: h @ k), tokamax_impl)
    smoothing = {"jaxce": lambda x, y, w: jaxce.cross_entropy(x, y, w, label_smoothing=0.1)}
    smoothing.update(optax=_optax_smoothed)
    smoothing["plain log_softmax"] = lambda x, y, w: _smoothed(log_softmax(x), y, w)
    probs = {
        "jaxce": jaxce.cross_entropy,
        "optax": lambda x, p: optax.softmax_cross_entropy(x, p).mean(),
    }
    probs["plain log_softmax"] = lambda x, p: -(p * log_softmax(x)).sum(-1).mean()
    z_cap = {"jaxce": lambda x, y: jaxce.cross_entropy(x, y, z_loss=1e-4, logit_softcap=30.0)}
    z_cap.update({"optax": _optax_z_capped, "plain log_softmax": _plain_z_capped})
    return {
        "index": ((x, y), _on(lambda x: x), 0, None),
        "weight+smoothing": ((x, y, w), smoothing, 0, None),
        "probabilities": ((x, x), probs, 0, None),
        "z_loss+softcap": ((x, y), z_cap, 0, None),
        "x*0.5": ((x, y), _on(lambda x: x * 0.5), 0, None),
        "cast": ((other, y), _on(lambda x: x.astype(dt)), 0, None),
        "bias": ((x, b, y), _on(lambda x, b: x + b[None, :]), (0, 1), None),
        "matmul": ((S((n, d), dt), S((d, c), dt), y), matmul, (0, 1), None),
    }


def min_work_16bit_acc(dtype):
    """``strategy="min_work"`` with its d-kernel accumulator in the 16-bit ``dtype``."""
    return partial(jaxce.linear_cross_entropy, strategy="min_work", acc_dtype=jnp.dtype(dtype))


def linear_case(n, d, v, dtype, tokamax_impl=None):
    """(specs, {variant: loss}, argnums, None): the fused loss against the unfused ones."""
    variants = _with_tokamax(LINEAR_LOSSES, tokamax_impl)
    dt = jnp.dtype(dtype)
    return (S((n, d), dt), S((d, v), dt), S((n,), jnp.int32)), variants, (0, 1), None


def sharded_case(mesh, n, d, v, dtype="bfloat16"):
    """linear_case with hidden split over 'data' and the kernel over 'model' (the
    vocabulary), plus the vocabulary-parallel form; and the inputs' shardings."""
    from jax.sharding import NamedSharding as Named
    from jax.sharding import PartitionSpec as P

    specs, variants, argnums, _ = linear_case(n, d, v, dtype)
    sharded = lambda h, k, y, **options: jaxce.sharded_linear_cross_entropy(  # noqa: E731
        h, k, y, mesh=mesh, vocab_axis="model", batch_axis="data", **options
    )
    parts = (P("data", None), P(None, "model"), P("data"))
    return specs, {"jaxce sharded": sharded, **variants}, argnums, [Named(mesh, p) for p in parts]
