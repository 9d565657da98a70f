"""The run directory's lifecycle: who may write it, whether it holds a run, how a finished
rebuild replaces it (``runs.py`` trains and scores; this module owns the directory).

What a run directory guarantees:
 - **One writer.** ``fit`` claims the directory (an exclusive lock beside it, ``locks.claim_run_dir``)
   before anything is written; a second ``fit`` on the same ``--out`` gets one line and exits.
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
from pathlib import Path
from typing import Any

from .config import read_yaml
from .errors import ConfigError, DataError


def is_launched_child() -> bool:
    """True in the processes Fabric / torchrun start for ranks other than 0 (they write nothing)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] != "0"
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def checkpoint_file(out: Path) -> Path:
    return out / "checkpoints" / "last.pt"


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked to (called while holding the run's claim)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"--out {out} is not writable")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    has_run = (out / "config.yaml").exists() or checkpoint_file(out).exists()
    if resume:
        if not checkpoint_file(out).exists():
            raise DataError(f"nothing to resume: no checkpoint under {out / 'checkpoints'}")
    elif has_run and not overwrite:
        raise DataError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")


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
    """Replace ``out`` by the finished ``work`` directory; the old run is removed only afterwards."""
    trash = out.with_name(out.name + ".old")
    if trash.exists():
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
