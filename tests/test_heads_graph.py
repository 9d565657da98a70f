"""The ``graph`` cluster head (``heads.graph_labels``): JULE's agglomeration kept unless its partition
fits the kNN graph clearly worse than spectral clustering's, by modularity
(``structure.clustering.modularity``); both checked without a network."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from deepclust.evaluate import cluster_acc
from deepclust.heads import GRAPH_MARGIN, ClusterHead, cluster_head, fit_head, graph_labels
from deepclust.structure.clustering import modularity
from deepclust.structure.knn import knn_graph


def noisy_blobs(noise: float, seed: int = 0, k: int = 5, n: int = 600, d: int = 20):
    """K Gaussian blobs in d dimensions; at noise 2 they overlap enough for the agglomeration of the
    kNN graph to chain two or more of them into one cluster."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n // k)
    x = rng.normal(0, 1, (k, d))[y] + noise * rng.normal(0, 1, (n, d))
    return x.astype(np.float32), y


def test_modularity_of_two_disjoint_cliques_split_apart_is_one_half():
    block = np.ones((4, 4)) - np.eye(4)
    graph = sp.block_diag([block, block]).tocsr()
    assert modularity(graph, np.repeat([0, 1], 4)) == pytest.approx(0.5)
    assert modularity(graph, np.zeros(8, np.int64)) == pytest.approx(0.0)  # one cluster: no better than chance
    assert modularity(graph, np.array([0, 1] * 4)) < 0  # each clique cut in half


def test_modularity_matches_networkx_on_a_weighted_knn_graph():
    x, _ = noisy_blobs(1.0, seed=3, n=200)
    graph = knn_graph(x, 10)
    labels = np.random.default_rng(0).integers(0, 5, len(x))
    g = nx.from_scipy_sparse_array(graph)
    expected = nx.community.modularity(g, [set(np.flatnonzero(labels == c)) for c in range(5)], weight="weight")
    assert modularity(graph, labels) == pytest.approx(expected, abs=1e-9)


def test_modularity_rejects_labels_of_the_wrong_length():
    with pytest.raises(ValueError, match="labels"):
        modularity(sp.eye(4, format="csr"), np.zeros(3, np.int64))


def test_separated_clusters_keep_the_agglomerative_partition():
    x, y = noisy_blobs(0.5)
    labels, note = graph_labels(x, 5)
    assert note["kept"] == "agglomerative"
    assert np.array_equal(labels, fit_head(x, "agglomerative", 5).labels_)
    assert cluster_acc(y, labels) == 1.0


def test_chaining_agglomeration_gives_way_to_the_spectral_partition():
    x, y = noisy_blobs(2.0)
    agg = fit_head(x, "agglomerative", 5).labels_
    labels, note = graph_labels(x, 5, n_components=5)
    q = note["modularity"]
    assert note["kept"] == "spectral" and q["spectral"] - q["agglomerative"] > GRAPH_MARGIN
    assert cluster_acc(y, labels) > cluster_acc(y, agg) + 0.1


def test_the_margin_decides():
    x, _ = noisy_blobs(2.0)
    assert graph_labels(x, 5, n_components=5, margin=1.0)[1]["kept"] == "agglomerative"


def test_graph_head_saves_reloads_and_votes_new_points(tmp_path):
    x, y = noisy_blobs(0.5, seed=1)
    head = cluster_head(x, "graph", 5)
    assert head.kind == "graph" and head.note["kept"] == "agglomerative"
    head.save(tmp_path / "head.npz")
    loaded = ClusterHead.load(tmp_path / "head.npz")
    assert loaded.kind == "graph"
    assert np.array_equal(loaded.predict(x), head.predict(x))
    new, y_new = noisy_blobs(0.5, seed=1, n=100)  # the same centres, new draws
    assert cluster_acc(y_new, loaded.predict(new)) > 0.95


def test_graph_head_records_its_choice_in_the_metrics_and_reads_no_labels():
    from deepclust.configure import build_config
    from deepclust.data import ImageSet
    from deepclust.scoring import compute_metrics

    x, y = noisy_blobs(2.0, seed=2)
    cfg = build_config({"cluster": {"n_clusters": 5, "head": "graph", "features": "backbone", "eigenvectors": 1}})
    outs = []
    for labels in (y, np.random.default_rng(3).permutation(y), None):
        images = ImageSet(images=np.zeros((len(x), 4, 4), np.uint8), labels=labels)
        m, head = compute_metrics(cfg, images, x, x)
        outs.append(head.labels_)
        assert m["cluster_head"] == "graph" and m["cluster_head_choice"]["kept"] in ("agglomerative", "spectral")
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_scored_heads_reuse_the_graph_heads_partitions(monkeypatch):
    """A labelled run scores the agglomerative and spectral heads beside the graph head: on the same
    layer they are built from the partitions the graph head made (one agglomeration, one
    eigensolve), equal to fitting each again; on another layer they are fitted."""
    from deepclust import heads

    x, _ = noisy_blobs(2.0, seed=1)
    other = x[:, ::-1].copy() + 0.5
    combos = [("graph", "embedding"), ("agglomerative", "embedding"), ("spectral", "embedding"),
              ("agglomerative", "backbone")]
    options = {"n_clusters": 5, "seed": 0, "n_neighbors": 10, "eigenvectors": None}
    calls = {"agglomerative": 0, "spectral": 0}
    agglomerative, spectral, spectral_of_graph = heads.agglomerative_labels, heads.spectral, heads.spectral_of_graph

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(heads, "agglomerative_labels", counted("agglomerative", agglomerative))
    monkeypatch.setattr(heads, "spectral_of_graph", counted("spectral", spectral_of_graph))  # the graph head's
    monkeypatch.setattr(heads, "spectral", counted("spectral", spectral))  # the spectral head's
    fitted = heads.fit_heads({"embedding": x, "backbone": other}, combos, **options)
    assert calls == {"agglomerative": 2, "spectral": 1}  # the embedding's once, the backbone's agglomeration
    monkeypatch.undo()
    for kind, layer in combos[1:]:
        alone = fit_head({"embedding": x, "backbone": other}[layer], kind, 5, seed=0, n_neighbors=10)
        assert np.array_equal(fitted[(kind, layer)][0].labels_, alone.labels_)
        assert np.allclose(fitted[(kind, layer)][0].centroids, alone.centroids)
