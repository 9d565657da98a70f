"""JULE's forward pass (structure/agglomeration.py) against the paper's equations, written out
literally and slowly here (dense matrices, Python loops), on tiny and random small graphs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from deepclust.errors import ConfigError, DataError
from deepclust.structure.agglomeration import (
    agglomerate,
    cluster_affinity,
    directed_knn_graph,
    initial_clusters,
    merge_clusters,
    period_merges,
    small_cluster_floor,
)


# ----------------------------------------------------------------------------- literal reference

def ref_directed(wd: np.ndarray, ci: list[int], cj: list[int], size_aware: bool = False) -> float:
    """A(C_j -> C_i) = 1/|C_i|^2 1^T W_{C_i,C_j} W_{C_j,C_i} 1 (JULE Eq 12, first term); size-aware
    (the head's): divided by |C_j| as well."""
    one = np.ones(len(ci))
    value = float(one @ wd[np.ix_(ci, cj)] @ wd[np.ix_(cj, ci)] @ one) / len(ci) ** 2
    return value / len(cj) if size_aware else value


def ref_affinity(wd, ci, cj, size_aware: bool = False) -> float:
    """A(C_i, C_j) = A(C_j -> C_i) + A(C_i -> C_j) (JULE Eq 12)."""
    return ref_directed(wd, ci, cj, size_aware) + ref_directed(wd, cj, ci, size_aware)


def ref_loss(values: list[float], kc: int, lam: float) -> float:
    """JULE Eq 7 on the K_c largest affinities (missing ones are 0)."""
    v = (sorted(values, reverse=True) + [0.0] * kc)[:kc]
    if kc == 1:
        return -v[0]
    return -v[0] - lam / (kc - 1) * sum(v[0] - vk for vk in v[1:])


def ref_merge(wd: np.ndarray, labels, n_merges: int, kc: int = 5, lam: float = 1.0, size_aware: bool = False):
    """Greedy merges, recomputing every affinity from W each timestep. Ties and the fallback as
    documented in the module: lower id first; the merged cluster keeps the id of the larger one;
    a cluster without positive affinity is merged first (lowest id), into the cluster it shares
    the most edge weight with (size-aware: per member of that cluster); clusters sharing no edge
    wait; then the two smallest merge."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    lab = rank[inv]
    clusters = {c: list(np.flatnonzero(lab == c)) for c in range(lab.max() + 1)}
    merges = []
    for _ in range(n_merges):
        best, isolated = None, []
        for i in sorted(clusters):
            aff = [(ref_affinity(wd, clusters[i], clusters[j], size_aware), j) for j in sorted(clusters) if j != i]
            if not any(a > 0 for a, _ in aff):
                isolated.append(i)
                continue
            loss = ref_loss([a for a, _ in aff], kc, lam)
            nearest = max(aff, key=lambda p: (p[0], -p[1]))[1]
            if best is None or loss < best[0]:
                best = (loss, i, nearest)
        x = y = None
        for i in isolated:  # no positive affinity: joins the cluster it shares most edge weight with
            others = [c for c in sorted(clusters) if c != i]
            shared = [(wd[np.ix_(clusters[i], clusters[c])].sum() + wd[np.ix_(clusters[c], clusters[i])].sum())
                      / (len(clusters[c]) if size_aware else 1) for c in others]
            if max(shared) > 0:
                x, y = i, others[int(np.argmax(shared))]
                break
        if x is None and best is not None:
            x, y = best[1], best[2]
        if x is None:  # closed components only: the two smallest
            x, y = sorted(clusters, key=lambda c: (len(clusters[c]), c))[:2]
        keep, gone = (x, y) if (len(clusters[x]), -x) > (len(clusters[y]), -y) else (y, x)
        clusters[keep] = sorted(clusters[keep] + clusters.pop(gone))
        merges.append(frozenset(clusters[keep]))
    out = np.empty(len(lab), np.int64)
    for c, members in enumerate(sorted(clusters.values(), key=min)):
        out[members] = c
    return out, merges


def random_graph(rng, n: int, k: int) -> sp.csr_matrix:
    """Eq 4 on random points in 3-D (clumped, so that the clusters differ)."""
    centres = rng.normal(size=(4, 3)) * 3
    x = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 3))
    return directed_knn_graph(x, k, backend="faiss")


# ----------------------------------------------------------------------------- Eq 4, Eq 12

def test_graph_weights_follow_eq4():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    w = directed_knn_graph(x, 6)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d2 = ((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nbr = np.argsort(d2, axis=1)[:, :6]
    sel = np.take_along_axis(d2, nbr, axis=1)
    sigma2 = sel.mean()  # a = 1: the mean squared kNN distance
    dense = np.zeros((40, 40))
    np.put_along_axis(dense, nbr, np.exp(-sel / sigma2), axis=1)
    assert (w.getnnz(axis=1) == 6).all()
    np.testing.assert_allclose(w.toarray(), dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq12_matches_dense_computation(seed):
    rng = np.random.default_rng(seed)
    n = 18
    wd = rng.random((n, n)) * (rng.random((n, n)) < 0.35)
    np.fill_diagonal(wd, 0.0)
    labels = rng.integers(0, 6, n)
    labels[:6] = np.arange(6)  # every cluster non-empty
    a = cluster_affinity(sp.csr_matrix(wd), labels).toarray()
    for i in range(6):
        for j in range(6):
            expect = 0.0 if i == j else ref_affinity(wd, list(np.flatnonzero(labels == i)),
                                                     list(np.flatnonzero(labels == j)))
            assert a[i, j] == pytest.approx(expect, rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- Eq 13, 14, 19, 21

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_incremental_updates_equal_recomputation(seed):
    rng = np.random.default_rng(seed)
    w = random_graph(rng, 60, 5)
    labels = initial_clusters(rng.normal(size=(60, 3)))
    c = labels.max() + 1
    for n_merges in (1, c // 2, c - 2):
        out, sums = merge_clusters(w, labels, n_merges, return_sums=True)
        from deepclust.structure.agglomeration import directed_sums
        expect = directed_sums(w, out).toarray()
        np.testing.assert_allclose(sums.toarray(), expect, rtol=1e-10, atol=1e-13)


def test_approximations_are_approximate():
    """Eq 19 / Eq 21 leave out Eq 14's cross terms: their sums differ from a recomputation."""
    from deepclust.structure.agglomeration import directed_sums
    rng = np.random.default_rng(5)
    w = random_graph(rng, 80, 6)
    labels = np.arange(80)
    for mode, alpha in (("eq19", 0.0), ("eq21", 0.0), ("eq21", -0.2)):
        out, sums = merge_clusters(w, labels, 60, mode=mode, alpha=alpha, return_sums=True)
        assert not np.allclose(sums.toarray(), directed_sums(w, out).toarray())


# ----------------------------------------------------------------------------- Eq 7, Fig 3

def test_fig3_local_structure_picks_the_isolated_pair():
    """JULE Fig 3: in a dense region b's nearest neighbour is the closest pair overall, yet Eq 7
    (lambda = 1) merges e, which is close to its nearest neighbour and far from all others;
    conventional agglomeration (lambda = 0, Eq 3) merges b and its nearest neighbour."""
    names = "abcdfeg"
    idx = {c: i for i, c in enumerate(names)}
    pairs = {("a", "b"): 0.95}
    for p in ("abcdf"):
        for q in ("abcdf"):
            if p < q and (p, q) not in pairs:
                pairs[(p, q)] = 0.85 + 0.01 * (idx[p] + idx[q]) / 10
    pairs[("e", "g")] = 0.8  # sparse region: one close neighbour only
    wd = np.zeros((7, 7))
    for (p, q), v in pairs.items():
        wd[idx[p], idx[q]] = wd[idx[q], idx[p]] = v
    w = sp.csr_matrix(wd)
    _, rec = merge_clusters(w, np.arange(7), 1, lam=1.0, return_record=True)
    assert set(rec[0]) == {idx["e"], idx["g"]}
    _, rec = merge_clusters(w, np.arange(7), 1, lam=0.0, return_record=True)
    assert set(rec[0]) == {idx["a"], idx["b"]}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kc", [1, 3, 5])
@pytest.mark.parametrize("size_aware", [False, True])
def test_agglomeration_equals_literal_reference(seed, kc, size_aware):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(25, 45))
    w = random_graph(rng, n, int(rng.integers(3, 7)))
    labels = rng.integers(0, n // 2, n) if seed % 2 else np.arange(n)
    c = np.unique(labels).size
    out, rec = merge_clusters(w, labels, c - 2, k_c=kc, return_record=True, size_aware=size_aware)
    expect, merges = ref_merge(w.toarray(), labels, c - 2, kc=kc, size_aware=size_aware)
    np.testing.assert_array_equal(out, expect)
    assert replay(labels, rec) == merges  # the same merge at every timestep


def replay(labels, record) -> list[frozenset]:
    """The members of the merged cluster at each timestep of a merge record (slot ids are the
    compacted input labels)."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    slots = np.argsort(np.argsort(first))[inv]
    members = {c: set(np.flatnonzero(slots == c)) for c in range(slots.max() + 1)}
    out = []
    for keep, gone in record:
        members[keep] |= members.pop(gone)
        out.append(frozenset(members[keep]))
    return out


def test_fallback_joins_clusters_without_affinity():
    """Two cliques with no edge between them, and a third node receiving edges only: GDL gives
    no positive affinity across, so the documented fallback finishes the merges."""
    wd = np.zeros((7, 7))
    wd[np.ix_([0, 1, 2], [0, 1, 2])] = 0.9
    wd[np.ix_([3, 4, 5], [3, 4, 5])] = 0.7
    wd[0, 6] = 0.5  # 6 only receives
    np.fill_diagonal(wd, 0.0)
    labels = np.arange(7)
    out = merge_clusters(sp.csr_matrix(wd), labels, 5)
    expect, _ = ref_merge(wd, labels, 5)
    np.testing.assert_array_equal(out, expect)
    assert out[6] == out[0]  # 6 shares edge weight with 0's clique only
    assert out.max() == 1


# ----------------------------------------------------------------------------- pieces, errors

def test_initial_clusters_are_one_nn_components():
    x = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [0.05, 1.0], [-1.0, 0.02]])
    lab = initial_clusters(x)
    assert lab[0] == lab[1] and lab[2] == lab[3] == lab[4]
    assert len({lab[0], lab[2], lab[5]}) == 3 or lab[5] in (lab[0], lab[2])


def test_period_merges_unrolls_partially():
    assert period_merges(1000, 0.9, 10) == 900
    assert period_merges(100, 0.9, 10) == 90
    assert period_merges(15, 0.9, 10) == 5  # never past the target
    assert period_merges(10, 0.9, 10) == 0
    assert period_merges(7, 0.2, 1) == 2  # ceil(1.4)
    with pytest.raises(ConfigError):
        period_merges(10, 0.0, 1)


def test_agglomerate_separates_clumps():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 4
    y = np.repeat(np.arange(4), 50)
    x = centres[y] + rng.normal(size=(200, 8)) * 0.3
    out = agglomerate(x, 4, k_s=10)
    assert out.max() == 3
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(y, out) == 1.0


def _blocks_and_outlying_pair() -> sp.csr_matrix:
    """Two dense blocks of 40 (0-39, 40-79) with one weak mutual link, and a pair (80, 81) that
    points into block 1 while block 1 points back to it only faintly: its affinities are all
    near 0, so greedy Eq 7 merges the blocks before it ever picks the pair."""
    wd = np.zeros((82, 82))
    for lo in (0, 40):
        wd[lo:lo + 40, lo:lo + 40] = 1.0
    np.fill_diagonal(wd, 0.0)
    wd[0, 40] = wd[40, 0] = 0.5
    wd[80, 81] = wd[81, 80] = 1.0
    wd[80, 1] = wd[81, 1] = 1.0
    wd[1, 80] = 1e-4
    return sp.csr_matrix(wd)


def test_small_clusters_are_set_aside_at_the_cut():
    w = _blocks_and_outlying_pair()
    start = np.r_[np.zeros(40), np.ones(40), [2, 2]].astype(np.int64)
    plain = merge_clusters(w, start, 1)
    assert np.bincount(plain).tolist() == [80, 2]  # the blocks merged, the pair survived
    floor = small_cluster_floor(82, 2, 0.05)
    assert floor == 3
    out = merge_clusters(w, start, 1, min_size=floor)
    assert np.bincount(out).tolist() == [42, 40]  # the pair joined block 1, its edge partner
    assert out[80] == out[81] == out[1] != out[40]


def test_size_aware_absorption_goes_by_edge_weight_per_member():
    """A pair set aside at the cut shares 3 edges with a block of 40 and 2 with a block of 20: by the
    total it joins the larger block (JULE's), by the weight per member the smaller (the head's)."""
    wd = np.zeros((62, 62))
    wd[:40, :40] = 1.0
    wd[40:60, 40:60] = 1.0
    np.fill_diagonal(wd, 0.0)
    wd[0, 40] = wd[40, 0] = 0.5
    wd[60, 61] = wd[61, 60] = 1.0
    wd[60, [0, 1, 40]] = 1.0
    wd[61, [0, 40]] = 1.0
    wd[0, 60] = wd[40, 60] = 1e-4  # faint edges back: affinities near 0, never picked by Eq 7
    start = np.r_[np.zeros(40), np.ones(20), [2, 2]].astype(np.int64)
    for size_aware, partner in ((False, 0), (True, 40)):
        out = merge_clusters(sp.csr_matrix(wd), start, 1, min_size=3, size_aware=size_aware)
        assert np.bincount(out).tolist() == ([42, 20] if partner == 0 else [40, 22])
        assert out[60] == out[61] == out[partner]


def test_small_cluster_rule_keeps_clean_partitions():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    x = np.eye(8)[:4][y] * 4 + rng.normal(size=(200, 8)) * 0.3
    assert (agglomerate(x, 4, k_s=10, min_size=small_cluster_floor(200, 4, 0.05))
            == agglomerate(x, 4, k_s=10)).all()
    assert small_cluster_floor(200, 4, 0.0) == 0
    with pytest.raises(ConfigError):
        small_cluster_floor(200, 4, -0.1)
    with pytest.raises(ConfigError):
        merge_clusters(_blocks_and_outlying_pair(), np.arange(82), 1, min_size=3, return_record=True)


def test_bad_input_is_refused():
    w = sp.csr_matrix(np.eye(4)[::-1])
    with pytest.raises(DataError):
        merge_clusters(w, np.arange(3), 1)
    with pytest.raises(DataError):
        merge_clusters(np.ones((4, 4)), np.arange(4), 1)
    with pytest.raises(ConfigError):
        merge_clusters(w, np.arange(4), 4)
    with pytest.raises(ConfigError):
        merge_clusters(w, np.arange(4), 1, mode="fast")
    with pytest.raises(DataError):
        directed_knn_graph(np.ones((3, 2)), 5)


# ----------------------------------------------------------------------------- the benchmark script

def test_benchmark_smoke_run_writes_its_json(tmp_path, small_npz):
    """benchmarks/agglomerative.py at a tiny N (the tests' own 300 digits: no shared data needed),
    its JSON to --out, lock in a private directory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DEEPCLUST_LOCK_DIR": str(tmp_path / "locks"),
           "DEEPCLUST_RESULTS_DIR": str(tmp_path / "results")}
    out = tmp_path / "agg.json"
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "agglomerative.py"), "--n", "300",
                        "--data", f"npz:{small_npz}", "--pca", "20", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=root)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    for key in ("n", "seconds", "reference_seconds", "ratio", "peak_memory_mb", "features"):
        assert key in r
    assert r["n"] == 300 and r["ratio"] == pytest.approx(r["seconds"] / r["reference_seconds"], rel=0.05)
    assert len(r["ours"]["scores"]["sizes"]) == 10 and not (tmp_path / "results").exists()
    bad = subprocess.run([sys.executable, str(root / "benchmarks" / "agglomerative.py"), "--n", "600",
                          "--target", "1", "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=root)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
