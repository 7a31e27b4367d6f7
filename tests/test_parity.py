"""The parity harness: its comparison core, its CLI, and the --quick grid (marked parity)
under every implementation."""

from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cases import DENSE_IMPLEMENTATIONS  # noqa: E402

from jaxce._backends import IMPLEMENTATIONS, default_implementation  # noqa: E402
from parity import compare  # noqa: E402
from parity.__main__ import main  # noqa: E402
from parity.runner import run_one, select_cases  # noqa: E402
from parity.suites import SUITES  # noqa: E402

X = np.random.default_rng(0).standard_normal((4, 3))


def test_compare_passes_equal_functions_with_gradients():
    r = compare(
        lambda x: jnp.tanh(x).sum(), lambda x: torch.tanh(x).sum(), {"x": X}, ("x",), "float64"
    )
    assert r.passed, r.message
    assert [c.name for c in r.checks] == ["output", "d/dx"]


def test_compare_catches_a_wrong_gradient():
    # Same values, different gradient: x vs a straight-through copy of x.
    def jax_fn(x):
        return jnp.sum(x**2)

    def torch_fn(x):
        return torch.sum(x.detach() ** 2 + x - x.detach())

    r = compare(jax_fn, torch_fn, {"x": X}, ("x",), "float64")
    assert not r.passed
    assert "d/dx" in r.message


def test_compare_catches_nan_placement_and_dtype():
    r = compare(lambda x: jnp.log(x), lambda x: torch.log(torch.abs(x)), {"x": X}, (), "float64")
    assert not r.passed
    assert "NaN placement" in r.message
    r = compare(lambda x: x.astype(jnp.float32), lambda x: x, {"x": X}, (), "float64")
    assert not r.passed
    assert "output dtype float32 != torch's float64" in r.message


def test_compare_catches_a_gradient_in_another_dtype():
    # A custom_vjp may return a gradient in another dtype than its input's; torch's
    # gradients always have their input's dtype.
    @jax.custom_vjp
    def f(x):
        return jnp.sum(x)

    f.defvjp(lambda x: (jnp.sum(x), None), lambda _, g: (jnp.full(X.shape, g, jnp.float64),))
    r = compare(f, lambda x: torch.sum(x), {"x": X}, ("x",), "float32")
    assert not r.passed
    assert "d/dx dtype float64 != torch's float32" in r.message


def test_compare_tolerance_overrides_the_dtype_default():
    def jax_fn(x):
        return x * (1 + 1e-7)

    assert compare(jax_fn, lambda x: x, {"x": X}, (), "float32").passed
    strict = compare(jax_fn, lambda x: x, {"x": X}, (), "float32", tolerance=(1e-8, 0.0))
    assert not strict.passed
    assert "rtol 1e-08, atol 0.0" in strict.message


def test_compare_error_parity():
    both = compare(lambda x: jnp.reshape(x, (5,)), lambda x: x.reshape(5), {"x": X}, (), "float64")
    assert both.passed
    assert both.error_parity
    one = compare(lambda x: x, lambda x: x.reshape(5), {"x": X}, (), "float64")
    assert not one.passed
    assert "torch raises" in one.message


def test_three_way_rule_fails_a_worse_than_torch_low_precision_result():
    x = np.linspace(-3, 3, 64)
    good = compare(lambda x: jnp.exp(x), lambda x: torch.exp(x), {"x": x}, (), "bfloat16")
    assert good.passed, good.message
    bad = compare(lambda x: jnp.exp(x) * 1.05, lambda x: torch.exp(x), {"x": x}, (), "bfloat16")
    assert not bad.passed
    assert bad.checks[-1].torch_err is not None


def test_vmap_transform_matches_a_torch_loop():
    xs = np.random.default_rng(1).standard_normal((3, 4, 5))
    r = compare(
        lambda x: jnp.sum(jnp.sin(x), axis=-1),
        lambda x: torch.sum(torch.sin(x), dim=-1),
        {"x": xs},
        ("x",),
        "float32",
        transform="vmap",
        batched=("x",),
    )
    assert r.passed, r.message


def test_grid_covers_every_option_layout_dtype_and_transform():
    cases = SUITES["cross_entropy"]()
    ids = " ".join(c.id for c in cases)
    assert len(cases) >= 2000
    for token in ["index|", "prob|", "w=none", "w=random", "w=some-zero", "ii=absent", "ii=present",
                  "ii=valid-class", "ii=out-of-range", "ii=all", "|none|", "|mean|", "|sum|",
                  "ls=0.0", "ls=0.05", "ls=1.0", "(C,)", "(N,C)", "(N,C,d1)", "(N,C,d1,d2)",
                  "channels-last", "float64", "float32", "bfloat16", "float16", "eager", "jit",
                  "vmap", "-inf non-target", "±1e4", "C=1", "N=0", "(3,423)", "CrossEntropyLoss"]:  # fmt: skip
        assert token in ids, token
    assert sum(c.category == "error parity" for c in cases) >= 10


def test_cli_writes_reports_and_exit_status(tmp_path):
    status = main(
        ["--filter", "CrossEntropyLoss|sum", "--jobs", "1", "--no-progress", "--out", str(tmp_path)]
    )
    assert status == 0
    data = json.loads((tmp_path / "parity.json").read_text())
    assert data["summary"][-1]["failed"] == 0
    assert data["summary"][-1]["cases"] == len(data["cases"]) > 0
    markdown = (tmp_path / "parity.md").read_text()
    assert "| module |" in markdown
    assert "## Failures (0)" in markdown


QUICK = select_cases(sorted(SUITES), quick=True)
_ALL = {name: build() for name, build in SUITES.items()}
# The option grid's own cases are sampled once, by test_torch.py's pairwise covers (every
# implementation, every option value); here, the harness's other categories: transforms,
# edge inputs, the module form, the fused loss, error parity.
OPTION_GRID = ("index targets", "prob targets")


def _quick_params():
    # Half of the --quick tenth (a fixed hash split) by default, the other half marked
    # slow; each case under every implementation (error parity, which raises before any
    # pass runs, under the automatic one only; a dense loss's case under those whose dense
    # program is one of its own, tests/cases.py's DENSE_IMPLEMENTATIONS).
    params = []
    for key in QUICK:
        case = _ALL[key[0]][key[1]]
        if case.category in OPTION_GRID:
            continue
        errors = case.category == "error parity"
        slow = zlib.crc32(case.id.encode()) % 20 and not errors
        fused = case.category == "linear_cross_entropy"
        implementations = IMPLEMENTATIONS if fused else DENSE_IMPLEMENTATIONS
        for implementation in (None,) if errors else implementations:
            params.append(
                pytest.param(
                    key,
                    implementation,
                    id=case.id + ("" if implementation is None else f"|{implementation}"),
                    marks=(pytest.mark.slow,) if slow else (),
                )
            )
    return params


@pytest.mark.parity
@pytest.mark.parametrize(("key", "implementation"), _quick_params())
def test_quick_grid_case(key, implementation):
    with default_implementation(implementation):
        result = run_one(key)
    assert result["passed"], result["message"]
    assert zlib.crc32(result["id"].encode()) % 10 == 0 or result["category"] == "error parity"
