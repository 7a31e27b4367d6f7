"""Porting from PyTorch: the same training run in PyTorch and in Flax NNX + jaxce.

A tiny sequence classifier (``Linear -> GELU -> Linear``, logits ``[B, T, C]``) is created
once in NumPy float32 with a fixed seed, loaded into a ``torch.nn.Module`` and into a
``flax.nnx.Module``, and trained for ``steps`` plain-SGD steps on identical data on both
sides:

* PyTorch: ``torch.nn.CrossEntropyLoss(weight, ignore_index=..., label_smoothing=...)`` and
  ``torch.optim.SGD``;
* JAX: ``jaxce.cross_entropy(logits, target, weight, ignore_index, "mean", label_smoothing)``
  and ``optax.sgd`` through ``nnx.Optimizer``.

With ``fused=True`` the output layer and the loss are one call on each side:
``torch.nn.functional.linear_cross_entropy(hidden, out.weight, target, linear_bias=out.bias,
...)`` versus ``jaxce.linear_cross_entropy(hidden, out.kernel, target, ..., bias=out.bias)``
(torch's weight is ``[C, H]``, the Flax kernel is its transpose ``[H, C]``). Torch runs with its
default ``options=None`` (its reference path, ``linear`` then ``cross_entropy``): its chunked
``LinearCrossEntropyOptions`` path does not support ``label_smoothing``.

The per-step losses and the final parameters agree to float32 rounding. Porting notes that
matter for that:

* ``torch.nn.Linear`` computes ``x @ W.T + b``; ``nnx.Linear`` computes ``x @ kernel + b``,
  so ``kernel = W.T``.
* ``torch.nn.functional.gelu`` is the exact (erf) GELU; ``jax.nn.gelu`` defaults to the tanh
  approximation, so pass ``approximate=False``.
* ``torch.nn.CrossEntropyLoss`` wants the class axis at dim 1 (``[B, C, T]``); jaxce takes
  ``axis=-1`` by default (or ``axis=1`` for ``[B, C, T]`` logits).
* ``torch.nn.functional.linear_cross_entropy`` accepts only 1-D or 2-D ``input``, so the
  torch side flattens ``[B, T, H]`` to ``[B*T, H]``; jaxce takes ``[..., H]`` as is.
* On GPUs JAX's default float32 matmul precision may use TF32; the JAX side runs under
  ``jax.default_matmul_precision("highest")`` so that it matches torch's float32 matmuls.

Run ``python examples/torch_training_parity.py`` to print the comparison tables.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import jaxce

BATCH, SEQ, FEATURES, HIDDEN, CLASSES = 4, 6, 8, 32, 11
LEARNING_RATE = 0.5
SEED = 0

# Parameter names (torch's ``state_dict`` names, torch layout) compared at the end.
PARAM_NAMES = ("hidden.weight", "hidden.bias", "out.weight", "out.bias")


def make_problem(ignore_index: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Initial weights (torch layout) and data, created once in NumPy float32.

    Args:
      ignore_index: written into a fixed set of target positions (padding).
      seed: NumPy seed.

    Returns:
      ``hidden.weight [H, F]``, ``hidden.bias [H]``, ``out.weight [C, H]``, ``out.bias [C]``,
      ``x [B, T, F]``, ``target [B, T]`` (int64) and ``class_weight [C]``.
    """
    rng = np.random.default_rng(seed)

    def uniform(shape: tuple[int, ...], bound: float) -> np.ndarray:
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    target = rng.integers(0, CLASSES, (BATCH, SEQ)).astype(np.int64)
    target[0, -2:] = ignore_index  # padded tail of the first sequence
    target[2, 1] = ignore_index
    return {
        # torch.nn.Linear's default init bounds, 1 / sqrt(fan_in).
        "hidden.weight": uniform((HIDDEN, FEATURES), FEATURES**-0.5),
        "hidden.bias": uniform((HIDDEN,), FEATURES**-0.5),
        "out.weight": uniform((CLASSES, HIDDEN), HIDDEN**-0.5),
        "out.bias": uniform((CLASSES,), HIDDEN**-0.5),
        "x": rng.normal(size=(BATCH, SEQ, FEATURES)).astype(np.float32),
        "target": target,
        "class_weight": rng.uniform(0.5, 2.0, CLASSES).astype(np.float32),
    }


class TorchModel(torch.nn.Module):
    """``Linear -> GELU -> Linear`` in PyTorch."""

    def __init__(self, problem: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, CLASSES)
        self.load_state_dict({name: torch.from_numpy(problem[name]) for name in PARAM_NAMES})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, F] -> [B, T, H]``."""
        return torch.nn.functional.gelu(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, F] -> [B, T, C]`` logits."""
        return self.out(self.features(x))


def _constant(value: np.ndarray) -> Any:
    """An ``nnx`` initializer that returns ``value`` (shape and dtype checked)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        if tuple(shape) != value.shape or jnp.dtype(dtype) != value.dtype:
            raise ValueError(f"expected {value.shape} {value.dtype}, got {shape} {dtype}")
        return jnp.asarray(value)

    return init


class FlaxModel(nnx.Module):
    """The same model in Flax NNX, with ``kernel = W.T``."""

    def __init__(self, problem: dict[str, np.ndarray]) -> None:
        rngs = nnx.Rngs(0)  # unused: every parameter comes from ``problem``
        self.hidden = nnx.Linear(
            FEATURES,
            HIDDEN,
            kernel_init=_constant(problem["hidden.weight"].T),
            bias_init=_constant(problem["hidden.bias"]),
            rngs=rngs,
        )
        self.out = nnx.Linear(
            HIDDEN,
            CLASSES,
            kernel_init=_constant(problem["out.weight"].T),
            bias_init=_constant(problem["out.bias"]),
            rngs=rngs,
        )

    def features(self, x: jax.Array) -> jax.Array:
        """``[B, T, F] -> [B, T, H]``; exact GELU like torch's default."""
        return jax.nn.gelu(self.hidden(x), approximate=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, F] -> [B, T, C]`` logits."""
        return self.out(self.features(x))

    def torch_state(self) -> dict[str, np.ndarray]:
        """Parameters under torch's names and in torch's layout (``W = kernel.T``)."""
        return {
            "hidden.weight": np.asarray(self.hidden.kernel[...]).T,
            "hidden.bias": np.asarray(self.hidden.bias[...]),
            "out.weight": np.asarray(self.out.kernel[...]).T,
            "out.bias": np.asarray(self.out.bias[...]),
        }


def _train_torch(
    problem: dict[str, np.ndarray],
    steps: int,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    fused: bool,
) -> tuple[list[float], dict[str, np.ndarray]]:
    model = TorchModel(problem)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    x = torch.from_numpy(problem["x"])
    target = torch.from_numpy(problem["target"])
    w = None if weight is None else torch.from_numpy(weight)
    criterion = torch.nn.CrossEntropyLoss(
        weight=w, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        if fused:
            hidden = model.features(x).reshape(-1, HIDDEN)  # torch wants 2-D input here
            loss = torch.nn.functional.linear_cross_entropy(
                hidden,
                model.out.weight,
                target.reshape(-1),
                linear_bias=model.out.bias,
                weight=w,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
            )
        else:
            loss = criterion(model(x).permute(0, 2, 1), target)  # class axis at dim 1
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state = {name: p.detach().numpy().copy() for name, p in model.state_dict().items()}
    return losses, state


def _train_jax(
    problem: dict[str, np.ndarray],
    steps: int,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    fused: bool,
) -> tuple[list[float], dict[str, np.ndarray]]:
    model = FlaxModel(problem)
    optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
    x = jnp.asarray(problem["x"])
    target = jnp.asarray(problem["target"].astype(np.int32))
    w = None if weight is None else jnp.asarray(weight)

    def loss_fn(model: FlaxModel) -> jax.Array:
        if fused:
            return jaxce.linear_cross_entropy(
                model.features(x),
                model.out.kernel[...],
                target,
                w,
                ignore_index,
                "mean",
                label_smoothing,
                bias=model.out.bias[...],
            )
        return jaxce.cross_entropy(model(x), target, w, ignore_index, "mean", label_smoothing)

    @nnx.jit
    def train_step(model: FlaxModel, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    with jax.default_matmul_precision("highest"):
        for _ in range(steps):
            losses.append(float(train_step(model, optimizer)))
    return losses, model.torch_state()


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|`` (normwise, so near-zero entries do not blow it up)."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(
    steps: int = 10,
    *,
    class_weight: bool = True,
    ignore_index: int = 0,
    label_smoothing: float = 0.1,
    fused: bool = False,
) -> dict[str, Any]:
    """Trains the model ``steps`` SGD steps in PyTorch and in JAX and compares the two.

    Args:
      steps: number of optimiser steps.
      class_weight: pass per-class weights to the loss.
      ignore_index: the loss's ``ignore_index``; some target positions are set to it.
      label_smoothing: the loss's ``label_smoothing``.
      fused: fuse the output layer into the loss (``linear_cross_entropy`` on both sides).

    Returns:
      ``torch_loss`` and ``jax_loss`` (the loss at each step, before its update),
      ``loss_max_abs_diff``/``loss_max_rel_diff`` over the steps, the final parameters
      ``torch_params``/``jax_params`` (torch names and layout), and
      ``param_max_abs_diff``/``param_max_rel_diff`` (max over the tensors; the relative
      one is normwise, ``max|a - b| / max|b|`` per tensor).
    """
    problem = make_problem(ignore_index)
    weight = problem["class_weight"] if class_weight else None
    options = (steps, weight, ignore_index, label_smoothing, fused)
    torch_loss, torch_params = _train_torch(problem, *options)
    jax_loss, jax_params = _train_jax(problem, *options)
    t, j = np.asarray(torch_loss), np.asarray(jax_loss)
    return {
        "torch_loss": torch_loss,
        "jax_loss": jax_loss,
        "loss_max_abs_diff": float(np.max(np.abs(t - j))),
        "loss_max_rel_diff": float(np.max(np.abs(t - j) / np.abs(t))),
        "torch_params": torch_params,
        "jax_params": jax_params,
        "param_max_abs_diff": max(
            float(np.max(np.abs(jax_params[n] - torch_params[n]))) for n in PARAM_NAMES
        ),
        "param_max_rel_diff": max(_max_rel(jax_params[n], torch_params[n]) for n in PARAM_NAMES),
    }


CONFIGS: dict[str, dict[str, Any]] = {
    "weight + ignore_index=0 + label_smoothing=0.1, cross_entropy": {},
    "weight + ignore_index=0 + label_smoothing=0.1, linear_cross_entropy": {"fused": True},
    "defaults (ignore_index=-100), cross_entropy": {
        "class_weight": False,
        "ignore_index": -100,
        "label_smoothing": 0.0,
    },
    "defaults (ignore_index=-100), linear_cross_entropy": {
        "class_weight": False,
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "fused": True,
    },
}


def main() -> None:
    """Prints a per-step table and the final parameter differences for each configuration."""
    for title, config in CONFIGS.items():
        result = run(**config)
        print(f"\n{title}\n")
        print("| step | torch loss | jaxce loss | abs diff |")
        print("|-----:|-----------:|-----------:|---------:|")
        for step, (t, j) in enumerate(zip(result["torch_loss"], result["jax_loss"], strict=True)):
            print(f"| {step} | {t:.7f} | {j:.7f} | {abs(t - j):.1e} |")
        print(
            f"\nmax loss diff: abs {result['loss_max_abs_diff']:.1e}, "
            f"rel {result['loss_max_rel_diff']:.1e}; "
            f"final parameters: max abs diff {result['param_max_abs_diff']:.1e}, "
            f"max rel diff {result['param_max_rel_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
