"""Summary table, JSON and Markdown reports."""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from typing import Any

DTYPE_ORDER = ("float64", "float32", "bfloat16", "float16")


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    worst: dict[str, dict[str, float]] = defaultdict(dict)
    for r in results:
        row = rows.setdefault(
            r["category"],
            {"category": r["category"], "cases": 0, "passed": 0, "failed": 0, "error_parity": 0},
        )
        row["cases"] += 1
        row["passed"] += r["passed"]
        row["failed"] += not r["passed"]
        row["error_parity"] += r["error_parity"]
        err = max((c["max_abs"] for c in r["checks"]), default=0.0)
        w = worst[r["category"]]
        w[r["dtype"]] = max(w.get(r["dtype"], 0.0), err)
    for cat, row in rows.items():
        row["worst_abs_error"] = worst[cat]
    total = {
        "category": "total",
        "cases": len(results),
        "passed": sum(r["passed"] for r in results),
    }
    total["failed"] = total["cases"] - total["passed"]
    total["error_parity"] = sum(r["error_parity"] for r in results)
    merged: dict[str, float] = {}
    for w in worst.values():
        for d, e in w.items():
            merged[d] = max(merged.get(d, 0.0), e)
    total["worst_abs_error"] = merged
    return [*rows.values(), total]


def _cells(row):
    errs = [
        f"{row['worst_abs_error'][d]:.1e}" if d in row["worst_abs_error"] else "-"
        for d in DTYPE_ORDER
    ]
    return [
        row["category"],
        str(row["cases"]),
        str(row["passed"]),
        str(row["failed"]),
        str(row["error_parity"]),
        *errs,
    ]


HEADER = [
    "category",
    "cases",
    "passed",
    "failed",
    "error parity",
    *(f"worst abs err {d}" for d in DTYPE_ORDER),
]


def table_text(summary) -> str:
    rows = [HEADER] + [_cells(r) for r in summary]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_markdown(summary) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in summary]
    return "\n".join(lines)


def write(results, summary, out, elapsed, argv) -> list[str]:
    import jax
    import torch

    import jaxce

    os.makedirs(out, exist_ok=True)
    meta = {
        "command": "python -m parity " + " ".join(argv),
        "jaxce": jaxce.__version__,
        "jax": jax.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(elapsed, 1),
    }
    json_path = os.path.join(out, "parity.json")
    with open(json_path, "w") as fh:
        json.dump({"meta": meta, "summary": summary, "cases": results}, fh, indent=1)
    failures = [r for r in results if not r["passed"]]
    md = [
        "# jaxce vs PyTorch parity report",
        "",
        f"`{meta['command']}` — jaxce {meta['jaxce']}, jax {meta['jax']}, torch {meta['torch']}, "
        f"Python {meta['python']} ({meta['machine']}), {meta['seconds']} s.",
        "",
        "Values and gradients (torch autograd vs `jax.vjp`, same cotangent). float64/float32: "
        "rtol/atol 1e-10/1e-12 and 2e-5/2e-6. bfloat16/float16: jaxce's error against a float64 "
        "truth must be no worse than torch's own error plus 2 units of roundoff. Error parity: "
        "both reject the input.",
        "",
        table_markdown(summary),
        "",
        f"## Failures ({len(failures)})",
        "",
    ]
    md += [f"- `{r['id']}`: {r['message']}" for r in failures] or ["None."]
    md_path = os.path.join(out, "parity.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    return [json_path, md_path]
