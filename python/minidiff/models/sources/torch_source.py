"""``kind = "torch"``: any ``nn.Module``, ``torch.export`` program or saved module file.

Covered storage forms: float modules, ``fp16``/``bf16`` casts, ``torch.ao``
dynamic and static quantized modules (``quantize_dynamic``, eager ``convert``),
torchao-quantized modules (tensor subclasses: ``Int8WeightOnlyConfig``,
``Int8DynamicActivationInt8WeightConfig``, ``Int4WeightOnlyConfig`` where the
machine has a kernel for it), minidiff's own ``Int8Linear`` / ``SparseLinear`` /
``SemiStructuredLinear``, ``torch.export`` programs (``ExportedProgram.module()``
is what runs), and files written by ``torch.save(module, path)`` or
``torch.export.save(program, path)`` (``.pt2``).

``torch.save`` files are pickles: loading one runs code from the file, so load
only files you trust (``torch.load(weights_only=False)``; torchao's classes must
be importable, which importing torchao ensures).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import torch
from torch import nn

from ..loaded import LoadedModel
from ._common import torch_runtime, version_of

__all__ = ["detect_provenance", "load_torch"]


def detect_provenance(model: nn.Module) -> dict[str, Any]:
    """The toolchain a module's storage shows: torchao subclasses, ``torch.ao``
    quantized modules, minidiff's replacement layers, half-precision casts."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    subclasses = sorted({type(p).__name__ for p in model.parameters() if is_traceable_wrapper_subclass(p)})
    if subclasses:
        return {"tool": "torchao", "version": version_of("torchao"), "method": "+".join(subclasses)}
    ao = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
                 and not type(m).__name__.endswith("PackedParams")})
    if ao:
        return {"tool": "torch.ao.quantization", "version": torch.__version__, "method": "+".join(ao)}
    md = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("minidiff.nn")})
    if md:
        import minidiff
        return {"tool": "minidiff", "version": minidiff.__version__, "method": "+".join(md)}
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    if dtypes and set(dtypes) <= {"float16", "bfloat16"}:
        return {"tool": "torch", "version": torch.__version__, "method": f"cast to {'+'.join(dtypes)}"}
    if isinstance(model, torch.fx.GraphModule):
        return {"tool": "torch.export", "version": torch.__version__, "method": "ExportedProgram.module()"}
    return {}


def _read_file(path: pathlib.Path) -> nn.Module:
    if path.suffix.lower() == ".pt2":
        try:
            ep = torch.export.load(str(path))
        except Exception as e:  # noqa: BLE001 - torch.export raises many types
            raise ValueError(f"{str(path)!r} is not a program saved with torch.export.save: {e}") from None
        return ep.module()
    try:
        import torchao  # noqa: F401 - registers torchao's tensor classes for unpickling
    except ImportError:
        pass
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - unpickling raises anything
        raise ValueError(f"cannot read {str(path)!r} with torch.load: {type(e).__name__}: {e}") from None
    if isinstance(obj, torch.export.ExportedProgram):
        return obj.module()
    if not isinstance(obj, nn.Module):
        what = "a state dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(f"{str(path)!r} holds {what}, not a whole nn.Module; save the module itself "
                         "(torch.save(model, path)), or load the state into your model and pass the module")
    return obj


def load_torch(source: Any, *, task: str = "module", forward: Callable[[nn.Module, Any], Any] | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               tokenizer: Any = None) -> LoadedModel:
    """Load a torch source (see module docstring).

    Parameters
    ----------
    source
        ``nn.Module``, ``torch.export.ExportedProgram``, or a path to a
        ``torch.save``d module / ``torch.export.save``d program.
    task
        Recorded as given (``"module"`` unless a transformers task is named).
    forward
        Optional ``forward(model, batch) -> output`` for modules not called as
        ``model(**batch)`` / ``model(x)``.
    device, dtype
        Move / cast the model (``dtype`` casts floating parameters, e.g. to bf16).
    tokenizer
        Attached as ``model.tokenizer`` when the module has none (text data).
    """
    where: str
    if isinstance(source, torch.export.ExportedProgram):
        model = source.module()
        where = "torch.export program"
    elif isinstance(source, nn.Module):
        model = source
        where = type(source).__name__
    elif isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"torch model file {str(path)!r} does not exist")
        model = _read_file(path)
        where = str(path)
    else:
        raise ValueError(f"a torch source is an nn.Module, an ExportedProgram or a file path, "
                         f"got {type(source).__name__}")
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()  # exported programs refuse train/eval switching and are in eval form already
    if tokenizer is not None and getattr(model, "tokenizer", None) is None:
        model.tokenizer = tokenizer
    return LoadedModel(model=model, tokenizer=getattr(model, "tokenizer", None), forward=forward, source=where,
                       task="module" if task == "features" else task, kind="torch",
                       runtime=torch_runtime(model), provenance=detect_provenance(model))
