"""The study file: what to compare, on what data, measuring what.

A study file is TOML (``minidiff run study.toml``); :class:`StudyConfig` is the
same thing in Python. Every table forbids unknown keys, and every validation
error is turned into one readable line naming the key and the expected type
(:func:`format_validation_error`), so a typo never silently falls back to a
default.

Format (every key except ``[data]`` and ``[base]`` is optional)::

    [study]
    name = "digits population"
    seed = 0                 # all training, splits and bootstraps derive from it
    batch_size = 256
    device = "cpu"           # or "cuda", "cuda:1"
    chunk_batches = 4        # checkpoint granularity for resume (batches per chunk)

    [data]                   # the examples every model is compared on
    source = "builtin"       # builtin | csv | jsonl | hf_disk
    name = "digits"          # builtin: digits | mnist-sample | chatterbot-en
    path = "..."             # csv / jsonl / hf_disk
    text_column = "text"     # csv / jsonl / hf_disk (text data)
    label_column = "label"   # "" when the data has no labels
    eval_fraction = 0.5      # share held out for evaluation when minidiff trains models
    limit = 0                # keep at most this many evaluation examples (0: all; seeded sample)
    train_limit = 0          # the same for the training part (when minidiff trains models)
    resize = [8, 8]          # images only: resize (area interpolation), e.g. to match another set
    options = {}             # keyword options of the built-in loader, e.g. {language = "german"}

    [ood]                    # optional out-of-distribution set (same keys as [data])
    source = "builtin"
    name = "chatterbot-ood"

    [base]                   # the original model (a population when seeds has > 1 entry)
    kind = "mlp"             # mlp | cnn | minilm | hub | path, or a model from any toolchain:
                             # torch | hf | onnx | gguf | variant with path = "..." (hf: or id = "...")
    seeds = [0, 1, 2, 3, 4]
    hidden = [64]
    epochs = 30

    [[variants]]             # compressed versions, each made from every base seed
    name = "prune-50"
    recipe = "prune"         # prune | prune-2:4 | int8 | distill | model, or made by another
                             # toolchain from the base: ort-int8 | torchao-int8
    sparsity = 0.5

    [layers]
    capture = "auto"         # or a list of module names
    token_mode = "cls"       # cls | mean | tokens | flatten (sequences: first token, masked
                             # mean, every non-padding token a sample; image maps: flatten,
                             # else spatial mean)

    [metrics]
    cka_kernel = "linear"    # linear | rbf
    knn_k = 10

    [metrics.layer_swap]     # optional (or `layer_swap = true` under [metrics]): which layer's
    granularity = "block"    # compression costs most; block | linear | ["module", ...]
    direction = "into_base"  # into_base | restore | both
    examples = 256           # seeded sample of the evaluation set

    [adversarial]            # optional; see minidiff.adversarial (its own keys)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from minidiff.metrics._checks import MIN_BOOTSTRAP  # the one rule, shared with the metric functions
# [metrics.layer_swap] is defined with its stage, where language-model study files take it too
from minidiff.study.swap import LAYER_SWAP_EXAMPLES, LayerSwapConfig, LayerSwapSetting, layer_swap_setting  # noqa: F401
from minidiff.validation import StudyFileError, format_validation_error  # noqa: F401  (re-exported)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


#: Variant names become file names (CSV tables, cache folders); keep them short and portable.
MAX_NAME_LENGTH = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    """``[study]``: run settings."""

    name: str = "study"
    seed: int = Field(0, ge=0, description="numpy and torch generators take seeds >= 0")
    batch_size: int = Field(128, ge=1)
    device: str = "cpu"
    chunk_batches: int = Field(4, ge=1, description="batches per resumable chunk")
    progress: bool = True

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        # only the spelling here: a study file stays valid on machines without its device;
        # `minidiff check` and the run check that this machine has it (minidiff.validation)
        import torch

        try:
            torch.device(v)
        except (RuntimeError, TypeError):
            raise ValueError(f"{v!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
        return v


class DataConfig(_Strict):
    """``[data]`` / ``[ood]``: where examples come from."""

    source: Literal["builtin", "csv", "jsonl", "hf_disk"] = "builtin"
    name: str = ""
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    split: str = ""
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="keyword options of the built-in loader, e.g. {language='german'}")
    eval_fraction: float = Field(0.5, gt=0.0, le=1.0)
    limit: int = Field(0, ge=0)
    train_limit: int = Field(0, ge=0, description="keep at most this many training examples (0: all)")
    resize: list[int] = Field(default_factory=list, description="images: resize to [height, width] (area)")

    @field_validator("resize")
    @classmethod
    def _resize_ok(cls, v: list[int]) -> list[int]:
        if v and (len(v) != 2 or any(x < 1 for x in v)):
            raise ValueError("resize must be [height, width] with positive integers")
        return v

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source == "builtin" and not self.name:
            raise ValueError("source 'builtin' needs 'name' (digits, mnist-sample, chatterbot-en, chatterbot-ood)")
        if self.source != "builtin" and not self.path:
            raise ValueError(f"source {self.source!r} needs 'path' (a file or a saved dataset directory)")
        return self


class TrainConfig(_Strict):
    """How minidiff trains a model (or a classification head) it builds itself."""

    epochs: int = Field(30, ge=0)
    lr: float = Field(1e-2, gt=0.0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)


class MLPModel(_Strict):
    """A small multilayer perceptron trained on the study's training split."""

    kind: Literal["mlp"]
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    seeds: list[int] = Field(default_factory=lambda: [0])
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v):
            raise ValueError("hidden must be a non-empty list of positive layer widths")
        return v


class CNNModel(_Strict):
    """A small convolutional network (image data) trained on the training split."""

    kind: Literal["cnn"]
    channels: list[int] = Field(default_factory=lambda: [16, 32])
    seeds: list[int] = Field(default_factory=lambda: [0])
    train: TrainConfig = Field(default_factory=TrainConfig)


class MiniLMModel(_Strict):
    """The embedded all-MiniLM-L6-v2 encoder with a classification head trained here."""

    kind: Literal["minilm"]
    seeds: list[int] = Field(default_factory=lambda: [0])
    max_length: int = Field(64, ge=8)
    pooling: Literal["cls", "mean"] = "mean"
    head: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=60, lr=5e-3))


class HubModel(_Strict):
    """A Hugging Face model: a hub id (needs network) or a local directory."""

    kind: Literal["hub"]
    id: str
    revision: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0])
    max_length: int = Field(128, ge=8)
    pooling: Literal["cls", "mean"] = "cls"
    head: Literal["pretrained", "train"] = "pretrained"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=60, lr=5e-3))


class PathModel(_Strict):
    """A model saved by ``minidiff.save_variant`` or ``torch.save`` (whole module)."""

    kind: Literal["path"]
    path: str
    seeds: list[int] = Field(default_factory=lambda: [0])


class SourceModel(_Strict):
    """A model from any toolchain, loaded by :func:`minidiff.models.load_model`:
    ``torch`` (a ``torch.save``d module or ``.pt2`` program), ``hf`` (a transformers
    folder or hub id), ``onnx``, ``gguf`` or ``variant`` (a ``save_variant`` folder)."""

    kind: Literal["torch", "hf", "onnx", "gguf", "variant"]
    path: str = ""
    id: str = Field("", description="hf: a hub id (instead of path)")
    task: str = Field("sequence-classification", description="hf/gguf: which AutoModel* class")
    tokenizer: str = Field("", description="folder with the tokenizer when the model file carries none")
    runtime: str = Field("", description="gguf: transformers (default) or llama.cpp")
    options: dict[str, Any] = Field(default_factory=dict, description="further load_model options")
    layer_map: dict[str, str] = Field(default_factory=dict, description="base layer -> this model's layer")
    seeds: list[int] = Field(default_factory=lambda: [0])
    max_length: int = Field(128, ge=8)

    @model_validator(mode="after")
    def _where(self) -> "SourceModel":
        if self.kind == "hf":
            if bool(self.path) == bool(self.id):
                raise ValueError("kind 'hf' needs exactly one of 'path' (a local folder) or 'id' (a hub id)")
        elif not self.path:
            raise ValueError(f"kind {self.kind!r} needs 'path'")
        elif self.id:
            raise ValueError(f"kind {self.kind!r} takes 'path', not 'id'")
        if self.runtime and self.kind != "gguf":
            raise ValueError("'runtime' applies to kind 'gguf' only")
        return self


ModelSpec = Annotated[Union[MLPModel, CNNModel, MiniLMModel, HubModel, PathModel, SourceModel],
                      Field(discriminator="kind")]


#: Recipes whose variant another toolchain makes from the base at build time (the base's head
#: goes with it): ``ort-int8`` exports the base with ``torch.onnx`` and quantizes it with
#: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations per batch);
#: ``torchao-int8`` applies ``torchao.quantization.quantize_`` with int8 weight-only
#: (``Int8WeightOnlyConfig``) by default, or int8 dynamic activations
#: (``Int8DynamicActivationInt8WeightConfig``) with ``int8_mode = "dynamic"`` (runs on CPU,
#: but several times slower than float there). See :meth:`minidiff.study.build.Builder.toolchain_variant`.
TOOLCHAIN_RECIPES = ("ort-int8", "torchao-int8")


class VariantConfig(_Strict):
    """``[[variants]]``: one compressed version (made from every base seed), or a separate model."""

    name: str
    recipe: Literal["prune", "prune-2:4", "int8", "distill", "model", "ort-int8", "torchao-int8"]
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: Literal["global", "layer"] = "global"
    finetune_epochs: int = Field(0, ge=0)
    int8_mode: Literal["dynamic", "weight-only"] | None = Field(
        None, description="int8: 'dynamic' unless set; torchao-int8: 'weight-only' unless set")
    student: dict[str, Any] = Field(default_factory=dict,
                                    description="student architecture, e.g. {hidden=[32]} or {layers=3}")
    temperature: float = Field(2.0, gt=0.0)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=40, lr=1e-2))
    model: ModelSpec | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or v == "base" or any(c in v for c in "/\\\0"):
            raise ValueError("variant names must be non-empty, not 'base', and contain no slashes")
        if len(v) > MAX_NAME_LENGTH:
            raise ValueError(f"variant name is {len(v)} characters long; names become file names, "
                             f"use at most {MAX_NAME_LENGTH}")
        if any(ord(c) < 32 for c in v):
            raise ValueError("variant names must not contain control characters")
        return v

    @model_validator(mode="after")
    def _model_needed(self) -> "VariantConfig":
        if self.recipe == "model" and self.model is None:
            raise ValueError("recipe 'model' needs a [variants.model] table (kind = hub | path | mlp | ...)")
        if self.recipe != "model" and self.model is not None:
            raise ValueError(f"recipe {self.recipe!r} derives the variant from the base; remove the 'model' table")
        if self.recipe in TOOLCHAIN_RECIPES:
            if self.finetune_epochs:
                raise ValueError(f"recipe {self.recipe!r} quantizes the base as it is (its head included); "
                                 "finetune_epochs applies to minidiff's own recipes only, remove it")
            if self.recipe == "ort-int8" and self.int8_mode == "weight-only":
                raise ValueError("recipe 'ort-int8' is ONNX Runtime's dynamic int8 (int8 weights, activations "
                                 "quantized per batch); int8_mode = 'weight-only' does not apply, remove it")
        return self

    def resolved_int8_mode(self) -> str:
        """``int8_mode`` as the recipe applies it: when unset, ``"dynamic"`` for ``int8`` and
        ``ort-int8``, ``"weight-only"`` for ``torchao-int8`` (see :data:`TOOLCHAIN_RECIPES`)."""
        if self.int8_mode is not None:
            return self.int8_mode
        return "weight-only" if self.recipe == "torchao-int8" else "dynamic"


class LayerConfig(_Strict):
    """``[layers]``: which hidden representations feed CKA."""

    capture: Literal["auto"] | list[str] = "auto"
    token_mode: Literal["cls", "mean", "tokens", "flatten"] = "cls"


#: Default of ``[metrics] sqnr_threshold_db``. 20 dB is an error power of 1% of the signal
#: power (relative error ||a - b|| / ||a|| = 0.1). int8 rounding stays above it: measured
#: 47-50 dB on a digits MLP, and on dynamic-int8 all-MiniLM-L6-v2 (48 chatterbot sentences)
#: 32 dB after the first block, falling to 21 dB after the sixth as the error accumulates;
#: an 80%-pruned digits MLP is at 6-7 dB. A layer below 20 dB has lost more than rounding
#: explains (outliers clipped by a scale, a layer pruned or replaced).
SQNR_THRESHOLD_DB = 20.0


class MetricsConfig(_Strict):
    """``[metrics]``: metric settings and which characteristics to measure."""

    characteristics: list[Literal["prediction_errors", "representation", "distribution"]] = Field(
        default_factory=lambda: ["prediction_errors", "representation", "distribution"])
    cka_kernel: Literal["linear", "rbf"] = "linear"
    cka_estimator: Literal["unbiased", "biased"] = "unbiased"
    rbf_threshold: float = Field(0.5, gt=0.0)
    rbf_max_examples: int = Field(1000, ge=8, description="RBF CKA is not streaming: first N examples only")
    knn_k: int = Field(10, ge=1)
    ood_k: int = Field(10, ge=1)
    ood_tpr: float = Field(0.95, gt=0.0, lt=1.0)
    bootstrap: int = Field(1000, ge=MIN_BOOTSTRAP, description=f"resamples per interval (>= {MIN_BOOTSTRAP})")
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    ece_bins: int = Field(15, ge=2)
    pie_examples: int = Field(12, ge=0)
    similarity: list[str] = Field(
        default_factory=lambda: ["cka"],
        description="representation-similarity measures whose matched-layer profile is reported, from the "
                    "statistics the linear CKA pass already streams (minidiff.similarity.MEASURES)")
    sqnr_threshold_db: float = Field(
        SQNR_THRESHOLD_DB, allow_inf_nan=False,
        description="the report names the first layer whose SQNR falls below this many dB")
    similarity_heatmaps: bool = Field(False, description="draw the layer x layer matrix of every chosen measure")
    layer_swap: LayerSwapSetting = Field(
        None, description="layer-swap sensitivity of same-architecture variants: a [metrics.layer_swap] table, "
                          "or true for its defaults (false or absent: not run)")

    @field_validator("similarity")
    @classmethod
    def _measures(cls, v: list[str]) -> list[str]:
        from minidiff.similarity.measures import MEASURES
        bad = [m for m in v if m not in MEASURES]
        if bad:
            raise ValueError(f"unknown similarity measure(s) {bad}; choose from {list(MEASURES)}")
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"similarity measures are listed more than once: {dup}")
        return list(v)


class StudyConfig(_Strict):
    """A whole study file."""

    study: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    ood: DataConfig | None = None
    base: ModelSpec
    variants: list[VariantConfig] = Field(min_length=1)
    layers: LayerConfig = Field(default_factory=LayerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    adversarial: Any = None

    @field_validator("adversarial", mode="before")
    @classmethod
    def _adversarial(cls, v: Any) -> Any:
        if v is None:
            return None
        try:
            from minidiff.adversarial.config import AdversarialConfig
        except ImportError as e:  # pragma: no cover - depends on the adversarial module landing
            raise ValueError(f"the [adversarial] table needs minidiff.adversarial, which failed to import: {e}")
        if isinstance(v, AdversarialConfig):
            return v
        if not isinstance(v, dict):
            raise ValueError("[adversarial] must be a table")
        return AdversarialConfig.model_validate(v)

    @model_validator(mode="after")
    def _unique_names(self) -> "StudyConfig":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        return self

    @model_validator(mode="after")
    def _seeds_ok(self) -> "StudyConfig":
        specs = [("base", self.base)] + [(f"variants[{v.name}].model", v.model) for v in self.variants
                                         if v.model is not None]
        for where, spec in specs:
            seeds = getattr(spec, "seeds", None)
            if seeds is None:
                continue
            if not seeds:
                raise ValueError(f"{where}.seeds is empty; give at least one seed, e.g. seeds = [0]")
            bad = [s for s in seeds if s < 0]
            if bad:
                raise ValueError(f"{where}.seeds must be >= 0, got {bad}")
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            if dup:
                raise ValueError(f"{where}.seeds repeats {dup}; each seed makes one model of the population, "
                                 "so repeats would count one model twice")
        return self

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (for cache keys and results.json)."""
        d = self.model_dump(mode="json", exclude={"adversarial"})
        d["adversarial"] = None if self.adversarial is None else self.adversarial.model_dump(mode="json")
        return d


def parse_config(data: dict[str, Any], source: str = "study file") -> StudyConfig:
    """Validate a study dict; raise :class:`StudyFileError` naming the bad key."""
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as e:
        raise StudyFileError(format_validation_error(e, source)) from None


def load_config(path: str | Path) -> Any:
    """Read and validate a TOML study file.

    Relative data/model paths in the file are resolved against the file's folder.
    """
    p = Path(path)
    if p.is_dir():
        raise StudyFileError(f"{str(p)!r} is a folder; give the study file itself (a .toml file), e.g. "
                             f"{p / 'study.toml'}")
    if not p.is_file():
        raise StudyFileError(f"study file {str(p)!r} does not exist")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise StudyFileError(f"{p}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise StudyFileError(f"{p}: not a UTF-8 text file") from None
    from minidiff.lm.config import is_lm_study, load_lm_config
    if is_lm_study(raw):  # one entry for every study file: a language-model study validates as one
        return load_lm_config(p)
    cfg = parse_config(raw, source=str(p))
    base_dir = p.resolve().parent
    for dc in (cfg.data, cfg.ood):
        if dc is not None and dc.path and not Path(dc.path).is_absolute():
            dc.path = str(base_dir / dc.path)
    for spec in [cfg.base] + [v.model for v in cfg.variants if v.model is not None]:
        if isinstance(spec, SourceModel):
            for attr in ("path", "tokenizer"):
                val = getattr(spec, attr)
                if val and not Path(val).is_absolute():
                    setattr(spec, attr, str(base_dir / val))
        if isinstance(spec, PathModel) and not Path(spec.path).is_absolute():
            spec.path = str(base_dir / spec.path)
        if isinstance(spec, HubModel) and spec.id.startswith((".", "/")) and not Path(spec.id).is_absolute():
            spec.id = str(base_dir / spec.id)
    return cfg
