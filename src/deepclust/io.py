"""Atomic file writes: the one helper every file of a run goes through.

A file is written to a uniquely named temporary file beside it (``.NAME.<pid>.<random>.tmp``, so two
writers never share one), flushed to disk, then renamed over the target (``os.replace``): a reader
sees the old file or the new one, never a half-written one, and a killed writer leaves at worst a
stray temporary file, never a broken target.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically; ``write`` receives the open temporary file (binary)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
