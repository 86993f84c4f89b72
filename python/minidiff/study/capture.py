"""Per-batch forward with layer capture for the study runner.

For one batch a :class:`Member` returns its logits, the representations of its
captured layers (one ``(b, d)`` matrix per layer, reduced by the token mode) and
its final embedding (the input of its last parametrised module, i.e. the features
its classifier head sees: the pooled sentence vector of a text classifier, the
last hidden activation of an MLP). Forward hooks are registered for the batch and
removed after it, so a model is never left modified.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minidiff.models.capture import LayerRecorder, logits_of, pool

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Mish, nn.Hardtanh)
_BLOCK_RE = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+$")


def auto_layers(module: nn.Module) -> list[str]:
    """Default layers to capture.

    Transformer-like models: every block of the ``ModuleList`` that holds the
    encoder/decoder layers (``encoder.layer.0`` ...). Otherwise every activation
    module (``ReLU`` ...), i.e. each hidden representation of an MLP or CNN.
    """
    mods = dict(module.named_modules())
    blocks = []
    for name in mods:
        if _BLOCK_RE.search(name):
            parent = name.rsplit(".", 1)[0]
            if isinstance(mods.get(parent), nn.ModuleList):
                blocks.append(name)
    if blocks:
        return blocks
    return [name for name, m in module.named_modules() if isinstance(m, _ACTIVATIONS)]


def _packed(m: nn.Module) -> bool:
    # torch.ao quantized modules keep their weights in a ``*PackedParams`` child that forward
    # never calls: it is the parent's state, and the parent is the leaf that runs
    return type(m).__name__.endswith("PackedParams")


def last_parametrised_leaf(module: nn.Module) -> str:
    """Name of the last leaf module (registration order) holding parameters or buffers
    (a ``torch.ao`` quantized module, whose weights sit in a packed-params child, counts as a leaf)."""
    last = ""
    for name, m in module.named_modules():
        if not name or _packed(m):
            continue
        kids = list(m.children())
        if any(not _packed(c) for c in kids):
            continue
        if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)) or kids:
            last = name
    if not last:
        raise ValueError(f"{type(module).__name__} has no parametrised module to take the embedding from")
    return last


@dataclass
class Member:
    """One model of the study.

    Attributes
    ----------
    name : str
        Unique display name: ``"base"``, ``"prune-50"``, or ``"prune-50#s3"`` in populations.
    group : str
        ``"base"`` or the variant name.
    seed : int
        The population seed it was built from.
    module : nn.Module
    prepare : callable
        ``prepare(inputs) -> (kwargs_or_tensor, attention_mask)``: a batch of
        raw inputs (list of str, or a tensor) to what the module takes.
    layers : list of str
        Module names whose outputs feed CKA.
    key : str
        Hash of the weights (filled by the study).
    follows : Member, optional
        The base member whose layer list this one mirrors (set by the study when the
        layers are aligned, :func:`minidiff.models.align_layers`). Whether the final
        embedding is reported as an extra layer is then the base's decision, so both
        sides always list the same layers (a bf16 copy pools its embedding in bf16 and
        would otherwise differ numerically from its pooled last layer).
    """

    name: str
    group: str
    seed: int
    module: nn.Module
    prepare: Callable[[Any], tuple[Any, torch.Tensor | None]]
    layers: list[str] = field(default_factory=list)
    key: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    follows: "Member | None" = None

    def __post_init__(self) -> None:
        # None: decide per batch by identity; set by probe_layers when the embedding duplicates
        # the last captured layer numerically (e.g. mean pooling of the last block)
        self.append_embedding: bool | None = None
        if not self.layers:
            self.layers = auto_layers(self.module)
        names = dict(self.module.named_modules())
        missing = [n for n in self.layers if n not in names]
        if missing:
            raise ValueError(f"model {self.name!r} has no module(s) {missing}; "
                             f"available names include {list(names)[1:12]}")
        self.embedding_module = last_parametrised_leaf(self.module)

    @torch.no_grad()
    def forward(self, inputs: Any, token_mode: str, device: torch.device | str = "cpu",
                capture: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Logits ``(b, C)``, captured layers ``[(b, d_l)]`` and embedding ``(b, d)``, float32.

        The layers are pooled by :class:`minidiff.models.capture.LayerRecorder`, the
        library's one capture implementation; the embedding is the input of
        :attr:`embedding_module`, taken by a pre-hook for this call only. Pooling runs
        in float32 whatever the model's dtype (a bf16 mean over tokens alone moves
        features by ~0.4%).
        """
        args, mask = self.prepare(inputs)
        args = {k: v.to(device) for k, v in args.items()} if isinstance(args, dict) else args.to(device)
        mask = None if mask is None else mask.to(device)
        names = dict(self.module.named_modules())
        emb: list[torch.Tensor] = []
        # the layers are recorded unpooled ("raw") so the embedding can be matched against the
        # last layer by identity, then pooled here in float32
        with contextlib.ExitStack() as stack:
            rec = stack.enter_context(LayerRecorder(self.module, self.layers if capture else [], "raw"))
            handle = names[self.embedding_module].register_forward_pre_hook(lambda m, i: emb.append(i[0]))
            stack.callback(handle.remove)
            out = self.module(**args) if isinstance(args, dict) else self.module(args)
            try:
                raw = rec.take()
            except ValueError as e:
                raise ValueError(f"model {self.name!r}: {e}") from None
        logits = logits_of(out).float()
        if not emb:
            raise ValueError(f"model {self.name!r}: module {self.embedding_module!r} was not called in forward")
        embedding = emb[-1]
        # "tokens" makes every non-padding token a sample of the layers; the
        # embedding (kNN overlap, OOD) stays one vector per example: masked mean
        emb_mode = "mean" if token_mode == "tokens" else token_mode
        layers = []
        if capture:
            layers = [pool(raw[n].float(), token_mode, mask) for n in self.layers]
            # the embedding is a layer too, unless it is the last captured output itself
            # or (token mode) it has one row per example where the layers have one per token
            append = self.append_embedding
            if self.follows is not None and self.follows.append_embedding is not None:
                append = self.follows.append_embedding
            elif append is None:
                append = not self.layers or raw[self.layers[-1]] is not embedding
            if append and (token_mode != "tokens" or embedding.ndim == 3):
                layers.append(pool(embedding.float(), token_mode, mask))
        embedding = pool(embedding.float(), emb_mode, mask)
        return logits, layers, embedding

    def layer_names(self) -> list[str]:
        """Captured layer names as reported (the embedding appended when distinct)."""
        return list(self.info.get("layer_names", self.layers))


def tensor_prepare(inputs: torch.Tensor) -> tuple[torch.Tensor, None]:
    """Image / tabular batches go in as they are."""
    return inputs, None


def text_prepare(tokenizer: Any, max_length: int, with_token_type_ids: bool = False
                 ) -> Callable[[Sequence[str]], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Tokenize a batch of texts (padding to the batch's longest)."""
    def prepare(texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=int(max_length), return_tensors="pt")
        args = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_token_type_ids and "token_type_ids" in enc:
            args["token_type_ids"] = enc["token_type_ids"]
        return args, enc["attention_mask"]
    return prepare
