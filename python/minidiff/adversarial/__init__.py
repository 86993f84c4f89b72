"""Adversarial vulnerability of a base model and its compressed variants.

Rai et al. 2024 ("Compressed models are NOT miniature versions of large models") list
adversarial robustness among the properties that compression changes; the direction is
disputed (Neshaei et al. 2024 find quantization can raise adversarial accuracy), so it is
measured here, per model, with the same attack budget, and with transfer between models.

- :class:`AdversarialConfig` — the ``[adversarial]`` table of a study file.
- :func:`run_adversarial` — attack every model, return JSON-able results.

The HTML section is drawn by :func:`minidiff.report.adversarial.render_section`
(this package only computes).
"""

from typing import Any

from .config import AdversarialConfig
from .run import run_adversarial

__all__ = ["AdversarialConfig", "run_adversarial"]


def __getattr__(name: str) -> Any:
    # ``render_section`` moved to the report package; kept reachable under its old name
    if name == "render_section":
        import importlib
        return importlib.import_module("minidiff.report.adversarial").render_section
    raise AttributeError(f"module 'minidiff.adversarial' has no attribute {name!r}")
