"""Reading clusters off features: a fitted, saveable cluster head.

``kmeans`` (faiss; the papers' protocol) or ``spectral`` (normalised spectral clustering on the
sparse kNN graph). Features are L2-normalised first (both heads work on cosine geometry: the
memory-bank methods train cosine similarities). Either head keeps the centroid of each cluster in
that normalised feature space, and assigns a new image to the nearest centroid; for the spectral
head that is its out-of-sample rule (the spectral embedding itself has no closed form for new
points). Nothing here reads labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .structure.clustering import assign_to_centroids, kmeans, spectral

HEADS = ("kmeans", "spectral")


def normalise(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class ClusterHead:
    kind: str
    n_clusters: int
    centroids: np.ndarray  # (K, D) in the L2-normalised feature space
    labels_: np.ndarray | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        return assign_to_centroids(normalise(features), self.centroids)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, kind=np.array(self.kind), n_clusters=np.array(self.n_clusters), centroids=self.centroids,
                 labels=self.labels_ if self.labels_ is not None else np.zeros(0, np.int64))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "ClusterHead":
        with np.load(path, allow_pickle=False) as z:
            labels = z["labels"]
            return cls(str(z["kind"]), int(z["n_clusters"]), z["centroids"], labels if labels.size else None)


def fit_head(features: np.ndarray, kind: str, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10) -> ClusterHead:
    if kind not in HEADS:
        raise ConfigError(f"unknown cluster head '{kind}'; known: {', '.join(HEADS)}")
    x = normalise(features)
    if kind == "kmeans":
        labels, centroids, _ = kmeans(x, n_clusters, seed=seed, n_init=3)
    else:
        labels, _ = spectral(x, n_clusters, n_neighbors=n_neighbors, seed=seed)
        sums = np.zeros((n_clusters, x.shape[1]), np.float64)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=n_clusters)[:, None]
        centroids = (sums / np.maximum(counts, 1)).astype(np.float32)
    return ClusterHead(kind, n_clusters, centroids, labels)
