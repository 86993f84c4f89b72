"""Study-level bad input: each case gets a clear error naming what is wrong and how to
fix it (regression tests for the hostile-input probe)."""

from __future__ import annotations

import copy

import pytest
import torch

from minidiff.data.examples import encode_labels
from minidiff.study.config import StudyFileError, parse_config

BASE = {"data": {"source": "builtin", "name": "digits"}, "base": {"kind": "mlp"},
        "variants": [{"name": "p", "recipe": "prune"}]}


def _cfg(mutate):
    d = copy.deepcopy(BASE)
    mutate(d)
    return parse_config(d)


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["base"].update(seeds=[]), ["base.seeds is empty", "seeds = [0]"]),
    (lambda d: d["base"].update(seeds=[1, 1]), ["repeats [1]"]),
    (lambda d: d["base"].update(seeds=[-2]), ["must be >= 0"]),
    (lambda d: d.update(study={"seed": -1}), ["study.seed", "greater than or equal to 0"]),
    (lambda d: d.update(metrics={"bootstrap": 0}), ["metrics.bootstrap", "100"]),
    (lambda d: d["variants"][0].update(name="x" * 300), ["300 characters", "at most 100"]),
    (lambda d: d.update(study={"device": "gpu0"}), ["study.device", "not a device name"]),
])
def test_config_errors_name_the_key(mutate, words):
    with pytest.raises(StudyFileError) as e:
        _cfg(mutate)
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "Traceback" not in msg and "\n" not in msg


def test_study_file_stays_valid_without_its_device():
    # a file written for a GPU machine parses here; the run checks the device
    cfg = _cfg(lambda d: d.update(study={"device": "cuda"}))
    assert cfg.study.device == "cuda"
    from minidiff.validation import check_device
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA device.*use 'cpu'"):
            check_device("cuda", "device")
    with pytest.raises(ValueError, match="meta"):
        check_device("meta")


@pytest.mark.parametrize("values, expect", [
    (["3", "3.0", "1"], ([3, 3, 1], 4)),         # 3 and "3.0" are one class, numeric order
    ([1.0, 2.0, 0], ([1, 2, 0], 3)),
    (["b", "a", "b"], ([1, 0, 1], 2)),
])
def test_labels_encode_as_classes(values, expect):
    y, names = encode_labels(values, "t")
    assert y.tolist() == expect[0] and len(names) == expect[1]


@pytest.mark.parametrize("values, words", [
    (["-1", "2"], ["must be >= 0", "'-1'"]),
    ([0, 3_000_000, 2], ["3000001-class", "Remap them to 0..2"]),
    (["2.5", "1"], ["not whole numbers"]),
    ([None, 1], ["have no label"]),
])
def test_bad_labels_are_refused(values, words):
    with pytest.raises(ValueError) as e:
        encode_labels(values, "labels.csv column 'label'")
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_diverging_training_says_so():
    from minidiff.compress.training import train
    from minidiff.models import make_mlp
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 16, generator=g)
    y = (x[:, 0] * 4).long().clamp(max=3)
    with pytest.raises(ValueError, match="training diverged.*lower the learning rate"):
        train(make_mlp(16, [32], 4), (x, y), epochs=5, lr=50.0, seed=0)
    r = train(make_mlp(16, [32], 4), (x, y), epochs=5, lr=1e-2, seed=0)  # a sane rate trains
    assert r.losses[-1] < r.losses[0]


def test_check_refuses_a_folder_and_mismatched_kinds(tmp_path):
    from minidiff.study.check import check_study
    with pytest.raises(StudyFileError, match="is a folder"):
        check_study(tmp_path)
    f = tmp_path / "s.toml"
    f.write_text('[data]\nsource = "builtin"\nname = "chatterbot-en"\n[base]\nkind = "mlp"\n'
                 '[[variants]]\nname = "p"\nrecipe = "prune"\n')
    with pytest.raises(StudyFileError, match="reads tensors, but \\[data\\] holds text"):
        check_study(f)
    model = tmp_path / "notes.txt"
    model.write_text("not a model")
    f.write_text('[data]\nsource = "builtin"\nname = "digits"\n[base]\nkind = "mlp"\n'
                 f'[[variants]]\nname = "p"\nrecipe = "model"\nmodel = {{kind = "torch", path = "{model}"}}\n')
    with pytest.raises(StudyFileError, match="text file, not a saved model"):
        check_study(f)
    f.write_text('[data]\nsource = "builtin"\nname = "digits"\n[base]\nkind = "mlp"\n'
                 '[[variants]]\nname = "p"\nrecipe = "prune"\n')
    done = check_study(f)
    assert any("digits" in line and "10 classes" in line for line in done)


def test_report_on_a_corrupt_cache_says_so_and_keeps_the_file(tmp_path):
    from minidiff.study.cache import StudyCache
    from minidiff.study.study import report_from_cache
    cache = StudyCache(tmp_path / "cache")
    cache.save_json("results.json", {"schema": "minidiff.results/2"})
    f = tmp_path / "cache" / "results.json"
    f.write_bytes(f.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="corrupt.*Run the study again"):
        report_from_cache(tmp_path / "cache", tmp_path / "out")
    assert f.exists()  # a read-only command deletes nothing
    from minidiff.cli import main
    assert main(["report", "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "out")]) == 2


def test_a_rebuilt_corrupt_model_is_noted_in_the_results(tmp_path):
    from minidiff.study.build import build_parts
    cfg = parse_config({"data": {"source": "builtin", "name": "digits", "limit": 200},
                        "base": {"kind": "mlp", "hidden": [16], "train": {"epochs": 1}},
                        "variants": [{"name": "p", "recipe": "prune"}]})
    kwargs, _ = build_parts(cfg, cache_dir=tmp_path, progress=False)
    assert not kwargs["notes"]
    weights = sorted((tmp_path / "built").glob("*/model.safetensors"))
    assert weights
    data = bytearray(weights[0].read_bytes())
    data[-1] ^= 0xFF
    weights[0].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding"):
        kwargs, _ = build_parts(cfg, cache_dir=tmp_path, progress=False)
    assert any("corrupt built model" in n and "rebuilt" in n for n in kwargs["notes"]), kwargs["notes"]


def test_rbf_threshold_accepts_any_real_scalar():
    import numpy as np

    import minidiff
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g)
    y = x + 0.1 * torch.randn(40, 5, dtype=torch.float64, generator=g)
    ref = minidiff.cka(x, y, kernel="rbf", threshold=0.5)
    assert minidiff.cka(x, y, kernel="rbf", threshold=np.float32(0.5)) == ref
    assert minidiff.cka(x, y, kernel="rbf", threshold=torch.tensor(0.5)) == ref
    with pytest.raises(ValueError, match="threshold"):
        minidiff.cka(x, y, kernel="rbf", threshold=0.0)


def test_check_names_the_package_a_toolchain_recipe_needs(tmp_path, monkeypatch):
    import minidiff.study.check as check
    f = tmp_path / "s.toml"
    f.write_text('[data]\nsource = "builtin"\nname = "digits"\n[base]\nkind = "mlp"\n'
                 '[[variants]]\nname = "o"\nrecipe = "ort-int8"\n')
    assert any("ort-int8" in line for line in check.check_study(f))
    monkeypatch.setitem(check._RECIPE_PACKAGES, "ort-int8", ("no_such_package_xyz",))
    with pytest.raises(StudyFileError, match="pip install no_such_package_xyz"):
        check.check_study(f)


def test_an_ood_set_of_another_shape_is_refused_before_running(tmp_path):
    from minidiff import Study
    from minidiff.data import ExampleSet
    from minidiff.models import make_mlp
    from minidiff.study.check import check_study
    g = torch.Generator().manual_seed(0)
    data = ExampleSet("d", "tabular", torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g),
                      ["a", "b", "c"])
    ood = ExampleSet("o", "tabular", torch.randn(20, 7, generator=g), None, None)  # no labels, no class names
    assert ood.class_names == []
    with pytest.raises(ValueError, match=r"OOD set 'o' has examples of shape \(7,\).*'d' has \(10,\)"):
        Study(make_mlp(10, [8], 3), {"v": make_mlp(10, [8], 3)}, data, ood=ood, progress=False)
    csv = tmp_path / "ood.csv"
    csv.write_text("a,b,c\n" + "\n".join("1,2,3" for _ in range(8)) + "\n")
    train = tmp_path / "data.csv"
    train.write_text("a,b,c,d,label\n" + "\n".join(f"1,2,3,{i},{i % 2}" for i in range(16)) + "\n")
    f = tmp_path / "s.toml"
    f.write_text(f'[data]\nsource = "csv"\npath = "{train}"\noptions = {{feature_columns = ["a", "b", "c", "d"]}}\n'
                 f'[ood]\nsource = "csv"\npath = "{csv}"\nlabel_column = ""\n'
                 'options = {feature_columns = ["a", "b", "c"]}\n[base]\nkind = "mlp"\n'
                 '[[variants]]\nname = "p"\nrecipe = "prune"\n')
    with pytest.raises(StudyFileError, match=r"\[ood\] examples have shape \(3,\) but \[data\] examples have \(4,\)"):
        check_study(f)


_FULL_DISK = r'''
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
from minidiff.study.build import build_parts
from minidiff.study.config import parse_config
cfg = parse_config({"data": {"source": "builtin", "name": "digits", "limit": 200},
                    "base": {"kind": "mlp", "hidden": [64], "train": {"epochs": 1}},
                    "variants": [{"name": "p", "recipe": "prune"}]})
try:
    build_parts(cfg, cache_dir=sys.argv[1], progress=False)
except OSError as e:
    print("ERRNO", e.errno, type(e).__name__, e)
'''


def test_a_failed_write_of_a_built_model_says_why_and_leaves_nothing(tmp_path):
    # a real I/O failure inside safetensors' writer (a file-size limit stands in for a full
    # disk: the writer gets EFBIG where it would get ENOSPC)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERRNO 27 ModelWriteError" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "could not save the model to" in r.stdout and "File too large" in r.stdout
    assert "free disk space" in r.stdout and "SafetensorError" not in r.stdout
    built = tmp_path / "built"
    assert not built.exists() or not [p for p in built.iterdir() if (p / "model.safetensors").exists()]
    assert not built.exists() or not [p for p in built.iterdir() if p.name.startswith(".")]


def test_a_hub_base_with_a_trained_head_takes_compression_recipes(tmp_path):
    # was: AttributeError: 'str' object has no attribute 'epochs' (the hub spec's `head` is a
    # string; its training settings live in `train`)
    from minidiff.models.loading import embedded_minilm_dir
    from minidiff.study.build import build_parts
    cfg = parse_config({"data": {"source": "builtin", "name": "chatterbot-en", "limit": 40, "train_limit": 48},
                        "base": {"kind": "hub", "id": str(embedded_minilm_dir()), "head": "train",
                                 "max_length": 16, "train": {"epochs": 2}},
                        "variants": [{"name": "p", "recipe": "prune", "finetune_epochs": 1}]})
    kwargs, _ = build_parts(cfg, cache_dir=tmp_path, progress=False)
    notes = kwargs["model_notes"]
    assert notes["base"]["head"] == "trained on its features"
    assert notes["p"]["head"] == "trained on its own features" and notes["p"]["achieved_sparsity"] == 0.5
    data = kwargs["data"]
    (base,), (var,) = kwargs["base"], kwargs["variants"]["p"]
    enc = base.tokenizer(list(data.inputs[:4]), padding=True, return_tensors="pt")
    with torch.no_grad():
        out_b, out_v = base(**enc), var(**enc)
    assert out_b.shape == out_v.shape == (4, data.num_classes)
    assert not torch.equal(out_b, out_v)


def test_check_reads_a_language_model_study_without_running_a_model(tmp_path):
    from minidiff.cli import main
    from minidiff.lm.config import check_lm_study, parse_lm_config
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 50)
    good = {"study": {"task": "causal-lm"}, "data": {"source": "text", "path": str(text), "n_ctx": 32},
            "base": {"kind": "tinylm"}, "variants": [{"name": "q", "recipe": "int8"}],
            "metrics": {"layer_swap": True}}
    done = check_lm_study(parse_lm_config(good))
    assert any("950 characters" in line for line in done) and any("layer_swap" in line for line in done)

    def bad(mutate, words):
        d = copy.deepcopy(good)
        mutate(d)
        with pytest.raises(StudyFileError) as e:
            check_lm_study(parse_lm_config(d))
        assert all(w in str(e.value) for w in words), str(e.value)

    bad(lambda d: d["data"].update(path=str(tmp_path / "missing.txt")), ["[data]", "does not exist"])
    (tmp_path / "empty.txt").write_text("  \n")
    bad(lambda d: d["data"].update(path=str(tmp_path / "empty.txt")), ["[data]", "is empty"])
    bad(lambda d: d.update(base={"kind": "path", "path": str(tmp_path / "nope")}), ["base:", "does not exist"])
    folder = tmp_path / "m"
    folder.mkdir()
    bad(lambda d: d.update(base={"kind": "path", "path": str(folder)}), ["no config.json"])
    (folder / "config.json").write_text("{}")
    bad(lambda d: d["variants"].append({"name": "other", "recipe": "model", "path": str(folder)}),
        ["variants[other]", "no tokenizer files"])
    bad(lambda d: d["study"].update(device="cuda:7"), ["study.device"])
    f = tmp_path / "lm.toml"
    f.write_text(f'[study]\ntask = "causal-lm"\n[data]\nsource = "text"\npath = "{tmp_path / "missing.txt"}"\n'
                 '[base]\nkind = "tinylm"\n[[variants]]\nname = "q"\nrecipe = "int8"\n')
    assert main(["check", str(f)]) == 2
