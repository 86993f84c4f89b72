"""The HTML report: rendered from a results dict only (:func:`render`)."""

from .html import render

__all__ = ["render"]
