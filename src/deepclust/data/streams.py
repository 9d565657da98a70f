"""The data a spec names, read chunk by chunk to write a store (``store.py``) without holding the set
in memory, its size known beforehand where that is cheap, and its fingerprint.

 - ``folder:`` -- a header pass (Pillow opens each file without decoding it: its mode and size) decides
   grey or colour and checks the sizes, as :func:`~.sources.load_folder` does after decoding; then
   :func:`chunk_rows` files at a time are decoded (``sources.read_files``: the same images, names and
   skipped files, in the same order). Palette images are decoded in the header pass (a palette of
   greys is a grey image). A folder whose only colour files fail to decode is stored as colour.
 - ``npz:`` -- the ``images`` member is read from the archive :func:`chunk_rows` rows at a time (decompressed as it
   goes); a non-uint8 array gets one pass for its range first, so that its conversion is
   :func:`~.sources.to_uint8`'s on the whole array. Every split is stored: the run selects its split
   from the store, as from the loaded array.
 - torchvision sets and digits (at most a few hundred MB decoded) are loaded, then written.
The stored images equal what :func:`~deepclust.data.load_images` returns, bit for bit
(``tests/test_store.py``).

Fingerprint: the spec (npz paths made absolute), the split where the source reads only that split
(torchvision), the resize; a folder's or npz's files as [name, size, mtime in ns] (``store.py``
records their digest, and names the first changed file).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from ..errors import DataError
from .sources import (ImageSet, check_npz_layouts, folder_labels, image_files, join_npz_fields, normalise_layout,
                      npz_fields, npz_paths, open_npz, read_files, read_image, report_skipped, resize_all)
from .store import StoreInput

CHUNK_BYTES = 16 * 2**20  # decoded images converted at a time (a few copies of it are alive while writing)


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Images of ``shape`` (one image's) per chunk: CHUNK_BYTES of them decoded, 1 to 1024."""
    return int(max(1, min(1024, CHUNK_BYTES // max(1, int(np.prod(shape))))))
GREY_MODES = ("1", "L", "LA", "La", "F")  # and every "I..." mode: sources.read_image's grey modes


# -- sizes and fingerprints ------------------------------------------------------------------------

def listing(kind: str, arg: str) -> list[list] | None:
    """[name, size, mtime_ns] of every file a folder or npz source reads (None for the others)."""
    if kind == "npz":
        paths = [(str(p.resolve()), p) for p in npz_paths(arg, arg)]
    elif kind == "folder":
        base = Path(arg).expanduser()
        paths = [(rel, base / rel) for rel, _ in image_files(base)]
    else:
        return None
    return [[name, *_size_mtime(path)] for name, path in paths]


def _size_mtime(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:  # a broken link: listed, and read as unreadable
        return -1, -1
    return st.st_size, st.st_mtime_ns


def fingerprint(kind: str, arg: str, spec: str, split: str, resize: int | None) -> dict[str, Any]:
    """What the store of this source must have been written from (module docstring)."""
    if kind == "npz":
        spec = "npz:" + ",".join(str(p.resolve()) for p in npz_paths(arg, spec))
    elif kind == "folder":
        spec = f"folder:{Path(arg).expanduser().resolve()}"
    return {"spec": spec, "split": split if kind == "torchvision" else "all", "resize": resize}


def _npz_header(path: Path) -> tuple[tuple[int, ...], np.dtype, zipfile.ZipFile, Any]:
    """(shape, dtype) of an npz file's ``images`` member, with the archive and the member left open
    just past its header."""
    try:
        archive = zipfile.ZipFile(path)
        member = archive.open("images.npy")
        version = np.lib.format.read_magic(member)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read npz file {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if fortran or dtype.hasobject:
        raise DataError(f"npz file {path}: 'images' is {'Fortran-ordered' if fortran else 'an object array'}; "
                        "save it C-ordered as numbers to stream it")
    return shape, dtype, archive, member


def _layout(shape: tuple[int, ...], resize: int | None) -> tuple[int, int, int]:
    """(C, H, W) of the images of an array shaped ``shape`` once normalised (and resized)."""
    channels = 1 if len(shape) == 3 or shape[3] == 1 else 3
    return (channels, resize, resize) if resize else (channels, int(shape[1]), int(shape[2]))


def probe(kind: str, arg: str, split: str, resize: int | None) -> tuple[int, int, int, int] | None:
    """(N, C, H, W) of the decoded images, cheaply: an npz's headers (and its split), a folder's file
    count and first image (its channels a floor: one colour image later makes all colour); None
    for the sets that are loaded to be known."""
    if kind == "npz":
        n, layout = 0, None
        for path in npz_paths(arg, arg):
            shape, _, archive, _ = _npz_header(path)
            archive.close()
            n += _split_count(path, shape[0], split)
            layout = _layout(shape, resize)
        return (n, *layout)
    if kind == "folder":
        base = Path(arg).expanduser()
        visible = [rel for rel, hidden in image_files(base)] if base.is_dir() else []
        for rel in visible:
            head = _header(base / rel)
            if head is not None:
                (h, w), colour = head
                return (len(visible), 3 if colour else 1, resize or h, resize or w)
    return None


def _split_count(path: Path, n: int, split: str) -> int:
    if split == "all":
        return n
    with open_npz(path) as z:
        ids = z["split"].reshape(-1) if "split" in z.files else None
    return n if ids is None else int((ids == (0 if split == "train" else 1)).sum())


# -- folders ---------------------------------------------------------------------------------------

def _header(path: Path) -> tuple[tuple[int, int], bool] | None:
    """((height, width), colour) of an image file from its header (a palette image decoded), or None
    when it cannot be opened (the decoding pass reports it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(path) as im:
                mode, size = im.mode, (im.height, im.width)
            if mode in ("P", "PA"):
                return size, read_image(path).ndim == 3
        except Exception:  # unreadable, too large, ...: skipped when decoded, with its reason
            return None
    return size, not (mode in GREY_MODES or mode.startswith("I"))


def folder_input(root: str, spec: str, resize: int | None, fingerprint_: dict, files: list[list]) -> StoreInput:
    """A folder's images (``sources.load_folder``'s, chunk by chunk) as a store's input."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"no such file or directory: {base}" if not base.exists() else f"not a directory: {base}")
    listed = image_files(base)
    heads = [h for h in (_header(base / rel) for rel, hidden in listed if not hidden) if h is not None]
    if not heads:
        raise DataError(f"no images found under {base}")
    colour = any(c for _, c in heads)
    sizes = sorted({s for s, _ in heads})
    if not resize and len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise DataError(f"images under {base} have mixed sizes ({shown}); pass resize=SIDE (--resize SIDE) "
                        "to resize them all")
    seen: dict[str, list] = {"names": [], "skipped": []}

    h, w = (resize, resize) if resize else sizes[0]
    step = chunk_rows((3 if colour else 1, h, w))

    def chunks() -> Iterator[np.ndarray]:
        for i in range(0, len(listed), step):
            images, names, bad = read_files(base, listed[i:i + step])
            seen["names"] += names
            seen["skipped"] += bad
            if colour:
                images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
            if images:
                yield resize_all(images, resize) if resize else _stacked(images, base)

    def fields() -> dict[str, Any]:
        report_skipped(seen["skipped"], base)
        labels, classes = folder_labels(seen["names"], base)
        return {"labels": labels, "names": seen["names"], "classes": classes, "skipped": seen["skipped"]}

    return StoreInput((3 if colour else 1, h, w), chunks(), fields, fingerprint_, files)


def _stacked(images: list[np.ndarray], base: Path) -> np.ndarray:
    shapes = sorted({im.shape[:2] for im in images})
    if len(shapes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in shapes[:4])
        raise DataError(f"images under {base} have mixed sizes ({shown}); pass resize=SIDE (--resize SIDE) "
                        "to resize them all")
    return np.stack(images)


# -- npz archives ----------------------------------------------------------------------------------

def _uint8_rule(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> float | None:
    """The factor ``sources.to_uint8`` applies to this array (1 or 255; None: kept as uint8), from one
    pass over its values where they are not uint8; the same refusals."""
    if dtype == np.uint8:
        return None
    if dtype == bool:
        return 255.0
    where = f"npz file {path}"
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise DataError(f"{where}: images must be numbers, got dtype {dtype}")
    lo, hi = np.inf, -np.inf
    for rows in _member_rows(path, shape, dtype):
        x = rows.astype(np.float64)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        lo, hi = min(lo, float(x.min(initial=np.inf))), max(hi, float(x.max(initial=-np.inf)))
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: image values must lie in [0, 1] or [0, 255], found [{lo:g}, {hi:g}]")
    return 255.0 if np.issubdtype(dtype, np.floating) and hi <= 1.0 else 1.0


def _member_rows(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
    """The ``images`` member's rows, :func:`chunk_rows` at a time, as stored."""
    _, _, archive, member = _npz_header(path)
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    step = chunk_rows((row,))
    with archive, member:
        for start in range(0, shape[0], step):
            count = min(step, shape[0] - start)
            data = member.read(count * row)
            if len(data) != count * row:
                raise DataError(f"npz file {path}: 'images' ends after {start + len(data) // max(row, 1)} of "
                                f"{shape[0]} images (truncated)")
            yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


def npz_input(paths: str, spec: str, resize: int | None, fingerprint_: dict, files: list[list]) -> StoreInput:
    """npz archives' images (``sources.load_npz``'s, chunk by chunk) as a store's input."""
    paths_ = npz_paths(paths, spec)
    heads = []
    for path in paths_:
        shape, dtype, archive, _ = _npz_header(path)
        archive.close()
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
            raise DataError(f"npz file {path}: expected images shaped (N,H,W) or (N,H,W,3), got {tuple(shape)}")
        with open_npz(path) as z:
            heads.append((shape, dtype, npz_fields(z, path, shape[0])))
    layouts = {_layout(shape, resize) for shape, _, _ in heads}
    check_npz_layouts({(h, w) if c == 1 else (h, w, 3) for c, h, w in layouts}, spec)

    def chunks() -> Iterator[np.ndarray]:
        for path, (shape, dtype, _) in zip(paths_, heads):
            factor, where = _uint8_rule(path, shape, dtype), f"npz file {path}"
            for rows in _member_rows(path, shape, dtype):
                if factor is not None:
                    rows = np.round(rows.astype(np.float64) * factor).astype(np.uint8)
                rows = normalise_layout(rows, where)
                yield resize_all(rows, resize) if resize else rows

    def fields() -> dict[str, Any]:
        return join_npz_fields([f for _, _, f in heads], paths_)

    return StoreInput(layouts.pop(), chunks(), fields, fingerprint_, files)


# -- sets loaded whole -----------------------------------------------------------------------------

def array_input(images: ImageSet, fingerprint_: dict, files: list[list] | None = None) -> StoreInput:
    """Images held in memory (a torchvision set, digits, an array given to ``Clusterer``) as a store's input."""
    n, step = len(images), chunk_rows(images.images.shape[1:])

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, step):
            yield np.asarray(images.images[start:start + step], dtype=np.uint8)

    def fields() -> dict[str, Any]:
        return {"labels": images.labels, "split": images.split, "names": images.names,
                "classes": images.classes, "skipped": images.skipped}

    return StoreInput((images.channels, *images.image_size), chunks(), fields, fingerprint_, files)


def array_listing(images: ImageSet) -> list[list]:
    """The fingerprint of images given in memory: their shape and the SHA-256 of their bytes."""
    import hashlib

    digest, step = hashlib.sha256(), chunk_rows(images.images.shape[1:])
    for start in range(0, len(images), step):
        digest.update(np.ascontiguousarray(images.images[start:start + step]))
    return [["array", list(images.images.shape), digest.hexdigest()]]
