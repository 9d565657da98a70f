"""A sharded image store on disk: images decoded once to uint8 at their training size, read back by
global index without holding the set in memory (``datapath.py`` decides when a run streams from one).

Layout of a store directory (``DEVELOPERS.md``, "Data larger than memory", has the measurements
behind the format):
 - ``shard-00000.npy`` ...: ``.npy`` files of ``(rows, C, H, W)`` uint8, C-order, the layout the
   device reads (no transpose per batch); every shard but the last holds ``rows_per_shard`` images
   (about :data:`SHARD_BYTES`). Each is read through a read-only ``mmap``: a batch is one sorted
   fancy index per shard it touches, and the pages it touched are handed back to the kernel right
   after it (``MADV_DONTNEED``), so the process's resident memory stays at a few batches whatever
   the store's size (the pages stay in the kernel's page cache, which is reclaimable). Readahead is
   off for images smaller than :data:`RANDOM_BELOW` (``MADV_RANDOM``), on for larger ones.
 - ``labels.npy``, ``split.npy`` (when the source has them), ``names.json`` (file names), and
   ``source.json``: the source's files (name, size, mtime in ns) when it has files (a folder, npz).
 - ``manifest.json``, written last: the format, the source's fingerprint (spec, split, resize and
   the SHA-256 of ``source.json``'s listing), the shape, and for every file its size, mtime and the
   SHA-256 of its content (of a shard: of its pixel bytes; its header is checked field by field).

Written atomically: every file goes through ``io.atomic_write`` into a temporary directory beside
the store (``.NAME.partial-HOST-PID-XXXX``), which is renamed to the store's name last. A full disk,
an error or a kill while writing leaves no directory of that name (a later run finds no store and
writes it again); a temporary directory left by a killed writer on this host is removed by the next
write. Two writers of the same store (the processes of a multi-node run on a shared file system):
the first rename wins and the other opens it.

Checked when opened (:func:`open_store`), refused in one line naming the file (DataError):
 - always (cheap: one ``stat`` per file): every file of the manifest present, of its recorded size;
   a file whose mtime differs from the manifest's is hashed, and refused unless its SHA-256 matches
   (a store copied without its times costs one read of it per open);
 - with ``verify=True``: every file hashed.
 - the source: a fingerprint that differs from the data the run names (another spec, split or
   resize; a file of a folder or npz added, removed or modified), naming the first changed file.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import mmap
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import DataError, WriteError
from ..io import atomic_write, ensure_dir, save_array, save_json, save_text

STORE_FORMAT = 1
MANIFEST = "manifest.json"
SOURCE = "source.json"
SHARD_BYTES = 256 * 2**20  # about 256 MiB a shard: a checksum of one is a fraction of a second
HASH_BLOCK = 16 * 2**20
RANDOM_BELOW = 128 * 2**10  # images smaller than the kernel's default readahead window are read without it


@dataclass
class StoreInput:
    """What a store is written from (``data.store_input``): images in ``ImageSet`` layout
    (``(n, H, W)`` or ``(n, H, W, 3)`` uint8) chunk by chunk, and the rest once they are read."""

    shape: tuple[int, int, int]  # (C, H, W) of every image
    chunks: Iterable[np.ndarray]
    fields: Callable[[], dict[str, Any]]  # after the chunks: labels, split, names, classes, skipped
    fingerprint: dict[str, Any]  # spec, split, resize (data.fingerprint)
    files: list[list] | None = None  # the source's files: [name, size, mtime_ns]


# -- fingerprints ----------------------------------------------------------------------------------

def listing_digest(files: list[list] | None) -> str | None:
    """SHA-256 of a source's file listing (names, sizes, mtimes), or None without files."""
    if files is None:
        return None
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


def first_change(old: list[list] | None, new: list[list] | None) -> str:
    """The first file that differs between two listings, in words."""
    old_map, new_map = {f[0]: f[1:] for f in old or []}, {f[0]: f[1:] for f in new or []}
    for name in sorted(old_map.keys() | new_map.keys()):
        if name not in new_map:
            return f"{name} was removed"
        if name not in old_map:
            return f"{name} was added"
        if old_map[name] != new_map[name]:
            return f"{name} was modified"
    return "its files differ"


# -- writing ---------------------------------------------------------------------------------------

def _header(rows: int, shape: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (rows, *shape)})
    return buf.getvalue()


class _Rows:
    """NCHW uint8 rows from chunks in ImageSet layout, taken ``limit`` at a time across chunk bounds;
    records whether every image equals the first."""

    def __init__(self, chunks: Iterable[np.ndarray], shape: tuple[int, int, int]):
        self.chunks, self.shape = iter(chunks), shape
        self.pending: np.ndarray | None = None
        self.first: np.ndarray | None = None
        self.identical, self.count = True, 0

    def more(self) -> bool:
        """Whether any row is left (reads the next chunk when none is pending)."""
        if self.pending is None or not len(self.pending):
            self.pending = self._next_chunk()
        return self.pending is not None

    def _next_chunk(self) -> np.ndarray | None:
        for chunk in self.chunks:
            chunk = chunk[..., None] if chunk.ndim == 3 else chunk
            if chunk.shape[1:] != (*self.shape[1:], self.shape[0]) or chunk.dtype != np.uint8:
                raise DataError(f"images of shape {chunk.shape[1:]} ({chunk.dtype}) among images of "
                                f"{self.shape[1]}x{self.shape[2]}x{self.shape[0]}")
            if len(chunk):
                nchw = np.ascontiguousarray(chunk.transpose(0, 3, 1, 2))
                self.first = nchw[0].copy() if self.first is None else self.first
                self.identical = self.identical and bool((nchw == self.first).all())
                return nchw
        return None

    def take(self, limit: int) -> Iterator[np.ndarray]:
        """Up to ``limit`` rows, piece by piece."""
        left = limit
        while left and self.more():
            piece, self.pending = self.pending[:left], self.pending[left:]
            left -= len(piece)
            self.count += len(piece)
            yield piece


def _write_shard(path: Path, rows: _Rows, capacity: int, shape: tuple[int, int, int]) -> dict | None:
    """One shard of at most ``capacity`` rows (None when no rows are left): the pixel bytes after a
    reserved header, then the header of the rows written. Its manifest entry."""
    digest, count, reserved = hashlib.sha256(), [0], len(_header(capacity, shape))

    def write(f) -> None:
        f.write(b"\0" * reserved)
        for piece in rows.take(capacity):
            f.write(memoryview(piece).cast("B"))
            digest.update(memoryview(piece).cast("B"))
            count[0] += len(piece)
        header = _header(count[0], shape)
        if len(header) != reserved:
            raise AssertionError(f"npy header of {count[0]} rows is {len(header)} bytes, not {reserved}")
        f.seek(0)
        f.write(header)

    if not rows.more():  # a shard only when rows remain
        return None
    atomic_write(path, write)
    return {"file": path.name, "rows": count[0], "sha256": digest.hexdigest(), **_stat(path)}


def _stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _side_files(tmp: Path, fields: dict[str, Any], files: list[list] | None) -> dict[str, dict]:
    """labels.npy, split.npy, names.json and source.json as given; their manifest entries."""
    written = {}
    for key in ("labels", "split"):
        if fields.get(key) is not None:
            save_array(tmp / f"{key}.npy", np.asarray(fields[key]))
            written[key] = f"{key}.npy"
    if fields.get("names") is not None:
        save_text(tmp / "names.json", json.dumps(list(fields["names"])))
        written["names"] = "names.json"
    if files is not None:
        save_text(tmp / SOURCE, json.dumps(files, separators=(",", ":")))
        written["source"] = SOURCE
    return {key: {"file": name, "sha256": file_digest(tmp / name), **_stat(tmp / name)}
            for key, name in written.items()}


def _partial_name(directory: Path) -> str:
    return f".{directory.name}.partial-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _remove_dead_partials(directory: Path) -> None:
    """Temporary directories of writers on this host that are no longer running."""
    prefix = f".{directory.name}.partial-{socket.gethostname()}-"
    for p in directory.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_store(directory: str | Path, source: StoreInput, shard_bytes: int | None = None) -> bool:
    """Write the store at ``directory`` (which must not hold one) from ``source``, atomically (module
    docstring), in shards of about ``shard_bytes`` (default :data:`SHARD_BYTES`). Returns False when
    another writer's store took the name first (then open that one)."""
    directory, shard_bytes = Path(directory), shard_bytes or SHARD_BYTES
    ensure_dir(directory.parent)
    _remove_dead_partials(directory)
    tmp = directory.parent / _partial_name(directory)
    t0 = time.perf_counter()
    try:
        ensure_dir(tmp)
        manifest = _write_contents(tmp, source, shard_bytes)
        manifest["write_seconds"] = round(time.perf_counter() - t0, 3)
        save_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        return _rename_into_place(tmp, directory)
    except WriteError as e:  # named by the store, not by its temporary file
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(directory, OSError(e.errno, os.strerror(e.errno) if e.errno else str(e))) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_contents(tmp: Path, source: StoreInput, shard_bytes: int) -> dict[str, Any]:
    """Every shard and side file into ``tmp``; the manifest (without its write time)."""
    c, h, w = source.shape
    capacity = max(1, shard_bytes // (c * h * w))
    rows, shards = _Rows(source.chunks, source.shape), []
    while (entry := _write_shard(tmp / f"shard-{len(shards):05d}.npy", rows, capacity, source.shape)) is not None:
        shards.append(entry)
    if not rows.count:
        raise DataError(f"no images found in '{source.fingerprint.get('spec')}'")
    fields = source.fields()
    return {"format": STORE_FORMAT, "kind": "deepclust image store",
            "fingerprint": {**source.fingerprint, "files": listing_digest(source.files)},
            "n": rows.count, "shape": list(source.shape), "layout": "NCHW", "dtype": "uint8",
            "rows_per_shard": capacity, "identical": rows.identical, "shards": shards,
            "side": _side_files(tmp, fields, source.files), "classes": fields.get("classes"),
            "skipped": list(fields.get("skipped") or [])}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_into_place(tmp: Path, directory: Path) -> bool:
    """Rename the written store to its name (an empty directory there is replaced); False when
    another store is there already (that writer won)."""
    try:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        os.rename(tmp, directory)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (directory / MANIFEST).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise WriteError(directory, e) from None
    _fsync_dir(directory.parent)
    return True


# -- opening and validating -----------------------------------------------------------------------

def file_digest(path: Path, offset: int = 0) -> str:
    """SHA-256 of a file's bytes from ``offset`` on, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def is_store(directory: str | Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"store {directory}: {MANIFEST} is missing (not a store, or deleted)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"store {directory}: cannot read {MANIFEST}: {str(e).splitlines()[0][:120]}") from None
    keys = ("format", "fingerprint", "n", "shape", "rows_per_shard", "shards", "side")
    if not isinstance(manifest, dict) or any(k not in manifest for k in keys) \
            or manifest["format"] != STORE_FORMAT:
        raise DataError(f"store {directory}: {MANIFEST} is not a deepclust store manifest of this version")
    return manifest


def _check_file(directory: Path, entry: dict, offset: int, verify: bool) -> None:
    """One file of the store against its manifest entry (module docstring: what runs when)."""
    path = directory / entry["file"]
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"store {directory}: {entry['file']} is missing (deleted?); remove the store to "
                        "write it again") from None
    if st.st_size != entry["bytes"]:
        raise DataError(f"store {directory}: {entry['file']} is {st.st_size} bytes, the manifest says "
                        f"{entry['bytes']} (truncated or changed); remove the store to write it again")
    if (verify or st.st_mtime_ns != entry["mtime_ns"]) and file_digest(path, offset) != entry["sha256"]:
        raise DataError(f"store {directory}: {entry['file']} was changed (its SHA-256 differs from the "
                        "manifest's); remove the store to write it again")


def check_files(directory: Path, manifest: dict, verify: bool = False) -> None:
    """Every shard and side file present, of its size; hashed when its mtime moved or ``verify``."""
    header = len(_header(manifest["rows_per_shard"], tuple(manifest["shape"])))
    for entry in manifest["shards"]:
        _check_file(directory, entry, header, verify)
    for entry in manifest["side"].values():
        _check_file(directory, entry, 0, verify)


def check_source(directory: Path, manifest: dict, fingerprint: dict, files: list[list] | None) -> None:
    """The store was written from the data the run names; DataError naming what changed."""
    old = manifest["fingerprint"]
    for key in ("spec", "split", "resize"):
        if old.get(key) != fingerprint.get(key):
            raise DataError(f"store {directory} holds {key} {old.get(key)!r}, not {fingerprint.get(key)!r}; "
                            "give another --store")
    if old.get("files") != listing_digest(files):
        before = json.loads((directory / SOURCE).read_text()) if (directory / SOURCE).is_file() else None
        raise DataError(f"store {directory} was written from other data: {first_change(before, files)} since; "
                        "remove the store (or give another --store) to write it again")


def open_store(directory: str | Path, *, fingerprint: dict | None = None, files: list[list] | None = None,
               verify: bool = False) -> "Store":
    """The store at ``directory``, checked (module docstring); ``fingerprint`` and ``files``: the
    source the run names, checked when given."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if fingerprint is not None:
        check_source(directory, manifest, fingerprint, files)
    check_files(directory, manifest, verify)
    return Store(directory, manifest)


# -- reading ---------------------------------------------------------------------------------------

class Store:
    """An opened store: images by global index (:meth:`read`), contiguous runs (:meth:`read_range`),
    and what the source knew about them (:meth:`fields`)."""

    def __init__(self, directory: Path, manifest: dict):
        self.directory, self.manifest = directory, manifest
        self.n, self.shape = int(manifest["n"]), tuple(int(v) for v in manifest["shape"])
        self.rows_per_shard = int(manifest["rows_per_shard"])
        self.maps: list[mmap.mmap] = []
        self.shards: list[np.ndarray] = []
        for entry in manifest["shards"]:
            self._map(directory / entry["file"], int(entry["rows"]))

    def _map(self, path: Path, rows: int) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
            if (shape, fortran, dtype) != ((rows, *self.shape), False, np.dtype(np.uint8)) or version != (1, 0):
                raise DataError(f"store {self.directory}: {path.name} holds {shape} {dtype}, the manifest says "
                                f"{(rows, *self.shape)} uint8; remove the store to write it again")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        # no readahead for images smaller than its window: a 1 KB image would read 128 KB from disk
        mm.madvise(mmap.MADV_RANDOM if int(np.prod(self.shape)) < RANDOM_BELOW else mmap.MADV_NORMAL)
        self.maps.append(mm)
        self.shards.append(np.frombuffer(mm, np.uint8, rows * int(np.prod(self.shape)), offset)
                           .reshape(rows, *self.shape))

    @property
    def nbytes(self) -> int:
        return self.n * int(np.prod(self.shape))

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 ``(len(index), C, H, W)`` of the images at ``index`` (any order, repeats allowed):
        one sorted fancy index per shard touched, the pages it touched handed back after each (the
        kernel maps up to 64 KB around every page a read faults in: without the release a random
        batch of 400 28x28 images left 30 MB resident)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= self.n):
            raise IndexError(f"image index out of range 0..{self.n - 1}")
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        out = np.empty((len(index), *self.shape), np.uint8)
        shard_of = ordered // self.rows_per_shard
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        sorted_rows = np.empty_like(out)
        for s in np.flatnonzero(np.diff(bounds)):  # one fancy index per shard touched, not per image
            a, b = bounds[s], bounds[s + 1]
            np.take(self.shards[s], ordered[a:b] - s * self.rows_per_shard, axis=0, out=sorted_rows[a:b])
            self.maps[s].madvise(mmap.MADV_DONTNEED)  # the pages it touched (and faulted around) handed back
        out[order] = sorted_rows
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """uint8 ``(stop - start, C, H, W)``: images ``start`` .. ``stop - 1`` (a copy)."""
        return self.read(np.arange(start, stop))

    def fields(self) -> dict[str, Any]:
        """labels, split, names, classes and skipped files as the source gave them (None where it had none)."""
        side, out = self.manifest["side"], {}
        for key in ("labels", "split"):
            out[key] = np.load(self.directory / side[key]["file"]) if key in side else None
        out["names"] = json.loads((self.directory / side["names"]["file"]).read_text()) if "names" in side else None
        out["classes"] = self.manifest.get("classes")
        out["skipped"] = list(self.manifest.get("skipped") or [])
        return out


class StoredImages:
    """The images of a store as ``ImageSet.images`` sees them, read on demand: ``shape`` (N, H, W)
    or (N, H, W, 3), indexing by an integer, a slice, integer indices or a mask returns a numpy
    array in that layout, :meth:`nchw` the training layout. ``rows``: the store's rows this view
    holds (a subset), in order; None for all. Never converted whole (``np.asarray`` refuses)."""

    def __init__(self, store: Store, rows: np.ndarray | None = None):
        self.store, self.rows = store, None if rows is None else np.asarray(rows, dtype=np.int64)
        c, h, w = store.shape
        n = store.n if rows is None else len(self.rows)
        self.shape = (n, h, w) if c == 1 else (n, h, w, c)
        self.ndim, self.dtype = len(self.shape), np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def _store_rows(self, index: np.ndarray) -> np.ndarray:
        return index if self.rows is None else self.rows[index]

    def positions(self, key) -> np.ndarray:
        """This view's positions a key names (int, slice, integer array or boolean mask)."""
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        key = np.asarray(key)
        if key.dtype == bool:
            return np.flatnonzero(key)
        key = key.astype(np.int64)
        return np.where(key < 0, key + len(self), key)

    def nchw(self, key) -> np.ndarray:
        """uint8 (n, C, H, W) of the images ``key`` names."""
        return self.store.read(self._store_rows(self.positions(key)))

    def __getitem__(self, key):
        scalar = isinstance(key, (int, np.integer))
        x = self.nchw([key] if scalar else key)
        x = x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x[0] if scalar else x)

    def subset(self, index: np.ndarray) -> "StoredImages":
        return StoredImages(self.store, self._store_rows(self.positions(index)))

    def identical(self, chunk: int = 4096) -> bool:
        """Every image equal to the first (the store's record for the whole store; else read in chunks)."""
        if self.rows is None:
            return bool(self.store.manifest["identical"])
        first = self.nchw([0])
        return all((self.nchw(slice(i, i + chunk)) == first).all() for i in range(0, len(self), chunk))

    def __array__(self, *args, **kwargs):
        raise TypeError(f"refusing to load the {len(self)} stored images whole: read them by index")
