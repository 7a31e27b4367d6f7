"""Sharded inputs on meshes of simulated CPU devices, each in a separate process (the
simulated device count must be set before JAX starts).

* linear_cross_entropy, hidden over 'data' and the kernel over the vocabulary ('model'),
  2x2 mesh: equals the single-device result.
* cross_entropy on logits P('data', 'model'), 2x4 mesh, every option: equals the
  single-device result, keeps the gradient's sharding, and the compiled HLO moves only
  O(tokens) data between devices (no logits-sized all-gather).
* linear_cross_entropy(axis_name='model') inside shard_map: equal to the single-device
  loss (values, gradients, HVP) with only per-token / dhidden / parameter-gradient
  all-reduces.
"""

import os
import pathlib
import subprocess
import sys

SCRIPTS = pathlib.Path(__file__).parent / "scripts"


def _run(script):
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_linear_cross_entropy_with_vocab_sharded_kernel():
    assert "sharded ok" in _run("sharded_linear.py")


def test_cross_entropy_with_vocab_sharded_logits_moves_only_per_token_data():
    assert "sharded cross_entropy ok" in _run("sharded_cross_entropy.py")


def test_vocab_parallel_linear_cross_entropy_in_shard_map():
    assert "vocab-parallel linear_cross_entropy ok" in _run("vocab_parallel_linear.py")
