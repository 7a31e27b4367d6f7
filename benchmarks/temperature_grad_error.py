"""The dense loss's derivative in the temperature: relative error of ``d/dT`` of the
``'mean'`` loss and of ``aux.entropy`` against float64 autodiff of the formula, float32
and bfloat16 logits ``N(0, scale²)`` of 64 rows x 32,768 classes, ``T = 0.7``, beside
plain autodiff of the formula in float32.

    python -m benchmarks.temperature_grad_error

Results are in docs/guides/rl.md ("Numerics of d/dT in the dense loss").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

ROWS, CLASSES, T = 64, 32768, 0.7


def ours(x, y, t, which):
    loss, aux = jaxce.cross_entropy(x, y, temperature=t, return_entropy=True)
    return loss if which == "loss" else aux.entropy


def formula(x, y, t, which):
    """Plain autodiff of the formula, in float32 (bfloat16 read as float32) or float64."""
    logp = jax.nn.log_softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)) / t, axis=-1)
    if which == "loss":
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.integers(0, CLASSES, ROWS))
    grad_ours = jax.jit(jax.grad(ours, 2), static_argnums=3)
    grad_plain = jax.jit(jax.grad(formula, 2), static_argnums=3)
    print("dtype    scale which   dT (float64)  jaxce   plain autodiff")
    for dtype in (jnp.float32, jnp.bfloat16):
        for scale in (0.1, 1.0, 10.0, 100.0):
            x = jnp.asarray(rng.standard_normal((ROWS, CLASSES)) * scale).astype(dtype)
            for which in ("loss", "entropy"):
                ref = float(jax.grad(formula, 2)(x.astype(jnp.float64), y, 0.7, which))
                t = jnp.float32(T)
                errors = [
                    abs(float(g(x, y, t, which)) - ref) / abs(ref) for g in (grad_ours, grad_plain)
                ]
                print(
                    f"{jnp.dtype(dtype).name:8s} {scale:5g} {which:7s} {ref:11.3e}"
                    f"  {errors[0]:7.1e}  {errors[1]:7.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
