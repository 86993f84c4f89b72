"""``Int4WeightOnlyLinear``: group-wise int4 weight-only replacement for ``torch.nn.Linear``.

The weight is stored packed, two 4-bit codes per byte, with a float32 scale (and, when
asymmetric, a uint8 zero point) per group of ``group_size`` consecutive input weights
(format and rounding in :mod:`minidiff.quant.int4`). The forward pass dequantizes
``W_hat = s (u - z)`` with :func:`minidiff.quant.dequantize_weight_int4` and runs
``F.linear``: a reference implementation (correct on any device, not a fast int4 kernel),
which is what a study of how int4 changes a model needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.quant import INT4_SYMMETRIC_QMAX, check_group_size, dequantize_weight_int4, quantize_weight_int4

__all__ = ["Int4WeightOnlyLinear"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class Int4WeightOnlyLinear(nn.Module):
    """Linear layer with a group-wise int4 weight; activations stay in floating point.

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``; ``in_features`` must be a multiple of ``group_size``.
    bias : bool
        Whether the layer has a bias (kept in the layer's dtype).
    group_size : int
        Input weights per scale (32 or 128 are usual).
    symmetric : bool
        Codes in [-7, 7] (no zero points) or 16 levels with per-group integer zero points.
    dtype : torch.dtype
        The dtype the weight is dequantized to and the output dtype (the float layer's).

    Buffers (the state dict): ``weight_packed`` uint8 ``(N, K/2)``, ``weight_scale`` float32
    ``(N, K/g)``, ``weight_zero`` uint8 ``(N, K/g)`` (asymmetric only), ``bias`` ``(N,)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 symmetric: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        check_group_size(in_features, group_size)
        if dtype not in _FLOATS:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.out_dtype = dtype
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8,
                                                         device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        if self.symmetric:
            self.weight_zero = None
        else:
            self.register_buffer("weight_zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True,
                    name: str | None = None) -> "Int4WeightOnlyLinear":
        """Quantize a float ``nn.Linear`` with :func:`minidiff.quant.quantize_weight_int4`.

        Raises
        ------
        ValueError
            Not an ``nn.Linear``, NaN/Inf in the weight, or ``group_size`` not dividing
            ``in_features`` (the message names the layer when ``name`` is given).
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects a torch.nn.Linear, got {type(linear).__name__}")
        q = quantize_weight_int4(linear.weight, group_size=group_size, symmetric=symmetric, name=name)
        dtype = linear.weight.dtype if linear.weight.dtype in _FLOATS else torch.float32
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size,
                symmetric=symmetric, dtype=dtype, device=linear.weight.device)
        with torch.no_grad():
            m.weight_packed.copy_(q.packed)
            m.weight_scale.copy_(q.scale)
            if q.zero is not None:
                m.weight_zero.copy_(q.zero)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    @classmethod
    def from_spec(cls, entry: dict[str, Any]) -> "Int4WeightOnlyLinear":
        """A zero skeleton from a saved module-table entry (see ``minidiff.compress.variant``)."""
        return cls(int(entry["in_features"]), int(entry["out_features"]), bias=bool(entry["bias"]),
                   group_size=int(entry["group_size"]), symmetric=bool(entry["symmetric"]),
                   dtype=getattr(torch, entry.get("dtype", "float32")))

    def spec(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "symmetric": self.symmetric,
                "dtype": str(self.out_dtype).replace("torch.", "")}

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        super()._apply(fn, recurse)
        # codes stay uint8 and scales float32 whatever .half()/.to(dtype) did
        self.weight_scale = self.weight_scale.float()
        if probe.dtype in _FLOATS:
            self.out_dtype = probe.dtype
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat = s (u - z)`` as ``(N, K)`` in ``dtype`` (z = 8 when symmetric)."""
        return dequantize_weight_int4(self.weight_packed, self.weight_scale, self.weight_zero, self.group_size,
                                      dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; "
                             f"this Int4WeightOnlyLinear expects {self.in_features}")
        if x.dtype not in _FLOATS:
            raise ValueError(f"input dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
        # dequantize in float32 (one rounding of s (u - z)), then compute in the layer's dtype
        w = self.dequantized_weight(torch.float32).to(self.out_dtype)
        b = None if self.bias is None else self.bias.to(self.out_dtype)
        return F.linear(x.to(self.out_dtype), w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, "
                f"zero_code={INT4_SYMMETRIC_QMAX + 1 if self.symmetric else 'per group'}, dtype={self.out_dtype}")
