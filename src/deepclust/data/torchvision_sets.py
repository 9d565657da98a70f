"""torchvision-backed datasets, read straight from the dataset objects' arrays (no per-image PIL).

Files are fetched only with ``download=True``; without them a one-line DataError says so.
Fashion-MNIST is also read from Debian's ``dataset-fashion-mnist`` package (idx files under
``/usr/share/datasets/fashion-mnist``, overridable with ``DEEPCLUST_FASHION_MNIST_DIR``) when present.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from .imageset import ImageSet, resize_all

TORCHVISION_SETS = ("mnist", "fashion-mnist", "usps", "cifar10", "cifar100", "cifar100-20", "svhn", "stl10")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "DEEPCLUST_FASHION_MNIST_DIR"
DEFAULT_ROOT = "~/.cache/deepclust"


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST format), plain or gzipped: magic (0, 0, dtype code, ndim), big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an idx file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataError(f"{path}: unknown idx data type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated idx file")
    return data.reshape(tuple(int(d) for d in dims))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_idx_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        return None
    return read_idx(images).astype(np.uint8), read_idx(labels).astype(np.int64)


def _debian_fashion_mnist() -> tuple[np.ndarray, ...] | None:
    directory = Path(os.environ.get(FASHION_ENV, DEBIAN_FASHION_MNIST))
    if not directory.is_dir():
        return None
    train = load_idx_pair(directory, "train")
    test = load_idx_pair(directory, "t10k")
    if train is None or test is None:
        return None
    return train[0], train[1], test[0], test[1]


def _train_test(name: str, root: str, download: bool):
    """(train images, train labels, test images, test labels) in ImageSet layout."""
    import torchvision.datasets as tvd

    if name in ("mnist", "fashion-mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        parts = [cls(root, train=t, download=download) for t in (True, False)]
        return [x for p in parts for x in (p.data.numpy(), p.targets.numpy())]
    if name == "usps":
        parts = [tvd.USPS(root, train=t, download=download) for t in (True, False)]
        return [x for p in parts for x in (np.asarray(p.data, np.uint8), np.asarray(p.targets))]
    if name == "cifar10":
        parts = [tvd.CIFAR10(root, train=t, download=download) for t in (True, False)]
        return [x for p in parts for x in (p.data, np.asarray(p.targets))]
    if name in ("cifar100", "cifar100-20"):
        parts = [tvd.CIFAR100(root, train=t, download=download) for t in (True, False)]
        if name == "cifar100":
            return [x for p in parts for x in (p.data, np.asarray(p.targets))]
        # torchvision exposes only the 100 fine labels: read the 20 coarse super-classes (DCCM) from
        # the same pickled batches it read.
        out = []
        for p, part in zip(parts, ("train", "test")):
            with open(Path(root) / p.base_folder / part, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            out += [p.data, np.asarray(entry["coarse_labels"])]
        return out
    if name == "svhn":
        parts = [tvd.SVHN(root, split=s, download=download) for s in ("train", "test")]
        return [x for p in parts for x in (p.data.transpose(0, 2, 3, 1), np.asarray(p.labels))]
    if name == "stl10":
        parts = [tvd.STL10(root, split=s, download=download) for s in ("train", "test")]
        return [x for p in parts for x in (p.data.transpose(0, 2, 3, 1), np.asarray(p.labels))]
    raise DataError(f"unknown dataset '{name}'")


def load_torchvision(name: str, spec: str, root: str | None, download: bool, resize: int | None) -> ImageSet:
    root_path = str(Path(root or DEFAULT_ROOT).expanduser())
    found = _debian_fashion_mnist() if name == "fashion-mnist" else None
    if found is None:
        try:
            found = _train_test(name, root_path, download)
        except (RuntimeError, FileNotFoundError) as e:
            if download:
                raise DataError(f"dataset '{name}' could not be downloaded or read under {root_path}: "
                                f"{str(e).splitlines()[0]}") from None
            raise DataError(f"dataset '{name}' not found under {root_path}; pass --download to fetch it "
                            "(needs internet)") from None
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise DataError(f"dataset '{name}' under {root_path} is unreadable: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    xtr, ytr, xte, yte = found
    images = np.ascontiguousarray(np.concatenate([xtr, xte]).astype(np.uint8))
    if resize:
        images = resize_all(images, resize)
    labels = np.concatenate([ytr, yte]).astype(np.int64)
    split = np.concatenate([np.zeros(len(xtr), np.int8), np.ones(len(xte), np.int8)])
    return ImageSet(images, labels, split, None, None, spec)
