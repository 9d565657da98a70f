"""The common result of every data source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DataError


@dataclass
class ImageSet:
    images: np.ndarray  # uint8, (N, H, W) grayscale or (N, H, W, 3) RGB, C-contiguous
    labels: np.ndarray | None = None  # int64 (N,)
    split: np.ndarray | None = None  # int8 (N,): 0 train, 1 test
    names: list[str] | None = None  # file names / ids where they exist
    classes: list[str] | None = None  # class names where known
    spec: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, index) -> "ImageSet":
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return ImageSet(
            np.ascontiguousarray(self.images[index]),
            None if self.labels is None else self.labels[index],
            None if self.split is None else self.split[index],
            None if self.names is None else [self.names[i] for i in index],
            self.classes,
            self.spec,
        )


def to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """Accept uint8, or floats in [0, 1] (scaled) or [0, 255]; refuse NaN and other ranges."""
    if images.dtype == np.uint8:
        return images
    if images.dtype == bool:
        return images.astype(np.uint8) * 255
    x = images.astype(np.float64)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: image values must lie in [0, 1] or [0, 255], found [{lo:g}, {hi:g}]")
    if hi <= 1.0:
        x = x * 255.0
    return np.round(x).astype(np.uint8)


def normalise_layout(images: np.ndarray, where: str) -> np.ndarray:
    """(N,H,W) or (N,H,W,1|3|4) -> (N,H,W) or (N,H,W,3)."""
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim == 4 and images.shape[3] == 4:
        images = images[..., :3]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise DataError(f"{where}: expected images shaped (N,H,W) or (N,H,W,3), got {tuple(images.shape)}")
    return images


def resize_all(images: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of every image to side x side (Pillow)."""
    out = [np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR)) for im in images]
    return np.stack(out)


def finalise(images: ImageSet) -> ImageSet:
    """Checks every source's result shares: non-empty, uint8, aligned fields."""
    n = len(images)
    if n == 0:
        raise DataError(f"no images found in '{images.spec}'")
    images.images = np.ascontiguousarray(images.images)
    if images.labels is not None:
        images.labels = np.asarray(images.labels).astype(np.int64).reshape(-1)
        if len(images.labels) != n:
            raise DataError(f"'{images.spec}': {len(images.labels)} labels for {n} images")
    if images.split is not None:
        images.split = np.asarray(images.split).astype(np.int8).reshape(-1)
        if len(images.split) != n:
            raise DataError(f"'{images.spec}': {len(images.split)} split entries for {n} images")
    return images
