"""Features -> clusters -> metrics: the configured cluster head read off the features (never the
labels), and, when labels exist, every head's scores, the kNN accuracy and the collapse report."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from .config import ClusterConfig, Config
from .data import ImageSet
from .evaluate import clustering_scores, collapse_report, head_scores, knn_report
from .heads import ClusterHead, OwnClusters, fit_heads
from .structure.n_clusters import estimate_from_features

# JULE's agglomeration (its "RC" clusters) on the embedding only: about 1 s at N = 10,000 on 128-d
# features, 4 s on 784-d pixels (niced, on the shared 2-core CPU); a 1024-d backbone would cost more.
ALL_HEADS = (("kmeans", "embedding"), ("kmeans", "backbone"), ("spectral", "embedding"), ("spectral", "backbone"),
             ("agglomerative", "embedding"))
SCORES = ("acc", "nmi", "ari")


def head_options(cluster: ClusterConfig, seed: int) -> dict[str, Any]:
    """What ``heads.fit_heads`` / ``heads.cluster_head`` take from ``cfg.cluster`` and the seed."""
    return {"n_clusters": cluster.n_clusters, "seed": seed, "n_neighbors": cluster.n_neighbors,
            "eigenvectors": cluster.eigenvectors}


def _combos(cluster: ClusterConfig, layers: dict[str, np.ndarray],
            own: dict[str, OwnClusters] | None = None) -> list[tuple[str, str]]:
    """Every post-hoc head on every given layer, then the own clusters of each method of the run
    that has them (``own``, by the cluster head that reads them), on ``cluster.features``."""
    combos = [c for c in ALL_HEADS if c[1] in layers]
    layer = cluster.features if cluster.features in layers else "embedding"
    return combos + [(name, layer) for name, clusters in (own or {}).items() if clusters.given()]


def compute_metrics(cfg: Config, images: ImageSet, features: np.ndarray, embedding: np.ndarray,
                    *, own: dict[str, OwnClusters] | None = None, trained_rows=None,
                    layers: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], ClusterHead]:
    """Cluster ``features`` (the layer ``cluster.features`` names) with the configured head (labels
    never enter it), then score against labels if any: first every head is fitted, then scored.
    ``own``: the own clusters of each method of the run (``heads.OwnClusters``: its final clusters
    and its assignment map), by the cluster head that reads them (``method``: the configured
    method's; a stage's under its name), kept for ``trained_rows`` where given.

    ``cluster.n_clusters`` None: K is read off ``features`` first (:func:`settle_n_clusters`).

    Keys: n_images, n_clusters, cluster_head, cluster_features, cluster_sizes, collapse (report),
    head_seconds, cluster_head_choice (the graph head: the partition it kept and why),
    n_clusters_found (K read off the features, or its check of a K from the pixels); with labels:
    acc, nmi, nmi_geometric, ari (the chosen head), ``heads`` (every post-hoc head on the backbone
    and embedding layers, and each method's own clusters where it has them: acc / nmi / ari /
    seconds each), kmeans_embedding_acc / _nmi / _ari (the papers' protocol),
    knn_top1 (test split against train split when both exist, else leave-one-out), knn_protocol.
    """
    cfg, found = settle_n_clusters(cfg, features)
    cl, labels, seed = cfg.cluster, images.labels, cfg.train.seed
    chosen = (cl.head, cl.features)
    layers = {"embedding": embedding, **(layers or {}), cl.features: features}
    combos = _combos(cl, layers, own) if labels is not None else []
    options = head_options(cl, seed)
    knn = {"k": cfg.eval.knn_k, "temperature": cfg.eval.knn_temperature or cfg.memory.temperature, "seed": seed,
           "probe": cfg.eval.linear_probe}  # T: eval.knn_temperature, else the bank's
    fitted = fit_heads(layers, [chosen, *(c for c in combos if c != chosen)], own=own, trained_rows=trained_rows,
                       **options)
    head, head_seconds = fitted[chosen]
    k, pred = cl.n_clusters, head.labels_
    collapse = collapse_report(pred, max(k, int(pred.max()) + 1))
    sizes = collapse.pop("sizes")
    if collapse["collapsed"]:
        print(f"deepclust: warning: the clustering collapsed: {collapse['warning']}", file=sys.stderr)
    m: dict[str, Any] = {"n_images": len(images), "n_clusters": k, "cluster_head": cl.head,
                         "cluster_features": cl.features, "head_seconds": round(head_seconds, 3),
                         "cluster_sizes": sizes, "collapse": collapse}
    if head.note is not None:  # the evidence of the head's own choice (the graph head's judges: silhouettes, stabilities)
        m["cluster_head_choice"] = head.note
    if found is not None:  # K read off the features (runs.py records it with the run's resolution)
        m["n_clusters_found"] = found
    if labels is not None:
        m.update(clustering_scores(labels, pred))
        m["heads"] = head_scores(labels, [(*c, fitted[c][0].labels_, fitted[c][1]) for c in combos])
        km = next(h for h in m["heads"] if (h["head"], h["features"]) == ("kmeans", "embedding"))
        m.update({f"kmeans_embedding_{key}": km[key] for key in SCORES})
        m.update(knn_report(embedding, features, labels, images.split, **knn))
    return _plain(m), head


def settle_n_clusters(cfg: Config, features: np.ndarray) -> tuple[Config, dict | None]:
    """K read off the learned ``features`` (``structure.n_clusters.estimate_from_features``, never
    labels): where the run trained without K (``cluster.n_clusters`` None: no method of the run needs
    it while training), the configuration with that K and the evidence (``role: estimate``); where K
    was estimated from the pixels before training, the configuration as it is and the same estimate
    as a check of it (``role: check``); else (K given) nothing."""
    pixels = cfg.resolution.get("n_clusters")
    if cfg.cluster.n_clusters is not None and not (pixels and pixels.get("when") == "before training"):
        return cfg, None
    k, note = estimate_from_features(features, seed=cfg.train.seed)
    where = f"the learned features (layer {cfg.cluster.features})"
    if cfg.cluster.n_clusters is None:
        found = {"k": k, "role": "estimate", "when": "after training", "features": where, **note}
        return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, n_clusters=k)), found
    before = cfg.cluster.n_clusters
    return cfg, {"k": k, "role": "check", "when": "after training", "features": where, "k_before": before,
                 "agrees": abs(k - before) <= 0.2 * before, **note}


def score_heads(cluster: ClusterConfig, seed: int, images: ImageSet, layers: dict[str, np.ndarray],
                own: dict[str, OwnClusters] | None = None, trained_rows=None) -> list[dict[str, Any]]:
    """Scores of every post-hoc head on every given layer (and of each method's own clusters)."""
    combos, options = _combos(cluster, layers, own), head_options(cluster, seed)
    fitted = fit_heads(layers, combos, own=own, trained_rows=trained_rows, **options)
    return head_scores(images.labels, [(*c, fitted[c][0].labels_, fitted[c][1]) for c in combos])


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    for key, v in list(m.items()):
        if isinstance(v, (np.floating, np.integer)):
            m[key] = v.item()
    return m
