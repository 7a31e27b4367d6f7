"""The README's Python examples run as written (in order, sharing one namespace)."""

import importlib.util
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _needs_torch(block: str) -> bool:
    return re.search(r"^\s*(import|from) .*\btorch\b", block, re.M) is not None


def test_readme_python_blocks_run():
    assert len(BLOCKS) >= 3
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        if _needs_torch(block) and not HAS_TORCH:
            continue  # checked by test_readme_torch_blocks_run where torch is installed
        exec(compile(block, f"README.md block {index}", "exec"), namespace)


@pytest.mark.skipif(not HAS_TORCH, reason="the README's torch blocks need torch (test,torch)")
def test_readme_torch_blocks_run():
    torch_blocks = [(i, b) for i, b in enumerate(BLOCKS) if _needs_torch(b)]
    assert torch_blocks
    namespace: dict = {}
    for index, block in torch_blocks:
        exec(compile(block, f"README.md block {index}", "exec"), namespace)
    assert namespace["result"].passed  # the parity.compare example
