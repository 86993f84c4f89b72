"""Loaders for a user's own data: CSV, JSON Lines, Hugging Face ``datasets`` saved
to disk, and any map-style torch Dataset. Each returns an :class:`ExampleSet`.

Text data names a text column and (optionally) a label column; tabular data may
name ``feature_columns`` instead of a text column. A column that is not there is a
ValueError naming it and listing the columns that are. String labels become ints
indexed by the sorted class names (see :func:`encode_labels`).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .examples import ExampleSet, encode_labels


def _check_columns(source: str, available: Sequence[str], wanted: Sequence[str | None]) -> None:
    missing = [c for c in wanted if c is not None and c not in available]
    if missing:
        raise ValueError(f"{source}: column(s) {missing} not found; available columns: {list(available)}")


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def _from_rows(rows: list[Mapping[str, Any]], columns: Sequence[str], source: str, name: str,
               text_column: str | None, label_column: str | None,
               feature_columns: Sequence[str] | None, id_column: str | None) -> ExampleSet:
    if feature_columns is None and text_column is None:
        raise ValueError(f"{source}: name a text_column (text data) or feature_columns (tabular data)")
    _check_columns(source, columns, [text_column if feature_columns is None else None, label_column,
                                     id_column, *(feature_columns or [])])
    if not rows:
        raise ValueError(f"{source}: no rows")
    ids = [str(r[id_column]) for r in rows] if id_column else [f"{name}:{i}" for i in range(len(rows))]
    labels, class_names = (None, [])
    if label_column is not None:
        labels, class_names = encode_labels([r[label_column] for r in rows], f"{source} column {label_column!r}")
    meta = {"source": source, "text_column": text_column, "label_column": label_column}
    if feature_columns is not None:
        try:
            x = np.array([[float(r[c]) for c in feature_columns] for r in rows], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: feature_columns must hold numbers ({exc})") from exc
        return ExampleSet(name=name, kind="tabular", inputs=torch.from_numpy(x), labels=labels,
                          class_names=class_names, ids=ids, meta={**meta, "feature_columns": list(feature_columns)})
    texts = []
    for i, r in enumerate(rows):
        v = r[text_column]
        if not isinstance(v, str):
            raise ValueError(f"{source}: row {i} of column {text_column!r} is {type(v).__name__}, not text")
        texts.append(v)
    return ExampleSet(name=name, kind="text", inputs=texts, labels=labels, class_names=class_names,
                      ids=ids, meta=meta)


def load_csv(path: str | os.PathLike, text_column: str | None = "text", label_column: str | None = "label",
             *, feature_columns: Sequence[str] | None = None, id_column: str | None = None,
             name: str | None = None, delimiter: str = ",") -> ExampleSet:
    """Read a CSV file with a header row.

    Parameters
    ----------
    path : path of the file (UTF-8, optional BOM).
    text_column : column holding the text (ignored when ``feature_columns`` is given).
    label_column : column holding the label, or None for unlabelled data.
    feature_columns : numeric columns for tabular data, in order.
    id_column : column holding stable example ids (default: ``"<name>:<row>"``).
    """
    path = os.fspath(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    return _from_rows(rows, columns, path, name or _stem(path), text_column, label_column, feature_columns, id_column)


def load_jsonl(path: str | os.PathLike, text_column: str | None = "text", label_column: str | None = "label",
               *, feature_columns: Sequence[str] | None = None, id_column: str | None = None,
               name: str | None = None) -> ExampleSet:
    """Read a JSON Lines file: one JSON object per non-empty line (same columns as :func:`load_csv`)."""
    path = os.fspath(path)
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, expected an object")
            rows.append(obj)
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    wanted = [text_column if feature_columns is None else None, label_column, id_column, *(feature_columns or [])]
    _check_columns(path, columns, wanted)
    for i, r in enumerate(rows):
        absent = [c for c in wanted if c is not None and c not in r]
        if absent:
            raise ValueError(f"{path}: object {i + 1} lacks key(s) {absent}")
    return _from_rows(rows, columns, path, name or _stem(path), text_column, label_column, feature_columns, id_column)


def load_hf_disk(path: str | os.PathLike, split: str | None = None, text_column: str | None = "text",
                 label_column: str | None = "label", *, feature_columns: Sequence[str] | None = None,
                 id_column: str | None = None, name: str | None = None) -> ExampleSet:
    """Load a Hugging Face dataset saved with ``save_to_disk`` (``datasets.load_from_disk``).

    A ``DatasetDict`` needs ``split`` unless it has exactly one split. A ``ClassLabel``
    label column keeps its own class names; other label columns are encoded as in
    :func:`encode_labels`.
    """
    import datasets

    path = os.fspath(path)
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: not a dataset saved with save_to_disk ({exc})") from exc
    source = path
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"{path} holds splits {splits}; pass split=...")
            split = splits[0]
        if split not in ds:
            raise ValueError(f"{path}: split {split!r} not found; available splits: {splits}")
        ds = ds[split]
        source = f"{path}[{split}]"
    elif split is not None and split != str(ds.split):
        raise ValueError(f"{path} is a single dataset (split {ds.split}); it has no split {split!r}")
    columns = list(ds.column_names)
    _check_columns(source, columns, [text_column if feature_columns is None else None, label_column,
                                     id_column, *(feature_columns or [])])
    label_feature = ds.features.get(label_column) if label_column else None
    keep = [c for c in [text_column if feature_columns is None else None, label_column, id_column,
                        *(feature_columns or [])] if c is not None]
    table = ds.select_columns(keep).to_dict()
    rows = [dict(zip(table, vals)) for vals in zip(*table.values())]
    out = _from_rows(rows, columns, source, name or _stem(path) + (f"-{split}" if split else ""),
                     text_column, label_column, feature_columns, id_column)
    if isinstance(label_feature, datasets.ClassLabel) and out.labels is not None:
        raw = torch.tensor(table[label_column], dtype=torch.int64)
        if int(raw.min()) < 0:
            raise ValueError(f"{source}: label column {label_column!r} has -1 (unlabelled) entries; "
                             "use a labelled split or label_column=None")
        out = ExampleSet(name=out.name, kind=out.kind, inputs=out.inputs, labels=raw,
                         class_names=list(label_feature.names), ids=out.ids, meta=out.meta)
    return out


def from_torch_dataset(ds: Any, name: str = "torch-dataset", class_names: Sequence[str] | None = None,
                       kind: str | None = None) -> ExampleSet:
    """Materialize a map-style torch Dataset whose items are ``(input, label)``, ``input``
    alone, or a dict with ``"input"``/``"text"`` and ``"label"`` keys.

    Inputs that are strings give a text set; tensors/arrays of shape ``(C, H, W)`` or
    ``(H, W)`` (or PIL images) an image set (unless ``kind="tabular"``), ``(F,)`` a
    tabular set. uint8 pixels are scaled to [0, 1]; other values are kept as they are.
    Class names come from ``class_names``, else ``ds.classes``, else ``range(max + 1)``.
    """
    try:
        n = len(ds)
    except TypeError as exc:
        raise ValueError("from_torch_dataset needs a map-style dataset with __len__") from exc
    if n == 0:
        raise ValueError(f"{name}: the dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if isinstance(item, Mapping):
            key = next((k for k in ("input", "text", "x", "image") if k in item), None)
            if key is None:
                raise ValueError(f"{name}: item {i} is a dict without an 'input'/'text'/'x'/'image' key; "
                                 f"keys: {list(item)}")
            x, y = item[key], item.get("label")
        elif isinstance(item, (tuple, list)):
            if len(item) not in (1, 2):
                raise ValueError(f"{name}: item {i} has {len(item)} fields; expected (input, label)")
            x, y = item[0], (item[1] if len(item) == 2 else None)
        else:
            x, y = item, None
        xs.append(x)
        ys.append(y.item() if isinstance(y, torch.Tensor) else y)
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise ValueError(f"{name}: only {sum(labelled)} of {n} items carry a label")
    labels, names = (None, [])
    if all(labelled):
        labels, names = encode_labels(ys, name)
        given = list(class_names) if class_names is not None else list(getattr(ds, "classes", []) or [])
        if given:
            if int(labels.max()) >= len(given):
                raise ValueError(f"{name}: label {int(labels.max())} has no class name (got {len(given)} names)")
            names = [str(c) for c in given]
    if all(isinstance(x, str) for x in xs):
        return ExampleSet(name=name, kind="text", inputs=xs, labels=labels, class_names=names)
    try:
        x = torch.stack([v.detach().cpu() if isinstance(v, torch.Tensor)
                         else torch.from_numpy(np.array(v)) for v in xs])  # np.array copies: PIL, lists, arrays
    except Exception as exc:
        raise ValueError(f"{name}: inputs must all be strings or equally shaped arrays ({exc})") from exc
    is_pil = type(xs[0]).__module__.startswith("PIL")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0  # 8-bit pixels -> [0, 1]
    x = x.float()
    if kind is None:
        kind = "tabular" if x.ndim == 2 else "image"
    if kind == "image" and is_pil and x.ndim == 4:
        x = x.permute(0, 3, 1, 2).contiguous()  # colour PIL images are (H, W, C)
    if kind == "image" and x.ndim == 3:
        x = x.unsqueeze(1)
    if kind == "tabular" and x.ndim != 2:
        x = x.reshape(n, -1)
    return ExampleSet(name=name, kind=kind, inputs=x, labels=labels, class_names=names)
