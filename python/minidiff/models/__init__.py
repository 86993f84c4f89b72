"""Models in: loading from every toolchain (torch modules incl. quantized ones,
transformers, ONNX Runtime, GGUF, saved variants; see :mod:`minidiff.models.sources`),
exact fingerprints and size facts, layer alignment, small classifiers, and
per-layer activation capture streamed into accumulators."""

from .capture import (HIDDEN_STATES, TOKEN_MODES, LayerRecorder, StreamBatch, StreamSummary, capture,
                      capture_stream, check_same_tokenization, eval_mode, first_tensor, module_names, pool, probe_widths,
                      resolve_layers)
from .classifier import (MLP, SmallCNN, TextClassifier, architecture_of, build_from_spec, make_cnn, make_mlp,
                         masked_mean)
from .align import LayerAlignment, align_layers
from .facts import ModelFacts, model_facts
from .fingerprint import UnhashableModelError, fingerprint
from .loading import TASKS, LoadedModel, embedded_minilm_dir, is_offline, load_model

__all__ = [
    "HIDDEN_STATES", "TOKEN_MODES", "TASKS", "LayerRecorder", "LoadedModel", "MLP", "SmallCNN", "StreamBatch",
    "StreamSummary", "TextClassifier", "architecture_of", "build_from_spec", "capture", "capture_stream",
    "check_same_tokenization", "embedded_minilm_dir", "eval_mode", "first_tensor", "is_offline", "load_model",
    "make_cnn", "make_mlp", "masked_mean", "module_names", "pool", "probe_widths", "resolve_layers",
    "LayerAlignment", "ModelFacts", "UnhashableModelError", "align_layers", "fingerprint", "model_facts",
]
