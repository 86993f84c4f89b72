"""Adversarial vulnerability of a base model and its compressed variants.

Rai et al. 2024 ("Compressed models are NOT miniature versions of large models") list
adversarial robustness among the properties that compression changes; the direction is
disputed (Neshaei et al. 2024 find quantization can raise adversarial accuracy), so it is
measured here, per model, with the same attack budget, and with transfer between models.

- :class:`AdversarialConfig` — the ``[adversarial]`` table of a study file.
- :func:`run_adversarial` — attack every model, return JSON-able results.
- :func:`render_section` — the HTML section of the report.
"""

from .config import AdversarialConfig
from .report import render_section
from .run import run_adversarial

__all__ = ["AdversarialConfig", "run_adversarial", "render_section"]
