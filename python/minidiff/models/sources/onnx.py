"""``kind = "onnx"``: an ``.onnx`` file run with ONNX Runtime.

The model runs in the session a user deploys: the file as it is, CPU execution
provider (CUDA first when onnxruntime has it). Models quantized by
``onnxruntime.quantization`` (dynamic int8: ``DynamicQuantizeLinear`` /
``MatInteger``; static QDQ: ``QuantizeLinear`` / ``DequantizeLinear`` pairs) run
as they are.

Layers are graph tensors. They are read in a *second* session built from a copy
of the graph in which those tensors are extra graph outputs: exposing a tensor
stops ONNX Runtime from fusing across it, which changes the arithmetic (on an
ORT-int8 MiniLM the outputs moved by up to 0.22 and a prediction flipped), so
outputs and predictions always come from the unmodified session and only the
layer representations from the second one. ``LoadedModel.notes`` says so.

Which tensors:

* ``layers={"encoder.layer.0": "tensor_name", ...}`` names them explicitly;
* ``layers="auto"`` (default) finds, for a model exported from torch (both
  ``torch.onnx.export`` exporters record the module path of every node: in node
  names ``/encoder/layer.0/...`` or in the ``pkg.torch.onnx.name_scopes``
  metadata), the output tensor of every transformer block (``layer.N``,
  ``layers.N``, ``h.N``, ``block(s).N``) and of the embedding module, named by
  the module path, so that the list lines up with the torch model's
  ``output_hidden_states`` layout (embeddings, then each block) and with its
  module names. A module's output is the last float tensor made inside its scope that
  is used outside it (a QDQ model's dequantized block output, where the graph
  quantizes between blocks; never a quantize node's int8 copy or scale);
* ``layers=[]`` captures nothing (outputs only).

The classifier head's input (the features a head sees) is found the same way:
the tensor entering the scope of the node that produces the first graph output.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..loaded import LoadedModel
from ._common import SourceOutput, Tap, build_taps, require, version_of

__all__ = ["OnnxModule", "graph_module_outputs", "load_onnx"]

_BLOCK_RE = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+$")
_EMBED_NAMES = ("embeddings", "embed_tokens")
_QUANT_OPS = frozenset({"DynamicQuantizeLinear", "QuantizeLinear"})
_NP_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_}
SECOND_SESSION_NOTE = ("layers are read from a second ONNX Runtime session in which they are extra graph outputs "
                       "(which changes the fusions ONNX Runtime applies); outputs and predictions come from the "
                       "unmodified session")


def _node_scope(node: Any) -> str | None:
    """Module path of an exported node, from its metadata or its ``/a/b.0/Op`` name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                parts = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            mods = [x for x in parts[:-1] if x and not x.startswith("_empty_nn_module_stack")]
            return mods[-1] if mods else ""
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return None


def graph_module_outputs(graph: Any) -> tuple[dict[str, str], dict[str, str]]:
    """For every module scope in an exported graph: its output tensor and its first input tensor.

    Returns ``(outputs, inputs)``, each module path -> tensor name. A module's
    output is the last tensor produced inside its scope that a node outside the
    scope (or the graph output) uses; its input is the first tensor used inside
    the scope that comes from outside (not an initializer or constant).
    """
    nodes = list(graph.node)
    scopes = [_node_scope(n) for n in nodes]
    consts = {i.name for i in graph.initializer}
    consts |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            users.setdefault(t, []).append(i)
    graph_outputs = {o.name for o in graph.output}
    all_paths: dict[str, list[int]] = {}
    for i, s in enumerate(scopes):
        if not s:
            continue
        parts = s.split(".")
        for k in range(1, len(parts) + 1):
            all_paths.setdefault(".".join(parts[:k]), []).append(i)

    def float_source(t: str) -> str | None:
        """The float tensor behind ``t``: an int8 copy made by a quantizer (ONNX Runtime's
        dynamic / QDQ quantization inserts them before each quantized MatMul) leads back to
        the tensor it quantizes; a quantizer's scale or zero point is no module input (None)."""
        for _ in range(4):
            i = producer.get(t)
            if i is None or nodes[i].op_type not in _QUANT_OPS:
                return t
            if list(nodes[i].output).index(t) != 0:
                return None
            t = nodes[i].input[0]
        return t

    def inside(i: int, path: str) -> bool:
        s = scopes[i]
        return bool(s) and (s == path or s.startswith(path + "."))

    outs: dict[str, str] = {}
    ins: dict[str, str] = {}
    for path, idx in all_paths.items():
        best = None
        for i in idx:
            if nodes[i].op_type in _QUANT_OPS:
                continue  # int8 copies / scales of a tensor, not the module's output
            for o in nodes[i].output:
                if o in graph_outputs or any(not inside(u, path) for u in users.get(o, [])):
                    best = o
        if best is not None:
            outs[path] = best
        for i in idx:
            got = None
            for t in nodes[i].input:
                src = float_source(t) if t else None
                if src and src not in consts and (src not in producer or not inside(producer[src], path)):
                    got = src
                    break
            if got is not None:
                ins[path] = got
                break
    return outs, ins


def _auto_layers(outs: Mapping[str, str]) -> dict[str, str]:
    blocks: dict[str, list[str]] = {}
    for path in outs:
        if _BLOCK_RE.search(path):
            blocks.setdefault(path.rsplit(".", 1)[0], []).append(path)
    if not blocks:
        return {}
    parent, names = max(blocks.items(), key=lambda kv: len(kv[1]))
    names = sorted(names, key=lambda n: int(n.rsplit(".", 1)[1]))
    chosen: dict[str, str] = {}
    root = parent.rsplit(".", 2)[0] if "." in parent else ""
    emb = [p for p in outs if p.rsplit(".", 1)[-1] in _EMBED_NAMES and (not root or p.startswith(root))]
    if emb:
        e = min(emb, key=len)
        chosen[e] = outs[e]
    for n in names:
        chosen[n] = outs[n]
    return chosen


class OnnxModule(nn.Module):
    """An ONNX Runtime model behind the ``nn.Module`` contract of
    :mod:`minidiff.models.sources` (outputs from the unmodified session; layers as
    :class:`~minidiff.models.sources.Tap` submodules fed from a second session)."""

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 layers: str | Mapping[str, str] | Sequence[str] = "auto", head_input: str | bool = True,
                 session_options: Any = None) -> None:
        super().__init__()
        ort = require("onnxruntime", "running ONNX models")
        onnx = require("onnx", "reading ONNX graphs")
        self.path = str(pathlib.Path(path).resolve())
        avail = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        bad = [p for p in providers if p not in avail]
        if bad:
            raise ValueError(f"onnxruntime here has no execution provider {bad}; available: {avail}")
        self.providers = list(providers)
        self._ort = ort
        self._session_options = session_options
        try:
            self.session = ort.InferenceSession(self.path, sess_options=session_options, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"onnxruntime cannot load {self.path!r}: {e}") from None
        self.input_specs = [(i.name, i.type) for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        proto = onnx.load(self.path, load_external_data=False)
        self.producer = f"{proto.producer_name} {proto.producer_version}".strip()
        self.op_types = sorted({n.op_type for n in proto.graph.node})
        self.external_files = sorted({e.value for init in proto.graph.initializer for e in init.external_data
                                      if e.key == "location"})
        outs, ins = graph_module_outputs(proto.graph)
        if isinstance(layers, str):
            if layers != "auto":
                raise ValueError(f"layers must be 'auto', a list of tensor names or a dict name -> tensor, "
                                 f"got {layers!r}")
            layer_map = _auto_layers(outs)
        elif isinstance(layers, Mapping):
            layer_map = {str(k): str(v) for k, v in layers.items()}
        else:
            layer_map = {f"tensor.{i}": str(t) for i, t in enumerate(layers)}
        known = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
        missing = [t for t in layer_map.values() if t not in known]
        if missing:
            raise ValueError(f"{self.path}: no graph tensor named {missing[:5]}; tensors include "
                             f"{sorted(known)[:8]}")
        head_name = head_tensor = None
        if head_input is True:
            first = self.output_names[0]
            prod = next((n for n in proto.graph.node if first in n.output), None)
            scope = _node_scope(prod) if prod is not None else None
            if scope and scope in ins and scope not in layer_map:
                head_name, head_tensor = scope, ins[scope]
        elif isinstance(head_input, str):
            if head_input not in known:
                raise ValueError(f"{self.path}: no graph tensor named {head_input!r} for head_input")
            head_name, head_tensor = "head_input", head_input
        self.layer_map = dict(layer_map)
        self.head_tensor = head_tensor
        self.taps = build_taps(self, self.layer_map, marker_last=head_name)
        if head_name is not None:
            self.taps[head_name].tensor_name = head_tensor
        self._head_name = head_name
        self._capture_session = None
        self._proto_for_capture = proto if (self.layer_map or head_tensor) else None

    # -- sessions ------------------------------------------------------------------------
    def _capture_outputs(self) -> list[str]:
        names = list(self.layer_map.values())
        if self.head_tensor is not None:
            names.append(self.head_tensor)
        return names

    def capture_session(self) -> Any:
        """The second session: the same graph with the layer tensors as extra outputs."""
        if self._capture_session is None:
            import onnx
            proto = onnx.load(self.path)  # with external data: the session is built from bytes
            try:
                inferred = onnx.shape_inference.infer_shapes(proto)
                infos = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
            except Exception:  # noqa: BLE001 - shape inference is best effort
                infos = {}
            present = {o.name for o in proto.graph.output}
            for t in self._capture_outputs():
                if t in present:
                    continue
                vi = infos.get(t)
                proto.graph.output.append(vi if vi is not None else onnx.helper.make_empty_tensor_value_info(t))
                present.add(t)
            self._capture_session = self._ort.InferenceSession(
                proto.SerializeToString(), sess_options=self._session_options, providers=self.providers)
        return self._capture_session

    # -- forward ---------------------------------------------------------------------------
    def _feeds(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        names = [n for n, _ in self.input_specs]
        if len(args) > len(names):
            raise ValueError(f"{pathlib.Path(self.path).name} takes {len(names)} inputs {names}, got {len(args)}")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in names:
                given[k] = v
        missing = [n for n in names if n not in given or given[n] is None]
        if missing:
            raise ValueError(f"{pathlib.Path(self.path).name} needs inputs {missing} (inputs: {names}); "
                             "pass them by name")
        feeds = {}
        for n, typ in self.input_specs:
            v = given[n]
            a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            feeds[n] = a.astype(_NP_TYPES.get(typ, a.dtype), copy=False)
        return feeds

    def wants_layers(self) -> bool:
        return any(t.hooked() for t in self.taps.values())

    def forward(self, *args: Any, output_hidden_states: bool = False, **kwargs: Any) -> SourceOutput:
        kwargs.pop("return_dict", None)
        feeds = self._feeds(args, kwargs)
        outs = self.session.run(None, feeds)
        result = SourceOutput()
        result["logits"] = torch.from_numpy(np.ascontiguousarray(outs[0]))
        for n, o in zip(self.output_names[1:], outs[1:]):
            result[n] = torch.from_numpy(np.ascontiguousarray(o))
        if output_hidden_states or self.wants_layers():
            names = self._capture_outputs()
            got = self.capture_session().run(names, feeds)
            by_tensor = {n: torch.from_numpy(np.ascontiguousarray(g)) for n, g in zip(names, got)}
            hidden = []
            for mod_name, tensor in self.layer_map.items():
                hidden.append(self.taps[mod_name](by_tensor[tensor]))
            if self._head_name is not None:
                self.taps[self._head_name](by_tensor[self.head_tensor])
            if output_hidden_states:
                result["hidden_states"] = tuple(hidden)
        return result

    # -- identity and size ------------------------------------------------------------------
    def minidiff_fingerprint(self) -> str:
        from ..fingerprint import fingerprint_file
        base = pathlib.Path(self.path).parent
        h = fingerprint_file(self.path, *[base / f for f in self.external_files])
        cfg = json.dumps({"layers": self.layer_map, "head": self.head_tensor}, sort_keys=True)
        import hashlib
        return hashlib.sha256(f"onnx|{h}|{cfg}".encode()).hexdigest()

    def minidiff_facts(self) -> Any:
        from ..facts import onnx_facts
        return onnx_facts(self.path)

    def quantization(self) -> str | None:
        ops = set(self.op_types)
        if {"DynamicQuantizeLinear", "MatMulInteger"} & ops or "DynamicQuantizeMatMul" in ops:
            return "dynamic int8"
        if {"QuantizeLinear", "DequantizeLinear"} <= ops:
            return "QDQ static int8"
        if {"QLinearMatMul", "QLinearConv"} & ops:
            return "QOperator static int8"
        return None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, providers={self.providers}"


def load_onnx(source: str | os.PathLike, *, task: str = "features", providers: Sequence[str] | None = None,
              layers: str | Mapping[str, str] | Sequence[str] = "auto", head_input: str | bool = True,
              tokenizer: Any = None, session_options: Any = None) -> LoadedModel:
    """Load an ``.onnx`` file (see module docstring).

    Parameters
    ----------
    source
        Path of the ``.onnx`` file (external data files beside it).
    task
        Recorded with the model (what its first output means).
    providers
        ONNX Runtime execution providers (default: CUDA when available, then CPU).
    layers
        ``"auto"``, a list of graph tensor names, or a dict layer name -> tensor name.
    head_input
        ``True``: find the tensor entering the head (the scope producing the first
        output); a tensor name; or ``False``.
    tokenizer
        A tokenizer object or a folder to load one from (text models).
    """
    p = pathlib.Path(source).expanduser()
    if not p.is_file():
        raise ValueError(f"ONNX file {str(p)!r} does not exist")
    mod = OnnxModule(p, providers=providers, layers=layers, head_input=head_input, session_options=session_options)
    tok = tokenizer
    if isinstance(tok, (str, os.PathLike)):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.fspath(tok), local_files_only=True)
    if tok is not None:
        mod.tokenizer = tok
    q = mod.quantization()
    prov: dict[str, Any] = {"tool": mod.producer or "unknown producer", "format": "onnx"}
    if q:
        prov["method"] = q
    ep = mod.session.get_providers()[0]
    notes = [SECOND_SESSION_NOTE] if (mod.layer_map or mod.head_tensor) else []
    return LoadedModel(model=mod.eval(), tokenizer=tok, forward=None, source=str(p), task=task, kind="onnx",
                       runtime=f"onnxruntime {version_of('onnxruntime')} ({ep})", provenance=prov, notes=notes,
                       extra={"layers": dict(mod.layer_map), "head_input": mod.head_tensor})
