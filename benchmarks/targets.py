"""Compile-only targets: XLA's own TPU and GPU compilers, run deviceless on this machine.

Nothing executes: a function is lowered and compiled for the target, and XLA reports its
buffer assignment (``memory_analysis()``: the temporaries) and, on TPU, the cost model's
time (``cost_analysis()["optimal_seconds"]``). That answers "does this spelling
materialise a logits-sized temporary on a TPU or GPU" without one.

Targets are named by strings:

* ``"cpu"``: the machine's own XLA:CPU; ``"local"``: JAX's default backend (a real GPU);
* ``"tpu:v5p:1x1x1"``, ``"tpu:v5e:1x1"``, ``"tpu:v6e:1x1"``, ``"tpu:v5p:2x2x1"`` (4 chips) …:
  a TPU topology from ``libtpu`` (``pip install libtpu``, released in step with jax);
* ``"gpu:NVIDIA H100 80GB HBM3"``, ``"gpu:NVIDIA H200 141GB HBM3e"``, ``"gpu:NVIDIA
  A100-SXM4-80GB"`` …: an NVIDIA GPU described by one of the target configs that the CUDA
  plugin embeds (``pip install --no-deps jax-cuda12-plugin jax-cuda12-pjrt`` of jax's
  version; ``ptxas`` from a CUDA toolkit on ``PATH``).

Both paths use private or fast-moving JAX API (measured with jax/jaxlib 0.12.0.1, libtpu
0.0.52): they live here alone. :func:`available` says whether a target can be compiled
for, and :class:`Unavailable` says why not. Set ``JAX_PLATFORMS=cpu`` so that JAX does not
try to run on the accelerators the plugins describe.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, NamedTuple

# libtpu reads these when it loads; without them it prints start-up warnings and errors.
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compile-only use needs no exclusive hold on a TPU: let several processes (pytest-xdist
# workers) load libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The CUDA plugin checks the CUDA libraries of a machine that runs kernels; compiling
# needs none of them.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax

TPU_V5E = "tpu:v5e:1x1"
TPU_V5P = "tpu:v5p:1x1x1"
TPU_V6E = "tpu:v6e:1x1"
TPU_V5P_4 = "tpu:v5p:2x2x1"
H100 = "gpu:NVIDIA H100 80GB HBM3"
H200 = "gpu:NVIDIA H200 141GB HBM3e"
ALL = ("cpu", TPU_V5E, TPU_V5P, TPU_V6E, H100, H200)


class Unavailable(RuntimeError):
    """A target that cannot be compiled for here (packages missing); says which."""


class Compiled(NamedTuple):
    """What XLA reports for one compiled function."""

    temp_bytes: int  # temporaries (buffers that are neither arguments nor outputs)
    output_bytes: int
    argument_bytes: int
    model_seconds: float | None  # the TPU cost model's time; None elsewhere


@functools.cache
def _gpu_target_config(description: str) -> str:
    """The ``GpuTargetConfigProto`` text the CUDA plugin embeds for ``description``."""
    try:
        import jax_plugins.xla_cuda12 as plugin
    except ImportError as e:
        raise Unavailable(
            "GPU targets need jax-cuda12-plugin and jax-cuda12-pjrt of jax's version "
            "(pip install --no-deps)"
        ) from e
    path = os.path.join(os.path.dirname(plugin.__file__), "xla_cuda_plugin.so")
    with open(path, "rb") as f:
        data = f.read()
    names = []
    for match in re.finditer(rb'device_description_str: "([^"]+)"', data):
        name = match.group(1).decode()
        names.append(name)
        if name == description:
            start = data.rfind(b"\0", 0, match.start()) + 1
            return data[start : data.find(b"\0", match.start())].decode()
    raise Unavailable(f"no GPU target config {description!r} in the CUDA plugin; it has {names}")


@functools.cache
def devices(target: str) -> tuple[Any, ...]:
    """The (compile-only) devices of ``target``."""
    if target == "cpu":
        return tuple(jax.devices("cpu"))
    if target == "local":  # the default backend's devices (a real GPU, say)
        return tuple(jax.devices())
    kind, _, name = target.partition(":")
    if kind == "tpu":
        try:
            from jax.experimental import topologies

            return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
        except Exception as e:  # libtpu missing, or an unknown topology
            raise Unavailable(f"TPU target {name!r}: {type(e).__name__}: {e}") from e
    if kind == "gpu":
        config = _gpu_target_config(name)
        from jax._src import xla_bridge

        try:
            topology = xla_bridge.make_pjrt_topology(
                "cuda", "1x1x1", topology="1x1x1", target_config=config
            )
        except Exception as e:
            raise Unavailable(f"GPU target {name!r}: {type(e).__name__}: {e}") from e
        return tuple(topology._make_compile_only_devices())
    raise ValueError(f"unknown target {target!r}: 'cpu', 'tpu:<topology>' or 'gpu:<device>'")


def available(target: str) -> str | None:
    """None if ``target`` can be compiled for here, else the reason it cannot."""
    try:
        devices(target)
    except Unavailable as e:
        return str(e)
    return None


def compile_for(target: str, fn: Any, *args: Any, shardings: Any = None) -> Any:
    """``jax.jit(fn)`` lowered and compiled for ``target`` on ``args`` (arrays or
    ``jax.ShapeDtypeStruct``s; only shapes and dtypes are used). ``shardings``: one
    per argument (default: all on the target's first device)."""
    if shardings is None:
        shardings = [jax.sharding.SingleDeviceSharding(devices(target)[0])] * len(args)
    specs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        for a, s in zip(args, shardings, strict=True)
    ]
    return jax.jit(fn).lower(*specs).compile()


def measure(target: str, fn: Any, *args: Any, shardings: Any = None) -> Compiled:
    """Compiles ``fn`` for ``target`` (see :func:`compile_for`) and reads XLA's report."""
    return analyse(compile_for(target, fn, *args, shardings=shardings))


def analyse(compiled: Any) -> Compiled:
    """XLA's report on a compiled function: its buffers and the TPU cost model's time."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    seconds = cost.get("optimal_seconds")
    return Compiled(
        temp_bytes=int(memory.temp_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        argument_bytes=int(memory.argument_size_in_bytes),
        model_seconds=None if seconds is None or seconds < 0 else float(seconds),
    )
