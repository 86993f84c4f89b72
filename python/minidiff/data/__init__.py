"""Data in: every loader returns an :class:`ExampleSet` (ordered inputs, optional
int labels, class names, stable ids). The first link of the study's chain
(data -> models -> capture -> accumulators -> results -> report); it imports
nothing else from minidiff.

Built-in (offline, shipped with dependencies): ``load_builtin("digits" |
"mnist-sample" | "chatterbot-en" | "chatterbot-ood")``. A user's data:
:func:`load_csv`, :func:`load_jsonl`, :func:`load_hf_disk`, :func:`from_torch_dataset`.
"""

from .builtin import (BUILTIN_DATASETS, chatterbot_languages, load_builtin, load_chatterbot,
                      load_digits, load_mnist_sample)
from .examples import KINDS, ExampleSet, encode_labels
from .files import from_torch_dataset, load_csv, load_hf_disk, load_jsonl

__all__ = ["ExampleSet", "KINDS", "encode_labels", "BUILTIN_DATASETS", "load_builtin", "load_digits",
           "load_mnist_sample", "load_chatterbot", "chatterbot_languages", "load_csv", "load_jsonl",
           "load_hf_disk", "from_torch_dataset"]
