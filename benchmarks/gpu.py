"""The benchmark report sized for one 80 GB GPU (H100/H200): jaxce vs optax vs torch CUDA.

Usage (repository root, on a machine with a CUDA build of jaxlib and, optionally, torch):

    pip install -c constraints.txt -e ".[bench]"     # plus jax[cuda12] / a CUDA torch there
    python benchmarks/gpu.py            # -> benchmarks/results/<device>/, < 8 min on an H100
    python benchmarks/gpu.py --quick    # tiny shapes; also runs (on the CPU) without a GPU

Same sections and files as `benchmarks/report.py` (see its docstring), with these sizes:
cross-entropy time over classes 1k..128k at 16,384 tokens (float32 and bfloat16, median of
10 interleaved rounds after 2 warm-up calls); compile-only temporaries up to [16384, 262144];
one process per (framework, dtype) at [16384, 131072] measuring the
allocator's peak (`peak_bytes_in_use` for JAX, `torch.cuda.max_memory_allocated()` for
torch) minus a baseline process that only allocates the inputs; fused linear time at
Liger-Kernel's 16384×4096×131072 and Cut Cross-Entropy's 8192×2304×256000 (bfloat16) and at
8192×2048×32768 (float32, full precision on both sides: JAX "highest", torch without TF32),
and one process per variant's peak at Liger's FLCE shape 32768×4096×128256 (bfloat16).
The budget is under 8 minutes on an H100; `--repeats` and `--only` trim it further.

Robustness: JAX does not preallocate (so torch and JAX share the GPU in one process); torch
is skipped when it has no CUDA; an out-of-memory variant is recorded as "OOM" in the CSV and
the run goes on; each child process has a time limit.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # after the environment variable: before JAX starts

if __name__ == "__main__":
    report.main(mode="gpu")
