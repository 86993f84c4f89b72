"""Study files for language models: ``task = "causal-lm"`` / ``"masked-lm"``.

The same TOML layout as the classifier study (``minidiff.study.config``), with
keys of their own where a language model needs them; every table forbids unknown
keys. Format::

    [study]
    name = "Qwen2.5-0.5B: int8 and int4 vs bf16"
    task = "causal-lm"          # causal-lm | masked-lm
    seed = 0
    batch_size = 4              # windows per forward pass (masked-lm: sequences per pass)
    device = "cpu"              # or "cuda", "cuda:1"

    [data]                      # the text that is scored
    source = "text"             # builtin | text | jsonl | hf_disk
    name = ""                   # builtin: chatterbot-en (held-out conversations by default)
    path = "wiki.test.raw"      # text / jsonl / hf_disk
    text_column = "text"        # jsonl / hf_disk
    split = ""                  # hf_disk DatasetDict split
    n_ctx = 512                 # window length in tokens (llama.cpp's -c)
    max_windows = 0             # score only the first this many windows (0: all; llama.cpp's --chunks)
    add_bos = "auto"            # auto (as the tokenizer does) | true | false
    options = {}                # keyword options of the built-in text, e.g. {split = "all"}

    [base]
    kind = "hub"                # hub | path | tinylm (the tiny LM minidiff trains itself, offline)
    id = "Qwen/Qwen2.5-0.5B"    # hub: a model id (needs network on first use)
    path = ""                   # path: a save_pretrained folder
    revision = ""               # hub: a branch, tag or commit
    dtype = "float32"           # float32 | bfloat16 | float16
    quick = false               # tinylm: the small CI configuration

    [[variants]]
    name = "int4-g128"
    recipe = "int4-weight-only" # int8 | int8-weight-only | int4-weight-only | prune | prune-2:4 | model
    group_size = 128            # int4-weight-only
    symmetric = true            # int4-weight-only
    sparsity = 0.5              # prune
    layers = []                 # recipes: restrict to these module names / patterns (default: every Linear
                                # and GPT-2 Conv1D except the output head)
    path = ""                   # model: a save_pretrained folder of the same architecture and tokenizer
    id = ""                     # model: a hub id

    [layers]
    cka = true                  # token-level CKA between all layer pairs (every scored token a sample)
    capture = "hidden_states"   # or a list of module names / glob patterns

    [memory]
    base_file = ""              # a folder: base pass stores uint16 log-probs there, variants read them
    base_file_range = 24.0      # nats below each row's maximum kept by the uint16 codes

    [report]
    explain_windows = 4         # highest-KLD windows shown token by token, per variant
    max_flipped = 24            # flipped tokens listed in context, per variant

    [metrics.layer_swap]        # optional (or `layer_swap = true` under [metrics]): which layer's
    granularity = "block"       # compression costs most; block | linear | ["model.layers.0", ...]
    direction = "into_base"     # into_base | restore | both
    examples = 256              # windows the swaps run on (a seeded sample; all when fewer)

:func:`build_lm_study` turns a validated :class:`LMStudyConfig` into an
:class:`~minidiff.lm.study.LMStudy` (loading the models and making the variants).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from minidiff.study.swap import LayerSwapSetting

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LM_TASKS = ("causal-lm", "masked-lm")
RECIPES = ("int8", "int8-weight-only", "int4-weight-only", "prune", "prune-2:4", "model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LMRunConfig(_Strict):
    """``[study]``."""

    name: str = "language-model study"
    task: Literal["causal-lm", "masked-lm"] = "causal-lm"
    seed: int = 0
    batch_size: int = Field(4, ge=1)
    device: str = "cpu"
    progress: bool = True


class LMDataConfig(_Strict):
    """``[data]``: the scored text and the window length."""

    source: Literal["builtin", "text", "jsonl", "hf_disk"] = "builtin"
    name: str = ""
    path: str = ""
    text_column: str = "text"
    split: str = ""
    n_ctx: int = Field(512, ge=4)
    max_windows: int = Field(0, ge=0)
    add_bos: bool | Literal["auto"] = "auto"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _source(self) -> "LMDataConfig":
        if self.source == "builtin" and not self.name:
            raise ValueError("source 'builtin' needs 'name' (chatterbot-en)")
        if self.source != "builtin" and not self.path:
            raise ValueError(f"source {self.source!r} needs 'path'")
        return self


class LMBaseConfig(_Strict):
    """``[base]``: the original model."""

    kind: Literal["hub", "path", "tinylm"] = "tinylm"
    id: str = ""
    path: str = ""
    revision: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quick: bool = False

    @model_validator(mode="after")
    def _where(self) -> "LMBaseConfig":
        if self.kind == "hub" and not self.id:
            raise ValueError("kind 'hub' needs 'id' (e.g. 'Qwen/Qwen2.5-0.5B')")
        if self.kind == "path" and not self.path:
            raise ValueError("kind 'path' needs 'path' (a save_pretrained folder)")
        return self


class LMVariantConfig(_Strict):
    """``[[variants]]``: a recipe applied to the base, or another model."""

    name: str
    recipe: Literal["int8", "int8-weight-only", "int4-weight-only", "prune", "prune-2:4", "model"]
    group_size: int = Field(128, ge=1)
    symmetric: bool = True
    sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    layers: list[str] = Field(default_factory=list)
    path: str = ""
    id: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or v == "base" or any(c in v for c in "/\\"):
            raise ValueError("a variant name must be non-empty, not 'base', and without slashes")
        return v

    @model_validator(mode="after")
    def _model(self) -> "LMVariantConfig":
        if self.recipe == "model" and not (self.path or self.id):
            raise ValueError("recipe 'model' needs 'path' or 'id'")
        return self


class LMLayerConfig(_Strict):
    """``[layers]``."""

    cka: bool = True
    capture: str | list[str] = "hidden_states"


class LMMemoryConfig(_Strict):
    """``[memory]``."""

    base_file: str = ""
    base_file_range: float = Field(24.0, gt=0.0)


class LMReportConfig(_Strict):
    """``[report]``."""

    explain_windows: int = Field(4, ge=0)
    max_flipped: int = Field(24, ge=0)


class LMMetricsConfig(_Strict):
    """``[metrics]``: what a language-model study measures besides the token statistics."""

    layer_swap: LayerSwapSetting = Field(
        None, description="layer-swap sensitivity of same-architecture variants on a seeded sample of the scored "
                          "windows: a [metrics.layer_swap] table, or true for its defaults (false or absent: not run)")


class LMStudyConfig(_Strict):
    """A language-model study file."""

    study: LMRunConfig = Field(default_factory=LMRunConfig)
    data: LMDataConfig
    base: LMBaseConfig
    variants: list[LMVariantConfig] = Field(min_length=1)
    layers: LMLayerConfig = Field(default_factory=LMLayerConfig)
    memory: LMMemoryConfig = Field(default_factory=LMMemoryConfig)
    report: LMReportConfig = Field(default_factory=LMReportConfig)
    metrics: LMMetricsConfig = Field(default_factory=LMMetricsConfig)

    @model_validator(mode="after")
    def _names(self) -> "LMStudyConfig":
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {dup}")
        if self.study.task == "masked-lm" and self.base.kind == "tinylm":
            raise ValueError("the tiny LM is a causal LM; use task = 'causal-lm' or another base")
        return self


def is_lm_study(data: dict[str, Any]) -> bool:
    """Whether a parsed study file is a language-model study (``[study] task``)."""
    return isinstance(data.get("study"), dict) and data["study"].get("task") in LM_TASKS


def parse_lm_config(data: dict[str, Any], source: str = "study file") -> LMStudyConfig:
    """Validate a parsed study file; errors become one readable ``StudyFileError``."""
    from minidiff.validation import StudyFileError, format_validation_error

    try:
        return LMStudyConfig.model_validate(data)
    except ValidationError as e:
        raise StudyFileError(format_validation_error(e, source)) from None


def load_lm_config(path: str | Path) -> LMStudyConfig:
    """Read and validate a TOML language-model study file."""
    from minidiff.validation import StudyFileError

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyFileError(f"{path}: no such study file") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyFileError(f"{path}: not valid TOML ({e})") from None
    return parse_lm_config(data, source=str(path))


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_pretrained(where: str, revision: str, dtype: str, task: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForMaskedLM
    kw: dict[str, Any] = {"revision": revision} if revision else {}
    model = cls.from_pretrained(where, dtype=_dtype(dtype), **kw)
    return model.eval(), AutoTokenizer.from_pretrained(where, **kw)


def build_lm_study(cfg: LMStudyConfig, cache_dir: str | Path | None = None) -> Any:
    """Load the base, make or load every variant, read the text: an :class:`LMStudy`."""
    from minidiff.compress import prune, quantize

    from .study import LMStudy
    from .windows import load_text

    task = cfg.study.task
    if cfg.base.kind == "tinylm":
        from .tinylm import TinyLMConfig, load_or_train_tiny_lm

        base, tok, _ = load_or_train_tiny_lm(cache_dir, TinyLMConfig.quick() if cfg.base.quick else TinyLMConfig())
    else:
        base, tok = _load_pretrained(cfg.base.id or cfg.base.path, cfg.base.revision, cfg.base.dtype, task)
    base = base.to(cfg.study.device)
    variants: dict[str, Any] = {}
    tokenizers: dict[str, Any] = {}
    for v in cfg.variants:
        layers = v.layers or None
        if v.recipe in ("int8", "int8-weight-only"):
            variants[v.name] = quantize(base, v.recipe, layers=layers)
        elif v.recipe == "int4-weight-only":
            variants[v.name] = quantize(base, v.recipe, layers=layers, group_size=v.group_size,
                                        symmetric=v.symmetric)
        elif v.recipe == "prune":
            variants[v.name] = prune(base, sparsity=v.sparsity, layers=layers, seed=cfg.study.seed)
        elif v.recipe == "prune-2:4":
            variants[v.name] = prune(base, structure="2:4", layers=layers, seed=cfg.study.seed)
        else:
            variants[v.name], tokenizers[v.name] = _load_pretrained(v.id or v.path, "", cfg.base.dtype, task)
            variants[v.name] = variants[v.name].to(cfg.study.device)
    d = cfg.data
    text = load_text(d.source, name=d.name, path=d.path, text_column=d.text_column, split=d.split, options=d.options)
    return LMStudy(base, variants, text=text, tokenizer=tok, tokenizers=tokenizers, n_ctx=d.n_ctx,
                   batch_size=cfg.study.batch_size, task=task,
                   layers=(cfg.layers.capture if cfg.layers.cka else None), cka=cfg.layers.cka,
                   max_windows=d.max_windows, add_bos=None if d.add_bos == "auto" else d.add_bos,
                   base_file=cfg.memory.base_file or None, base_file_range=cfg.memory.base_file_range,
                   explain_windows=cfg.report.explain_windows, max_flipped=cfg.report.max_flipped,
                   progress=cfg.study.progress, name=cfg.study.name, seed=cfg.study.seed,
                   layer_swap=cfg.metrics.layer_swap, cache=cache_dir)


def check_lm_study(cfg: LMStudyConfig, *, device: str | None = None) -> list[str]:
    """Validate a language-model study file without running or loading a model; return the
    checks that passed.

    Checks: the device exists; the scored text can be read and is not empty; every model
    folder holds a ``config.json`` and a tokenizer (a hub id is only checked when it is in
    the local Hugging Face cache, without network); the ``[metrics.layer_swap]`` plan.

    Raises
    ------
    StudyFileError
        The first check that fails, naming the key and how to fix it.
    """
    from minidiff.validation import StudyFileError, check_device

    from .windows import load_text

    done = ["valid TOML, every key known and typed"]
    try:
        check_device(device or cfg.study.device, "--device" if device else "key 'study.device'")
    except ValueError as e:
        raise StudyFileError(str(e)) from None
    done.append(f"device {device or cfg.study.device} exists")
    d = cfg.data
    try:
        text = load_text(d.source, name=d.name, path=d.path, text_column=d.text_column, split=d.split,
                         options=d.options)
    except (ValueError, OSError, KeyError) as e:
        raise StudyFileError(f"[data]: {e}") from None
    if not text.strip():
        raise StudyFileError(f"[data]: the text ({d.source} {d.name or d.path}) is empty; a study scores tokens of it")
    done.append(f"[data]: {len(text):,} characters of text to cut into windows of {d.n_ctx} tokens")
    # (key, where, a local folder is required: a 'path' rather than a hub 'id')
    where = [("base", cfg.base.path or cfg.base.id, cfg.base.kind == "path")] if cfg.base.kind != "tinylm" else []
    where += [(f"variants[{v.name}]", v.path or v.id, bool(v.path)) for v in cfg.variants if v.recipe == "model"]
    for key, loc, local in where:
        p = Path(loc)
        if p.exists():
            if not (p / "config.json").is_file():
                raise StudyFileError(f"{key}: {loc!r} is not a transformers model folder (no config.json); give "
                                     "a folder written by save_pretrained")
            if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                   "tokenizer.model", "vocab.txt")):
                raise StudyFileError(f"{key}: {loc!r} has no tokenizer files; a token-level comparison needs the "
                                     "model's tokenizer saved beside it (tokenizer.save_pretrained)")
            done.append(f"{key}: model folder {loc} (config.json and a tokenizer)")
        elif not local:
            done.append(f"{key}: {loc!r} is a hub id; it is downloaded (or read from the local cache) at run time")
        else:
            raise StudyFileError(f"{key}: model folder {loc!r} does not exist")
    if cfg.base.kind == "tinylm":
        done.append("base: minidiff's tiny language model (trained on first use, then cached)")
    ls = cfg.metrics.layer_swap
    if ls is not None:
        gran = ls.granularity if isinstance(ls.granularity, str) else f"modules {ls.granularity}"
        mode = ("left out for every variant: base_file mode never runs the two models together"
                if cfg.memory.base_file else "variants of another architecture are left out, with the reason")
        done.append(f"[metrics.layer_swap]: {gran} granularity, direction {ls.direction}, on {ls.examples} "
                    f"windows; {mode}")
    return done
