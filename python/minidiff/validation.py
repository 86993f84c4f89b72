"""Validation rules shared by the study, the command line and the models.

Engine-level argument checks live beside the engines (``minidiff.metrics._checks``,
``minidiff.ops._validate``); this module holds the rules about the environment
that several entry points share, so that each exists once.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from pydantic import ValidationError


def check_device(device: str | torch.device, where: str = "") -> torch.device:
    """Parse ``device`` and check that this machine has it (``where`` prefixes the message).

    Raises
    ------
    ValueError
        For a string torch cannot parse, a CUDA device on a machine without CUDA
        (or with fewer devices than the index asks for), or an MPS device where
        MPS is unavailable. The message says what to use instead.
    """
    pre = f"{where}: " if where else ""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{pre}{device!r} is not a device name ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{pre}{device!r} asked for CUDA, but this machine has no usable CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False); use 'cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{pre}{device!r} does not exist; this machine has {n} CUDA device(s) "
                             f"(cuda:0 .. cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{pre}{device!r} is not available on this machine; use 'cpu'")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{pre}device type {dev.type!r} is not supported by minidiff; use 'cpu' or 'cuda'")
    if dev.type == "meta":
        raise ValueError(f"{pre}the 'meta' device holds no data, so nothing can be measured on it; use 'cpu'")
    return dev


def check_module_has_data(module: Any, name: str = "model") -> Any:
    """Refuse a module whose weights are not there to read.

    A module built under ``torch.device("meta")`` (or loaded with empty weights,
    e.g. ``accelerate.init_empty_weights``) has shapes but no values: everything
    computed from it would be made up. Other objects pass through unchanged.
    """
    if isinstance(module, torch.nn.Module):
        for pname, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            if t.device.type == "meta":
                raise ValueError(f"{name} has no weights to read: {pname or 'its tensor'} is on the 'meta' device "
                                 "(shapes only). Load its weights first, e.g. model.to_empty(device='cpu') and "
                                 "then model.load_state_dict(...), or load the checkpoint without empty weights")
    return module


class StudyFileError(ValueError):
    """A study file that cannot be used; the message says which key and why."""


_TYPE_WORDS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
    "bool_type": "true or false", "bool_parsing": "true or false", "list_type": "a list",
    "dict_type": "a table", "model_type": "a table", "model_attributes_type": "a table",
}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("mlp", "cnn", "minilm", "hub", "path", "torch", "hf", "onnx", "gguf", "variant",
                      "function-after[_name_ok(), str]") and out:
            continue  # discriminated-union tag, not a key the user wrote
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def format_validation_error(err: ValidationError, source: str = "study file") -> str:
    """One line per problem: ``source: key 'a.b': expected an integer, got 'x'``."""
    lines = []
    for e in err.errors():
        where = _loc(tuple(e.get("loc", ())))
        typ = e.get("type", "")
        got = e.get("input")
        if typ == "extra_forbidden":
            lines.append(f"unknown key '{where}' (remove it or check its spelling)")
        elif typ == "missing":
            lines.append(f"missing required key '{where}'")
        elif typ in _TYPE_WORDS:
            lines.append(f"key '{where}': expected {_TYPE_WORDS[typ]}, got {got!r}")
        elif typ in ("literal_error", "union_tag_invalid"):
            exp = e.get("ctx", {}).get("expected", e.get("ctx", {}).get("expected_tags", ""))
            lines.append(f"key '{where}': expected one of {exp}, got {got!r}")
        elif typ == "union_tag_not_found":
            lines.append(f"key '{where}': needs a 'kind' (mlp, cnn, minilm, hub, path, torch, hf, onnx, gguf "
                         "or variant)")
        else:
            msg = e.get("msg", "").removeprefix("Value error, ")
            if not e.get("loc"):  # a rule across keys: its message names them
                lines.append(msg)
                continue
            lines.append(f"key '{where}': {msg}" + (f" (got {got!r})" if typ.startswith(("greater", "less", "too_")) else ""))
    return f"{source}: " + "; ".join(lines)
