"""The ``graph`` cluster head (``heads.graph_labels``): JULE's agglomeration kept unless spectral
clustering's partition wins two judges that read neither head's graph, the cosine silhouette on the
features (``structure.clustering.cosine_silhouette``) and the split-half stability
(``structure.clustering.split_half_stability``); and the modularity of a partition of a graph
(``structure.clustering.modularity``, which the benchmarks report); checked without a network."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp

from deepclust.evaluate import cluster_acc
from deepclust.heads import (GRAPH_MARGIN, GRAPH_STABILITY_MARGIN, ClusterHead, cluster_head, fit_head, graph_choice,
                             graph_labels)
from deepclust.structure.clustering import cosine_silhouette, kmeans, modularity, split_half_stability
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


def test_a_worse_agglomerative_partition_gives_way_to_the_spectral_one():
    """Overlapping blobs: agglomeration of the kNN graph does worse than spectral clustering, and the
    silhouette on the features, which reads neither head's graph, shows it."""
    x, y = noisy_blobs(2.0)
    agg = fit_head(x, "agglomerative", 5).labels_
    labels, note = graph_labels(x, 5, n_components=5)
    s, st = note["silhouette"], note["stability"]
    assert note["kept"] == "spectral" and s["spectral"] - s["agglomerative"] > GRAPH_MARGIN
    assert st["spectral"] - st["agglomerative"] > GRAPH_STABILITY_MARGIN
    assert s["agglomerative"] == pytest.approx(cosine_silhouette(x, agg), abs=1e-4)
    assert cluster_acc(y, labels) > cluster_acc(y, agg) + 0.1


def test_non_convex_clusters_keep_the_agglomerative_partition():
    """Two concentric rings (test_heads_agglomerative.rings): the agglomerative partition is the
    truth; the silhouette does not give it away to a convex cut."""
    from test_heads_agglomerative import rings

    x, y = rings(300, seed=0)
    labels, note = graph_labels(x, 2)
    assert note["kept"] == "agglomerative" and cluster_acc(y, labels) == 1.0


def test_the_cosine_silhouette_is_scikit_learns_without_pairwise_distances():
    """Equal to ``silhouette_score(metric="cosine")`` (N^2 distances) with a singleton cluster and
    unused label values, in any block size; refused for one cluster."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 7)) + np.repeat(rng.normal(size=(3, 7)) * 2, 100, axis=0)
    labels = np.repeat([0, 2, 5], 100)
    labels[7] = 9  # a singleton: s = 0
    want = silhouette_score(x, labels, metric="cosine")
    assert cosine_silhouette(x, labels) == pytest.approx(want, abs=1e-12)
    assert cosine_silhouette(x, labels, block=17) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="two clusters"):
        cosine_silhouette(x, np.zeros(300, np.int64))


def test_spectral_must_win_both_judges():
    """Given partitions: the silhouette decides first (a tie keeps the agglomerative one, and no
    stability is needed); where it favours spectral, the stability of each head on random halves
    decides."""
    x, y = noisy_blobs(1.0, seed=4)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    truth, scrambled = y.copy(), np.random.default_rng(0).permutation(y)
    tie = graph_choice(x, {"agglomerative": truth, "spectral": truth}, 5)
    assert tie["kept"] == "agglomerative" and "stability" not in tie
    better = graph_choice(x, {"agglomerative": scrambled, "spectral": truth}, 5, n_components=5)
    assert better["silhouette"]["spectral"] > better["silhouette"]["agglomerative"] and "stability" in better
    gap = better["stability"]["spectral"] - better["stability"]["agglomerative"]
    assert better["kept"] == ("spectral" if gap > GRAPH_STABILITY_MARGIN else "agglomerative")
    assert graph_choice(x, {"agglomerative": scrambled, "spectral": truth}, 5, n_components=5,
                        stability_margin=gap + 0.01)["kept"] == "agglomerative"
    assert graph_choice(x, {"agglomerative": scrambled, "spectral": truth}, 5, margin=2.0)["kept"] == "agglomerative"


def test_split_half_stability_tells_structure_from_noise():
    """k-means finds the same 5 blobs from either half (adjusted Rand index near 1) and nothing
    reproducible in structureless noise (near 0)."""
    x, _ = noisy_blobs(0.3, seed=5)
    noise = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    partition = lambda z: kmeans(z, 5, seed=0, n_init=5)[0]  # noqa: E731
    assert split_half_stability(x, partition, 5) > 0.9
    assert split_half_stability(noise, partition, 5) < 0.3
    with pytest.raises(ValueError, match="4 rows"):
        split_half_stability(x[:3], partition, 5)


def test_the_margin_decides():
    x, _ = noisy_blobs(2.0)
    assert graph_labels(x, 5, n_components=5, margin=1.0)[1]["kept"] == "agglomerative"


def test_graph_head_saves_reloads_and_votes_new_points(tmp_path):
    x, y = noisy_blobs(0.5, seed=1)
    head = cluster_head(x, "graph", 5)
    assert head.kind == "graph" and head.note["kept"] in ("agglomerative", "spectral")
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
            calls[name] += a[0].shape[0] == len(x)  # fits on all images (the stability judge fits halves)
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
