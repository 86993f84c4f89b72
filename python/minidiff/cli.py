"""The ``minidiff`` command line.

::

    minidiff run STUDY.toml --out DIR       run a study file; DIR/report.html, DIR/results.json, CSVs
    minidiff demo --out DIR [--quick]       the embedded default study (offline, real data and models)
    minidiff report --cache DIR --out DIR   re-render the report from a cache, running no model
    minidiff check STUDY.toml               validate a study file only

User errors (a bad study file, missing data, a full disk) print one
``minidiff: error: ...`` line and exit with status 2 (bad input) or 1 (could not
write); no traceback. ``python -m minidiff`` is the same program.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Sequence


def _common(p: argparse.ArgumentParser, *, out: bool = True, device: bool = True) -> None:
    """The options every command that runs models shares (one spelling each)."""
    if out:
        p.add_argument("-o", "--output", "--out", dest="out", required=True, metavar="DIR",
                       help="output folder (report.html, results.json, CSV tables, plots/)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of a different study already in the output folder")
    if device:
        p.add_argument("--device", default=None, help="run the models there (cpu, cuda, cuda:N); "
                       "overrides the study file's [study] device")
        p.add_argument("--seed", type=int, default=None, help="overrides the study file's [study] seed")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage logs (the result is still printed)")
    p.add_argument("--traceback", action="store_true", help="on error, show the Python traceback too")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff", description="How does a compressed model differ from its original?")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run a study file (TOML)")
    r.add_argument("study", help="path to the study file")
    r.add_argument("--cache", default=None, help="cache folder (default: OUT/cache)")
    _common(r)
    d = sub.add_parser("demo", help="run the embedded default study (no downloads)")
    d.add_argument("--quick", action="store_true", help="reduced size (CI)")
    d.add_argument("--only", choices=["digits", "minilm", "lm"], default=None, help="run one of the studies")
    _common(d)
    rp = sub.add_parser("report", help="regenerate the report from a cache without running models")
    rp.add_argument("--cache", required=True, help="the cache folder of a finished run (OUT/cache)")
    _common(rp, device=False)
    c = sub.add_parser("check", help="validate a study file without running models")
    c.add_argument("study")
    c.add_argument("--device", default=None, help="check this device instead of the file's")
    c.add_argument("-v", "--verbose", action="store_true", help="list every check")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    c.add_argument("--traceback", action="store_true", help="on error, show the Python traceback too")
    return p


_SHOW_TRACEBACK = False
_ERROR_SAID = False  # minidiff's one error line is out


def _fail(msg: str, code: int) -> int:
    global _ERROR_SAID
    if _SHOW_TRACEBACK:
        traceback.print_exc()
    _ERROR_SAID = True  # a SIGTERM arriving now (torchrun stopping the ranks) adds no second line
    print(f"minidiff: error: {msg}", file=sys.stderr)
    return code


class _Terminated(BaseException):
    """SIGTERM arrived; its line is printed already."""


def _termination_line() -> str:
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world not in (None, "1"):
        return (f"minidiff: error: rank {rank} of {world} was stopped (SIGTERM): torchrun stops every rank when "
                "one fails or is killed; the failing rank is named in torchrun's report below. Finished chunks "
                "are in the per-shard cache: run the same command again to resume")
    return ("minidiff: error: stopped (SIGTERM); finished chunks are cached: run the same command again to "
            "resume")


@contextlib.contextmanager
def _say_why_on_sigterm(grace_s: float = 5.0):
    """Print minidiff's one line as soon as SIGTERM arrives, then stop.

    torchrun answers a dead rank by sending SIGTERM to the others and prints its own
    traceback once they are gone. A Python signal handler runs only when the main
    thread returns to the interpreter, which a rank waiting inside a gloo/NCCL
    collective does not do for a long time; so the C-level handler's wake-up byte
    (``signal.set_wakeup_fd``) is read by a watcher thread that prints the line at
    once. The main thread then unwinds through ``_Terminated`` (atomic writes leave
    nothing half-written); if it is still blocked after ``grace_s`` the process exits
    with status 143 (128 + SIGTERM).
    """
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    done = threading.Event()
    said = threading.Lock()  # held once the line is out: it is printed once, by whoever is first

    def say() -> None:
        if said.acquire(blocking=False) and not _ERROR_SAID:
            print(_termination_line(), file=sys.stderr, flush=True)

    def on_sigterm(signum, frame):
        say()
        raise _Terminated()

    def watch() -> None:
        while True:
            try:
                got = os.read(r, 64)
            except OSError:
                return
            if not got or done.is_set():
                return
            if signal.SIGTERM in got:
                say()
                if not done.wait(grace_s):
                    os._exit(128 + signal.SIGTERM)
                return

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="minidiff-sigterm", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(w)  # ends the watcher's read
        watcher.join(timeout=1.0)
        os.close(r)


def _quiet() -> None:
    # transformers and huggingface_hub read this when first imported (model-loading bars)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person watching: not under -q, not when stderr is a file or pipe."""
    return not args.quiet and sys.stderr.isatty()


def _threads(n: int) -> None:
    if n and n > 0:
        import torch
        torch.set_num_threads(n)


def _overrides(cfg, args: argparse.Namespace):
    """Apply --device / --seed to a validated study file (validated again)."""
    from minidiff.study.config import parse_config
    data = cfg.model_dump(mode="python")
    if getattr(args, "device", None):
        data["study"]["device"] = args.device
    if getattr(args, "seed", None) is not None:
        data["study"]["seed"] = args.seed
    if data == cfg.model_dump(mode="python"):
        return cfg
    return parse_config(data, source="command line")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    with _say_why_on_sigterm():
        try:
            return _main(argv)
        except _Terminated:
            return 143  # 128 + SIGTERM; the line was printed when the signal arrived


def _main(argv: Sequence[str] | None) -> int:
    global _SHOW_TRACEBACK, _ERROR_SAID
    _ERROR_SAID = False
    args = _parser().parse_args(argv)
    _SHOW_TRACEBACK = bool(getattr(args, "traceback", False))
    if args.version:
        import minidiff
        print(f"minidiff {minidiff.__version__}")
        return 0
    if args.command is None:
        _parser().print_help(sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from minidiff.distributed import DistributedRunError
    from minidiff.study.cache import CacheCorruptionWarning
    from minidiff.study.config import StudyFileError, load_config
    from minidiff.study.results import OutputWriteError
    warnings.simplefilter("always", CacheCorruptionWarning)
    t0 = time.perf_counter()
    # minidiff's own logger only: other libraries' log records keep their own names and levels
    log = logging.getLogger("minidiff")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("minidiff: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        _quiet()
    try:
        if args.command == "check":
            from minidiff.lm.config import LMStudyConfig, check_lm_study
            from minidiff.study.check import check_study
            cfg = load_config(args.study)  # classifier or language-model study, read once
            if isinstance(cfg, LMStudyConfig):
                checks, what = check_lm_study(cfg, device=args.device), f"language-model study ({cfg.study.task})"
            else:
                checks, what = check_study(args.study, device=args.device, config=cfg), f"base {cfg.base.kind}"
            if args.verbose:
                for line in checks:
                    print(f"  ok  {line}")
            if not args.quiet:
                print(f"{args.study}: OK ({len(checks)} checks) — {what}, {len(cfg.variants)} variant(s): "
                      + ", ".join(v.name for v in cfg.variants))
            return 0
        if args.command == "report":
            from minidiff.study.study import report_from_cache
            res = report_from_cache(args.cache, args.out, overwrite=args.overwrite)
            print(f"report written: {Path(args.out) / 'report.html'} ({len(res['variants'])} variants, "
                  "from the cache; no model was run)")
            return 0
        if args.command == "run":
            _threads(args.threads)
            from minidiff.lm.config import LMStudyConfig, build_lm_study
            cfg = load_config(args.study)  # classifier or language-model study, read once
        if args.command == "run" and isinstance(cfg, LMStudyConfig):
            if args.device:
                cfg.study.device = args.device
            if args.seed is not None:
                cfg.study.seed = args.seed
            cache = Path(args.cache) if args.cache else Path(args.out) / "cache"
            res = build_lm_study(cfg, cache_dir=cache).run(out=args.out, overwrite=args.overwrite)
            from minidiff.distributed import shutdown
            shutdown()
            if res is not None:
                print(res.table())
                print(f"\nreport: {Path(args.out) / 'report.html'}\nnumbers: {Path(args.out) / 'results.json'}")
            return 0
        if args.command == "run":
            cfg = _overrides(cfg, args)
            from minidiff.study.study import build_study
            cache = Path(args.cache) if args.cache else Path(args.out) / "cache"
            study = build_study(cfg, cache_dir=cache, progress=_progress(args) and cfg.study.progress)
            res = study.run(out=args.out, overwrite=args.overwrite)
            from minidiff.distributed import shutdown
            shutdown()  # under torchrun: every rank leaves the group together
            if not res:  # a non-zero torchrun rank: rank 0 writes
                return 0
            _print_summary(res, args.out, time.perf_counter() - t0)
            return 0
        if args.command == "demo":
            _threads(args.threads)
            from minidiff.study.demo import run_demo
            res = run_demo(args.out, quick=args.quick, only=args.only, progress=_progress(args),
                           device=args.device or "cpu", seed=args.seed, overwrite=args.overwrite)
            if args.only == "lm":  # its own folder; the llama.cpp-style table (printed already with progress)
                if not _progress(args):
                    from minidiff.report.lm import terminal_table
                    print(terminal_table(res["language_model"]))
                _print_summary(res, str(Path(args.out) / "lm"), time.perf_counter() - t0)
                return 0
            _print_summary(res, args.out, time.perf_counter() - t0)
            return 0
    except StudyFileError as e:
        return _fail(str(e), 2)
    except DistributedRunError as e:  # another torchrun rank died or hung: say so on every rank
        return _fail(f"DistributedRunError: {e}", 1)
    except OutputWriteError as e:
        return _fail(str(e), 1)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        return _fail(str(e), 2)
    except OSError as e:
        return _fail(f"{type(e).__name__}: {e}", 1)
    except KeyboardInterrupt:
        print("minidiff: interrupted; finished chunks are cached, run the same command again to resume",
              file=sys.stderr)
        return 130
    return 2


def _print_summary(res: dict, out: str, seconds: float) -> None:
    print(f"\n{res.get('study', {}).get('name', 'study')} — {seconds:.0f} s")
    from minidiff.results import measured_characteristics
    chars = [key for key, _ in measured_characteristics(res.get("verdicts", {}), res.get("variants", []))]
    width = max([len(v) for v in res.get("variants", [])] + [8])
    print("  " + "variant".ljust(width) + "  " + "  ".join(c[:18].ljust(18) for c in chars))
    for v in res.get("variants", []):
        ver = res.get("verdicts", {}).get(v, {})
        print("  " + v.ljust(width) + "  " + "  ".join(str(ver.get(c, {}).get("verdict", "-")).ljust(18) for c in chars))
    print(f"\nreport: {Path(out) / 'report.html'}\nnumbers: {Path(out) / 'results.json'}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
