"""``cluster.n_clusters: auto``: K estimated without labels (structure/n_clusters.py): from the pixels
before training where a method of the run reads K while it trains (resolution.py), else from the
learned features after training (scoring.settle_n_clusters, runs.py); on the development data and
on well-separated synthetic blobs."""

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import make_blobs

from conftest import SHARED_DATA
from deepclust.configure import build_config
from deepclust.data import load_images
from deepclust.methods import METHODS, STAGES
from deepclust.resolution import describe_n_clusters, resolve
from deepclust.scoring import settle_n_clusters
from deepclust.structure.n_clusters import estimate_from_features, estimate_n_clusters, pixel_features


@pytest.mark.parametrize("k", [3, 7, 20])
def test_true_count_on_well_separated_blobs(k):
    x, _ = make_blobs(n_samples=100 * k, centers=k, n_features=16, cluster_std=1.0, center_box=(-30, 30),
                      random_state=k)
    found, evidence = estimate_n_clusters(x)
    assert found == k, evidence["silhouette"]
    assert evidence["k_range"] == [2, 30]


def _resolved_k(images) -> tuple[int, dict]:
    cfg = resolve(build_config({"method": "deepcluster", "train": {"epochs": 1}}), images)
    return cfg.cluster.n_clusters, cfg.resolution["n_clusters"]


def test_digits_about_ten_and_labels_never_set_k(capsys):
    images = load_images("digits")
    k, note = _resolved_k(images)
    assert 8 <= k <= 12, note
    line = capsys.readouterr().err  # the run says which K, why, and the runner-up, in one line
    assert "silhouette" in line and "runner-up K = " in line and note["runner_up"]["k"] != k
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


# --- K read off the learned features --------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 7, 20])
def test_features_true_count_on_well_separated_blobs(k):
    x, _ = make_blobs(n_samples=100 * k, centers=k, n_features=16, cluster_std=1.0, center_box=(-30, 30),
                      random_state=k)
    found, evidence = estimate_from_features(x)
    assert found == k and evidence["component_sizes"] == [100] * k  # the kNN graph's components


def test_features_modularity_over_k_on_blobs_that_touch():
    x, _ = make_blobs(n_samples=900, centers=6, n_features=6, cluster_std=2.5, center_box=(-12, 12), random_state=6)
    found, evidence = estimate_from_features(x)
    assert found == 6 and evidence["k_range"] == [2, 30] and len(evidence["scores"]) == 29, evidence
    runner = evidence["runner_up"]
    assert runner["k"] != 6 and runner["score"] == evidence["scores"][str(runner["k"])]
    assert runner["score"] <= evidence["scores"]["6"] == max(evidence["scores"].values())


def test_a_small_island_of_images_does_not_set_k():
    """A few images far from the rest split the kNN graph in two, yet K is the rest's (a trained digits
    embedding had an island of 27 of 1,797 images, and K came out 2): a component under half its even
    share is not one of K clusters, so the graph is scored over K as usual."""
    x, _ = make_blobs(n_samples=900, centers=6, n_features=6, cluster_std=2.5, center_box=(-12, 12), random_state=6)
    island = np.random.default_rng(0).normal(200.0, 0.1, (30, 6))
    found, evidence = estimate_from_features(np.vstack([x, island]))
    assert evidence["component_sizes"] == [900, 30] and evidence["criterion"].startswith("modularity")
    assert found in (6, 7), evidence  # the six blobs, and the island on its own or not
    # the pixels' route shares the rule (its Euclidean silhouette itself is led to 2 by so far an island)
    assert "components" not in estimate_n_clusters(np.vstack([x, island]))[1]["criterion"]


def test_features_that_do_not_vary_or_are_too_few():
    assert estimate_from_features(np.ones((50, 4)))[0] == 1
    k, note = estimate_from_features(np.random.default_rng(0).standard_normal((5, 3)))
    assert k == 1 and "too few" in note["criterion"]


def test_every_method_says_whether_it_reads_k_while_it_trains():
    for cls in (*METHODS.values(), *STAGES.values()):
        assert "needs_k_to_train" in vars(cls), cls.__name__  # declared on the class itself, not inherited
    free = {name for name, cls in METHODS.items() if not cls.needs_k_to_train}
    assert free == {"instance", "and", "pad"} and all(cls.needs_k_to_train for cls in STAGES.values())


def test_resolution_leaves_k_to_the_features_only_where_no_method_of_the_run_reads_it():
    images = load_images("digits").subset(slice(0, 300))
    for method in ("pad", "instance", "and"):
        cfg = resolve(build_config({"method": method, "train": {"epochs": 1}}), images)
        assert cfg.cluster.n_clusters is None, method
        assert cfg.resolution["n_clusters"] == {"k": None, "when": "after training", "trained_without_k": method}
    scan = resolve(build_config({"method": "pad", "train": {"epochs": 1}, "cluster": {"head": "scan"}}), images)
    assert scan.cluster.n_clusters >= 2 and scan.resolution["n_clusters"]["needed_by"] == ["scan"]
    for method in ("pcp", "deepcluster", "dccm", "jule"):
        cfg = resolve(build_config({"method": method, "train": {"epochs": 1}}), images)
        note = cfg.resolution["n_clusters"]
        assert cfg.cluster.n_clusters == note["k"] >= 2 and note["when"] == "before training", method


def test_settle_estimates_checks_or_leaves_k():
    x, _ = make_blobs(n_samples=900, centers=6, n_features=6, cluster_std=2.5, center_box=(-12, 12), random_state=6)
    free = build_config({"method": "pad"})
    cfg, found = settle_n_clusters(free, x)
    assert cfg.cluster.n_clusters == found["k"] == 6 and found["role"] == "estimate"
    line = describe_n_clusters(found)
    assert "K = 6" in line and f"runner-up K = {found['runner_up']['k']}" in line and found["criterion"] in line
    given = build_config({"method": "deepcluster", "cluster": {"n_clusters": 9}})
    assert settle_n_clusters(given, x) == (given, None)  # K given: nothing to estimate or check
    pixels = dataclasses.replace(given, resolution={"n_clusters": {"k": 9, "when": "before training"}})
    cfg, check = settle_n_clusters(pixels, x)
    assert cfg.cluster.n_clusters == 9 and check["role"] == "check" and check["k"] == 6
    assert check["k_before"] == 9 and check["agrees"] is False and "differs" in describe_n_clusters(check)
    close = dataclasses.replace(given, cluster=dataclasses.replace(given.cluster, n_clusters=7),
                                resolution={"n_clusters": {"k": 7, "when": "before training"}})
    assert settle_n_clusters(close, x)[1]["agrees"] is True  # 6 is within 20% of 7


def test_a_run_without_k_records_the_k_read_off_its_features(tmp_path, small_npz):
    """A method that trains without K: the run trains, reads K off its features, says so in one line
    with the runner-up, and records it (config.yaml holds it from then on, as a given K)."""
    from conftest import run_cli
    from deepclust.runfiles import RunFiles

    out = tmp_path / "run"
    proc = run_cli("fit", "--method", "instance", "--data", f"npz:{small_npz}", "--epochs", "2", "--backbone", "mlp",
                   "--no-progress", "--batch-size", "64", "--seed", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    files = RunFiles(out)
    metrics, note = files.metrics(), files.metrics()["resolution"]["n_clusters"]
    assert files.config().cluster.n_clusters == metrics["n_clusters"] == note["k"] >= 2
    assert note["role"] == "estimate" and note["when"] == "after training" and "runner_up" in note
    lines = [line for line in proc.stderr.splitlines() if "after training" in line]
    assert len(lines) == 2 and "runner-up" in lines[1] and f"K = {note['k']}" in lines[1]
    assert len(np.unique(np.load(out / "labels.npy"))) <= note["k"]
