"""Compressed variants and their folder format now live in :mod:`minidiff.models.saved`
(loading a saved variant is a model source, so the format belongs to ``models``;
``compress`` produces variants and imports it). This module re-exports it."""

from __future__ import annotations

from typing import Any

from minidiff.models import saved as _saved
from minidiff.models.saved import (DEFAULT_EXCLUDE, Variant, apply_module_table, as_linear, attach_input_cast,  # noqa: F401
                                   clone_model, default_layers, is_conv1d, linear_types, linear_weight,
                                   load_variant, make_manifest, minidiff_nn_class, module_table, save_variant,
                                   sparsity_report, state_bytes, state_sha256, tied_to_embedding, weight_modules)


def __getattr__(name: str) -> Any:
    return getattr(_saved, name)
