"""minidiff's one quantizer: the arithmetic every int8/int4 layer, kernel and reference shares.

* :mod:`minidiff.quant.int8`: per-output-channel symmetric int8 weights, per-token int8
  activations (the definition the CPU/Triton/CUDA kernels reproduce bit for bit), the
  exact integer product and the float64 W8A8 / weight-only references;
* :mod:`minidiff.quant.int4`: group-wise round-to-nearest int4 weights (symmetric or with
  zero points), nibble packing and the float64 reference.

One rule for edge cases everywhere (see ``docs/quantization.md``): all-zero rows/groups get
scale 0 and dequantize to exactly 0; weights holding NaN/Inf are refused with a
``ValueError`` naming the layer; an activation row holding NaN/Inf gets scale NaN, so its
outputs are NaN. Pure torch: this package imports nothing else from minidiff.
"""

from .int4 import (INT4_LEVELS, INT4_SYMMETRIC_QMAX, Int4Weight, check_group_size, dequantize_weight_int4,
                   int4_weight_only_linear_reference, pack_int4, quantize_weight_int4, unpack_int4)
from .int8 import (INT8_QMAX, check_finite_weight, dequantize_weight_int8, int8_linear_reference,
                   int8_matmul_reference, int8_weight_only_linear_reference, quantize_per_token_reference,
                   quantize_weight_int8)

__all__ = [
    "INT4_LEVELS",
    "INT4_SYMMETRIC_QMAX",
    "INT8_QMAX",
    "Int4Weight",
    "check_finite_weight",
    "check_group_size",
    "dequantize_weight_int4",
    "dequantize_weight_int8",
    "int4_weight_only_linear_reference",
    "int8_linear_reference",
    "int8_matmul_reference",
    "int8_weight_only_linear_reference",
    "pack_int4",
    "quantize_per_token_reference",
    "quantize_weight_int4",
    "quantize_weight_int8",
    "unpack_int4",
]
