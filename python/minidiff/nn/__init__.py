"""Compressed drop-in replacements for ``torch.nn.Linear``.

``Int8Linear`` (W8A8 or int8 weight-only) and ``SparseLinear`` (unstructured sparse,
CSR) run on CPU through ``minidiff._C`` and on CUDA through ``minidiff.ops.gpu_linear``
/ cuSPARSE. Build them with ``from_linear``; ``minidiff.compress`` does so for whole
models.
"""

from .int8_linear import Int8Linear
from .sparse_linear import SparseLinear
from .semistructured import SemiStructuredLinear

__all__ = ["Int8Linear", "SparseLinear", "SemiStructuredLinear"]
