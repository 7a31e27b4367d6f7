"""python -m parity: run the PyTorch parity grid and write reports."""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)  # float64 cases need it; set before any array

from parity import report  # noqa: E402
from parity.runner import run_cases, select_cases  # noqa: E402
from parity.suites import SUITES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parity",
        description="Compare jaxce with PyTorch over the option grid (values and gradients).",
    )
    parser.add_argument("--quick", action="store_true", help="a deterministic ~1/10 subset (CI)")
    parser.add_argument(
        "--filter", default=None, help="only cases whose id or category contains this text"
    )
    parser.add_argument(
        "--dtype",
        choices=["float64", "float32", "bfloat16", "float16"],
        action="append",
        help="only these dtypes (repeatable)",
    )
    parser.add_argument(
        "--suite", choices=sorted(SUITES), action="append", help="only these suites (default: all)"
    )
    parser.add_argument(
        "--out", default="parity-report", help="report folder (default: parity-report/)"
    )
    parser.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    suites = args.suite or sorted(SUITES)
    selected = select_cases(suites, quick=args.quick, text=args.filter, dtypes=args.dtype)
    if not selected:
        print("no case matches the selection", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = run_cases(selected, jobs=args.jobs, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    summary = report.summarize(results)
    print(report.table_text(summary))
    paths = report.write(
        results, summary, args.out, elapsed, argv if argv is not None else sys.argv[1:]
    )
    failed = sum(1 for r in results if not r["passed"])
    print(
        f"\n{len(results)} cases, {len(results) - failed} passed, {failed} failed in {elapsed:.0f} s"
    )
    print("reports: " + ", ".join(paths))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
