"""``minidiff.Study``: compare a base model with its compressed variants.

>>> study = minidiff.Study(base=model, variants={"int8": q, "prune-50": p}, data=examples)
>>> results = study.run(out="study-out")        # study-out/report.html, results.json, *.csv

or, from a study file, ``minidiff.Study.from_config("study.toml").run(out=...)``
(= ``minidiff run study.toml --out ...``). A base given as a list of modules is a
population (one model per seed); each variant then gives one module per base
seed, in the same order.

The run: every model streams once over the evaluation data (and once over the
OOD set), see :mod:`minidiff.study.runner`; the outputs are cached per model
(:mod:`minidiff.study.cache`); :mod:`minidiff.study.analysis` turns them into
numbers and verdicts; :mod:`minidiff.report` renders the page. Under
``torchrun`` each rank runs its shard and only rank 0 analyses and writes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

import minidiff
from minidiff.distributed import DistContext
from minidiff.validation import check_device, check_module_has_data
from minidiff.study.analysis import THRESHOLDS, Analysis
from minidiff.study.cache import StudyCache, hash_json, hash_module
from minidiff.models.capture import TOKEN_MODES
from minidiff.study.capture import Member, auto_layers, tensor_prepare, text_prepare
from minidiff.study.config import MetricsConfig
from minidiff.study.results import SCHEMA, write_output
from minidiff.results import Results
from minidiff.study.runner import Pair, run_pass


def model_info(module: nn.Module) -> dict[str, Any]:
    """Parameter count, share of non-zero weights (matrices/kernels only) and storage size,
    counted for the real storage (packed/quantized/sparse/subclass), see
    :func:`minidiff.models.facts.model_facts`."""
    from minidiff.models.facts import model_facts
    f = model_facts(module)
    return {"num_params": f.num_params, "nonzero_fraction": f.nonzero_fraction, "size_mb": f.size_mb,
            "bytes": f.bytes, "storage": f.storage}


def _as_list(x: Any) -> list[nn.Module]:
    if isinstance(x, nn.Module):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(m, nn.Module) for m in x):
        return list(x)
    raise ValueError(f"expected an nn.Module or a non-empty list of them (one per seed), got {type(x).__name__}")


class Study:
    """A base model (or population) vs its compressed variants on one data set.

    Parameters
    ----------
    base : nn.Module or list of nn.Module
        The original model; a list is a population (one model per seed).
    variants : dict name -> nn.Module or list of nn.Module
        The compressed versions; a list gives one per base seed, in the same order.
    data : ExampleSet
        Evaluation examples (``labels=None`` is allowed: label metrics are skipped
        with the reason stated).
    ood : ExampleSet, optional
        Out-of-distribution examples; without it OOD agreement is "not measured".
    name : str
    layers : "auto" or list of module names (the same names must exist in every model)
    token_mode : "cls", "mean", "tokens" or "flatten"
        How a sequence layer becomes samples for CKA (see :func:`minidiff.models.capture.pool`);
        with "tokens" every non-padding token is a sample, and the per-example embedding
        used by kNN overlap and OOD is the attention-masked mean.
    metrics : MetricsConfig or dict
    adversarial : AdversarialConfig or dict, optional
        Runs :func:`minidiff.adversarial.run_adversarial` when given.
    seeds : list of int, optional
        The seed of each base population member (default ``0..P-1``).
    batch_size, chunk_batches : int
        Batch size of the forward passes; batches per resumable chunk.
    device : str
    cache_dir : path, optional
        Where outputs are cached; default ``<out>/cache`` (or a temporary folder
        when ``run`` gets no ``out``).
    tokenizer : optional
        For text data when the models carry no ``.tokenizer``.
    max_length : int
        Token truncation length for text data.
    model_notes : dict group -> dict, optional
        Extra description of each group (recipe, seeds) shown in the report.
    config : dict, optional
        The validated study file (stored in results.json and the cache).
    """

    def __init__(self, base: nn.Module | Sequence[nn.Module], variants: Mapping[str, Any], data: Any, *,
                 ood: Any = None, name: str = "study", layers: str | list[str] = "auto", token_mode: str = "cls",
                 metrics: MetricsConfig | dict | None = None, adversarial: Any = None,
                 seeds: Sequence[int] | None = None, seed: int = 0, batch_size: int = 128, chunk_batches: int = 4,
                 device: str = "cpu", cache_dir: str | Path | None = None, progress: bool = True,
                 tokenizer: Any = None, max_length: int = 128, model_notes: dict[str, dict] | None = None,
                 config: dict | None = None, notes: list[str] | None = None) -> None:
        from minidiff.data import ExampleSet
        if not isinstance(data, ExampleSet):
            raise ValueError(f"data must be a minidiff.data.ExampleSet (see minidiff.data.load_csv etc.), "
                             f"got {type(data).__name__}")
        if ood is not None and not isinstance(ood, ExampleSet):
            raise ValueError(f"ood must be an ExampleSet or None, got {type(ood).__name__}")
        if ood is not None and ood.kind != data.kind:
            raise ValueError(f"the OOD set holds {ood.kind} examples but the data holds {data.kind}; "
                             "the same models must read both")
        if ood is not None and data.kind != "text" and tuple(ood.inputs.shape[1:]) != tuple(data.inputs.shape[1:]):
            raise ValueError(f"the OOD set {ood.name!r} has examples of shape {tuple(ood.inputs.shape[1:])} but the "
                             f"evaluation data {data.name!r} has {tuple(data.inputs.shape[1:])}; the same models read "
                             "both, so give an OOD set with the data's feature count / image size")
        if len(data) < 4:
            raise ValueError(f"the evaluation data has {len(data)} examples; a study needs at least 4")
        if not variants:
            raise ValueError("give at least one variant to compare with the base")
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {token_mode!r}")
        check_device(device, "device")
        self.base = _as_list(base)
        self.variants = {str(k): _as_list(v) for k, v in variants.items()}
        for k, v in self.variants.items():
            if k == "base" or "~" in k or "#" in k or "/" in k:
                raise ValueError(f"variant name {k!r} is reserved or contains '~', '#' or '/'")
            if len(v) != len(self.base) and len(v) != 1:
                raise ValueError(f"variant {k!r} has {len(v)} models but the base population has "
                                 f"{len(self.base)}; give one per base seed (or one)")
        for i, m in enumerate(self.base):
            check_module_has_data(m, f"base model {i}")
        for k, v in self.variants.items():
            for i, m in enumerate(v):
                check_module_has_data(m, f"variant {k!r} model {i}")
        self.seeds = list(seeds) if seeds is not None else list(range(len(self.base)))
        if len(self.seeds) != len(self.base):
            raise ValueError(f"seeds has {len(self.seeds)} entries for {len(self.base)} base models")
        self.data = data
        self.ood = ood
        self.name = name
        self.layers = layers
        self.token_mode = token_mode
        self.metrics = metrics if isinstance(metrics, MetricsConfig) else MetricsConfig.model_validate(metrics or {})
        if adversarial is not None and not hasattr(adversarial, "model_dump"):
            from minidiff.adversarial.config import AdversarialConfig
            adversarial = AdversarialConfig.model_validate(adversarial)
        self.adversarial = adversarial
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.chunk_batches = int(chunk_batches)
        self.device = device
        self.cache_dir = cache_dir
        self.progress = progress
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.model_notes = model_notes or {}
        self.config = config
        self.notes = list(notes or [])
        self.last_run: dict[str, Any] = {}

    # -- construction from a study file --------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, *, cache_dir: str | Path | None = None, progress: bool | None = None) -> "Study":
        """Build every model a study file describes (training/compressing as asked; cached)."""
        from minidiff.study.build import build_parts
        kwargs, info = build_parts(cfg, cache_dir=cache_dir, progress=progress)
        study = cls(**kwargs)
        study.build_info = info
        return study

    # -- members --------------------------------------------------------------------
    def _prepare_for(self, module: nn.Module) -> Any:
        if self.data.kind != "text":
            return tensor_prepare
        tok = getattr(module, "tokenizer", None) or self.tokenizer
        if tok is None:
            raise ValueError("text data needs a tokenizer: the models have no .tokenizer; pass Study(tokenizer=...)")
        is_hf_cls = hasattr(module, "config") and not hasattr(module, "head")
        return text_prepare(tok, self.max_length, with_token_type_ids=is_hf_cls)

    def _members(self) -> tuple[dict[str, list[Member]], list[Member]]:
        """The study's members, each variant's layers aligned with its base's.

        A variant's layers are the base's, matched by :func:`minidiff.models.align_layers`
        (the variant's ``layer_map`` model note, else module names, else position); it then
        follows its base member in reporting the final embedding as a layer or not, so a
        cast, quantized or exported copy lists exactly the base's layers. A variant of
        another architecture that no rule aligns (a distilled student of other depth, with
        no ``layer_map``) keeps its own layers: CKA compares every layer with every layer.

        Each member's cache key is its exact fingerprint; a model that cannot be fingerprinted
        exactly (:class:`~minidiff.models.fingerprint.UnhashableModelError`) gets a fresh key
        no later run can meet, i.e. it is never read from the cache, and the study notes say so.
        """
        from minidiff.models.align import align_layers
        from minidiff.models.fingerprint import UnhashableModelError
        pop = len(self.base) > 1
        layers = None if self.layers == "auto" else list(self.layers)
        groups: dict[str, list[Member]] = {}

        def mk(group: str, i: int, module: nn.Module, like: Member | None = None) -> Member:
            nm = f"{group}#s{self.seeds[i]}" if pop else group
            module = module.to(self.device).eval()
            mine = list(layers) if layers else auto_layers(module)
            follows = None
            if like is not None:
                lmap = self.model_notes.get(group, {}).get("layer_map") or None
                try:
                    al = align_layers(like.layers, mine, layer_map=lmap,
                                      variant_modules=[n for n, _ in module.named_modules()])
                except ValueError as e:
                    if lmap or layers:
                        raise ValueError(f"variant {group!r}: {e}") from None
                else:
                    mine, follows = al.variant, like
            return Member(name=nm, group=group, seed=self.seeds[i], module=module,
                          prepare=self._prepare_for(module), layers=mine, follows=follows)
        groups["base"] = [mk("base", i, m) for i, m in enumerate(self.base)]
        for g, mods in self.variants.items():
            if len(mods) == 1 and len(self.base) > 1:
                groups[g] = [mk(g, 0, mods[0], groups["base"][0])]
            else:
                groups[g] = [mk(g, i, m, groups["base"][i]) for i, m in enumerate(mods)]
        allm = [m for ms in groups.values() for m in ms]
        unhashable = []
        for m in allm:
            try:
                m.key = hash_module(m.module)
            except UnhashableModelError as e:
                m.key = f"unhashable-{uuid.uuid4().hex}"
                unhashable.append(f"{m.name} ({e})")
        if unhashable:
            note = ("not cached, recomputed on every run (no exact fingerprint of the weights): "
                    + "; ".join(unhashable))
            self.notes = [n for n in self.notes if not n.startswith("not cached, recomputed")] + [note]
        return groups, allm

    def _check_classes(self, groups: dict[str, list[Member]], logits: dict[str, torch.Tensor]) -> None:
        widths = {m.name: int(logits[m.name].shape[1]) for ms in groups.values() for m in ms}
        if len(set(widths.values())) > 1:
            raise ValueError("models disagree on the number of classes: "
                             + ", ".join(f"{k} {v}" for k, v in widths.items())
                             + "; every model must classify into the same classes")
        c = next(iter(widths.values()))
        if self.data.labels is not None and self.data.num_classes != c:
            raise ValueError(f"the models output {c} classes but the data has {self.data.num_classes} "
                             f"({self.data.class_names[:10]}...); check the label column and the models' heads")

    # -- run ------------------------------------------------------------------------
    def run(self, out: str | Path | None = None, *, on_chunk: Any = None, overwrite: bool = False) -> Results:
        """Run the study (resuming from the cache) and, with ``out``, write the report.

        ``out`` holding another study's outputs is refused unless ``overwrite=True``
        (the outputs of one run are never mixed with another's).

        Returns a :class:`minidiff.results.Results` (typed; ``results["verdicts"]`` etc. read
        like results.json). Under torchrun only rank 0 returns it and writes files; other
        ranks return ``{}``.
        """
        t_all = time.perf_counter()
        timing: dict[str, float] = {}
        ctx = DistContext.from_env()
        if out is not None and ctx.is_main:  # refuse a folder of another study before running anything
            from minidiff.results import check_output
            check_output(out, self.name, overwrite=overwrite)
        tmp = None
        if self.cache_dir is not None:
            cache_root = Path(self.cache_dir)
        elif out is not None:
            cache_root = Path(out) / "cache"
        else:
            tmp = tempfile.mkdtemp(prefix="minidiff-cache-")
            cache_root = Path(tmp)
        try:
            cache = StudyCache(cache_root)
            t = time.perf_counter()
            groups, allm = self._members()
            if self.metrics.layer_swap is not None:  # a wrong layer name fails before any pass
                from minidiff.study.swap import swap_layers
                swap_layers(groups["base"][0].module, self.metrics.layer_swap.granularity)
            pairs = []
            for g, ms in groups.items():
                if g == "base":
                    continue
                for i, m in enumerate(ms):
                    pairs.append(Pair(groups["base"][i % len(groups["base"])], m))
            if len(groups["base"]) >= 2:
                pairs.append(Pair(groups["base"][0], groups["base"][1]))
            timing["prepare_s"] = time.perf_counter() - t
            want_rep = "representation" in self.metrics.characteristics
            rbf_rows = self.metrics.rbf_max_examples if (want_rep and self.metrics.cka_kernel == "rbf") else 0
            t = time.perf_counter()
            ev = run_pass(allm, pairs if want_rep else [], self.data,
                          cache=cache, tag="eval", batch_size=self.batch_size, chunk_batches=self.chunk_batches,
                          token_mode=self.token_mode, device=self.device, ctx=ctx, metrics=self.metrics,
                          characteristics=self.metrics.characteristics, rbf_rows=rbf_rows, progress=self.progress,
                          on_chunk=on_chunk)
            timing["eval_pass_s"] = time.perf_counter() - t
            self._check_classes(groups, ev.logits)
            ood_emb = None
            ood_reason = "no OOD set was given (add an [ood] table or Study(ood=...))"
            if self.ood is not None and "distribution" in self.metrics.characteristics:
                t = time.perf_counter()
                oo = run_pass(allm, [], self.ood, cache=cache, tag="ood", batch_size=self.batch_size,
                              chunk_batches=self.chunk_batches, token_mode=self.token_mode, device=self.device,
                              ctx=ctx, progress=self.progress)
                ood_emb = oo.embeddings
                timing["ood_pass_s"] = time.perf_counter() - t
            self.last_run = {"forward_chunks": dict(ev.forward_chunks), "corrupt_entries": list(cache.corrupt_entries)}
            if not ctx.is_main:  # rank 0 attacks, analyses and writes
                return {}
            adv = self._adversarial(groups, cache, ctx, timing)
            swap = self._layer_swap(groups, cache, timing)
            t = time.perf_counter()
            cka = self._cka_matrices(ev, pairs)
            results = self._analyse(groups, ev, cka, ood_emb, ood_reason, adv)
            if swap is not None:  # the section exists only when the study asked for it
                results["layer_swap"] = swap
            timing["analysis_s"] = time.perf_counter() - t
            if cache.corrupt_entries:
                results["study"]["notes"].append(
                    f"{len(cache.corrupt_entries)} corrupt cache entr(y/ies) detected by checksum and recomputed: "
                    + ", ".join(cache.corrupt_entries[:5]))
            timing["total_s"] = time.perf_counter() - t_all
            results["timing"] = timing
            results = Results.from_dict(results)
            cache.save_json("results.json", results.json_data())
            if out is not None:
                results.save(out, overwrite=overwrite)
            return results
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _cka_matrices(self, ev: Any, pairs: list[Pair]) -> dict[str, np.ndarray]:
        from minidiff.study.analysis import _cka_matrix
        out = {p.name: _cka_matrix(acc) for p, acc in ((p, ev.cka.get(p.name)) for p in pairs) if acc is not None}
        if ev.rbf_layers:
            from minidiff.similarity import cka_matrix
            for p in pairs:
                la, lb = ev.rbf_layers.get(p.a.name), ev.rbf_layers.get(p.b.name)
                if la and lb:
                    m = cka_matrix(la, lb, kernel="rbf", threshold=self.metrics.rbf_threshold,
                                   estimator=self.metrics.cka_estimator)
                    out[p.name] = np.asarray(torch.as_tensor(getattr(m, "matrix", m)).double().numpy())
        return out

    def _adversarial(self, groups: dict[str, list[Member]], cache: StudyCache, ctx: DistContext,
                     timing: dict[str, float]) -> dict[str, Any]:
        if self.adversarial is None:
            return {"not_measured": "no [adversarial] table in the study"}
        key = hash_json({"models": {g: ms[0].key for g, ms in groups.items()}, "data": self.data.fingerprint(),
                         "config": self.adversarial.model_dump(mode="json")})[:32]
        got = cache.load_json(f"adversarial/{key}.json")
        if got is not None:
            return got
        from minidiff.adversarial import run_adversarial
        t = time.perf_counter()
        models = {g: ms[0].module for g, ms in groups.items()}
        tok = getattr(groups["base"][0].module, "tokenizer", None) or self.tokenizer
        res = run_adversarial(models, self.data, self.adversarial, base="base", tokenizer=tok, device=self.device,
                              progress=self.progress)
        timing["adversarial_s"] = time.perf_counter() - t
        from minidiff.metrics._checks import _jsonable
        res = _jsonable(res)
        if ctx.is_main:
            cache.save_json(f"adversarial/{key}.json", res)
        return res

    def _layer_swap(self, groups: dict[str, list[Member]], cache: StudyCache,
                    timing: dict[str, float]) -> dict[str, Any] | None:
        """The ``layer_swap`` section when ``[metrics.layer_swap]`` asks for it (None otherwise):
        each variant's first member against its base member, see :mod:`minidiff.study.swap`."""
        cfg = self.metrics.layer_swap
        if cfg is None:
            return None
        from minidiff.study.swap import run_layer_swap
        t = time.perf_counter()
        base = groups["base"]
        pairs = [(g, base[0], ms[0]) for g, ms in groups.items() if g != "base"]
        out = run_layer_swap(pairs, self.data, cfg, seed=self.seed, batch_size=self.batch_size, cache=cache,
                             progress=self.progress)
        timing["layer_swap_s"] = time.perf_counter() - t
        return out

    def _analyse(self, groups: dict[str, list[Member]], ev: Any, cka: dict[str, np.ndarray],
                 ood_emb: dict[str, torch.Tensor] | None, ood_reason: str, adv: dict[str, Any]) -> dict[str, Any]:
        names = {g: [m.name for m in ms] for g, ms in groups.items()}
        ds = self.data
        an = Analysis(groups=names, logits=ev.logits, embeddings=ev.embeddings, labels=ds.labels,
                      class_names=ds.class_names, cka_matrices=cka, layer_names=ev.layer_names,
                      ood_embeddings=ood_emb, ood_reason=ood_reason, metrics=self.metrics, seed=self.seed,
                      display=ds.display, data_kind=ds.kind, ids=ds.ids,
                      ood_name=self.ood.name if self.ood is not None else "", stats=ev)
        info = {}
        for g, ms in groups.items():
            info[g] = {**model_info(ms[0].module), "seeds": [m.seed for m in ms], **self.model_notes.get(g, {})}
            info[g].setdefault("recipe", "base model" if g == "base" else "given module")
        models = an.models(info)
        chars = self.metrics.characteristics
        res: dict[str, Any] = {
            "schema": SCHEMA,
            "study": {"name": self.name, "seed": self.seed, "minidiff_version": minidiff.__version__,
                      "population": len(self.base), "config": self.config, "token_mode": self.token_mode,
                      "data": {"name": ds.name, "kind": ds.kind, "num_eval": len(ds), "num_classes": ds.num_classes,
                               "class_names": ds.class_names, "has_labels": ds.labels is not None,
                               "meta": {k: v for k, v in ds.meta.items() if k != "topic_of_example"}},
                      "ood": None if self.ood is None else {"name": self.ood.name, "num_examples": len(self.ood)},
                      "notes": list(self.notes)},
            "variants": [g for g in groups if g != "base"],
            "thresholds": THRESHOLDS,
            "models": models,
            "prediction_errors": {}, "representation": {}, "distribution": {}, "verdicts": {},
            "adversarial": adv,
        }
        if ds.labels is None:
            res["study"]["notes"].append("The evaluation data has no labels: accuracy, flips, McNemar, calibration "
                                         "and per-class metrics are skipped (reasons in each section).")
        for var in res["variants"]:
            pe = an.prediction_errors(var) if "prediction_errors" in chars else {}
            rep = an.representation(var) if "representation" in chars else {}
            dist = an.distribution(var) if "distribution" in chars else {}
            res["prediction_errors"][var] = pe
            res["representation"][var] = rep
            res["distribution"][var] = dist
            res["verdicts"][var] = Analysis.verdicts(var, models, pe, rep, dist, adv) if (pe and dist) else {}
            if rep == {} or not rep.get("cka"):
                res["verdicts"][var].setdefault("representation", {"verdict": "not_measured", "summary": ""})
        return res


def build_study(cfg: Any, *, cache_dir: str | Path | None = None, progress: bool | None = None) -> Study:
    """Load the data and build every model of a study file (a path or a validated
    :class:`~minidiff.study.config.StudyConfig`); returns a ready :class:`Study`.
    The same as :meth:`Study.from_config`."""
    return Study.from_config(cfg, cache_dir=cache_dir, progress=progress)


def report_from_cache(cache_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Re-render report.html, results.json and the CSVs from a cache, running no model.

    Raises ValueError when the cache holds no completed study.
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise ValueError(f"cache folder {str(cache_dir)!r} does not exist")
    cache = StudyCache(cache_dir, read_only=True)
    res = cache.load_json("results.json")
    if res is None:
        raise ValueError(f"{str(cache_dir)!r} holds no completed study (no valid results.json); "
                         "run `minidiff run STUDY --out DIR` first (its cache is DIR/cache)")
    from minidiff.report.html import render
    write_output(out, res, render, overwrite=overwrite)
    return res
