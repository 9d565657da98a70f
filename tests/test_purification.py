"""PCP (ICPR 2020) structure step: Eq 1, CP_r, CP_s (Eq 2), targets and members, on crafted inputs."""

import math

import numpy as np
import pytest
import torch

from deepclust.errors import ConfigError, DataError
from deepclust.structure.purification import (
    batch_members,
    cluster_means,
    cluster_targets,
    distance_ranks,
    member_table,
    progressive_cluster_count,
    purification_quality,
    purify,
    purify_clusters,
    reliable_mask,
    voting_scores,
)


# -- Eq 1 ---------------------------------------------------------------------------------------------
def test_cluster_count_known_values():
    # lg N_t = (1 - t/T) lg N: N = 10^4, T = 200 -> 10^4, 10^3, 10^2, 10, 1
    assert [progressive_cluster_count(t, 200, 10_000, 1) for t in (0, 50, 100, 150, 200)] == [
        10_000, 1_000, 100, 10, 1]
    # the floor N_t0 (Algorithm 1 line 3), also past T
    assert progressive_cluster_count(150, 200, 10_000, 50) == 50
    assert progressive_cluster_count(200, 200, 10_000, 50) == 50
    assert progressive_cluster_count(999, 200, 10_000, 50) == 50
    # rounding down: 50000^(1/2) = 223.6
    assert progressive_cluster_count(100, 200, 50_000, 1) == 223


def test_cluster_count_matches_reference_formula_except_its_float_error_at_zero():
    n, floor = 50_000, 1_000
    for epoch in range(200):  # PCP/main.py: y = -lg(n)/200 * epoch + lg(n); int(10 ** y); floor
        y = -1 * math.log10(n) / 200 * epoch + math.log10(n)
        ref = max(int(math.pow(10, y)), floor)
        ours = progressive_cluster_count(epoch, 200, n, floor)
        assert ours == (50_000 if epoch == 0 else ref), epoch  # the reference gives 49,999 at t = 0


def test_cluster_count_start_variant_is_capped_at_n():
    # start from 50,000 clusters on a set of 1,797 images: capped at N, then the same curve
    assert progressive_cluster_count(0, 200, 1_797, 10, start=50_000) == 1_797
    assert progressive_cluster_count(100, 200, 1_797, 10, start=50_000) == 223
    assert progressive_cluster_count(190, 200, 1_797, 10, start=50_000) == 10


@pytest.mark.parametrize("args", [(-1, 200, 100, 10), (0, 0, 100, 10), (0, 200, 100, 0), (0, 200, 100, 101),
                                  (0.5, 200, 100, 10)])
def test_cluster_count_bad_input(args):
    with pytest.raises(ConfigError):
        progressive_cluster_count(*args)


# -- CP_r -----------------------------------------------------------------------------------------------
def _line():
    # 1-D points; cluster 0 around 0, cluster 1 around 10 (with a tie at distance 2), cluster 2 a
    # lone point, cluster 3 empty.
    x = np.array([0.1, -0.2, 0.5, 3.0, -4.0, 10.0, 12.0, 8.0, 11.0, 50.0])[:, None]
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    centroids = np.array([[0.0], [10.0], [50.0], [99.0]])
    return x, labels, centroids


def test_distance_ranks_anchors_and_ties():
    x, labels, c = _line()
    rank, anchors = distance_ranks(x, labels, c)
    assert rank.tolist() == [0, 1, 2, 3, 4, 0, 2, 3, 1, 0]  # 12 and 8 tie at 2: lower index first
    assert anchors.tolist() == [0, 5, 9, -1]


def test_reliable_mask_known_answer():
    x, labels, c = _line()
    # gamma 0.5: keep floor(2.5) = 2 of cluster 0, 2 of cluster 1, floor(0.5) = 0 of the lone point
    assert reliable_mask(x, labels, c, 0.5).tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 1, 0]
    # gamma 0.25: keep 3 of 4 in cluster 1: the tie goes to the lower index (12.0, sample 6)
    assert reliable_mask(x, labels, c, 0.25).tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 1, 0]
    assert reliable_mask(x, labels, c, 0.0).all()
    assert not reliable_mask(x, labels, c, 1.0).any()
    # reference's first 100 epochs: clusters of <= 5 members kept whole
    assert reliable_mask(x, labels, c, 0.5, keep_whole_up_to=5).all()
    assert reliable_mask(x, labels, c, 0.5, keep_whole_up_to=1).tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 1, 1]


def test_reliable_mask_rounding_guard():
    x = np.arange(10, dtype=np.float32)[:, None]
    labels = np.zeros(10, dtype=np.int64)
    assert reliable_mask(x, labels, None, 0.9).sum() == 1  # (1 - 0.9) * 10 is 0.99999... in floats
    assert reliable_mask(x, labels, None, 0.7).sum() == 3


def test_member_means_are_the_default_centroids():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    labels = rng.integers(0, 7, 200)
    means = np.stack([x[labels == k].mean(0) for k in range(7)])
    assert np.allclose(cluster_means(x, labels), means, atol=1e-5)
    assert np.array_equal(reliable_mask(x, labels, None, 0.5), reliable_mask(x, labels, means, 0.5))


def test_reliable_mask_equals_a_plain_loop_over_clusters():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 3))
    labels = rng.integers(0, 23, 500)
    c = rng.standard_normal((23, 3))
    for gamma in (0.1, 0.5, 0.8):
        expected = np.zeros(500, dtype=bool)
        for k in range(23):
            members = np.flatnonzero(labels == k)
            d = ((x[members] - c[k]) ** 2).sum(1)
            keep = int(len(members) * (1 - gamma) + 1e-9)
            expected[members[np.argsort(d, kind="stable")[:keep]]] = True
        assert np.array_equal(reliable_mask(x, labels, c, gamma), expected)


def test_cp_r_bad_input():
    x, labels, c = _line()
    with pytest.raises(ConfigError):
        reliable_mask(x, labels, c, 1.5)
    with pytest.raises(DataError):
        reliable_mask(x, labels[:-1], c)
    with pytest.raises(DataError):
        reliable_mask(x, labels - 1, c)
    with pytest.raises(DataError):
        reliable_mask(x, labels, c[:2])  # label 2 has no centroid
    with pytest.raises(DataError):
        reliable_mask(np.full_like(x, np.nan), labels, c)


# -- CP_s -----------------------------------------------------------------------------------------------
def test_voting_scores_hand_history():
    history = np.array([
        [0, 0, 1, 1],  # t-2
        [5, 6, 5, 7],  # t-1
        [2, 2, 2, 3],  # t (current): cluster 2 = {0, 1, 2}, anchor 0; cluster 3 = {3}, anchor 3
    ])
    anchors = np.array([0, 0, 0, 3])
    s = voting_scores(history, anchors, alpha=0.5)
    # V_i = sum_k 0.5^k delta: +1 now; then t-1 and t-2
    assert s.tolist() == [1.75, 1 - 0.5 + 0.25, 1 + 0.5 - 0.25, 1.75]
    assert voting_scores(history[-1], anchors, 0.5).tolist() == [1.0] * 4  # current only
    with pytest.raises(DataError):
        voting_scores(history - 3, anchors)  # -1 (a purified single) is not a k-means label
    with pytest.raises(DataError):
        voting_scores(history, np.array([0, 0, 0, 9]))
    with pytest.raises(ConfigError):
        voting_scores(history, anchors, alpha=0.0)


def test_voting_scores_match_the_reference_loop():
    # PCP/lib/pairscore.py: score = 1, then + or - alpha^(len - idx) over its 15 stored clusterings
    rng = np.random.default_rng(2)
    n, alpha = 60, 0.8
    past = [rng.integers(0, 4, n) for _ in range(15)]
    current = rng.integers(0, 5, n)
    anchor_of = np.array([np.flatnonzero(current == current[i])[0] for i in range(n)])
    expected = []
    for i in range(n):
        score = 1.0
        for idx in range(len(past) - 1, -1, -1):
            same = past[idx][anchor_of[i]] == past[idx][i]
            score += (1 if same else -1) * alpha ** (len(past) - idx)
        expected.append(score)
    ours = voting_scores(np.vstack(past + [current]), anchor_of, alpha)
    assert np.allclose(ours, expected)
    assert ours.max() == pytest.approx((1 - alpha ** 16) / (1 - alpha))


def test_purify_thresholds():
    reliable = np.array([True, True, False, False, True])
    scores = np.array([-0.1, 0.0, 2.9, 3.0, -5.0])
    assert purify(reliable, scores).tolist() == [False, True, False, True, False]
    assert purify(reliable, scores, protect=[4]).tolist() == [False, True, False, True, True]
    with pytest.raises(ConfigError):
        purify(reliable, scores, drop_below=4.0, pull_back_at=3.0)


def test_cluster_targets_singles_and_compact_ids():
    labels = np.array([4, 4, 4, 7, 7, 9, 9, 9])
    kept = np.array([1, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    # cluster 7 keeps one member -> a single instance; ids 4, 9 -> 0, 1
    assert cluster_targets(labels, kept).tolist() == [0, 0, -1, -1, -1, 1, 1, 1]
    assert cluster_targets(labels, kept, min_size=1).tolist() == [0, 0, -1, 1, -1, 2, 2, 2]


def test_purify_clusters_end_to_end_on_a_line():
    x, labels, c = _line()
    p = purify_clusters(x, labels, centroids=c, gamma=0.5)  # no history: CP_r only
    assert p.scores is None and np.array_equal(p.kept, p.reliable)
    assert p.targets.tolist() == [0, 0, -1, -1, -1, 1, -1, -1, 1, -1]
    # history: sample 2 (filtered) always sat with anchor 0 -> pulled back; sample 1 (reliable)
    # never did -> dropped
    past = np.tile(labels, (15, 1))
    past[:, 1] = 8
    p = purify_clusters(x, labels, past=past, centroids=c, gamma=0.5)
    assert p.kept.tolist() == [1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert (p.n_dropped, p.n_pulled_back) == (1, 6)
    assert p.targets.tolist() == [0, -1, 0, 0, 0, 1, 1, 1, 1, -1]  # the lone point stays single
    with pytest.raises(DataError):
        purify_clusters(x, labels, past=past[:, :5])


def test_member_table_and_batch_members():
    targets = np.array([0, -1, 0, 1, 1, 1, -1])
    members, offsets = member_table(targets)
    assert members.tolist() == [0, 2, 3, 4, 5] and offsets.tolist() == [0, 2, 5]
    pos, mask = batch_members(targets, members, offsets, np.array([1, 2, 4, 6]))
    assert mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert pos[mask].tolist() == [1, 0, 2, 3, 4, 5, 6]
    assert (pos[~mask] == torch.tensor([1, 1, 2, 6, 6])).all()  # padding repeats the sample
    # every row contains the sample itself (i, j both range over S_c in PCP Eq 5)
    idx = torch.tensor([1, 2, 4, 6])
    assert ((pos == idx[:, None]) & mask).any(1).all()
    # no clusters at all: every sample is a single instance
    t = np.full(4, -1)
    pos, mask = batch_members(t, *member_table(t), np.array([3, 0]))
    assert pos.tolist() == [[3], [0]] and mask.all()


def test_purification_quality():
    targets = np.array([0, 0, 0, 1, 1, -1, -1, -1])
    truth = np.array([5, 5, 6, 7, 7, 1, 2, 3])
    raw = np.array([0, 0, 0, 1, 1, 0, 1, 1])
    q = purification_quality(targets, truth, raw)
    assert q.n_clusters == 2
    assert q.clustered_fraction == pytest.approx(5 / 8) and q.single_fraction == pytest.approx(3 / 8)
    assert q.purity == pytest.approx(4 / 5)
    assert q.raw_purity == pytest.approx(4 / 8)  # raw cluster 0 {5,5,6,1}: 2; cluster 1 {7,7,2,3}: 2
    assert math.isnan(purification_quality(np.full(3, -1), np.zeros(3)).purity)
