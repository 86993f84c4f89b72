"""Pieces shared by the source loaders: errors, versions, taps, the output type."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Sequence

import torch
from torch import nn


def missing_package(package: str, purpose: str, pip_name: str | None = None) -> ImportError:
    """A one-line ImportError: what needs ``package`` and how to install it."""
    return ImportError(f"{purpose} needs the '{package}' package, which is not installed: "
                       f"pip install {pip_name or package}")


def require(module: str, purpose: str, pip_name: str | None = None) -> Any:
    """Import ``module`` or raise :func:`missing_package`'s one-line error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_package(module, purpose, pip_name) from None


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_runtime(model: nn.Module | None = None) -> str:
    dev = "cpu"
    if model is not None:
        for t in list(model.parameters())[:1] + list(model.buffers())[:1]:
            dev = t.device.type
            break
    return f"torch {torch.__version__} ({dev})"


class SourceOutput(dict):
    """A model output: a dict (``logits`` first) with attribute access, like
    transformers' ``ModelOutput``, so ``out.logits`` and ``out["logits"]`` both work."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Tap(nn.Module):
    """A captured layer of a non-torch model: the identity, called by the wrapper with
    the layer's tensor so forward hooks on it see that tensor as the module output.

    ``marker=True`` gives it an empty (non-persistent) buffer, which marks it as a
    module with state for code that looks for "the last module with state".
    """

    def __init__(self, tensor_name: str, marker: bool = False) -> None:
        super().__init__()
        self.tensor_name = tensor_name
        if marker:
            self.register_buffer("marker", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"tensor={self.tensor_name!r}"

    def hooked(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)


def _container(keys: Sequence[str]) -> nn.Module:
    if keys and all(k.isdigit() for k in keys) and sorted(int(k) for k in keys) == list(range(len(keys))):
        return nn.ModuleList()
    return nn.Module()


def build_taps(root: nn.Module, layers: dict[str, str], marker_last: str | None = None) -> dict[str, Tap]:
    """Create :class:`Tap` submodules of ``root`` at the dotted names of ``layers``
    (module name -> graph tensor name), with ``nn.ModuleList`` parents where the
    children are ``0..n-1`` (so blocks look like a transformer's layer list).

    ``marker_last`` names one more tap (e.g. the classifier head's input) that is
    registered last and carries the state marker.
    """
    names = list(layers) + ([marker_last] if marker_last else [])
    tree: dict[str, Any] = {}
    for n in names:
        node = tree
        for part in n.split("."):
            node = node.setdefault(part, {})
    for n in names:
        parts = n.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i + 1])
            if prefix in layers or prefix == marker_last:
                if i + 1 < len(parts):
                    raise ValueError(f"layer {prefix!r} and its submodule {n!r} cannot both be captured from a "
                                     "graph; choose one of them")
    taps: dict[str, Tap] = {}

    def make(parent: nn.Module, node: dict[str, Any], prefix: str) -> None:
        for key, sub in node.items():
            full = f"{prefix}.{key}" if prefix else key
            if not sub:
                child: nn.Module = Tap(layers.get(full, ""), marker=(full == marker_last))
                if full == marker_last and full not in layers:
                    child.tensor_name = "<head input>"
                taps[full] = child  # type: ignore[assignment]
            else:
                child = _container(list(sub))
                make(child, sub, full)
            if isinstance(parent, nn.ModuleList):
                parent.append(child)
            else:
                parent.add_module(key, child)

    ordered: dict[str, Any] = {}
    # register in the order given (ModuleList children in index order)
    for k in tree:
        ordered[k] = tree[k]

    def sort_tree(node: dict[str, Any]) -> dict[str, Any]:
        keys = list(node)
        if keys and all(k.isdigit() for k in keys):
            keys = sorted(keys, key=int)
        return {k: sort_tree(node[k]) for k in keys}

    make(root, sort_tree(ordered), "")
    return taps
