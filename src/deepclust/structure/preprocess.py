"""DeepCluster's feature preprocessing before k-means (Caron et al., ECCV 2018: "PCA-reduced to 256
dimensions, whitened and l2-normalized"): PCA whitening then L2 row normalisation, as
``preprocess_features`` in facebookresearch/deepcluster ``clustering.py`` (faiss ``PCAMatrix`` with
``eigen_power=-0.5``, then division by the row norms). Our own numpy implementation: the
covariance is accumulated in float64 over row blocks, so memory is O(D^2 + block x D), never N x N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataError

_BLOCK_ELEMENTS = 1 << 22  # rows x D float64 per block: 32 MiB


@dataclass
class PCAWhitening:
    """A fitted PCA whitening: y = (x - mean) @ projection, then (optionally) rows L2-normalised."""

    mean: np.ndarray  # (D,) float64
    projection: np.ndarray  # (D, d) float64: principal axes / sqrt(eigenvalue + eps * largest)
    eigenvalues: np.ndarray  # (d,) float64, descending (covariance with the 1/N convention)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def transform(self, features, *, normalise: bool = True) -> np.ndarray:
        """Apply to any rows (the fitted ones or new images): float32 (N, d)."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise DataError(f"features must have shape (N, {self.mean.shape[0]}), got {x.shape}")
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        block = max(1, _BLOCK_ELEMENTS // max(x.shape[1], 1))
        for start in range(0, x.shape[0], block):
            y = (x[start:start + block].astype(np.float64) - self.mean) @ self.projection
            if normalise:  # L2 row normalisation; an all-zero row stays zero
                y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
            out[start:start + block] = y
        return out


def pca_whiten(features, dim: int = 256, *, eps: float = 1e-12,
               variance: float | None = None) -> tuple[np.ndarray, PCAWhitening]:
    """PCA to ``dim`` dimensions with whitening, then L2 row normalisation (DeepCluster).

    Returns (float32 (N, d) rows of unit norm, the fitted ``PCAWhitening``).

    - Whitening: component i is divided by sqrt(lambda_i + eps * lambda_1), faiss ``PCAMatrix``'s
      ``eigen_power = -0.5`` (its ``epsilon`` is absolute and 0 by default). ``eps`` is relative to
      the largest eigenvalue so that the result does not depend on the feature scale, and keeps a
      direction of (numerically) zero variance from being blown up to dominate every row: float32
      rounding leaves such a direction a variance of ~1e-15 lambda_1, which comes out with a
      standard deviation of ~0.01-0.03 (1 for the real ones), while directions above ~1e-8
      lambda_1 are whitened to within 1e-4.
    - d = min(dim, D, N - 1): N centred points span at most N - 1 directions (beyond that the
      eigenvalues are rounding noise). With D < ``dim`` (e.g. a 128-d embedding against the
      default 256) nothing is reduced: the features are rotated onto their principal axes and
      whitened, which k-means then sees as isotropic.
    - Covariance with the 1/N convention, so the whitened (not yet normalised) output of the fitted
      rows has covariance ~ identity. Each axis' sign is fixed (largest |entry| positive), so the
      result is deterministic across LAPACK builds.
    - ``variance``: keep only the fewest leading components whose eigenvalues sum to that share of
      the total (label-free), if that is fewer than d.
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise DataError(f"features must be a 2-D array of at least 2 rows, got shape {x.shape}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ConfigError(f"PCA dimension must be a positive integer, got {dim!r}")
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"eps must be within [0, 1), got {eps}")
    if not np.isfinite(x).all():
        raise DataError("features contain NaN or infinite values")
    n, d_in = x.shape
    mean = x.sum(axis=0, dtype=np.float64) / n
    cov = np.zeros((d_in, d_in), dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // d_in)
    for start in range(0, n, block):
        c = x[start:start + block].astype(np.float64) - mean
        cov += c.T @ c
    cov /= n
    vals, vecs = np.linalg.eigh(cov)  # ascending
    d = int(min(dim, d_in, n - 1))
    if variance is not None:
        if not 0.0 < variance <= 1.0:
            raise ConfigError(f"variance share must be within (0, 1], got {variance}")
        share = np.cumsum(np.clip(vals[::-1], 0.0, None)) / max(float(np.clip(vals, 0.0, None).sum()), 1e-300)
        d = min(d, int(np.searchsorted(share, variance - 1e-12)) + 1)
    vals, vecs = np.clip(vals[::-1][:d], 0.0, None), vecs[:, ::-1][:, :d]
    if vals[0] <= 0.0:
        raise DataError("features are constant: nothing to whiten")
    flip = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(d)])
    vecs = vecs * flip
    state = PCAWhitening(mean, vecs / np.sqrt(vals + eps * vals[0]), vals)
    return state.transform(x), state


def deepcluster_whiten(features, target: int = 256, variance: float = 0.9) -> np.ndarray:
    """DeepCluster's preprocessing (Caron et al. 2018, Sec 3.3) where it reduces, and a label-free
    reduction where it would not: with D > ``target`` (AlexNet's 4096-d fc7, the paper's case) PCA-
    whitening to ``target`` dimensions; with D <= ``target`` (JULE's 160-d ip1, a 64-d DCCM fc, a
    512-d ResNet against a larger target) whitening to all D would blow up the noise directions to
    unit variance, so only the fewest leading components explaining ``variance`` of the variance
    are kept. Then L2 row normalisation. float32 (N, d)."""
    x = np.asarray(features)
    reduces = x.ndim == 2 and x.shape[1] > target
    out, _ = pca_whiten(x, dim=target, variance=None if reduces else variance)
    return out
