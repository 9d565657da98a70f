"""torchvision-backed datasets: mnist, fashion-mnist, usps, cifar10, cifar100, cifar100-20, svhn, stl10.

torchvision's dataset classes find, check and (only with ``download=True``) fetch the files under
``root``; their ``.data`` / ``.targets`` / ``.labels`` arrays are read directly (no per-image PIL
transform) and put into the :class:`~deepclust.data.sources.ImageSet` layout. ``split="all"`` is train
followed by test, with the split array set. Missing or corrupt files without ``download`` give a
one-line DataError that suggests ``--download``.

Fashion-MNIST is first looked for in the idx files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); the directory
is :data:`DEBIAN_FASHION_MNIST_DIR`, overridden by the environment variable ``DEEPCLUST_FASHION_MNIST_DIR``.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import ImageSet, resize_all

TORCHVISION_SETS: tuple[str, ...] = ("mnist", "fashion-mnist", "usps", "cifar10", "cifar100", "cifar100-20",
                                     "svhn", "stl10")
DEFAULT_ROOT = "~/.cache/deepclust"
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "DEEPCLUST_FASHION_MNIST_DIR"

DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
PARTS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}

# idx type codes -> numpy dtypes; multi-byte values are big-endian
_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (the MNIST format), plain or gzipped (``.gz``): bytes 0-1 are zero, byte 2 the type
    code, byte 3 the number of dimensions, then one big-endian int32 per dimension, then the data."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # missing, unreadable, bad gzip
        raise DataError(f"cannot read idx file {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file")
    ndim, dtype = raw[3], _IDX_DTYPES[raw[2]]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx file")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"{path}: idx file size does not match its dimensions {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pair(directory: Path, prefix: str) -> tuple[Path, Path] | None:
    """``{prefix}-images-idx3-ubyte`` and ``{prefix}-labels-idx1-ubyte``, each plain or ``.gz``."""
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = next((directory / n for n in (stem, stem + ".gz") if (directory / n).is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def fashion_mnist_dir() -> Path:
    """Where Debian's dataset-fashion-mnist idx files are looked for."""
    return Path(os.environ.get(FASHION_ENV) or DEBIAN_FASHION_MNIST_DIR).expanduser()


def _debian_fashion_mnist(parts: tuple[str, ...]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(images, labels) per part from the Debian idx files, or None when they are not all there."""
    directory = fashion_mnist_dir()
    pairs = [_idx_pair(directory, "train" if p == "train" else "t10k") for p in parts]
    if not directory.is_dir() or any(p is None for p in pairs):
        return None
    out = []
    for images_path, labels_path in pairs:
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.shape != (images.shape[0],):
            raise DataError(f"idx files {images_path} and {labels_path} do not hold N images and N labels")
        out.append((images.astype(np.uint8), labels.astype(np.int64)))
    return out


def _read_parts(name: str, root: str, download: bool, parts: tuple[str, ...]):
    """[(images, labels) per part], class names — straight from torchvision's dataset objects."""
    import torchvision.datasets as tvd

    train = {"train": True, "test": False}
    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        sets = [cls(root, train=train[p], download=download) for p in parts]
        return ([(s.data.numpy(), s.targets.numpy()) for s in sets],
                DIGIT_CLASSES if name == "mnist" else list(cls.classes))
    if name == "usps":  # data already (N, 16, 16) uint8: torchvision maps the file's [-1, 1] to 0..255
        sets = [tvd.USPS(root, train=train[p], download=download) for p in parts]
        return [(np.asarray(s.data, np.uint8), np.asarray(s.targets)) for s in sets], DIGIT_CLASSES
    if name == "cifar10":  # data already (N, 32, 32, 3)
        sets = [tvd.CIFAR10(root, train=train[p], download=download) for p in parts]
        return [(s.data, np.asarray(s.targets)) for s in sets], list(sets[0].classes)
    if name == "cifar100":  # targets are the 100 fine labels
        sets = [tvd.CIFAR100(root, train=train[p], download=download) for p in parts]
        return [(s.data, np.asarray(s.targets)) for s in sets], list(sets[0].classes)
    if name == "cifar100-20":
        # torchvision exposes only the fine labels: the 20 coarse super-classes (as used by DCCM) are read
        # from the same pickled files ('train' / 'test' in cifar-100-python), in the same order.
        sets = [tvd.CIFAR100(root, train=train[p], download=download) for p in parts]
        folder = Path(root) / tvd.CIFAR100.base_folder
        out = []
        for s, p in zip(sets, parts):
            with open(folder / p, "rb") as f:
                coarse = np.asarray(pickle.load(f, encoding="latin1")["coarse_labels"])
            out.append((s.data, coarse))
        with open(folder / tvd.CIFAR100.meta["filename"], "rb") as f:
            names = pickle.load(f, encoding="latin1").get("coarse_label_names")
        return out, (list(names) if names else None)
    if name == "svhn":  # data (N, 3, H, W) -> (N, H, W, 3); torchvision already maps label 10 to digit 0
        sets = [tvd.SVHN(root, split=p, download=download) for p in parts]
        return [(s.data.transpose(0, 2, 3, 1), np.asarray(s.labels)) for s in sets], DIGIT_CLASSES
    if name == "stl10":  # labelled train + test only; (N, 3, H, W) -> (N, H, W, 3); labels already 0-based
        sets = [tvd.STL10(root, split=p, download=download) for p in parts]
        return ([(s.data.transpose(0, 2, 3, 1), np.asarray(s.labels)) for s in sets],
                list(getattr(sets[0], "classes", None) or []) or None)
    raise DataError(f"unknown dataset '{name}'")  # unreachable from load_images


def load_torchvision(name: str, spec: str, root: str | None = None, download: bool = False,
                     resize: int | None = None, split: str = "all") -> ImageSet:
    """One of :data:`TORCHVISION_SETS`; only the parts ``split`` asks for are read."""
    root_path = str(Path(root or DEFAULT_ROOT).expanduser())
    parts = PARTS[split]
    found = _debian_fashion_mnist(parts) if name == "fashion-mnist" else None
    classes: list[str] | None = FASHION_CLASSES
    if found is None:
        try:
            found, classes = _read_parts(name, root_path, download, parts)
        except DataError:
            raise
        except (RuntimeError, FileNotFoundError) as e:
            # torchvision: "Dataset not found or corrupted. You can use download=True ..."; USPS opens the
            # file directly; download failures are RuntimeError (MNIST mirrors) or URLError (an OSError).
            if download:
                raise DataError(f"dataset '{name}' could not be downloaded into {root_path}: "
                                f"{type(e).__name__}: {e}".splitlines()[0]) from None
            raise DataError(f"dataset '{name}' not found under {root_path}; pass --download to fetch it "
                            "(needs internet)") from None
        except (OSError, EOFError, ValueError, KeyError, IndexError, pickle.UnpicklingError) as e:
            what = "could not be downloaded into" if download else "is unreadable under"
            raise DataError(f"dataset '{name}' {what} {root_path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    images = np.concatenate([np.asarray(x) for x, _ in found]).astype(np.uint8, copy=False)
    if resize:
        images = resize_all(images, resize)
    labels = np.concatenate([np.asarray(y).reshape(-1) for _, y in found]).astype(np.int64)
    split_ids = np.concatenate([np.full(len(x), 0 if p == "train" else 1, np.int8) for (x, _), p in zip(found, parts)])
    return ImageSet(np.ascontiguousarray(images), labels, split_ids, None, classes, spec)
