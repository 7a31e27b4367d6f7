"""linear_cross_entropy with hidden sharded over 'data' and the kernel over the vocabulary
('model') on a 2x2 mesh of simulated CPU devices equals the single-device result.

A separate process: the simulated device count must be set before JAX starts.
"""

import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "sharded_linear.py"


def test_linear_cross_entropy_with_vocab_sharded_kernel():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sharded ok" in result.stdout
