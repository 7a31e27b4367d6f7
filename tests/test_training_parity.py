"""Training parity with PyTorch: the same model, weights, data and SGD steps give the same
losses and parameters in PyTorch and in Flax NNX + jaxce (``examples/torch_training_parity.py``).
"""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("flax")

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "torch_training_parity.py"
_spec = importlib.util.spec_from_file_location("torch_training_parity", _SCRIPT)
assert _spec is not None
assert _spec.loader is not None
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

STEPS = 10

# Tolerances. Both sides compute in float32 (eps = 1.2e-7) but with different kernels:
# torch's CPU GEMM / log-softmax and XLA's reductions sum in different orders, so each
# loss and gradient differs by a few ulp, and SGD carries that into the next step's
# parameters. Measured over 10 steps: losses within 5e-7 abs / 3e-7 rel, final parameters
# within 1e-7 abs / 2e-7 rel (normwise) -- i.e. 1-4 ulp. The bounds below leave a 20-50x
# margin for other CPUs / BLAS builds while staying far below any real semantic mismatch
# (the tanh-approximate GELU instead of the exact one alone already differs by ~1e-4).
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6

OPTIONS = {
    "weight-ignore0-smooth0.1": {"class_weight": True, "ignore_index": 0, "label_smoothing": 0.1},
    "defaults": {"class_weight": False, "ignore_index": -100, "label_smoothing": 0.0},
}


@pytest.mark.torch
@pytest.mark.parametrize("fused", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_training_parity(options, fused):
    result = parity.run(STEPS, fused=fused, **options)
    torch_loss = np.asarray(result["torch_loss"])
    jax_loss = np.asarray(result["jax_loss"])
    assert torch_loss.shape == jax_loss.shape == (STEPS,)

    # Per-step losses agree.
    np.testing.assert_allclose(jax_loss, torch_loss, rtol=LOSS_RTOL, atol=LOSS_ATOL)

    # Final parameters agree (torch names and layout on both sides).
    assert set(result["jax_params"]) == set(result["torch_params"]) == set(parity.PARAM_NAMES)
    for name in parity.PARAM_NAMES:
        np.testing.assert_allclose(
            result["jax_params"][name],
            result["torch_params"][name],
            rtol=PARAM_RTOL,
            atol=PARAM_ATOL,
            err_msg=name,
        )
    assert result["param_max_abs_diff"] < PARAM_ATOL

    # Training happened: the loss goes down step by step and the parameters moved far more
    # than the tolerance.
    assert np.all(np.diff(torch_loss) < 0)
    assert torch_loss[-1] < 0.8 * torch_loss[0]
    initial = parity.make_problem(options["ignore_index"])
    moved = max(np.max(np.abs(result["torch_params"][n] - initial[n])) for n in parity.PARAM_NAMES)
    assert moved > 1e-2


@pytest.mark.torch
def test_ignored_positions_present():
    """Both option sets really exercise ``ignore_index`` (some targets equal it)."""
    for options in OPTIONS.values():
        target = parity.make_problem(options["ignore_index"])["target"]
        assert 0 < np.sum(target == options["ignore_index"]) < target.size
