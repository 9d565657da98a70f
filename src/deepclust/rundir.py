"""The run directory's lifecycle: who may write it, whether it holds a run, how a finished
rebuild replaces it, and which paths the tool may never write (``runs.py`` trains and scores; this
module owns the directory).

What a run directory guarantees:
 - **Only where the user asked.** ``--out`` is checked before any lock is taken or file written
   (:func:`check_out`): the file system's root, the home directory, a file, and the data (its folder,
   a folder inside it or holding it; a folder holding an npz file) are refused in one line. The lock
   lives in a lock directory, never beside ``--out`` (``locks.py``).
 - **One writer.** ``fit`` claims the directory (an exclusive lock keyed by its real path,
   ``locks.claim_run_dir``) before anything is written; a second ``fit`` on the same directory,
   however its path is spelled (symbolic links, ``..``), gets one line and exits. ``--out`` is used
   as the directory it names (:func:`real_out`); a dangling symbolic link is refused in one line.
 - **What a run is.** ``fit`` writes :data:`MARKER` into the directory first thing; a directory is
   the tool's when it holds the marker or the ``config.yaml`` fit writes (resolved
   ``net.input_shape``, never a file of the user's: so a run without the marker, from a version that
   wrote none, is still recognised). It holds a run when it also has a checkpoint or ``metrics.json``. One holding only
   what a first start writes before its first checkpoint is not a run: a plain ``fit`` clears those
   files (:data:`RUN_FILES`, nothing else) and starts again, and ``--resume`` says so in one line. A
   plain ``fit`` into any other non-empty directory is refused: it would mix the run's files with
   the user's.
 - **Atomic files.** Every file is written to a unique temporary name and renamed over (``io``); a
   reader sees an old or a new file, never half of one.
 - **Nothing lost.** An existing run is refused unless ``--resume`` or ``--overwrite``.
   ``--overwrite`` replaces only the tool's directory holding nothing but names the tool writes
   (:func:`check_replaceable`); anything else is refused in one line naming what was found. The new
   run is built beside the old one under a name made unique here (``.OUT.partial-XXXXXXXX``) and
   swapped in only when it has finished, so a failed or killed overwrite leaves the old run whole;
   the backup of the old run gets a unique name too, so no name of the user's is ever removed.
 - **Inputs are never outputs.** Every file predict, export and report write is checked against the
   run's own files and the input data (:func:`check_output`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import read_yaml
from .errors import ConfigError, DataError, DeepclustError, WriteError
from .io import ensure_dir, save_text
from .locks import claim_run_dir, machine_activity


def is_launched_child() -> bool:
    """True in the processes Fabric / torchrun / srun start for ranks other than 0 (they write nothing)."""
    if "RANK" in os.environ:
        return os.environ["RANK"] != "0"
    if "SLURM_NTASKS" in os.environ and _slurm_launched():  # srun's tasks: Fabric reads SLURM_PROCID
        return os.environ.get("SLURM_PROCID", "0") != "0"
    return os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0"


def _slurm_launched() -> bool:
    """Whether Fabric takes its ranks from SLURM's variables (its ``SLURMEnvironment.detect``: a task
    of srun, not an interactive allocation's shell); lightning imported only under SLURM."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


# the files a run writes (runs.py, train.py); a start that left no checkpoint is cleared of these only
RUN_FILES = ("config.yaml", "log.jsonl", "model.safetensors", "head.npz", "embeddings.npy", "labels.npy",
             "hierarchy.npz")
MARKER = ".deepclust-run"  # written by fit into a run directory before anything else
MARKER_TEXT = json.dumps({"deepclust": "run directory", "written_by": "deepclust fit"}) + "\n"
OWN_FILES = (*RUN_FILES, "metrics.json", MARKER)  # what the run is made of: never an output's target
# every name the tool writes into a run directory (its outputs too); --overwrite replaces nothing else
TOOL_FILES = (*OWN_FILES, "report.html", "clusters.csv", "clusters.parquet")
_TMP = re.compile(r"^\.(?P<name>.+)\.\d+\.[0-9a-f]+\.tmp$")  # io.atomic_write's temporary names
_EVALUATED = re.compile(r"^metrics_evaluate(_[\w.-]+)?\.json$")  # evaluate's metrics


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


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def data_paths(spec: str | None) -> list[Path]:
    """The real paths a data spec reads: its npz files or its image folder (none for a named data set)."""
    if not isinstance(spec, str) or not spec.strip():
        return []
    kind, sep, arg = spec.strip().partition(":")
    if sep and kind.strip().lower() == "npz":
        return [_real(p.strip()) for p in arg.split(",") if p.strip()]
    if sep and kind.strip().lower() == "folder":
        return [_real(arg.strip())] if arg.strip() else []
    path = Path(spec.strip()).expanduser()  # a bare path (data.load_images reads it the same way)
    return [_real(path)] if path.is_dir() or path.suffix.lower() == ".npz" else []


def _is_folder(data: Path) -> bool:
    return data.is_dir() or data.suffix.lower() != ".npz"


def _home() -> Path | None:
    try:
        return _real(Path.home())
    except (RuntimeError, KeyError, OSError):
        return None


def check_out(out: Path, data_spec: str | None = None) -> None:
    """Refuse, before any lock or file, an ``--out`` (a real path) fit must never write: the file
    system's root or the home directory (a run would mix its files with everything there and
    ``--overwrite`` would take them), a file, a directory it cannot write or make, or the data
    ``data_spec`` reads: its folder, a folder inside it or holding it, a folder holding one of its npz
    files."""
    if out == out.parent:
        raise DataError(f"--out {out} is the root of the file system; give the run a directory of its own, "
                        "e.g. --out runs/NAME")
    if out == _home():
        raise DataError(f"--out {out} is the home directory; give the run a directory of its own, "
                        f"e.g. --out {out / 'runs' / 'NAME'}")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise DataError(f"--out {out} is not writable")
    above = next(p for p in out.parents if p.exists())  # where a new --out would be made
    if not out.exists() and not (above.is_dir() and os.access(above, os.W_OK | os.X_OK)):
        raise DataError(f"cannot write --out {out}: {above} is {'not writable' if above.is_dir() else 'a file'}")
    for data in data_paths(data_spec):
        folder = _is_folder(data)
        kind = "data folder" if folder else "data file"
        if out == data or folder and data in out.parents:
            where = "is" if out == data else "is inside"
        elif out in data.parents:
            where = "holds"
        else:
            continue
        raise DataError(f"--out {out} {where} the {kind} {data}; a run must not write into its data: "
                        "choose a directory outside it")


def holds_run(out: Path) -> bool:
    """A run is a directory with a checkpoint or a finished run's metrics.json."""
    return checkpoint_file(out).exists() or (out / "metrics.json").exists()


def has_marker(out: Path) -> bool:
    marker = out / MARKER
    return marker.is_file() and not marker.is_symlink()


WORK_ENV = "DEEPCLUST_RUN_WORK"  # the directory rank 0 writes, for the ranks Fabric launches


@contextmanager
def work_dir(out: Path, *, overwrite: bool, primary: bool, config_text: str) -> Iterator[Path]:
    """The directory a run is written to while the block runs, made and marked: ``out``, or for
    ``--overwrite`` a rebuild beside it under a name made unique here (``.OUT.partial-XXXXXXXX``: never a
    name of the user's) that replaces ``out`` when the block ends (:func:`swap_in`) and is removed if it
    fails (the old run untouched). Its first files: the marker that makes it recognisable as the
    tool's, then the resolved ``config.yaml``. Launched ranks, which write nothing, are told it by the
    environment."""
    if not primary:
        yield Path(os.environ.get(WORK_ENV) or out)
        return
    work = unique_dir(out, "partial") if overwrite else out
    try:
        ensure_dir(work)
        save_text(work / MARKER, MARKER_TEXT)  # first: what makes the directory recognisable as the tool's
        save_text(work / "config.yaml", config_text)
        os.environ[WORK_ENV] = str(work)
        yield work
    except BaseException:
        if overwrite:  # the rebuild this process made
            shutil.rmtree(work, ignore_errors=True)
        raise
    if overwrite:
        swap_in(work, out)


def fit_config(out: Path) -> bool:
    """``out`` holds the config.yaml fit writes (resolved: ``net.input_shape`` filled, so never a file
    of the user's)."""
    if not (out / "config.yaml").is_file():
        return False
    try:
        raw = read_yaml(str(out / "config.yaml"))
    except (DeepclustError, OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get("net"), dict) and raw["net"].get("input_shape") is not None


def failed_start(out: Path) -> bool:
    """No run, but the config.yaml fit writes: a first start that stopped before its first checkpoint."""
    return not holds_run(out) and fit_config(out)


def _tool_name(name: str, names: tuple[str, ...] = TOOL_FILES) -> bool:
    """``name`` (or the temporary file of one) is among ``names``; evaluate's metrics count with
    :data:`TOOL_FILES`."""
    tmp = _TMP.match(name)
    base = tmp.group("name") if tmp else name
    if names is TOOL_FILES and _EVALUATED.match(base):
        return True
    return base in names


def _entries(out: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(out) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot read --out {out}: {e.strerror or e}") from None


def foreign_entry(out: Path) -> str | None:
    """The first entry of ``out`` whose name the tool never writes there (``checkpoints/`` is looked
    into), or None."""
    for entry in _entries(out):
        if entry.name == "checkpoints" and entry.is_dir(follow_symlinks=False):
            inner = next((e.name for e in _entries(Path(entry.path)) if e.is_dir(follow_symlinks=False)
                          or not _tool_name(e.name, ("last.pt",))), None)
            if inner is not None:
                return f"checkpoints/{inner}"
        elif entry.is_dir(follow_symlinks=False) or not _tool_name(entry.name):
            return entry.name
    return None


def is_empty(out: Path) -> bool:
    """No entry but (at most) the marker: a start killed before its config.yaml counts as empty."""
    return not out.exists() or all(e.name == MARKER for e in _entries(out))


def check_replaceable(out: Path, kept: Path | None = None) -> None:
    """Refuse (one DataError line naming what was found) to replace ``out`` unless it is missing,
    empty, or the tool's directory (the marker, or without one the config.yaml fit writes) holding
    only names the tool writes (:data:`TOOL_FILES`, ``checkpoints/last.pt``, their
    temporary files, evaluate's metrics). ``kept``: where the new run waits, said in the message."""
    if not out.exists() or out.is_dir() and is_empty(out):
        return
    then = f"; the new run is kept in {kept}" if kept is not None else ""
    if not out.is_dir():
        raise DataError(f"--overwrite replaces only a deepclust run, and {out} is not a directory{then}")
    foreign = foreign_entry(out)
    if foreign is not None:
        raise DataError(f"--overwrite replaces only a deepclust run, and {out} holds '{foreign}', which deepclust "
                        f"did not write; move it out or choose another --out{then}")
    if not (has_marker(out) or fit_config(out)):
        raise DataError(f"--overwrite replaces only a deepclust run, and {out} is not one (no {MARKER} marker, "
                        f"no config.yaml written by fit); move its files or choose another --out{then}")


@contextmanager
def claimed_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Iterator[bool]:
    """The run directory ``out`` claimed by this process and made ready (:func:`prepare_out_dir`)
    while the machine is marked busy (``locks.machine_activity``); yields whether this process is
    the one a user started (ranks that Fabric launches claim and prepare nothing)."""
    primary = not is_launched_child()
    claim = claim_run_dir(out) if primary else None
    try:
        with machine_activity():
            if primary:
                prepare_out_dir(out, resume, overwrite)
            yield primary
    finally:
        if claim is not None:
            claim.release()


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked to, and anything not a run even then (called
    while holding the run's claim, after :func:`check_out`)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    clean_leftovers(out)
    stopped = failed_start(out)
    if resume:
        if stopped:
            raise DataError(f"nothing to resume in {out}: its first start stopped before its first checkpoint; "
                            "run fit without --resume to start it again")
        if not checkpoint_file(out).exists():
            raise DataError(f"nothing to resume: no checkpoint under {out / 'checkpoints'}")
    elif overwrite:
        check_replaceable(out)
    elif stopped:
        clear_failed_start(out)
        print(f"deepclust: {out} held a start that stopped before its first checkpoint; starting again",
              file=sys.stderr)
    elif holds_run(out) and (has_marker(out) or fit_config(out)):
        raise DataError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
    elif not is_empty(out):
        found = foreign_entry(out) or next(e.name for e in _entries(out) if e.name != MARKER)
        raise DataError(f"{out} is not empty and is not a deepclust run (it holds '{found}'); a run would mix its "
                        "files with it: choose an empty or new --out")


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


def unique_dir(out: Path, role: str) -> Path:
    """A new empty directory beside ``out``, ``.NAME.ROLE-XXXXXXXX``, made here (``mkdir`` fails on
    any existing name, so it is never a directory of the user's)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            path = out.with_name(f".{out.name}.{role}-{secrets.token_hex(4)}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise WriteError(e.filename or out.parent, e) from None


def clean_leftovers(out: Path) -> None:
    """Remove the rebuilds that killed ``--overwrite`` runs of ``out`` left (``.NAME.partial-*``): only
    directories carrying the marker and nothing but names the tool writes (call holding the claim)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        try:
            ours = path.is_dir() and not path.is_symlink() and has_marker(path) and foreign_entry(path) is None
        except DataError:  # unreadable: not known to be ours
            continue
        if ours:
            shutil.rmtree(path, ignore_errors=True)


def swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``work`` directory. An existing ``out`` must still be
    replaceable (:func:`check_replaceable`: a file added to it meanwhile stops the swap, the new run
    staying in ``work``); it is renamed to a backup directory made unique here and removed only once
    the new run is in place. ``out`` is taken as the directory it names (a link to it is left
    pointing at the new run)."""
    out = Path(os.path.realpath(out))
    backup = None
    if out.exists():
        check_replaceable(out, kept=work)
        backup = unique_dir(out, "old")
    try:
        if backup is not None:
            os.replace(out, backup)  # onto the empty directory just made
        try:
            os.replace(work, out)
        except OSError:
            if backup is not None:
                os.replace(backup, out)  # the old run back in its place
            raise
    except OSError as e:
        raise WriteError(e.filename or out, e) from None
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def read_run_config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.exists():
        raise DataError(f"not a run directory (no config.yaml): {run}")
    return read_yaml(str(path))


def _run_data_spec(run: Path) -> str | None:
    """The data spec of the run's config.yaml, None when it cannot be read (its readers say why)."""
    try:
        raw = read_yaml(str(run / "config.yaml")) if (run / "config.yaml").is_file() else None
    except (DeepclustError, OSError, ValueError):
        return None
    data = raw.get("data") if isinstance(raw, dict) else None
    return data.get("spec") if isinstance(data, dict) else None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _run_file_hit(target: Path, run: Path) -> str | None:
    """What of the run ``target`` would overwrite (links, ``..`` and hard links seen through), or None."""
    checkpoints = run / "checkpoints"
    if target == run:
        return f"would overwrite the run directory {run}"
    if target == checkpoints or checkpoints in target.parents:
        return f"would write into the run's checkpoints ({checkpoints})"
    for name in OWN_FILES:
        if target == run / name or _same_file(target, run / name):
            return f"would overwrite the run's {name} ({run / name})"
    return None


def check_output(out: str | Path, run: str | Path, *, data: str | None = None, flag: str = "--out") -> None:
    """Refuse an output file that would overwrite what it is made from, in one DataError line naming
    both: the run directory, one of the run's own files (:data:`OWN_FILES`, anything under
    ``checkpoints/``), or input data (``data``: predict's data spec; the run's own data spec): a data
    file, or any path inside a data folder. The tool's outputs in a run (``report.html``,
    ``clusters.*``) may be written again."""
    target, source = _real(out), _real(run)
    hit = _run_file_hit(target, source) if source.is_dir() else None
    if hit is not None:
        raise DataError(f"{flag} {out} {hit}; write it elsewhere")
    for spec, whose in ((data, "--data"), (_run_data_spec(source), "the run's data")):
        for path in data_paths(spec):
            if target == path or path in target.parents or _same_file(target, path):
                what = "write into the input data folder" if _is_folder(path) else "overwrite the input data file"
                raise DataError(f"{flag} {out} would {what} {path} ({whose}); write it elsewhere")
