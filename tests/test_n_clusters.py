"""``cluster.n_clusters: auto``: K estimated from the pixels without labels (structure/n_clusters.py,
resolution.py), on the development data and on well-separated synthetic blobs."""

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from conftest import SHARED_DATA
from deepclust.configure import build_config
from deepclust.data import load_images
from deepclust.resolution import resolve
from deepclust.structure.n_clusters import estimate_n_clusters, pixel_features


@pytest.mark.parametrize("k", [3, 7, 20])
def test_true_count_on_well_separated_blobs(k):
    x, _ = make_blobs(n_samples=100 * k, centers=k, n_features=16, cluster_std=1.0, center_box=(-30, 30),
                      random_state=k)
    found, evidence = estimate_n_clusters(x)
    assert found == k, evidence["silhouette"]
    assert evidence["k_range"] == [2, 30]


def _resolved_k(images) -> tuple[int, dict]:
    cfg = resolve(build_config({"method": "instance", "train": {"epochs": 1}}), images)
    return cfg.cluster.n_clusters, cfg.resolution["n_clusters"]


def test_digits_about_ten_and_labels_never_set_k(capsys):
    images = load_images("digits")
    k, note = _resolved_k(images)
    assert 8 <= k <= 12, note
    assert "silhouette" in capsys.readouterr().err  # the run says which K and why, in one line
    shuffled = dataclasses.replace(images, labels=np.random.default_rng(0).permutation(images.labels))
    unlabelled = dataclasses.replace(images, labels=None)
    assert _resolved_k(shuffled)[0] == k and _resolved_k(unlabelled)[0] == k
    three = dataclasses.replace(images, labels=images.labels % 3)  # labels of 3 classes: still the pixels' K
    assert _resolved_k(three)[0] == k


def test_usps_about_ten():
    path = SHARED_DATA / "usps.npz"
    if not path.exists():
        pytest.skip(f"USPS not available at {path}")
    images = load_images(f"npz:{path}")
    k, evidence = estimate_n_clusters(pixel_features(images.images))
    assert 8 <= k <= 12, evidence["silhouette"]


def test_explicit_k_wins_and_auto_is_none():
    cfg = build_config({"cluster": {"n_clusters": "auto"}})
    assert cfg.cluster.n_clusters is None
    images = load_images("digits").subset(slice(0, 300))
    fixed = resolve(build_config({"method": "instance", "train": {"epochs": 1}, "cluster": {"n_clusters": 4}}),
                    images)
    assert fixed.cluster.n_clusters == 4 and "n_clusters" not in fixed.resolution


def test_tiny_data_stays_in_range():
    x = np.random.default_rng(0).standard_normal((7, 3))
    k, _ = estimate_n_clusters(x)
    assert 1 <= k <= 3
