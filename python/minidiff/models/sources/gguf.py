"""``kind = "gguf"``: a llama.cpp GGUF file.

``runtime="transformers"`` (default): the file is read with the ``gguf``
package, every tensor dequantized with ``gguf.quants.dequantize`` (exact: each
stored block becomes the float32 values llama.cpp's reference dequantization
gives; every type the installed ``gguf`` can dequantize, e.g. F32, F16, BF16,
Q4_0/1, Q5_0/1, Q8_0, the K-quants and IQ types) and put into the matching
transformers architecture. Configuration parsing, tensor renaming and the
reversal of llama.cpp's Q/K row permutation are transformers' own
(``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``, which
needs ``accelerate`` installed for ``from_pretrained(..., gguf_file=...)`` and
is the same mapping). ``from_pretrained(gguf_file=...)`` itself is not used:
recent transformers may keep blocks packed and compute with its own kernels
when the ``kernels`` package is present, and minidiff wants the exact
dequantized weights whatever else is installed. Layer-level comparisons then see
the deployed weights in float32 torch arithmetic.

``runtime="llama.cpp"`` (needs ``pip install llama-cpp-python``): the logits
come from llama.cpp itself, so prediction and token-divergence metrics see the
deployed arithmetic too; llama.cpp exposes no intermediate layers, so layer
metrics (CKA, per-layer error) are not available with this runtime.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
from typing import Any

import numpy as np
import torch
from torch import nn

from ..loaded import TASKS, LoadedModel
from ._common import SourceOutput, require, torch_runtime, version_of

__all__ = ["LlamaCppModule", "dequantized_state", "load_gguf"]


def _reader(path: pathlib.Path) -> Any:
    gguf = require("gguf", "reading GGUF files")
    try:
        return gguf, gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a malformed file raises many types
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from None


def dequantized_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array, dequantized with ``gguf.quants.dequantize``."""
    gguf, r = _reader(pathlib.Path(path))
    return {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) for t in r.tensors}


def _build_hf(path: pathlib.Path, task: str) -> nn.Module:
    require("gguf", "reading GGUF files")
    transformers = require("transformers", "building the architecture of a GGUF model")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:
        raise ValueError(f"{path.name}: {e} (transformers maps the GGUF architectures it supports)") from None
    cfg_dict = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
    model_type = cfg_dict.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
    auto_cls = getattr(transformers, TASKS[task])
    model = auto_cls.from_config(config, dtype=torch.float32)
    full = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    tensors = full["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise ValueError(f"{path.name}: the file has no tensors for {missing[:6]} of the {type(model).__name__} "
                         "transformers builds from its metadata")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


class LlamaCppModule(nn.Module):
    """llama.cpp behind the ``nn.Module`` contract: ``forward(input_ids, attention_mask)``
    returns per-token logits ``(b, t, vocab)`` computed by llama.cpp (no layers)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None) -> None:
        super().__init__()
        llama_cpp = require("llama_cpp", "runtime='llama.cpp'", "llama-cpp-python")
        self.path = str(pathlib.Path(path).resolve())
        self.llm = llama_cpp.Llama(model_path=self.path, n_ctx=int(n_ctx), logits_all=True, verbose=False,
                                   **({"n_threads": int(n_threads)} if n_threads else {}))
        self.register_buffer("marker", torch.empty(0), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> SourceOutput:
        ids = torch.as_tensor(input_ids)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        out = torch.zeros(ids.shape[0], ids.shape[1], self.llm.n_vocab(), dtype=torch.float32)
        for i in range(ids.shape[0]):
            keep = mask[i].bool()
            toks = ids[i][keep].tolist()
            self.llm.reset()
            self.llm.eval(toks)
            scores = np.asarray(self.llm.scores[:len(toks)], dtype=np.float32)
            out[i, keep] = torch.from_numpy(scores)
        return SourceOutput(logits=out)

    def minidiff_fingerprint(self) -> str:
        from ..fingerprint import fingerprint_file
        return hashlib.sha256(f"llama.cpp|{fingerprint_file(self.path)}".encode()).hexdigest()

    def minidiff_facts(self) -> Any:
        from ..facts import gguf_facts
        return gguf_facts(self.path)


def load_gguf(source: str | os.PathLike, *, task: str = "causal-lm", runtime: str = "transformers",
              tokenizer: Any = None, device: str | torch.device | None = None, n_ctx: int = 2048) -> LoadedModel:
    """Load a ``.gguf`` file (see module docstring).

    Parameters
    ----------
    task
        ``AutoModel*`` task for the transformers runtime (default ``"causal-lm"``;
        ``"features"`` is read as ``"causal-lm"``, the form GGUF files hold).
    runtime
        ``"transformers"`` (exact dequantization into torch) or ``"llama.cpp"``.
    tokenizer
        A tokenizer or a folder; default: the tokenizer stored in the file when
        transformers can build it, else ``None``.
    """
    p = pathlib.Path(source).expanduser()
    if not p.is_file():
        raise ValueError(f"GGUF file {str(p)!r} does not exist")
    if runtime not in ("transformers", "llama.cpp"):
        raise ValueError(f"runtime must be 'transformers' or 'llama.cpp', got {runtime!r}")
    task = "causal-lm" if task == "features" else task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {sorted(TASKS)}")
    gguf, r = _reader(p)
    types = sorted({t.tensor_type.name for t in r.tensors})
    arch_field = r.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else "unknown"
    prov = {"tool": "llama.cpp GGUF", "gguf_version": version_of("gguf"), "architecture": arch,
            "tensor_types": types}
    tok = tokenizer
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.fspath(tok), local_files_only=True)
    elif tok is None and "tokenizer.ggml.tokens" in r.fields:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        except Exception:  # noqa: BLE001 - tokenizers transformers cannot convert
            tok = None
    if runtime == "llama.cpp":
        model: nn.Module = LlamaCppModule(p, n_ctx=n_ctx)
        rt = f"llama.cpp (llama-cpp-python {version_of('llama-cpp-python')})"
        notes = ["outputs computed by llama.cpp; it exposes no intermediate layers, so layer metrics are "
                 "not measured for this model"]
    else:
        model = _build_hf(p, task)
        # size facts of the file's blocks, not of the float32 copy computed with
        model.minidiff_facts = functools.partial(_gguf_facts, str(p))
        if device is not None:
            model = model.to(device)
        rt = torch_runtime(model)
        notes = [f"weights dequantized exactly from the GGUF blocks ({', '.join(types)}) and computed in "
                 "float32 torch, not by llama.cpp"]
    if tok is not None:
        model.tokenizer = tok
    return LoadedModel(model=model.eval(), tokenizer=tok, forward=None, source=str(p), task=task, kind="gguf",
                       runtime=rt, provenance=prov, notes=notes)


def _gguf_facts(path: str) -> Any:
    from ..facts import gguf_facts
    return gguf_facts(path)
