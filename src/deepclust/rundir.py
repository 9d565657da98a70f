"""The run directory's lifecycle: who may write it, whether it holds a run, how a finished
rebuild replaces it (``runs.py`` trains and scores; this module owns the directory).

What a run directory guarantees:
 - **One writer.** ``fit`` claims the directory (an exclusive lock beside it, ``locks.claim_run_dir``,
   named from its real path) before anything is written; a second ``fit`` on the same directory,
   however its path is spelled (symbolic links, ``..``), gets one line and exits. ``--out`` is used
   as the directory it names (:func:`real_out`); a dangling symbolic link is refused in one line.
 - **What a run is.** A directory holding a checkpoint or ``metrics.json``. One holding only what a
   first start writes before its first checkpoint (the resolved ``config.yaml``, ``log.jsonl``) is
   not a run: a plain ``fit`` clears those files (:data:`RUN_FILES`, nothing else) and starts again,
   and ``--resume`` says so in one line. A ``config.yaml`` that fit did not write (no resolved
   ``net.input_shape``) is never removed: such a directory is refused as holding a run.
 - **Atomic files.** Every file is written to a unique temporary name and renamed over (``io``); a
   reader sees an old or a new file, never half of one.
 - **Nothing lost.** An existing run is refused unless ``--resume`` or ``--overwrite``; with
   ``--overwrite`` the new run is built beside the old one (``OUT.partial``) and swapped in only when
   it has finished, so a failed or killed overwrite leaves the old run whole.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .config import read_yaml
from .errors import ConfigError, DataError, DeepclustError, WriteError


def is_launched_child() -> bool:
    """True in the processes Fabric / torchrun start for ranks other than 0 (they write nothing)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] != "0"
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


# the files a run writes (runs.py, train.py); a start that left no checkpoint is cleared of these only
RUN_FILES = ("config.yaml", "log.jsonl", "model.safetensors", "head.npz", "embeddings.npy", "labels.npy")


def checkpoint_file(out: Path) -> Path:
    return out / "checkpoints" / "last.pt"


def real_out(out: str | Path) -> Path:
    """``--out`` as the directory it names: symbolic links and ``..`` resolved, so that the lock, the
    rebuild beside it (``--overwrite``) and the swap all act on the real directory. A dangling link
    on the way (``--out`` or one of its parents) is refused: following it would create its target."""
    out = Path(out).expanduser()
    for q in (out, *out.parents):
        if q.is_symlink() and not q.exists():
            raise DataError(f"--out {out}: {q} is a symbolic link to {os.readlink(q)}, which does not exist; "
                            "create its target or choose another --out")
    return Path(os.path.realpath(out))


def holds_run(out: Path) -> bool:
    """A run is a directory with a checkpoint or a finished run's metrics.json."""
    return checkpoint_file(out).exists() or (out / "metrics.json").exists()


def failed_start(out: Path) -> bool:
    """No run, but the config.yaml fit writes (resolved: ``net.input_shape`` filled, so never a file of
    the user's): a first start that stopped before its first checkpoint."""
    if holds_run(out) or not (out / "config.yaml").is_file():
        return False
    try:
        raw = read_yaml(str(out / "config.yaml"))
    except (DeepclustError, OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("net"), dict) and raw["net"].get("input_shape") is not None


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked to (called while holding the run's claim)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"--out {out} is not writable")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    stopped = failed_start(out)
    if resume:
        if stopped:
            raise DataError(f"nothing to resume in {out}: its first start stopped before its first checkpoint; "
                            "run fit without --resume to start it again")
        if not checkpoint_file(out).exists():
            raise DataError(f"nothing to resume: no checkpoint under {out / 'checkpoints'}")
    elif (holds_run(out) or (out / "config.yaml").exists() and not stopped) and not overwrite:
        raise DataError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif stopped and not overwrite:
        clear_failed_start(out)
        print(f"deepclust: {out} held a start that stopped before its first checkpoint; starting again",
              file=sys.stderr)


def clear_failed_start(out: Path) -> None:
    """Remove what a start that left no checkpoint wrote (:data:`RUN_FILES` and their temporary files,
    an empty ``checkpoints`` folder); any other file in ``out`` is left alone."""
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
            for tmp in out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        for tmp in out.glob("checkpoints/.last.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
        if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
            (out / "checkpoints").rmdir()
    except OSError as e:
        raise WriteError(e.filename or out, e) from None


def finished_run(out: Path) -> dict[str, Any] | None:
    """metrics.json of a run that completed (written last, after every other file), else None."""
    path = out / "metrics.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``work`` directory; the old run is removed only afterwards.
    ``out`` is taken as the directory it names (a link to it is left pointing at the new run)."""
    out = Path(os.path.realpath(out))
    trash = out.with_name(out.name + ".old")
    if trash.is_symlink() or trash.is_file():
        trash.unlink()
    elif trash.exists():
        shutil.rmtree(trash)
    if out.exists():
        os.replace(out, trash)
    os.replace(work, out)
    shutil.rmtree(trash, ignore_errors=True)


def read_run_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.exists():
        raise DataError(f"not a run directory (no config.yaml): {run}")
    return read_yaml(str(path))
