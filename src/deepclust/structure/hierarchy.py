"""The clusters' hierarchy: a merge tree over small leaves nested in a partition, as pure functions on
arrays (no network, no N x N matrix: the tree is over leaves, never over images).

Leaves: the k-means clusters of the (L2-normalised) features into ``n_leaves`` (:func:`tree_size`),
each split where the partition cuts it (a leaf is the images of one k-means cluster in one cluster
of the partition), so every cluster of the partition is a union of leaves. The tree: Ward's merges
of the leaves (Ward 1963; the size-weighted cost n_a n_b / (n_a + n_b) |m_a - m_b|^2 of the leaves'
centroids, each merge the cheapest), first the merges inside each cluster of the partition, then
those between clusters, in order. Cutting it after ``L - k`` merges (:func:`cut`) gives ``k``
clusters: at the partition's own K exactly its clusters, below it unions of them (coarser), above it
their parts (finer), so the cuts at any two k are nested.

Where the partition is itself a cut of the unconstrained tree of the same leaves (the ``ward`` head,
:func:`ward_labels`, whose fits at any K are nested), the tree kept for it is that tree and a cut at
any k equals a fit at k: Ward's costs never decrease along the greedy merges (the criterion is
reducible), so the merges inside the clusters at K all come before the merges between them, in the
same order.

Stored form: a scipy.cluster.hierarchy linkage array ``Z`` ((L - 1, 4): the two nodes merged, the
merge height, the leaves under the new node; node ``L + i`` is made by row ``i``), the leaf of every
image and the partition's cluster of every leaf (``groups``). Heights are Ward's costs made
non-decreasing along the merges inside the clusters and, apart, along those between them (a merge
between clusters of a partition that is not Ward's may cost less than one inside them), so scipy
draws the dendrogram of the clusters (``truncate_mode="lastp"``); cuts follow the merge order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import ConfigError
from .clustering import kmeans

LEAVES = 100  # k-means leaves of the tree (at least 2 K; at most the images)


class Hierarchy(NamedTuple):
    """A merge tree over ``leaves``: ``leaves`` int64 (N,) the leaf of every image, ``linkage``
    float64 (L - 1, 4) scipy's linkage array, ``groups`` int64 (L,) the partition's cluster of every
    leaf (the tree's clusters at K = groups.max() + 1)."""

    leaves: np.ndarray
    linkage: np.ndarray
    groups: np.ndarray

    @property
    def n_leaves(self) -> int:
        return len(self.groups)

    @property
    def n_clusters(self) -> int:
        """The clusters of the partition the tree was built on (its cut after the merges inside them)."""
        return len(np.unique(self.groups))


def tree_size(n_images: int, n_clusters: int) -> int:
    """The k-means leaves of a tree of ``n_images`` clustered into ``n_clusters``."""
    return int(min(n_images, max(LEAVES, 2 * n_clusters)))


def _unit(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kmeans_leaves(x: np.ndarray, n_leaves: int, seed: int = 0) -> np.ndarray:
    """k-means of ``x`` into ``n_leaves`` (every image its own leaf when there are no more images)."""
    if n_leaves >= len(x):
        return np.arange(len(x), dtype=np.int64)
    return kmeans(x, n_leaves, seed=seed, n_init=1)[0]


def build_hierarchy(features: np.ndarray, labels: np.ndarray, *, n_leaves: int | None = None,
                    seed: int = 0) -> Hierarchy:
    """The merge tree of the partition ``labels`` (int (N,) >= 0; a cluster number no image has is
    no node of it) of ``features``."""
    x = _unit(features)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(x),) or len(x) == 0 or labels.min() < 0:
        raise ValueError(f"labels of shape {labels.shape} for {len(x)} features")
    base = kmeans_leaves(x, n_leaves or tree_size(len(x), len(np.unique(labels))), seed)
    pairs, leaves = np.unique(np.c_[labels, base], axis=0, return_inverse=True)
    leaves = leaves.ravel().astype(np.int64)
    groups = pairs[:, 0].astype(np.int64)
    sizes = np.bincount(leaves).astype(np.float64)
    sums = np.zeros((len(sizes), x.shape[1]), np.float64)
    np.add.at(sums, leaves, x)
    return Hierarchy(leaves, ward_linkage(sums / sizes[:, None], sizes, groups), groups)


def ward_linkage(centroids: np.ndarray, sizes: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Scipy's linkage array of Ward's greedy merges of weighted points (``centroids``, ``sizes``);
    with ``groups``, no two points of different groups merge while two of one group can."""
    c, s = np.array(centroids, np.float64), np.array(sizes, np.float64)
    n = len(s)
    g = np.zeros(n, np.int64) if groups is None else np.asarray(groups, np.int64).copy()
    node, left, count = np.arange(n), np.ones(n, bool), np.ones(n, np.int64)  # per slot: node, open, leaves
    cost = _ward_costs(c, s, c, s)
    np.fill_diagonal(cost, np.inf)
    apart = g[:, None] != g[None, :]
    rows, across = np.zeros((max(n - 1, 0), 4)), np.zeros(max(n - 1, 0), bool)
    for step in range(n - 1):  # a loop over merges of leaves, never over images
        inside = np.where(apart, np.inf, cost)
        across[step] = not np.isfinite(inside).any()
        pick = cost if across[step] else inside
        a, b = np.unravel_index(int(np.argmin(pick)), pick.shape)
        a, b = min(a, b), max(a, b)
        count[a] += count[b]
        rows[step] = (min(node[a], node[b]), max(node[a], node[b]), cost[a, b], count[a])
        c[a] = (s[a] * c[a] + s[b] * c[b]) / (s[a] + s[b])
        s[a] += s[b]
        node[a], left[b] = n + step, False
        row = _ward_costs(c[a:a + 1], s[a:a + 1], c, s)[0]
        row[~left] = row[a] = np.inf
        cost[a], cost[:, a], cost[b], cost[:, b] = row, row, np.inf, np.inf
        apart[a] = apart[:, a] = g[a] != g
    for stage in (~across, across):  # heights non-decreasing inside the groups, and between them
        rows[stage, 2] = np.maximum.accumulate(np.maximum(rows[stage, 2], 0.0)) if stage.any() else 0.0
    return rows


def _ward_costs(ca: np.ndarray, sa: np.ndarray, cb: np.ndarray, sb: np.ndarray) -> np.ndarray:
    d2 = np.maximum((ca ** 2).sum(1)[:, None] + (cb ** 2).sum(1)[None, :] - 2 * ca @ cb.T, 0.0)
    return sa[:, None] * sb[None, :] / (sa[:, None] + sb[None, :]) * d2


def cut(tree: Hierarchy, n_clusters: int) -> np.ndarray:
    """The ``n_clusters`` clusters of every image (int64 (N,)): the tree after its first
    ``L - n_clusters`` merges. Numbered by the smallest partition cluster among a cluster's leaves,
    then by its smallest leaf: the cut at the partition's own count is the partition, numbered as
    it is where none of its clusters is empty."""
    n_leaves = tree.n_leaves
    if not 1 <= n_clusters <= n_leaves:
        raise ConfigError(f"this run's cluster tree can be cut into 1 to {n_leaves} clusters, not {n_clusters}")
    root = np.arange(2 * n_leaves - 1)
    z = tree.linkage[: n_leaves - n_clusters, :2].astype(np.int64)
    for i in range(len(z) - 1, -1, -1):  # top down over merges (a node's parent is made later)
        root[z[i]] = root[n_leaves + i]
    leaf_root = root[:n_leaves]
    _, cluster = np.unique(leaf_root, return_inverse=True)
    cluster = cluster.ravel()
    first_group = np.full(n_clusters, np.iinfo(np.int64).max)
    np.minimum.at(first_group, cluster, tree.groups)
    first_leaf = np.full(n_clusters, np.iinfo(np.int64).max)
    np.minimum.at(first_leaf, cluster, np.arange(n_leaves))
    rank = np.empty(n_clusters, np.int64)
    rank[np.lexsort((first_leaf, first_group))] = np.arange(n_clusters)
    return rank[cluster][tree.leaves]


def ward_labels(features: np.ndarray, n_clusters: int, *, n_leaves: int | None = None, seed: int = 0) -> np.ndarray:
    """The ``ward`` head's partition: the unconstrained tree of :func:`build_hierarchy`'s leaves
    (k-means of the features into ``n_leaves``, default :func:`tree_size`) cut at ``n_clusters``.
    Nested over K: the cuts of one tree."""
    x = _unit(features)
    if not 1 <= n_clusters <= len(x):
        raise ConfigError(f"the ward head needs 1 <= K <= N, got K={n_clusters}, N={len(x)}")
    one = np.zeros(len(x), np.int64)
    tree = build_hierarchy(x, one, n_leaves=n_leaves or tree_size(len(x), n_clusters), seed=seed)
    if tree.n_leaves < n_clusters:  # fewer distinct leaves than K (repeated images): single images
        tree = build_hierarchy(x, one, n_leaves=len(x), seed=seed)
    return cut(tree, n_clusters)
