"""Structure functions, evaluation protocols and cluster heads, with known answers."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_circles, make_moons

from deepclust.errors import ConfigError
from deepclust.evaluate import (
    ari,
    cluster_acc,
    clustering_scores,
    collapse_report,
    knn_top1,
    linear_probe,
    nmi,
)
from deepclust.heads import ClusterHead, OwnClusters, fit_head
from deepclust.structure import kmeans, knn_graph, spectral, topk_cosine


def test_cluster_acc_hungarian():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_acc(y, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    # one of six misplaced
    assert cluster_acc(y, np.array([1, 1, 0, 0, 2, 0])) == pytest.approx(5 / 6)
    # more clusters than classes: the extra cluster matches nothing
    assert cluster_acc(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 2, 1, 1, 1])) == pytest.approx(5 / 6)


def test_nmi_average_methods_and_ari():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0, 0, 1, 1, 2, 2])
    assert nmi(y, y) == pytest.approx(1.0) and ari(y, y) == pytest.approx(1.0)
    # H(y) = log 2, H(p) = log 3, I = log 2 - (1/3) log 2 ... arithmetic and geometric differ
    a, g = nmi(y, p, "arithmetic"), nmi(y, p, "geometric")
    assert a != pytest.approx(g)
    h_y, h_p = np.log(2), np.log(3)
    mi = h_y - 2 * (1 / 6) * np.log(2)  # only the middle cluster {x2, x3} is mixed
    assert g == pytest.approx(mi / np.sqrt(h_y * h_p), abs=1e-6)
    assert a == pytest.approx(mi / ((h_y + h_p) / 2), abs=1e-6)
    s = clustering_scores(y, p)
    assert set(s) == {"acc", "nmi", "nmi_geometric", "ari"}


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_topk_cosine_matches_brute_force(backend):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((53, 7)).astype(np.float32)
    keys = rng.standard_normal((101, 7)).astype(np.float32)
    sims, idx = topk_cosine(q, keys, 5, backend=backend, block=8)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    full = qn @ kn.T
    expected = np.argsort(-full, axis=1)[:, :5]
    assert np.array_equal(idx, expected)
    assert np.allclose(sims, np.take_along_axis(full, expected, 1), atol=1e-5)
    # exclude_self on the keys themselves
    s2, i2 = topk_cosine(keys, keys, 3, exclude_self=True, backend=backend)
    assert not (i2 == np.arange(101)[:, None]).any()
    ff = kn @ kn.T
    np.fill_diagonal(ff, -np.inf)
    assert np.array_equal(i2, np.argsort(-ff, axis=1)[:, :3])
    # torch in, torch out
    ts, ti = topk_cosine(torch.from_numpy(q), torch.from_numpy(keys), 5, backend=backend)
    assert isinstance(ti, torch.Tensor) and np.array_equal(ti.numpy(), expected)


def test_the_inverted_file_index_finds_most_true_neighbours_and_never_the_query_itself():
    """The approximate backend (faiss IVF, ``auto`` above structure.knn.EXACT_MAX keys) on clustered
    unit vectors, as a trained bank is: recall of the exact 10 nearest at least 0.9, its own row never
    returned, the same answer from the same seed."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32)).astype(np.float32)
    x = centres[rng.integers(0, 50, 20_000)] + 0.5 * rng.standard_normal((20_000, 32)).astype(np.float32)
    _, exact = topk_cosine(x, x, 10, exclude_self=True, backend="faiss")
    _, approx = topk_cosine(x, x, 10, exclude_self=True, backend="ivf")
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(exact[:2000], approx[:2000])])
    assert recall >= 0.9, recall
    assert not (approx == np.arange(len(x))[:, None]).any()
    assert np.array_equal(approx, topk_cosine(x, x, 10, exclude_self=True, backend="ivf")[1])


def test_knn_graph_is_sparse_symmetric_without_self_loops():
    x = np.random.default_rng(1).standard_normal((40, 3)).astype(np.float32)
    g = knn_graph(x, 4)
    assert g.shape == (40, 40) and g.nnz <= 2 * 40 * 4
    assert (g != g.T).nnz == 0
    assert g.diagonal().sum() == 0
    assert (g.data > 0).all() and (g.data <= 1).all()


def test_knn_top1_known_answer_and_leave_one_out():
    # two tight groups on the circle; the test point near group 1 gets class 1
    train = np.array([[1, 0], [1, 0.1], [1, -0.1], [-1, 0], [-1, 0.1], [-1, -0.1]], np.float32)
    ytr = np.array([0, 0, 0, 1, 1, 1])
    test = np.array([[-1, 0.05], [1, 0.05]], np.float32)
    assert knn_top1(train, ytr, test, np.array([1, 0]), k=3) == 1.0
    assert knn_top1(train, ytr, test, np.array([0, 1]), k=3) == 0.0
    # leave-one-out: each point has a unique label, so any vote other than its own is wrong; with
    # self excluded the accuracy must be 0 (it would be 1 if a point could vote for itself).
    x = np.random.default_rng(2).standard_normal((20, 4)).astype(np.float32)
    assert knn_top1(x, np.arange(20), k=1) == 0.0


def test_linear_probe_separable():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(-2, 1, (100, 5)), rng.normal(2, 1, (100, 5))]).astype(np.float32)
    y = np.repeat([0, 1], 100)
    assert linear_probe(x[::2], y[::2], x[1::2], y[1::2], epochs=20) > 0.95


@pytest.mark.parametrize("maker", ["rings", "moons"])
def test_spectral_recovers_planted_clusters_kmeans_cannot(maker):
    if maker == "rings":
        x, y = make_circles(n_samples=600, factor=0.4, noise=0.04, random_state=0)
    else:
        x, y = make_moons(n_samples=600, noise=0.05, random_state=0)
    # cosine kNN graph: lift to 3-d with a constant coordinate so cosine sees the 2-d geometry
    lifted = np.hstack([x, np.full((len(x), 1), 3.0)]).astype(np.float32)
    sp_labels, emb = spectral(lifted, 2, n_neighbors=8, seed=0)
    km_labels, _, _ = kmeans(x.astype(np.float32), 2, seed=0, n_init=5)
    assert cluster_acc(y, sp_labels) > 0.99
    assert cluster_acc(y, km_labels) < 0.9
    assert emb.shape == (600, 4)


def test_kmeans_rejects_k_larger_than_n_and_nan():
    with pytest.raises(ConfigError, match="larger than the number of images"):
        kmeans(np.zeros((3, 2), np.float32), 5)
    with pytest.raises(ConfigError, match="NaN"):
        kmeans(np.array([[0, np.nan], [1, 1], [2, 2]], np.float32), 2)


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, 16)) * 4
    y = np.repeat(np.arange(4), 50)
    return (centres[y] + rng.standard_normal((200, 16))).astype(np.float32), y


@pytest.mark.parametrize("kind", ["kmeans", "spectral"])
def test_heads_deterministic_predict_and_save(tmp_path, kind):
    x, y = _blobs()
    a = fit_head(x, kind, 4, seed=1)
    b = fit_head(x, kind, 4, seed=1)
    assert np.array_equal(a.labels_, b.labels_)
    assert cluster_acc(y, a.labels_) > 0.95
    assert (a.predict(x) == a.labels_).mean() > 0.95
    a.save(tmp_path / "head.npz")
    c = ClusterHead.load(tmp_path / "head.npz")
    assert c.kind == kind and c.n_clusters == 4
    assert np.array_equal(c.predict(x), a.predict(x))


@pytest.mark.parametrize("kind", ["kmeans", "spectral", "method"])
def test_heads_give_the_same_clusters_whatever_the_labels(kind):
    """Behaviour, not names: the same features with true or shuffled labels give the same clusters
    and the same sizes from every head (labels only score)."""
    from deepclust.configure import build_config
    from deepclust.data import ImageSet
    from deepclust.scoring import compute_metrics

    x, y = _blobs(1)
    own = kmeans(x, 4, seed=5)[0]
    cfg = build_config({"cluster": {"n_clusters": 4, "head": kind, "features": "backbone"}})
    outs = []
    for labels in (y, np.random.default_rng(3).permutation(y)):
        images = ImageSet(images=np.zeros((len(x), 4, 4), np.uint8), labels=labels)
        m, head = compute_metrics(cfg, images, x, x, own={"method": OwnClusters(labels=own)})
        outs.append((head.labels_, m["cluster_sizes"], head.predict(x)))
    assert np.array_equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    assert np.array_equal(outs[0][2], outs[1][2])


def test_collapse_report_flags_giant_and_empty_clusters():
    ok = collapse_report(np.repeat(np.arange(4), 25), 4)
    assert not ok["collapsed"] and ok["warning"] is None and ok["sizes"] == [25] * 4
    giant = collapse_report(np.array([0] * 90 + [1] * 5 + [2] * 5), 4)
    assert giant["collapsed"] and giant["empty"] == 1
    assert "empty" in giant["warning"] and "90%" in giant["warning"]
    assert giant["largest_fraction"] == pytest.approx(0.9)


def test_spectral_head_on_a_subsample_assigns_the_rest():
    x, y = _blobs(1)
    head = fit_head(x, "spectral", 4, seed=0, max_spectral_fit=80)
    assert head.labels_.shape == (200,) and len(head.reference) == 80
    assert cluster_acc(y, head.labels_) > 0.95
