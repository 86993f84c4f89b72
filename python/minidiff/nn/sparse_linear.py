"""``SparseLinear``: unstructured-sparse replacement for ``torch.nn.Linear``.

The weight is stored as CSR over output channels (``minidiff.ops.sparse``; the
format choice is justified in csrc/spmm.cpp) and ``Y = X W^T + b`` runs in the
native sparse kernel. When the weight is too dense for the sparse kernel to win,
``from_linear`` keeps it dense (``format == "dense"``) and uses ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.ops import sparse as sparse_ops

__all__ = ["SparseLinear", "DENSE_CROSSOVER_DENSITY"]

DENSE_CROSSOVER_DENSITY = 0.4
"""Weights with a larger fraction of nonzeros stay dense.

Measured with ``benchmarks/bench_linear.py --crossover`` on the development machine
(2-core AMD EPYC Zen4, AVX-512, 1 thread, fp32 ``F.linear`` = oneDNN sgemm), M = 512,
ratio SparseLinear time / dense time, median (worst) over the five MiniLM/BERT shapes:
density 0.1: 0.28 (0.33), 0.2: 0.46 (0.51), 0.3: 0.60 (0.62), 0.4: 0.71 (0.74),
0.5: 0.87 (0.95), 0.6: 0.96 (1.05). Two earlier runs on the same (shared, noisy) machine
gave worst shapes of 0.84-0.87 at 0.4 and 0.96-1.15 at 0.5, so 0.4 is the largest density
at which every shape gained in every run. At M = 1 (gather-based path) sparse is
0.9-3.3x dense at density 0.1 but 0.55-1.28x at 0.3: the rule is tuned for batches."""


class SparseLinear(nn.Module):
    """Linear layer with an unstructured-sparse weight in CSR (or dense fallback).

    Parameters
    ----------
    in_features, out_features : int
        As ``nn.Linear``.
    bias : bool
        Whether the layer has a bias (kept in the float layer's dtype).
    dtype : torch.dtype
        Output dtype (the float layer's dtype).

    Buffers (the state dict): ``row_ptr`` (N+1,) int32, ``col`` (nnz,) int32, ``values``
    (nnz,) float32, ``weight`` (dense (N, K) in the fallback format, else empty), and
    ``bias``. Their lengths depend on the weight, so ``load_state_dict`` resizes them.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = dtype
        self.register_buffer("row_ptr", torch.zeros(out_features + 1, dtype=torch.int32, device=device))
        self.register_buffer("col", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("values", torch.zeros(0, dtype=torch.float32, device=device))
        self.register_buffer("weight", torch.zeros(0, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._check_loaded())

    @property
    def format(self) -> str:
        """``"csr"`` or ``"dense"`` (the fallback when the weight is too dense)."""
        return "dense" if self.weight.numel() else "csr"

    @property
    def nnz(self) -> int:
        return int(self.weight.count_nonzero()) if self.format == "dense" else int(self.col.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_density: float | None = None, format: str | None = None,
                    name: str | None = None) -> "SparseLinear":
        """Compress a (pruned) float ``nn.Linear``; exact zeros are dropped.

        Parameters
        ----------
        linear : nn.Linear
            The layer, usually magnitude-pruned.
        max_density : float, optional
            Keep the weight dense above this fraction of nonzeros; default
            :data:`DENSE_CROSSOVER_DENSITY` (measured crossover).
        format : {"csr", "dense"}, optional
            Force a format regardless of density.
        name : str, optional
            Layer name used in error messages.
        """
        where = f"layer {name!r}" if name else "this layer"
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects a torch.nn.Linear, got {type(linear).__name__} ({where})")
        if format not in (None, "csr", "dense"):
            raise ValueError(f"format must be 'csr', 'dense' or None, got {format!r}")
        limit = DENSE_CROSSOVER_DENSITY if max_density is None else float(max_density)
        if not 0.0 <= limit <= 1.0:
            raise ValueError(f"max_density must be in [0, 1], got {max_density}")
        w = linear.weight.detach()
        dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=dtype,
                device=w.device)
        density = float(w.count_nonzero()) / w.numel()
        chosen = format or ("csr" if density <= limit else "dense")
        with torch.no_grad():
            if chosen == "csr":
                row_ptr, col, val = sparse_ops.to_csr(w)
                m.row_ptr = row_ptr.to(w.device)
                m.col = col.to(w.device)
                m.values = val.to(w.device)
            else:
                m.weight = w.to(dtype).clone()
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the CSR arrays (and the dense fallback) have data-dependent lengths: resize first
        for key in ("col", "values", "weight"):
            incoming = state_dict.get(prefix + key)
            current = self._buffers.get(key)
            if isinstance(incoming, torch.Tensor) and current is not None and incoming.shape != current.shape:
                self._buffers[key] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_loaded(self) -> None:
        if self.format == "dense":
            if tuple(self.weight.shape) != (self.out_features, self.in_features):
                raise ValueError(f"loaded dense weight has shape {tuple(self.weight.shape)}, expected "
                                 f"{(self.out_features, self.in_features)}")
        else:
            sparse_ops.validate_csr(self.row_ptr.cpu(), self.col.cpu(), self.values.cpu(), self.out_features,
                                    self.in_features)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0, dtype=self.out_dtype))
        super()._apply(fn, recurse)
        # the CSR values stay float32 (the kernel's type) whatever .half()/.to(dtype) did
        self.values = self.values.float()
        if probe.dtype in (torch.float32, torch.bfloat16, torch.float16):
            self.out_dtype = probe.dtype
        return self

    def to_dense_weight(self) -> torch.Tensor:
        """The weight as a dense float32 (N, K) tensor."""
        if self.format == "dense":
            return self.weight.float()
        return sparse_ops.csr_to_dense(self.row_ptr, self.col, self.values, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; "
                             f"this SparseLinear expects {self.in_features}")
        bufs = self._buffers  # one dict lookup instead of nn.Module.__getattr__ per buffer
        weight = bufs["weight"]
        if weight.numel():  # dense fallback
            return F.linear(x.to(weight.dtype), weight, bufs.get("bias")).to(self.out_dtype)
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"input dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
        if x.device != bufs["row_ptr"].device:
            raise ValueError(f"input is on {x.device} but this SparseLinear is on {bufs['row_ptr'].device}; "
                             "move one of them (module.to(device) or x.to(device))")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        args = (x2, bufs["row_ptr"], bufs["col"], bufs["values"], bufs.get("bias"), self.in_features, self.out_dtype)
        if torch.compiler.is_compiling():
            y = sparse_ops._sparse_linear_op(*args)
        else:  # buffers were validated when built/loaded: go straight to the kernel
            y = sparse_ops._sparse_linear_impl(*args)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, nnz={self.nnz}, out_dtype={self.out_dtype}")
