"""PyTorch's own OpInfo samples for ``nn.functional.linear_cross_entropy`` (every variant:
the reference path and the two chunked ones), run against ``jaxce.linear_cross_entropy``
with the natural call: values and every gradient torch gives (input, kernel, bias, and
class-probability targets), and torch's error inputs.

torch's ``linear_weight`` is ``[C, d1, ..., dK, D]``; jaxce's kernel is the same array with
``D`` moved to the front (``jnp.moveaxis(w, -1, 0)``, Flax ``DenseGeneral``'s layout).
"""

from __future__ import annotations

import functools
import warnings

import jax.numpy as jnp
import pytest

import jaxce
from parity.compare import compare

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402

pytestmark = pytest.mark.torch

OPS = {op.variant_test_name or "reference": op for op in op_db if op.name == "nn.functional.linear_cross_entropy"}  # fmt: skip
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@functools.cache
def _samples(variant: str, dtype: str) -> tuple:
    # Drawn once per process (collection already needs them; torch takes ~1 s to draw a
    # variant's samples) and only read by the tests: they compare on NumPy copies.
    torch.manual_seed(0)  # make_tensor draws from torch's global generator
    return tuple(OPS[variant].sample_inputs("cpu", DTYPES[dtype], requires_grad=True))


def _cases():
    for variant in sorted(OPS):
        for dtype in ("float64", "float32"):
            for i, s in enumerate(_samples(variant, dtype)):
                kw = {k: v for k, v in s.kwargs.items() if k != "options"}
                shapes = "x".join(str(tuple(t.shape)) for t in (s.input, *s.args))
                desc = ",".join(f"{k}={'T' if hasattr(v, 'shape') else v}" for k, v in kw.items())
                # The default suite: every float64 sample of the reference path and every
                # sixth of the chunked ones (jaxce sees the same calls there); the rest
                # with -m slow.
                full = dtype == "float64" and (variant == "reference" or i % 6 == 0)
                marks = () if full else pytest.mark.slow
                yield pytest.param(
                    variant, dtype, i, id=f"{variant}-{dtype}-{i}-{shapes}-{desc}", marks=marks
                )


def _numpy(t):
    return t.detach().numpy()


@pytest.mark.parametrize(("variant", "dtype", "index"), list(_cases()))
def test_opinfo_sample(variant, dtype, index):
    sample = _samples(variant, dtype)[index]
    target = sample.args[1]
    kwargs = dict(sample.kwargs)
    options = kwargs.pop("options", None)
    inputs = {
        "hidden": _numpy(sample.input),
        "kernel": _numpy(sample.args[0]),
        "target": _numpy(target),
    }
    for name, key in (("bias", "linear_bias"), ("weight", "weight")):
        if key in kwargs:
            inputs[name] = _numpy(kwargs.pop(key))
    grad_wrt = ["hidden", "kernel"] + (["bias"] if "bias" in inputs else [])
    if target.is_floating_point():
        grad_wrt.append("target")

    def torch_fn(hidden, kernel, target, bias=None, weight=None):
        with warnings.catch_warnings():  # torch's own fallback notes for some samples
            warnings.simplefilter("ignore")
            return torch.nn.functional.linear_cross_entropy(
                hidden, kernel, target, linear_bias=bias, weight=weight, options=options,
                **kwargs,
            )  # fmt: skip

    def jax_fn(hidden, kernel, target, bias=None, weight=None):
        return jaxce.linear_cross_entropy(
            hidden, jnp.moveaxis(kernel, -1, 0), target, weight, bias=bias, **kwargs
        )

    # torch's samples draw from [-9, 9]: logits reach ~100 and gradients ~10, so float32
    # rounding alone (jaxce's materialised loss included) moves a gradient entry by a few
    # 1e-6 -- above the default float32 atol of 2e-6 (seen: 4.6e-6 fused, 3.2e-6
    # materialised, 1.8e-6 torch, on values of 12, against torch's float64).
    tolerance = (2e-5, 1e-5) if dtype == "float32" else None
    result = compare(
        jax_fn, torch_fn, inputs, grad_wrt=grad_wrt, dtype=dtype, seed=index, tolerance=tolerance
    )
    assert result.passed, result.message
    assert not result.error_parity, "torch raised on its own sample"


@functools.cache
def _error_inputs():
    return tuple(OPS["reference"].error_inputs("cpu"))


@pytest.mark.parametrize("index", range(6))
def test_opinfo_error_inputs_raise(index):
    """Every input torch rejects, jaxce rejects with a ValueError or TypeError (jaxce takes
    ``hidden [..., D]`` of any rank, so torch's 3-d input is rejected by its target shape)."""
    errors = _error_inputs()
    assert len(errors) == 6
    sample = errors[index].sample_input
    kwargs = dict(sample.kwargs)
    bias = kwargs.pop("linear_bias", None)
    kernel = jnp.moveaxis(jnp.asarray(_numpy(sample.args[0])), -1, 0)
    with pytest.raises((ValueError, TypeError)):
        jaxce.linear_cross_entropy(
            jnp.asarray(_numpy(sample.input)), kernel, jnp.asarray(_numpy(sample.args[1])),
            bias=None if bias is None else jnp.asarray(_numpy(bias)), **kwargs,
        )  # fmt: skip
