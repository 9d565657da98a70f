"""structure/hierarchy.py: the merge tree of a partition, its cuts, and the nested ``ward`` head,
on arrays (no network)."""

import numpy as np
import pytest
from scipy.cluster.hierarchy import is_valid_linkage
from sklearn.datasets import make_blobs

from deepclust.errors import ConfigError
from deepclust.heads import fit_head
from deepclust.structure.clustering import kmeans
from deepclust.structure.hierarchy import Hierarchy, build_hierarchy, cut, ward_labels, ward_linkage


def nested(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """Every cluster of ``fine`` lies inside one cluster of ``coarse``."""
    return all(len(np.unique(coarse[fine == c])) == 1 for c in np.unique(fine))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same clusters, whatever their numbers."""
    return nested(a, b) and nested(b, a)


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n_samples=600, centers=6, n_features=8, cluster_std=1.5, random_state=0)
    return x.astype(np.float32), y


def test_ward_linkage_of_four_points_on_a_line():
    # 0 and 1 (cost 1 * 1 / 2 * 1 = 0.5), then 10 and 12 (1 * 1 / 2 * 4 = 2), then the pairs'
    # centroids 0.5 and 11 (2 * 2 / 4 * 110.25)
    z = ward_linkage(np.array([[0.0], [1.0], [10.0], [12.0]]), np.ones(4))
    assert z[:, :2].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert z[:, 2] == pytest.approx([0.5, 2.0, 110.25]) and z[:, 3].tolist() == [2, 2, 4]
    # sizes weigh the cost: 0 and 1 merge first as single images (0.5 against 1.125 for 10 and 11.5),
    # last as leaves of 100 images each (100 * 100 / 200 * 1 = 50)
    line = np.array([[0.0], [1.0], [10.0], [11.5]])
    assert ward_linkage(line, np.ones(4))[0, :2].tolist() == [0, 1]
    z = ward_linkage(line, np.array([100.0, 100.0, 1.0, 1.0]))
    assert z[0, :2].tolist() == [2, 3] and z[1, :2].tolist() == [0, 1] and z[1, 2] == pytest.approx(50.0)
    # groups: no merge across them while one inside them remains (1 and 10 are one group here)
    z = ward_linkage(np.array([[0.0], [1.0], [10.0], [12.0]]), np.ones(4), groups=np.array([0, 1, 1, 2]))
    assert z[:, :2].tolist() == [[1, 2], [0, 4], [3, 5]] and is_valid_linkage(z)
    # inside the groups 1 / 2 * 81; between them 0 and (1, 10) 2 / 3 * 30.25, then 12 and the rest
    # 3 / 4 * (25 / 3)^2: heights non-decreasing among the merges between groups, apart from those inside
    assert z[:, 2] == pytest.approx([40.5, 20.1667, 52.0833], abs=1e-3)


def test_cut_at_the_partitions_count_is_the_partition_and_other_cuts_nest(blobs):
    x, _ = blobs
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    part = kmeans(unit, 7, seed=3)[0]  # any partition, not one the tree would make
    tree = build_hierarchy(x, part, seed=0)
    assert isinstance(tree, Hierarchy) and tree.n_clusters == 7 and is_valid_linkage(tree.linkage)
    assert tree.leaves.shape == (len(x),) and np.array_equal(tree.groups[tree.leaves], part)
    assert np.array_equal(cut(tree, 7), part)  # the partition itself, numbered as it is
    cuts = {k: cut(tree, k) for k in (1, 2, 4, 7, 12, 30, tree.n_leaves)}
    for k, labels in cuts.items():
        assert sorted(np.unique(labels)) == list(range(k))
    ks = sorted(cuts)
    for fine, coarse in zip(ks[1:], ks[:-1]):
        assert nested(cuts[fine], cuts[coarse]), (fine, coarse)
    for k in (12, 30):  # finer: parts of the partition's clusters, numbered after the cluster they are in
        assert nested(cuts[k], part)
        first = [part[cuts[k] == c][0] for c in range(k)]
        assert first == sorted(first)
    with pytest.raises(ConfigError, match=f"1 to {tree.n_leaves}"):
        cut(tree, 0)
    with pytest.raises(ConfigError):
        cut(tree, tree.n_leaves + 1)


def test_an_empty_cluster_number_is_no_node():
    x, _ = make_blobs(n_samples=90, centers=3, n_features=4, random_state=1)
    part = np.repeat([0, 2, 5], 30)  # clusters 1, 3, 4 hold no image
    tree = build_hierarchy(x, part, n_leaves=12)
    assert tree.n_clusters == 3 and same_partition(cut(tree, 3), part)
    assert cut(tree, 3).max() == 2


def test_ward_head_partitions_are_nested_and_equal_the_cuts_of_its_tree(blobs):
    """The property re-cutting relies on: the ward head's fits at K and K' are cuts of one tree, so the
    tree a run keeps of its fit at K, cut at K', is the fit at K'."""
    x, y = blobs
    fits = {k: ward_labels(x, k, seed=2) for k in (3, 6, 9, 20)}
    for fine, coarse in ((6, 3), (9, 6), (20, 9)):
        assert nested(fits[fine], fits[coarse])
    tree = build_hierarchy(x, fits[6], seed=2)
    for k, labels in fits.items():
        assert same_partition(cut(tree, k), labels), k
    assert np.array_equal(cut(tree, 6), fits[6])
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(y, fits[6]) > 0.9  # and it finds well-separated blobs
    head = fit_head(x, "ward", 6, seed=2)  # the head is that partition
    assert np.array_equal(head.labels_, fits[6]) and np.array_equal(head.predict(x[:50]), fits[6][:50])


def test_tiny_and_repeated_inputs():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    assert same_partition(ward_labels(x, 3), np.array([0, 0, 1, 1, 2]))
    assert ward_labels(x, 5).tolist() == [0, 1, 2, 3, 4] and ward_labels(x, 1).tolist() == [0] * 5
    with pytest.raises(ConfigError):
        ward_labels(x, 6)
