"""Atomic file writes: the one helper every file of a run goes through.

A file is written to a uniquely named temporary file beside it (``.NAME.<pid>.<random>.tmp``, so two
writers never share one), flushed to disk, then renamed over the target (``os.replace``): a reader
sees the old file or the new one, never a half-written one, and a killed writer leaves at worst a
stray temporary file, never a broken target.

A write that fails (no space, quota, permission, read-only file system) raises
:class:`~deepclust.errors.WriteError` in one line naming the path and the errno, after removing its
temporary file: the target keeps its previous content. Writers that wrap the file (``torch.save``
reports a failed write as ``RuntimeError: unexpected pos``) are seen through: every write goes
through :func:`_write`, which keeps the first ``OSError``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from .errors import DataError, WriteError


def _write(f: BinaryIO, data) -> int:
    """The one low-level write under every atomic write and every log append."""
    return f.write(data)


class _Recorded:
    """The temporary file as the writer sees it: every write goes through :func:`_write`, and the
    first ``OSError`` is kept (some writers turn it into another exception)."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return _write(self._f, data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically; ``write`` receives the open temporary file (binary)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    recorded = None
    try:
        with open(tmp, "wb") as f:
            recorded = _Recorded(f)
            write(recorded)
            recorded.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        cause = recorded.error if recorded is not None and recorded.error is not None else e
        if isinstance(cause, OSError) and not isinstance(e, KeyboardInterrupt):
            raise WriteError(path, cause) from None
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:  # a directory that cannot be written was never written: nothing to remove
        pass


def append_text(path: str | Path, text: str) -> None:
    """Append to a file (a log); a failed write raises WriteError naming the path and the errno."""
    try:
        with open(path, "ab") as f:
            _write(f, text.encode("utf-8"))
    except OSError as e:
        raise WriteError(path, e) from None


def check_target(out: str | Path, example: str) -> None:
    """Refuse, before any work, an output file that cannot be written there (one-line DataError;
    ``example``: a file name to suggest when ``out`` is a directory)."""
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give a file name such as {out / example}")
    if not out.parent.is_dir():
        raise DataError(f"no such directory: {out.parent}")


def ensure_dir(path: str | Path) -> None:
    """Create a directory (and its parents); a failure raises WriteError naming the path and the errno."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from None


def save_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_text(path: str | Path, text: str) -> None:
    save_bytes(path, text.encode("utf-8"))


def save_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN or infinity raise ValueError: write None instead)."""
    save_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def save_array(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
