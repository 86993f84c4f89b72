"""Language models: token-level divergence between a base model and a compressed variant.

``token_divergence`` gives per-token statistics (KLD both ways, JS, top-1s, top-k
overlap, probability and rank of the correct token); ``TokenDivergenceAccumulator``
streams them into the study-level statistics llama.cpp's ``llama-perplexity
--kl-divergence`` reports, plus "where it hurts" breakdowns.
"""

from minidiff.lm.divergence import token_divergence, token_divergence_reference

__all__ = ["token_divergence", "token_divergence_reference", "TokenDivergenceAccumulator"]


def __getattr__(name: str):
    if name == "TokenDivergenceAccumulator":
        from minidiff.lm.accumulator import TokenDivergenceAccumulator
        return TokenDivergenceAccumulator
    raise AttributeError(f"module 'minidiff.lm' has no attribute {name!r}")


# -- the language-model study (text -> windows -> models -> accumulators -> results) ---------
_STUDY_EXPORTS = {
    "LMStudy": "minidiff.lm.study", "LMStudyResult": "minidiff.lm.study", "LMVariantResult": "minidiff.lm.study",
    "run_lm_study": "minidiff.lm.study", "TokenWindows": "minidiff.lm.windows", "make_windows": "minidiff.lm.windows",
    "load_text": "minidiff.lm.windows", "check_same_tokenizer": "minidiff.lm.windows",
    "TinyLMConfig": "minidiff.lm.tinylm", "train_tiny_lm": "minidiff.lm.tinylm",
    "load_or_train_tiny_lm": "minidiff.lm.tinylm", "LMStudyConfig": "minidiff.lm.config",
    "load_lm_config": "minidiff.lm.config", "build_lm_study": "minidiff.lm.config",
}
__all__ += sorted(_STUDY_EXPORTS)
_engine_getattr = __getattr__


def __getattr__(name: str):  # noqa: F811 - extends the engine's lazy exports above
    if name in _STUDY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_STUDY_EXPORTS[name]), name)
    return _engine_getattr(name)
