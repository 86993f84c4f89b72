"""minidiff: how does a compressed neural network differ from its original?

The public API is re-exported here lazily, so ``import minidiff`` stays fast and
does not import transformers, matplotlib or Triton until they are needed.
"""

import importlib as _importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # representation similarity engine
    "cka": "minidiff.similarity",
    "cka_matrix": "minidiff.similarity",
    "CKAAccumulator": "minidiff.similarity",
    "similarity_matrix": "minidiff.similarity",
    "layer_error": "minidiff.similarity",
    "LayerErrorAccumulator": "minidiff.similarity",
    # prediction agreement engine
    "disagreement_matrix": "minidiff.agreement",
    "flip_matrix": "minidiff.agreement",
    "error_jaccard": "minidiff.agreement",
    "divergence_matrix": "minidiff.agreement",
    "divergence_to_reference": "minidiff.agreement",
    "modal_labels": "minidiff.agreement",
    "pie_mask": "minidiff.agreement",
    "cie_scores": "minidiff.agreement",
    # accumulators
    "Accumulator": "minidiff.accumulate",
    # language models: token-level divergence
    "token_divergence": "minidiff.lm",
    "TokenDivergenceAccumulator": "minidiff.lm",
    # models and variants
    "Variant": "minidiff.compress",
    "save_variant": "minidiff.compress",
    "load_variant": "minidiff.compress",
    # the study
    "Study": "minidiff.study",
    "Results": "minidiff.results",
    # per-layer localization
    "layer_swap": "minidiff.localize",
}

_SUBMODULES = {"compress", "nn", "ops", "results", "quant", "kernels", "models", "metrics", "study", "report",
               "lm", "localize", "similarity",
               "adversarial", "distributed", "data"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"minidiff.{name}")
    raise AttributeError(f"module 'minidiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Only the public API: the exported names, the subpackages and ``__version__``."""
    return sorted(set(_EXPORTS) | _SUBMODULES | {"__version__"})
