"""Features -> clusters -> metrics: the configured cluster head read off the features (never the
labels), and, when labels exist, every head's scores, the kNN accuracy and the collapse report."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from .config import ClusterConfig, Config, EvalConfig
from .data import ImageSet
from .errors import ConfigError
from .evaluate import clustering_scores, collapse_report, knn_top1, linear_probe
from .heads import ClusterHead, fit_head, head_from_labels

ALL_HEADS = (("kmeans", "embedding"), ("kmeans", "backbone"), ("spectral", "embedding"), ("spectral", "backbone"))


def fit_cluster_head(cluster: ClusterConfig, seed: int, features: np.ndarray, kind: str,
                     method_labels: np.ndarray | None = None, trained_rows: np.ndarray | None = None) -> ClusterHead:
    """A head read off ``features`` (never labels): k-means, spectral, or the method's own clusters
    (``method``: kept for the rows it was trained on, other rows by the head's kNN vote)."""
    k = cluster.n_clusters
    if kind != "method":
        comps = cluster.eigenvectors * k if cluster.eigenvectors else None
        return fit_head(features, kind, k, seed=seed, n_neighbors=cluster.n_neighbors, n_components=comps)
    if method_labels is None:
        raise ConfigError("cluster.head: this method has no clusters of its own; use kmeans or spectral")
    rows = np.arange(len(features)) if trained_rows is None else trained_rows
    head = head_from_labels(features[rows], method_labels, max(k, int(method_labels.max()) + 1), kind="method")
    labels = head.predict(features)
    labels[rows] = method_labels
    head.labels_ = labels
    return head


def _scores(images: ImageSet, pred: np.ndarray) -> dict[str, Any]:
    return clustering_scores(images.labels, pred) if images.labels is not None else {}


def knn_scores(ev: EvalConfig, bank_temperature: float, seed: int, images: ImageSet, embedding: np.ndarray,
               features: np.ndarray) -> dict[str, Any]:
    """Weighted kNN top-1 (test split against train split when both exist, else leave-one-out) and,
    with ``eval.linear_probe``, a linear probe; T is ``eval.knn_temperature`` or the bank's."""
    m: dict[str, Any] = {}
    t = ev.knn_temperature or bank_temperature
    kk = min(ev.knn_k, len(images) - 1)
    split = images.split
    both = split is not None and bool((split == 0).any()) and bool((split == 1).any())
    if both:
        tr, te = split == 0, split == 1
        m["knn_top1"] = knn_top1(embedding[tr], images.labels[tr], embedding[te], images.labels[te],
                                 k=min(kk, int(tr.sum())), temperature=t)
        m["knn_protocol"] = "test split against train split"
    else:
        m["knn_top1"] = knn_top1(embedding, images.labels, k=kk, temperature=t)
        m["knn_protocol"] = "leave-one-out"
    if ev.linear_probe and both:
        m["linear_probe_top1"] = linear_probe(features[split == 0], images.labels[split == 0],
                                              features[split == 1], images.labels[split == 1], seed=seed)
    return m


def compute_metrics(cfg: Config, images: ImageSet, features: np.ndarray, embedding: np.ndarray,
                    *, head=None, method_labels: np.ndarray | None = None, trained_rows=None,
                    layers: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], Any]:
    """Cluster ``features`` (the layer ``cluster.features`` names) with the configured head (labels
    never enter it), then score against labels if any.

    Keys: n_images, n_clusters, cluster_head, cluster_features, cluster_sizes, collapse (report),
    head_seconds; with labels: acc, nmi, nmi_geometric, ari (the chosen head), ``heads`` (every
    post-hoc head on the backbone and embedding layers, and the method's own clusters when it has
    them: acc / nmi / ari / seconds each), kmeans_embedding_acc / _nmi / _ari (the papers' protocol),
    knn_top1 (test split against train split when both exist, else leave-one-out), knn_protocol.
    """
    cl, seed = cfg.cluster, cfg.train.seed
    k = cl.n_clusters
    t0 = time.perf_counter()
    if head is None:
        head = fit_cluster_head(cl, seed, features, cl.head, method_labels, trained_rows)
        pred = head.labels_
    else:
        pred = head.predict(features)
    head_seconds = time.perf_counter() - t0
    collapse = collapse_report(pred, max(k, int(pred.max()) + 1))
    sizes = collapse.pop("sizes")
    if collapse["collapsed"]:
        print(f"deepclust: warning: the clustering collapsed: {collapse['warning']}", file=sys.stderr)
    m: dict[str, Any] = {"n_images": len(images), "n_clusters": k, "cluster_head": cl.head,
                         "cluster_features": cl.features, "head_seconds": round(head_seconds, 3),
                         "cluster_sizes": sizes, "collapse": collapse, **_scores(images, pred)}
    if images.labels is not None:
        layers = dict(layers or {})
        layers.setdefault(cl.features, features)
        layers.setdefault("embedding", embedding)
        m["heads"] = score_heads(cl, seed, images, layers, method_labels, trained_rows,
                                 known={(cl.head, cl.features): (m, head_seconds)})
        km = next(h for h in m["heads"] if (h["head"], h["features"]) == ("kmeans", "embedding"))
        m.update({f"kmeans_embedding_{key}": km[key] for key in ("acc", "nmi", "ari")})
        m.update(knn_scores(cfg.eval, cfg.memory.temperature, seed, images, embedding, features))
    return _plain(m), head


def score_heads(cluster: ClusterConfig, seed: int, images: ImageSet, layers: dict[str, np.ndarray],
                method_labels=None, trained_rows=None, known: dict | None = None) -> list[dict[str, Any]]:
    """Scores of every post-hoc head on every given layer (and of the method's own clusters)."""
    combos = [c for c in ALL_HEADS if c[1] in layers]
    if method_labels is not None:
        combos.append(("method", cluster.features if cluster.features in layers else "embedding"))
    rows = []
    for kind, layer in combos:
        if known and (kind, layer) in known:
            m, seconds = known[(kind, layer)]
            scores = {key: m[key] for key in ("acc", "nmi", "ari")}
        else:
            t0 = time.perf_counter()
            head = fit_cluster_head(cluster, seed, layers[layer], kind, method_labels, trained_rows)
            seconds = time.perf_counter() - t0
            scores = {key: v for key, v in _scores(images, head.labels_).items() if key in ("acc", "nmi", "ari")}
        rows.append({"head": kind, "features": layer, **scores, "head_seconds": round(seconds, 3)})
    return rows


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    for key, v in list(m.items()):
        if isinstance(v, (np.floating, np.integer)):
            m[key] = v.item()
    return m
