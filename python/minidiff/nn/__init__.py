"""Compressed drop-in replacements for ``torch.nn.Linear``.

``Int8Linear`` (W8A8 or int8 weight-only) and ``SparseLinear`` (unstructured sparse,
CSR) run on CPU through ``minidiff._C`` and on CUDA through ``minidiff.ops.gpu_linear``
/ cuSPARSE. ``ReferenceInt8Linear`` is the same int8 layer in plain torch (exact
reference); ``Int4WeightOnlyLinear`` holds a group-wise int4 weight and dequantizes it
in its forward pass. The quantization arithmetic of all of them is ``minidiff.quant``.
Build them with ``from_linear``; ``minidiff.compress`` does so for whole models.
"""

from .int4_linear import Int4WeightOnlyLinear
from .int8_linear import Int8Linear, ReferenceInt8Linear
from .semistructured import SemiStructuredLinear
from .sparse_linear import SparseLinear

__all__ = ["Int4WeightOnlyLinear", "Int8Linear", "ReferenceInt8Linear", "SparseLinear", "SemiStructuredLinear"]
