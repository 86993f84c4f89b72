"""``minidiff check``: validate a study semantically without running any model.

Beyond the schema (:mod:`minidiff.study.config`: keys, types, ranges, seeds,
device), this loads what is cheap to load and checks that the pieces fit:
the data files and their columns exist and the labels parse; the OOD set has the
evaluation data's kind; the device exists; model folders and files exist and a
transformers folder's ``config.json`` loads; every recipe applies to the kind of
model it is given (a distillation student that matches the base's architecture,
int8 and pruning on models with Linear layers, training only with labels).
Nothing is trained, compressed or run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from minidiff.study.config import StudyConfig, StudyFileError, load_config

_TRAINED = ("mlp", "cnn", "minilm")
#: Recipes made by other toolchains and the packages they run (the formats extra).
_RECIPE_PACKAGES = {"ort-int8": ("onnx", "onnxruntime", "onnxscript"), "torchao-int8": ("torchao",)}  # kinds minidiff trains (or trains a head for) on the [data] split


def _fail(where: str, msg: str) -> StudyFileError:
    return StudyFileError(f"{where}: {msg}")


def _check_model_spec(spec: Any, where: str, data_kind: str, done: list[str]) -> None:
    kind = getattr(spec, "kind", None)
    if kind in ("mlp", "cnn") and data_kind == "text":
        raise _fail(where, f"kind {kind!r} reads tensors, but [data] holds text; use kind = 'minilm' or 'hub' "
                           "(a transformer with a tokenizer) for text")
    if kind == "cnn" and data_kind == "tabular":
        raise _fail(where, "kind 'cnn' needs images (channels x height x width); [data] holds tabular rows: "
                           "use kind = 'mlp'")
    if kind in ("minilm", "hub") and data_kind != "text":
        raise _fail(where, f"kind {kind!r} is a text model, but [data] holds {data_kind} examples; "
                           "use kind = 'mlp' or 'cnn'")
    path = getattr(spec, "path", None)
    if path:
        p = Path(path)
        if not p.exists():
            raise _fail(where, f"model path {path!r} does not exist")
        if p.is_file() and p.suffix.lower() in (".txt", ".json", ".csv", ".toml", ".md"):
            raise _fail(where, f"model path {path!r} is a {p.suffix} text file, not a saved model (a save_variant "
                               "folder, a torch.save'd module, an .onnx or .gguf file)")
        done.append(f"{where}: model path {path} exists")
    hub_id = getattr(spec, "id", None)
    if kind == "hub" and hub_id and Path(hub_id).is_dir():
        cfg_file = Path(hub_id) / "config.json"
        if not cfg_file.is_file():
            raise _fail(where, f"{hub_id!r} is a folder without config.json; it is not a transformers model folder")
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(hub_id)
        except Exception as e:  # transformers raises many types for a bad config
            raise _fail(where, f"transformers cannot read {cfg_file}: {e}") from None
        done.append(f"{where}: transformers config of {hub_id} loads")


def _check_recipes(cfg: StudyConfig, done: list[str]) -> None:
    base_kind = getattr(cfg.base, "kind", None)
    for v in cfg.variants:
        where = f"variants[{v.name}]"
        if v.recipe == "distill":
            st = set(v.student)
            if not st:
                raise _fail(where, "recipe 'distill' needs student = {hidden = [...]} (MLP/CNN) or "
                                   "{layers = N} (transformer)")
            if base_kind in ("minilm", "hub") and "hidden" in st:
                raise _fail(where, f"a {base_kind} base is distilled into fewer transformer blocks: use "
                                   "student = {layers = N}, not hidden")
            if base_kind in ("mlp", "cnn") and "layers" in st:
                raise _fail(where, f"a {base_kind} base is distilled into a narrower network: use "
                                   "student = {hidden = [...]}, not layers")
        if v.recipe != "model" and base_kind == "hub" and getattr(cfg.base, "head", "") == "train" \
                and v.recipe == "distill":
            raise _fail(where, "distilling a hub model whose head minidiff trains is not supported; "
                               "use head = 'pretrained' or a different recipe")
        if v.recipe == "model" and v.model is not None:
            continue
        missing = [pkg for pkg in _RECIPE_PACKAGES.get(v.recipe, ()) if importlib.util.find_spec(pkg) is None]
        if missing:
            raise _fail(where, f"recipe {v.recipe!r} needs {', '.join(missing)}, which is not installed: "
                               f"pip install {' '.join(missing)} (or pip install 'minidiff[formats]')")
        done.append(f"{where}: recipe {v.recipe!r} applies to a {base_kind} base")


def _check_layer_swap(cfg: StudyConfig, done: list[str]) -> None:
    """State what ``[metrics.layer_swap]`` will run, and which variants it will leave out
    by their recipe (the rest is decided on the built models, see :mod:`minidiff.study.swap`)."""
    ls = cfg.metrics.layer_swap
    if ls is None:
        return
    why = {"distill": "a distilled student has another architecture", "ort-int8": "it runs in ONNX Runtime"}
    out = [f"{v.name} ({why[v.recipe]})" for v in cfg.variants if v.recipe in why]
    out += [f"{v.name} (kind {v.model.kind!r} runs in {'ONNX Runtime' if v.model.kind == 'onnx' else 'its runtime'})"
            for v in cfg.variants if v.recipe == "model" and v.model is not None and v.model.kind in ("onnx", "gguf")]
    gran = ls.granularity if isinstance(ls.granularity, str) else f"modules {ls.granularity}"
    done.append(f"[metrics.layer_swap]: {gran} granularity, direction {ls.direction}, on {ls.examples} evaluation "
                "examples (all when the evaluation split has fewer); " + (f"left out: {', '.join(out)}" if out else
                                                                           "every variant of the base's architecture"))


def check_study(path: str | Path, *, device: str | None = None, config: StudyConfig | None = None) -> list[str]:
    """Validate the study file at ``path``; return the list of checks that passed.
    ``config``: the file already read by :func:`~minidiff.study.config.load_config`.

    Raises
    ------
    StudyFileError
        Naming the table or key at fault and how to fix it.
    """
    p = Path(path)
    cfg = config if config is not None else load_config(p)
    done = [f"{p}: valid TOML, every key known and typed"]
    from minidiff.validation import check_device

    try:
        check_device(device or cfg.study.device, "--device" if device else "key 'study.device'")
    except ValueError as e:
        raise StudyFileError(f"{p}: {e}") from None
    done.append(f"device {device or cfg.study.device} exists")

    from minidiff.study.build import load_data

    datasets: dict[str, Any] = {}
    for what, dc in (("data", cfg.data), ("ood", cfg.ood)):
        if dc is None:
            continue
        try:
            ds = load_data(dc, what)
        except (ValueError, OSError) as e:
            raise StudyFileError(str(e)) from None
        datasets[what] = ds
        lab = "no labels" if ds.labels is None else f"{ds.num_classes} classes"
        done.append(f"[{what}] {ds.name}: {len(ds)} {ds.kind} examples, {lab}")
    data = datasets["data"]
    if "ood" in datasets and datasets["ood"].kind != data.kind:
        raise StudyFileError(f"[ood] holds {datasets['ood'].kind} examples but [data] holds {data.kind}; "
                             "the same models read both")
    if "ood" in datasets and data.kind != "text" and datasets["ood"].inputs.shape[1:] != data.inputs.shape[1:]:
        raise StudyFileError(f"[ood] examples have shape {tuple(datasets['ood'].inputs.shape[1:])} but [data] "
                             f"examples have {tuple(data.inputs.shape[1:])}; the same models read both, so the OOD "
                             "set needs the data's feature count / image size")
    if data.labels is not None and data.num_classes < 2:
        raise StudyFileError(f"[data] has a single class ({data.class_names[:1]}); a classifier study needs at "
                             "least two (check label_column)")
    needs_train = getattr(cfg.base, "kind", None) in _TRAINED or (
        getattr(cfg.base, "kind", None) == "hub" and getattr(cfg.base, "head", "") == "train") or any(
        v.recipe == "distill" or v.finetune_epochs > 0 for v in cfg.variants)
    if needs_train and data.labels is None:
        raise StudyFileError("[data] has no labels, but minidiff must train models on it; give label_column "
                             "or use a pretrained classifier (kind = 'hub', head = 'pretrained')")
    _check_model_spec(cfg.base, "base", data.kind, done)
    for v in cfg.variants:
        if v.model is not None:
            _check_model_spec(v.model, f"variants[{v.name}].model", data.kind, done)
    _check_recipes(cfg, done)
    _check_layer_swap(cfg, done)
    return done
