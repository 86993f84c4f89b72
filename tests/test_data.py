"""Data loaders: embedded real data, file round trips, ExampleSet behaviour, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minidiff.data import (ExampleSet, encode_labels, from_torch_dataset, load_builtin, load_chatterbot, load_csv,
                           load_hf_disk, load_jsonl)


# -- embedded real data ---------------------------------------------------------------------------
def test_digits_real():
    from sklearn.datasets import load_digits

    d = load_builtin("digits")
    ref = load_digits()
    assert d.kind == "image" and tuple(d.inputs.shape) == (1797, 1, 8, 8)
    assert tuple(d.features().shape) == (1797, 64)
    assert d.num_classes == 10 and d.class_names == [str(i) for i in range(10)]
    assert d.labels.dtype == torch.int64 and torch.equal(d.labels, torch.from_numpy(ref.target))
    np.testing.assert_array_equal(d.features().numpy() * 16, ref.data.astype(np.float32))
    assert float(d.inputs.min()) == 0.0 and float(d.inputs.max()) == 1.0
    assert d.display(5).shape == (8, 8)
    assert len(set(d.ids)) == 1797 and d.ids[0] == "digits:0"


def test_mnist_sample_real():
    d = load_builtin("mnist-sample")
    assert tuple(d.inputs.shape) == (5000, 1, 28, 28) and d.num_classes == 10
    assert torch.equal(torch.bincount(d.labels), torch.full((10,), 500))
    assert 0.0 <= float(d.inputs.min()) and float(d.inputs.max()) == 1.0


def test_chatterbot_english_topics():
    d = load_builtin("chatterbot-en")
    assert d.kind == "text" and d.has_labels
    assert "ai" in d.class_names and "trivia" in d.class_names
    # health (9 lines) and history (16) fall under the default minimum of 20
    assert set(d.meta["dropped_topics"]) == {"health", "history"}
    counts = torch.bincount(d.labels, minlength=d.num_classes)
    assert int(counts.min()) >= 20
    # deduplicated, and no line carries two labels
    assert len(set(d.inputs)) == len(d.inputs)
    i = d.inputs.index("What is AI?")
    assert d.class_names[int(d.labels[i])] == "ai" and d.display(i) == "What is AI?"
    assert d.meta["topic_of_example"][i] == "ai" and d.ids[i].startswith("chatterbot-en:ai:")


def test_chatterbot_ood_and_held_out_topics():
    ood = load_builtin("chatterbot-ood")
    assert ood.labels is None and ood.num_classes == 0 and len(ood) > 100
    assert ood.meta["source"].endswith("german")
    es = load_builtin("chatterbot-ood", language="spanish")
    assert len(es) > 100 and es.meta["source"].endswith("spanish")
    held = load_chatterbot("english", topics=["food", "sports"], labelled=False, min_examples=1)
    assert set(held.meta["topic_of_example"]) == {"food", "sports"}
    rest = load_builtin("chatterbot-en", exclude_topics=["food", "sports"])
    assert "food" not in rest.class_names and not set(rest.inputs) & set(held.inputs)


def test_builtin_bad_names():
    with pytest.raises(ValueError, match="unknown built-in dataset 'nope'.*digits"):
        load_builtin("nope")
    with pytest.raises(ValueError, match="no language 'klingon'"):
        load_chatterbot("klingon")
    with pytest.raises(ValueError, match="unknown chatterbot english topic"):
        load_chatterbot("english", topics=["astrology"])


# -- ExampleSet -------------------------------------------------------------------------------------
def _text_set(n=40, classes=("neg", "pos")):
    return ExampleSet(name="t", kind="text", inputs=[f"s{i}" for i in range(n)],
                      labels=torch.arange(n) % len(classes), class_names=list(classes))


def test_split_deterministic_stratified_disjoint():
    d = load_builtin("digits")
    tr1, te1 = d.split(0.25, seed=3)
    tr2, te2 = d.split(0.25, seed=3)
    assert tr1.ids == tr2.ids and te1.ids == te2.ids
    assert not set(tr1.ids) & set(te1.ids) and len(tr1) + len(te1) == len(d)
    full = torch.bincount(d.labels, minlength=10)
    expect = torch.round(full.double() * 0.25).long()
    assert torch.equal(torch.bincount(te1.labels, minlength=10), expect)
    _, te3 = d.split(0.25, seed=4)
    assert te3.ids != te1.ids
    # order preserved, contents follow ids
    idx = [int(i.split(":")[1]) for i in te1.ids]
    assert idx == sorted(idx) and torch.equal(te1.inputs, d.inputs[idx])


def test_subset_keeps_ids_labels():
    s = _text_set()
    sub = s.subset([5, 2])
    assert sub.inputs == ["s5", "s2"] and sub.ids == ["t:5", "t:2"] and sub.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="subset indices"):
        s.subset([40])


def test_fingerprint_changes_with_content():
    a, b = _text_set(), _text_set()
    assert a.fingerprint() == b.fingerprint()
    b.inputs[0] = "changed"
    assert a.fingerprint() != b.fingerprint()


def test_exampleset_validation():
    with pytest.raises(ValueError, match="kind must be one of"):
        ExampleSet(name="x", kind="audio", inputs=["a"], labels=None, class_names=[])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ExampleSet(name="x", kind="text", inputs=["a", "b"], labels=torch.tensor([0, 2]), class_names=["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        ExampleSet(name="x", kind="tabular", inputs=torch.tensor([[float("nan")]]), labels=None, class_names=[])
    with pytest.raises(ValueError, match="4-D"):
        ExampleSet(name="x", kind="image", inputs=torch.zeros(3, 8, 8), labels=None, class_names=[])
    with pytest.raises(ValueError, match="labels must be integers"):
        ExampleSet(name="x", kind="text", inputs=["a"], labels=torch.tensor([0.5]), class_names=["a"])
    with pytest.raises(ValueError, match="not unique"):
        ExampleSet(name="x", kind="text", inputs=["a", "b"], labels=None, class_names=[], ids=["1", "1"])


def test_encode_labels():
    y, names = encode_labels(["pos", "neg", "pos", "neutral"], "t")
    assert names == ["neg", "neutral", "pos"] and y.tolist() == [2, 0, 2, 1]
    y, names = encode_labels(["10", "2", "0"], "t")  # digit strings are integers, not sorted text
    assert y.tolist() == [10, 2, 0] and len(names) == 11
    with pytest.raises(ValueError, match=">= 0"):
        encode_labels([-1, 2], "t")
    with pytest.raises(ValueError, match="no label"):
        encode_labels(["a", None], "t")
    with pytest.raises(ValueError, match=r"1 example\(s\) have no label \(first: row 1\)"):
        encode_labels(["a", " "], "t")


# -- files ------------------------------------------------------------------------------------------
ROWS = [{"sentence": "good film", "label": "pos", "uid": "a"}, {"sentence": "bad film", "label": "neg", "uid": "b"},
        {"sentence": "fine, I guess", "label": "pos", "uid": "c"}]


def test_csv_round_trip(tmp_path):
    import csv

    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["uid", "sentence", "label"])
        w.writeheader()
        w.writerows(ROWS)
    d = load_csv(path, text_column="sentence", label_column="label", id_column="uid")
    assert d.name == "reviews" and d.inputs == [r["sentence"] for r in ROWS]
    assert d.class_names == ["neg", "pos"] and d.labels.tolist() == [1, 0, 1] and d.ids == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"\['text'\] not found; available columns: \['uid', 'sentence', 'label'\]"):
        load_csv(path, text_column="text", label_column="label")
    unl = load_csv(path, text_column="sentence", label_column=None)
    assert unl.labels is None


def test_csv_tabular(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,y\n1.5,2,0\n3,4.25,1\n")
    d = load_csv(path, text_column=None, label_column="y", feature_columns=["a", "b"])
    assert d.kind == "tabular" and torch.equal(d.inputs, torch.tensor([[1.5, 2.0], [3.0, 4.25]]))
    assert d.labels.tolist() == [0, 1]


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    d = load_jsonl(path, text_column="sentence", label_column="label")
    assert d.inputs == [r["sentence"] for r in ROWS] and d.labels.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"\['target'\] not found.*'sentence'"):
        load_jsonl(path, text_column="sentence", label_column="target")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x", "label": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_jsonl(bad, text_column="sentence")


def test_hf_disk_round_trip(tmp_path):
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    ds = datasets.Dataset.from_dict({"text": ["meh", "great", "awful"], "label": [0, 1, 0]}, features=feats)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    d = load_hf_disk(tmp_path / "dd", split="train")
    assert d.inputs == ["meh", "great", "awful"] and d.labels.tolist() == [0, 1, 0]
    assert d.class_names == ["negative", "positive"]
    with pytest.raises(ValueError, match=r"holds splits \['train', 'test'\]"):
        load_hf_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match="split 'dev' not found"):
        load_hf_disk(tmp_path / "dd", split="dev")
    with pytest.raises(ValueError, match=r"\['sentence'\] not found; available columns: \['text', 'label'\]"):
        load_hf_disk(tmp_path / "dd", split="test", text_column="sentence")
    plain = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": ["y", "x"]})
    plain.save_to_disk(str(tmp_path / "single"))
    s = load_hf_disk(tmp_path / "single", text_column="sentence")
    assert s.class_names == ["x", "y"] and s.labels.tolist() == [1, 0]


def test_from_torch_dataset():
    xs = torch.rand(6, 1, 4, 4)
    ds = torch.utils.data.TensorDataset(xs, torch.tensor([0, 1, 2, 0, 1, 2]))
    d = from_torch_dataset(ds, name="toy", class_names=["a", "b", "c"])
    assert d.kind == "image" and torch.equal(d.inputs, xs) and d.class_names == ["a", "b", "c"]
    tab = from_torch_dataset([(torch.ones(3), 1), (torch.zeros(3), 0)])
    assert tab.kind == "tabular" and tab.labels.tolist() == [1, 0]
    txt = from_torch_dataset([{"text": "hi", "label": "greet"}, {"text": "bye", "label": "leave"}])
    assert txt.kind == "text" and txt.class_names == ["greet", "leave"]
    with pytest.raises(ValueError, match="only 1 of 2 items carry a label"):
        from_torch_dataset([(torch.ones(3), 1), (torch.zeros(3),)])


def test_from_torch_dataset_pil_images():
    from PIL import Image

    rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    d = from_torch_dataset([(Image.fromarray(rgb), 0), (Image.fromarray(rgb[::-1].copy()), 1)])
    assert tuple(d.inputs.shape) == (2, 3, 5, 6)
    torch.testing.assert_close(d.inputs[0], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert d.display(0).shape == (5, 6, 3)
    gray = from_torch_dataset([(Image.fromarray(rgb[..., 0]), 0)])
    assert tuple(gray.inputs.shape) == (1, 1, 5, 6)
