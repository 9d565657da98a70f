"""The post-hoc ``agglomerative`` cluster head (JULE's "RC": its agglomeration re-run on fixed
features, ``heads.agglomerative_labels``): it recovers non-convex clusters that k-means splits,
saves and reloads, assigns new points by the kNN vote, and is scored beside the other heads."""

from __future__ import annotations

import numpy as np
import pytest

from deepclust.configure import build_config
from deepclust.evaluate import cluster_acc
from deepclust.heads import ClusterHead, cluster_head, fit_head


def rings(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric rings in the plane, lifted to 3-d on the unit sphere's cap (the heads
    L2-normalise: the rings become two concentric circles of latitude, still not separable by
    any k-means partition)."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, 2 * n_per)
    r = np.repeat([0.25, 0.75], n_per) + rng.normal(0, 0.02, 2 * n_per)
    x = np.stack([r * np.cos(t), r * np.sin(t), np.ones_like(t)], axis=1)
    return x, np.repeat([0, 1], n_per)


def test_rings_recovered_by_agglomeration_where_kmeans_fails():
    x, y = rings(300, seed=0)
    agg = fit_head(x, "agglomerative", 2)
    km = fit_head(x, "kmeans", 2)
    assert cluster_acc(y, agg.labels_) == 1.0
    assert cluster_acc(y, km.labels_) < 0.75  # k-means cuts both rings in half
    assert agg.kind == "agglomerative" and agg.n_clusters == 2


def test_elongated_clusters_recovered():
    rng = np.random.default_rng(1)
    n = 400
    y = np.repeat([0, 1], n // 2)
    along = rng.uniform(-3, 3, n)
    x = np.stack([along, 0.6 * y - 0.3 + rng.normal(0, 0.03, n), np.full(n, 4.0)], axis=1)
    assert cluster_acc(y, fit_head(x, "agglomerative", 2).labels_) == 1.0
    assert cluster_acc(y, fit_head(x, "kmeans", 2).labels_) < 0.8  # k-means splits along the length


def test_saved_head_predicts_new_points_by_the_knn_vote(tmp_path):
    x, y = rings(300, seed=2)
    head = cluster_head(x, "agglomerative", 2)
    path = tmp_path / "head.npz"
    head.save(path)
    loaded = ClusterHead.load(path)
    assert loaded.kind == "agglomerative" and loaded.reference is not None
    new, y_new = rings(100, seed=3)
    assert cluster_acc(y_new, loaded.predict(new)) == 1.0
    assert np.array_equal(loaded.predict(x), head.labels_)  # the training points keep their clusters


def test_fewer_initial_clusters_than_k_starts_from_single_images():
    x = np.repeat(np.eye(3), 4, axis=0) + np.random.default_rng(0).normal(0, 0.01, (12, 3))
    labels = fit_head(x, "agglomerative", 6).labels_
    assert np.unique(labels).size == 6


def test_the_configuration_accepts_the_head():
    assert build_config({"cluster": {"head": "agglomerative"}}).cluster.head == "agglomerative"


def test_scored_beside_the_other_heads(tmp_path, small_npz):
    import json

    from conftest import smoke_layer

    from deepclust.runs import fit_run

    layer = smoke_layer("instance", f"npz:{small_npz}", tmp_path / "run", train={"epochs": 1},
                        cluster={"head": "agglomerative", "features": "embedding"})
    fit_run(build_config(layer))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["cluster_head"] == "agglomerative" and "nmi_geometric" in m
    rows = {(h["head"], h["features"]): h for h in m["heads"]}
    assert ("agglomerative", "embedding") in rows
    assert rows[("agglomerative", "embedding")]["acc"] == pytest.approx(m["acc"])
    assert all("nmi_geometric" in h for h in m["heads"])


def test_weak_features_do_not_chain_into_one_cluster():
    """Digits pixels with Gaussian noise (sd 0.5 of the [0, 1] range; benchmarks/weak_features.py's
    case): Eq 12's affinity as JULE trains with it lets one cluster take most images; the head's
    size-aware agglomeration keeps every cluster under twice its share and scores higher."""
    from deepclust.data import load_images
    from deepclust.heads import AGGLOMERATIVE_KS, AGGLOMERATIVE_SMALL, normalise
    from deepclust.structure.agglomeration import agglomerate, initial_clusters, small_cluster_floor

    images = load_images("digits")
    x = np.stack([np.asarray(i, np.float32).ravel() for i in images.images]) / 255.0
    x = x + 0.5 * np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    x = normalise(x - x.mean(0))
    n, k = len(x), 10
    plain = agglomerate(x, k, k_s=AGGLOMERATIVE_KS, labels=initial_clusters(x),
                        min_size=small_cluster_floor(n, k, AGGLOMERATIVE_SMALL))
    head = fit_head(x, "agglomerative", k).labels_
    assert np.bincount(plain).max() > 5 * n / k
    assert np.bincount(head).max() < 2 * n / k and np.unique(head).size == k
    assert cluster_acc(images.labels, head) > cluster_acc(images.labels, plain) + 0.1
