"""A roofline time model read from a compiled program's optimized HLO.

For accelerators we cannot run on, :func:`analyse` reads ``compiled.as_text()`` (a
compile-only program from :mod:`benchmarks.targets`) and sums, over every top-level
operation (a fusion, a library GEMM, a copy …), with every ``while`` body weighted by its
trip count:

* FLOPs of the matrix products inside it: ``dot``: 2 × output elements × the product of
  the lhs contracting dimensions; ``convolution`` (TPU's form of a matmul): 2 × output
  elements × the kernel's input-feature and spatial sizes (read from ``dim_labels``) ÷
  ``feature_group_count``; cuBLAS ``custom-call``\\ s: like ``dot``, from the backend config;
* HBM bytes: its operands and outputs (an operand read only through a (dynamic-)slice
  counts the slice; an in-place ``dynamic-update-slice`` counts the update, not the buffer;
  on a chip with a :attr:`Chip.gather_sector` (GPUs), an operand read only through a
  gather counts a sector per gathered element);
* a roofline time ``max(flops / (peak_flops · eff_dot), bytes / (peak_bw · eff_bw)) +
  launch`` per operation, summed.

Trip counts: CPU and GPU HLO carry ``backend_config={"known_trip_count":{"n":"…"}}``;
TPU HLO does not, so the bound is read from the loop's condition computation (the integer
constant its ``compare`` tests the induction variable against).

The efficiencies and the per-kernel launch cost are fitted per chip to tokamax's published
measurements of its ``xla`` and ``chunked_xla`` losses (``python -m
benchmarks.timemodel_calibrate --chip h100|v5p|v6e --fit``): on the H100 every modelled
chunked/xla time ratio is within 20 % of the measured one (56 shapes), on TPU v5p within
10 % (16 shapes) and on v6e within 28 % (18 shapes). What the model leaves out: overlap of
independent kernels, caches (L2, VMEM reuse across loop iterations), GEMM efficiency that
depends on the GEMM's shape (one fraction per operand class), and the cost of anything XLA
hides inside an opaque custom-call: a Pallas/Mosaic kernel counts its operands' bytes, or,
where it declares a ``CostEstimate``, the FLOPs and bytes it declares (one operation,
``max(compute, memory)``: a kernel overlaps its DMAs with its matmuls).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

# Peak numbers: dense (no sparsity) 16-bit matrix throughput and HBM bandwidth.
# * H100 SXM5 80GB: 989.4 TFLOP/s dense BF16/FP16 Tensor Core (1979 "with sparsity" in
#   NVIDIA's H100 datasheet), 494.7 dense TF32 (989 with sparsity); 3.35 TB/s HBM3. NVIDIA
#   H100 Tensor Core GPU datasheet / Hopper architecture whitepaper (vendor spec sheet).
# * TPU v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s (https://cloud.google.com/tpu/docs/v5e);
#   TPU v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2765 GB/s (https://cloud.google.com/tpu/docs/v5p);
#   TPU v6e (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s
#   (https://cloud.google.com/tpu/docs/v6e). TPUs have no separate float32 matmul rate in
#   these tables: XLA:TPU runs float32 matmuls at DEFAULT precision as one bf16 pass, so
#   they are modelled at the bf16 rate (the fitted ``dot32`` absorbs the difference).
# * CPU: a nominal figure, only so that tests can run the model on XLA:CPU's HLO.


@dataclass(frozen=True)
class Chip:
    name: str
    flops16: float  # dense bf16/fp16 matmul FLOP/s
    flops32: float  # float32 matmul FLOP/s (TF32 on NVIDIA GPUs at DEFAULT precision)
    bandwidth: float  # HBM bytes/s
    hbm: float  # bytes
    source: str
    # Bytes a gather reads per gathered element (a slice smaller than this still moves
    # this much): the GPU memory system's 32-byte sector. None: the whole gathered-from
    # operand (how XLA:TPU lays a gather out is not modelled, so it is charged in full).
    gather_sector: float | None = None


CHIPS = {
    "gpu:NVIDIA H100 80GB HBM3": Chip(
        "H100 SXM", 989.4e12, 494.7e12, 3.35e12, 80e9, "NVIDIA H100 datasheet (SXM5)", 32
    ),
    "gpu:NVIDIA H200 141GB HBM3e": Chip(
        "H200 SXM", 989.4e12, 494.7e12, 4.8e12, 141e9, "NVIDIA H200 datasheet (SXM)", 32
    ),
    "tpu:v5e:1x1": Chip("TPU v5e", 197e12, 197e12, 819e9, 16e9, "cloud.google.com/tpu/docs/v5e"),
    "tpu:v5p:1x1x1": Chip("TPU v5p", 459e12, 459e12, 2765e9, 95e9, "cloud.google.com/tpu/docs/v5p"),
    "tpu:v6e:1x1": Chip("TPU v6e", 918e12, 918e12, 1638e9, 32e9, "cloud.google.com/tpu/docs/v6e"),
    "cpu": Chip("CPU (nominal)", 100e9, 100e9, 20e9, 24 * 2**30, "nominal, tests only"),
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that the model assumes, and a fixed cost per kernel launch.

    ``dot16``/``dot32``: fraction of the 16-bit/float32 matmul peak a GEMM reaches; ``bw``:
    of HBM bandwidth for memory-bound fusions; ``launch_s``: seconds added per launched
    operation (kernel launch, loop-iteration bookkeeping).
    """

    dot16: float = 1.0
    dot32: float = 1.0
    bw: float = 1.0
    launch_s: float = 0.0


PEAK = Efficiency()
# Fitted (python -m benchmarks.timemodel_calibrate --chip C --fit: a grid search minimising
# the squared log error) to tokamax's published measurements of its xla and chunked_xla
# losses, forward and VJP, reduction='mean' (benchmarks/results/compile-only/
# timemodel_calibration_<chip>.csv): H100 56 shapes (224 times), v5p 16, v6e 18 (every 4th).
CALIBRATED = Efficiency(dot16=0.80, dot32=0.60, bw=0.75, launch_s=1.0e-6)  # H100
CALIBRATION: dict[str, Efficiency] = {
    "gpu:NVIDIA H100 80GB HBM3": CALIBRATED,
    "gpu:NVIDIA H200 141GB HBM3e": CALIBRATED,  # not fitted: the H100's
    "tpu:v5p:1x1x1": Efficiency(dot16=0.88, dot32=0.90, bw=0.95, launch_s=0.5e-6),
    "tpu:v5e:1x1": Efficiency(dot16=0.88, dot32=0.90, bw=0.95, launch_s=0.5e-6),  # v5p's
    "tpu:v6e:1x1": Efficiency(dot16=0.76, dot32=0.66, bw=1.0, launch_s=0.0),
}


def calibrated(target: str) -> Efficiency:
    """The efficiencies fitted for ``target``'s chip, else the H100's."""
    return CALIBRATION.get(target, CALIBRATED)


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "token": 0,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
# Operations that launch nothing and move no data.
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "iota", "copy-done", "send-done",
    "recv-done", "all-reduce-done", "all-gather-done", "collective-permute-done", "domain",
    "add-dependency", "get-dimension-size", "fusion-done", "async-done",
}  # fmt: skip


def shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The array shapes ``(dtype, dims)`` in an HLO type string (a tuple gives several)."""
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _SHAPE.findall(text)
        if dt in _DTYPE_BYTES
    ]


def nbytes(text: str) -> float:
    return sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shapes(text))


@dataclass
class Instr:
    name: str
    type: str
    op: str
    operands: list[str]
    attrs: str
    args: str = ""


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    by_name: dict[str, Instr] = field(default_factory=dict)
    root: Instr | None = None


def _split_args(rest: str) -> tuple[str, str]:
    """``rest`` is what follows ``op(``: the operand list and the attributes after it."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch in "({["
        depth -= ch in ")}]"
        if depth == 0:
            return rest[:i], rest[i + 1 :]
    return rest, ""


def parse(hlo: str) -> tuple[dict[str, Computation], str]:
    """The computations of an HLO module text, and the entry computation's name."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m:
                cur = comps[m.group(1)] = Computation(m.group(1))
                if line.startswith("ENTRY"):
                    entry = cur.name
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, typ, op, rest = m.groups()
        args, attrs = _split_args(rest)
        operands = re.findall(r"%([\w.\-]+)", args)
        if not operands and args.strip() and op != "constant":  # operands printed bare
            operands = [a.split()[-1] for a in args.split(",") if a.strip()]
        ins = Instr(name, typ, op, operands, attrs, args)
        cur.instrs.append(ins)
        cur.by_name[name] = ins
        if line.lstrip().startswith("ROOT"):
            cur.root = ins
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{?(%?[\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?", attrs)
    return [s.strip().lstrip("%") for s in m.group(1).split(",")] if m else []


def _dims(attrs: str, key: str) -> list[int]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _operand_shape(comp: Computation, name: str) -> tuple[str, tuple[int, ...]]:
    ins = comp.by_name.get(name)
    found = shapes(ins.type) if ins else []
    return found[0] if found else ("f32", ())


def dot_flops(comp: Computation, ins: Instr) -> tuple[float, str]:
    """FLOPs of one dot/convolution/GEMM custom-call, and its class: '16' or '32' bit."""
    out = shapes(ins.type)
    if not out:
        return 0.0, "16"
    out_elems = math.prod(out[0][1])
    lhs_dt, lhs = _operand_shape(comp, ins.operands[0]) if ins.operands else ("f32", ())
    rhs_dt, rhs = _operand_shape(comp, ins.operands[1]) if len(ins.operands) > 1 else (lhs_dt, ())
    kind = "32" if "f32" in (lhs_dt, rhs_dt) or lhs_dt == "f64" else "16"
    if ins.op == "dot":
        contracted = math.prod(lhs[d] for d in _dims(ins.attrs, "lhs_contracting_dims"))
    elif ins.op == "convolution":
        m = re.search(r"dim_labels=\w+_(\w+)->\w+", ins.attrs)
        labels = m.group(1) if m else ""
        contracted = math.prod(
            n for lab, n in zip(labels, rhs, strict=False) if lab == "i" or lab.isdigit()
        )
        g = re.search(r"feature_group_count=(\d+)", ins.attrs)
        contracted = contracted / int(g.group(1)) if g else contracted
    else:  # a GEMM custom-call: dimension numbers in its backend config
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        dims = [int(d.strip('" ')) for d in m.group(1).split(",") if d.strip()] if m else []
        contracted = math.prod(lhs[d] for d in dims) if lhs else 0
    return 2.0 * out_elems * contracted, kind


def _declared_cost(comp: Computation, ins: Instr) -> tuple[float, str, float] | None:
    """``(flops, class, bytes)`` a custom-call declares in its backend config (a Pallas
    kernel's ``CostEstimate``: ``"cost_estimate":{"flops":…,"bytes_accessed":…}``), its
    FLOPs of the class of its first operand's dtype; None when it declares none. The model
    then treats the kernel like any other operation, ``max(compute, memory)``: inside one
    kernel the DMA of the next block overlaps the matmuls of this one."""
    if ins.op != "custom-call":
        return None
    m = re.search(r'"cost_estimate":\{"flops":"(\d+)"[^}]*"bytes_accessed":"(\d+)"', ins.attrs)
    if not m or int(m.group(1)) == 0:
        return None
    first = comp.by_name.get(ins.operands[0]) if ins.operands else None
    dtype = (shapes(first.type) or [("f32", ())])[0][0] if first else "f32"
    return float(m.group(1)), "16" if dtype in ("bf16", "f16") else "32", float(m.group(2))


def _is_gemm_call(ins: Instr) -> bool:
    return ins.op == "custom-call" and bool(
        re.search(r'custom_call_target="[^"]*(gemm|matmul|cublas)', ins.attrs, re.I)
    )


def _inner_flops(comps: dict[str, Computation], name: str, seen=None) -> dict[str, float]:
    """Matmul FLOPs by class inside a fused/called computation (recursively)."""
    flops: dict[str, float] = {}
    comp = comps.get(name)
    if comp is None:
        return flops
    for ins in comp.instrs:
        if ins.op in ("dot", "convolution") or _is_gemm_call(ins):
            f, k = dot_flops(comp, ins)
            flops[k] = flops.get(k, 0.0) + f
        for sub in _called(ins.attrs, "calls"):
            for k, f in _inner_flops(comps, sub).items():
                flops[k] = flops.get(k, 0.0) + f
    return flops


def _params(fused: Computation) -> dict[str, int]:
    out = {}
    for f in fused.instrs:
        if f.op == "parameter":
            m = re.match(r"\s*(\d+)", f.args)
            out[f.name] = int(m.group(1)) if m else -1
    return out


def _read_bytes(
    comps: dict[str, Computation],
    fused: Computation,
    pname: str,
    full: float,
    aliased: frozenset = frozenset(),
    depth: int = 0,
    sector: float | None = None,
) -> float:
    """Bytes of parameter ``pname`` (``full`` bytes) that ``fused`` reads: the slices it
    takes if it is used only through (dynamic-)slices, gathers (with a ``sector``: each
    gathered element at least ``sector`` bytes), bitcasts and nested fusions that do the
    same, nothing where it is updated in place, else all of it."""
    part = 0.0
    for u in (u for u in fused.instrs if pname in u.operands):
        if u.op in ("dynamic-slice", "slice") and u.operands[0] == pname:
            part += nbytes(u.type)
        elif u.op == "gather" and u.operands[0] == pname and sector is not None:
            part += _gathered_bytes(u, sector)
        elif u.op == "dynamic-update-slice" and u.operands[0] == pname and pname in aliased:
            continue
        elif u.op == "bitcast" and depth < 8:
            part += _read_bytes(comps, fused, u.name, full, aliased, depth + 1, sector)
        elif u.op == "fusion" and depth < 8:
            inner = comps.get(next(iter(_called(u.attrs, "calls")), ""))
            if inner is None:
                return full
            for i, o in enumerate(u.operands):
                if o == pname:
                    name = next((n for n, k in _params(inner).items() if k == i), None)
                    part += (
                        full
                        if name is None
                        else _read_bytes(comps, inner, name, full, frozenset(), depth + 1, sector)
                    )
        else:
            return full
    return min(part, full)


def _gathered_bytes(gather: Instr, sector: float) -> float:
    """What a gather moves: per slice, its bytes or one ``sector``, whichever is more."""
    n_slices = math.prod(int(x) for x in _dims(gather.attrs, "slice_sizes")) or 1
    out = shapes(gather.type)
    elements = math.prod(out[0][1]) if out else 0
    size = nbytes(gather.type) / max(elements, 1)  # bytes per element
    slices = elements / n_slices
    return slices * max(n_slices * size, sector)


def _fusion_bytes(
    comps: dict[str, Computation], comp: Computation, ins: Instr, sector: float | None = None
) -> float:
    """HBM bytes of a fusion: operands read (a parameter used only through (dynamic-)
    slices counts the slices, through gathers what :func:`_gathered_bytes` counts where
    ``sector`` is given) and outputs written (an in-place dynamic-update-slice of a
    parameter counts the update and the buffer is not read)."""
    callee = next(iter(_called(ins.attrs, "calls")), None)
    fused = comps.get(callee) if callee else None
    operand_bytes = [nbytes(comp.by_name[o].type) if o in comp.by_name else 0 for o in ins.operands]
    # An async fusion-start's type also lists its operands: count what the callee returns.
    out_bytes = nbytes(fused.root.type if fused and fused.root else ins.type)
    if fused is None:
        return sum(operand_bytes) + out_bytes
    params = _params(fused)
    # In-place updates at the root.
    roots = [fused.root] if fused.root else []
    if fused.root is not None and fused.root.op == "tuple":
        roots = [fused.by_name[o] for o in fused.root.operands if o in fused.by_name]
    aliased = set()
    for r in roots:
        if r.op == "dynamic-update-slice" and r.operands and r.operands[0] in params:
            aliased.add(r.operands[0])
            out_bytes -= nbytes(r.type) - nbytes(fused.by_name[r.operands[1]].type)
    total = out_bytes
    for pname, idx in params.items():
        if 0 <= idx < len(operand_bytes):
            total += _read_bytes(
                comps, fused, pname, operand_bytes[idx], frozenset(aliased), sector=sector
            )
    return total


def trip_count(comps: dict[str, Computation], ins: Instr) -> int:
    """A while loop's trip count: XLA's ``known_trip_count``, else the bound that the
    condition computation compares the induction variable with (TPU HLO)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cond = next(iter(_called(ins.attrs, "condition")), None)
    todo, consts, directions = [cond], [], []
    while todo:
        c = comps.get(todo.pop())
        if c is None:
            continue
        for i in c.instrs:
            if i.op == "constant" and re.fullmatch(r"[su]\d+", (shapes(i.type) or [("", 0)])[0][0]):
                with_value = re.match(r"\s*(-?\d+)", i.args)
                if with_value and not shapes(i.type)[0][1]:
                    consts.append(int(with_value.group(1)))
            if i.op == "compare":
                directions.append(re.search(r"direction=(\w+)", i.attrs).group(1))
            todo += _called(i.attrs, "calls")
    if not consts:
        raise ValueError(f"while {ins.name}: no trip count found in its condition {cond}")
    n = max(consts)
    return n + 1 if "LE" in directions else n


@dataclass
class Op:
    """One top-level operation's totals (already multiplied by its loops' trip counts)."""

    name: str
    op: str
    count: float  # executions
    flops16: float = 0.0
    flops32: float = 0.0
    bytes: float = 0.0

    def seconds(self, chip: Chip, eff: Efficiency) -> float:
        compute = self.flops16 / (chip.flops16 * eff.dot16) + self.flops32 / (
            chip.flops32 * eff.dot32
        )
        memory = self.bytes / (chip.bandwidth * eff.bw)
        return max(compute, memory) + self.count * eff.launch_s


def ops(hlo: str, chip: Chip | None = None) -> list[Op]:
    """Every launched operation of the program, loops unrolled into counts (``chip``: for
    its :attr:`Chip.gather_sector`; None charges gathers their whole operand)."""
    sector = chip.gather_sector if chip is not None else None
    comps, entry = parse(hlo)
    out: list[Op] = []

    def walk(name: str, times: float):
        comp = comps[name]
        for ins in comp.instrs:
            if ins.op in _FREE or ins.op.endswith("-done"):  # an async pair: its start counts
                continue
            if ins.op == "while":
                n = trip_count(comps, ins)
                walk(_called(ins.attrs, "body")[0], times * n)
                walk(_called(ins.attrs, "condition")[0], times * (n + 1))
                continue
            if ins.op == "call":
                walk(_called(ins.attrs, "to_apply")[0], times)
                continue
            if ins.op == "conditional":  # the most expensive branch, as if always taken
                branches = _called(ins.attrs, "branch_computations") or _called(
                    ins.attrs, "true_computation"
                ) + _called(ins.attrs, "false_computation")
                best = []
                for b in branches:
                    before = len(out)
                    walk(b, times)
                    mine = out[before:]
                    del out[before:]
                    if sum(o.flops16 + o.flops32 + o.bytes for o in mine) >= sum(
                        o.flops16 + o.flops32 + o.bytes for o in best
                    ):
                        best = mine
                out.extend(best)
                continue
            rec = Op(ins.name, ins.op, times)
            if ins.op in ("fusion", "fusion-start"):
                for k, f in _inner_flops(comps, _called(ins.attrs, "calls")[0]).items():
                    setattr(rec, "flops" + k, f * times)
                rec.bytes = _fusion_bytes(comps, comp, ins, sector) * times
            else:
                if ins.op in ("dot", "convolution") or _is_gemm_call(ins):
                    f, k = dot_flops(comp, ins)
                    setattr(rec, "flops" + k, f * times)
                declared = _declared_cost(comp, ins)
                in_bytes = [nbytes(comp.by_name[o].type) for o in ins.operands if o in comp.by_name]
                if ins.op in ("dynamic-slice", "slice"):
                    in_bytes = [nbytes(ins.type)]
                if ins.op == "gather" and sector is not None and in_bytes:
                    in_bytes[0] = _gathered_bytes(ins, sector)
                if ins.op == "dynamic-update-slice":  # in place: the update, read and written
                    upd = in_bytes[1] if len(in_bytes) > 1 else 0
                    rec.bytes = 2 * upd * times
                else:
                    rec.bytes = (sum(in_bytes) + nbytes(ins.type)) * times
                if declared is not None:  # a kernel's own count (Pallas's CostEstimate)
                    f, k, traffic = declared
                    setattr(rec, "flops" + k, f * times)
                    rec.bytes = max(rec.bytes, traffic * times)
            out.append(rec)

    walk(entry, 1.0)
    return out


@dataclass(frozen=True)
class Estimate:
    seconds: float
    flops: float
    matmul_flops16: float
    matmul_flops32: float
    bytes: float
    launches: float

    def matmuls(self, n: int, d: int, v: int) -> float:
        """Matmul work in units of 2·N·D·V (one vocabulary-sized matmul)."""
        return self.flops / (2.0 * n * d * v)


def estimate(hlo: str, chip: Chip | str, eff: Efficiency = CALIBRATED) -> Estimate:
    """The modelled time of an HLO module on ``chip`` (a :data:`CHIPS` key or a Chip)."""
    chip = CHIPS[chip] if isinstance(chip, str) else chip
    rows = ops(hlo, chip)
    f16 = sum(o.flops16 for o in rows)
    f32 = sum(o.flops32 for o in rows)
    return Estimate(
        seconds=sum(o.seconds(chip, eff) for o in rows),
        flops=f16 + f32,
        matmul_flops16=f16,
        matmul_flops32=f32,
        bytes=sum(o.bytes for o in rows),
        launches=sum(o.count for o in rows),
    )


def matmul_work(hlo: str, n: int, d: int, v: int) -> float:
    """Matmul FLOPs of an HLO module (loops weighted by trip count) ÷ 2·N·D·V."""
    return estimate(hlo, "cpu", PEAK).matmuls(n, d, v)


def describe(eff: Efficiency) -> str:
    return json.dumps(eff.__dict__)
