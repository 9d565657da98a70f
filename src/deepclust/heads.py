"""Reading clusters off features: cluster heads, each a small class with one protocol.

``fit(features)`` finds the clusters of every row (``labels_``) and keeps what ``predict`` needs;
``predict(features)`` assigns new rows; ``save(path)`` writes a ``head.npz`` and
:meth:`ClusterHead.load` reads one back as the class its saved ``kind`` names. Nothing here reads
labels.

Heads fitted on the features alone (:data:`HEADS`, the post-hoc heads): :class:`KMeansHead` (faiss;
the papers' protocol), :class:`SpectralHead` (normalised spectral clustering on the sparse kNN
graph), :class:`AgglomerativeHead` (JULE's forward pass on fixed features: the graph-degree-linkage
agglomeration of ``structure.agglomeration`` from its initial clusters down to K, size-aware;
JULE's "OURS-RC", usable after any method), :class:`WardHead` (Ward's merges of k-means leaves: nested
over K, the tree a run keeps, ``structure.hierarchy``) and :class:`GraphHead` (the agglomerative
partition, checked against the spectral one of the cosine kNN graph: spectral's is kept instead when
it wins two judges built from neither partition's graph, the silhouette on the features and the
split-half stability). Features are L2-normalised first (all of them work on cosine geometry: the
memory-bank methods train cosine similarities).

A method's own clusters (:class:`OwnClusters`, one per method of the run, by the cluster head that
reads them): :class:`LinearHead` where the method gives them as an affine map of a network layer
(:class:`AssignmentMap`: DCCM's head, the head a learned stage kept), argmax(weight x + bias) of any
image's raw features; else :class:`GivenLabelsHead`, its clusters kept for the rows it was trained on.

Out-of-sample rules, saved with the run: k-means assigns a new image to the nearest centroid;
spectral, agglomerative and given clusters are not convex, so those heads keep (up to 200,000)
training features with their clusters and assign a new image by a similarity-weighted vote of its
10 nearest training images (the same kNN graph rule the clustering was built on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import ConfigError, DataError
from .io import save_npz
from .structure.agglomeration import agglomerate, initial_clusters, small_cluster_floor
from .structure.clustering import (assign_to_centroids, cosine_silhouette, kmeans, spectral, spectral_of_graph,
                                   split_half_stability)
from .structure.hierarchy import ward_labels
from .structure.knn import knn_graph, topk_cosine

HEADS = ("kmeans", "spectral", "agglomerative", "graph", "ward")  # heads fitted on the features alone
MAX_REFERENCE = 200_000  # training features kept by a vote head for out-of-sample votes
MAX_SPECTRAL_FIT = 200_000  # above this, a vote head is fitted on a random subsample, the rest voted in
AGGLOMERATIVE_KS = 20  # JULE's K_s (Table 2): neighbours of the agglomerative head's graph (Eq 4)
# clusters under 5% of the mean size are set aside at the cut (structure.agglomeration.merge_clusters,
# min_size; chosen on digits and USPS pixels, where 0.02-0.1 give the same partition as no rule)
AGGLOMERATIVE_SMALL = 0.05
# the graph head keeps the agglomerative partition unless the spectral partition's cosine silhouette on
# the features is more than GRAPH_MARGIN higher and its split-half stability (an adjusted Rand index)
# more than GRAPH_STABILITY_MARGIN higher (graph_choice). The silhouette's 0 is the plain comparison;
# the stability's 0.1 was chosen on the development rows (benchmarks/weak_features.py: digits and USPS,
# noisy pixels and PAD embeddings, balanced and 10:1), where margins of 0.08 to 0.16 kept the partition
# within about 0.01 ACC of the better of the two on average, and 0 lost most on the trained embeddings
# of the 10:1 subsets. Before issue 42 the judge was the modularity of the kNN graph spectral
# clustering partitions, with a margin of 0.06 read off the rows it was chosen on.
GRAPH_MARGIN = 0.0
GRAPH_STABILITY_MARGIN = 0.1
VOTE_K = 10
SAVED = ("kind", "n_clusters", "labels")  # what every head.npz holds; each kind adds its own arrays


def normalise(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class AssignmentMap(NamedTuple):
    """A method's clusters of any image as argmax(weight x + bias) of the network's ``layer``
    (``Method.assignment_map``)."""

    layer: str
    weight: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)


@dataclass(frozen=True)
class OwnClusters:
    """One method's own clusters as the run hands them to the heads: its final clusters of the
    training images (``labels``, int64 (N,), or None) and its ``map`` (or None)."""

    labels: np.ndarray | None = None
    map: AssignmentMap | None = None

    def given(self) -> bool:
        return self.labels is not None or self.map is not None


class Invalid:
    """The one-line DataError of a head file whose arrays are wrong, with the checks every kind uses."""

    def __init__(self, path):
        self.path = path

    def __call__(self, what: str) -> DataError:
        return DataError(f"cluster head {self.path} is invalid: {what}")

    def integers(self, x: np.ndarray, name: str, n_clusters: int) -> np.ndarray:
        if x.ndim != 1 or x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() >= n_clusters)):
            raise self(f"{name} must be integers in [0, {n_clusters}) in one dimension")
        return x.astype(np.int64)

    def floats(self, x: np.ndarray, name: str) -> np.ndarray:
        if x.ndim != 2 or x.dtype.kind != "f" or not np.isfinite(x).all():
            raise self(f"{name} must be a finite float matrix, got {x.dtype} of shape {x.shape}")
        return x

    def rows(self, x: np.ndarray, name: str, n_clusters: int) -> np.ndarray:
        """A finite float (K, D) matrix, D >= 1: one row per cluster."""
        x = self.floats(x, name)
        if x.shape[0] != n_clusters or x.shape[1] < 1:
            raise self(f"{name} have shape {x.shape} for {n_clusters} clusters")
        return x


class ClusterHead:
    """The protocol every head keeps. A subclass names its ``kind`` (saved in ``head.npz``) and
    ``keys`` (the arrays it saves besides :data:`SAVED`; ``legacy``: the name a key had in older
    files) and ``params``, and gives ``fit``, ``predict``, ``width``, ``arrays`` and ``from_arrays``.
    ``note``: the evidence of a choice made in fitting; ``partitions``: other partitions a fit made
    on the way (neither is saved)."""

    kind: str = ""
    keys: tuple[str, ...] = ()
    legacy: dict[str, str] = {}
    params: tuple[str, ...] = ()  # the keyword options its constructor takes (:func:`post_hoc_head`)
    note: dict | None = None
    partitions: dict[str, np.ndarray] | None = None

    def __init__(self, n_clusters: int):
        self.n_clusters = int(n_clusters)

    def fit(self, features: np.ndarray) -> "ClusterHead":
        """Find the clusters of ``features``: sets ``labels_`` (int64 (N,)) and what predict needs."""
        raise NotImplementedError

    def predict(self, features: np.ndarray) -> np.ndarray:
        """The cluster of each row of ``features`` (int64)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        """The dimension of the features the head reads."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted state ``save`` writes, by ``keys``."""
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray], n_clusters: int, labels: np.ndarray | None,
                    invalid: Invalid) -> "ClusterHead":
        """The fitted head whose saved arrays are ``a`` (every key of ``keys``, checked with
        ``invalid``), ``labels`` its ``labels_`` (None when the file holds none)."""
        raise NotImplementedError

    def assignment_map(self, layer: str) -> AssignmentMap | None:
        """The head as an affine map of the network's ``layer``, where it is one (else None)."""
        return None

    def save(self, path: str | Path) -> None:
        labels = getattr(self, "labels_", None)
        save_npz(path, kind=np.array(self.kind), n_clusters=np.array(self.n_clusters),
                 labels=labels if labels is not None else np.zeros(0, np.int64), **self.arrays())

    @staticmethod
    def load(path: str | Path) -> "ClusterHead":
        """Read a head written by :meth:`save`, as the class its kind names. Guarantee: the head
        returned has what its ``predict`` needs (a known kind, K >= 1, integer cluster labels in
        [0, K), its own arrays finite and of consistent shapes); any other file -- missing, not an
        npz, a corrupt or truncated zip, pickled object arrays (never unpickled), missing keys,
        wrong dtypes, shapes or ranges -- raises :class:`DataError` with one line."""
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive")
            with z:
                cls = head_class(z["kind"]) if "kind" in z.files else None
                names = {k: k for k in SAVED}
                for key in cls.keys if cls is not None else ():
                    names[key] = key if key in z.files else cls.legacy.get(key, key)
                missing = [k for k, name in names.items() if name not in z.files]
                if missing:
                    raise DataError(f"cluster head {path} lacks {', '.join(missing)}; not a head.npz")
                a = {k: z[name] for k, name in names.items()}
        except DataError:
            raise
        except Exception as e:  # whatever a crafted or damaged file makes the reader raise
            reason = (str(e).splitlines() or [""])[0] or type(e).__name__
            raise DataError(f"cannot read cluster head {path}: {reason}") from None
        return _restore(a, cls, Invalid(path))


def _restore(a: dict[str, np.ndarray], cls: type[ClusterHead] | None, invalid: Invalid) -> ClusterHead:
    """The head of the checked arrays ``a`` (``cls`` None: the kind is unknown)."""
    if cls is None:
        raise invalid(f"kind must be one of {', '.join(KINDS)}")
    k = a["n_clusters"]
    if k.ndim != 0 or k.dtype.kind not in "iu" or int(k) < 1:
        raise invalid("n_clusters must be an integer >= 1")
    k = int(k)
    labels = invalid.integers(a["labels"], "labels", k)
    return cls.from_arrays(a, k, labels if labels.size else None, invalid)


def head_class(kind: np.ndarray) -> type[ClusterHead] | None:
    """The class of a saved ``kind`` (a 0-d text array), None for anything else."""
    return KINDS.get(str(kind)) if kind.ndim == 0 and kind.dtype.kind == "U" else None


class KMeansHead(ClusterHead):
    """k-means (faiss, 3 restarts) of the normalised features; a new image joins its nearest centroid."""

    kind = "kmeans"
    keys = ("centroids",)
    params = ("seed",)

    def __init__(self, n_clusters: int, *, seed: int = 0):
        super().__init__(n_clusters)
        self.seed = seed

    def fit(self, features: np.ndarray) -> "KMeansHead":
        self.labels_, self.centroids, _ = kmeans(normalise(features), self.n_clusters, seed=self.seed, n_init=3)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return assign_to_centroids(normalise(features), self.centroids)

    @property
    def width(self) -> int:
        return self.centroids.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids}

    @classmethod
    def from_arrays(cls, a, n_clusters, labels, invalid) -> "KMeansHead":
        head = cls(n_clusters)
        head.centroids, head.labels_ = invalid.rows(a["centroids"], "centroids", n_clusters), labels
        return head


class VoteHead(ClusterHead):
    """Clusters that need not be convex: fitting keeps their mean directions (``centroids``) and (up
    to ``MAX_REFERENCE``, a seeded subsample) the training features with their clusters; a new image
    joins by a similarity-weighted vote of its ``VOTE_K`` nearest training images (by the nearest
    centroid where a file holds no training features). A subclass finds the partition
    (``partition``); above ``max_fit`` images it is found on a seeded subsample of that size, which
    keeps its clusters, and the other images are voted in."""

    keys = ("centroids", "reference", "reference_labels")
    params = ("seed", "max_fit")

    def __init__(self, n_clusters: int, *, seed: int = 0, max_fit: int = MAX_SPECTRAL_FIT):
        super().__init__(n_clusters)
        self.seed, self.max_fit = seed, max_fit

    def partition(self, x: np.ndarray) -> np.ndarray:
        """The clusters (int64 (N,)) of the L2-normalised features ``x``."""
        raise NotImplementedError

    def fit(self, features: np.ndarray) -> "VoteHead":
        x = normalise(features)
        if len(x) <= self.max_fit:
            return self.fit_partition(x, self.partition(x))
        sample = np.sort(np.random.default_rng(self.seed).choice(len(x), self.max_fit, replace=False))
        part = normalise(x[sample])
        found = self.partition(part)
        self.fit_partition(part, found)
        labels = self.predict(x)
        labels[sample] = found  # the subsample keeps its own clusters
        self.labels_ = labels
        return self

    def fit_partition(self, features: np.ndarray, labels: np.ndarray) -> "VoteHead":
        """Fit with the partition of ``features`` already known (``labels``, e.g. made by another head
        on the same features): the centroids and the training features that vote."""
        x = normalise(features)
        labels = np.asarray(labels, dtype=np.int64)
        sums = np.zeros((self.n_clusters, x.shape[1]), np.float64)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=self.n_clusters)[:, None]
        keep = np.arange(len(x))
        if len(x) > MAX_REFERENCE:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(x), MAX_REFERENCE, replace=False))
        self.centroids = (sums / np.maximum(counts, 1)).astype(np.float32)
        self.reference, self.reference_labels = x[keep].astype(np.float16), labels[keep]
        self.labels_ = labels
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        x = normalise(features)
        if self.reference is None:
            return assign_to_centroids(x, self.centroids)
        ref = self.reference.astype(np.float32)
        k = min(VOTE_K, len(ref))
        sims, idx = topk_cosine(x, ref, k)
        votes = np.zeros((len(x), self.n_clusters))
        np.add.at(votes, (np.repeat(np.arange(len(x)), k), self.reference_labels[idx].ravel()),
                  np.maximum(sims, 0).ravel() + 1e-6)
        return votes.argmax(1).astype(np.int64)

    @property
    def width(self) -> int:
        return self.centroids.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        empty = self.reference is None
        return {"centroids": self.centroids,
                "reference": np.zeros((0, 0), np.float16) if empty else self.reference,
                "reference_labels": np.zeros(0, np.int64) if empty else self.reference_labels}

    @classmethod
    def from_arrays(cls, a, n_clusters, labels, invalid) -> "VoteHead":
        centroids = invalid.rows(a["centroids"], "centroids", n_clusters)
        ref, ref_labels = invalid.floats(a["reference"], "reference"), None
        if ref.size:
            ref_labels = invalid.integers(a["reference_labels"], "reference_labels", n_clusters)
            if ref.shape[1] != centroids.shape[1] or len(ref_labels) != len(ref):
                raise invalid(f"reference {ref.shape} and its {len(ref_labels)} labels do not match "
                              f"centroids {centroids.shape}")
        head = cls(n_clusters)
        head.centroids, head.labels_ = centroids, labels
        head.reference, head.reference_labels = (ref, ref_labels) if ref.size else (None, None)
        return head


class SpectralHead(VoteHead):
    """Normalised spectral clustering on the cosine kNN graph (``n_neighbors``; ``n_components``
    eigenvectors, default 2K)."""

    kind = "spectral"
    params = ("seed", "n_neighbors", "n_components", "max_fit")

    def __init__(self, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10, n_components: int | None = None,
                 max_fit: int = MAX_SPECTRAL_FIT):
        super().__init__(n_clusters, seed=seed, max_fit=max_fit)
        self.n_neighbors, self.n_components = n_neighbors, n_components

    def partition(self, x: np.ndarray) -> np.ndarray:
        return spectral(x, self.n_clusters, n_neighbors=self.n_neighbors, seed=self.seed,
                        n_components=self.n_components)[0]


class AgglomerativeHead(VoteHead):
    """JULE's agglomeration on fixed features (:func:`agglomerative_labels`)."""

    kind = "agglomerative"

    def partition(self, x: np.ndarray) -> np.ndarray:
        return agglomerative_labels(x, self.n_clusters)


class GraphHead(VoteHead):
    """The agglomerative partition unless spectral's (of the cosine kNN graph) wins both judges of
    :func:`graph_choice` (:func:`graph_labels`). Fitting sets ``note`` (the judges' scores and the
    partition kept) and ``partitions`` (both partitions, by the kind of the head that makes each)."""

    kind = "graph"
    params = ("seed", "n_neighbors", "n_components", "margin", "max_fit")

    def __init__(self, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10, n_components: int | None = None,
                 margin: float = GRAPH_MARGIN, max_fit: int = MAX_SPECTRAL_FIT):
        super().__init__(n_clusters, seed=seed, max_fit=max_fit)
        self.n_neighbors, self.n_components, self.margin = n_neighbors, n_components, margin

    def partition(self, x: np.ndarray) -> np.ndarray:
        self.partitions, self.note = _graph_partitions(x, self.n_clusters, n_neighbors=self.n_neighbors,
                                                      seed=self.seed, n_components=self.n_components,
                                                      margin=self.margin)
        return self.partitions[self.note["kept"]]


class WardHead(VoteHead):
    """Ward's merges of k-means leaves cut at K (``structure.hierarchy.ward_labels``): the cuts of one
    tree, so its partitions at any two K (up to a quarter of the leaves) are nested, and a finished
    run re-cut at K' (``deepclust recut``) gives what a fit at K' gives."""

    kind = "ward"

    def partition(self, x: np.ndarray) -> np.ndarray:
        return ward_labels(x, self.n_clusters, seed=self.seed)


class GivenLabelsHead(VoteHead):
    """A partition found by other means (a method's own clusters, ``labels`` of the rows ``rows``, all
    by default): fitting keeps it for those rows, and every other row joins by the kNN vote over
    them. K is at least the largest given cluster + 1."""

    kind = "method"

    def __init__(self, n_clusters: int, labels: np.ndarray | None = None, *, rows: np.ndarray | None = None,
                 seed: int = 0):
        given = 0 if labels is None or not len(labels) else int(np.max(labels)) + 1
        super().__init__(max(n_clusters, given), seed=seed)
        self.given, self.rows = labels, rows

    def fit(self, features: np.ndarray) -> "GivenLabelsHead":
        if self.given is None:
            raise ValueError("GivenLabelsHead.fit needs the clusters it is given")
        rows = np.arange(len(features)) if self.rows is None else self.rows
        self.fit_partition(features[rows], self.given)
        labels = self.predict(features)
        labels[rows] = self.given
        self.labels_ = labels
        return self


class LinearHead(ClusterHead):
    """Clusters that are argmax(weight x + bias) of the features as the network gives them (not
    normalised): a method's :class:`AssignmentMap`."""

    kind = "linear"
    keys = ("weight", "bias")
    legacy = {"weight": "centroids"}

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        self.weight, self.bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
        super().__init__(len(self.bias))

    def fit(self, features: np.ndarray) -> "LinearHead":
        self.labels_ = self.predict(features)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float32) @ self.weight.T + self.bias).argmax(1).astype(np.int64)

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    def assignment_map(self, layer: str) -> AssignmentMap:
        return AssignmentMap(layer, self.weight, self.bias)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_arrays(cls, a, n_clusters, labels, invalid) -> "LinearHead":
        weight, bias = invalid.rows(a["weight"], "weight", n_clusters), a["bias"]
        if bias.shape != (n_clusters,) or bias.dtype.kind != "f" or not np.isfinite(bias).all():
            raise invalid(f"a linear head needs {n_clusters} finite offsets, got {bias.dtype} of shape {bias.shape}")
        head = cls(weight, bias)
        head.labels_ = labels
        return head


KINDS: dict[str, type[ClusterHead]] = {h.kind: h for h in (KMeansHead, SpectralHead, AgglomerativeHead, GraphHead,
                                                             WardHead, GivenLabelsHead, LinearHead)}


def post_hoc_head(kind: str, n_clusters: int, **options) -> ClusterHead:
    """An unfitted head of :data:`HEADS` by name, given those of ``options`` its class takes
    (``params``: ``seed``, ``n_neighbors``, ``n_components``, ``margin``, ``max_fit``)."""
    if kind not in HEADS:
        raise ConfigError(f"unknown cluster head '{kind}'; known: {', '.join(HEADS)}")
    cls = KINDS[kind]
    return cls(n_clusters, **{k: v for k, v in options.items() if k in cls.params})


def fit_head(features: np.ndarray, kind: str, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10,
             max_spectral_fit: int = MAX_SPECTRAL_FIT, n_components: int | None = None) -> ClusterHead:
    """A head of :data:`HEADS` fitted on features (never labels). The path to N = 1.28M: k-means is
    faiss (linear in N); the others above ``max_spectral_fit`` images are fitted on a random subsample
    of that size and the other images are assigned by the head's own out-of-sample rule (kNN vote),
    so the graph, the eigensolver and the merge loop stay bounded."""
    return post_hoc_head(kind, n_clusters, seed=seed, n_neighbors=n_neighbors, n_components=n_components,
                         max_fit=max_spectral_fit).fit(features)


def agglomerative_labels(features: np.ndarray, n_clusters: int) -> np.ndarray:
    """JULE's agglomeration on fixed features (its "RC" clusters): the directed kNN graph of Eq 4
    (K_s = 20, a = 1), the initial clusters of Sec 3.6 (1-NN chains), then greedy merges by Eq 7
    (K_c = 5, lambda = 1, exact Eq 13-14 updates) down to ``n_clusters``, size-aware (ours,
    ``structure.agglomeration``'s ``size_aware``: Eq 12's affinity over the partner's size too, and
    a cluster without affinity or under the floor joins by the mean, not the total, kNN edge weight;
    without it one cluster chained across classes on weak features, 5-9 times its share in
    benchmarks/results/weak-features.json). Where the initial clusters are already fewer than K
    (tiny data), the merges start from single images. Clusters under ``AGGLOMERATIVE_SMALL`` of the
    mean size are set aside at the cut (``min_size``)."""
    x = normalise(features)
    n = len(x)
    if not 1 <= n_clusters <= n:
        raise ConfigError(f"the agglomerative head needs 1 <= K <= N, got K={n_clusters}, N={n}")
    if n_clusters == n:
        return np.arange(n, dtype=np.int64)
    start = initial_clusters(x)
    if int(start.max()) + 1 < n_clusters:
        start = np.arange(n, dtype=np.int64)
    floor = small_cluster_floor(n, n_clusters, AGGLOMERATIVE_SMALL)
    return agglomerate(x, n_clusters, k_s=min(AGGLOMERATIVE_KS, n - 1), labels=start, min_size=floor,
                       size_aware=True)


def graph_labels(features: np.ndarray, n_clusters: int, *, n_neighbors: int = 10, seed: int = 0,
                 n_components: int | None = None, margin: float = GRAPH_MARGIN) -> tuple[np.ndarray, dict]:
    """The ``graph`` head: the agglomerative partition unless the spectral partition of the cosine
    kNN graph (``n_neighbors``) wins both judges of :func:`graph_choice` (then spectral's). Returns
    (labels, evidence: the judges' scores and the partition kept). Never reads labels."""
    found, note = _graph_partitions(features, n_clusters, n_neighbors=n_neighbors, seed=seed,
                                    n_components=n_components, margin=margin)
    return found[note["kept"]], note


def _graph_partitions(features: np.ndarray, n_clusters: int, *, n_neighbors: int = 10, seed: int = 0,
                      n_components: int | None = None, margin: float = GRAPH_MARGIN) -> tuple[dict, dict]:
    """The agglomerative and spectral partitions of :func:`graph_labels` (the first alone when there
    are too few images or K = 1), and the evidence of its choice."""
    x = normalise(features)
    n = len(x)
    if n_clusters == 1 or n < 3:
        return {"agglomerative": agglomerative_labels(x, n_clusters)}, {"kept": "agglomerative",
                                                                        "reason": "too few images or K = 1"}
    graph = knn_graph(x, min(n_neighbors, n - 1))
    found = {"agglomerative": agglomerative_labels(x, n_clusters),
             "spectral": spectral_of_graph(graph, n_clusters, seed=seed, n_components=n_components)[0]}
    return found, graph_choice(x, found, n_clusters, n_neighbors=n_neighbors, seed=seed,
                               n_components=n_components, margin=margin)


def graph_choice(x: np.ndarray, found: dict[str, np.ndarray], n_clusters: int, *, n_neighbors: int = 10,
                 seed: int = 0, n_components: int | None = None, margin: float = GRAPH_MARGIN,
                 stability_margin: float = GRAPH_STABILITY_MARGIN) -> dict:
    """The graph head's rule on its two partitions (``found``: "agglomerative" and "spectral" labels)
    of the L2-normalised features ``x``, by two judges that read neither head's graph: the cosine
    silhouette on the features (Rousseeuw 1987; ``structure.clustering.cosine_silhouette``) and,
    where spectral's silhouette is more than ``margin`` higher, the split-half stability of each head
    (Lange et al. 2004; ``structure.clustering.split_half_stability``: each head fitted on two random
    halves, both carried to every image by the kNN vote, their adjusted Rand index). Spectral's
    partition is kept only when it wins both, the stability by more than ``stability_margin`` (on
    halves too small for K clusters, the silhouette alone). Returns the evidence with ``kept``."""
    sil = {name: round(_silhouette(x, labels), 4) for name, labels in found.items()}
    note: dict = {"silhouette": sil, "margin": margin}
    if sil["spectral"] - sil["agglomerative"] <= margin:
        return {"kept": "agglomerative", **note}
    if len(x) // 2 < max(2 * n_clusters, n_neighbors + 1):
        return {"kept": "spectral", **note}
    makers = {"agglomerative": lambda z: agglomerative_labels(z, n_clusters),
              "spectral": lambda z: spectral(z, n_clusters, n_neighbors=n_neighbors, seed=seed,
                                             n_components=n_components)[0]}
    stab = {name: round(split_half_stability(x, make, n_clusters, seed=seed), 4) for name, make in makers.items()}
    wins = stab["spectral"] - stab["agglomerative"] > stability_margin
    return {"kept": "spectral" if wins else "agglomerative", **note, "stability": stab,
            "stability_margin": stability_margin}


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """The cosine silhouette of a partition of ``x`` (``structure.clustering.cosine_silhouette``); -1
    for a partition of one cluster (no silhouette: the worst)."""
    return cosine_silhouette(x, labels) if np.unique(labels).size > 1 else -1.0


def cluster_head(features: np.ndarray, kind: str, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10,
                 eigenvectors: int | None = None, own: OwnClusters | None = None, layer: str | None = None,
                 trained_rows: np.ndarray | None = None) -> ClusterHead:
    """The head ``cluster.head`` names, fitted on ``features`` (the network's ``layer``; never
    labels): a head of :data:`HEADS` (spectral ones with ``eigenvectors`` per cluster), or a method's
    own clusters, ``own``: its assignment map where the map reads ``layer`` (None: whatever layer it
    reads), a :class:`LinearHead`; else its final clusters, kept for the rows it was trained on
    (``trained_rows``, default all), the other rows by the kNN vote, a :class:`GivenLabelsHead`."""
    if kind in HEADS:
        comps = eigenvectors * n_clusters if eigenvectors else None
        return fit_head(features, kind, n_clusters, seed=seed, n_neighbors=n_neighbors, n_components=comps)
    if own is not None and own.map is not None and layer in (None, own.map.layer):
        return LinearHead(own.map.weight, own.map.bias).fit(features)
    if own is None or own.labels is None:
        raise ConfigError(f"cluster.head {kind}: this run has no such clusters (a method's own, or a head trained "
                          f"with the network: deepclust fit --cluster-head {kind}); use {', '.join(HEADS)}")
    return GivenLabelsHead(n_clusters, own.labels, rows=trained_rows).fit(features)


def fit_heads(layers: dict[str, np.ndarray], combos, n_clusters: int, own: dict[str, OwnClusters] | None = None,
              **options) -> dict[tuple[str, str], tuple[ClusterHead, float]]:
    """(head, seconds) of every (kind, layer) of ``combos``, each fitted on ``layers[layer]`` by
    :func:`cluster_head` (``options`` as it takes them); ``own``: each method of the run's own
    clusters, by the cluster head that reads them. The heads of a layer whose graph head came earlier
    and made their partitions (the same fits, on the same features and options) are built from those
    partitions, not fitted again."""
    out, known = {}, {}  # known: (kind, layer) -> a partition a graph head of that layer already made
    for kind, layer in combos:
        t0 = time.perf_counter()
        x = layers[layer]
        if (kind, layer) in known and len(known[(kind, layer)]) == len(x):  # the same fit: not run again
            head = post_hoc_head(kind, n_clusters, seed=options.get("seed", 0)).fit_partition(x, known[(kind, layer)])
        else:
            head = cluster_head(x, kind, n_clusters, own=(own or {}).get(kind), layer=layer, **options)
        known.update({(name, layer): labels for name, labels in (head.partitions or {}).items()})
        out[(kind, layer)] = (head, time.perf_counter() - t0)
    return out
