"""ExampleSet: the one data container every loader returns and the study reads.

A study runs every model over the same examples in the same order, so an
ExampleSet is an ordered, immutable-by-convention collection of inputs with
optional integer labels, class names and stable ids. It knows nothing of models.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

Kind = Literal["text", "image", "tabular"]
KINDS: tuple[str, ...] = ("text", "image", "tabular")


@dataclass
class ExampleSet:
    """An ordered set of examples.

    Attributes
    ----------
    name : str
        Human-readable name (``"digits"``, ``"chatterbot-en"``, a file stem).
    kind : {"text", "image", "tabular"}
        ``"text"``: ``inputs`` is a ``list[str]``.
        ``"image"``: ``inputs`` is a float32 tensor ``(M, C, H, W)`` with values in [0, 1].
        ``"tabular"``: ``inputs`` is a float32 tensor ``(M, F)``.
    inputs : list[str] or torch.Tensor
        The examples, ``M`` of them.
    labels : torch.Tensor or None
        int64 tensor ``(M,)`` with values in ``[0, num_classes)``, or ``None`` for
        unlabelled data (e.g. an out-of-distribution set); metrics that need labels
        then report themselves as skipped.
    class_names : list[str]
        Name of each class index; ``num_classes = len(class_names)``. Empty when
        ``labels`` is None and the classes are unknown.
    ids : list[str]
        Stable, unique example ids (e.g. ``"digits:17"``, ``"chatterbot-en:ai:3"``);
        kept through ``subset``/``split`` so PIE listings point at the source row.
    meta : dict
        Provenance and notes (source path, dropped classes and why, preprocessing).
    """

    name: str
    kind: Kind
    inputs: list[str] | torch.Tensor
    labels: torch.Tensor | None
    class_names: list[str] | None
    ids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ExampleSet kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "text":
            if isinstance(self.inputs, torch.Tensor) or not all(isinstance(s, str) for s in self.inputs):
                raise ValueError(f"ExampleSet {self.name!r}: text inputs must be a list of str")
            self.inputs = list(self.inputs)
        else:
            if not isinstance(self.inputs, torch.Tensor):
                self.inputs = torch.as_tensor(np.asarray(self.inputs))
            if not self.inputs.is_floating_point():
                self.inputs = self.inputs.float()
            want = 4 if self.kind == "image" else 2
            shape = "(M, C, H, W)" if self.kind == "image" else "(M, F)"
            if self.inputs.ndim != want:
                raise ValueError(f"ExampleSet {self.name!r}: {self.kind} inputs must be {want}-D {shape}, "
                                 f"got shape {tuple(self.inputs.shape)}")
            bad = int((~torch.isfinite(self.inputs)).sum())
            if bad:
                raise ValueError(f"ExampleSet {self.name!r}: inputs contain {bad} NaN/Inf value(s)")
        m = len(self.inputs)
        if not self.ids:
            self.ids = [f"{self.name}:{i}" for i in range(m)]
        self.ids = [str(i) for i in self.ids]
        if len(self.ids) != m:
            raise ValueError(f"ExampleSet {self.name!r}: {len(self.ids)} ids for {m} examples")
        if len(set(self.ids)) != m:
            raise ValueError(f"ExampleSet {self.name!r}: example ids are not unique")
        self.class_names = [] if self.class_names is None else [str(c) for c in self.class_names]
        if self.labels is not None:
            labels = torch.as_tensor(self.labels)
            if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
                raise ValueError(f"ExampleSet {self.name!r}: labels must be integers, got {labels.dtype}")
            labels = labels.to(torch.int64)
            if labels.ndim != 1 or labels.shape[0] != m:
                raise ValueError(f"ExampleSet {self.name!r}: labels must have shape ({m},), "
                                 f"got {tuple(labels.shape)}")
            if m and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
                raise ValueError(f"ExampleSet {self.name!r}: labels must lie in [0, {len(self.class_names)}) "
                                 f"(one per class name); got range [{int(labels.min())}, {int(labels.max())}]")
            self.labels = labels

    # -- basic access ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def features(self) -> torch.Tensor:
        """Image/tabular inputs flattened to ``(M, F)`` (a view when possible)."""
        if self.kind == "text":
            raise ValueError(f"ExampleSet {self.name!r} holds text; it has no numeric features")
        return self.inputs.reshape(len(self), -1)

    def display(self, i: int) -> str | np.ndarray:
        """What the report shows for example ``i``.

        Text: the string. Image: a float array in [0, 1], ``(H, W)`` for one channel,
        ``(H, W, C)`` otherwise. Tabular: a short ``name=value`` string.
        """
        if self.kind == "text":
            return self.inputs[i]
        x = self.inputs[i].detach().cpu().numpy()
        if self.kind == "image":
            return x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
        return ", ".join(f"x{j}={v:.4g}" for j, v in enumerate(x[:16])) + (" ..." if x.shape[0] > 16 else "")

    # -- selection -------------------------------------------------------------
    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray, name: str | None = None) -> "ExampleSet":
        """The examples at ``indices`` (in that order), ids and labels kept."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64)).reshape(-1)
        m = len(self)
        if idx.numel() and (int(idx.min()) < -m or int(idx.max()) >= m):
            raise ValueError(f"subset indices must lie in [0, {m}) for {self.name!r}")
        idx = torch.where(idx < 0, idx + m, idx)
        il = idx.tolist()
        inputs = [self.inputs[i] for i in il] if self.kind == "text" else self.inputs[idx]
        return ExampleSet(name=name or self.name, kind=self.kind, inputs=inputs,
                          labels=None if self.labels is None else self.labels[idx],
                          class_names=list(self.class_names), ids=[self.ids[i] for i in il],
                          meta=dict(self.meta))

    def split(self, test_fraction: float = 0.25, seed: int = 0,
              stratify: bool = True) -> tuple["ExampleSet", "ExampleSet"]:
        """Deterministic train/test split.

        Parameters
        ----------
        test_fraction : float in (0, 1)
            Share of examples in the test part (``round(test_fraction * M_c)`` per class
            when stratified, at least one per class with two or more examples).
        seed : int
            Seed of the permutation (``torch.Generator``); same seed, same split.
        stratify : bool
            Split each class separately (when labels exist) so class shares are kept.

        Returns
        -------
        (train, test) : tuple of ExampleSet, named ``"<name>/train"`` and ``"<name>/test"``,
        each keeping the original order of its examples.
        """
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        m = len(self)
        if m < 2:
            raise ValueError(f"cannot split {self.name!r}: it has {m} example(s)")
        g = torch.Generator().manual_seed(int(seed))
        if stratify and self.labels is not None:
            test_parts = []
            for c in range(self.num_classes):
                members = torch.nonzero(self.labels == c).reshape(-1)
                n_c = members.numel()
                if n_c == 0:
                    continue
                k = int(round(test_fraction * n_c))
                if n_c >= 2:
                    k = min(max(k, 1), n_c - 1)
                perm = torch.randperm(n_c, generator=g)
                test_parts.append(members[perm[:k]])
            test_idx = torch.cat(test_parts) if test_parts else torch.empty(0, dtype=torch.int64)
        else:
            k = min(max(int(round(test_fraction * m)), 1), m - 1)
            test_idx = torch.randperm(m, generator=g)[:k]
        is_test = torch.zeros(m, dtype=torch.bool)
        is_test[test_idx] = True
        train = self.subset(torch.nonzero(~is_test).reshape(-1), name=f"{self.name}/train")
        test = self.subset(torch.nonzero(is_test).reshape(-1), name=f"{self.name}/test")
        return train, test

    # -- identity --------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 over kind, inputs, labels, class names and ids (for cache keys)."""
        h = hashlib.sha256()
        h.update(self.kind.encode())
        h.update("\x1f".join(self.class_names).encode())
        h.update("\x1f".join(self.ids).encode())
        if self.kind == "text":
            for s in self.inputs:
                h.update(s.encode("utf-8"))
                h.update(b"\x1e")
        else:
            x = self.inputs.detach().cpu().contiguous()
            h.update(str(tuple(x.shape)).encode() + str(x.dtype).encode())
            h.update(x.numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.cpu().numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        shape = f"{len(self)} texts" if self.kind == "text" else f"inputs {tuple(self.inputs.shape)}"
        lab = "unlabelled" if self.labels is None else f"{self.num_classes} classes"
        return f"ExampleSet({self.name!r}, {self.kind}, {shape}, {lab})"


#: Integer labels are class indices 0..C-1; more classes than this, with far fewer of them
#: present, is almost surely an id column or a typo, not a C-class problem.
SPARSE_LABELS_LIMIT = 1000


def encode_labels(values: Sequence[Any], source: str) -> tuple[torch.Tensor, list[str]]:
    """Map raw labels to int64 class indices.

    Numbers (ints, integral floats, and strings that spell them: ``"3"``, ``"3.0"``,
    ``"-1"``, as CSV readers produce) are class indices themselves, with
    ``class_names = [str(c) for c in range(max + 1)]``; ``3`` and ``"3.0"`` are the same
    class. Any other strings -> indices into the sorted unique names. Negative,
    missing (None, NaN, empty string) or non-integral numeric values raise
    ValueError, as do integer labels that would make a huge, mostly empty class
    range (max + 1 > 1000 classes with under a tenth of them present).
    """
    vals = list(values)

    def missing(v: Any) -> bool:  # None, NaN, or an empty CSV cell
        return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())

    n = sum(missing(v) for v in vals)
    if n:
        first = next(i for i, v in enumerate(vals) if missing(v))
        raise ValueError(f"{source}: {n} example(s) have no label (first: row {first}); "
                         "remove them or drop the label column")
    if all(isinstance(v, (bool, np.bool_)) for v in vals):
        return torch.tensor([int(v) for v in vals], dtype=torch.int64), ["False", "True"]

    def as_number(v: Any) -> float | None:
        if isinstance(v, (bool, np.bool_)):
            return None
        if isinstance(v, (int, np.integer, float, np.floating)):
            return float(v)
        if isinstance(v, str) and re.fullmatch(r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*", v):
            return float(v)
        return None

    nums = [as_number(v) for v in vals]
    if vals and all(x is not None for x in nums):
        frac = [v for v, x in zip(vals, nums) if not float(x).is_integer()]
        if frac:
            raise ValueError(f"{source}: labels look numeric but {len(frac)} are not whole numbers (e.g. "
                             f"{frac[0]!r}); class labels are integers 0..C-1 or names")
        ints = [int(x) for x in nums]
        if min(ints) < 0:
            bad = next(v for v, i in zip(vals, ints) if i < 0)
            raise ValueError(f"{source}: integer labels are class indices and must be >= 0, found {bad!r} "
                             f"({sum(i < 0 for i in ints)} such label(s)); remove those examples or remap the labels")
        top, distinct = max(ints) + 1, len(set(ints))
        if top > SPARSE_LABELS_LIMIT and distinct * 10 < top:
            raise ValueError(f"{source}: integer labels are class indices, but they reach {top - 1} while only "
                             f"{distinct} distinct values occur: that would be a {top}-class problem with "
                             f"{top - distinct} empty classes. Remap them to 0..{distinct - 1} (or write them "
                             f"as names, e.g. 'c{top - 1}', to use them as class names)")
        return torch.tensor(ints, dtype=torch.int64), [str(c) for c in range(top)]
    names = sorted({str(v) for v in vals})
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[str(v)] for v in vals], dtype=torch.int64), names
