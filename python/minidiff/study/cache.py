"""On-disk cache of a study: per-model outputs and per-pair accumulator states.

Layout under the cache directory::

    study.json                        the validated study (for ``minidiff report``)
    built/<key>.pt                    models minidiff trained or compressed itself
    models/<model_key>/chunk_00003.safetensors   one chunk's logits and embeddings
    pairs/<pair_key>/state.safetensors           cumulative accumulator states
    <every file>.sha256               SHA-256 of the file's bytes, written after it

Keys are SHA-256 hashes of everything that determines the content: the model's
weights, the data fingerprint, the capture settings, the chunk size and the shard
(rank/world size). A different model, data set or setting therefore never meets
a stale entry. Every file is written to a temporary name and moved into place
with ``os.replace`` (atomic on POSIX), then its checksum is written the same way:
a file without a matching checksum is treated as absent, so an interrupted write
can never be read back as complete. A checksum mismatch (a corrupt file) is
reported with a warning, the entry deleted and recomputed; it is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class CacheCorruptionError(ValueError):
    """A corrupt entry in a cache opened read-only (``minidiff report``), which cannot recompute it."""


class CacheCorruptionWarning(UserWarning):
    """A cache entry failed its checksum; it is recomputed."""


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def hash_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


def hash_module(module: torch.nn.Module) -> str:
    """Exact SHA-256 of a model (see :func:`minidiff.models.fingerprint.fingerprint`): the
    bytes of every tensor of its state (quantized tensors through their integer
    representation, scales and zero points; packed ``torch.ao`` weights through
    ``unpack()``; tensor subclasses through their inner tensors) plus its module structure.

    Raises
    ------
    minidiff.models.fingerprint.UnhashableModelError
        When the state cannot be hashed exactly: such a model must not be cached.
    """
    from minidiff.models.fingerprint import fingerprint
    return fingerprint(module)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``.

    On any failure (e.g. a full disk) the temporary file is removed and the
    previous content of ``path``, if any, is left untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class StudyCache:
    """Checksummed, atomic store for one study's cache directory.

    Parameters
    ----------
    root : path
        The cache directory (created when needed).
    """

    def __init__(self, root: str | Path, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self.read_only = read_only
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        self.corrupt_entries: list[str] = []

    # -- generic checked files ---------------------------------------------------
    def _write_checked(self, path: Path, data: bytes) -> None:
        # the checksum goes last: a data file without it reads as absent
        ck = path.with_name(path.name + ".sha256")
        if ck.exists():
            ck.unlink()
        atomic_write_bytes(path, data)
        atomic_write_text(ck, sha256_bytes(data))

    def _read_checked(self, path: Path) -> bytes | None:
        ck = path.with_name(path.name + ".sha256")
        if not path.exists() or not ck.exists():
            return None
        data = path.read_bytes()
        if sha256_bytes(data) != ck.read_text().strip():
            rel = str(path.relative_to(self.root))
            if self.read_only:  # nothing here recomputes: say so, and leave the evidence in place
                raise CacheCorruptionError(
                    f"cache entry {rel} in {str(self.root)!r} is corrupt (checksum mismatch); it cannot be used. "
                    "Run the study again (`minidiff run STUDY -o OUT`) to recompute it")
            warnings.warn(f"minidiff cache: {rel} is corrupt (checksum mismatch); recomputing it",
                          CacheCorruptionWarning, stacklevel=3)
            self.corrupt_entries.append(rel)
            path.unlink(missing_ok=True)
            ck.unlink(missing_ok=True)
            return None
        return data

    def save_tensors(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        """Store named tensors (safetensors) with optional JSON metadata."""
        md = {"json": json.dumps(meta or {}, sort_keys=True)}
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=md)
        self._write_checked(self.root / rel, data)

    def load_tensors(self, rel: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The tensors and metadata stored at ``rel``, or None if absent or corrupt."""
        data = self._read_checked(self.root / rel)
        if data is None:
            return None
        # safetensors layout: 8-byte little-endian header length, JSON header
        n = int.from_bytes(data[:8], "little")
        md = json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
        return st_load(data), json.loads(md.get("json", "{}"))

    def save_json(self, rel: str, obj: Any) -> None:
        self._write_checked(self.root / rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def load_json(self, rel: str) -> Any | None:
        data = self._read_checked(self.root / rel)
        return None if data is None else json.loads(data)

    def save_module(self, rel: str, module: torch.nn.Module, meta: dict[str, Any]) -> None:
        """Store a whole module (pickled with ``torch.save``; this cache is trusted, local data)."""
        import io
        buf = io.BytesIO()
        torch.save({"module": module, "meta": meta}, buf)
        self._write_checked(self.root / rel, buf.getvalue())

    def load_module(self, rel: str) -> tuple[torch.nn.Module, dict[str, Any]] | None:
        import io
        data = self._read_checked(self.root / rel)
        if data is None:
            return None
        obj = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
        return obj["module"], obj["meta"]

    def get_or_build_module(self, key: str, build: Callable[[], tuple[torch.nn.Module, dict[str, Any]]]
                            ) -> tuple[torch.nn.Module, dict[str, Any], bool]:
        """Load the built model ``key`` or build and store it. Returns (module, meta, was_cached)."""
        rel = f"built/{key}.pt"
        got = self.load_module(rel)
        if got is not None:
            return got[0], got[1], True
        module, meta = build()
        self.save_module(rel, module, meta)
        return module, meta, False

    def exists(self, rel: str) -> bool:
        p = self.root / rel
        return p.exists() and p.with_name(p.name + ".sha256").exists()

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)
