"""DeepCluster (ECCV 2018) structure helpers: uniform sampling over clusters (UnifLabelSampler) and
the PCA-whitening preprocessing before k-means."""

import numpy as np
import pytest
import torch

from deepclust.errors import ConfigError, DataError
from deepclust.structure.preprocess import pca_whiten
from deepclust.structure.sampling import uniform_over_clusters


def _labels():
    # clusters 0 (1 member), 1 (3), 2 (50), 4 (200); 3 and 5 empty
    return np.repeat([0, 1, 2, 4], [1, 3, 50, 200]), np.array([1, 3, 50, 200])


@pytest.mark.parametrize("cut", ["random", "balanced"])
def test_uniform_counts_and_replacement(cut):
    labels, _ = _labels()
    n = labels.size  # 254; 4 non-empty clusters -> 64 draws each, 256 drawn, 2 cut
    out = uniform_over_clusters(labels, n, 0, cut=cut)
    assert out.dtype == torch.int64 and out.shape == (n,)
    assert out.min() >= 0 and out.max() < n
    counts = np.bincount(labels[out.numpy()], minlength=6)
    assert counts[3] == 0 and counts[5] == 0  # empty clusters skipped
    assert counts.sum() == n
    got = counts[[0, 1, 2, 4]]
    if cut == "balanced":
        assert sorted(got.tolist()) == [63, 63, 64, 64]  # equal +-1
    else:
        assert got.min() >= 62 and got.max() <= 64  # the original: 64 each, then a random cut of 2
    big = out.numpy()[labels[out.numpy()] == 4]
    assert np.unique(big).size == big.size  # 200 > 64 members: without replacement
    assert set(out.numpy()[labels[out.numpy()] == 0].tolist()) == {0}  # 1 member, drawn 63-64 times


def test_uniform_before_the_cut_every_cluster_gets_s_draws():
    # n_samples chosen so that nothing is cut off: k * (n // k + 1) == n is impossible, so check
    # the draws of a cluster are s or s minus the cut, over many seeds, never more than s
    labels = np.repeat([0, 1, 2], [5, 10, 85])
    for seed in range(20):
        counts = np.bincount(labels[uniform_over_clusters(labels, 100, seed).numpy()])
        assert counts.max() <= 34 and counts.sum() == 100  # s = int(100 / 3) + 1 = 34, 2 cut


def test_uniform_with_equal_size_draws_with_replacement():
    # the original uses replacement when len(cluster) <= s: a cluster of exactly s members
    labels = np.repeat([0, 1], [4, 100])  # n_samples 6 -> s = 4 = size of cluster 0
    repeats = 0
    for seed in range(30):
        out = uniform_over_clusters(labels, 6, seed, cut="balanced").numpy()
        small = out[labels[out] == 0]
        repeats += np.unique(small).size < small.size
    assert repeats > 0


def test_uniform_is_deterministic_for_a_seed():
    labels, _ = _labels()
    a = uniform_over_clusters(labels, 500, 7)
    assert torch.equal(a, uniform_over_clusters(torch.as_tensor(labels), 500, 7))
    assert torch.equal(a, uniform_over_clusters(labels, 500, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, uniform_over_clusters(labels, 500, 8))


def test_uniform_singles():
    labels = np.array([0, 0, 0, 0, 0, 0, -1, -1, 1, 1])
    out = uniform_over_clusters(labels, 40, 0, cut="balanced").numpy()  # 4 clusters -> 11 draws each
    counts = np.bincount(out, minlength=10)
    assert counts[6] in (10, 11) and counts[7] in (10, 11)  # each single is a cluster of its own
    out = uniform_over_clusters(labels, 40, 0, singles="exclude").numpy()
    assert not np.isin(out, [6, 7]).any()
    with pytest.raises(DataError):
        uniform_over_clusters(np.full(5, -1), 10, 0, singles="exclude")


def test_uniform_bad_input():
    labels, _ = _labels()
    with pytest.raises(ConfigError):
        uniform_over_clusters(labels, 0, 0)
    with pytest.raises(ConfigError):
        uniform_over_clusters(labels, 10, 0, cut="tail")
    with pytest.raises(ConfigError):
        uniform_over_clusters(labels, 10, 0, singles="merge")
    with pytest.raises(ConfigError):
        uniform_over_clusters(labels, 10, "seed")
    with pytest.raises(DataError):
        uniform_over_clusters(labels.reshape(2, -1), 10, 0)
    with pytest.raises(DataError):
        uniform_over_clusters(labels.astype(np.float32), 10, 0)


# -- pca_whiten ------------------------------------------------------------------------------------------
def _anisotropic(n, d, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.1, d)
    mix = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return ((rng.standard_normal((n, d)) * scales) @ mix + 3.0).astype(np.float32)


def test_pca_whiten_dims_norms_and_whitened_covariance():
    x = _anisotropic(3000, 300)
    y, state = pca_whiten(x)
    assert y.dtype == np.float32 and y.shape == (3000, 256)
    assert np.allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    z = state.transform(x, normalise=False)  # before the L2 normalisation
    assert np.allclose(np.cov(z, rowvar=False, bias=True), np.eye(256), atol=1e-3)
    assert np.all(np.diff(state.eigenvalues) <= 0)
    assert np.allclose(state.transform(x), y, atol=1e-6)  # new rows go through the same map


def test_pca_whiten_small_d_and_small_n():
    x = _anisotropic(500, 10)
    y, state = pca_whiten(x, 256)  # D < 256: a whitening rotation, no reduction
    assert y.shape == (500, 10) and state.dim == 10
    z = state.transform(x, normalise=False)
    assert np.allclose(np.cov(z, rowvar=False, bias=True), np.eye(10), atol=1e-6)
    y, _ = pca_whiten(x[:6], 256)  # 6 centred points span 5 directions
    assert y.shape == (6, 5) and np.isfinite(y).all()


def test_pca_whiten_matches_faiss_pcamatrix():
    faiss = pytest.importorskip("faiss")
    x = _anisotropic(2000, 40, seed=3)
    y, _ = pca_whiten(x, 16)
    mat = faiss.PCAMatrix(40, 16, -0.5)  # DeepCluster's preprocess_features
    mat.train(x)
    ref = mat.apply_py(x)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    sign = np.sign((y * ref).sum(0))  # each axis is defined up to its sign
    assert np.allclose(y, ref * sign, atol=2e-4)


def test_pca_whiten_scale_invariant_and_bad_input():
    x = _anisotropic(400, 20)
    assert np.allclose(pca_whiten(x, 8)[0], pca_whiten(x * 1000.0, 8)[0], atol=1e-4)
    with pytest.raises(DataError):
        pca_whiten(np.ones((10, 4), np.float32))
    with pytest.raises(DataError):
        pca_whiten(x[:1])
    with pytest.raises(ConfigError):
        pca_whiten(x, 0)
