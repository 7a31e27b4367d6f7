"""A tiny character-level language model in Flax NNX, trained with ``jaxce``.

The model embeds characters, adds learned position embeddings, runs two small pre-norm
transformer blocks (causal self-attention and an MLP) and projects back onto the vocabulary
with the *tied* embedding matrix. The output projection and the loss are one call,
``jaxce.linear_cross_entropy(hidden, embedding.T, targets)``, so the ``[tokens, vocab]``
logits are never materialised, in the forward or the backward pass.

Run it with ``python examples/nnx_language_model.py``; it trains for a few dozen Adam steps
on ``examples/data/tiny_corpus.txt`` and prints the loss of every step.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxce

CORPUS = pathlib.Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"

CONTEXT = 64  # characters per training window
FEATURES = 64  # model width D
HEADS = 4
LAYERS = 2
BATCH = 16
LEARNING_RATE = 1e-2
EMBED_STD = 0.02  # small tied-embedding init: the first loss is close to log(vocab)

# One optax transformation for every run: ``nnx.Optimizer`` holds it as static data, so a
# fresh ``optax.adam(...)`` per run would make ``nnx.jit`` compile the train step again.
ADAM = optax.adam(LEARNING_RATE)


class Block(nnx.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP, both residual."""

    def __init__(self, features: int, heads: int, *, rngs: nnx.Rngs) -> None:
        self.attention_norm = nnx.LayerNorm(features, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=heads, in_features=features, decode=False, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(features, rngs=rngs)
        self.mlp_in = nnx.Linear(features, 4 * features, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * features, features, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """Applies the block to ``x`` of shape ``[B, T, D]`` under the attention ``mask``."""
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class LanguageModel(nnx.Module):
    """A causal character-level transformer whose output projection is the embedding."""

    def __init__(
        self,
        vocab_size: int,
        *,
        context: int = CONTEXT,
        features: int = FEATURES,
        heads: int = HEADS,
        layers: int = LAYERS,
        rngs: nnx.Rngs,
    ) -> None:
        init = nnx.initializers.normal(stddev=EMBED_STD)
        self.embed = nnx.Embed(vocab_size, features, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(context, features, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List([Block(features, heads, rngs=rngs) for _ in range(layers)])
        self.final_norm = nnx.LayerNorm(features, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states ``[B, T, D]`` for integer ``tokens`` of shape ``[B, T]``."""
        positions = jnp.arange(tokens.shape[-1])
        x = self.embed(tokens) + self.position(positions)[None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x)

    def loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean next-token cross-entropy, with the tied projection fused into the loss."""
        kernel = self.embed.embedding[...].T  # [D, V]: the embedding matrix, transposed
        return jaxce.linear_cross_entropy(self.hidden(tokens), kernel, targets)


def load_corpus(path: pathlib.Path = CORPUS) -> tuple[np.ndarray, list[str]]:
    """Reads a text file and encodes it character by character.

    Args:
      path: the text file.

    Returns:
      The encoded text (int32 class indices) and the vocabulary (sorted characters).
    """
    text = path.read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {char: i for i, char in enumerate(vocab)}
    return np.array([index[char] for char in text], dtype=np.int32), vocab


def sample_batch(
    data: np.ndarray, rng: np.random.Generator, batch: int = BATCH, context: int = CONTEXT
) -> tuple[jax.Array, jax.Array]:
    """Draws ``batch`` random fixed-length windows and their next-character targets.

    Args:
      data: the encoded text.
      rng: the NumPy generator that picks the window starts.
      batch: number of windows.
      context: window length.

    Returns:
      ``(tokens, targets)``, both int32 ``[batch, context]``; ``targets`` is ``tokens``
      shifted left by one character. Every window is full, so nothing is padded or ignored.
    """
    starts = rng.integers(0, len(data) - context - 1, size=batch)
    windows = np.stack([data[start : start + context + 1] for start in starts])
    return jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])


@nnx.jit
def train_step(
    model: LanguageModel, optimizer: nnx.Optimizer, tokens: jax.Array, targets: jax.Array
) -> jax.Array:
    """One Adam step on ``model`` (updated in place); returns the loss before the step."""
    loss, grads = nnx.value_and_grad(lambda m: m.loss(tokens, targets))(model)
    optimizer.update(model, grads)
    return loss


def main(steps: int = 40, seed: int = 0) -> list[float]:
    """Trains a fresh model on the tiny corpus.

    Args:
      steps: number of optimiser steps.
      seed: seeds both the parameter initialisation and the batch sampling, so the run is
        deterministic.

    Returns:
      The training loss of every step (before that step's update).
    """
    data, vocab = load_corpus()
    model = LanguageModel(len(vocab), rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, ADAM, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        tokens, targets = sample_batch(data, rng)
        losses.append(float(train_step(model, optimizer, tokens, targets)))
    return losses


if __name__ == "__main__":
    _, corpus_vocab = load_corpus()
    print(f"vocab {len(corpus_vocab)} characters, log(vocab) = {np.log(len(corpus_vocab)):.4f}")
    for step, value in enumerate(main()):
        print(f"step {step:3d}  loss {value:.4f}")
