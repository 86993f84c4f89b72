"""``kind = "hf"``: a local transformers folder or a hub id, any ``AutoModel*`` task.

Checkpoints that carry a ``quantization_config`` load through transformers'
own quantizers. Which ones run depends on the machine:

=============  ======================================  =============================
quant_method   backend package                          needs
=============  ======================================  =============================
torchao        ``torchao``                              CPU or GPU
bitsandbytes   ``bitsandbytes``                         a CUDA GPU
gptq           ``gptqmodel`` (or ``auto-gptq``)         a CUDA GPU for the kernels
awq            ``autoawq``                              a CUDA GPU
=============  ======================================  =============================

A checkpoint whose backend is missing, or that needs a GPU on a machine without
one, is a one-line error naming what is missing, before transformers starts.
``quantization_config=`` (e.g. ``transformers.TorchAoConfig("int8_weight_only")``)
quantizes a float checkpoint while loading.

Nothing is downloaded unless the source is a hub id and the machine has network
access; with ``HF_HUB_OFFLINE=1`` an uncached hub id is a clear error.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
from typing import Any, Callable

import torch
from torch import nn

from ..loaded import EMBEDDED_ALIASES, TASKS, LoadedModel, embedded_minilm_dir, is_offline
from ._common import torch_runtime, version_of
from .torch_source import detect_provenance

__all__ = ["GPU_QUANT_BACKENDS", "check_quantization_backend", "load_hf"]

#: quant_method -> (importable module names, pip name, needs CUDA)
GPU_QUANT_BACKENDS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "bitsandbytes": (("bitsandbytes",), "bitsandbytes", True),
    "gptq": (("gptqmodel", "auto_gptq"), "gptqmodel", True),
    "awq": (("awq",), "autoawq", True),
    "torchao": (("torchao",), "torchao", False),
}


def _quant_method(config: Any) -> str | None:
    if config is None:
        return None
    qm = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    if qm is None:
        return None
    qm = str(getattr(qm, "value", qm)).lower()
    return "bitsandbytes" if qm in ("bitsandbytes", "bnb", "bitsandbytes_4bit", "bitsandbytes_8bit") else qm


def check_quantization_backend(quant_method: str | None, where: str) -> None:
    """Raise a one-line ImportError/ValueError when ``quant_method`` cannot run here."""
    if quant_method is None or quant_method not in GPU_QUANT_BACKENDS:
        return
    mods, pip_name, needs_cuda = GPU_QUANT_BACKENDS[quant_method]
    if not any(importlib.util.find_spec(m) is not None for m in mods):
        raise ImportError(f"{where} is quantized with {quant_method}, whose backend is not installed: "
                          f"pip install {pip_name}" + (" (and run on a CUDA GPU)" if needs_cuda else ""))
    if needs_cuda and not torch.cuda.is_available():
        raise ValueError(f"{where} is quantized with {quant_method}, which runs only on a CUDA GPU and this "
                         "machine has none; load it on a GPU machine, or compare a float or torchao checkpoint")


def _local_quant_method(path: pathlib.Path) -> str | None:
    cfg = path / "config.json"
    try:
        return _quant_method(json.loads(cfg.read_text()).get("quantization_config"))
    except (OSError, ValueError, AttributeError):
        return None


def load_hf(source: str | os.PathLike, *, task: str = "features", num_labels: int | None = None,
            trust_remote_code: bool = False, device: str | torch.device | None = None,
            forward: Callable[[nn.Module, Any], Any] | None = None, dtype: torch.dtype | None = None,
            revision: str | None = None, quantization_config: Any = None, tokenizer: Any = None,
            **from_pretrained: Any) -> LoadedModel:
    """Load a transformers checkpoint (see module docstring).

    Parameters
    ----------
    source
        ``"minilm"``, a local folder with ``config.json``, or a hub id.
    task
        One of :data:`~minidiff.models.TASKS` (which ``AutoModel*`` class).
    num_labels
        For classification heads.
    trust_remote_code
        Off by default: code from a hub repository never runs unless asked for.
    device, dtype
        Where and in which floating dtype to put the model.
    forward
        Optional ``forward(model, batch) -> output`` stored in the result.
    revision
        Hub revision (branch, tag or commit).
    quantization_config
        Passed to ``from_pretrained`` (quantize while loading).
    tokenizer
        A tokenizer (or folder) to use instead of the checkpoint's own.
    **from_pretrained
        Further keyword arguments for ``from_pretrained``.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"an hf source is a directory or a hub id, got {type(source).__name__}")
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
    where = str(path) if local else src
    qm = _local_quant_method(path) if local else None
    check_quantization_backend(qm or _quant_method(quantization_config), where)

    transformers = importlib.import_module("transformers")
    auto_cls = getattr(transformers, TASKS[task])
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, **from_pretrained}
    if num_labels is not None:
        kwargs["num_labels"] = int(num_labels)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if revision:
        kwargs["revision"] = revision
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    offline = is_offline()
    if local or offline:
        kwargs["local_files_only"] = True
    try:
        model = auto_cls.from_pretrained(where, **kwargs)
    except (OSError, EnvironmentError) as exc:
        if not local and offline:
            raise ValueError(
                f"cannot load hub id {src!r}: Hugging Face hub access is off (HF_HUB_OFFLINE=1) and the model "
                "is not in the local cache. Pass a local directory (e.g. minidiff.models.embedded_minilm_dir()) "
                "or unset HF_HUB_OFFLINE on a machine with network access.") from exc
        raise ValueError(f"cannot load {src!r} as {TASKS[task]}: {exc}") from exc

    tok = tokenizer
    if tok is None or isinstance(tok, (str, os.PathLike)):
        tok_src = where if tok is None else os.fspath(tok)
        try:
            tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if local or offline or tokenizer is not None:
                tok_kwargs["local_files_only"] = True
            tok = transformers.AutoTokenizer.from_pretrained(tok_src, **tok_kwargs)
        except (OSError, ValueError, KeyError, TypeError):
            tok = None  # image/audio models or checkpoints without tokenizer files

    if device is not None:
        model = model.to(device)
    model.eval()
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    method = _quant_method(qcfg)
    prov = detect_provenance(model)
    if method:
        mods = GPU_QUANT_BACKENDS.get(method, ((method,), method, False))
        prov = {"tool": f"transformers ({method})", "version": version_of(mods[1]) or version_of(method),
                "method": method, "transformers": transformers.__version__, **(
                    {"storage": prov.get("method")} if prov.get("method") else {})}
    return LoadedModel(model=model, tokenizer=tok, forward=forward, source=where, task=task, kind="hf",
                       runtime=torch_runtime(model), provenance=prov)
