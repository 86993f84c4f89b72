"""Writing an output folder: all of one run, atomically, never over another study's files.

:func:`write_folder` stages every file (results.json, CSVs, report.html, plots/) in a
temporary folder inside the output folder, where a full disk or any other failure
shows up before anything is touched, and then moves them into place with
``os.replace`` (``report.html`` last). A manifest, ``.minidiff-output.json``, lists
the study and the files of the run that wrote the folder; the next run removes
every file of the earlier run that it does not rewrite (a variant dropped from the
study leaves no stale ``cka_<variant>.csv`` behind), and refuses a folder that holds
another study's outputs or files minidiff did not write unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

MANIFEST = ".minidiff-output.json"
MANIFEST_SCHEMA = "minidiff.output/1"
STAGING_PREFIX = ".minidiff-staging-"
#: files a ``minidiff.results/1`` run wrote (it had no manifest)
V1_OUTPUTS = re.compile(r"^(report\.html|results\.json|summary\.csv|models\.csv|prediction_errors\.csv|"
                        r"representation\.csv|distribution\.csv|cka_.+\.csv|pies_.+\.csv)$")


class OutputWriteError(OSError):
    """Writing the output folder failed; nothing was left behind as if complete."""


class OutputFolderInUseError(ValueError):
    """The output folder holds another study's outputs or files minidiff did not write."""


def _previous(out: Path) -> tuple[str | None, set[str]]:
    """(study name, files) of the run that last wrote ``out``; (None, set()) for none."""
    man = out / MANIFEST
    if man.is_file():
        try:
            m = json.loads(man.read_text(encoding="utf-8"))
            return str(m.get("study", "")), {str(f) for f in m.get("files", [])}
        except (OSError, ValueError):
            pass
    res = out / "results.json"
    if res.is_file():  # written by minidiff.results/1 (no manifest)
        files = {p.name for p in out.iterdir() if p.is_file() and V1_OUTPUTS.match(p.name)}
        try:
            name = json.loads(res.read_text(encoding="utf-8")).get("study", {}).get("name", "")
        except (OSError, ValueError, AttributeError):
            name = ""
        return str(name), files
    return None, set()


def _is_minidiff_dir(p: Path) -> bool:
    """A sub-folder minidiff made: a study's cache or a nested output folder (a combined report)."""
    return p.is_dir() and any((p / f).exists() for f in (MANIFEST, "results.json", "study.json", "models", "built"))


def check_folder(out: Path, study: str, new_files: set[str], overwrite: bool) -> set[str]:
    """Decide whether ``out`` may receive this run's files; return the earlier run's files to remove.

    Raises
    ------
    OutputFolderInUseError
        ``out`` holds another study's outputs, or files minidiff did not write, and
        ``overwrite`` is False.
    """
    if not out.exists():
        return set()
    prev_study, prev_files = _previous(out)
    own = prev_files | {MANIFEST, "plots"} | new_files
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in own and not p.name.startswith(STAGING_PREFIX)
                     and not (p.is_dir() and (p.name == "cache" or _is_minidiff_dir(p))))
    if not overwrite:
        if prev_study is not None and prev_study != study:
            raise OutputFolderInUseError(
                f"{str(out)!r} holds the outputs of another study ({prev_study!r}, this one is {study!r}); "
                "choose another output folder, or pass overwrite=True (--overwrite) to replace them")
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputFolderInUseError(
                f"{str(out)!r} is not empty and holds files minidiff did not write ({shown}); choose an empty "
                "or new output folder, or pass overwrite=True (--overwrite) to write beside them")
    return {f for f in prev_files if f not in new_files and f != MANIFEST}


def check_output(out_dir: str | Path, study: str, *, overwrite: bool = False) -> None:
    """Refuse early (before a study runs) an output folder that :meth:`Results.save` would refuse.

    Raises
    ------
    OutputFolderInUseError
        ``out_dir`` holds another study's outputs or files minidiff did not write, and
        ``overwrite`` is False.
    OutputWriteError
        ``out_dir`` exists and is not a folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputWriteError(f"output folder {str(out)!r} exists and is not a folder")
    check_folder(out, study, set(), overwrite)


def write_folder(out_dir: str | Path, study: str, files: Mapping[str, str | bytes],
                 render: Callable[[Path], Mapping[str, str | bytes]] | None = None,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write ``files`` (name -> text/bytes; names may hold one ``plots/`` level) into ``out_dir``.

    ``render(stage)`` may add more files (the report and its plots), computed after the
    staging folder exists so that their failure leaves the folder as it was.
    The earlier run's files that are not rewritten are removed; ``report.html`` is
    moved last, and on failure ``report.html`` and ``results.json`` are removed so
    that the folder never holds a report that looks complete but is not this run's.

    Raises
    ------
    OutputFolderInUseError
        See :func:`check_folder`.
    OutputWriteError
        Anything could not be written; the staging folder is removed.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputWriteError(f"output folder {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create output folder {str(out)!r}: {e}") from None
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        allf: dict[str, str | bytes] = dict(files)
        if render is not None:
            allf.update(render(stage))
        top = {n.split("/", 1)[0] for n in allf}
        stale = check_folder(out, study, top, overwrite)
        (stage / "plots").mkdir(exist_ok=True)
        for name, data in allf.items():
            path = stage / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        manifest = {"schema": MANIFEST_SCHEMA, "study": study, "files": sorted(top)}
        with open(stage / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        for old in ("report.html", "results.json"):
            (out / old).unlink(missing_ok=True)
        for old in sorted(stale):
            p = out / old
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        os.replace(stage / MANIFEST, out / MANIFEST)
        if any(n.startswith("plots/") for n in allf) or (out / "plots").exists():
            if (out / "plots").exists():
                os.replace(out / "plots", stage / ".old-plots")
            os.replace(stage / "plots", out / "plots")
        order = sorted(n for n in top if n not in ("plots", "report.html", "results.json")) + ["results.json",
                                                                                               "report.html"]
        for name in order:
            if name in allf:
                os.replace(stage / name, out / name)
    except OutputFolderInUseError:
        raise
    except OSError as e:
        for old in ("report.html", "results.json"):
            (out / old).unlink(missing_ok=True)
        raise OutputWriteError(f"writing the report to {str(out)!r} failed ({e}); nothing was left behind "
                               "as if complete — free some space and run again (the cache keeps finished work)") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {name: out / name for name in allf}


def study_name(results: Any) -> str:
    st = results.get("study") if hasattr(results, "get") else None
    return str((st or {}).get("name", "")) if hasattr(st, "get") else ""
