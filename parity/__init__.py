"""PyTorch parity harness: a reusable comparison core plus jaxce's built-in case grid.

``python -m parity`` runs the grid and writes JSON and Markdown reports; see
``python -m parity --help``. ``from parity import compare`` compares any JAX/torch pair.
"""

from parity.compare import Check as Check
from parity.compare import Result as Result
from parity.compare import compare as compare

__all__ = ["Check", "Result", "compare"]
