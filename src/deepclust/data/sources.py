"""The :class:`ImageSet` every source returns, and the local sources: scikit-learn's digits, ``.npz``
arrays and folders of image files.

Conventions shared by every source (the torchvision-backed ones in :mod:`.torchvision_sets` too):
images are ``uint8``, shaped ``(N, H, W)`` for grayscale or ``(N, H, W, 3)`` for RGB, C-contiguous;
``labels`` int64 ``(N,)`` in 0..C-1 (:func:`finalise`); ``split`` int8 ``(N,)`` with 0 = train and
1 = test. Every user mistake raises :class:`~deepclust.errors.DataError` with a one-line message; what
is loaded anyway but said (files skipped, a field dropped) is one ``deepclust: warning:`` line on
stderr. A resize is checked against the available memory before any image is resized
(``limits.check_resized``). Image files are read as a viewer shows them (EXIF orientation applied);
Pillow's own warnings never reach stderr.
"""

from __future__ import annotations

import heapq
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError
from ..limits import check_resized

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MAX_LISTED = 20  # skipped files named in the folder warning before "and N more"


class UnreadableImage(DataError):
    """An image file that is not read; the message is the reason (``too large, W x H pixels``)."""


@dataclass
class ImageSet:
    """Images with whatever the source knows about them; all per-image fields are aligned."""

    images: np.ndarray  # uint8, (N, H, W) grayscale or (N, H, W, 3) RGB, C-contiguous; or the same
                        # read from a store on demand (``data.store.StoredImages``, see ``in_memory``)
    labels: np.ndarray | None = None  # int64 (N,): true classes, for evaluation only
    split: np.ndarray | None = None  # int8 (N,): 0 train, 1 test
    names: list[str] | None = None  # file names / ids where they exist (folder: path relative to root)
    classes: list[str] | None = None  # class names where known, indexed by label
    spec: str = ""  # the spec string it was loaded from
    skipped: list[str] = field(default_factory=list)  # files skipped while loading (folder): "path (reason)"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """1 for grayscale, 3 for RGB."""
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def in_memory(self) -> bool:
        """False for images read from a store on demand (``data.store.StoredImages``)."""
        return isinstance(self.images, np.ndarray)

    def subset(self, mask_or_index: np.ndarray | list | slice | int) -> "ImageSet":
        """The images picked by a boolean mask, integer indices or a slice; every field stays aligned
        (``classes`` and ``spec`` are shared)."""
        if isinstance(mask_or_index, slice):
            index = np.arange(len(self))[mask_or_index]
        else:
            index = np.atleast_1d(np.asarray(mask_or_index))
            if index.dtype == bool:
                if index.shape != (len(self),):
                    raise IndexError(f"boolean mask of length {index.shape[0]} for {len(self)} images")
                index = np.flatnonzero(index)
            elif index.size == 0:
                index = index.astype(np.int64)
        return ImageSet(
            images=np.ascontiguousarray(self.images[index]) if self.in_memory else self.images.subset(index),
            labels=None if self.labels is None else self.labels[index],
            split=None if self.split is None else self.split[index],
            names=None if self.names is None else [self.names[i] for i in index.tolist()],
            classes=self.classes,
            spec=self.spec,
            skipped=self.skipped,
        )


# -- helpers shared by the sources ---------------------------------------------------------------

def warn(message: str) -> None:
    """One line on stderr for something loaded anyway (never a Python warning with its source line)."""
    print(f"deepclust: warning: {message}", file=sys.stderr)


def to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; bool as 0/255; other integers in [0, 255] cast; floats in [0, 1] scaled to 0..255
    (floats in [0, 255] rounded). NaN and other ranges are refused."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == bool:
        return images.astype(np.uint8) * 255
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{where}: images must be numbers, got dtype {images.dtype}")
    if images.size == 0:
        return images.astype(np.uint8)
    x = images.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: image values must lie in [0, 1] or [0, 255], found [{lo:g}, {hi:g}]")
    if np.issubdtype(images.dtype, np.floating) and hi <= 1.0:
        x = x * 255.0
    return np.round(x).astype(np.uint8)


def normalise_layout(images: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) stays; (N,H,W,1) is squeezed; (N,H,W,4) loses its alpha; anything else is refused."""
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    elif images.ndim == 4 and images.shape[3] == 4:
        images = images[..., :3]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise DataError(f"{where}: expected images shaped (N,H,W) or (N,H,W,3), got {tuple(images.shape)}")
    return images


def check_resize(resize: int | None) -> int | None:
    """``resize`` must be None or a positive integer side."""
    if resize is None:
        return None
    if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < 1:
        raise DataError(f"resize must be a positive integer side, got {resize!r}")
    return int(resize)


def resize_all(images: np.ndarray | list[np.ndarray], side: int) -> np.ndarray:
    """Bilinear resize of every image to side x side (Pillow); returns the stacked uint8 array.
    Refused in one line (DataError) when the result cannot fit in the available memory."""
    if len(images):
        check_resized(len(images), 1 if images[0].ndim == 2 else int(images[0].shape[2]), side)
    out = [np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR)) for im in images]
    return np.stack(out)


def check_labels(labels, where: str) -> np.ndarray:
    """``labels`` as int64 (N,), refused in one line (naming ``where``) unless they are whole,
    non-negative numbers below 2**63."""
    y = np.asarray(labels)
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.reshape(-1)
    if np.issubdtype(y.dtype, np.floating):
        bad = y[~(np.isfinite(y) & (y == np.round(y)))]
        if bad.size:
            raise DataError(f"{where}: labels must be integers, found {bad[0]}")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels must be non-negative, found {int(y.min())}")
    if y.size and y.max() >= 2**63:
        raise DataError(f"{where}: labels must be below 2**63, found {int(y.max())}")
    return y.astype(np.int64)


def _dense_labels(labels: np.ndarray, classes: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """Labels in 0..C-1, so that no consumer allocates by the largest value: labels without class
    names that are not already 0..C-1 are renumbered in sorted order, their values becoming the names."""
    if classes is not None or not labels.size:
        return labels, classes
    values, index = np.unique(labels, return_inverse=True)
    if values[-1] == len(values) - 1:
        return labels, classes
    return index.astype(np.int64).reshape(-1), [str(v) for v in values.tolist()]


def finalise(images: ImageSet) -> ImageSet:
    """Checks every source's result must pass: non-empty, uint8, C-contiguous, aligned fields,
    labels whole and non-negative (in 0..C-1 once renumbered, :func:`_dense_labels`)."""
    n = len(images)
    if n == 0:
        raise DataError(f"no images found in '{images.spec}'")
    if images.in_memory:
        images.images = np.ascontiguousarray(images.images, dtype=np.uint8)
    if images.labels is not None:
        images.labels = check_labels(images.labels, f"data '{images.spec}'")
        if len(images.labels) != n:
            raise DataError(f"data '{images.spec}': {len(images.labels)} labels for {n} images")
        images.labels, images.classes = _dense_labels(images.labels, images.classes)
    if images.split is not None:
        images.split = np.asarray(images.split).astype(np.int8).reshape(-1)
        if len(images.split) != n:
            raise DataError(f"data '{images.spec}': {len(images.split)} split entries for {n} images")
        if not np.isin(images.split, (0, 1)).all():
            raise DataError(f"data '{images.spec}': split values must be 0 (train) or 1 (test)")
    if images.names is not None and len(images.names) != n:
        raise DataError(f"data '{images.spec}': {len(images.names)} names for {n} images")
    return images


# -- scikit-learn digits --------------------------------------------------------------------------

def load_digits(spec: str, resize: int | None = None) -> ImageSet:
    """scikit-learn's bundled 1,797 8x8 digits; grey levels 0..16 become 0..255. No split."""
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    if resize:
        images = resize_all(images, resize)
    return ImageSet(images, d.target.astype(np.int64), None, None, [str(i) for i in range(10)], spec)


# -- .npz files -----------------------------------------------------------------------------------

def open_npz(path: Path):
    """An npz archive opened lazily (``np.load``; members are read when asked), with an ``images``
    member; DataError in one line otherwise. Use it as a context manager."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, not an npz file; use folder:{path} for a folder of images")
    if not path.is_file():
        raise DataError(f"no such file or directory: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / not an npz: numpy raises several kinds
        raise DataError(f"cannot read npz file {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not hasattr(z, "files"):  # np.load of a plain .npy returns an array
        raise DataError(f"{path} is not an npz archive (np.savez) but a single array")
    if "images" not in z.files:
        z.close()
        raise DataError(f"npz file {path} has no 'images' array (found: {', '.join(z.files) or 'nothing'})")
    return z


def npz_member(z, key: str, path: Path) -> np.ndarray | None:
    """One array of an opened npz archive (None when absent), DataError in one line when unreadable."""
    if key not in z.files:
        return None
    try:
        return z[key]
    except ValueError:  # object arrays need pickle, which is never enabled for data files
        raise DataError(f"npz file {path}: array '{key}' is an object array; save it as numbers or "
                        "as a str array (np.array(..., dtype=str))") from None
    except Exception as e:  # a damaged member
        raise DataError(f"cannot read '{key}' from npz file {path}: {type(e).__name__}: {e}"
                        .splitlines()[0]) from None


def npz_fields(z, path: Path, n: int) -> dict:
    """labels, split, names and classes of an opened npz archive of ``n`` images, checked."""
    out = {key: npz_member(z, key, path) for key in ("labels", "split", "names", "classes")}
    for key in ("labels", "split", "names"):
        if out[key] is not None and out[key].reshape(-1).shape[0] != n:
            raise DataError(f"npz file {path}: '{key}' has {out[key].reshape(-1).shape[0]} entries for {n} images")
    if out["labels"] is not None:
        out["labels"] = check_labels(out["labels"], f"npz file {path}")
        n_classes = None if out["classes"] is None else out["classes"].size
        if n_classes is not None and n and out["labels"].max() >= n_classes:
            raise DataError(f"npz file {path}: 'labels' must index its {n_classes} 'classes', "
                            f"found {out['labels'].max()}")
    if out["split"] is not None and not np.isin(out["split"], (0, 1)).all():
        raise DataError(f"npz file {path}: 'split' values must be 0 (train) or 1 (test)")
    out["names"] = None if out["names"] is None else [str(s) for s in out["names"].reshape(-1)]
    out["classes"] = None if out["classes"] is None else [str(s) for s in out["classes"].reshape(-1)]
    return out


def _read_npz(path: Path, resize: int | None) -> dict:
    """One npz file's arrays, checked and converted (images uint8 in ImageSet layout)."""
    with open_npz(path) as z:
        images = normalise_layout(to_uint8(npz_member(z, "images", path), f"npz file {path}"), f"npz file {path}")
        out = npz_fields(z, path, images.shape[0])
    out["images"] = resize_all(images, resize) if resize else images
    return out


def join_npz_fields(parts: list[dict], files: list[Path]) -> dict:
    """The fields of several npz files' parts in order: a field only some have is dropped (a warning)."""
    def joined(key: str):
        have = [p[key] is not None for p in parts]
        if not any(have):
            return None
        if not all(have):
            missing = [str(f) for f, h in zip(files, have) if not h]
            warn(f"'{key}' dropped: not in {', '.join(missing)}")
            return None
        if key == "names":
            return [name for p in parts for name in p[key]]
        return np.concatenate([p[key].reshape(-1) for p in parts])

    classes = [tuple(p["classes"]) for p in parts if p["classes"] is not None]
    return {"labels": joined("labels"), "split": joined("split"), "names": joined("names"),
            "classes": list(classes[0]) if classes and len(set(classes)) == 1 else None}


def check_npz_layouts(layouts: set, spec: str) -> None:
    """Several npz files must agree on the image shape (``images.shape[1:]`` of each)."""
    if len(layouts) > 1:
        def show(shape: tuple) -> str:
            return f"{shape[0]}x{shape[1]}" + ("x3" if len(shape) == 3 else "")
        listed = ", ".join(sorted(show(s) for s in layouts))
        channels = {len(s) for s in layouts}
        hint = ("; they mix grayscale and RGB images" if len(channels) > 1
                else "; pass resize=SIDE (--resize SIDE) to resize them all")
        raise DataError(f"npz files in '{spec}' disagree on image shape ({listed}){hint}")


def npz_paths(paths: str, spec: str) -> list[Path]:
    files = [Path(p.strip()).expanduser() for p in paths.split(",") if p.strip()]
    if not files:
        raise DataError(f"no npz file named in '{spec}'; use npz:PATH[,PATH...]")
    return files


def load_npz(paths: str, spec: str, resize: int | None = None) -> ImageSet:
    """Arrays ``images`` (uint8 N,H,W or N,H,W,3; N,H,W,1 squeezed; floats in [0, 1] scaled to 0..255),
    optional ``labels``, ``split`` (0 train, 1 test), ``names`` and ``classes``. Several comma-separated
    files are concatenated in order; they must agree on image size and channels. A field that only
    some of the files have is dropped (with a warning)."""
    files = npz_paths(paths, spec)
    parts = [_read_npz(f, resize) for f in files]
    check_npz_layouts({p["images"].shape[1:] for p in parts}, spec)
    return ImageSet(images=np.concatenate([p["images"] for p in parts]), spec=spec,
                    **join_npz_fields(parts, files))


# -- folders of image files -----------------------------------------------------------------------

def _to_uint8_gray(arr: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float grayscale to 0..255: [0, 1] floats are scaled by 255, values up to 255
    kept, up to 65535 divided by 257; anything else min-max scaled per image."""
    x = arr.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1.0 and np.issubdtype(arr.dtype, np.floating):
        x = x * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        x = x / 257.0
    else:
        x = (x - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.round(np.clip(x, 0, 255)).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """One image file as uint8 (H, W) for grayscale modes ('1', 'L', 'LA', 'I;16', 'I', 'F', 'P' with
    a grey palette) or (H, W, 3) for colour ones (RGB, RGBA, CMYK, YCbCr, 'P' with colours...), turned
    as its EXIF orientation says (as a viewer shows it). Alpha is dropped. Multi-frame files give
    their first frame. An image of more pixels than Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) raises :class:`UnreadableImage` ``too large, W x H pixels`` before
    it is decoded; other unreadable files raise what Pillow raises. Pillow's warnings are not shown."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decompression bomb (handled below), corrupt EXIF, ...
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            raise UnreadableImage(f"too large, over {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
        with im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise UnreadableImage(f"too large, {im.width} x {im.height} pixels")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _as_array(im)


def _as_array(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image as uint8 (H, W) or (H, W, 3) (see :func:`read_image`)."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _to_uint8_gray(np.asarray(im))
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(im.convert("L"))
    rgb = np.asarray(im.convert("RGB"))
    if mode in ("P", "PA") and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])  # a palette image using only greys
    return rgb


def image_files(base: Path) -> list[tuple[str, bool]]:
    """(relative POSIX path, hidden) of every image file under ``base`` (recursive), sorted by path
    components for a stable order. ``hidden``: the file or a folder on its path is hidden (its name
    starts with a dot: .ipynb_checkpoints, macOS's ._ files); a file reached both ways keeps a
    visible path.

    Symbolic links are followed (a folder of linked class folders is a common layout), but every real
    file is listed once and every real directory is entered once, so link loops (``c0/up -> ..``) and
    duplicate links cannot multiply the data. A link to ``base`` itself or to one of its ancestors is
    a loop and is never followed. Where one real file (or directory) is reached by several paths, the
    path kept -- and so the file's name and label (its first component) -- is the one crossing the
    fewest symbolic links, then the one with the fewest components, then the first in sorted order:
    files in a real class folder keep that folder's label whatever links point at them. Links to
    files or folders outside ``base`` count like files inside it; a broken link with an image
    extension is listed (and then reported unreadable). Unreadable directories are skipped.
    """
    root = os.path.realpath(base)
    best: dict[str, tuple[bool, int, int, tuple[str, ...]]] = {}  # real file -> (hidden, links, depth, parts)
    entered: set[str] = set()
    heap: list[tuple[bool, int, int, tuple[str, ...], str]] = [(False, 0, 0, (), root)]
    while heap:  # best-first: (hidden, links crossed, depth, parts) never decreases along a path
        hidden, links, depth, parts, real = heapq.heappop(heap)
        if real in entered:
            continue
        entered.add(real)
        try:
            entries = list(os.scandir(real))
        except OSError:
            continue
        for entry in entries:
            is_link = entry.is_symlink()
            target = os.path.realpath(entry.path) if is_link else entry.path
            key = (hidden or entry.name.startswith("."), links + is_link, depth + 1, parts + (entry.name,))
            if entry.is_dir():
                if target not in entered and os.path.commonpath([target, root]) != target:
                    heapq.heappush(heap, (*key, target))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if target not in best or key < best[target]:
                    best[target] = key
    found = [("/".join(key[3]), key[0]) for key in best.values()]
    return sorted(found, key=lambda item: tuple(item[0].split("/")))


def read_files(base: Path, files: list[tuple[str, bool]]) -> tuple[list[np.ndarray], list[str], list[str]]:
    """(images, their names, skipped files as "path (reason)") of ``files`` (:func:`image_files`):
    hidden ones are skipped ("hidden file", "hidden folder"), unreadable ones too ("unreadable",
    "too large, W x H pixels")."""
    images: list[np.ndarray] = []
    names: list[str] = []
    skipped: list[str] = []
    for rel, hidden in files:
        if hidden:
            reason = "hidden file" if rel.rsplit("/", 1)[-1].startswith(".") else "hidden folder"
            skipped.append(f"{rel} ({reason})")
            continue
        try:
            images.append(read_image(base / rel))
            names.append(rel)
        except UnreadableImage as e:
            skipped.append(f"{rel} ({e})")
        except Exception:  # truncated, corrupt, unsupported: skipped and reported, never a crash
            skipped.append(f"{rel} (unreadable)")
    return images, names, skipped


def load_folder(root: str, spec: str, resize: int | None = None) -> ImageSet:
    """Every image file under ``root`` (extensions png jpg jpeg bmp gif tif tiff webp, any case),
    sorted by relative path. When every image sits in a sub-folder, the first-level sub-folder name is
    its class (labels index the sorted class names); images at the top level mean no labels.
    Hidden files (and files in hidden folders), unreadable, truncated and too large ones are skipped:
    counted and named with their reason (the first MAX_LISTED) in one warning line and kept in
    ``skipped``. If any image is colour, all become RGB (grayscale ones repeated over 3 channels).
    Mixed sizes need ``resize`` (its memory checked before any file is read, for at least one channel)."""
    base = Path(root).expanduser()
    if not base.exists():
        raise DataError(f"no such file or directory: {base}")
    if not base.is_dir():
        raise DataError(f"not a directory: {base}")
    files = image_files(base)
    visible = sum(not hidden for _, hidden in files)
    if resize and visible:
        check_resized(visible, 1, resize)
    images, names, bad = read_files(base, files)
    report_skipped(bad, base)
    if not images:
        raise DataError(f"no images found under {base}")
    if any(im.ndim == 3 for im in images):
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    if resize:
        stacked = resize_all(images, resize)
    else:
        sizes = sorted({im.shape[:2] for im in images})
        if len(sizes) > 1:
            listed = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
            raise DataError(f"images under {base} have mixed sizes ({listed}); pass resize=SIDE (--resize SIDE) "
                            "to resize them all")
        stacked = np.stack(images)
    labels, classes = folder_labels(names, base)
    return ImageSet(stacked, labels, None, names, classes, spec, skipped=bad)


def folder_labels(names: list[str], base: Path) -> tuple[np.ndarray | None, list[str] | None]:
    """(labels, classes) of a folder's images: their first-level sub-folders, when every image sits in one."""
    tops = [n.split("/", 1)[0] for n in names if "/" in n]
    if len(tops) == len(names):
        classes = sorted(set(tops))
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[t] for t in tops], dtype=np.int64), classes
    if tops:
        warn(f"{len(names) - len(tops)} image(s) sit directly under {base}, outside class sub-folders; "
             "sub-folder names are not used as labels")
    return None, None


def report_skipped(bad: list[str], base: Path) -> None:
    """The one warning line naming the image files a folder's loading skipped."""
    if bad:
        shown = ", ".join(bad[:MAX_LISTED]) + (f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        warn(f"skipped {len(bad)} image file(s) under {base}: {shown}")
