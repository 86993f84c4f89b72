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
