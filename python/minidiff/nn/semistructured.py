"""``SemiStructuredLinear``: 2:4 semi-structured sparse replacement for ``torch.nn.Linear``.

2:4 sparsity keeps at most 2 nonzeros in every group of 4 consecutive input
weights of each output channel (Mishra et al. 2021, "Accelerating Sparse Deep
Neural Networks"); the weight is stored compressed (values ``(N, K/2)`` + 2-bit
positions packed in int16 ``meta (N, K/16)``, format documented in
``minidiff.kernels.sparse24``). On CUDA the forward pass runs the 2:4 kernels
through ``minidiff.ops.gpu_linear.sparse24_linear_cuda``; on CPU it decompresses
and calls ``F.linear`` (correct, not faster: 2:4 acceleration is GPU-only, use
``SparseLinear`` for fast sparse inference on CPU).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.kernels.sparse24 import compress_24, count_24_violations, decompress_24
from minidiff.ops.gpu_linear import sparse24_linear_cuda

__all__ = ["SemiStructuredLinear", "prune_24"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_cpu_warned = False


def prune_24(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 pruning: in every group of 4 consecutive input weights keep the 2
    of largest ``|w|`` (ties go to the lower index) and zero the others."""
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 pruning needs in_features to be a multiple of 4, got {k}")
    g = weight.reshape(n, k // 4, 4)
    order = g.abs().argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return (g * keep).reshape(n, k)


class SemiStructuredLinear(nn.Module):
    """Linear layer with a 2:4 sparse weight stored compressed.

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``; ``in_features`` must be a multiple of 16.
    bias : bool
        Whether the layer has a bias.
    dtype : torch.dtype
        The weight, bias and output dtype (float32, bfloat16 or float16; the CUDA
        kernel takes the 16-bit types, float32 runs through Triton).

    Buffers (the state dict): ``values`` (N, K/2), ``meta`` (N, K/16) int16, ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if in_features % 16:
            raise ValueError(f"2:4 layers need in_features to be a multiple of 16, got {in_features}; "
                             "keep this layer dense")
        if dtype not in _FLOATS:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = dtype
        self.register_buffer("values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device))
        # all-zero codes would put both kept values at position 0; 0x4444 is (0, 1) per group
        meta = torch.full((out_features, in_features // 16), 0x4444, dtype=torch.int16, device=device)
        self.register_buffer("meta", meta)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, prune_to_24: bool = False,
                    name: str | None = None) -> "SemiStructuredLinear":
        """Compress ``linear``'s weight, which must already be 2:4 sparse.

        ``prune_to_24=True`` applies magnitude 2:4 pruning (:func:`prune_24`) first.
        Raises ValueError (naming the number of violating groups) for a weight that
        is not 2:4, and for non-finite weights.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs a torch.nn.Linear, got {type(linear).__name__}")
        label = f"layer {name!r}" if name else "the layer"
        w = linear.weight.detach()
        dtype = w.dtype if w.dtype in _FLOATS else torch.float32
        bad = (~torch.isfinite(w)).sum().item()
        if bad:
            raise ValueError(f"{label} has {bad} non-finite weight(s) (NaN or Inf); cannot compress to 2:4")
        if linear.in_features % 16:
            raise ValueError(f"{label} has in_features={linear.in_features}; 2:4 needs a multiple of 16")
        if prune_to_24:
            w = prune_24(w)
        violations = count_24_violations(w)
        if violations:
            raise ValueError(f"{label} is not 2:4 sparse: {violations} of {w.numel() // 4} groups of 4 "
                             "consecutive input weights hold more than 2 nonzeros; prune it first "
                             "(from_linear(linear, prune_to_24=True) applies magnitude 2:4 pruning)")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype,
                device=w.device)
        values, meta = compress_24(w.to(dtype))
        m.values.copy_(values)
        m.meta.copy_(meta)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().to(dtype))
        return m

    def dense_weight(self) -> torch.Tensor:
        """The decompressed (N, K) weight."""
        return decompress_24(self.values, self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; "
                             f"this SemiStructuredLinear expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.values.dtype)
        if x2.device.type == "cuda":
            y = sparse24_linear_cuda(x2, self.values, self.meta, self.bias)
        else:
            global _cpu_warned
            if not _cpu_warned:
                _cpu_warned = True
                warnings.warn("SemiStructuredLinear: 2:4 acceleration is GPU-only; on CPU the weight is "
                              "decompressed and run dense (correct, not faster). Use minidiff.nn.SparseLinear "
                              "for fast sparse inference on CPU.", RuntimeWarning, stacklevel=2)
            y = F.linear(x2, self.dense_weight(), self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, sparsity=2:4, dtype={self.out_dtype}")
