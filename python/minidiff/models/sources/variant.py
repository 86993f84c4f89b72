"""``kind = "variant"``: a folder written by :func:`minidiff.save_variant`
(``model.safetensors`` + ``manifest.json``, optional ``tokenizer/``)."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import torch
from torch import nn

from ..loaded import LoadedModel
from ._common import torch_runtime

__all__ = ["load_variant_source"]


def load_variant_source(source: str | os.PathLike, *, task: str = "features", base: nn.Module | None = None,
                        device: str | torch.device | None = None,
                        forward: Callable[[nn.Module, Any], Any] | None = None) -> LoadedModel:
    """Load a ``save_variant`` folder; its manifest's method and minidiff version are the provenance.

    ``base`` is passed to :func:`minidiff.compress.load_variant` (models it cannot
    rebuild from the manifest alone)."""
    from minidiff.models.saved import load_variant
    p = pathlib.Path(source).expanduser()
    if not (p / "manifest.json").is_file():
        raise ValueError(f"{str(p)!r} is not a minidiff.save_variant folder (no manifest.json inside)")
    v = load_variant(p, base=base, device=device)
    model = v.model.eval()
    if getattr(model, "tokenizer", None) is None and v.tokenizer is not None:
        model.tokenizer = v.tokenizer
    man = v.manifest
    prov = {"tool": "minidiff", "version": man.get("minidiff_version") or man.get("version"),
            "method": man.get("method"), "parameters": man.get("parameters")}
    return LoadedModel(model=model, tokenizer=v.tokenizer or getattr(model, "tokenizer", None), forward=forward,
                       source=str(p), task=task if task != "features" else "module", kind="variant",
                       runtime=torch_runtime(model), provenance={k: x for k, x in prov.items() if x is not None},
                       extra={"manifest": man})
