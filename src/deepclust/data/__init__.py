"""Image sources behind one interface: ``load_images(spec) -> ImageSet`` (uint8 images, optional
labels, train/test split, file names and class names).

Specs: ``digits`` (scikit-learn's bundled 8x8 digits, the built-in default), ``npz:PATH[,PATH...]``,
``folder:PATH``, and torchvision sets (``mnist``, ``fashion-mnist``, ``usps``, ``cifar10``, ``cifar100``,
``cifar100-20``, ``svhn``, ``stl10``) downloaded only when asked. A bare existing path works too
(a directory is a folder, a ``.npz`` file an npz source).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .imageset import ImageSet, finalise
from .sources import load_digits, load_folder, load_npz
from .torchvision_sets import TORCHVISION_SETS, load_torchvision

DATASET_NAMES: tuple[str, ...] = ("digits", "npz:PATH", "folder:PATH", *TORCHVISION_SETS)


def load_images(spec: str, split: str = "all", root: str | None = None, download: bool = False,
                resize: int | None = None) -> ImageSet:
    """Load the images named by ``spec``; ``split`` is train, test or all."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be train, test or all, got '{split}'")
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    kind_l = kind.lower()
    if kind_l == "npz" and arg:
        images = load_npz(arg, spec, resize)
    elif kind_l == "folder" and arg:
        images = load_folder(arg, spec, resize)
    elif kind_l == "digits" and not arg:
        images = load_digits(spec, resize)
    elif kind_l in TORCHVISION_SETS and not arg:
        images = load_torchvision(kind_l, spec, root, download, resize)
    elif Path(spec).expanduser().is_dir():
        images = load_folder(spec, spec, resize)
    elif spec.lower().endswith(".npz") and Path(spec).expanduser().is_file():
        images = load_npz(spec, spec, resize)
    else:
        raise DataError(f"unknown dataset '{spec}'; known: {', '.join(DATASET_NAMES)}")
    return select_split(finalise(images), split)


def select_split(images: ImageSet, split: str) -> ImageSet:
    if split == "all":
        return images
    if images.split is None:
        raise DataError(f"data '{images.spec}' has no train/test split; use split=all")
    part = images.subset(images.split == (0 if split == "train" else 1))
    if len(part) == 0:
        raise DataError(f"data '{images.spec}' has no {split} images")
    return part


__all__ = ["DATASET_NAMES", "ImageSet", "load_images", "select_split"]
