"""Image sources behind one call: ``load_images(spec) -> ImageSet``.

An :class:`ImageSet` holds uint8 images, ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB, with optional
labels (int64, for evaluation only), train/test split (int8, 0 train / 1 test), file names and class
names. Specs (names are case-insensitive):

- ``digits`` — scikit-learn's bundled 1,797 8x8 digits, the built-in default; no split.
- ``npz:PATH[,PATH...]`` — arrays ``images`` (+ optional ``labels``, ``split``, ``names``, ``classes``);
  several files are concatenated.
- ``folder:PATH`` — every image file under PATH, recursively; first-level sub-folders are classes.
  A folder mixing grayscale and colour images is loaded all RGB.
- ``mnist``, ``fashion-mnist``, ``usps``, ``cifar10``, ``cifar100``, ``cifar100-20`` (the 20 coarse
  super-classes), ``svhn``, ``stl10`` (labelled train + test) — torchvision datasets kept under ``root``
  (default ``~/.cache/deepclust``), downloaded only with ``download=True``.
- a bare existing path: a directory is read as ``folder:``, a ``.npz`` file as ``npz:``.

Every user mistake raises :class:`~deepclust.errors.DataError` with one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .sources import ImageSet, check_resize, finalise, load_digits, load_folder, load_npz
from .torchvision_sets import TORCHVISION_SETS, load_torchvision

DATASET_NAMES: tuple[str, ...] = ("digits", "npz:PATH", "folder:PATH", *TORCHVISION_SETS)
SPLITS: tuple[str, ...] = ("all", "train", "test")

# torchvision set names are matched ignoring case, '-' and '_' (fashion_mnist, CIFAR-10, stl-10 ...)
_CANONICAL = {name.replace("-", ""): name for name in TORCHVISION_SETS}


def _known() -> str:
    return ", ".join(DATASET_NAMES)


def classify(spec: str) -> tuple[str, str]:
    """(kind, argument) of a data spec: ("npz", PATHS), ("folder", PATH), ("digits", ""), ("torchvision",
    NAME); DataError in one line for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"no data given; use one of: {_known()}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    kind_l = kind.strip().lower()
    key = spec.lower().replace("_", "").replace("-", "")
    if sep and kind_l in ("npz", "folder"):
        if not arg.strip():
            raise DataError(f"'{spec}' names no path; use {kind_l}:PATH")
        return kind_l, arg if kind_l == "npz" else arg.strip()
    if spec.lower() == "digits":
        return "digits", ""
    if key in _CANONICAL:
        return "torchvision", _CANONICAL[key]
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder", spec
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz", spec
    if path.suffix.lower() == ".npz" or os.sep in spec or "/" in spec:
        raise DataError(f"no such file or directory: {path}" if not path.exists()
                        else f"cannot read '{spec}': expected a directory or an .npz file")
    raise DataError(f"unknown dataset '{spec}'; known: {_known()}")


def check_split(split: str) -> str:
    split_l = str(split).strip().lower()
    if split_l not in SPLITS:
        raise DataError(f"split must be train, test or all, got '{split}'")
    return split_l


def load_source(spec: str, split: str = "all", root: str | None = None, download: bool = False,
                resize: int | None = None) -> ImageSet:
    """The images ``spec`` names as its source gives them (before :func:`~.sources.finalise` and the
    split's selection, :func:`load_images`); a torchvision set reads only the parts ``split`` asks for."""
    split_l, resize = check_split(split), check_resize(resize)
    kind, arg = classify(spec)
    spec = spec.strip()
    if kind == "npz":
        return load_npz(arg, spec, resize)
    if kind == "folder":
        return load_folder(arg, spec, resize)
    if kind == "digits":
        return load_digits(spec, resize)
    return load_torchvision(arg, spec, root, download, resize, split_l)


def load_images(spec: str, split: str = "all", root: str | None = None, download: bool = False,
                resize: int | None = None) -> ImageSet:
    """Load the images named by ``spec``.

    ``split``: "all" (default; train followed by test where a source has both), "train" or "test";
    sources without split information accept only "all". ``root``: download/cache directory of the
    torchvision sets (default ``~/.cache/deepclust``). ``download``: fetch missing torchvision sets.
    ``resize``: resize every image to ``resize x resize`` (Pillow, bilinear) — needed for folders of
    mixed sizes.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"no data given; use one of: {_known()}")
    split_l = check_split(split)
    return select_split(finalise(load_source(spec, split_l, root, download, resize)), split_l)


def select_split(images: ImageSet, split: str) -> ImageSet:
    """The train or test part of ``images`` (all of it for "all"); DataError if it has no split."""
    if split == "all":
        return images
    if images.split is None:
        raise DataError(f"data '{images.spec}' has no train/test split; use split=all")
    part = images.subset(images.split == (0 if split == "train" else 1))
    if len(part) == 0:
        raise DataError(f"data '{images.spec}' has no {split} images")
    return part


__all__ = ["DATASET_NAMES", "SPLITS", "TORCHVISION_SETS", "ImageSet", "classify", "load_images", "load_source",
           "select_split"]
