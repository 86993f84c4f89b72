"""The ``[adversarial]`` table of a study file.

Every field is part of the study's cache key (``AdversarialConfig.model_dump()`` is
JSON-able and stable), so two runs with the same table craft the same attacks.

Example (TOML)::

    [adversarial]
    attacks = ["fgsm", "pgd-linf"]
    epsilon = [0.05, 0.1]
    steps = 10
    seed = 0
"""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AttackName = Literal["fgsm", "pgd-linf", "pgd-l2", "embedding-pgd", "word-substitution"]

#: attacks that perturb continuous inputs (images, tabular rows)
CONTINUOUS_ATTACKS = ("fgsm", "pgd-linf", "pgd-l2")
#: attacks that need a text model (``forward(input_ids=..., inputs_embeds=...)``)
TEXT_ATTACKS = ("embedding-pgd", "word-substitution")


def _as_list(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


class AdversarialConfig(BaseModel):
    """Attack settings, shared by every model compared (same budget for all).

    Attributes
    ----------
    attacks : list of str, optional
        Which attacks to run. ``None`` (default) picks by data kind: ``fgsm``, ``pgd-linf``
        and ``pgd-l2`` for images/tabular data; ``embedding-pgd`` and ``word-substitution``
        for text.
    epsilon : list of float
        L-infinity radii for ``fgsm`` and ``pgd-linf``, in input units (after any
        normalisation the models expect). ``0`` is allowed (no perturbation).
    epsilon_l2 : list of float
        L2 radii (per example) for ``pgd-l2``.
    embedding_epsilon : list of float
        Radius of the per-token L2 ball for ``embedding-pgd``, as a fraction of the mean
        L2 norm of the rows of the base model's input-embedding matrix.
    steps : int
        PGD iterations (Madry et al. 2018).
    step_size : float, optional
        PGD step as a fraction of epsilon; default ``2.5 / steps`` (Madry et al. 2018).
    random_start : bool
        Start PGD from a uniformly random point of the ball.
    clip_min, clip_max : float, optional
        Valid input range; adversarial inputs are clipped into it (e.g. 0 and 16 for
        scikit-learn digits, 0 and 1 for images in [0, 1]).
    no_gradient : {"surrogate", "gradient-free"}
        What to do for a model whose input gradient does not exist (e.g. an int8 kernel
        without backward): ``"surrogate"`` uses the base model's gradient (labelled
        ``"surrogate:<base>"`` in the results; falls back to gradient-free when the base
        has no gradient either), ``"gradient-free"`` estimates the gradient by SPSA
        (Uesato et al. 2018) from queries only.
    spsa_samples, spsa_delta : int, float
        SPSA: random +-1 directions per step and the finite-difference step, as a fraction
        of epsilon.
    word_budget : float
        Largest fraction of a text's words the word-substitution attack may change; at
        most ``floor(word_budget * n_words)`` words are changed.
    query_budget : int
        Largest number of model queries (forward passes of one example) per example.
    candidate_source : {"embedding-neighbours", "mlm", "auto"}
        Where substitution candidates come from: the nearest whole-word neighbours of a
        word in the base model's own input-embedding space (default; cosine similarity),
        or a masked language model (BERT-Attack, Li et al. 2020) loaded offline from
        ``mlm_model``. ``"auto"`` uses the MLM when ``mlm_model`` is given.
    num_candidates : int
        Candidates per word (the same for every model compared).
    mlm_model : str, optional
        Local directory of a Hugging Face masked LM (``AutoModelForMaskedLM``).
    skip_stopwords : bool
        Do not substitute English stop words (scikit-learn's list), as in TextFooler.
    max_length : int
        Token limit for text models.
    max_examples : int, optional
        Attack only the first ``max_examples`` examples of the data set.
    batch_size : int
        Examples (or text queries) per forward pass.
    bootstrap : int
        Paired bootstrap resamples for the base -> variant changes (0 turns CIs off).
    confidence : float
        Confidence level of the bootstrap intervals.
    n_text_examples : int
        Adversarial texts shown in the report per model.
    seed : int
        Seeds random starts, SPSA directions and the bootstrap.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attacks: Optional[list[AttackName]] = None
    epsilon: list[float] = Field(default_factory=lambda: [0.1])
    epsilon_l2: list[float] = Field(default_factory=lambda: [1.0])
    embedding_epsilon: list[float] = Field(default_factory=lambda: [0.1])
    steps: int = Field(10, ge=1, le=10_000)
    step_size: Optional[float] = Field(None, gt=0, le=10)
    random_start: bool = True
    clip_min: Optional[float] = None
    clip_max: Optional[float] = None
    no_gradient: Literal["surrogate", "gradient-free"] = "surrogate"
    spsa_samples: int = Field(16, ge=1, le=4096)
    spsa_delta: float = Field(0.01, gt=0, le=1)
    word_budget: float = Field(0.25, gt=0, le=1)
    query_budget: int = Field(2000, ge=1, le=10_000_000)
    candidate_source: Literal["embedding-neighbours", "mlm", "auto"] = "embedding-neighbours"
    num_candidates: int = Field(16, ge=1, le=1000)
    mlm_model: Optional[str] = None
    skip_stopwords: bool = True
    max_length: int = Field(128, ge=4, le=8192)
    max_examples: Optional[int] = Field(512, ge=1)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    bootstrap: int = Field(1000, ge=0, le=1_000_000)
    confidence: float = Field(0.95, gt=0, lt=1)
    n_text_examples: int = Field(5, ge=0, le=1000)
    seed: int = Field(0, ge=0)

    @field_validator("attacks")
    @classmethod
    def _attacks_unique(cls, value):
        if value is not None:
            if not value:
                raise ValueError("attacks must name at least one attack (or be omitted)")
            if len(set(value)) != len(value):
                raise ValueError(f"attacks lists an attack twice: {value}")
        return value

    @field_validator("epsilon", "epsilon_l2", "embedding_epsilon", mode="before")
    @classmethod
    def _scalar_to_list(cls, value):
        return _as_list(value)

    @field_validator("epsilon", "epsilon_l2", "embedding_epsilon")
    @classmethod
    def _radii_in_range(cls, value, info):
        if not value:
            raise ValueError(f"{info.field_name} needs at least one radius")
        for eps in value:
            if not math.isfinite(eps) or eps < 0:
                raise ValueError(
                    f"{info.field_name} must hold finite radii >= 0, got {eps}")
        if len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} lists a radius twice: {value}")
        if info.field_name == "embedding_epsilon" and max(value) > 10:
            raise ValueError(
                f"embedding_epsilon is relative to the mean token-embedding norm; {max(value)} "
                "> 10 would leave the embedding manifold entirely")
        return value

    @model_validator(mode="after")
    def _check_ranges(self):
        if (self.clip_min is None) != (self.clip_max is None):
            raise ValueError("clip_min and clip_max must be given together")
        if self.clip_min is not None:
            if not (math.isfinite(self.clip_min) and math.isfinite(self.clip_max)):
                raise ValueError("clip_min and clip_max must be finite")
            if self.clip_min >= self.clip_max:
                raise ValueError(
                    f"clip_min ({self.clip_min}) must be below clip_max ({self.clip_max})")
            width = self.clip_max - self.clip_min
            for eps in self.epsilon:
                if eps > width:
                    raise ValueError(
                        f"epsilon {eps} is larger than the input range clip_max - clip_min = "
                        f"{width}: every input could be replaced by any other")
        if self.candidate_source == "mlm" and not self.mlm_model:
            raise ValueError(
                "candidate_source = 'mlm' needs mlm_model (a local masked-LM directory); "
                "use 'embedding-neighbours' when no masked LM is available offline")
        return self

    # ------------------------------------------------------------------ helpers
    def resolved_attacks(self, kind: str) -> list[str]:
        """The attacks to run on data of ``kind`` ("text", "image" or "tabular")."""
        if kind not in ("text", "image", "tabular"):
            raise ValueError(f"unknown data kind {kind!r}; expected 'text', 'image' or 'tabular'")
        if self.attacks is None:
            return list(TEXT_ATTACKS if kind == "text" else CONTINUOUS_ATTACKS)
        allowed = TEXT_ATTACKS if kind == "text" else CONTINUOUS_ATTACKS
        wrong = [a for a in self.attacks if a not in allowed]
        if wrong:
            raise ValueError(
                f"attacks {wrong} do not apply to {kind} data; for {kind} data choose from "
                f"{list(allowed)}")
        return list(self.attacks)

    def resolved_candidate_source(self) -> str:
        if self.candidate_source == "auto":
            return "mlm" if self.mlm_model else "embedding-neighbours"
        return self.candidate_source

    def alpha(self) -> float:
        """PGD step as a fraction of epsilon."""
        return self.step_size if self.step_size is not None else 2.5 / self.steps
