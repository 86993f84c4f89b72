"""Loading models: one entry point, :func:`load_model`, for every source kind
(``torch`` modules and files, ``hf`` transformers folders / hub ids, ``onnx``
files, ``gguf`` files, ``variant`` folders; see :mod:`minidiff.models.sources`),
the embedded pretrained all-MiniLM-L6-v2, and :class:`LoadedModel`.

Nothing here downloads anything unless the user passes a hub id on a machine with
network access; with ``HF_HUB_OFFLINE=1`` local directories load and a hub id that
is not already in the local cache is a clear error.
"""

from __future__ import annotations

from typing import Any


from .loaded import EMBEDDED_ALIASES, TASKS, LoadedModel, embedded_minilm_dir, is_offline  # noqa: F401


def load_model(
    source: Any,
    *,
    kind: str | None = None,
    task: str = "features",
    **options: Any,
) -> LoadedModel:
    """Load a model for comparison, from any supported source.

    Parameters
    ----------
    source
        * an ``nn.Module`` or ``torch.export.ExportedProgram`` (kind ``torch``),
        * ``"minilm"`` (the embedded pretrained all-MiniLM-L6-v2, see
          :func:`embedded_minilm_dir`),
        * a local transformers folder (``config.json`` inside) or a hub id
          (kind ``hf``; a hub id needs network or the local HF cache),
        * an ``.onnx`` file (kind ``onnx``, run with onnxruntime),
        * a ``.gguf`` file (kind ``gguf``),
        * a ``minidiff.save_variant`` folder (kind ``variant``),
        * a ``torch.save``d module (``.pt``/``.pth``) or ``torch.export.save``d
          program (``.pt2``) (kind ``torch``).
    kind
        ``"torch"``, ``"hf"``, ``"onnx"``, ``"gguf"`` or ``"variant"``; inferred
        from ``source`` when omitted and unambiguous.
    task
        Which ``AutoModel*`` class transformers sources use, one of :data:`TASKS`.
    **options
        Passed to the source loader: ``num_labels``, ``trust_remote_code``,
        ``device``, ``dtype``, ``forward``, ``revision``, ``quantization_config``
        (hf); ``providers``, ``layers``, ``tokenizer`` (onnx); ``runtime``,
        ``tokenizer`` (gguf). See :mod:`minidiff.models.sources`.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ValueError
        Unknown kind, unsupported file, bad option.
    ImportError
        An optional package the source needs is missing (the one-line message
        says what to install).
    """
    from minidiff.validation import check_device

    from .sources import load_model as _load
    if options.get("device") is not None:
        options["device"] = check_device(options["device"], "device")
    return _load(source, kind=kind, task=task, **options)
