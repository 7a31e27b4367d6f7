"""The examples under ``examples/`` run and learn (loaded by path: they are scripts)."""

import contextlib
import importlib.util
import math
import pathlib
import sys
from collections.abc import Iterator
from types import ModuleType

import jax
import pytest
from cases import enable_x64

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>.py`` as a module without making ``examples`` a package."""
    spec = importlib.util.spec_from_file_location(f"jaxce_examples.{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def user_config() -> Iterator[None]:
    """JAX's default dtype settings, as ``python examples/...`` runs under.

    The suite enables float64 and strict dtype promotion (``conftest.py``) to catch promotion
    bugs in jaxce. Optax's Adam bias correction computes ``decay ** count`` (a Python float
    to the power of an int32 step count), which strict promotion rejects, so the examples run
    with the defaults; rank promotion stays ``"raise"``.
    """
    with enable_x64(False), jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def nnx_example() -> ModuleType:
    """The NNX example, imported once so its jitted train step compiles once."""
    return load_example("nnx_language_model")


def test_nnx_language_model_learns(nnx_example: ModuleType):
    example = nnx_example  # FEATURES, EMBED_STD, load_corpus and main come from the script
    _, vocab = example.load_corpus()
    with user_config():
        losses = example.main()

    assert len(losses) == 40
    assert all(math.isfinite(loss) for loss in losses)

    # A fresh model predicts nearly uniformly. The final LayerNorm (scale 1, bias 0) gives
    # hidden states with unit-variance features, and the tied embedding rows are
    # N(0, EMBED_STD^2), so each logit h . e_c is about N(0, s^2) with s^2 = D EMBED_STD^2.
    # Then E[logsumexp(z) - z_y] = log V + s^2 / 2 + O(s^4), which for D = 64 and
    # EMBED_STD = 0.02 is log V + 0.013; allow that plus 0.05 for batch-to-batch noise.
    log_vocab = math.log(len(vocab))
    spread = example.FEATURES * example.EMBED_STD**2
    assert abs(losses[0] - (log_vocab + spread / 2)) < spread / 2 + 0.05, (losses[0], log_vocab)

    # ... and training lowers the loss clearly (the last steps average under 80 % of it).
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses


def test_nnx_language_model_is_deterministic(nnx_example: ModuleType):
    with user_config():
        first, second = nnx_example.main(steps=3, seed=1), nnx_example.main(steps=3, seed=1)
    assert first == second
    with user_config():
        assert nnx_example.main(steps=3, seed=2) != first  # the seed matters
