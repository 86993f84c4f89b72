"""Models from every toolchain, behind one interface.

``minidiff.models.load_model(source, *, kind=None, task=..., **options)`` turns
any of these into a :class:`~minidiff.models.LoadedModel`:

=========  ==============================================================  =================
kind       source                                                           module
=========  ==============================================================  =================
torch      an ``nn.Module`` (incl. ``torch.ao`` quantized modules, torchao  ``torch_source``
           tensor subclasses, fp16/bf16 casts), a ``torch.export``
           program, a ``torch.save``d module file (``.pt``/``.pth``) or a
           ``torch.export.save``d program (``.pt2``)
hf         a local transformers folder (``config.json``) or a hub id, any   ``hf``
           ``AutoModel*`` task, incl. ``quantization_config`` checkpoints
onnx       an ``.onnx`` file run with onnxruntime (CPU, CUDA when present),  ``onnx``
           incl. ``onnxruntime.quantization`` dynamic int8 and QDQ models
gguf       a llama.cpp ``.gguf`` file: blocks dequantized exactly with the   ``gguf``
           ``gguf`` package into the matching transformers architecture;
           optionally ``runtime="llama.cpp"`` (llama-cpp-python)
variant    a ``minidiff.save_variant`` folder                               ``variant``
=========  ==============================================================  =================

``kind`` is inferred when the source says it unambiguously: an ``nn.Module`` or
exported program (torch), a folder with ``manifest.json`` (variant) or
``config.json`` (hf), a file ending ``.onnx`` / ``.gguf`` / ``.pt`` / ``.pth`` /
``.pt2``, the name ``"minilm"``. A missing optional package is an
:class:`ImportError` whose one-line message says what to install; an unsupported
source is a :class:`ValueError` saying which kinds exist.

The module contract
-------------------
Everything downstream (capture, the study) sees an ``nn.Module``. Sources that
are not torch modules (an ONNX Runtime session, llama.cpp) are wrapped in a thin
``nn.Module`` that keeps that contract:

* ``wrapper(**inputs)`` (or ``wrapper(x)``) runs the *unmodified* deployed
  model and returns a :class:`SourceOutput` (a dict with attribute access) whose
  ``logits`` is the model's first output, so predictions and divergences always
  come from what a user deploys;
* every captured layer is a submodule (a :class:`Tap`) with the same dotted name
  the layer has in the torch model it was exported from (``encoder.layer.3``,
  transformer blocks inside an ``nn.ModuleList``), so module-name layer lists,
  automatic layer choice and forward hooks work unchanged: when any tap carries
  a hook (or ``output_hidden_states=True`` is passed), the wrapper runs a second
  session that exposes those graph tensors as extra outputs and calls each tap
  with its tensor. ONNX Runtime fuses differently once inner tensors are graph
  outputs, so the layers describe the same weights but the outputs are never
  taken from that second session; ``LoadedModel.notes`` records it;
* with ``output_hidden_states=True`` the output also carries ``hidden_states``:
  the captured layers in order (for a transformer: the embedding output, then
  each block, as transformers lays them out);
* the last tap holds an empty buffer so that "the input of the last module with
  state" (the features a classifier head sees) is the graph tensor feeding the
  head, when the graph has one;
* ``minidiff_fingerprint()`` (exact bytes of the model file) and
  ``minidiff_facts()`` (storage of the file) replace the module-based ones.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import torch
from torch import nn

from ._common import SourceOutput, Tap, build_taps, missing_package

KINDS = ("torch", "hf", "onnx", "gguf", "variant")

__all__ = ["KINDS", "SourceOutput", "Tap", "build_taps", "infer_kind", "load_model", "missing_package"]


def infer_kind(source: Any) -> str:
    """The source kind ``source`` names unambiguously (see module docstring).

    Raises
    ------
    ValueError
        If the kind cannot be told; the message lists the kinds.
    """
    if isinstance(source, (nn.Module, torch.export.ExportedProgram)):
        return "torch"
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"a model source is an nn.Module, a file, a folder or a hub id, got {type(source).__name__}")
    src = os.fspath(source)
    from ..loaded import EMBEDDED_ALIASES
    if src.lower() in EMBEDDED_ALIASES:
        return "hf"
    p = pathlib.Path(src).expanduser()
    if p.is_dir():
        if (p / "manifest.json").exists():
            return "variant"
        if (p / "config.json").exists():
            return "hf"
        raise ValueError(f"folder {src!r} holds neither manifest.json (a minidiff.save_variant folder) nor "
                         "config.json (a transformers checkpoint); pass kind= explicitly")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".gguf":
        return "gguf"
    if suffix in (".pt", ".pth", ".pt2"):
        return "torch"
    if p.exists():
        raise ValueError(f"cannot tell the format of {src!r} from its name; pass kind= one of {KINDS} "
                         "(.onnx, .gguf, .pt/.pth/.pt2 files, variant or transformers folders)")
    if src.startswith((".", "/", "~")) or suffix:
        raise ValueError(f"{src!r} does not exist: it is not a directory with a transformers checkpoint or a "
                         "saved variant, nor a model file (.onnx, .gguf, .pt, .pth, .pt2); give an existing path")
    return "hf"  # a hub id such as "org/name"


def load_model(source: Any, *, kind: str | None = None, task: str = "features", **options: Any) -> Any:
    """Load ``source`` as a :class:`~minidiff.models.LoadedModel` (see module docstring).

    ``options`` go to the kind's loader: :func:`.torch_source.load_torch`,
    :func:`.hf.load_hf`, :func:`.onnx.load_onnx`, :func:`.gguf.load_gguf`,
    :func:`.variant.load_variant_source`.
    """
    if kind is None:
        kind = infer_kind(source)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {KINDS}")
    if kind == "torch":
        from .torch_source import load_torch
        return load_torch(source, task=task, **options)
    if kind == "hf":
        from .hf import load_hf
        return load_hf(source, task=task, **options)
    if kind == "onnx":
        from .onnx import load_onnx
        return load_onnx(source, task=task, **options)
    if kind == "gguf":
        from .gguf import load_gguf
        return load_gguf(source, task=task, **options)
    from .variant import load_variant_source
    return load_variant_source(source, task=task, **options)
