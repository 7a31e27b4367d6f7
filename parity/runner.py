"""Selects and runs cases, in worker processes, with a progress bar."""

from __future__ import annotations

import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from parity.suites import SUITES, Case

_WORKER_CASES: dict[str, list[Case]] = {}


def select_cases(suites, quick=False, text=None, dtypes=None) -> list[tuple[str, int]]:
    """Returns (suite, index) pairs: cases are rebuilt by index inside each worker."""
    chosen = []
    for suite in suites:
        for i, case in enumerate(SUITES[suite]()):
            if quick and zlib.crc32(case.id.encode()) % 10 and case.category != "error parity":
                continue
            if text and text not in case.id and text not in case.category:
                continue
            if dtypes and case.dtype not in dtypes:
                continue
            chosen.append((suite, i))
    return chosen


def _init_worker() -> None:
    import jax
    import torch

    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(1)


def run_one(key: tuple[str, int]) -> dict[str, Any]:
    suite, index = key
    if suite not in _WORKER_CASES:
        _WORKER_CASES[suite] = SUITES[suite]()
    case = _WORKER_CASES[suite][index]
    try:
        result = case.run()
        passed, error_parity, message = result.passed, result.error_parity, result.message
        checks = [
            {
                "name": c.name,
                "passed": c.passed,
                "max_abs": c.max_abs,
                "max_rel": c.max_rel,
                "torch_err": c.torch_err,
            }
            for c in result.checks
        ]
    except Exception as e:
        passed, error_parity, message, checks = (
            False,
            False,
            f"harness error {type(e).__name__}: {e}",
            [],
        )
    return {
        "suite": suite,
        "id": case.id,
        "category": case.category,
        "dtype": case.dtype,
        "transform": case.transform,
        "passed": passed,
        "error_parity": error_parity,
        "message": message,
        "checks": checks,
    }


def _bar(done: int, total: int, failed: int) -> None:
    """Redraws a progress bar on a terminal; prints a line every 10% otherwise (logs, CI)."""
    tty = sys.stderr.isatty()
    if not tty and done != total and done % max(1, total // 10):
        return
    width = 40
    filled = int(width * done / total)
    bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  failed: {failed}"
    sys.stderr.write(f"\r{bar} " if tty else bar + "\n")
    sys.stderr.flush()


def run_cases(keys, jobs=1, progress=True) -> list[dict[str, Any]]:
    results = []
    failed = 0
    if jobs > 1:
        chunk = max(1, len(keys) // (jobs * 20))
        with ProcessPoolExecutor(jobs, initializer=_init_worker) as pool:
            iterator = pool.map(run_one, keys, chunksize=chunk)
            for r in iterator:
                results.append(r)
                failed += not r["passed"]
                if progress:
                    _bar(len(results), len(keys), failed)
    else:
        _init_worker()
        for key in keys:
            r = run_one(key)
            results.append(r)
            failed += not r["passed"]
            if progress:
                _bar(len(results), len(keys), failed)
    if progress and sys.stderr.isatty():
        sys.stderr.write("\n")
    return results
