"""Values inside results: numbers, numbers that could not be computed, and their JSON form.

Rules (the ``minidiff.results/2`` schema, see ``docs/results.md``):

- A value that is defined is written as a JSON number.
- A value that could not be computed is never ``null``: it is the object
  ``{"not_computed": "<reason>"}`` (:class:`NotComputed`), or it is absent and its
  reason is in the ``skipped`` map of the same entry.
- A non-finite number that *is* the value (an infinite KL divergence when the
  variant gives probability 0 to a class the base does not) is written as the JSON
  string ``"Infinity"`` or ``"-Infinity"``; inside an array (a matrix, per-bin
  values) an undefined cell is ``"NaN"``. ``float(s)`` in Python, ``Number(s)`` in
  JavaScript and pydantic's float fields parse all three.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Union

import numpy as np
from pydantic import BaseModel, ConfigDict

#: JSON spellings of non-finite floats
NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
NAN_TEXT = "NaN"

#: Why a value is missing when the entry's ``skipped`` map does not say; keyed by field name.
#: The study leaves a value out (or NaN) only in these situations.
KNOWN_REASONS: dict[str, str] = {
    "error_jaccard": "undefined: neither model makes an error, so both error sets are empty (0/0)",
    "acc_base_pie": "undefined: there is no PIE, and accuracy over an empty set is 0/0",
    "acc_variant_pie": "undefined: there is no PIE, and accuracy over an empty set is 0/0",
    "acc_base_non_pie": "undefined: every example is a PIE, and accuracy over an empty set is 0/0",
    "acc_variant_non_pie": "undefined: every example is a PIE, and accuracy over an empty set is 0/0",
    "nonzero_fraction": "the model's state holds no weight matrix under a recognised name to count zeros in",
    "final": "undefined: a layer's features are constant (zero variance), so CKA is 0/0",
    "reference_final": "undefined: a layer's features are constant (zero variance), so CKA is 0/0",
    "reference_churn": "one base model only: no seed-to-seed reference (give the base several seeds)",
    "accuracy": "needs labels; the evaluation data has none",
    "p_value": "undefined for these counts (the test statistic is 0/0)",
}


class NotComputed(BaseModel):
    """A value that could not be computed, with the reason (one sentence for the report)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    not_computed: str

    def __bool__(self) -> bool:  # ``if entry.x:`` treats a missing value as absent
        return False

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def __contains__(self, key: str) -> bool:
        return key == "not_computed"


#: A number field: a float (possibly +-inf) or the reason it is missing.
Number = Union[float, NotComputed]


def is_number(x: Any) -> bool:
    """True for a real number (int/float/numpy scalar, finite or not); False for None,
    :class:`NotComputed`, ``{"not_computed": ...}`` dicts, strings and bools."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def reason_of(key: str, skipped: dict[str, str] | None, why: str = "missing") -> str:
    """The reason a value named ``key`` is missing: the entry's ``skipped`` map first,
    then :data:`KNOWN_REASONS`, else a sentence that says what happened."""
    if skipped and key in skipped:
        return str(skipped[key])
    if key in KNOWN_REASONS:
        return KNOWN_REASONS[key]
    if why == "nan":
        return f"undefined for this data: the computation of {key!r} gave NaN"
    return f"no value was produced for {key!r}"


def fill_missing(obj: Any, skipped: dict[str, str] | None = None, key: str = "") -> Any:
    """Plain JSON-able data in which no defined slot holds ``None``.

    Tensors/arrays become lists, numpy scalars Python scalars, dataclass results dicts.
    A ``None`` or NaN scalar under a dict key becomes ``{"not_computed": reason}``
    (:func:`reason_of`, using the nearest ``skipped`` map). In a list, ``None`` and NaN
    stay as float NaN (an undefined cell: written ``"NaN"``); infinities are kept
    (written ``"Infinity"``).
    """
    import torch
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    if isinstance(obj, dict):
        sk = obj.get("skipped") if isinstance(obj.get("skipped"), dict) else skipped
        out: dict[str, Any] = {}
        for k, v in obj.items():
            k = str(k)
            if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
                out[k] = {"not_computed": reason_of(k, sk, "nan" if v is not None else "missing")}
            else:
                out[k] = fill_missing(v, sk, k)
        return out
    if isinstance(obj, (list, tuple)):
        return [math.nan if x is None else fill_missing(x, skipped, key) for x in obj]
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def encode(obj: Any) -> Any:
    """Python data -> JSON data (non-finite floats as ``"Infinity"``, ``"-Infinity"``, ``"NaN"``)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="python")
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(x) for x in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if math.isnan(f):
            return NAN_TEXT
        return NONFINITE.get(f, f)
    if isinstance(obj, np.integer):
        return int(obj)
    if hasattr(obj, "value") and isinstance(getattr(obj, "value"), str):  # enums
        return obj.value
    return obj


def as_float(x: Any) -> float | None:
    """A number from a results value: floats, the JSON spellings of non-finite floats;
    ``None`` for missing values (``None``, :class:`NotComputed`, ``{"not_computed": ...}``)."""
    if is_number(x):
        return float(x)
    if isinstance(x, str) and x in ("Infinity", "-Infinity", "NaN"):
        return float(x)
    return None


def walk(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) pair below ``obj`` (dicts and models by key, lists by index)."""
    if isinstance(obj, BaseModel) and not isinstance(obj, NotComputed):
        obj = {**dict(obj), **(obj.model_extra or {})}
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, path + (str(k),))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk(v, path + (str(i),))


def dig(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...`` or None where a step is missing (dicts and records alike)."""
    for p in path:
        get = getattr(d, "get", None)
        if get is None or isinstance(d, (str, bytes)):
            return None
        d = get(p)
    return d
