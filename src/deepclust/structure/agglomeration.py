"""JULE's forward pass: graph-degree-linkage agglomeration on a sparse directed kNN graph.

"Joint Unsupervised Learning of Deep Representations and Image Clusters" (Yang, Parikh, Batra,
CVPR 2016; ``../shared/papers/JULE_cvpr2016.txt``), Sec 3.3, 3.5.1, 3.6 and appendix A.1-A.2; the
affinity is the graph degree linkage of its reference [68] (Zhang et al., ECCV 2012). Pure
functions on numpy / scipy arrays; the merge loop is compiled with numba.

The graph (JULE Eq 4). Features are L2-normalised (the paper L2-normalises image intensities and
its ip layer). W(i, j) = exp(-||x_i - x_j||^2 / sigma^2) for the K_s = 20 nearest neighbours x_j
of x_i (itself excluded), 0 otherwise: a directed graph, one row of K_s entries per sample.
sigma^2 = a / (n_s K_s) * sum_i sum_{j in N_i} ||x_i - x_j||^2, so "a = 1" (Table 2) means that
sigma^2 is exactly the mean squared distance of a sample to its K_s neighbours; the authors' code
(``affinity/affinity.lua``) takes the mean of the kNN search's distances, the same number.

The affinity (JULE Eq 12). Write I[v, Y] = sum_{u in Y} W(u, v) (the weight v receives from
cluster Y) and O[v, Y] = sum_{u in Y} W(v, u) (the weight v sends to Y); then
1^T W_{Y,X} W_{X,Y} 1 = sum_{v in X} I[v, Y] O[v, Y] =: S[X, Y], and
A(X -> Y) = S[X, Y] / |Y|^2, A(C_i, C_j) = A(C_j -> C_i) + A(C_i -> C_j). With P the n x C
one-hot cluster matrix, I = W^T P, O = W P and S = P^T (I * O): products of sparse matrices (no
n x n or dense C x C matrix is ever formed).

Merges (JULE Eq 13, 14): merging C_m and C_n into C_m',
  S[m', i] = S[m, i] + S[n, i]                                     (Eq 13, exact),
  S[i, m'] = S[i, m] + S[i, n] + X_i, X_i = sum_{v in C_i} I[v,m] O[v,n] + I[v,n] O[v,m]  (Eq 14).
``mode="exact"`` computes the cross term X_i from the graph (enumerating the vertices around the
smaller of the two clusters), ``mode="eq19"`` replaces Eq 14 by the approximation of Eq 19
(S[i, m'] = (|m| + |n|) (S[i, m] / |m| + S[i, n] / |n|)) and ``mode="eq21"`` by Eq 21 with a
constant ratio alpha (S[i, m'] = (1 + alpha) (S[i, m] + S[i, n])).

The criterion (JULE Eq 7, lambda = 1, K_c = 5): the loss of cluster C_i is
  L_i = -A(C_i, N_i[1]) - lambda / (K_c - 1) sum_{k=2}^{K_c} (A(C_i, N_i[1]) - A(C_i, N_i[k])),
N_i the clusters sorted by affinity to C_i (fewer than K_c neighbours: the missing ones have
affinity 0, as every non-neighbour does). Each timestep merges the cluster of least loss with its
nearest neighbour N_i[1] (greedy, Sec 3.5.1). A priority queue with lazy deletion holds the losses;
each cluster caches its K_c best neighbours, so a merge recomputes only the losses it changes.
The authors' code applies (7b) only while more than 100 clusters remain; we apply Eq 7 throughout.

Where the paper is silent (ours):
  * A cluster without any positive affinity (GDL needs a vertex with edges both to and from the
    other cluster) can never be chosen by Eq 7, and left alone it would survive to the end as a
    tiny cluster. Such clusters are merged first, lowest id first, each into the cluster it shares
    the most kNN edge weight with (both directions); these merges count as timesteps of the
    period. A cluster that shares no kNN edge at all (a closed component of the graph) waits until
    no other merge is left; then the two smallest clusters (size, then id) merge. The authors' code
    (``affinity.compute4cluster``) likewise joins them first, to the cluster with the nearest mean
    feature, outside the period's count; we need no features here.
  * Ties (equal losses, equal affinities) go to the lower cluster id of the compiled loop's slots:
    deterministic, but not meaningful.

The size-aware variant (ours, ``size_aware``; the agglomerative cluster head, never JULE's training):
  * Eq 12's average over |C_x|^2 leaves the partner's size in: on a graph without structure at the
    scale of C_x and C_y (random edges of out-degree k among n images), S[x, y] grows as
    |C_x| |C_y|^2 (k / n)^2, so A(C_x, C_y) grows as (|C_x| + |C_y|) (k / n)^2 and every small
    cluster's nearest neighbour is the largest one: on weak features one cluster chains across
    classes (digits with pixel noise 0.5: 1,341 of 1,797 images in one cluster). The size-aware
    affinity divides each directed term by the partner's size as well, A(C_x, C_y) =
    S[y, x] / (|C_x|^2 |C_y|) + S[x, y] / (|C_y|^2 |C_x|): the mean over all member pairs, which
    such a graph gives every pair of clusters alike. Eq 13 / 14 update S, so the updates hold.
  * A cluster without positive affinity merges into the cluster it shares the most kNN edge
    weight with per member of that cluster (the mean, not the total, which is largest for the
    largest cluster); likewise, at the cut, a cluster under ``min_size`` joins the large cluster of
    the most edge weight per member.

Initial clusters (Sec 3.6, "about 4 images" each): the authors' code (``agg_clustering.lua``,
``init``) follows each sample's chain of first nearest neighbours, i.e. it takes the connected
components of the 1-NN graph (we use scipy's ``connected_components``); its chains are cut after
50 steps, which we do not reproduce (a component is kept whole).

Partial unrolling (Sec 3.6): a period merges ceil(eta x n_c^s) times (n_c^s the clusters at its
start), never past the target n_c*: :func:`period_merges`. :func:`merge_clusters` runs one period
from given labels on a given graph; :func:`agglomerate` runs the whole forward pass on fixed
features (graph, initial clusters, merges down to the target).

Cost: the graph and S are sparse (n K_s entries); the loop keeps, per cluster, a hash map of its
neighbours' directed sums and its K_c best neighbours. Exact mode enumerates the edges around the
smaller side of each merge and relabels the smaller side, so a vertex is touched O(log n) times.
"""

from __future__ import annotations

import heapq
import math

import numba
import numpy as np
import scipy.sparse as sp
from numba import types
from numba.typed import Dict, List
from scipy.sparse.csgraph import connected_components

from ..errors import ConfigError, DataError
from .knn import topk_cosine

__all__ = [
    "MODES", "agglomerate", "small_cluster_floor", "cluster_affinity", "directed_knn_graph", "directed_sums",
    "initial_clusters", "merge_clusters", "period_merges",
]

MODES = ("exact", "eq19", "eq21")
_MODE_ID = {m: i for i, m in enumerate(MODES)}


# ----------------------------------------------------------------------------- graph, Eq 4

def _normalise(x) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def directed_knn_graph(features, k: int = 20, *, a: float = 1.0, backend: str = "faiss") -> sp.csr_matrix:
    """The directed kNN graph of JULE Eq 4 as an (n, n) CSR matrix with k entries per row.

    Rows of ``features`` are L2-normalised first; neighbours are exact cosine (= Euclidean on the
    sphere) neighbours, itself excluded. W(i, j) = exp(-d_ij / sigma^2), d_ij the squared
    distance, sigma^2 = a * mean of d_ij over all n k edges (JULE Eq 4, a = 1 in Table 2).
    """
    x = _normalise(features)
    n = x.shape[0]
    if not 1 <= k < n:
        raise DataError(f"K_s = {k} needs more than {k} samples, got {n}")
    if not a > 0:
        raise ConfigError(f"a must be > 0, got {a}")
    sims, idx = topk_cosine(x, x, k, exclude_self=True, backend=backend)
    d2 = np.maximum(2.0 - 2.0 * sims.astype(np.float64), 0.0)  # ||x_i - x_j||^2 on the unit sphere
    sigma2 = a * float(d2.mean())  # JULE Eq 4
    w = np.exp(-d2 / max(sigma2, 1e-12)) if sigma2 > 0 else np.ones_like(d2)
    rows = np.repeat(np.arange(n), k)
    return sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(n, n))


def initial_clusters(features, *, backend: str = "faiss") -> np.ndarray:
    """The initial over-clustering (JULE Sec 3.6, the authors' ``init``): connected components of
    the graph linking each L2-normalised sample to its first nearest neighbour. Labels 0..C-1."""
    x = _normalise(features)
    n = x.shape[0]
    if n < 2:
        raise DataError(f"initial clusters need at least 2 samples, got {n}")
    _, idx = topk_cosine(x, x, 1, exclude_self=True, backend=backend)
    g = sp.csr_matrix((np.ones(n), (np.arange(n), idx[:, 0])), shape=(n, n))
    return connected_components(g, directed=True, connection="weak")[1].astype(np.int64)


# ----------------------------------------------------------------------------- Eq 12, vectorised

def _check_graph(w, labels) -> tuple[sp.csr_matrix, np.ndarray]:
    if not sp.issparse(w) or w.shape[0] != w.shape[1]:
        raise DataError(f"the graph must be a square scipy.sparse matrix, got {type(w).__name__}")
    labels = np.asarray(labels)
    if labels.shape != (w.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"labels must be {w.shape[0]} integers, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError("labels must be >= 0")
    w = sp.csr_matrix(w, dtype=np.float64)
    if w.nnz and w.data.min() < 0:
        raise DataError("graph weights must be >= 0")
    return w, labels.astype(np.int64)


def _compact(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0..C-1 in order of each cluster's smallest member (canonical)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.ravel()]


def directed_sums(w, labels) -> sp.csr_matrix:
    """S[X, Y] = 1^T W_{Y,X} W_{X,Y} 1 = sum_{v in X} I[v, Y] O[v, Y] (JULE Eq 12 before the
    1/|Y|^2), as a sparse (C, C) matrix with a zero diagonal; labels must be 0..C-1."""
    w, labels = _check_graph(w, labels)
    n, c = labels.size, int(labels.max()) + 1 if labels.size else 0
    p = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, c))
    inflow = (w.T @ p).tocsr()  # I[v, Y]
    outflow = (w @ p).tocsr()  # O[v, Y]
    s = (p.T @ inflow.multiply(outflow)).tocsr()
    s.setdiag(0.0)
    s.eliminate_zeros()
    return s


def cluster_affinity(w, labels) -> sp.csr_matrix:
    """A(C_i, C_j) of JULE Eq 12 for all pairs, a symmetric sparse (C, C) matrix (zero diagonal):
    A(C_i, C_j) = S[j, i] / |C_i|^2 + S[i, j] / |C_j|^2."""
    s = directed_sums(w, labels)
    size = np.bincount(np.asarray(labels), minlength=s.shape[0]).astype(np.float64)
    d = s @ sp.diags(1.0 / np.maximum(size, 1.0) ** 2)  # D[X, Y] = A(X -> Y)
    return (d + d.T).tocsr()


# ----------------------------------------------------------------------------- compiled loop

_PAIR = types.UniTuple(types.float64, 2)


@numba.njit(cache=True)
def _build_adjacency(s_ptr, s_idx, s_val, t_ptr, t_idx, t_val, c):
    """adj[x][y] = (S[x, y], S[y, x]) for every pair with a non-zero sum either way."""
    adj = List()
    for x in range(c):
        d = Dict.empty(key_type=types.int64, value_type=_PAIR)
        for e in range(s_ptr[x], s_ptr[x + 1]):
            d[s_idx[e]] = (s_val[e], 0.0)
        for e in range(t_ptr[x], t_ptr[x + 1]):
            y = t_idx[e]
            if y in d:
                d[y] = (d[y][0], t_val[e])
            else:
                d[y] = (0.0, t_val[e])
        adj.append(d)
    return adj


@numba.njit(cache=True)
def _affinity(adj, size, x, y, sized):
    """A(C_x, C_y) = S[y, x] / |C_x|^2 + S[x, y] / |C_y|^2 (JULE Eq 12); ``sized`` (the head's
    size-aware affinity, ours): S[y, x] / (|C_x|^2 |C_y|) + S[x, y] / (|C_y|^2 |C_x|)."""
    p = adj[x][y]
    if not sized:
        return p[1] / (size[x] * size[x]) + p[0] / (size[y] * size[y])
    sx, sy = float(size[x]), float(size[y])
    return p[1] / (sx * sx * sy) + p[0] / (sy * sy * sx)


@numba.njit(cache=True)
def _rescan(adj, size, x, top_id, top_val, sized):
    """Cluster x's K_c best neighbours (descending affinity, ties to the lower id)."""
    top_id[x, :] = -1
    top_val[x, :] = 0.0
    for y in adj[x]:
        _offer(x, y, _affinity(adj, size, x, y, sized), top_id, top_val)


@numba.njit(cache=True)
def _offer(x, y, a, top_id, top_val):
    """Insert neighbour y with affinity a into x's sorted top list if it belongs there."""
    kc = top_id.shape[1]
    last = top_id[x, kc - 1]
    if last >= 0 and (a < top_val[x, kc - 1] or (a == top_val[x, kc - 1] and y > last)):
        return
    pos = kc - 1
    while pos > 0 and (top_id[x, pos - 1] < 0 or a > top_val[x, pos - 1]
                       or (a == top_val[x, pos - 1] and y < top_id[x, pos - 1])):
        top_id[x, pos] = top_id[x, pos - 1]
        top_val[x, pos] = top_val[x, pos - 1]
        pos -= 1
    top_id[x, pos] = y
    top_val[x, pos] = a


@numba.njit(cache=True)
def _loss(top_val, x, lam):
    """JULE Eq 7: -A1 - lambda / (K_c - 1) sum_{k >= 2} (A1 - A_k), missing neighbours at 0."""
    kc = top_val.shape[1]
    a1 = top_val[x, 0]
    if kc == 1:
        return -a1
    spread = 0.0
    for k in range(1, kc):
        spread += a1 - top_val[x, k]
    return -a1 - lam / (kc - 1) * spread


@numba.njit(cache=True)
def _cross_terms(o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, head, nxt, small, large,
                 acc, stamp, cross, touched):
    """X_i of JULE Eq 14 for every cluster i (into ``cross``, touched clusters listed):
    sum_{v in C_i} I[v, small] O[v, large] + I[v, large] O[v, small], enumerating the vertices
    that receive from or send to the smaller cluster."""
    n_touched = 0
    for part in range(2):
        # part 0: v receives from `small` (I[v, small] accumulated), O[v, large] read from v's out-edges
        # part 1: v sends to `small` (O[v, small] accumulated), I[v, large] read from v's in-edges
        ptr, idx, wt = (o_ptr, o_idx, o_w) if part == 0 else (i_ptr, i_idx, i_w)
        optr, oidx, owt = (o_ptr, o_idx, o_w) if part == 0 else (i_ptr, i_idx, i_w)
        verts = []
        u = head[small]
        while u >= 0:
            for e in range(ptr[u], ptr[u + 1]):
                v = idx[e]
                if label[v] == small or label[v] == large:
                    continue
                if stamp[v] != part + 1:
                    stamp[v] = part + 1
                    acc[v] = 0.0
                    verts.append(v)
                acc[v] += wt[e]
            u = nxt[u]
        for v in verts:
            other = 0.0  # O[v, large] (part 0: v's out-edges) or I[v, large] (part 1: v's in-edges)
            for e in range(optr[v], optr[v + 1]):
                if label[oidx[e]] == large:
                    other += owt[e]
            stamp[v] = 0
            if other > 0.0:
                ci = label[v]
                if cross[ci] == 0.0:
                    touched[n_touched] = ci
                    n_touched += 1
                cross[ci] += acc[v] * other
    return n_touched


@numba.njit(cache=True)
def _merged_pairs(adj, size, keep, gone, mode, alpha, cross, touched, n_touched):
    """The neighbour map of C_keep u C_gone: (S[m', i], S[i, m']) by Eq 13 and Eq 14 / 19 / 21."""
    new = Dict.empty(key_type=types.int64, value_type=_PAIR)
    sk, sg = float(size[keep]), float(size[gone])
    for src in (keep, gone):
        for y in adj[src]:
            if y == keep or y == gone:
                continue
            p = adj[src][y]
            q = new[y] if y in new else (0.0, 0.0)
            if mode == 1:  # Eq 19: A(i -> m') = |m| A(i -> m) / (|m|+|n|) + |n| A(i -> n) / (|m|+|n|)
                into = q[1] + (sk + sg) * p[1] / (sk if src == keep else sg)
            else:  # Eq 14 without its cross term (exact mode adds it below), Eq 21 scales it
                into = q[1] + p[1] * (1.0 + alpha if mode == 2 else 1.0)
            new[y] = (q[0] + p[0], into)  # Eq 13: S[m', i] = S[m, i] + S[n, i]
    for t in range(n_touched):
        y = touched[t]
        q = new[y] if y in new else (0.0, 0.0)
        new[y] = (q[0], q[1] + cross[y])  # Eq 14's cross term
        cross[y] = 0.0
    return new


@numba.njit(cache=True)
def _refresh(adj, size, x, changed, gone_a, gone_b, top_id, top_val, lam, heap, version, sized):
    """After a merge: x's top list and loss, rescanned only if it held a merged cluster."""
    kc = top_id.shape[1]
    held = False
    for k in range(kc):
        if top_id[x, k] == gone_a or top_id[x, k] == gone_b:
            held = True
    if held:
        _rescan(adj, size, x, top_id, top_val, sized)
    else:
        a = _affinity(adj, size, x, changed, sized)
        if top_id[x, kc - 1] >= 0 and a < top_val[x, kc - 1]:
            return
        _offer(x, changed, a, top_id, top_val)
    version[x] += 1
    if top_id[x, 0] >= 0:
        heapq.heappush(heap, (_loss(top_val, x, lam), x, version[x]))


@numba.njit(cache=True)
def _edge_partner(o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, head, nxt, x, acc, size, sized):
    """The cluster x shares the most kNN edge weight with (both directions; ``sized``: the most per
    member of that cluster, so that its size alone does not draw x), or -1 if none."""
    best, best_w = -1, 0.0
    for ptr, idx, wt in ((o_ptr, o_idx, o_w), (i_ptr, i_idx, i_w)):
        u = head[x]
        while u >= 0:
            for e in range(ptr[u], ptr[u + 1]):
                y = label[idx[e]]
                if y != x:
                    acc[y] += wt[e]
            u = nxt[u]
    for y in range(acc.shape[0]):
        a = acc[y] / size[y] if sized and acc[y] > 0.0 else acc[y]
        if a > best_w:
            best, best_w = y, a
        acc[y] = 0.0
    return best


@numba.njit(cache=True)
def _pop_isolated(iso, adj, alive, o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, head, nxt, acc, size, sized):
    """The lowest-id live cluster without positive affinity that shares kNN edges with another
    cluster, and that cluster; (-1, -1) if none. A cluster sharing no edge at all (a closed kNN
    component) stays so and is dropped from the queue."""
    while len(iso) > 0:
        x = heapq.heappop(iso)
        if alive[x] and len(adj[x]) == 0:
            y = _edge_partner(o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, head, nxt, x, acc, size, sized)
            if y >= 0:
                return x, y
    return -1, -1


@numba.njit(cache=True)
def _smallest_pair(size, alive):
    """The two smallest live clusters (size, then id): the last resort, closed components only."""
    x, y = -1, -1
    for z in range(size.shape[0]):
        if not alive[z]:
            continue
        if x < 0 or size[z] < size[x]:
            x, y = z, x
        elif y < 0 or size[z] < size[y]:
            y = z
    return x, y


@numba.njit(cache=True)
def _pop_best(heap, alive, version, top_id):
    """The cluster of least Eq 7 loss (stale heap entries skipped), or -1 if none is left."""
    while len(heap) > 0:
        _, cand, ver = heapq.heappop(heap)
        if alive[cand] and version[cand] == ver and top_id[cand, 0] >= 0:
            return cand
    return -1


@numba.njit(cache=True)
def _absorb(label, head, nxt, size, alive, keep, gone):
    """Members of C_gone join C_keep: relabel them (the smaller side) and link the lists."""
    u = head[gone]
    last = u
    while u >= 0:
        label[u] = keep
        last = u
        u = nxt[u]
    nxt[last] = head[keep]
    head[keep] = head[gone]
    head[gone] = -1
    size[keep] += size[gone]
    size[gone] = 0
    alive[gone] = False


@numba.njit(cache=True)
def _install(adj, new, size, keep, gone, top_id, top_val, lam, heap, version, sized):
    """The merged cluster's neighbour map replaces both old ones, mirrored in every neighbour's
    map; then the losses that changed go on the heap."""
    for y in adj[gone]:  # every old neighbour is a key of `new`: its `keep` entry is rewritten below
        if y != keep:
            adj[y].pop(gone)
    adj[gone] = Dict.empty(key_type=types.int64, value_type=_PAIR)
    adj[keep] = new
    for y in new:
        p = new[y]
        adj[y][keep] = (p[1], p[0])
    version[gone] += 1
    for y in new:
        _refresh(adj, size, y, keep, keep, gone, top_id, top_val, lam, heap, version, sized)
    _rescan(adj, size, keep, top_id, top_val, sized)
    version[keep] += 1
    if top_id[keep, 0] >= 0:
        heapq.heappush(heap, (_loss(top_val, keep, lam), keep, version[keep]))


@numba.njit(cache=True)
def _merge_loop(o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, s_ptr, s_idx, s_val, t_ptr, t_idx,
                t_val, c, n_merges, kc, lam, mode, alpha, sized):
    """Greedy merges by JULE Eq 7 (numba). ``label`` is updated in place; returns the merge record
    (kept slot, absorbed slot) per timestep."""
    n = label.shape[0]
    adj = _build_adjacency(s_ptr, s_idx, s_val, t_ptr, t_idx, t_val, c)
    size = np.zeros(c, np.int64)
    head = np.full(c, -1, np.int64)
    nxt = np.full(n, -1, np.int64)
    for v in range(n - 1, -1, -1):  # linked member lists
        nxt[v] = head[label[v]]
        head[label[v]] = v
        size[label[v]] += 1
    alive = size > 0
    top_id = np.full((c, kc), -1, np.int64)
    top_val = np.zeros((c, kc))
    version = np.zeros(c, np.int64)
    heap = [(0.0, np.int64(0), np.int64(0))]
    heap.pop()
    for x in range(c):
        _rescan(adj, size, x, top_id, top_val, sized)
        if top_id[x, 0] >= 0:
            heap.append((_loss(top_val, x, lam), np.int64(x), np.int64(0)))
    heapq.heapify(heap)
    iso = [np.int64(x) for x in range(c) if alive[x] and len(adj[x]) == 0]  # ascending: a heap
    acc = np.zeros(n)  # per vertex, for the cross terms
    shared = np.zeros(c)  # per cluster, for the fallback
    stamp = np.zeros(n, np.int64)
    cross = np.zeros(c)
    touched = np.empty(c, np.int64)
    record = np.empty((n_merges, 2), np.int64)
    for t in range(n_merges):
        x, y = _pop_isolated(iso, adj, alive, o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, head,
                             nxt, shared, size, sized)
        if x < 0:
            x = _pop_best(heap, alive, version, top_id)
            y = top_id[x, 0] if x >= 0 else -1
        if x < 0:
            x, y = _smallest_pair(size, alive)
        if y < 0:
            return record[:t], adj
        keep, gone = (x, y) if (size[x] > size[y] or (size[x] == size[y] and x < y)) else (y, x)
        n_touched = 0
        if mode == 0:
            n_touched = _cross_terms(o_ptr, o_idx, o_w, i_ptr, i_idx, i_w, label, head, nxt, gone,
                                     keep, acc, stamp, cross, touched)
        new = _merged_pairs(adj, size, keep, gone, mode, alpha, cross, touched, n_touched)
        _absorb(label, head, nxt, size, alive, keep, gone)
        _install(adj, new, size, keep, gone, top_id, top_val, lam, heap, version, sized)
        if len(adj[keep]) == 0:
            heapq.heappush(iso, keep)
        record[t, 0], record[t, 1] = keep, gone
    return record, adj


@numba.njit(cache=True)
def _dump(adj, c):
    """The loop's directed sums S[x, y] as COO arrays (for tests of the incremental updates)."""
    rows, cols, vals = [], [], []
    for x in range(c):
        for y in adj[x]:
            rows.append(x)
            cols.append(y)
            vals.append(adj[x][y][0])
    return np.array(rows, np.int64), np.array(cols, np.int64), np.array(vals, np.float64)


@numba.njit(cache=True)
def _large_counts(record, size0, min_size):
    """Clusters of at least ``min_size`` images after each prefix of the merge record:
    counts[t] after t merges (one merge changes it by -1, 0 or +1)."""
    size = size0.copy()
    counts = np.empty(record.shape[0] + 1, np.int64)
    count = 0
    for x in range(size.shape[0]):
        if size[x] >= min_size:
            count += 1
    counts[0] = count
    for t in range(record.shape[0]):
        keep, gone = record[t, 0], record[t, 1]
        count -= (size[keep] >= min_size) + (size[gone] >= min_size)
        size[keep] += size[gone]
        size[gone] = 0
        count += size[keep] >= min_size
        counts[t + 1] = count
    return counts


def _replay(labels: np.ndarray, record: np.ndarray) -> np.ndarray:
    """The compacted ``labels`` after the merges of ``record`` (pairs of label ids)."""
    c = int(labels.max()) + 1
    g = sp.csr_matrix((np.ones(len(record)), (record[:, 0], record[:, 1])), shape=(c, c))
    return connected_components(g, directed=False)[1][labels].astype(np.int64)


def _absorb_small(w: sp.csr_matrix, labels: np.ndarray, min_size: int, per_member: bool = False) -> np.ndarray:
    """Clusters under ``min_size`` join the large cluster they share the most kNN edge weight with
    (both directions; ``per_member``: the most per member of the large cluster, the mean, so that
    size alone does not draw them to the largest), in rounds (a small cluster touching only small
    ones waits for them); small clusters that never touch a large one join the largest cluster."""
    labels = labels.copy()
    sym = (w + w.T).tocsr()
    while True:
        size = np.bincount(labels)
        small = np.flatnonzero((size > 0) & (size < min_size))
        large = np.flatnonzero(size >= min_size)
        if small.size == 0 or large.size == 0:
            return _compact(labels)
        p = sp.csr_matrix((np.ones(labels.size), (np.arange(labels.size), labels)), shape=(labels.size, size.size))
        shared = (p[:, small].T @ sym @ p[:, large]).tocsr()  # edge weight small -> large, summed
        if per_member:
            shared = (shared @ sp.diags(1.0 / size[large])).tocsr()  # ... per member of the large one
        touch = np.flatnonzero(np.diff(shared.indptr) > 0)
        if touch.size == 0:
            to = np.full(size.size, -1, np.int64)
            to[small] = large[np.argmax(size[large])]
        else:
            to = np.full(size.size, -1, np.int64)
            to[small[touch]] = large[np.asarray(shared[touch].argmax(axis=1)).ravel()]
        moved = to[labels] >= 0
        labels[moved] = to[labels[moved]]


def _cut_with_small(w, lab, record, n_target, min_size, per_member=False):
    """JULE's partition of ``n_target`` clusters with small clusters set aside: the last point of
    the merge sequence with exactly ``n_target`` clusters of at least ``min_size`` images, the
    smaller ones then absorbed (:func:`_absorb_small`, ``per_member`` as there); None if no point of
    the sequence has ``n_target`` large clusters."""
    counts = _large_counts(record, np.bincount(lab).astype(np.int64), int(min_size))
    hits = np.flatnonzero(counts == n_target)
    if hits.size == 0:
        return None
    return _absorb_small(w, _replay(lab, record[: hits[-1]]), int(min_size), per_member)


# ----------------------------------------------------------------------------- entry points

def small_cluster_floor(n_images: int, n_target: int, fraction: float) -> int:
    """The size under which a cluster of the final partition counts as outlying (``min_size`` of
    :func:`merge_clusters`): ``fraction`` of the mean cluster size n / n_c*, at least 2; 0 turns
    the rule off (the paper's plain cut)."""
    if fraction < 0:
        raise ConfigError(f"the small-cluster fraction must be >= 0, got {fraction}")
    return max(2, math.ceil(fraction * n_images / max(n_target, 1))) if fraction > 0 else 0


def period_merges(n_clusters: int, eta: float, n_target: int) -> int:
    """Timesteps of one partially unrolled period (JULE Sec 3.6): ceil(eta x n_c^s), never past
    the target n_c*."""
    if not 0 < eta <= 1:
        raise ConfigError(f"the unrolling rate eta must be in (0, 1], got {eta}")
    return max(0, min(math.ceil(eta * n_clusters), n_clusters - n_target))


def merge_clusters(w, labels, n_merges: int, *, k_c: int = 5, lam: float = 1.0, mode: str = "exact",
                   alpha: float = 0.0, min_size: int = 0, return_record: bool = False,
                   return_sums: bool = False, size_aware: bool = False):
    """``n_merges`` greedy merges (JULE Eq 7) of the clusters ``labels`` on the directed graph
    ``w``, the affinities updated after each merge by Eq 13 and Eq 14 (``mode="exact"``) or the
    approximations Eq 19 / Eq 21 (``"eq19"``, ``"eq21"`` with ``alpha``). Returns the new labels,
    0..C'-1 numbered by each cluster's smallest member; with ``return_record`` also the (kept,
    absorbed) pairs of each timestep, as ids of the input's compacted labels; with
    ``return_sums`` also the directed sums S (``directed_sums``) as the loop updated them, in the
    numbering of the returned labels (the tests compare them with a recomputation).

    ``min_size`` > 1 (ours; the paper is silent on outliers): the merges go on past the request
    and the partition is cut where exactly C - ``n_merges`` clusters have at least ``min_size``
    images; each smaller cluster then joins the large one it shares the most kNN edge weight with.
    Greedy Eq 7 never picks a tiny cluster whose affinities are all near 0 (a few outlying images
    that nothing points back to), so on large data such clusters survive to the end while the
    real ones are merged into one (Fashion-MNIST, 70,000 images: one cluster of 69,976 and nine of
    2-5 without it). Not combined with ``return_record`` / ``return_sums``.

    ``size_aware`` (ours, the agglomerative cluster head; JULE's training keeps it off): the size-aware
    affinity, fallback and absorption of the module docstring, so that a large cluster does not
    draw the others by its size alone."""
    w, labels = _check_graph(w, labels)
    if min_size > 1 and (return_record or return_sums):
        raise ConfigError("min_size cannot be combined with return_record or return_sums")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if k_c < 1 or lam < 0:
        raise ConfigError(f"K_c must be >= 1 and lambda >= 0, got K_c = {k_c}, lambda = {lam}")
    lab = _compact(labels)
    c = int(lab.max()) + 1 if lab.size else 0
    if mode == "eq21" and not alpha > -1:
        raise ConfigError(f"Eq 21 needs alpha > -1, got {alpha}")
    if not 0 <= n_merges <= max(c - 1, 0):
        raise ConfigError(f"{n_merges} merges impossible with {c} clusters")
    s = directed_sums(w, lab)
    st = s.T.tocsr()
    wt = w.T.tocsr()
    slots = lab.copy()
    with_small = min_size > 1 and n_merges > 0
    record, adj = _merge_loop(w.indptr.astype(np.int64), w.indices.astype(np.int64), w.data,
                         wt.indptr.astype(np.int64), wt.indices.astype(np.int64), wt.data, slots,
                         s.indptr.astype(np.int64), s.indices.astype(np.int64), s.data,
                         st.indptr.astype(np.int64), st.indices.astype(np.int64), st.data,
                         c, c - 1 if with_small else int(n_merges), int(k_c), float(lam),
                         _MODE_ID[mode], float(alpha), bool(size_aware))
    if with_small:
        out = _cut_with_small(w, lab, record, c - int(n_merges), min_size, size_aware)
        return _compact(_replay(lab, record[:n_merges])) if out is None else out
    out = _compact(slots)
    extra = []
    if return_record:
        extra.append(record)
    if return_sums:
        rows, cols, vals = _dump(adj, c)
        to_out = np.full(c, -1, np.int64)
        to_out[slots] = out  # slot of each surviving cluster -> its output label
        k = int(out.max()) + 1 if out.size else 0
        extra.append(sp.csr_matrix((vals, (to_out[rows], to_out[cols])), shape=(k, k)))
    return (out, *extra) if extra else out


def agglomerate(features, n_target: int, *, k_s: int = 20, a: float = 1.0, k_c: int = 5,
                lam: float = 1.0, mode: str = "exact", alpha: float = 0.0, min_size: int = 0,
                labels=None, backend: str = "faiss", size_aware: bool = False) -> np.ndarray:
    """JULE's whole forward pass on fixed features: the graph of Eq 4, the initial clusters
    (unless ``labels`` are given), then greedy merges down to ``n_target`` clusters (small
    clusters set aside by ``min_size``; ``size_aware``: :func:`merge_clusters`)."""
    x = _normalise(features)
    w = directed_knn_graph(x, k_s, a=a, backend=backend)
    lab = initial_clusters(x, backend=backend) if labels is None else np.asarray(labels)
    c = np.unique(lab).size
    if not 1 <= n_target <= c:
        raise ConfigError(f"target of {n_target} clusters out of range for {c} initial clusters")
    return merge_clusters(w, lab, c - n_target, k_c=k_c, lam=lam, mode=mode, alpha=alpha,
                          min_size=min_size, size_aware=size_aware)
