"""The number of clusters K estimated from features without labels (``cluster.n_clusters: auto``).

Criterion: the mean silhouette (Rousseeuw 1987, Euclidean, on the features) of normalised spectral
clustering (Ng, Jordan & Weiss 2002, the spectral head's algorithm: cosine kNN graph -> top
eigenvectors of D^-1/2 W D^-1/2 -> rows L2-normalised -> k-means) for every K in [k_min, k_max];
K is the best one. Except when the kNN graph itself falls into K in [k_min, k_max] connected
components of at least max(n_neighbors, half of N / K images) each: then its normalised Laplacian has
eigenvalue 0 exactly K times (von Luxburg 2007, Prop 4), the ideal case, and K is that count (the
eigensolver cannot separate a repeated eigenvalue's vectors, so the silhouette route would
mis-cluster there). The graph and its eigenvectors are computed once, for 2 k_max components, and
each K clusters the first 2K of them (the spectral head's 2K). Above ``max_images`` images a seeded
random sample is used; the silhouette is read on a seeded sample of ``silhouette_sample`` rows.

Chosen on the development data (pixels of scikit-learn's digits and USPS, and synthetic blobs): the
eigengap of the same graph found 11 on digits but 3 on USPS; the silhouette of k-means found 9 on
digits but 14 on USPS; this criterion 10 and 11, and the true count on blobs of 3, 7 and 20 (on
report data, afterwards: 11 on MNIST-test; 2 on CIFAR-10-test, whose pixels do not cluster by class:
there K must be given).

From learned features, after training (:func:`estimate_from_features`, for the runs whose methods
train without K: ``scoring.settle_n_clusters``): the modularity (Newman 2006) on the cosine kNN graph
of the features of their spectral clustering at each K, the highest kept (the graph's large
components first, as above). The pixels' silhouette gives 2 on a trained PAD embedding of digits,
where the modularity gives 12 (chosen on digits and USPS embeddings of PAD and instance
discrimination, noisy digits pixels and 10:1 subsamples, against the eigengap, the silhouette, Ward's
largest merge-cost jump, Louvain and HDBSCAN on UMAP: DEVELOPERS.md).

A set without variation (every image the same) has nothing to cluster: :func:`identical_images`
finds it before any training (``resolution.resolve`` refuses it), and features that do not vary
give K = 1 here.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import silhouette_score

from .clustering import kmeans, modularity, spectral_embedding
from .knn import knn_graph

CRITERION = "silhouette of spectral clustering over K (Rousseeuw 1987; Ng, Jordan & Weiss 2002)"
COMPONENTS = "connected components of the kNN graph (von Luxburg 2007, Prop 4: eigenvalue 0 of multiplicity K)"


def identical_images(images: np.ndarray, chunk: int = 4096) -> bool:
    """Whether every image equals the first, pixel for pixel (read in chunks, stopping at the first
    chunk that differs)."""
    x = images.reshape(len(images), -1)
    return all(np.array_equal(x[i:i + chunk], np.broadcast_to(x[0], x[i:i + chunk].shape))
               for i in range(0, len(x), chunk))


def pixel_features(images: np.ndarray, dim: int = 50, seed: int = 0) -> np.ndarray:
    """Pretrained-free features of uint8 images: pixels in [0, 1], centred, PCA to ``dim``
    components (randomised SVD above 1,000 pixels); zeros where the pixels do not vary."""
    from sklearn.decomposition import PCA

    dim = min(dim, len(images) - 1, images[0].size)
    if identical_images(images):  # no variance: PCA would divide by it
        return np.zeros((len(images), max(dim, 1)), np.float32)
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    x -= x.mean(axis=0)
    return PCA(dim, random_state=seed, svd_solver="auto").fit_transform(x).astype(np.float32)


def _candidates(x: np.ndarray, rng: np.random.Generator, *, k_min: int, k_max: int, n_neighbors: int,
                max_images: int):
    """What both estimators do before scoring any K: at most ``max_images`` rows (a draw of ``rng``),
    the range of K cut to what they allow, the cosine kNN graph, and the answers that need no score.
    Returns (rows, graph, the evidence so far), or (rows, None, (K, evidence)) where it is decided:
    too few images, features that do not vary, or the graph's components (K in range, each of at
    least max(n_neighbors, half its even share N / 2K): a component under half its share is an island
    of a few images, not one of K clusters -- 27 of 1,797 trained digits made K = 2 when 1% sufficed)."""
    if len(x) > max_images:
        x = x[np.sort(rng.choice(len(x), max_images, replace=False))]
    n = len(x)
    k_max = min(k_max, n - 1, (n - 2) // 2)
    k_min = max(2, min(k_min, k_max))
    if k_max < 2:
        return x, None, (1, {"criterion": "too few images to compare cluster counts", "n_images": n})
    if not np.ptp(x, axis=0).any():
        return x, None, (1, {"criterion": "the features do not vary: one cluster", "n_images": n})
    graph = knn_graph(x, min(n_neighbors, n - 1))
    note = {"k_range": [k_min, k_max], "n_images": n, "n_neighbors": min(n_neighbors, n - 1)}
    n_parts, parts = connected_components(graph, directed=False)
    sizes = np.bincount(parts)
    if n_parts > 1:
        note["component_sizes"] = sizes.tolist()
    if k_min <= n_parts <= k_max and sizes.min() >= max(n_neighbors, n // (2 * n_parts)):
        return x, None, (n_parts, {"criterion": COMPONENTS, **note})
    return x, graph, note


def estimate_n_clusters(features: np.ndarray, *, k_min: int = 2, k_max: int = 30, n_neighbors: int = 10,
                        seed: int = 0, max_images: int = 10_000, silhouette_sample: int = 3_000,
                        n_init: int = 10) -> tuple[int, dict]:
    """(K, evidence): the K in [k_min, k_max] whose spectral clustering of ``features`` has the
    highest mean silhouette. Evidence: the criterion, the range, the images used and every K's score."""
    rng = np.random.default_rng(seed)
    x, graph, found = _candidates(np.ascontiguousarray(features, dtype=np.float32), rng, k_min=k_min, k_max=k_max,
                                  n_neighbors=n_neighbors, max_images=max_images)
    if graph is None:
        return found
    n, (k_min, k_max) = len(x), found["k_range"]
    with warnings.catch_warnings():  # LOBPCG's tolerance notes (many lines); its result is used either way
        warnings.simplefilter("ignore", UserWarning)
        emb = spectral_embedding(graph, 2 * k_max, seed=seed)
    sample = np.sort(rng.choice(n, min(silhouette_sample, n), replace=False))
    scores = {}
    for k in range(k_min, k_max + 1):  # one k-means per candidate K, not per image
        e = emb[:, : 2 * k]
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        labels, _, _ = kmeans(e, k, seed=seed, n_init=n_init)
        sub = labels[sample]
        scores[k] = float(silhouette_score(x[sample], sub)) if len(np.unique(sub)) > 1 else -1.0
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    note = {"criterion": CRITERION, **found, "silhouette": {str(k): round(s, 4) for k, s in scores.items()}}
    if len(ranked) > 1:
        note["runner_up"] = {"k": ranked[1], "score": round(scores[ranked[1]], 4)}
    return ranked[0], note


MODULARITY = "modularity of spectral clustering on the cosine kNN graph (Newman 2006)"


def estimate_from_features(features: np.ndarray, *, k_min: int = 2, k_max: int = 30, n_neighbors: int = 10,
                           seed: int = 0, max_images: int = 10_000, n_init: int = 10) -> tuple[int, dict]:
    """(K, evidence): K in [k_min, k_max] read off learned ``features`` (rows L2-normalised here: the
    heads' cosine geometry): the K whose spectral clustering of the cosine kNN graph (the spectral
    head's, 2K eigenvectors) has the highest modularity on that graph; where the graph falls into
    K in range components of at least max(n_neighbors, half of N / K images), their count (as
    :func:`estimate_n_clusters`). Evidence: the criterion, the range, the images used, every K's
    score and the runner-up (the second-best K, with its score)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x, graph, note = _candidates(x, np.random.default_rng(seed), k_min=k_min, k_max=k_max, n_neighbors=n_neighbors,
                                 max_images=max_images)
    if graph is None:
        return note
    k_min, k_max = note["k_range"]
    with warnings.catch_warnings():  # LOBPCG's tolerance notes; its result is used either way
        warnings.simplefilter("ignore", UserWarning)
        emb = spectral_embedding(graph, 2 * k_max, seed=seed)
    scores = {}
    for k in range(k_min, k_max + 1):  # one k-means per candidate K, not per image
        e = emb[:, : 2 * k]
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        scores[k] = round(modularity(graph, kmeans(e, k, seed=seed, n_init=n_init)[0]), 4)
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    note = {"criterion": MODULARITY, **note, "scores": {str(k): v for k, v in scores.items()}}
    if len(ranked) > 1:
        note["runner_up"] = {"k": ranked[1], "score": scores[ranked[1]]}
    return ranked[0], note


def estimate_from_pixels(images: np.ndarray, *, seed: int = 0) -> tuple[int, dict]:
    """(K, evidence) for uint8 images (N, H, W[, C]): :func:`estimate_n_clusters` on their
    :func:`pixel_features`."""
    k, evidence = estimate_n_clusters(pixel_features(images, seed=seed), seed=seed)
    return k, {"k": k, "features": "pixels, centred, PCA to 50", **evidence}
