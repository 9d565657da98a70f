"""PAD's strongly connected subgraph search (deepclust.structure.scs): known answers on hand-built
graphs, equality with a slow, literal reference search on random graphs, input validation."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from deepclust.errors import ConfigError, DataError
from deepclust.structure.scs import (
    group_members,
    neighbourhood_members,
    scs_quality,
    strongly_connected_subgraphs,
)

SCS = strongly_connected_subgraphs


# ----------------------------------------------------------------------------- slow reference


def _reachable(succ, start, allowed) -> set[int]:
    seen, todo = {start}, [start]
    while todo:
        for w in succ[todo.pop()]:
            if w in allowed and w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _reference_scs(neighbours, max_size=10, cyclic=True, order=None) -> np.ndarray:
    """The search of the module docstring, written literally: recursive DFS, Python sets."""
    nbr = np.asarray(neighbours)
    n = nbr.shape[0]
    succ = [[int(w) for w in row if w >= 0] for row in nbr]
    pred = [[] for _ in range(n)]
    for v, row in enumerate(succ):
        for w in row:
            pred[w].append(v)
    everyone = set(range(n))
    reach = [_reachable(succ, v, everyone) for v in range(n)]
    budget = n if max_size is None else max_size
    owner = {}  # vertex -> index of its SCS, in the order found
    found = True
    while found:  # sweep the start order until a sweep finds no SCS
        found = False
        for r in (range(n) if order is None else [int(x) for x in order]):
            if r in owner:
                continue
            visited = []

            def dfs(v):
                visited.append(v)
                for w in succ[v]:
                    if len(visited) >= budget:
                        return
                    if w in owner or w in visited:
                        continue
                    if cyclic and not (w in reach[r] and r in reach[w]):  # other component
                        continue
                    dfs(w)

            dfs(r)
            members = set(visited)
            if cyclic:  # explored vertices from which r is reachable through explored vertices
                members = _reachable(pred, r, members)
            if len(members) >= 2:
                gid = len(set(owner.values()))
                for v in members:
                    owner[v] = gid
                found = True
    raw = [owner.get(v, ("single", v)) for v in range(n)]
    ids = {}
    return np.array([ids.setdefault(x, len(ids)) for x in raw], dtype=np.int64)


def _random_graph(rng, n, k, missing=0.0) -> np.ndarray:
    """(n, k) rows of distinct non-self neighbours, a fraction ``missing`` of entries -1."""
    rows = np.empty((n, k), np.int64)
    for i in range(n):
        rows[i] = rng.choice(np.delete(np.arange(n), i), size=k, replace=False)
    rows[rng.random((n, k)) < missing] = -1
    return rows


def _blocks_graph(rng, n, k) -> np.ndarray:
    """Random graphs on 2-4 blocks of vertices, one edge of each row redirected at random: several
    large components, joined by one-way edges (the case where a search could leave its own)."""
    cuts = np.sort(rng.choice(np.arange(k + 2, n - k - 1), size=int(rng.integers(1, 4)),
                              replace=False)) if n > 2 * k + 4 else np.array([], int)
    rows = np.empty((n, k), np.int64)
    for lo, hi in zip([0, *cuts], [*cuts, n]):
        rows[lo:hi] = _random_graph(rng, hi - lo, min(k, hi - lo - 1)).clip(0) + lo \
            if hi - lo > k else np.repeat(np.arange(lo, hi)[::-1, None], k, axis=1)
    out = rng.random(n) < 0.3
    col = rng.integers(0, k, n)
    rows[out, col[out]] = rng.integers(0, n, out.sum())
    rows[rows == np.arange(n)[:, None]] = -1
    return rows


def _knn_graph(rng, n, k, dim=2) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def _sets(groups) -> set[frozenset]:
    g = np.asarray(groups)
    return {frozenset(np.flatnonzero(g == i).tolist()) for i in np.unique(g)}


def _multi(groups) -> set[frozenset]:
    return {s for s in _sets(groups) if len(s) >= 2}


def _strongly_connected(neighbours, members) -> bool:
    idx = np.array(sorted(members))
    pos = {v: i for i, v in enumerate(idx)}
    edges = [(pos[v], pos[w]) for v in idx for w in neighbours[v] if w in pos]
    a = sp.csr_matrix((np.ones(len(edges)), tuple(np.array(edges).T)), shape=(idx.size,) * 2)
    return connected_components(a, directed=True, connection="strong")[0] == 1


# ----------------------------------------------------------------------------- known answers


def test_one_cycle_is_found_and_vertices_leading_into_it_stay_single():
    nbr = np.array([[1, -1], [2, -1], [3, -1], [0, -1], [0, 1], [4, -1]])  # 0-1-2-3 cycle
    assert _sets(SCS(nbr)) == {frozenset({0, 1, 2, 3}), frozenset({4}), frozenset({5})}


def test_chain_without_a_way_back_gives_no_scs():
    nbr = np.array([[1, 2], [2, 3], [3, 4], [4, -1], [-1, -1]])
    np.testing.assert_array_equal(SCS(nbr), np.arange(5))
    np.testing.assert_array_equal(SCS(nbr, max_size=None), np.arange(5))


def test_mutual_pair_found_even_when_the_nearest_neighbour_leads_away():
    # 0's nearest is 2, which starts a chain 2 -> 3 -> ... -> 11 that never comes back; the pair
    # 0 <-> 1 is found because the search stays inside 0's strongly connected component
    chain = [[i + 1, -1] for i in range(2, 11)] + [[-1, -1]]
    nbr = np.array([[2, 1], [0, -1], *chain])
    assert _multi(SCS(nbr, max_size=3)) == {frozenset({0, 1})}


def test_search_stays_in_its_component_when_the_nearest_neighbour_leads_to_another():
    a = [[i + 1 if i + 1 < 6 else -1, i - 1] for i in range(6)]  # 0..5, edges both ways
    b = [[i + 1 if i + 1 < 12 else -1, i - 1 if i > 6 else -1] for i in range(6, 12)]  # 6..11
    a[0] = [6, 1]  # 0's nearest neighbour is in the other component, with no way back
    assert _multi(SCS(np.array(a + b), max_size=3)) == {
        frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({6, 7, 8}), frozenset({9, 10, 11})}


def test_over_size_region_is_cut_at_s():
    n = 25  # a path with edges both ways (i -> i+1 nearest, then i -> i-1): one component of 25
    nbr = np.array([[i + 1 if i + 1 < n else -1, i - 1] for i in range(n)])
    groups = SCS(nbr, max_size=10)
    assert _sets(groups) == {frozenset(range(0, 10)), frozenset(range(10, 20)),
                             frozenset(range(20, 25))}
    assert _multi(SCS(nbr, max_size=None)) == {frozenset(range(n))}
    assert _multi(SCS(nbr, max_size=4)) == {frozenset(range(i, i + 4)) for i in range(0, 24, 4)}


def test_complete_region_is_cut_into_pieces_of_s():
    n = 20
    nbr = np.array([[j for j in range(n) if j != i] for i in range(n)])
    assert sorted(len(s) for s in _multi(SCS(nbr, max_size=10))) == [10, 10]
    assert sorted(len(s) for s in _multi(SCS(nbr, max_size=7))) == [6, 7, 7]


def test_directed_cycle_longer_than_s_has_no_strongly_connected_piece():
    nbr = np.array([[(i + 1) % 12] for i in range(12)])
    assert _multi(SCS(nbr, max_size=10)) == set()
    assert _multi(SCS(nbr, max_size=12)) == {frozenset(range(12))}


def test_without_cyclic_constraint_the_diffusion_is_taken_as_it_spreads():
    nbr = np.array([[1, 2], [2, 3], [3, 4], [4, -1], [-1, -1], [0, -1]])
    assert _sets(SCS(nbr, cyclic=False, max_size=3)) == {frozenset({0, 1, 2}), frozenset({3, 4}),
                                                          frozenset({5})}
    assert _multi(SCS(nbr, cyclic=False, max_size=None)) == {frozenset(range(5))}
    assert _multi(SCS(nbr, cyclic=True, max_size=None)) == set()


def test_retry_sweep_finds_an_scs_once_a_removal_frees_the_budget():
    # one component 0 -> 2 -> 3 -> 4 -> 0 (+ 0 <-> 1, 1 -> 2, 3 -> 2), s = 3. Sweep 1: from 0 the
    # DFS visits 0, 2, 3 and from 1 it visits 1, 2, 3: no way back; from 2 it finds {2, 3}; from 4
    # it visits 4, 0, 1 and nothing leads back to 4. Sweep 2: from 0 it visits 0, 1: {0, 1}.
    nbr = np.array([[2, 1], [2, 0], [3, -1], [2, 4], [0, -1]])
    want = {frozenset({2, 3}), frozenset({0, 1})}
    assert _multi(SCS(nbr, max_size=3)) == want
    assert _multi(_reference_scs(nbr, max_size=3)) == want


def test_start_order_decides_where_a_large_region_is_cut():
    n = 6
    nbr = np.array([[i + 1 if i + 1 < n else -1, i - 1] for i in range(n)])
    assert _multi(SCS(nbr, max_size=3)) == {frozenset({0, 1, 2}), frozenset({3, 4, 5})}
    order = np.array([1, 0, 2, 3, 4, 5])  # from 1: visits 1, 2, 3
    assert _multi(SCS(nbr, max_size=3, order=order)) == {frozenset({1, 2, 3}), frozenset({4, 5})}


def test_scale_threshold_one_is_instance_learning():
    nbr = _knn_graph(np.random.default_rng(0), 50, 5)
    np.testing.assert_array_equal(SCS(nbr, max_size=1), np.arange(50))
    np.testing.assert_array_equal(SCS(nbr, max_size=1, cyclic=False), np.arange(50))


def test_empty_and_edgeless_graphs():
    assert SCS(np.zeros((0, 5), np.int64)).shape == (0,)
    np.testing.assert_array_equal(SCS(np.zeros((4, 0), np.int64)), np.arange(4))


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("seed", range(6))
def test_groups_are_disjoint_cover_everyone_and_are_strongly_connected(seed):
    rng = np.random.default_rng(seed)
    nbr = _knn_graph(rng, 300, 5, dim=3)
    for s in (3, 10, None):
        groups = SCS(nbr, max_size=s, order=rng.permutation(300))
        assert groups.shape == (300,) and groups.dtype == np.int64
        assert np.array_equal(np.unique(groups), np.arange(groups.max() + 1))  # contiguous ids
        members, mask = group_members(groups)
        listed = members[mask]
        assert np.array_equal(np.bincount(listed), mask.sum(axis=1))  # each listed |group| times
        for scs in _multi(groups):
            assert s is None or len(scs) <= s
            assert _strongly_connected(nbr, scs)
        if s is None:  # no scale constraint: exactly the non-trivial strongly connected components
            a = sp.csr_matrix((np.ones(nbr.size), (np.repeat(np.arange(300), 5), nbr.ravel())),
                              shape=(300, 300))
            comp = connected_components(a, directed=True, connection="strong")[1]
            assert _multi(groups) == _multi(comp)


@pytest.mark.parametrize("seed", range(40))
def test_same_answer_as_the_slow_reference_on_random_graphs(seed):
    rng = np.random.default_rng(1000 + seed)
    n, k = int(rng.integers(2, 45)), int(rng.integers(1, 5))
    kind = seed % 3
    if kind == 0:
        nbr = _random_graph(rng, n, min(k, n - 1), missing=rng.choice([0.0, 0.2]))
    elif kind == 1:
        nbr = _knn_graph(rng, n, min(k, n - 1), dim=int(rng.integers(2, 6)))
    else:
        nbr = _blocks_graph(rng, max(n, 12), min(k, 3))
        n = nbr.shape[0]
    order = None if seed % 4 == 0 else rng.permutation(n)
    sys.setrecursionlimit(max(1000, 4 * n))
    for s in (1, 2, 3, 5, 10, None):
        for cyclic in (True, False):
            got = SCS(nbr, max_size=s, cyclic=cyclic, order=order)
            want = _reference_scs(nbr, max_size=s, cyclic=cyclic, order=order)
            np.testing.assert_array_equal(got, want, err_msg=f"s={s} cyclic={cyclic}")


def test_same_answer_as_the_reference_on_a_larger_knn_graph():
    rng = np.random.default_rng(7)
    nbr = _knn_graph(rng, 400, 5, dim=4)
    order = rng.permutation(400)
    for s in (5, 10, 50):
        np.testing.assert_array_equal(SCS(nbr, max_size=s, order=order),
                                      _reference_scs(nbr, max_size=s, order=order))


def test_deterministic_and_independent_of_dtype_and_layout():
    rng = np.random.default_rng(3)
    nbr = _knn_graph(rng, 500, 5, dim=3)
    copy = nbr.copy()
    first = SCS(nbr)
    np.testing.assert_array_equal(nbr, copy)  # input untouched
    np.testing.assert_array_equal(SCS(nbr), first)
    np.testing.assert_array_equal(SCS(nbr.astype(np.int32)), first)
    np.testing.assert_array_equal(SCS(np.asfortranarray(nbr)), first)
    np.testing.assert_array_equal(SCS(nbr, order=np.arange(500)), first)


def test_recycled_visit_stamps_give_the_same_answer():
    from deepclust.structure import scs

    nbr = scs._check_neighbours(_knn_graph(np.random.default_rng(5), 300, 5, dim=3))
    comp, _ = scs._tarjan(nbr)
    sizes = np.bincount(comp).astype(np.int32)
    order = np.random.default_rng(6).permutation(300).astype(np.int32)
    for cyclic in (True, False):
        graph = scs._confine(nbr, comp) if cyclic else nbr
        full = scs._search(graph, comp, sizes, order, 10, cyclic, scs._GONE)
        tight = scs._search(graph, comp, sizes, order, 10, cyclic, 25)  # recycled every 2 searches
        np.testing.assert_array_equal(full[0], tight[0])
        assert full[1] == tight[1]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad, match", [
    (np.arange(5), "shape"),
    (np.zeros((3, 2, 1), np.int64), "shape"),
    (np.array([[1.0], [0.0]]), "integer"),
    (np.array([[True], [False]]), "integer"),
    (np.array([[1], [2]]), r"\[0, 2\)"),
    (np.array([[1], [-2]]), r"\[0, 2\)"),
    (np.array([[1], [1]]), "lists itself"),
])
def test_bad_neighbour_arrays_raise_data_error(bad, match):
    with pytest.raises(DataError, match=match):
        SCS(bad)


@pytest.mark.parametrize("s", [0, -3, 2.5, True, "10"])
def test_bad_scale_threshold_raises_config_error(s):
    with pytest.raises(ConfigError, match="max_size"):
        SCS(np.array([[1], [0]]), max_size=s)


def test_bad_cyclic_and_order_raise():
    nbr = np.array([[1], [2], [0]])
    with pytest.raises(ConfigError, match="cyclic"):
        SCS(nbr, cyclic="yes")
    for order in ([0, 1], [0, 1, 1], [0, 1, 3], [[0, 1, 2]], [0.0, 1.0, 2.0]):
        with pytest.raises(DataError, match="permutation"):
            SCS(nbr, order=np.array(order))


# ----------------------------------------------------------------------------- helpers for the loss


def test_group_members_lists_the_anchor_first_then_its_group():
    groups = np.array([0, 1, 0, 2, 1, 0])
    members, mask = group_members(groups)
    np.testing.assert_array_equal(members, [[0, 2, 5], [1, 4, 1], [2, 0, 5], [3, 3, 3],
                                            [4, 1, 4], [5, 2, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0],
                                         [1, 1, 0], [1, 1, 1]])
    assert group_members(groups, max_size=5)[0].shape == (6, 5)
    with pytest.raises(DataError, match="max_size"):
        group_members(groups, max_size=2)
    with pytest.raises(DataError, match="non-negative"):
        group_members(np.array([0, -1]))


def test_neighbourhood_members_is_diffusion_off():
    members, mask = neighbourhood_members(np.array([[1, 2], [2, -1], [0, 1]]))
    np.testing.assert_array_equal(members, [[0, 1, 2], [1, 2, 1], [2, 0, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0], [1, 1, 1]])


def test_scs_quality_known_answer():
    groups = np.array([0, 0, 0, 1, 1, 2])  # SCS {0,1,2} labels a,a,b; {3,4} b,b; {5} single
    q = scs_quality(groups, np.array(["a", "a", "b", "b", "b", "c"]))
    assert (q.n_vertices, q.n_scs, q.max_size) == (6, 2, 3)
    assert q.coverage == pytest.approx(5 / 6) and q.mean_size == pytest.approx(2.5)
    assert q.precision == pytest.approx(4 / 5)  # 2 of 3 plus 2 of 2 members share the majority
    assert q.pair_precision == pytest.approx((2 + 2) / (6 + 2))
    assert q.as_dict()["n_scs"] == 2
    empty = scs_quality(np.arange(4), np.zeros(4))
    assert empty.n_scs == 0 and np.isnan(empty.precision)
    with pytest.raises(DataError, match="labels"):
        scs_quality(groups, np.zeros(5))
