"""Local sources: scikit-learn's digits, .npz arrays, and folders of image files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .imageset import ImageSet, normalise_layout, resize_all, to_uint8

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def load_digits(spec: str, resize: int | None) -> ImageSet:
    """scikit-learn's bundled 1,797 8x8 digits (values 0..16 scaled to 0..255). No split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    if resize:
        images = resize_all(images, resize)
    return ImageSet(images, d.target.astype(np.int64), None, None, [str(i) for i in range(10)], spec)


def load_npz(paths: str, spec: str, resize: int | None) -> ImageSet:
    """Arrays ``images`` (uint8 N,H,W[,3]; floats in [0,1] are scaled), optional ``labels``, ``split``
    (0 train, 1 test), ``names``. Several comma-separated files are concatenated."""
    parts = []
    for raw in [p for p in paths.split(",") if p.strip()]:
        path = Path(raw.strip()).expanduser()
        if not path.is_file():
            raise DataError(f"no such file: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z.files:
                    raise DataError(f"npz file {path} has no 'images' array (found: {', '.join(z.files)})")
                images = normalise_layout(to_uint8(z["images"], str(path)), str(path))
                labels = z["labels"] if "labels" in z.files else None
                split = z["split"] if "split" in z.files else None
                names = [str(s) for s in z["names"]] if "names" in z.files else None
        except DataError:
            raise
        except Exception as e:  # zipfile / pickle / format errors
            raise DataError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
        if resize:
            images = resize_all(images, resize)
        parts.append((path, images, labels, split, names))
    if not parts:
        raise DataError(f"no npz files named in '{spec}'")
    shapes = {p[1].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise DataError(f"npz files disagree on image shape ({', '.join(str(s) for s in sorted(shapes))}); "
                        "pass resize=SIDE")
    def cat(i):
        vals = [p[i] for p in parts]
        if any(v is None for v in vals):
            return None
        return np.concatenate([np.asarray(v) for v in vals])
    names = None
    if all(p[4] is not None for p in parts):
        names = [n for p in parts for n in p[4]]
    return ImageSet(np.concatenate([p[1] for p in parts]), cat(2), cat(3), names, None, spec)


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            return np.round(arr * 255.0 / max(arr.max(), 1.0)).astype(np.uint8)
        if im.mode in ("L", "1", "LA") or (im.mode == "P" and _palette_is_gray(im)):
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))


def _palette_is_gray(im: Image.Image) -> bool:
    pal = im.getpalette()
    if not pal:
        return True
    rgb = np.asarray(pal[: 3 * 256]).reshape(-1, 3)
    return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


def load_folder(root: str, spec: str, resize: int | None) -> ImageSet:
    """Every image file under ``root`` (recursive, sorted). First-level sub-folders are classes when
    images live in them. Unreadable files are skipped and listed in one warning. Grayscale and
    colour mixed: all become RGB."""
    base = Path(root).expanduser()
    if not base.exists():
        raise DataError(f"no such directory: {base}")
    if not base.is_dir():
        raise DataError(f"not a directory: {base}")
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images, rel_names, bad = [], [], []
    for p in files:
        try:
            images.append(_read_image(p))
            rel_names.append(p.relative_to(base).as_posix())
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            bad.append(p.relative_to(base).as_posix())
    if bad:
        shown = ", ".join(bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) under {base}: {shown}", UserWarning,
                      stacklevel=2)
    if not images:
        raise DataError(f"no images found under {base}")
    if any(im.ndim == 3 for im in images):
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    if resize:
        images = [np.asarray(Image.fromarray(im).resize((resize, resize), Image.BILINEAR)) for im in images]
    sizes = sorted({im.shape[:2] for im in images})
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        raise DataError(f"images under {base} have mixed sizes ({listed}); pass --resize SIDE to resize them all")
    labels = classes = None
    tops = [n.split("/")[0] if "/" in n else None for n in rel_names]
    if all(t is not None for t in tops):
        classes = sorted(set(tops))
        lookup = {c: i for i, c in enumerate(classes)}
        labels = np.array([lookup[t] for t in tops], dtype=np.int64)
    return ImageSet(np.stack(images), labels, None, rel_names, classes, spec)
