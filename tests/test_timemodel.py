"""benchmarks/timemodel.py: FLOPs, bytes and trip counts read from optimized HLO.

Expected values are derived by hand from the programs' shapes; nothing here depends on the
calibration (the model is run at peak efficiency or with a made-up chip).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from benchmarks import cases, targets, timemodel

S = jax.ShapeDtypeStruct
M, K = 128, 7  # matrix side, loop trip count


def _loop(x, w):
    """K matmuls x @ w in a fori_loop (kept rolled by XLA:CPU)."""
    return jax.lax.fori_loop(0, K, lambda i, a: jnp.tanh(a @ w), x)


def _hlo(fn, *specs, target="cpu"):
    return targets.compile_for(target, fn, *specs).as_text()


@pytest.fixture(scope="module")
def loop_hlo():
    return _hlo(_loop, S((M, M), jnp.float32), S((M, M), jnp.float32))


def test_loop_of_k_matmuls_counts_k_times_one_matmul(loop_hlo):
    assert re.search(r'"known_trip_count":\{"n":"7"\}', loop_hlo), "XLA unrolled the loop"
    est = timemodel.estimate(loop_hlo, "cpu", timemodel.PEAK)
    assert est.flops == K * 2 * M * M * M  # one [M, M] @ [M, M]: 2·M³ FLOPs
    assert est.matmul_flops32 == est.flops  # float32 operands


def test_trip_count_read_from_the_condition_when_not_annotated(loop_hlo):
    """TPU HLO has no known_trip_count: the bound comes from the loop's condition."""
    bare = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", loop_hlo)
    assert "known_trip_count" not in bare
    comps, _entry = timemodel.parse(bare)
    loops = [i for c in comps.values() for i in c.instrs if i.op == "while"]
    assert [timemodel.trip_count(comps, w) for w in loops] == [K]
    assert timemodel.estimate(bare, "cpu", timemodel.PEAK).flops == K * 2 * M**3


def test_roofline_of_one_matmul_by_hand():
    """One [m, k] @ [k, n] float32 product on a made-up chip: the time is the larger of
    FLOPs / peak and bytes (both inputs read, the output written) / bandwidth."""
    m, k, n = 256, 512, 64
    hlo = _hlo(jnp.dot, S((m, k), jnp.float32), S((k, n), jnp.float32))
    flops, nbytes = 2 * m * k * n, 4 * (m * k + k * n + m * n)
    for flop_rate, bandwidth in ((1e12, 1e9), (1e9, 1e12)):  # memory-, then compute-bound
        chip = timemodel.Chip("made up", flop_rate, flop_rate, bandwidth, 1e9, "test")
        est = timemodel.estimate(hlo, chip, timemodel.PEAK)
        assert est.flops == flops
        assert est.bytes == nbytes
        assert est.seconds == pytest.approx(max(flops / flop_rate, nbytes / bandwidth))
    slow = timemodel.Efficiency(dot16=0.5, dot32=0.5, bw=0.5, launch_s=1e-3)
    est = timemodel.estimate(hlo, chip, slow)  # compute-bound: half the rate + one launch
    assert est.launches == 1
    assert est.seconds == pytest.approx(2 * flops / 1e9 + 1e-3)


def test_a_gather_of_one_element_per_row_moves_one_sector_per_row():
    """take_along_axis of one float32 per row of an [R, C] array: with a 32-byte sector the
    gather reads R sectors, not the R x C array; without one (TPUs) the whole array."""
    r, c = 512, 4096

    def pick(x, i):
        return jnp.take_along_axis(x, i[:, None], axis=1)[:, 0] + 1.0

    hlo = _hlo(pick, S((r, c), jnp.float32), S((r,), jnp.int32))
    assert re.search(r"\bgather\(", hlo), "XLA:CPU spelled the gather differently"

    def bytes_with(sector):
        chip = timemodel.Chip("made up", 1e12, 1e12, 1e12, 1e9, "test", sector)
        return timemodel.estimate(hlo, chip, timemodel.PEAK).bytes

    assert bytes_with(None) - bytes_with(32) == r * c * 4 - r * 32


def test_in_place_update_counts_the_update_not_the_buffer():
    """A loop writing row i of a [R, C] buffer: R updates of C floats, not R buffers."""
    r, c = 64, 4096

    def fill(buf, row):
        return jax.lax.fori_loop(
            0, r, lambda i, b: jax.lax.dynamic_update_slice(b, row[None] * i, (i, 0)), buf
        )

    hlo = _hlo(fill, S((r, c), jnp.float32), S((c,), jnp.float32))
    est = timemodel.estimate(hlo, "cpu", timemodel.PEAK)
    buffer = 4 * r * c
    assert est.bytes < 8 * buffer  # naive operand + output counting: 2·R buffers
    assert est.bytes >= 2 * buffer  # every row written once and its source read once


@pytest.mark.xla_budget
@pytest.mark.parametrize("target", [targets.TPU_V5P, targets.H100])
def test_device_matmul_work_of_the_materialised_loss(target):
    """value_and_grad of the materialised loss: one logits matmul forward, d-hidden and
    d-kernel backward = 3 × 2·N·D·V on the GPU and TPU compilers too."""
    if reason := targets.available(target):
        pytest.skip(f"compile-only target {target} unavailable: {reason}")
    n, d, v = 256, 128, 4096
    specs, variants, argnums, _ = cases.linear_case(n, d, v, "bfloat16")
    hlo = _hlo(jax.value_and_grad(variants["jaxce unfused"], argnums), *specs, target=target)
    assert timemodel.matmul_work(hlo, n, d, v) == pytest.approx(3.0)
    assert timemodel.estimate(hlo, target).seconds > 0


def _custom_call_module(backend_config: str) -> str:
    """A one-operation module: a [256, 512] @ [512, 1024] bfloat16 kernel as a custom call."""
    return "\n".join([
        "HloModule kernel",
        "",
        "ENTRY %main (p0: bf16[256,512], p1: bf16[512,1024]) -> f32[256,1024] {",
        "  %p0 = bf16[256,512]{1,0} parameter(0)",
        "  %p1 = bf16[512,1024]{1,0} parameter(1)",
        '  ROOT %k = f32[256,1024]{1,0} custom-call(%p0, %p1), custom_call_target="tpu_custom_'
        f'call", backend_config={backend_config}',
        "}",
    ])  # fmt: skip


@pytest.mark.parametrize("declared_bytes", [10_000_000, 1_000])
def test_a_kernel_is_modelled_from_the_cost_it_declares(declared_bytes):
    """A Pallas kernel's ``CostEstimate`` (in its backend config): its FLOPs count as
    matmul work of its first operand's class, its bytes as declared where they exceed its
    operands and output (2·256·512 + 2·512·1024 + 4·256·1024 = 2,359,296 bytes)."""
    flops = 2 * 256 * 512 * 1024
    cost = (
        f'{{"flops":"{flops}","transcendentals":"0","bytes_accessed":"{declared_bytes}",'
        '"remote_bytes_transferred":"0"}'
    )
    hlo = _custom_call_module(f'{{"custom_call_config":{{"body":"x","cost_estimate":{cost}}}}}')
    est = timemodel.estimate(hlo, "cpu", timemodel.PEAK)
    assert est.matmul_flops16 == flops
    assert est.matmul_flops32 == 0
    assert est.bytes == max(declared_bytes, 2_359_296)
    chip = timemodel.CHIPS["cpu"]
    assert est.seconds == pytest.approx(max(flops / chip.flops16, est.bytes / chip.bandwidth))


def test_a_kernel_without_a_declared_cost_counts_its_bytes_only():
    hlo = _custom_call_module('{"custom_call_config":{"body":"x"}}')
    est = timemodel.estimate(hlo, "cpu", timemodel.PEAK)
    assert est.flops == 0
    assert est.bytes == 2_359_296
