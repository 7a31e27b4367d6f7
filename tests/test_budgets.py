"""Compile-only memory budgets: XLA's temporaries for training-size losses.

Nothing is allocated: each case is lowered on ``jax.ShapeDtypeStruct``s and compiled, and
``memory_analysis().temp_size_in_bytes`` (buffers that are neither inputs nor outputs) is
held under a budget. Budgets belong to one compiler and XLA version, so every test here
says which: they are marked ``xla_budget`` and skipped elsewhere.

* XLA:CPU, measured with jaxlib 0.10.2 and 0.12.0.1 (older XLA:CPU fuses differently:
  with jaxlib 0.7.2 these cases hold logits-sized temporaries).

Backend-independent guarantees (what the backward pass saves) are in test_memory.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxce

CPU_XLA = (0, 10)  # the oldest jaxlib whose XLA:CPU these budgets were measured on


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.lib.__version__.split(".")[:2])


def cpu_budget(test):
    """Marks an XLA:CPU budget, skipped on an XLA:CPU older than those it was measured on."""
    skip = pytest.mark.skipif(
        _jaxlib_version() < CPU_XLA,
        reason=f"XLA:CPU budgets measured on jaxlib >= {CPU_XLA}; this is {jax.lib.__version__}",
    )
    return pytest.mark.xla_budget(skip(test))


def temporaries(fn, *specs) -> int:
    """Bytes of XLA:CPU temporaries of ``jax.jit(fn)`` compiled for ``specs``."""
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


S = jax.ShapeDtypeStruct
BIG = (4096, 32768)
TEMP_CASES = {
    "plain": lambda x, t, w: jaxce.cross_entropy(x, t),
    "weight_smoothing": lambda x, t, w: jaxce.cross_entropy(x, t, w, label_smoothing=0.1),
    "none_sum": lambda x, t, w: jnp.sum(jaxce.cross_entropy(x, t, reduction="none")),
    "probabilities": lambda x, t, w: jaxce.cross_entropy(x, t),
    # Options beyond PyTorch: the cap alone is the case that needed a special spelling.
    "softcap": lambda x, t, w: jaxce.cross_entropy(x, t, logit_softcap=30.0),
    "z_where_aux": lambda x, t, w: jaxce.cross_entropy(
        x, t, w, where=t > 0, z_loss=1e-4, label_smoothing=0.1, return_aux=True
    )[0],
}


@cpu_budget
@pytest.mark.parametrize("transform", ["grad", "value_and_grad"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", list(TEMP_CASES))
def test_cpu_cross_entropy_temporaries_under_2_percent_of_logits(name, dtype, transform):
    x = S(BIG, dtype)
    # Probabilities come in as an argument: a softmax target built inside the function
    # would be measured too.
    t = S(BIG, dtype) if name == "probabilities" else S(BIG[:1], jnp.int32)
    w = S(BIG[1:], jnp.float32)
    temp = temporaries(getattr(jax, transform)(TEMP_CASES[name]), x, t, w)
    assert temp < 0.02 * BIG[0] * BIG[1] * 4, f"{temp / 2**20:.1f} MiB of temporaries"


@cpu_budget
def test_cpu_262144_classes_without_logits_sized_temporaries():
    fn = jax.value_and_grad(lambda x, y: jaxce.cross_entropy(x, y))
    temp = temporaries(fn, S((64, 262144), jnp.bfloat16), S((64,), jnp.int32))
    assert temp < 0.05 * 64 * 262144 * 4, f"{temp / 2**20:.1f} MiB"


@cpu_budget
def test_cpu_linear_without_logits_sized_temporaries():
    n, d, v = 4096, 64, 32768
    fn = jax.value_and_grad(
        lambda h, k, y: jaxce.linear_cross_entropy(h, k, y, chunk_size=1024), argnums=(0, 1)
    )
    temp = temporaries(fn, S((n, d), jnp.float32), S((d, v), jnp.float32), S((n,), jnp.int32))
    assert temp < 0.1 * n * v * 4, f"{temp / 2**20:.1f} MiB"


@cpu_budget
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_linear_at_liger_shape_under_5_percent_of_unfused(dtype):
    # value_and_grad wrt (hidden, kernel) at 16,384 tokens x 4,096 x 131,072. Measured with
    # jaxlib 0.10.2: 1.7 % float32, 3.6 % bfloat16.
    n, d, v = 16384, 4096, 131072
    specs = (S((n, d), dtype), S((d, v), dtype), S((n,), jnp.int32))

    def temp(loss):
        return temporaries(jax.value_and_grad(loss, argnums=(0, 1)), *specs)

    fused = temp(lambda h, k, y: jaxce.linear_cross_entropy(h, k, y))
    unfused = temp(lambda h, k, y: jaxce.cross_entropy(h @ k, y))
    assert fused < 0.05 * unfused, f"{fused / 2**20:.0f} of {unfused / 2**20:.0f} MiB"


@cpu_budget
@pytest.mark.parametrize(("n", "d", "v"), [(8, 256, 16384), (1, 64, 131072)])
def test_cpu_linear_few_tokens_bf16_temporaries_stay_small(n, d, v):
    # Few tokens make wide chunks; the identity-matmul transpose (chunk x chunk) is then
    # skipped. Measured when it was not: 512 MiB and 96 GiB; now 16 and 33 MiB.
    fn = jax.value_and_grad(lambda h, k, y: jaxce.linear_cross_entropy(h, k, y), (0, 1))
    temp = temporaries(fn, S((n, d), jnp.bfloat16), S((d, v), jnp.bfloat16), S((n,), jnp.int32))
    assert temp < 64 * 2**20, f"{temp / 2**20:.1f} MiB"
