"""Clustering as pure functions on feature arrays: k-means (faiss) and normalised spectral
clustering on the sparse kNN graph (no N x N matrix), and the modularity of a partition of such a
graph."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh, lobpcg

from ..errors import ConfigError
from .knn import knn_graph, topk_cosine


def _check_k(n: int, k: int) -> None:
    if k > n:
        raise ConfigError(f"n_clusters (K={k}) is larger than the number of images (N={n})")
    if k < 1:
        raise ConfigError(f"n_clusters must be >= 1, got {k}")


def kmeans(features: np.ndarray, n_clusters: int, *, seed: int = 0, n_iter: int = 20, n_init: int = 1,
           spherical: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """faiss k-means: (labels int64 (N,), centroids float32 (K, D), objective). The best of
    ``n_init`` restarts; deterministic for a seed."""
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    _check_k(n, n_clusters)
    if not np.isfinite(x).all():
        raise ConfigError("features contain NaN or infinite values")
    km = faiss.Kmeans(d, n_clusters, niter=n_iter, nredo=n_init, seed=seed % 2**31, spherical=spherical,
                      max_points_per_centroid=max(256, -(-n // n_clusters)), verbose=False,
                      min_points_per_centroid=1)  # only silences faiss's "provide more points" warning
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.ravel().astype(np.int64), km.centroids.astype(np.float32), float(km.obj[-1])


def assign_to_centroids(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (Euclidean) of each row: out-of-sample assignment."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, labels = index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return labels.ravel().astype(np.int64)


def spectral_embedding(graph: sp.spmatrix, n_components: int, *, seed: int = 0) -> np.ndarray:
    """Top eigenvectors of the normalised affinity D^-1/2 W D^-1/2 (Ng, Jordan & Weiss 2002), as
    rows of an (N, n_components) array, by a sparse eigensolver.

    A tiny uniform teleport (1e-6 of the mean degree) is added through the degree vector so that a
    disconnected graph still has a well-defined, finite embedding.
    """
    n = graph.shape[0]
    w = sp.csr_matrix(graph, dtype=np.float64)
    deg = np.asarray(w.sum(axis=1)).ravel()
    deg = deg + 1e-6 * max(deg.mean(), 1e-12)
    dinv = 1.0 / np.sqrt(deg)
    m = sp.diags(dinv) @ w @ sp.diags(dinv)
    k = min(n_components, n - 1)
    rng = np.random.default_rng(seed)
    if n > 5000:
        # LOBPCG on -M, warm-started at the degree vector, converges fast for a few clusters; fall back
        # to ARPACK if it does not.
        x0 = rng.standard_normal((n, k))
        x0[:, 0] = np.sqrt(deg)
        try:
            vals, vecs = lobpcg(-m, x0, tol=1e-5, maxiter=300, largest=False)
            if np.isfinite(vecs).all():
                return vecs[:, np.argsort(vals)].astype(np.float32)
        except Exception:  # noqa: BLE001 - numerical failure: use ARPACK below
            pass
    v0 = rng.standard_normal(n)
    vals, vecs = eigsh(m, k=k, which="LA", v0=v0, tol=1e-6)
    return vecs[:, np.argsort(-vals)].astype(np.float32)


def spectral(features: np.ndarray, n_clusters: int, *, n_neighbors: int = 10, seed: int = 0,
             n_components: int | None = None, n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Normalised spectral clustering on the symmetrised cosine kNN graph of ``features``.

    kNN graph -> top ``n_components`` eigenvectors of D^-1/2 W D^-1/2 (default 2K; on the
    development data, digits and USPS, K and 2K tie over five methods' features: mean ACC 0.848 vs
    0.846, ``benchmarks/results/dev-choices-*.json``) -> rows L2-normalised -> k-means (``n_init``
    restarts). Returns (labels, spectral embedding)."""
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    _check_k(n, n_clusters)
    if not np.isfinite(x).all():
        raise ConfigError("features contain NaN or infinite values")
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64), np.ones((n, 1), np.float32)
    return spectral_of_graph(knn_graph(x, min(n_neighbors, n - 1)), n_clusters, seed=seed,
                             n_components=n_components, n_init=n_init)


def spectral_of_graph(graph: sp.spmatrix, n_clusters: int, *, seed: int = 0, n_components: int | None = None,
                      n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spectral` on a given symmetric affinity graph (N >= 2, K >= 2)."""
    n = graph.shape[0]
    comps = min(n_components or 2 * n_clusters, n - 1)
    emb = spectral_embedding(graph, comps, seed=seed)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels, _, _ = kmeans(emb, n_clusters, seed=seed, n_init=n_init)
    return labels, emb


def modularity(graph: sp.spmatrix, labels: np.ndarray) -> float:
    """Newman's modularity of a partition of a weighted undirected graph (Newman, PRE 2006, Eq 3 with
    weights): Q = sum_c [W_cc / 2m - (d_c / 2m)^2], W_cc the weight of the edges inside cluster c (both
    directions), d_c its total degree, 2m the total weight. 0 for a partition no better than chance on
    the graph's degrees; a partition that puts most of the degree in one cluster pays (d_c / 2m)^2.
    Label-free: it scores a partition against the graph only. O(edges)."""
    g = sp.coo_matrix(graph)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (g.shape[0],):
        raise ValueError(f"labels of shape {labels.shape} for a graph of {g.shape[0]} nodes")
    w = g.data.astype(np.float64)
    total = float(w.sum())
    if total <= 0:
        raise ValueError("modularity needs a graph with positive total weight")
    inside = float(w[labels[g.row] == labels[g.col]].sum())
    degree = np.bincount(labels[g.row], weights=w, minlength=int(labels.max()) + 1)
    return inside / total - float(((degree / total) ** 2).sum())


def cosine_silhouette(features: np.ndarray, labels: np.ndarray, block: int = 65_536) -> float:
    """The mean silhouette (Rousseeuw, J. Comput. Appl. Math. 1987, Eq 1: s(i) = (b(i) - a(i)) /
    max(a(i), b(i)), 0 for a member of a singleton cluster) under the cosine distance 1 - x.y of the
    L2-normalised rows, exact over all N images without any pairwise matrix: the mean distance from
    x to the members of C is 1 - x.mu_C (mu_C the plain mean of C's rows), so a(i) =
    |C| (1 - x_i.mu_C) / (|C| - 1) (itself left out, its distance 0) and b(i) the least 1 - x_i.mu_C'
    over the other clusters. O(N K D), rows in blocks. scikit-learn's ``silhouette_score(x, labels,
    metric="cosine")`` gives the same number from N^2 distances. Needs two clusters or more."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(x),):
        raise ValueError(f"labels of shape {labels.shape} for {len(x)} rows")
    size = np.bincount(labels)
    used = np.flatnonzero(size)
    if used.size < 2:
        raise ValueError("the silhouette needs at least two clusters")
    means = np.zeros((size.size, x.shape[1]))
    np.add.at(means, labels, x)
    means[used] /= size[used, None]
    total = 0.0
    for start in range(0, len(x), block):
        rows, own = x[start:start + block], labels[start:start + block]
        dist = 1.0 - rows @ means[used].T  # mean distance to each used cluster
        col = np.searchsorted(used, own)
        n_own = size[own].astype(np.float64)
        a = dist[np.arange(len(rows)), col] * n_own / np.maximum(n_own - 1, 1)
        dist[np.arange(len(rows)), col] = np.inf
        b = dist.min(axis=1)
        s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
        total += float(np.where(n_own > 1, s, 0.0).sum())
    return total / len(x)


def knn_vote(reference: np.ndarray, reference_labels: np.ndarray, queries: np.ndarray, n_clusters: int,
             k: int = 10) -> np.ndarray:
    """The cluster of each query row by a vote of its ``k`` nearest reference rows (cosine), each
    weighing its similarity (at least 0, plus 1e-6): the vote heads' out-of-sample rule."""
    k = min(k, len(reference))
    sims, idx = topk_cosine(queries, reference, k)
    votes = np.zeros((len(queries), n_clusters))
    np.add.at(votes, (np.repeat(np.arange(len(queries)), k), np.asarray(reference_labels)[idx].ravel()),
              np.maximum(sims, 0).ravel() + 1e-6)
    return votes.argmax(1).astype(np.int64)


def split_half_stability(features: np.ndarray, partition, n_clusters: int, *, seed: int = 0, k: int = 10) -> float:
    """How reproducible ``partition`` (a function of features to labels 0..K-1) is on independent
    data (Lange, Roth, Braun & Buhmann, Neural Computation 2004: cluster two halves, transfer one
    half's clusters to the other by a classifier, compare): the rows are split in two random halves
    (``seed``), each half is partitioned on its own, both partitions are carried to every row by the
    kNN vote (:func:`knn_vote`), and the adjusted Rand index of the two is returned (1: the same
    partition from either half; about 0: unrelated). Needs 4 rows or more."""
    from sklearn.metrics import adjusted_rand_score

    x = np.asarray(features, dtype=np.float32)
    if len(x) < 4:
        raise ValueError("split-half stability needs at least 4 rows")
    order = np.random.default_rng(seed).permutation(len(x))
    halves = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2:])
    carried = [knn_vote(x[h], partition(x[h]), x, n_clusters, k) for h in halves]
    return float(adjusted_rand_score(*carried))
