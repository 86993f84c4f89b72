"""Small classifiers minidiff trains and compresses.

* :class:`TextClassifier`: a Hugging Face encoder (e.g. the embedded MiniLM)
  plus a linear head on the pooled sequence; accepts ``inputs_embeds`` so that
  embedding-space attacks (PGD) can differentiate through it.
* :func:`make_mlp` / :func:`make_cnn`: image classifiers for the digits / MNIST
  populations of the study demo.

Every module here can describe itself as a JSON-able ``architecture()`` spec and
be rebuilt from it (:func:`build_from_spec`), which is how saved variants are
loaded without unpickling anything.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of ``hidden (b, t, d)``, counting only tokens with mask 1.

    ``mean_i = sum_t m_it h_itd / max(sum_t m_it, 1)``; padded positions never
    contribute, whatever they hold.
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    # where() rather than multiply: a NaN/Inf in a padded position must not leak in
    summed = torch.where(m > 0, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    return summed / m.sum(dim=1).clamp_min(1.0)


class TextClassifier(nn.Module):
    """Hugging Face encoder + linear head on the pooled sequence.

    ``logits = W pool(encoder(x).last_hidden_state) + b`` with ``pool`` the
    attention-mask-aware mean over tokens (``"mean"``) or the first token
    (``"cls"``).

    Parameters
    ----------
    encoder : transformers.PreTrainedModel
        A model returning ``last_hidden_state`` (e.g. ``BertModel``).
    tokenizer
        Its tokenizer (may be ``None`` if you only call ``forward``).
    num_classes : int
    pooling : {"mean", "cls"}
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, num_classes: int, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError("encoder must be a transformers model with config.hidden_size")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.num_classes = int(num_classes)
        self.pooling = pooling
        self.head = nn.Linear(int(hidden), self.num_classes)

    @classmethod
    def from_pretrained(cls, source: str = "minilm", num_classes: int = 2, pooling: str = "mean",
                        *, seed: int | None = 0, **load_kwargs: Any) -> "TextClassifier":
        """Encoder and tokenizer of a transformers model (a local folder, a hub id or ``"minilm"``,
        loaded by :func:`minidiff.models.sources.hf.load_hf`), fresh seeded head."""
        from .sources.hf import load_hf

        loaded = load_hf(source, task="features", **load_kwargs)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return cls(loaded.model, loaded.tokenizer, num_classes, pooling)
        return cls(loaded.model, loaded.tokenizer, num_classes, pooling)

    def input_embeddings(self) -> nn.Module:
        """The encoder's word-embedding module (``nn.Embedding``)."""
        return self.encoder.get_input_embeddings()

    def tokenize(self, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` to padded ``input_ids`` and ``attention_mask`` tensors."""
        if self.tokenizer is None:
            raise ValueError("this TextClassifier has no tokenizer; pass input_ids directly")
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=int(max_length),
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> Any:
        """Logits ``(b, num_classes)``.

        With ``output_hidden_states=True`` returns a
        ``SequenceClassifierOutput(logits=..., hidden_states=...)`` instead.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if attention_mask is None:
            ref = input_ids if input_ids is not None else inputs_embeds
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        out = self.encoder(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        logits = self.head(self.pool(out.last_hidden_state, attention_mask))
        if output_hidden_states:
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits, hidden_states=out.hidden_states)
        return logits

    def architecture(self) -> dict[str, Any]:
        return {"kind": "text-classifier", "encoder": architecture_of(self.encoder),
                "num_classes": self.num_classes, "pooling": self.pooling}


class MLP(nn.Sequential):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        hidden = [int(h) for h in (hidden if isinstance(hidden, (list, tuple)) else [hidden])]
        if int(in_features) < 1 or int(num_classes) < 2 or any(h < 1 for h in hidden):
            raise ValueError(f"bad MLP sizes: in_features={in_features}, hidden={hidden}, num_classes={num_classes}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = int(in_features)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, int(num_classes)))
        super().__init__(*layers)
        self._arch = {"kind": "mlp", "in_features": int(in_features), "hidden": hidden,
                      "num_classes": int(num_classes)}

    def architecture(self) -> dict[str, Any]:
        return dict(self._arch)


class SmallCNN(nn.Module):
    """``[Conv3x3 -> ReLU] * len(channels) (stride 2 after the first) -> global mean -> Linear``.

    Module names ``features.0``, ``features.2``, ... are the conv layers
    (capture their ``(b, c, h, w)`` maps with token mode ``"mean"`` or ``"flatten"``).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if int(in_channels) < 1 or int(num_classes) < 2 or not channels or any(c < 1 for c in channels):
            raise ValueError(f"bad CNN sizes: in_channels={in_channels}, channels={channels}, "
                             f"num_classes={num_classes}")
        layers: list[nn.Module] = []
        c_in = int(in_channels)
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1, stride=1 if i == 0 else 2), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, int(num_classes))
        self._arch = {"kind": "cnn", "in_channels": int(in_channels), "channels": channels,
                      "num_classes": int(num_classes)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x).mean(dim=(2, 3)))

    def architecture(self) -> dict[str, Any]:
        return dict(self._arch)


def make_mlp(in_features: int = 64, hidden: int | Sequence[int] = (64,), num_classes: int = 10) -> MLP:
    """An MLP image classifier (default sized for sklearn digits: 8x8 -> 10 classes)."""
    return MLP(in_features, hidden if isinstance(hidden, (list, tuple)) else [hidden], num_classes)


def make_cnn(in_channels: int = 1, channels: Sequence[int] = (16, 32), num_classes: int = 10) -> SmallCNN:
    """A small CNN image classifier (digits 8x8 or MNIST 28x28, single channel)."""
    return SmallCNN(in_channels, channels, num_classes)


# -- architecture specs ------------------------------------------------------------

def architecture_of(model: nn.Module) -> dict[str, Any]:
    """A JSON-able description from which :func:`build_from_spec` rebuilds ``model``'s skeleton.

    Hugging Face models are described by class name + config dict; minidiff's
    own classifiers by their constructor arguments; anything else is
    ``{"kind": "custom"}`` and needs the caller to supply a skeleton.
    """
    if hasattr(model, "architecture") and callable(model.architecture):
        return model.architecture()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        return {"kind": "hf", "class": type(model).__name__, "config": config.to_dict()}
    return {"kind": "custom", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model skeleton (random weights) from :func:`architecture_of` output.

    Only classes from minidiff and from the ``transformers`` namespace are
    instantiated; nothing is imported by a name read from a file otherwise.
    """
    kind = spec.get("kind")
    if kind == "mlp":
        return MLP(spec["in_features"], spec["hidden"], spec["num_classes"])
    if kind == "cnn":
        return SmallCNN(spec["in_channels"], spec["channels"], spec["num_classes"])
    if kind == "text-classifier":
        enc = build_from_spec(spec["encoder"])
        return TextClassifier(enc, None, spec["num_classes"], spec["pooling"])
    if kind == "hf":
        import transformers

        cls_name = spec["class"]
        cls = getattr(transformers, cls_name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            raise ValueError(f"cannot rebuild transformers class {cls_name!r}; pass the base model as a skeleton")
        cfg_dict = dict(spec["config"])
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            raise ValueError("saved transformers config has no model_type")
        config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        model = cls(config)
        model.eval()
        return model
    raise ValueError(f"cannot rebuild a model of kind {kind!r} ({spec.get('class', '?')}); "
                     "pass the original model as `base=` so its structure can be reused")
