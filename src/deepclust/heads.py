"""Reading clusters off features: a fitted, saveable cluster head.

``kmeans`` (faiss; the papers' protocol), ``spectral`` (normalised spectral clustering on the
sparse kNN graph), ``agglomerative`` (JULE's forward pass on fixed features: the graph-degree-
linkage agglomeration of ``structure.agglomeration`` from its initial clusters down to K; JULE's
"OURS-RC", its clusters re-computed from the final representation, usable after any method) or
``graph`` (the agglomerative partition, checked against the spectral one on the same kNN graph:
spectral's is kept instead when the agglomerative one's modularity is more than ``GRAPH_MARGIN``
lower, the sign of agglomeration chaining into one large cluster on weak features).
Features are L2-normalised first (all heads work on cosine geometry: the memory-bank methods train
cosine similarities). Out-of-sample rules, saved with the run: k-means assigns a new image to the
nearest centroid; spectral and agglomerative clusters are not convex, so those heads keep (up to
200,000) training features with their clusters and assign a new image by a similarity-weighted vote
of its 10 nearest training images (the same kNN graph rule the clustering was built on). Nothing
here reads labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError
from .io import save_npz
from .structure.agglomeration import agglomerate, initial_clusters, small_cluster_floor
from .structure.clustering import assign_to_centroids, kmeans, modularity, spectral, spectral_of_graph
from .structure.knn import knn_graph, topk_cosine

HEADS = ("kmeans", "spectral", "agglomerative", "graph")  # heads fitted here
# kinds a saved head may have ("method": a method's own clusters, new images by the kNN vote;
# "linear": clusters that are the argmax of an affine map of the features: DCCM's head, and the head
# the learned clustering phase kept, ``cluster.head: scan``, methods/scan.py)
KINDS = (*HEADS, "method", "linear")
MAX_REFERENCE = 200_000  # training features kept by the spectral head for out-of-sample votes
MAX_SPECTRAL_FIT = 200_000  # above this, spectral / agglomerative is fitted on a random subsample, the rest voted in
AGGLOMERATIVE_KS = 20  # JULE's K_s (Table 2): neighbours of the agglomerative head's graph (Eq 4)
# clusters under 5% of the mean size are set aside at the cut (structure.agglomeration.merge_clusters,
# min_size; chosen on digits and USPS pixels, where 0.02-0.1 give the same partition as no rule)
AGGLOMERATIVE_SMALL = 0.05
# the graph head keeps the agglomerative partition unless its modularity on the kNN graph is more than
# this below the spectral partition's. Development data (benchmarks/weak_features.py: digits and USPS,
# noise-weakened pixels and briefly trained embeddings, balanced and 10:1; weak-features.json): where
# agglomeration won, spectral's modularity was at most 0.048 higher; where it chained into one cluster
# of 5-9 times its share, 0.107 to 0.479 higher. Margins from 0.048 to 0.065 keep the better of the two
# partitions in 26 of 28 cases (the two others are near-ties of modularity); 0.06 sits inside.
GRAPH_MARGIN = 0.06
VOTE_K = 10
_HEAD_KEYS = ("kind", "n_clusters", "centroids", "labels", "reference", "reference_labels")
_OPTIONAL_KEYS = ("bias",)  # the linear head's offsets (absent from heads of other kinds and older runs)


def normalise(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class ClusterHead:
    kind: str
    n_clusters: int
    centroids: np.ndarray  # (K, D) in the L2-normalised feature space
    labels_: np.ndarray | None = None
    reference: np.ndarray | None = None  # (M, D) float16 normalised training features (spectral)
    reference_labels: np.ndarray | None = None
    bias: np.ndarray | None = None  # (K,) "linear": cluster = argmax(features @ centroids.T + bias)
    note: dict | None = field(default=None, compare=False)  # the evidence of a choice made in fitting (not saved)
    # the graph head's two partitions of the same features, by kind (not saved): fit_heads scores
    # the agglomerative and spectral heads of that layer from them instead of fitting them again
    partitions: dict | None = field(default=None, compare=False, repr=False)

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.kind == "linear":  # the raw features, as the method's head reads them
            return (np.asarray(features, np.float32) @ self.centroids.T + self.bias).argmax(1).astype(np.int64)
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

    def save(self, path: str | Path) -> None:
        empty = np.zeros(0, np.int64)
        save_npz(path, kind=np.array(self.kind), n_clusters=np.array(self.n_clusters), centroids=self.centroids,
                 labels=self.labels_ if self.labels_ is not None else empty,
                 reference=self.reference if self.reference is not None else np.zeros((0, 0), np.float16),
                 reference_labels=self.reference_labels if self.reference_labels is not None else empty,
                 bias=self.bias if self.bias is not None else np.zeros(0, np.float32))

    @classmethod
    def load(cls, path: str | Path) -> "ClusterHead":
        """Read a head written by :meth:`save`. Guarantee: the head returned has what :meth:`predict`
        needs (a known kind, K >= 1, finite float (K, D) centroids, integer cluster labels in [0, K),
        finite float (M, D) reference features with M labels); any other file -- missing, not an npz,
        a corrupt or truncated zip, pickled object arrays (never unpickled), missing keys, wrong
        dtypes, shapes or ranges -- raises :class:`DataError` with one line."""
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive")
            with z:
                missing = [k for k in _HEAD_KEYS if k not in z.files]
                if missing:
                    raise DataError(f"cluster head {path} lacks {', '.join(missing)}; not a head.npz")
                a = {k: z[k] for k in _HEAD_KEYS + tuple(k for k in _OPTIONAL_KEYS if k in z.files)}
        except DataError:
            raise
        except Exception as e:  # whatever a crafted or damaged file makes the reader raise
            reason = (str(e).splitlines() or [""])[0] or type(e).__name__
            raise DataError(f"cannot read cluster head {path}: {reason}") from None
        return cls._from_arrays(a, path)

    @classmethod
    def _from_arrays(cls, a: dict[str, np.ndarray], path) -> "ClusterHead":
        def bad(what: str) -> DataError:
            return DataError(f"cluster head {path} is invalid: {what}")

        def integers(x: np.ndarray, name: str, n_clusters: int) -> np.ndarray:
            if x.ndim != 1 or x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() >= n_clusters)):
                raise bad(f"{name} must be integers in [0, {n_clusters}) in one dimension")
            return x.astype(np.int64)

        def floats(x: np.ndarray, name: str) -> np.ndarray:
            if x.ndim != 2 or x.dtype.kind != "f" or not np.isfinite(x).all():
                raise bad(f"{name} must be a finite float matrix, got {x.dtype} of shape {x.shape}")
            return x

        kind, k = a["kind"], a["n_clusters"]
        if kind.ndim != 0 or kind.dtype.kind != "U" or str(kind) not in KINDS:
            raise bad(f"kind must be one of {', '.join(KINDS)}")
        if k.ndim != 0 or k.dtype.kind not in "iu" or int(k) < 1:
            raise bad("n_clusters must be an integer >= 1")
        k = int(k)
        centroids, ref = floats(a["centroids"], "centroids"), floats(a["reference"], "reference")
        if centroids.shape[0] != k or centroids.shape[1] < 1:
            raise bad(f"centroids have shape {centroids.shape} for {k} clusters")
        labels = integers(a["labels"], "labels", k)
        if str(kind) == "linear":
            bias = a.get("bias", np.zeros(0))
            if bias.shape != (k,) or bias.dtype.kind != "f" or not np.isfinite(bias).all():
                raise bad(f"a linear head needs {k} finite offsets, got {bias.dtype} of shape {bias.shape}")
            return cls("linear", k, centroids, labels if labels.size else None, bias=bias)
        if not ref.size:
            return cls(str(kind), k, centroids, labels if labels.size else None)
        ref_labels = integers(a["reference_labels"], "reference_labels", k)
        if ref.shape[1] != centroids.shape[1] or len(ref_labels) != len(ref):
            raise bad(f"reference {ref.shape} and its {len(ref_labels)} labels do not match "
                      f"centroids {centroids.shape}")
        return cls(str(kind), k, centroids, labels if labels.size else None, ref, ref_labels)


def fit_head(features: np.ndarray, kind: str, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10,
             max_spectral_fit: int = MAX_SPECTRAL_FIT, n_components: int | None = None) -> ClusterHead:
    """Fit a head on features (never labels). The path to N = 1.28M: k-means is faiss (linear in N);
    spectral and agglomerative above ``max_spectral_fit`` images are fitted on a random subsample of
    that size and the other images are assigned by the head's own out-of-sample rule (kNN vote), so
    the graph, the eigensolver and the merge loop stay bounded."""
    if kind not in HEADS:
        raise ConfigError(f"unknown cluster head '{kind}'; known: {', '.join(HEADS)}")
    x = normalise(features)
    if kind == "kmeans":
        labels, centroids, _ = kmeans(x, n_clusters, seed=seed, n_init=3)
    elif len(x) > max_spectral_fit:
        sample = np.sort(np.random.default_rng(seed).choice(len(x), max_spectral_fit, replace=False))
        head = fit_head(x[sample], kind, n_clusters, seed=seed, n_neighbors=n_neighbors,
                        max_spectral_fit=max_spectral_fit, n_components=n_components)
        labels = head.predict(x)
        labels[sample] = head.labels_  # the subsample keeps its own spectral clusters
        head.labels_ = labels
        return head
    elif kind == "agglomerative":
        return head_from_labels(x, agglomerative_labels(x, n_clusters), n_clusters, kind=kind, seed=seed)
    elif kind == "graph":
        found, note = _graph_partitions(x, n_clusters, n_neighbors=n_neighbors, seed=seed, n_components=n_components)
        head = head_from_labels(x, found[note["kept"]], n_clusters, kind=kind, seed=seed)
        head.note, head.partitions = note, found
        return head
    else:
        labels, _ = spectral(x, n_clusters, n_neighbors=n_neighbors, seed=seed, n_components=n_components)
        return head_from_labels(x, labels, n_clusters, kind=kind, seed=seed)
    return ClusterHead(kind, n_clusters, centroids, labels)


def agglomerative_labels(features: np.ndarray, n_clusters: int) -> np.ndarray:
    """JULE's agglomeration on fixed features (its "RC" clusters): the directed kNN graph of Eq 4
    (K_s = 20, a = 1), the initial clusters of Sec 3.6 (1-NN chains), then greedy merges by Eq 7
    (K_c = 5, lambda = 1, exact Eq 13-14 updates) down to ``n_clusters``. Where the initial clusters
    are already fewer than K (tiny data), the merges start from single images. Clusters under
    ``AGGLOMERATIVE_SMALL`` of the mean size are set aside at the cut (``min_size``)."""
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
    return agglomerate(x, n_clusters, k_s=min(AGGLOMERATIVE_KS, n - 1), labels=start, min_size=floor)


def graph_labels(features: np.ndarray, n_clusters: int, *, n_neighbors: int = 10, seed: int = 0,
                 n_components: int | None = None, margin: float = GRAPH_MARGIN) -> tuple[np.ndarray, dict]:
    """The ``graph`` head: the agglomerative partition unless the spectral partition of the same
    cosine kNN graph (``n_neighbors``) has a modularity more than ``margin`` higher (then spectral's).
    Returns (labels, evidence: both modularities and the partition kept). Never reads labels."""
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
    q = {name: round(modularity(graph, labels), 4) for name, labels in found.items()}
    return found, {"kept": graph_kept(q, margin), "modularity": q, "margin": margin}


def graph_kept(modularity_of: dict[str, float], margin: float = GRAPH_MARGIN) -> str:
    """The graph head's rule on the two partitions' modularities (rounded to 4 digits): the
    agglomerative one unless spectral's is more than ``margin`` higher."""
    return "spectral" if modularity_of["spectral"] - modularity_of["agglomerative"] > margin else "agglomerative"


def cluster_head(features: np.ndarray, kind: str, n_clusters: int, *, seed: int = 0, n_neighbors: int = 10,
                 eigenvectors: int | None = None, method_labels: np.ndarray | None = None,
                 trained_rows: np.ndarray | None = None,
                 method_map: tuple[np.ndarray, np.ndarray] | None = None) -> ClusterHead:
    """The head ``cluster.head`` names, read off ``features`` (never labels): k-means, spectral
    (``eigenvectors`` per cluster), or the method's own clusters (``method``: kept for the rows it
    was trained on, other rows by the head's kNN vote; with ``method_map`` = (A, c), the method's
    clusters are argmax(A x + c) of these features for any image: a ``linear`` head). ``scan``: the
    head the clustering phase trained, given as ``method_map`` (a ``linear`` head)."""
    if kind == "scan":
        if method_map is None:
            raise ConfigError("cluster.head scan is trained with the network (deepclust fit --cluster-head scan); "
                              "this run has no such head")
        return linear_head(features, method_map)
    if kind != "method":
        comps = eigenvectors * n_clusters if eigenvectors else None
        return fit_head(features, kind, n_clusters, seed=seed, n_neighbors=n_neighbors, n_components=comps)
    if method_labels is None:
        raise ConfigError("cluster.head: this method has no clusters of its own; use kmeans or spectral")
    if method_map is not None:
        return linear_head(features, method_map)
    rows = np.arange(len(features)) if trained_rows is None else trained_rows
    head = head_from_labels(features[rows], method_labels, max(n_clusters, int(method_labels.max()) + 1),
                            kind="method")
    labels = head.predict(features)
    labels[rows] = method_labels
    head.labels_ = labels
    return head


def linear_head(features: np.ndarray, affine: tuple[np.ndarray, np.ndarray]) -> ClusterHead:
    """A ``linear`` head: the clusters of any image are argmax(A x + c) of its features."""
    a, c = (np.asarray(v, np.float32) for v in affine)
    head = ClusterHead("linear", len(c), a, bias=c)
    head.labels_ = head.predict(features)
    return head


def fit_heads(layers: dict[str, np.ndarray], combos, n_clusters: int, method_map=None, phase_map=None,
              **options) -> dict[tuple[str, str], tuple]:
    """(head, seconds) of every (kind, layer) of ``combos``, each read off ``layers[layer]``;
    ``options`` as :func:`cluster_head` takes them; ``method_map`` = (layer, A, c): the method's
    clusters as argmax(A x + c) of that layer (``Method.assignment_map``), used for its own head there;
    ``phase_map`` the same of the clustering phase's head (kind ``scan``). The agglomerative and
    spectral heads of a layer whose graph head came earlier are built from the partitions it made
    (the same fits, on the same features and options), not fitted again."""
    out, known = {}, {}  # known: (kind, layer) -> a partition a graph head of that layer already made
    for kind, layer in combos:
        t0 = time.perf_counter()
        x = layers[layer]
        if (kind, layer) in known and len(known[(kind, layer)]) == len(x):  # the same fit: not run again
            head = head_from_labels(x, known[(kind, layer)], n_clusters, kind=kind, seed=options.get("seed", 0))
        else:
            given = {"method": method_map, "scan": phase_map}.get(kind)
            own = given is not None and layer == given[0]
            head = cluster_head(x, kind, n_clusters, method_map=tuple(given[1:]) if own else None, **options)
        known.update({(name, layer): labels for name, labels in (head.partitions or {}).items()})
        out[(kind, layer)] = (head, time.perf_counter() - t0)
    return out


def head_from_labels(features: np.ndarray, labels: np.ndarray, n_clusters: int, *, kind: str = "method",
                     seed: int = 0) -> ClusterHead:
    """A head for clusters found by other means (spectral clustering, a method's own clusters):
    mean directions as centroids, and (up to ``MAX_REFERENCE``) training features with their
    clusters for the kNN-vote rule that assigns new images."""
    x = normalise(features)
    labels = np.asarray(labels, dtype=np.int64)
    sums = np.zeros((n_clusters, x.shape[1]), np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=n_clusters)[:, None]
    centroids = (sums / np.maximum(counts, 1)).astype(np.float32)
    keep = np.arange(len(x))
    if len(x) > MAX_REFERENCE:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), MAX_REFERENCE, replace=False))
    return ClusterHead(kind, n_clusters, centroids, labels, x[keep].astype(np.float16), labels[keep])
