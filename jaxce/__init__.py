"""jaxce: PyTorch-exact, memory-lean cross-entropy losses for JAX."""

from jaxce._cross_entropy import CrossEntropyLoss as CrossEntropyLoss
from jaxce._cross_entropy import cross_entropy as cross_entropy
from jaxce._linear import linear_cross_entropy as linear_cross_entropy
from jaxce._optax import softmax_cross_entropy as softmax_cross_entropy
from jaxce._optax import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jaxce._reduction import CrossEntropyAux as CrossEntropyAux
from jaxce._sharded import sharded_linear_cross_entropy as sharded_linear_cross_entropy

__version__ = "0.2.0"

__all__ = [
    "CrossEntropyAux",
    "CrossEntropyLoss",
    "__version__",
    "cross_entropy",
    "linear_cross_entropy",
    "sharded_linear_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
