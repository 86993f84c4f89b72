"""Model facts counted for the real storage: parameters, non-zero share, bytes.

Three numbers describe a model's size, whatever stores it:

``num_params``
    Logical weights: the number of elements of every weight and bias as the
    model computes with them (a packed ``torch.ao`` int8 ``(N, K)`` matrix counts
    ``N*K``, a CSR ``SparseLinear`` counts its dense ``N*K``, a torchao
    ``Int8Tensor`` counts its outer shape). Quantization metadata (scales, zero
    points, index arrays) are storage, not parameters.
``nonzero_fraction``
    ``#{w != 0} / #w`` over weight matrices and kernels (``ndim >= 2``),
    counted on the values the model computes with (dequantized for quantized
    storage); ``None`` when the model has none.
``bytes``
    Bytes of the stored state: every tensor of the state as stored (int8
    values, scales, zero points, CSR indices, tensor-subclass inner tensors,
    ONNX initializers, GGUF blocks). Shared (tied) tensors are counted once.

Each storage form is handled where it is defined: ``torch.ao`` quantized modules
through their unpacked weights, minidiff's ``Int8Linear`` / ``SparseLinear`` /
``SemiStructuredLinear`` through their buffers, tensor subclasses through
``__tensor_flatten__``, wrappers of ONNX/GGUF files through their
``minidiff_facts()``.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ModelFacts", "model_facts", "onnx_facts", "gguf_facts", "tensor_storage_bytes"]


@dataclass
class ModelFacts:
    """Size facts of one model (see module docstring)."""

    num_params: int
    nonzero_fraction: float | None
    bytes: int
    storage: str = "dense"

    @property
    def size_mb(self) -> float:
        return self.bytes / 2 ** 20

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size_mb"] = self.size_mb
        return d


class _Counter:
    def __init__(self) -> None:
        self.params = 0
        self.nz = 0
        self.mat = 0
        self.bytes = 0
        self.kinds: set[str] = set()
        self._seen: dict[int, Any] = {}  # id -> object, kept alive so ids are not reused

    def seen(self, t: Any) -> bool:
        k = id(t)
        if k in self._seen:
            return True
        self._seen[k] = t
        return False

    def weight(self, logical_numel: int, ndim: int, nonzero: int | None, stored_bytes: int, kind: str) -> None:
        self.params += int(logical_numel)
        self.bytes += int(stored_bytes)
        self.kinds.add(kind)
        if ndim >= 2 and nonzero is not None:
            self.mat += int(logical_numel)
            self.nz += int(nonzero)

    def storage_only(self, stored_bytes: int) -> None:
        self.bytes += int(stored_bytes)


def _is_subclass(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    return bool(is_traceable_wrapper_subclass(t))


def tensor_storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored: quantized tensors as int values + qparams,
    subclasses as the sum of their inner tensors, sparse tensors as indices + values."""
    if _is_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_storage_bytes(getattr(t, n)) for n in names)
    if t.is_quantized:
        n = t.numel() * t.element_size()
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return n + 8 + 8
        return n + t.q_per_channel_scales().numel() * 8 + t.q_per_channel_zero_points().numel() * 8
    if t.layout == torch.sparse_coo:
        c = t.coalesce()
        return tensor_storage_bytes(c.indices()) + tensor_storage_bytes(c.values())
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return sum(tensor_storage_bytes(x) for x in (t.crow_indices(), t.col_indices(), t.values()))
    return t.numel() * t.element_size()


def _dense_values(t: torch.Tensor) -> torch.Tensor:
    """The values a model computes with (dequantized / densified), for zero counting."""
    if _is_subclass(t):
        deq = getattr(t, "dequantize", None)
        return deq() if callable(deq) else t.detach().clone()
    if t.is_quantized:
        return t.dequantize()
    if t.layout != torch.strided:
        return t.to_dense()
    return t


def _count_tensor(c: _Counter, t: torch.Tensor, kind: str) -> None:
    if c.seen(t):
        return
    if t.device.type == "meta":
        c.weight(t.numel(), t.ndim, None, 0, "meta")
        return
    nz = int((_dense_values(t.detach()) != 0).sum()) if t.ndim >= 2 else None
    c.weight(t.numel(), t.ndim, nz, tensor_storage_bytes(t), kind)


def _torch_ao_weights(mod: nn.Module) -> list[torch.Tensor] | None:
    """(weight, bias) of a ``torch.ao`` quantized module, unpacked; None for other modules."""
    if not type(mod).__module__.startswith("torch.ao.nn.quantized"):
        return None
    if type(mod).__name__.endswith("PackedParams"):
        return []  # counted by the quantized module that owns it
    wb = getattr(mod, "_weight_bias", None)
    if callable(wb):
        w, b = wb()
        return [w] + ([b] if b is not None else [])
    w = getattr(mod, "weight", None)
    if callable(w):
        b = getattr(mod, "bias", None)
        out = [w()]
        if callable(b) and b() is not None:
            out.append(b())
        return out
    return None


def _count_module(c: _Counter, mod: nn.Module) -> None:
    from minidiff.nn import Int8Linear, SemiStructuredLinear, SparseLinear
    if isinstance(mod, Int8Linear):
        w = mod.weight_int8
        c.weight(w.numel(), 2, int((w != 0).sum()), tensor_storage_bytes(w) + tensor_storage_bytes(mod.weight_scale),
                 "int8")
        if mod.bias is not None:
            _count_tensor(c, mod.bias, "dense")
        return
    if isinstance(mod, SparseLinear):
        n, k = mod.out_features, mod.in_features
        stored = sum(tensor_storage_bytes(getattr(mod, a)) for a in ("row_ptr", "col", "values"))
        c.weight(n * k, 2, int((mod.values != 0).sum()), stored, "csr")
        if mod.bias is not None:
            _count_tensor(c, mod.bias, "dense")
        return
    if isinstance(mod, SemiStructuredLinear):
        n, k = mod.out_features, mod.in_features
        stored = tensor_storage_bytes(mod.values) + tensor_storage_bytes(mod.meta)
        c.weight(n * k, 2, int((mod.values != 0).sum()), stored, "2:4")
        if mod.bias is not None:
            _count_tensor(c, mod.bias, "dense")
        return
    ao = _torch_ao_weights(mod)
    if ao is not None:
        for t in ao:
            _count_tensor(c, t, ("torch.ao-" + str(t.dtype).replace("torch.", "")) if t.is_quantized
                          else str(t.dtype).replace("torch.", ""))
        return
    for p in mod.parameters(recurse=False):
        _count_tensor(c, p, "subclass:" + type(p).__name__ if _is_subclass(p) else (
            "quantized" if p.is_quantized else str(p.dtype).replace("torch.", "")))
    skip = getattr(mod, "_non_persistent_buffers_set", set())
    for name, b in mod.named_buffers(recurse=False):
        if name in skip or c.seen(b):
            continue
        c.storage_only(tensor_storage_bytes(b))


def model_facts(model: Any) -> ModelFacts:
    """Parameters, non-zero share and stored bytes of a model (see module docstring).

    Parameters
    ----------
    model
        An ``nn.Module`` (any storage), a :class:`~minidiff.models.LoadedModel`,
        or a path to an ``.onnx`` / ``.gguf`` file.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a LoadedModel (duck-typed: models.loaded imports this module lazily)
    if isinstance(model, (str, os.PathLike)):
        p = pathlib.Path(model)
        if p.suffix == ".onnx":
            return onnx_facts(p)
        if p.suffix == ".gguf":
            return gguf_facts(p)
        raise ValueError(f"model_facts reads .onnx and .gguf files; got {str(p)!r}")
    own = getattr(model, "minidiff_facts", None)
    if callable(own):
        return own()
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_facts expects an nn.Module, a LoadedModel or a file path, got {type(model).__name__}")
    c = _Counter()
    for mod in model.modules():
        _count_module(c, mod)
    kinds = sorted(c.kinds - {"float32"}) or ["float32"]
    return ModelFacts(num_params=c.params, nonzero_fraction=(c.nz / c.mat) if c.mat else None, bytes=c.bytes,
                      storage="+".join(kinds))


def onnx_facts(path: str | os.PathLike) -> ModelFacts:
    """Facts of an ONNX file from its initializers.

    Weights are the initializers with at least one dimension whose names are not
    quantization parameters (``*_scale``, ``*_zero_point``); every initializer's
    bytes count as storage.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError("reading ONNX files needs the 'onnx' package: pip install onnx") from None
    m = onnx.load(str(path))
    c = _Counter()
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init, base_dir=str(pathlib.Path(path).parent))
        meta = init.name.endswith(("_scale", "_zero_point", "scale", "zero_point"))
        # int32/int64 initializers are shapes, indices and int32 biases' bookkeeping only when not weights
        if meta or a.ndim == 0 or a.dtype.kind not in "fiu" or a.dtype in (np.int64,):
            c.storage_only(a.nbytes)
            continue
        c.weight(a.size, a.ndim, int((a != 0).sum()) if a.ndim >= 2 else None, a.nbytes, str(a.dtype))
    kinds = sorted(c.kinds - {"float32"}) or ["float32"]
    return ModelFacts(num_params=c.params, nonzero_fraction=(c.nz / c.mat) if c.mat else None, bytes=c.bytes,
                      storage="onnx:" + "+".join(kinds))


def gguf_facts(path: str | os.PathLike) -> ModelFacts:
    """Facts of a GGUF file: logical elements, stored block bytes, non-zeros after
    exact dequantization with the ``gguf`` package."""
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    r = gguf.GGUFReader(str(path))
    c = _Counter()
    for t in r.tensors:
        ndim = len(t.shape)
        nz = None
        if ndim >= 2:
            nz = int((gguf.quants.dequantize(t.data, t.tensor_type) != 0).sum())
        c.weight(int(t.n_elements), ndim, nz, int(t.n_bytes), t.tensor_type.name)
    return ModelFacts(num_params=c.params, nonzero_fraction=(c.nz / c.mat) if c.mat else None, bytes=c.bytes,
                      storage="gguf:" + "+".join(sorted(c.kinds)))
