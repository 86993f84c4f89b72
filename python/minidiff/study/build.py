"""From a study file to a ready :class:`~minidiff.study.Study`: load the data, build
(train, compress, distil, load) every model, each built model cached.

Models minidiff builds are deterministic given the study seed and the member's
seed, and are cached under ``built/<key>`` where the key hashes the recipe, the
training data and the parent model's key, so a rerun (or ``minidiff report``)
does not train again. Text models get a classification head trained on their
own features (each compressed encoder gets its own head: Rai et al. 2024
fine-tune every model they compare).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.study.cache import StudyCache, hash_json, hash_module
from minidiff.study.config import (TOOLCHAIN_RECIPES, CNNModel, DataConfig, HubModel, MiniLMModel, MLPModel,
                                   PathModel, SourceModel, StudyConfig, VariantConfig, load_config)


def load_data(dc: DataConfig, what: str = "data") -> Any:
    """The ExampleSet a ``[data]``/``[ood]`` table names (ValueError naming the table on failure)."""
    from minidiff import data as md
    label = dc.label_column or None
    try:
        if dc.source == "builtin":
            return md.load_builtin(dc.name, **dc.options)
        if not Path(dc.path).exists():
            raise ValueError(f"{dc.path!r} does not exist")
        if dc.source == "csv":
            return md.load_csv(dc.path, text_column=dc.text_column, label_column=label, **dc.options)
        if dc.source == "jsonl":
            return md.load_jsonl(dc.path, text_column=dc.text_column, label_column=label, **dc.options)
        return md.load_hf_disk(dc.path, split=dc.split or None, text_column=dc.text_column, label_column=label,
                               **dc.options)
    except TypeError as e:
        raise ValueError(f"[{what}] options: {e}") from None
    except ValueError as e:
        raise ValueError(f"[{what}]: {e}") from None


def _resize(ds: Any, size: list[int], what: str) -> Any:
    if not size:
        return ds
    if ds.kind != "image":
        raise ValueError(f"[{what}] resize applies to image data; {ds.name!r} holds {ds.kind}")
    from minidiff.data import ExampleSet
    x = torch.nn.functional.interpolate(ds.inputs, size=tuple(size), mode="area").clamp(0.0, 1.0)
    return ExampleSet(name=ds.name, kind="image", inputs=x, labels=ds.labels, class_names=list(ds.class_names),
                      ids=list(ds.ids), meta={**ds.meta, "resized_to": list(size)})


def _limit(ds: Any, limit: int, seed: int) -> Any:
    if not limit or limit >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:limit].sort().values
    return ds.subset(idx)


def _needs_training(cfg: StudyConfig) -> bool:
    specs = [cfg.base] + [v.model for v in cfg.variants if v.model is not None]
    if any(isinstance(s, (MLPModel, CNNModel, MiniLMModel)) or (isinstance(s, HubModel) and s.head == "train")
           for s in specs):
        return True
    return any(v.recipe == "distill" or v.finetune_epochs > 0 for v in cfg.variants) or (
        isinstance(cfg.base, (MiniLMModel,)) or (isinstance(cfg.base, HubModel) and cfg.base.head == "train"))


class Builder:
    """Builds and caches the models of one study."""

    def __init__(self, cfg: StudyConfig, train: Any, eval_data: Any, cache: StudyCache, progress: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.eval = eval_data
        self.cache = cache
        self.progress = progress
        self.num_classes = eval_data.num_classes if eval_data.labels is not None else (
            train.num_classes if train is not None else 0)
        self.train_fp = train.fingerprint() if train is not None else "none"
        self._tokenized: dict[int, dict[str, torch.Tensor]] = {}
        self.built_fresh = 0

    # -- data as the trainer wants it -------------------------------------------------
    def _train_xy(self, tokenizer: Any = None, max_length: int = 64) -> tuple[Any, torch.Tensor]:
        if self.train is None or self.train.labels is None:
            raise ValueError("training a model needs labelled training data; the [data] set has no labels")
        if self.train.kind != "text":
            return self.train.inputs, self.train.labels
        key = id(tokenizer)
        if key not in self._tokenized:
            enc = tokenizer(list(self.train.inputs), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            self._tokenized[key] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return self._tokenized[key], self.train.labels

    def _cached(self, key: str, build: Any, tokenizer: Any = None) -> tuple[nn.Module, dict]:
        """Load ``built/<key>`` or build and store it (``minidiff.save_variant``: safetensors +
        manifest, its own SHA-256 check). A corrupt entry is reported and rebuilt.
        Tokenizers are not stored; the caller's is re-attached."""
        import warnings

        from minidiff.compress import Variant, load_variant, save_variant
        from minidiff.study.cache import CacheCorruptionWarning
        path = self.cache.root / "built" / key
        module = meta = None
        if (path / "manifest.json").exists():
            try:
                v = load_variant(path)
                module, meta = v.model, dict(v.manifest.get("study_meta", {}))
            except ValueError as e:
                warnings.warn(f"minidiff cache: built model {key} is unusable ({e}); rebuilding it",
                              CacheCorruptionWarning, stacklevel=2)
                self.cache.corrupt_entries.append(f"built/{key}")
                self.cache.remove_tree(f"built/{key}")
        if module is None:
            self.built_fresh += 1
            module, meta = build()
            tok = getattr(module, "tokenizer", None)
            if tok is not None:
                module.tokenizer = None
            try:
                save_variant(Variant(module, {"method": "study-build", "study_meta": meta}), path)
            finally:
                if tok is not None:
                    module.tokenizer = tok
        if hasattr(module, "tokenizer") and getattr(module, "tokenizer", None) is None:
            module.tokenizer = tokenizer
        return module.eval(), meta

    # -- text heads -----------------------------------------------------------------------
    @torch.no_grad()
    def _features(self, model: nn.Module, max_length: int, batch: int = 64) -> torch.Tensor:
        """Pooled encoder features of the training texts (what the head sees)."""
        x, _ = self._train_xy(model.tokenizer, max_length)
        outs = []
        feats: list[torch.Tensor] = []
        h = model.head.register_forward_pre_hook(lambda m, i: feats.append(i[0].detach()))
        try:
            model.eval()
            n = x["input_ids"].shape[0]
            for s in range(0, n, batch):
                model(input_ids=x["input_ids"][s:s + batch], attention_mask=x["attention_mask"][s:s + batch])
                outs.append(feats.pop())
        finally:
            h.remove()
        return torch.cat(outs)

    def _train_head(self, model: nn.Module, tc: Any, seed: int, max_length: int) -> dict:
        """Train ``model.head`` (a Linear) on the frozen model's pooled training features."""
        from minidiff.compress.training import seeded, train
        feats = self._features(model, max_length)
        head = model.head
        with seeded(seed):
            head.reset_parameters()
        res = train(head, (feats, self.train.labels), epochs=tc.epochs, lr=tc.lr, batch_size=tc.batch_size,
                    seed=seed, weight_decay=tc.weight_decay, progress=self.progress)
        return {"head_epochs": tc.epochs, "head_final_loss": res.losses[-1] if res.losses else None}

    # -- base and separate models ---------------------------------------------------------
    def model(self, spec: Any, seed: int) -> tuple[nn.Module, dict]:
        key = hash_json({"spec": spec.model_dump(mode="json"), "seed": seed, "train": self.train_fp,
                         "classes": self.num_classes, "study_seed": self.cfg.study.seed})[:32]
        if isinstance(spec, (MLPModel, CNNModel)):
            def build() -> tuple[nn.Module, dict]:
                from minidiff.compress.training import seeded, train
                from minidiff.models import make_cnn, make_mlp
                x, y = self._train_xy()
                with seeded(seed):
                    if isinstance(spec, MLPModel):
                        m = make_mlp(int(x[0].numel()), spec.hidden, self.num_classes)
                    else:
                        m = make_cnn(int(x.shape[1]), spec.channels, self.num_classes)
                res = train(m, (x, y), epochs=spec.train.epochs, lr=spec.train.lr, batch_size=spec.train.batch_size,
                            seed=seed, weight_decay=spec.train.weight_decay, progress=self.progress)
                return m, {"recipe": f"{spec.kind} trained {spec.train.epochs} epochs", "final_loss":
                           res.losses[-1] if res.losses else None}
            return self._cached(key, build)
        if isinstance(spec, MiniLMModel) or (isinstance(spec, HubModel) and spec.head == "train"):
            from minidiff.models import TextClassifier
            source = "minilm" if isinstance(spec, MiniLMModel) else spec.id
            tok_holder = TextClassifier.from_pretrained(source, num_classes=max(self.num_classes, 2),
                                                        pooling=spec.pooling, seed=seed)
            tokenizer = tok_holder.tokenizer
            hc = spec.head if isinstance(spec, MiniLMModel) else spec.train

            def build() -> tuple[nn.Module, dict]:
                m = tok_holder
                info = self._train_head(m, hc, seed, spec.max_length)
                name = "all-MiniLM-L6-v2" if isinstance(spec, MiniLMModel) else spec.id
                return m, {"recipe": f"{name} + head trained on its features", "head": "trained on its features",
                           **info}
            return self._cached(key, build, tokenizer)
        if isinstance(spec, HubModel):
            # pretrained classifiers live in the Hugging Face cache already: not copied into ours
            from minidiff.models import load_model
            lm = load_model(spec.id, task="sequence-classification")
            m = lm.model
            m.tokenizer = lm.tokenizer
            if m.tokenizer is None:
                raise ValueError(f"{spec.id!r} has no tokenizer files; minidiff cannot feed it text")
            return m.eval(), {"recipe": f"{spec.id} (pretrained classifier)", "head": "its own (from its checkpoint)"}
        if isinstance(spec, SourceModel):
            return self.source_model(spec)
        if isinstance(spec, PathModel):
            p = Path(spec.path)
            if not p.exists():
                raise ValueError(f"model path {spec.path!r} does not exist")
            if p.is_dir():
                from minidiff.compress import load_variant
                v = load_variant(p)
                m = v.model
                if getattr(m, "tokenizer", None) is None and v.tokenizer is not None:
                    m.tokenizer = v.tokenizer
                return m.eval(), {"recipe": f"loaded from {p.name}", **{k: v.manifest.get(k) for k in ("method",)}}
            obj = torch.load(p, weights_only=False, map_location="cpu")
            if not isinstance(obj, nn.Module):
                raise ValueError(f"{spec.path!r} holds a {type(obj).__name__}, not a whole nn.Module; save the "
                                 "module itself (torch.save(model, path)) or use minidiff.save_variant")
            return obj.eval(), {"recipe": f"loaded from {p.name}"}
        raise ValueError(f"unknown model kind {getattr(spec, 'kind', spec)!r}")

    def source_model(self, spec: SourceModel) -> tuple[nn.Module, dict]:
        """A model from another toolchain (:func:`minidiff.models.load_model`), not copied into
        the cache; its tool, version and runtime become the recipe the report shows."""
        from minidiff.models import load_model
        opts: dict[str, Any] = dict(spec.options)
        if spec.tokenizer:
            opts["tokenizer"] = spec.tokenizer
        if spec.runtime:
            opts["runtime"] = spec.runtime
        task = spec.task if spec.kind in ("hf", "gguf") else "features"
        if spec.kind in ("hf",) and spec.task == "sequence-classification" and self.num_classes:
            opts.setdefault("num_labels", max(self.num_classes, 2))
        try:
            lm = load_model(spec.id or spec.path, kind=spec.kind, task=task, **opts)
        except TypeError as e:
            raise ValueError(f"model kind {spec.kind!r}: bad option in 'options' ({e})") from None
        m = lm.model
        if getattr(m, "tokenizer", None) is None and lm.tokenizer is not None:
            m.tokenizer = lm.tokenizer
        prov = lm.provenance
        made = " ".join(str(x) for x in (prov.get("tool"), prov.get("version"), prov.get("method")) if x)
        recipe = f"{spec.kind} model {Path(spec.path).name or spec.id}" + (f", made by {made}" if made else "")
        return m, {"recipe": recipe, "head": "its own (from its checkpoint)", "runtime": lm.runtime,
                   "provenance": prov, "source_notes": list(lm.notes), "layer_map": dict(spec.layer_map)}

    # -- compressed variants ------------------------------------------------------------------
    def variant(self, vc: VariantConfig, parent: nn.Module, parent_meta: dict, seed: int) -> tuple[nn.Module, dict]:
        if vc.recipe == "model":
            return self.model(vc.model, seed)
        if vc.recipe in TOOLCHAIN_RECIPES:
            return self.toolchain_variant(vc, parent)
        from minidiff.compress import distill, prune, quantize
        is_text = hasattr(parent, "head") and hasattr(parent, "encoder")
        max_length = getattr(self.cfg.base, "max_length", 64)
        key = hash_json({"variant": vc.model_dump(mode="json", exclude={"name"}), "parent": hash_module(parent),
                         "seed": seed, "train": self.train_fp})[:32]
        tokenizer = getattr(parent, "tokenizer", None)

        def build() -> tuple[nn.Module, dict]:
            ft = None
            if vc.finetune_epochs > 0 and not is_text:
                ft = {"data": self._train_xy(), "epochs": vc.finetune_epochs, "lr": vc.train.lr,
                      "batch_size": vc.train.batch_size}
            if vc.recipe == "prune":
                v = prune(parent, sparsity=vc.sparsity, scope=vc.scope, finetune=ft, seed=seed)
                recipe = f"magnitude pruning, {int(round(100 * vc.sparsity))}% of weights ({vc.scope})"
            elif vc.recipe == "prune-2:4":
                v = prune(parent, structure="2:4", finetune=ft, seed=seed)
                recipe = "2:4 semi-structured magnitude pruning (50%)"
            elif vc.recipe == "int8":
                dynamic = vc.resolved_int8_mode() == "dynamic"
                v = quantize(parent, "int8" if dynamic else "int8-weight-only", seed=seed)
                recipe = "int8 per-channel weights" + (", per-token int8 activations" if dynamic else "")
            elif vc.recipe == "distill":
                st = dict(vc.student)
                kw: dict[str, Any] = {}
                if "layers" in st:
                    kw["num_layers"] = int(st.pop("layers"))
                if "hidden" in st:
                    kw["hidden"] = st.pop("hidden")
                if st:
                    raise ValueError(f"variant {vc.name!r}: unknown student keys {sorted(st)} (use layers or hidden)")
                data = self._train_xy(tokenizer, max_length) if is_text else self._train_xy()
                v = distill(parent, data, temperature=vc.temperature, epochs=vc.train.epochs, lr=vc.train.lr,
                            batch_size=vc.train.batch_size, seed=seed, **kw)
                layers = v.manifest.get("student_layers")
                recipe = f"knowledge distillation (T={vc.temperature})" + (f", student layers {layers}" if layers else "")
            else:  # pragma: no cover - config validation rules this out
                raise ValueError(f"unknown recipe {vc.recipe!r}")
            m = v.model
            info: dict[str, Any] = {"recipe": recipe}
            sp = (v.manifest.get("sparsity") or {}).get("overall")
            if sp is not None:
                info["achieved_sparsity"] = sp
            if is_text and vc.recipe != "distill":
                if getattr(m, "tokenizer", None) is None:
                    m.tokenizer = tokenizer
                hc = self.cfg.base.head if isinstance(self.cfg.base, MiniLMModel) else self.cfg.base.train
                info.update(self._train_head(m, hc, seed, max_length))
                info["recipe"] += "; head retrained on its own features"
                info["head"] = "trained on its own features"
            elif is_text:
                info["head"] = "its own (distilled with the student)"
            return m, info
        return self._cached(key, build, tokenizer)

    # -- variants made by other toolchains ------------------------------------------------------
    def toolchain_variant(self, vc: VariantConfig, parent: nn.Module) -> tuple[nn.Module, dict]:
        """The base quantized by another toolchain, head included (``recipe = "ort-int8"`` or
        ``"torchao-int8"``, see :data:`minidiff.study.config.TOOLCHAIN_RECIPES`).

        * ``ort-int8``: the base (encoder and head) exported with ``torch.onnx`` (TorchScript
          exporter, opset 17, dynamic batch and sequence axes), quantized with
          ``onnxruntime.quantization.quantize_dynamic`` (``QInt8`` weights; activations
          quantized per batch at run time) and loaded back with
          :func:`minidiff.models.load_model` (``kind="onnx"``): outputs come from the
          unmodified session, the base's layers (same module names) from a second one.
        * ``torchao-int8``: ``torchao.quantization.quantize_`` on a copy of the base, int8
          weight-only by default (``Int8WeightOnlyConfig``), int8 dynamic activations
          (``Int8DynamicActivationInt8WeightConfig``) with ``int8_mode = "dynamic"``.

        Every ``Linear`` is quantized, the head too, so the variant's head is the base's
        (the model notes say so); nothing is retrained. The artefact (the ``.onnx`` file,
        the torchao state dict) is cached under ``built/<key>``, where the key hashes the
        recipe, the tool and torch versions and the base's exact fingerprint
        (:func:`minidiff.models.fingerprint`); a base that cannot be fingerprinted exactly is
        rebuilt on every run, never cached.
        """
        from minidiff.models.fingerprint import UnhashableModelError
        from minidiff.models.sources._common import require, version_of
        purpose = f"recipe {vc.recipe!r} (variant {vc.name!r})"
        if vc.recipe == "ort-int8":
            require("onnxruntime", purpose)
            require("onnx", purpose)
            tool, mode = "onnxruntime", "dynamic"
        else:
            require("torchao", purpose)
            tool, mode = "torchao", vc.resolved_int8_mode()
        layers = self._base_layers(parent)
        try:
            key: str | None = hash_json({"toolchain": vc.recipe, "mode": mode, "tool": [tool, version_of(tool)],
                                         "torch": torch.__version__, "layers": layers,
                                         "parent": hash_module(parent)})[:32]
        except UnhashableModelError:
            key = None
        if vc.recipe == "ort-int8":
            return self._ort_int8(parent, key, layers)
        return self._torchao_int8(parent, key, mode)

    def _base_layers(self, parent: nn.Module) -> list[str]:
        from minidiff.study.capture import auto_layers
        cap = self.cfg.layers.capture
        return list(cap) if cap != "auto" else auto_layers(parent)

    def _export_example(self, parent: nn.Module) -> tuple[dict[str, Any], list[str], dict[str, dict[int, str]]]:
        """Two evaluation examples as ``torch.onnx.export`` keyword inputs, their names and
        dynamic axes (batch, and tokens for text)."""
        if self.eval.kind == "text":
            tok = getattr(parent, "tokenizer", None)
            if tok is None:
                raise ValueError("recipe 'ort-int8' exports a text model with example sentences, but the base has "
                                 "no .tokenizer")
            max_length = getattr(self.cfg.base, "max_length", 64)
            enc = tok(list(self.eval.inputs[:2]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            names = ["input_ids", "attention_mask"]
            return {n: enc[n] for n in names}, names, {n: {0: "batch", 1: "tokens"} for n in names}
        x = self.eval.inputs[:2]
        params = list(parent.parameters())
        if params and params[0].is_floating_point():
            x = x.to(params[0].dtype)
        return {"input": x}, ["input"], {"input": {0: "batch"}}

    def _export_ort_int8(self, parent: nn.Module, layers: list[str]) -> tuple[bytes, dict]:
        import logging
        import tempfile
        import warnings

        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from minidiff.models.sources._common import version_of
        from minidiff.models.sources.onnx import OnnxModule, graph_module_outputs
        kwargs, names, axes = self._export_example(parent)
        with tempfile.TemporaryDirectory(prefix="minidiff-ort-int8-") as d:
            f32, q8 = Path(d) / "model.onnx", Path(d) / "model-int8.onnx"
            parent.eval()
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # tracer warnings about data-dependent Python values
                    if kwargs.keys() == {"input"}:
                        torch.onnx.export(parent, (kwargs["input"],), str(f32), input_names=names,
                                          output_names=["logits"], dynamic_axes=axes, dynamo=False, opset_version=17)
                    else:
                        torch.onnx.export(parent, (), str(f32), kwargs=kwargs, input_names=names,
                                          output_names=["logits"], dynamic_axes=axes, dynamo=False, opset_version=17)
            except Exception as e:  # noqa: BLE001 - the exporter raises many types
                raise ValueError(f"recipe 'ort-int8': torch.onnx.export failed for {type(parent).__name__}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            # layer tensors are named on the float graph, whose nodes carry the torch module scopes;
            # onnxruntime's quantizer keeps the names of the float tensors it leaves in place
            outs, _ = graph_module_outputs(onnx.load(str(f32), load_external_data=False).graph)
            missing = [n for n in layers if n not in outs]
            if missing:
                raise ValueError(f"recipe 'ort-int8': the exported graph has no output for layer(s) {missing}; "
                                 f"module outputs found: {sorted(outs)[:12]}; set [layers] capture accordingly")
            layer_map = {n: outs[n] for n in layers}
            head = OnnxModule(f32, providers=["CPUExecutionProvider"], layers=layer_map, head_input=True).head_tensor
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint at WARNING
            try:
                quantize_dynamic(str(f32), str(q8), weight_type=QuantType.QInt8)
            finally:
                root.setLevel(level)
            data = q8.read_bytes()
        ver = version_of("onnxruntime")
        meta = {"recipe": f"ONNX Runtime {ver} dynamic int8 (quantize_dynamic, QInt8 weights, activations quantized "
                          f"per batch) of the base exported with torch.onnx (torch {torch.__version__}, opset 17)",
                "layers": layer_map, "head_input": head, "tool": "onnxruntime", "version": ver}
        return data, meta

    def _ort_int8(self, parent: nn.Module, key: str | None, layers: list[str]) -> tuple[nn.Module, dict]:
        import shutil
        import tempfile
        import weakref

        from minidiff.models import load_model
        data = meta = None
        if key is not None:
            meta = self.cache.load_json(f"built/{key}/meta.json")
            data = self.cache._read_checked(self.cache.root / "built" / key / "model-int8.onnx")
        if data is None or meta is None:
            self.built_fresh += 1
            data, meta = self._export_ort_int8(parent, layers)
            if key is not None:
                self.cache._write_checked(self.cache.root / "built" / key / "model-int8.onnx", data)
                self.cache.save_json(f"built/{key}/meta.json", meta)
        # the session reads layers lazily from the file: a private copy lives as long as the module
        # (the study's cache may be a temporary folder removed once the models are built)
        tmp = Path(tempfile.mkdtemp(prefix="minidiff-ort-int8-"))
        f = tmp / "model-int8.onnx"
        f.write_bytes(data)
        try:
            lm = load_model(f, kind="onnx", task="sequence-classification", layers=meta["layers"],
                            head_input=meta["head_input"] or False, tokenizer=getattr(parent, "tokenizer", None))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(lm.model, shutil.rmtree, str(tmp), True)
        prov = {**lm.provenance, "tool": "onnxruntime", "version": meta["version"], "exporter": "torch.onnx",
                "exporter_version": torch.__version__}
        notes = list(lm.notes) + ["dynamic int8 quantizes activations per batch, so its numbers depend on the "
                                  "study's batch_size"]
        head = "the base's (exported and quantized with the model)"
        return lm.model, {"recipe": f"{meta['recipe']}; head: {head}", "head": head,
                          "runtime": lm.runtime, "provenance": prov, "source_notes": notes}

    def _torchao_int8(self, parent: nn.Module, key: str | None, mode: str) -> tuple[nn.Module, dict]:
        import copy
        import io

        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        from minidiff.models import load_model
        from minidiff.models.sources._common import version_of
        tok = getattr(parent, "tokenizer", None)

        def base_copy() -> nn.Module:
            if tok is not None:
                parent.tokenizer = None  # not copied
            try:
                return copy.deepcopy(parent).eval()
            finally:
                if tok is not None:
                    parent.tokenizer = tok
        # the quantized state dict is cached (torchao's tensor classes load with weights_only=True,
        # no pickled code); torchao's modules themselves do not pickle
        path = None if key is None else self.cache.root / "built" / key / "torchao-state.pt"
        meta = None if key is None else self.cache.load_json(f"built/{key}/meta.json")
        data = None if path is None or meta is None else self.cache._read_checked(path)
        if data is not None:
            m = base_copy()
            m.load_state_dict(torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"), assign=True)
            for p in m.parameters():
                p.requires_grad_(False)
        else:
            self.built_fresh += 1
            m = base_copy()
            name = "Int8WeightOnlyConfig" if mode == "weight-only" else "Int8DynamicActivationInt8WeightConfig"
            quantize_(m, Int8WeightOnlyConfig() if mode == "weight-only" else Int8DynamicActivationInt8WeightConfig())
            what = "int8 weight-only" if mode == "weight-only" else "int8 weights, int8 activations per batch"
            meta = {"recipe": f"torchao {version_of('torchao')} {what} (quantize_ with {name}, every Linear)"}
            if path is not None:
                buf = io.BytesIO()
                torch.save(m.state_dict(), buf)
                self.cache._write_checked(path, buf.getvalue())
                self.cache.save_json(f"built/{key}/meta.json", meta)
        if tok is not None:
            m.tokenizer = tok
        lm = load_model(m, kind="torch")
        notes = [] if mode == "weight-only" else [
            "dynamic int8 quantizes activations per batch, so its numbers depend on the study's batch_size"]
        head = "the base's (quantized with the model)"
        return lm.model.eval(), {"recipe": f"{meta['recipe']}; head: {head}", "head": head,
                                 "runtime": lm.runtime, "provenance": lm.provenance, "source_notes": notes}


def build_parts(cfg: StudyConfig | str | Path, *, cache_dir: str | Path | None = None,
                progress: bool | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the data and build every model of a study file.

    Returns ``(kwargs, build_info)``: the keyword arguments of
    :class:`minidiff.study.Study` and what building took. ``Study.from_config``
    (or :func:`minidiff.study.build_study`) turns them into a ready study; this
    module never imports the study itself, so data flows one way.
    """
    if not isinstance(cfg, StudyConfig):
        cfg = load_config(cfg)
    t0 = time.perf_counter()
    seed = cfg.study.seed
    full = _resize(load_data(cfg.data, "data"), cfg.data.resize, "data")
    notes: list[str] = []
    if _needs_training(cfg):
        if full.labels is None:
            raise ValueError("[data] has no labels, but minidiff must train models on it (base kind "
                             f"{cfg.base.kind!r}); give labelled data or pretrained models (kind = hub/path)")
        if cfg.data.eval_fraction >= 1.0:
            raise ValueError("[data] eval_fraction = 1.0 leaves no examples to train on; use e.g. 0.5")
        train, ev = full.split(test_fraction=cfg.data.eval_fraction, seed=seed)
    else:
        train, ev = None, full
    ev = _limit(ev, cfg.data.limit, seed)
    if train is not None:
        train = _limit(train, cfg.data.train_limit, seed + 1)
    ood = None
    if cfg.ood is not None:
        ood = _limit(_resize(load_data(cfg.ood, "ood"), cfg.ood.resize, "ood"), cfg.ood.limit, seed)
    cache_root = Path(cache_dir) if cache_dir is not None else None
    tmp_cache = cache_root is None
    if tmp_cache:
        import tempfile
        cache_root = Path(tempfile.mkdtemp(prefix="minidiff-build-"))
    cache = StudyCache(cache_root)
    show = cfg.study.progress if progress is None else progress
    # under torchrun, rank 0 trains/compresses and caches; the other ranks then load from the cache
    from minidiff.distributed import DistContext
    ctx = DistContext.from_env()
    if ctx.is_distributed and not ctx.is_main:
        ctx.barrier()
        show = False
    b = Builder(cfg, train, ev, cache, show)
    seeds = cfg.base.seeds
    total = len(seeds) * (1 + len(cfg.variants))
    bar = tqdm(total=total, desc="building models", unit="model", disable=not show, leave=False)
    base, base_meta = [], []
    for s in seeds:
        m, meta = b.model(cfg.base, s)
        base.append(m)
        base_meta.append(meta)
        bar.update(1)
    variants: dict[str, list[nn.Module]] = {}
    _shown = ("recipe", "head", "achieved_sparsity", "runtime", "provenance", "source_notes", "layer_map")
    notes_by_group: dict[str, dict] = {"base": {k: v for k, v in base_meta[0].items() if k in _shown}}
    for vc in cfg.variants:
        mods = []
        meta = {}
        for i, s in enumerate(seeds):
            m, meta = b.variant(vc, base[i], base_meta[i], s)
            mods.append(m)
            bar.update(1)
        variants[vc.name] = mods
        notes_by_group[vc.name] = {k: v for k, v in meta.items() if k in _shown}
    bar.close()
    if ctx.is_distributed and ctx.is_main:
        ctx.barrier()
    if cache.corrupt_entries:  # rebuilt from scratch: the results must say so, not only stderr
        notes.append(f"{len(cache.corrupt_entries)} corrupt built model(s) in the cache failed their checksum "
                     "and were rebuilt: " + ", ".join(cache.corrupt_entries[:5]))
    tok = getattr(base[0], "tokenizer", None)
    max_length = getattr(cfg.base, "max_length", 128)
    kwargs = dict(base=base, variants=variants, data=ev, ood=ood, name=cfg.study.name, layers=cfg.layers.capture,
                  token_mode=cfg.layers.token_mode, metrics=cfg.metrics, adversarial=cfg.adversarial, seeds=seeds,
                  seed=seed, batch_size=cfg.study.batch_size, chunk_batches=cfg.study.chunk_batches,
                  device=cfg.study.device, cache_dir=None if tmp_cache else cache_root, progress=show,
                  tokenizer=tok, max_length=max_length, model_notes=notes_by_group, config=cfg.to_json(),
                  notes=notes)
    info = {"build_s": time.perf_counter() - t0, "built_fresh": b.built_fresh,
            "num_train": 0 if train is None else len(train)}
    if tmp_cache:
        import shutil
        shutil.rmtree(cache_root, ignore_errors=True)
    return kwargs, info
