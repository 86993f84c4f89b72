"""A compressed variant (new model + manifest) and its safetensors/JSON storage.

On disk a variant is a directory::

    model.safetensors   the state dict (no pickle anywhere)
    manifest.json       what was done (method, parameters, seed, sparsity, sizes),
                        how to rebuild the skeleton (architecture + per-module
                        shapes/types), and the sha256 of model.safetensors
    tokenizer/          optional, the tokenizer's own JSON/text files

It is written to a temporary sibling directory and moved into place with
``os.replace``, so a crash never leaves a half-written variant behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from minidiff._units import human_bytes

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Variant:
    """A compressed model and the record of how it was made.

    Attributes
    ----------
    model : nn.Module
        A new model; the model it was made from is never modified.
    manifest : dict
        ``method``, ``parameters``, ``seed``, ``sparsity`` (``per_layer`` and
        ``overall``), ``parameter_count``, ``nonzero_parameters``,
        ``state_bytes`` (in memory), ``bytes_on_disk`` (after saving),
        ``source`` (id, sha256 and parameter count of the original) and
        method-specific entries (e.g. the lottery-ticket mask ``schedule``).
    masks : dict or None
        Pruning masks (parameter name -> bool tensor) where the method has them,
        for mask-preserving fine-tuning. Not saved: pruned weights are zeros.
    tokenizer
        The tokenizer to feed the model (text models), if known.
    """

    model: nn.Module
    manifest: dict[str, Any]
    masks: dict[str, torch.Tensor] | None = None
    tokenizer: Any = None

    @property
    def name(self) -> str:
        m = self.manifest
        return m.get("name") or f"{m.get('method', 'variant')}-seed{m.get('seed')}"


# -- model helpers -------------------------------------------------------------------

def clone_model(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` that shares (does not copy) an attached tokenizer."""
    memo: dict[int, Any] = {}
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        memo[id(tok)] = tok
    return copy.deepcopy(model, memo)


def state_sha256(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)


DEFAULT_EXCLUDE = ("head", "classifier", "lm_head", "score")
"""Last name parts of output heads that the recipes leave in floating point by default."""


def linear_types() -> tuple[type, ...]:
    """The layer types the recipes treat as a Linear: ``nn.Linear`` and, when transformers is
    loaded, its ``pytorch_utils.Conv1D`` (GPT-2's projections: ``y = x W + b`` with ``W``
    stored ``(in, out)``). Matched by exact type, so ``nn.Linear`` subclasses whose weight
    other code reads directly (``nn.MultiheadAttention.out_proj``) are not replaced."""
    pu = sys.modules.get("transformers.pytorch_utils")  # loaded whenever a model holds a Conv1D
    conv1d = getattr(pu, "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def is_conv1d(mod: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (weight stored transposed)."""
    types = linear_types()
    return len(types) > 1 and type(mod) is types[1]


def linear_weight(mod: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or a ``Conv1D`` (a view)."""
    return mod.weight.T if is_conv1d(mod) else mod.weight


def as_linear(mod: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``mod`` (``nn.Linear`` or ``Conv1D``) computes, with the
    same weight values (``W^T`` of a Conv1D, copied contiguous) and bias."""
    if type(mod) is nn.Linear:
        return mod
    if not is_conv1d(mod):
        raise ValueError(f"expected nn.Linear or transformers Conv1D, got {type(mod).__name__}")
    w = mod.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w.T)
        if mod.bias is not None:
            lin.bias.copy_(mod.bias.detach())
    return lin


def tied_to_embedding(model: nn.Module) -> dict[str, str]:
    """Modules whose ``weight`` is the very tensor of an ``nn.Embedding`` (a tied LM head):
    module name -> embedding name."""
    emb = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    out = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if n and not isinstance(m, nn.Embedding) and isinstance(w, torch.Tensor) and id(w) in emb:
            out[n] = emb[id(w)]
    return out


def default_layers(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """The layers a recipe compresses by default: every module of exactly one of ``kinds``
    except output heads (last name part in :data:`DEFAULT_EXCLUDE`) and layers whose weight is
    tied to an embedding (GPT-2's ``lm_head`` is ``wte``): compressing those would also change,
    or untie, the input embedding. Name them in ``layers=`` to include them."""
    tied = tied_to_embedding(model)
    return [n for n, m in model.named_modules() if n and type(m) in kinds
            and n.rsplit(".", 1)[-1] not in DEFAULT_EXCLUDE and n not in tied]


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding a prunable matrix: ``nn.Linear``/``nn.Conv*``, transformers' ``Conv1D``
    and minidiff's replacement linears (anything with an ``in_features`` attribute)."""
    out = {}
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d) + linear_types()
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) or (name and hasattr(mod, "in_features") and hasattr(mod, "out_features")):
            out[name] = mod
    return out


def _weight_zero_stats(mod: nn.Module) -> tuple[int, int] | None:
    for attr in ("weight", "qweight", "weight_int8", "weight_q"):
        w = getattr(mod, attr, None)
        if isinstance(w, torch.Tensor) and w.ndim >= 2:
            return int((w == 0).sum().item()), int(w.numel())
    dense = (getattr(mod, "to_dense_weight", None) or getattr(mod, "dense_weight", None)
             or getattr(mod, "dequantized_weight", None))
    if callable(dense):
        try:
            w = dense()
        except Exception:  # noqa: BLE001 - a replacement module without a dense view
            return None
        if isinstance(w, torch.Tensor):
            return int((w == 0).sum().item()), int(w.numel())
    return None


def sparsity_report(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None,
                    base_counts: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per-layer and overall sparsity of the weight matrices.

    With ``masks`` (parameter name -> bool keep-mask) sparsity is the masked
    fraction; otherwise the fraction of exact zeros. With ``base_counts`` (layer
    -> number of weights in the original) a structurally shrunk layer counts its
    removed weights as pruned: ``1 - nonzero_now / base_count``.
    """
    per_layer: dict[str, float] = {}
    zeros_total = 0
    total = 0
    if masks:
        for pname, mask in masks.items():
            layer = pname.rsplit(".", 1)[0]
            z = int((~mask.bool()).sum().item())
            n = int(mask.numel())
            per_layer[layer] = z / n
            zeros_total += z
            total += n
    else:
        for name, mod in weight_modules(model).items():
            st = _weight_zero_stats(mod)
            if st is None:
                continue
            z, n = st
            if base_counts is not None and name in base_counts:
                nz = n - z
                n = int(base_counts[name])
                z = n - nz
            per_layer[name] = z / n if n else 0.0
            zeros_total += z
            total += n
    return {"per_layer": per_layer, "overall": zeros_total / total if total else 0.0}


def state_bytes(model: nn.Module) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def make_manifest(method: str, parameters: Mapping[str, Any], seed: int | None, base: nn.Module,
                  model: nn.Module, *, masks: Mapping[str, torch.Tensor] | None = None,
                  base_counts: Mapping[str, int] | None = None, source_id: str | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest every compression method returns (see :class:`Variant`)."""
    import minidiff

    params_total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum().item()) for p in model.parameters())
    nonzero += sum(int((b != 0).sum().item()) for n, b in model.named_buffers()
                   if b.dtype == torch.int8)
    # packed int4 weights: count the weights that dequantize to non-zero values
    nonzero += sum(int((m.dequantized_weight() != 0).sum().item()) for m in model.modules()
                   if isinstance(getattr(m, "weight_packed", None), torch.Tensor))
    man: dict[str, Any] = {
        "method": method,
        "parameters": _json_safe(dict(parameters)),
        "seed": seed,
        "sparsity": sparsity_report(model, masks, base_counts),
        "parameter_count": int(params_total),
        "nonzero_parameters": int(nonzero),
        "state_bytes": state_bytes(model),
        "bytes_on_disk": None,
        "source": {
            "id": source_id or getattr(base, "name_or_path", None) or getattr(
                getattr(base, "config", None), "_name_or_path", None) or type(base).__name__,
            "sha256": state_sha256(base),
            "parameter_count": int(sum(p.numel() for p in base.parameters())),
        },
        "versions": {"minidiff": minidiff.__version__, "torch": torch.__version__},
    }
    if extra:
        man.update(_json_safe(dict(extra)))
    return man


# -- module table: what the skeleton needs to take this model's weights ---------------

def _module_entry(mod: nn.Module) -> dict[str, Any] | None:
    cls = type(mod).__name__
    if isinstance(mod, nn.Linear) and type(mod) is nn.Linear:
        return {"type": "Linear", "in_features": mod.in_features, "out_features": mod.out_features,
                "bias": mod.bias is not None}
    if type(mod).__module__.startswith("minidiff.") and hasattr(mod, "in_features") and hasattr(mod, "out_features"):
        spec = getattr(mod, "spec", None)
        entry = dict(spec()) if callable(spec) else {}
        entry.update({"type": cls, "in_features": int(mod.in_features), "out_features": int(mod.out_features),
                      "bias": getattr(mod, "bias", None) is not None})
        if hasattr(mod, "mode"):
            entry.setdefault("mode", str(mod.mode))
        if isinstance(getattr(mod, "out_dtype", None), torch.dtype):
            entry.setdefault("dtype", str(mod.out_dtype).replace("torch.", ""))
        return entry
    heads = getattr(mod, "num_attention_heads", None)
    if isinstance(heads, int) and hasattr(mod, "attention_head_size"):
        return {"type": "attention", "attrs": {"num_attention_heads": heads,
                                               "all_head_size": int(getattr(mod, "all_head_size", 0))}}
    return None


def module_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    table = {}
    for name, mod in model.named_modules():
        e = _module_entry(mod)
        if e is not None:
            table[name] = e
    return table


_NN_MODULES = {"Int8Linear": "int8_linear", "ReferenceInt8Linear": "int8_linear",
               "Int4WeightOnlyLinear": "int4_linear", "SparseLinear": "sparse_linear",
               "SemiStructuredLinear": "semistructured"}


def minidiff_nn_class(name: str) -> Any:
    """``minidiff.nn.<name>`` (imported lazily), or None where that part is not available."""
    import importlib

    try:
        mnn = importlib.import_module("minidiff.nn")
        cls = getattr(mnn, name, None)
        if cls is None and name in _NN_MODULES:
            cls = getattr(importlib.import_module(f"minidiff.nn.{_NN_MODULES[name]}"), name, None)
    except ImportError:
        return None
    return cls


def _replacement_builders() -> dict[str, Callable[[dict[str, Any]], nn.Module]]:
    builders: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
        "Linear": lambda e: nn.Linear(e["in_features"], e["out_features"], bias=e["bias"]),
    }
    ref = minidiff_nn_class("ReferenceInt8Linear")
    if ref is not None:
        builders["ReferenceInt8Linear"] = lambda e: ref.empty(e["in_features"], e["out_features"], e["bias"],
                                                              e["mode"])
    for cls_name in ("Int8Linear", "Int4WeightOnlyLinear", "SparseLinear", "SemiStructuredLinear"):
        cls = minidiff_nn_class(cls_name)
        if cls is None:
            continue
        if hasattr(cls, "from_spec"):
            builders[cls_name] = cls.from_spec
        else:  # the minidiff.nn constructors: (in_features, out_features, bias, [mode], dtype)
            def build(e: dict[str, Any], _cls: Any = cls) -> nn.Module:
                kw: dict[str, Any] = {"bias": e["bias"]}
                if "mode" in e:
                    kw["mode"] = e["mode"]
                if "dtype" in e:
                    kw["dtype"] = getattr(torch, e["dtype"])
                return _cls(e["in_features"], e["out_features"], **kw)
            builders[cls_name] = build
    return builders


def _cast_inputs_hook(dtype: torch.dtype):
    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return v

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


def attach_input_cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating inputs to ``dtype`` on entry, so a half-precision model takes the
    same float32 batches as its base (integer inputs such as token ids pass as they are)."""
    model.register_forward_pre_hook(_cast_inputs_hook(dtype), with_kwargs=True)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_module_table(model: nn.Module, table: Mapping[str, Mapping[str, Any]]) -> None:
    """Reshape/replace ``model``'s modules so that they match ``table``."""
    builders = None
    current = dict(model.named_modules())
    for name, entry in table.items():
        if name not in current:
            raise ValueError(f"saved variant has module {name!r} that the rebuilt model lacks; "
                             "the manifest does not match this architecture")
        mod = current[name]
        if entry["type"] == "attention":
            for k, v in entry["attrs"].items():
                setattr(mod, k, v)
            continue
        if _module_entry(mod) == dict(entry):
            continue
        builders = builders or _replacement_builders()
        if entry["type"] not in builders:
            raise ValueError(f"saved variant uses module type {entry['type']!r} for {name!r}, which this "
                             "installation of minidiff cannot build (is minidiff.nn available?)")
        _set_submodule(model, name, builders[entry["type"]](dict(entry)))


# -- save / load ------------------------------------------------------------------------

def _retie_embeddings(model: nn.Module) -> None:
    """Re-tie a transformers model's output head to its input embedding after a load with
    ``assign=True`` (which gives both names their own tensor), when the head is still a
    float ``nn.Linear`` and the config ties them. The values are equal either way; this
    restores the shared storage (and the memory the tie saves)."""
    config = getattr(model, "config", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not (getattr(config, "tie_word_embeddings", False) and callable(get_out)
            and hasattr(model, "tie_weights")):
        return
    head = get_out()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(head) is nn.Linear and isinstance(emb, nn.Embedding) and head.weight.shape == emb.weight.shape \
            and torch.equal(head.weight, emb.weight):
        head.weight = emb.weight

def _file_sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelWriteError(OSError):
    """Saving a model failed (full disk, quota, permissions); nothing was left half-written."""


def _write_error(path: pathlib.Path, exc: BaseException, nbytes: int) -> ModelWriteError:
    """An ``OSError`` that names the folder, the operating system's reason and the size needed.

    safetensors reports its writer's I/O failures as ``SafetensorError('... (os error 28)')``;
    the errno is recovered from that text so that callers can test ``e.errno`` as for any
    other failed write.
    """
    errno_ = getattr(exc, "errno", None)
    if errno_ is None:
        m = re.search(r"os error (\d+)", str(exc))
        errno_ = int(m.group(1)) if m else None
    reason = os.strerror(errno_) if errno_ else str(exc)
    return ModelWriteError(errno_ or 0, f"could not save the model to {path}: {reason}. It needs about "
                               f"{human_bytes(nbytes)}; free disk space there or choose another folder "
                               "(nothing was left half-written)")


def save_variant(variant: Variant, path: str | os.PathLike, *, overwrite: bool = True) -> pathlib.Path:
    """Write ``variant`` to directory ``path`` atomically (temp dir + ``os.replace``).

    Returns the directory. ``variant.manifest["bytes_on_disk"]`` is set to the
    size of ``model.safetensors``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from minidiff.models.classifier import architecture_of

    if not isinstance(variant, Variant):
        raise ValueError(f"save_variant expects a Variant, got {type(variant).__name__}")
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = variant.model
    # clone: safetensors refuses tensors sharing storage (tied weights); bytes stay exact
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        wfile = tmp / WEIGHTS_FILE
        try:
            save_file(tensors, str(wfile), metadata={"format": "pt", "producer": "minidiff"})
        except SafetensorError as exc:  # the writer's I/O errors (full disk, quota) arrive as this type
            raise _write_error(path, exc, sum(t.nbytes for t in tensors.values())) from exc
        manifest = dict(variant.manifest)
        manifest["bytes_on_disk"] = wfile.stat().st_size
        tok = variant.tokenizer if variant.tokenizer is not None else getattr(model, "tokenizer", None)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(str(tmp / TOKENIZER_DIR))
        manifest["storage"] = {
            "format_version": FORMAT_VERSION,
            "weights_sha256": _file_sha256(wfile),
            "architecture": architecture_of(model),
            "modules": module_table(model),
            "tokenizer": tok is not None and hasattr(tok, "save_pretrained"),
            "half_precision_inputs": manifest.get("parameters", {}).get("dtype")
            if manifest.get("method") in ("fp16", "bf16") else None,
        }
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(_json_safe(manifest), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "v")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelWriteError):
            raise
        raise _write_error(path, exc, sum(t.nbytes for t in tensors.values())) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    variant.manifest["bytes_on_disk"] = manifest["bytes_on_disk"]
    return path


def load_variant(path: str | os.PathLike, *, base: nn.Module | None = None,
                 device: str | torch.device | None = None) -> Variant:
    """Load a variant written by :func:`save_variant`.

    The skeleton is rebuilt from the manifest (minidiff classifiers and
    ``transformers`` classes) or, for custom architectures, copied from ``base``;
    modules are reshaped/replaced per the manifest's module table, and the
    safetensors weights are assigned exactly (dtypes kept). Nothing is unpickled.

    Raises
    ------
    ValueError
        Missing files, a hash mismatch (corrupted weights), or weights whose
        names/shapes do not match the manifest.
    """
    if device is not None:
        from minidiff.validation import check_device
        device = check_device(device, "device")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from minidiff.models.classifier import build_from_spec

    path = pathlib.Path(path)
    mfile, wfile = path / MANIFEST_FILE, path / WEIGHTS_FILE
    if not mfile.is_file() or not wfile.is_file():
        raise ValueError(f"{path} is not a saved variant (needs {MANIFEST_FILE} and {WEIGHTS_FILE})")
    try:
        manifest = json.loads(mfile.read_text())
        storage = manifest["storage"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{mfile} is corrupted or not a minidiff manifest: {exc}") from exc
    if storage.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported variant format {storage.get('format_version')!r}")
    digest = _file_sha256(wfile)
    if digest != storage.get("weights_sha256"):
        raise ValueError(f"{wfile} is corrupted or does not belong to this manifest: sha256 {digest[:16]}... "
                         f"!= recorded {str(storage.get('weights_sha256'))[:16]}...")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{wfile} is not a readable safetensors file: {exc}") from exc

    arch = storage["architecture"]
    if arch.get("kind") == "custom" or base is not None:
        if base is None:
            raise ValueError(f"{path} holds a custom architecture ({arch.get('class')}); pass the original "
                             "model as load_variant(path, base=model) so its structure can be reused")
        model = clone_model(base)
    else:
        model = build_from_spec(arch)
    apply_module_table(model, storage["modules"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    owners = dict(model.named_modules())
    fixed = {k for k in expected if type(owners[k.rpartition(".")[0]])._load_from_state_dict
             is nn.Module._load_from_state_dict}  # modules with data-dependent buffer sizes resize themselves
    bad_shape = [k for k in set(expected) & set(state) & fixed if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad_shape:
        raise ValueError(f"{wfile} does not match the rebuilt model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, shape mismatch {sorted(bad_shape)[:5]}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{wfile} does not match the rebuilt model: {exc}") from exc
    tokenizer = None
    if storage.get("tokenizer") and (path / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR), local_files_only=True)
        if hasattr(model, "tokenizer"):
            model.tokenizer = tokenizer
    _retie_embeddings(model)
    if storage.get("half_precision_inputs"):
        attach_input_cast(model, getattr(torch, storage["half_precision_inputs"]))
    if device is not None:
        model = model.to(device)
    model.eval()
    manifest.pop("storage", None)
    return Variant(model=model, manifest=manifest, tokenizer=tokenizer)
