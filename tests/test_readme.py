"""The README's Python examples run as written (in order, sharing one namespace)."""

import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_python_blocks_run():
    assert len(BLOCKS) >= 3
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md block {index}", "exec"), namespace)
    assert namespace["result"].passed  # the parity.compare example
