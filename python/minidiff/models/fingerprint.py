"""Exact fingerprints of models: a SHA-256 that two different models never share.

The key is a hash of the *exact bytes* of everything that determines what a
model computes:

* every tensor of its state (``state_dict``, plus tensors held as plain module
  attributes), written as name, dtype, shape and raw bytes; 0-dim tensors too;
* quantized tensors (``torch.qint8`` ...) through their integer representation
  (``int_repr()``), their quantization scheme, scale(s), zero point(s) and axis;
* packed parameters of ``torch.ao`` quantized modules (``torch.ScriptObject``
  with an ``unpack()`` method) through what ``unpack()`` returns;
* tensor subclasses (torchao's ``Int8Tensor``, ``Int4Tensor`` ...) through their
  class, their ``__tensor_flatten__`` context and each inner tensor,
  recursively;
* the module structure: every submodule's name and class and its plain
  (non-tensor) configuration attributes (ints, floats, strings, dtypes, ...),
  the ``config`` of transformers models and the generated code of
  ``torch.fx.GraphModule`` (``torch.export`` programs);
* for ONNX and GGUF files, the bytes of the file(s).

Nothing goes through ``repr()`` of a tensor (it truncates, which once gave two
different ``torch.ao`` models the same key). A state that cannot be hashed
exactly (a meta tensor, an opaque packed object, a context object whose only
description is a memory address) raises :class:`UnhashableModelError`; callers
that cache treat that as "do not cache this model, and say so".
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pathlib
from typing import Any

import torch
from torch import nn

__all__ = ["UnhashableModelError", "fingerprint", "fingerprint_file", "fingerprint_module", "update_tensor"]

_CHUNK = 1 << 24


class UnhashableModelError(TypeError):
    """The model's state cannot be hashed exactly; it must not be cached."""


def _is_wrapper_subclass(t: torch.Tensor) -> bool:
    try:
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    except ImportError:  # pragma: no cover - very old torch
        return False
    return bool(is_traceable_wrapper_subclass(t))


def _plain_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a dense strided tensor (0-dim included)."""
    t = t.detach()
    if t.device.type == "meta":
        raise UnhashableModelError("a meta tensor has no data to hash")
    t = t.cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    try:
        return t.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError) as e:  # sub-byte or exotic dtypes
        raise UnhashableModelError(f"cannot read the bytes of a {t.dtype} tensor: {e}") from None


def _ctx_value(v: Any, where: str) -> Any:
    """A JSON-able, exact description of a non-tensor value (flatten contexts, module attributes)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": v.hex()}
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(v)
    if isinstance(v, torch.qscheme):
        return str(v)
    if isinstance(v, torch.Size):
        return list(v)
    if isinstance(v, enum.Enum):
        return f"{type(v).__qualname__}.{v.name}"
    if isinstance(v, (list, tuple)):
        return [_ctx_value(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        return {str(k): _ctx_value(x, f"{where}.{k}") for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"__class__": type(v).__qualname__,
                **{f.name: _ctx_value(getattr(v, f.name), f"{where}.{f.name}") for f in dataclasses.fields(v)}}
    if isinstance(v, torch.Tensor):
        h = hashlib.sha256()
        update_tensor(h, where, v)
        return {"tensor": h.hexdigest()}
    r = repr(v)
    if " at 0x" in r or len(r) > 10_000:
        raise UnhashableModelError(f"{where}: a {type(v).__qualname__} has no exact description to hash")
    return {"__class__": type(v).__qualname__, "repr": r}


def update_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed one tensor into a hashlib object, exactly (see module docstring)."""
    if _is_wrapper_subclass(t):
        inner, ctx = t.__tensor_flatten__()
        head = {"subclass": f"{type(t).__module__}.{type(t).__qualname__}", "shape": list(t.shape),
                "dtype": str(t.dtype), "inner": list(inner), "ctx": _ctx_value(ctx, f"{name}<ctx>")}
        h.update(f"{name}|".encode() + json.dumps(head, sort_keys=True).encode())
        for k in inner:
            update_tensor(h, f"{name}.{k}", getattr(t, k))
        return
    if t.is_quantized:
        q = t.detach().cpu()
        scheme = q.qscheme()
        head: dict[str, Any] = {"quantized": str(q.dtype), "shape": list(q.shape), "qscheme": str(scheme)}
        h.update(f"{name}|".encode() + json.dumps(head, sort_keys=True).encode())
        if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            h.update(f"scale={float(q.q_scale()).hex()}|zp={int(q.q_zero_point())}".encode())
        else:
            h.update(f"axis={int(q.q_per_channel_axis())}".encode())
            h.update(_plain_bytes(q.q_per_channel_scales().double()))
            h.update(_plain_bytes(q.q_per_channel_zero_points().long()))
        h.update(_plain_bytes(q.int_repr()))
        return
    if t.layout != torch.strided:
        if t.layout == torch.sparse_coo:
            c = t.detach().coalesce()
            parts = {"indices": c.indices(), "values": c.values()}
        elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = {"crow": t.crow_indices(), "col": t.col_indices(), "values": t.values()}
        elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = {"ccol": t.ccol_indices(), "row": t.row_indices(), "values": t.values()}
        else:
            raise UnhashableModelError(f"{name}: tensors with layout {t.layout} cannot be hashed exactly")
        h.update(f"{name}|{t.layout}|{tuple(t.shape)}|".encode())
        for k, v in parts.items():
            update_tensor(h, f"{name}.{k}", v)
        return
    if t.device.type == "meta":
        raise UnhashableModelError(f"{name}: a meta tensor has no data (load the weights before hashing)")
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_plain_bytes(t))


def _update_value(h: Any, name: str, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        update_tensor(h, name, v)
    elif isinstance(v, (list, tuple)):
        h.update(f"{name}|{type(v).__name__}{len(v)}".encode())
        for i, x in enumerate(v):
            _update_value(h, f"{name}[{i}]", x)
    elif isinstance(v, dict):
        h.update(f"{name}|dict{len(v)}".encode())
        for k in sorted(v, key=str):
            _update_value(h, f"{name}.{k}", v[k])
    elif isinstance(v, torch.ScriptObject):
        unpack = getattr(v, "unpack", None)
        if unpack is None:
            raise UnhashableModelError(f"{name}: packed object {v!r} has no unpack() to read its weights from")
        h.update(f"{name}|packed".encode())
        _update_value(h, f"{name}.unpack", unpack())
    else:
        h.update(f"{name}=".encode() + json.dumps(_ctx_value(v, name), sort_keys=True).encode())


_SKIP_ATTRS = frozenset({"training", "name_or_path", "tokenizer", "warnings_issued"})


def _module_config(mod: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Plain configuration attributes of one module and tensors held as plain attributes."""
    cfg: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for k, v in sorted(vars(mod).items()):
        if k.startswith("_") or k in _SKIP_ATTRS:
            continue
        if isinstance(v, torch.Tensor):
            tensors[k] = v
            continue
        if k == "config" and hasattr(v, "to_dict"):
            d = {ck: cv for ck, cv in v.to_dict().items() if not ck.startswith("_") and ck != "transformers_version"}
            cfg[k] = json.loads(json.dumps(d, sort_keys=True, default=str))
            continue
        if callable(v) or isinstance(v, nn.Module):
            continue
        try:
            cfg[k] = _ctx_value(v, f"{name}.{k}")
        except UnhashableModelError:
            continue  # an opaque helper object (not state): describes no weights
    if isinstance(mod, torch.fx.GraphModule):
        cfg["__code__"] = mod.code
    return cfg, tensors


def fingerprint_module(module: nn.Module) -> str:
    """Exact SHA-256 of a module: structure, plain configuration and every tensor's bytes.

    Raises
    ------
    UnhashableModelError
        If some part of the state cannot be hashed exactly.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fingerprint_module expects an nn.Module, got {type(module).__name__}")
    own = getattr(module, "minidiff_fingerprint", None)
    if callable(own):
        return str(own())
    h = hashlib.sha256(b"minidiff-module-v1|")
    for name, mod in module.named_modules():
        cfg, tensors = _module_config(mod, name)
        h.update(f"module|{name}|{type(mod).__module__}.{type(mod).__qualname__}|".encode())
        h.update(json.dumps(cfg, sort_keys=True).encode())
        for k, t in tensors.items():
            update_tensor(h, f"{name}.{k}" if name else k, t)
    try:
        state = module.state_dict(keep_vars=True)
    except Exception as e:  # noqa: BLE001 - a module whose state_dict itself fails
        raise UnhashableModelError(f"{type(module).__name__}.state_dict() failed: {e}") from None
    h.update(b"|state|")
    for name in sorted(state):
        _update_value(h, name, state[name])
    return h.hexdigest()


def fingerprint_file(path: str | os.PathLike, *extra: str | os.PathLike) -> str:
    """SHA-256 over the bytes of a model file (and any extra files, e.g. ONNX external data)."""
    h = hashlib.sha256(b"minidiff-file-v1|")
    for p in (path, *extra):
        p = pathlib.Path(p)
        if not p.is_file():
            raise UnhashableModelError(f"{str(p)!r} is not a file")
        h.update(f"{p.name}|{p.stat().st_size}|".encode())
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(model: Any) -> str:
    """Exact fingerprint of a model in any supported form.

    Parameters
    ----------
    model
        An ``nn.Module`` (wrappers of ONNX/GGUF sources hash their file bytes
        through their ``minidiff_fingerprint()``), a ``torch.export.ExportedProgram``
        (hashed through ``.module()``), a :class:`~minidiff.models.LoadedModel`, or a
        path to a model file.

    Raises
    ------
    UnhashableModelError
        If the state cannot be hashed exactly.
    """
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model  # a LoadedModel (duck-typed: models.loaded imports this module lazily)
    if isinstance(model, (str, os.PathLike)):
        return fingerprint_file(model)
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if isinstance(model, nn.Module):
        return fingerprint_module(model)
    raise UnhashableModelError(f"cannot fingerprint a {type(model).__name__}; expected an nn.Module or a file path")
