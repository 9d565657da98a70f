"""Strongly connected subgraphs (SCS) of a kNN affinity graph: PAD's affinity diffusion.

PAD ("Unsupervised Deep Learning via Affinity Diffusion", Zhang et al., AAAI 2020), section
"Affinity Diffusion across Neighbourhoods" and Fig 3. The authors published no code; this is a
first public implementation, so every point the paper leaves open is settled here, with the reason.

The graph (PAD Eq 1). ``neighbours`` is an (N, k) integer array: row i lists the k most
cosine-similar other samples of x_i, nearest first, and gives the directed edges i -> j. The row
order is what "nearest neighbours first" means. Entries of -1 mean "no edge" (short rows,
hand-built graphs); a repeated entry is harmless (the second is already visited). A row listing its
own index is rejected (``DataError``): Eq 1 ranks x_i among the *other* samples, and a kNN array
that kept the anchor at column 0 would silently run with k - 1 neighbours.

The search, as the paper describes it (each item: the text, then what we do):
  1. "Starting with a random vertex x_s": starts are taken in the order given by ``order`` (a
     permutation; the caller draws it from its seeded generator, so runs are reproducible); by
     default 0, 1, ..., N-1.
  2. "traverse the vertices along edges in a depth-first search strategy", "nearest neighbours with
     the highest priority", "each vertex can be visited only one time": an iterative DFS from the
     start, following each row left to right, each vertex visited at most once per search; vertices
     already in an SCS are gone from the graph and never visited.
  3. The cyclic constraint: "one cycle that loops back to the start vertex x_s is necessary, whilst
     any other cycles allow to exclude x_s as long as partly overlapped with the former". The union
     of a cycle through x_s and of cycles chained onto it is exactly the set of explored vertices
     that reach x_s again through explored vertices: the strongly connected component of x_s in the
     subgraph the search explored (what the paper's "Tarjan framework" yields). That set is the SCS;
     if it is x_s alone the search found nothing.
  4. The scale threshold s ("an operational size threshold s on SCS"): a search visits at most s
     vertices, so every SCS has at most s members and each one is strongly connected through its own
     edges. An over-size strongly connected region is thereby cut into pieces of at most s. Rejected
     alternatives: dropping components larger than s (dense, easy regions would then yield nothing);
     truncating a component to its first s vertices (the result is no longer strongly connected);
     growing the SCS until it has s members with an unbounded DFS (a failing start re-traverses a
     giant component: the paper's O(N^2) worst case, minutes per epoch at ImageNet scale).
     Consequence, by construction: a directed cycle longer than s gives no SCS at all.
  5. A search only follows edges that stay inside the start's strongly connected component of the
     whole graph. A vertex outside it can never lie on a cycle through the start, so without s this
     changes nothing (the literal search would enter it and backtrack); with s it keeps the visit
     budget for vertices that can come back. A component of at most s vertices is therefore always
     found whole (and is assigned directly, without a search).
  6. "we remove all the vertices of a SCS once found from G ... This process repeats until no SCS
     exists": found SCS are removed; a start whose search failed stays in the graph (a later search
     may take it in), and the start order is swept again until a whole sweep finds no SCS (with the
     budget, a retry can succeed once removals have changed what the DFS reaches).
  7. "a number of isolated vertices are likely left": they stay single, each its own group
     ("we treat individual samples as special SCS structures each with one sample", Eq 3).

Ablations (PAD Tables 3, 4, 6):
  * ``max_size=None``: no scale constraint. The result is then the strongly connected components of
    the whole graph (with 2 or more members), independent of the start order; computed by one Tarjan
    pass in O(N k).
  * ``cyclic=False``: no cyclic constraint. The paper uses the constraint to "detect erroneous
    affinity diffusion" (Fig 5), so without it the diffusion is accepted as it spreads: the group of
    a start is every vertex its (budgeted) DFS reached, whether or not it leads back; not confined
    to strongly connected components (there is no cycle to wait for).
  * Diffusion off (Table 3: "C(x) replaced by its k-nearest neighbours", k = 10): not a partition;
    :func:`neighbourhood_members` gives the same (members, mask) format from the kNN rows.

Output: one int64 group id per vertex, contiguous 0..G-1, groups numbered by their smallest vertex
(canonical: independent of the order in which they were found); single vertices have their own id.
``np.bincount(groups)`` gives group sizes; :func:`group_members` gives each vertex's padded member
list for the loss (Eq 3 needs C(x_i), "the samples of the SCS structure including x_i").

Cost: the (N, k) array as int32 (and a copy confined to components), a few int32 arrays of length N
(the searches read one of them, a visit stamp per vertex, so stamps need no reset between searches),
per-search buffers of s * k entries; no N x N matrix. Time: O(N k) for the components (Tarjan) plus
O(sweeps * N * s * k) for the searches, in practice 2 or 3 sweeps; all in numba, single thread,
deterministic. ``benchmarks/scs_search.py`` measures it beside scipy's components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numba
import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "SCSQuality", "group_members", "neighbourhood_members", "scs_quality",
    "strongly_connected_subgraphs",
]


# ----------------------------------------------------------------------------- compiled kernels

_GONE = np.iinfo(np.int32).max  # stamp of a vertex that is in an SCS (or can never join one)


@numba.njit(cache=True)
def _tarjan(nbr):
    """Strongly connected components (Tarjan 1972), iterative; returns (component id, count).
    One array ``num`` holds the DFS index of a vertex on Tarjan's stack, -1 before its visit and
    INT32_MAX once its component is out, so each edge costs one random read."""
    n, k = nbr.shape
    done = np.iinfo(np.int32).max
    num = np.full(n, -1, np.int32)
    low = np.empty(n, np.int32)
    comp = np.empty(n, np.int32)
    stack = np.empty(n, np.int32)  # Tarjan's stack of vertices not yet in a component
    call_v = np.empty(n, np.int32)  # explicit DFS call stack: vertex, next edge
    call_e = np.empty(n, np.int32)
    counter, top, n_comp = 0, 0, 0
    for root in range(n):
        if num[root] >= 0:
            continue
        num[root] = low[root] = counter
        counter += 1
        stack[top] = root
        top += 1
        depth = 0
        call_v[0], call_e[0] = root, 0
        while depth >= 0:
            v, e = call_v[depth], call_e[depth]
            if e < k:
                call_e[depth] = e + 1
                w = nbr[v, e]
                if w < 0:
                    continue
                nw = num[w]
                if nw < 0:
                    num[w] = low[w] = counter
                    counter += 1
                    stack[top] = w
                    top += 1
                    depth += 1
                    call_v[depth], call_e[depth] = w, 0
                elif nw < low[v]:  # on the stack (a finished component has num = INT32_MAX)
                    low[v] = nw
                continue
            if low[v] == num[v]:  # v roots a component: pop it
                while True:
                    top -= 1
                    w = stack[top]
                    num[w] = done
                    comp[w] = n_comp
                    if w == v:
                        break
                n_comp += 1
            depth -= 1
            if depth >= 0 and low[v] < low[call_v[depth]]:
                low[call_v[depth]] = low[v]
    return comp, n_comp


@numba.njit(cache=True)
def _confine(nbr, comp):
    """A copy of the graph without the edges that leave a strongly connected component (item 5)."""
    n, k = nbr.shape
    out = np.empty_like(nbr)
    for v in range(n):
        for e in range(k):
            w = nbr[v, e]
            out[v, e] = w if w >= 0 and comp[w] == comp[v] else -1
    return out


@numba.njit(cache=True)
def _budgeted_dfs(nbr, r, budget, stamp, base, vis, call_v, call_e):
    """PAD Fig 3: depth-first from r, nearest first, each vertex once, at most ``budget`` vertices.
    stamp[w] >= base means w is gone or already visited by this search; a visit sets it to
    base + its preorder position. Fills vis[:count]; returns count."""
    k = nbr.shape[1]
    stamp[r], vis[0] = base, r
    count, depth = 1, 0
    call_v[0], call_e[0] = r, 0
    while depth >= 0 and count < budget:
        v, e = call_v[depth], call_e[depth]
        if e == k:
            depth -= 1
            continue
        call_e[depth] = e + 1
        w = nbr[v, e]
        if w < 0 or stamp[w] >= base:
            continue
        stamp[w], vis[count] = base + count, w
        count += 1
        depth += 1
        call_v[depth], call_e[depth] = w, 0
    return count


@numba.njit(cache=True)
def _back_to_start(nbr, vis, count, stamp, base, head, adj, queue, mark):
    """PAD cyclic constraint: mark the explored vertices (by preorder position) that reach the start
    (position 0) through explored vertices: a reverse BFS on the explored subgraph.
    Returns how many (the start included)."""
    k = nbr.shape[1]
    head[: count + 1] = 0
    for i in range(count):  # in-edges per explored vertex, counted, then placed (CSR)
        for e in range(k):
            w = nbr[vis[i], e]
            if w >= 0 and 0 <= stamp[w] - base < count:
                head[stamp[w] - base + 1] += 1
    for i in range(count):
        head[i + 1] += head[i]
    fill = head[:count].copy()
    for i in range(count):
        for e in range(k):
            w = nbr[vis[i], e]
            if w >= 0 and 0 <= stamp[w] - base < count:
                j = stamp[w] - base
                adj[fill[j]] = i
                fill[j] += 1
    mark[:count] = False
    mark[0], queue[0] = True, 0
    q_head, q_tail = 0, 1
    while q_head < q_tail:
        j = queue[q_head]
        q_head += 1
        for p in range(head[j], head[j + 1]):
            if not mark[adj[p]]:
                mark[adj[p]] = True
                queue[q_tail] = adj[p]
                q_tail += 1
    return q_tail


@numba.njit(cache=True)
def _settle_small_components(comp, comp_size, budget, group, stamp):
    """Item 5: a component of 2..s vertices is found whole by its first start; assign it directly.
    Vertices of components of at most s are marked gone: never a start, never reached (the edges
    are confined to components). Returns the number of groups made."""
    comp_group = np.full(comp_size.shape[0], -1, np.int32)
    n_groups = 0
    for v in range(comp.shape[0]):
        c = comp[v]
        if comp_size[c] <= budget:
            stamp[v] = _GONE
            if comp_size[c] >= 2:
                if comp_group[c] < 0:
                    comp_group[c] = n_groups
                    n_groups += 1
                group[v] = comp_group[c]
    return n_groups


@numba.njit(cache=True)
def _search(nbr, comp, comp_size, order, budget, cyclic, stamp_limit):
    """Sweeps of budgeted searches until one finds no SCS (items 1-6 of the module docstring).
    With ``cyclic``, ``nbr`` must already be confined to components. ``stamp_limit``: stamps are
    recycled before reaching it (INT32_MAX; smaller only in tests). Returns (raw SCS id or -1 per
    vertex, number of sweeps)."""
    n, k = nbr.shape
    group = np.full(n, -1, np.int32)
    stamp = np.full(n, -1, np.int32)  # the one per-vertex array the searches read
    n_groups = _settle_small_components(comp, comp_size, budget, group, stamp) if cyclic else 0
    vis, call_v, call_e = np.empty(budget, np.int32), np.empty(budget, np.int32), \
        np.empty(budget, np.int32)
    head, queue, mark = np.empty(budget + 1, np.int32), np.empty(budget, np.int32), \
        np.empty(budget, np.bool_)
    adj = np.empty(budget * k if cyclic else 0, np.int32)
    base, sweeps, found = 0, 0, True
    while found:
        found, sweeps = False, sweeps + 1
        for t in range(n):
            r = order[t]
            if stamp[r] == _GONE:
                continue
            if base > stamp_limit - budget:  # stamps about to overflow: forget old searches
                for v in range(n):
                    if stamp[v] != _GONE:
                        stamp[v] = -1
                base = 0
            count = _budgeted_dfs(nbr, r, budget, stamp, base, vis, call_v, call_e)
            this, base = base, base + count  # later searches stamp above every stamp of this one
            if count < 2 or (cyclic and _back_to_start(nbr, vis, count, stamp, this, head, adj,
                                                       queue, mark) < 2):
                continue  # nothing reached, or nothing leads back to r: r stays in the graph
            for i in range(count):
                if not cyclic or mark[i]:
                    group[vis[i]], stamp[vis[i]] = n_groups, _GONE
            n_groups += 1
            found = True
    return group, sweeps


@numba.njit(cache=True)
def _canonical_ids(raw):
    """Group ids 0..G-1 numbered by smallest member; raw -1 (single vertex) gets its own id."""
    n = raw.shape[0]
    out = np.empty(n, np.int64)
    remap = np.full(n + 1, -1, np.int64)
    nxt = 0
    for v in range(n):
        g = raw[v]
        if g < 0:
            out[v] = nxt
            nxt += 1
        else:
            if remap[g] < 0:
                remap[g] = nxt
                nxt += 1
            out[v] = remap[g]
    return out


# ----------------------------------------------------------------------------- public functions


def _check_neighbours(neighbours) -> np.ndarray:
    """Validate an (N, k) neighbour-index array; return it as C-contiguous int32."""
    a = np.asarray(neighbours)
    if a.ndim != 2:
        raise DataError(f"neighbours must be an (N, k) array, got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"neighbours must hold integer vertex indices, got dtype {a.dtype}")
    n = a.shape[0]
    if n >= np.iinfo(np.int32).max:
        raise DataError(f"graph of {n} vertices is too large (at most 2^31 - 2)")
    if a.size and (a.min() < -1 or a.max() >= n):
        raise DataError(f"neighbour indices must be in [0, {n}) or -1 (no edge); "
                        f"found {int(a.min())}..{int(a.max())}")
    self_rows = np.flatnonzero((a == np.arange(n)[:, None]).any(axis=1))
    if self_rows.size:
        raise DataError(f"vertex {int(self_rows[0])} lists itself as a neighbour "
                        f"({self_rows.size} rows do); PAD Eq 1 ranks the other samples only")
    return np.ascontiguousarray(a, dtype=np.int32)


def _check_order(order, n: int) -> np.ndarray:
    if order is None:
        return np.arange(n, dtype=np.int32)
    o = np.asarray(order)
    if o.shape != (n,) or not np.issubdtype(o.dtype, np.integer) or o.dtype == np.bool_:
        raise DataError(f"order must be a permutation of the {n} vertices, got shape {o.shape}")
    if n and (o.min() < 0 or o.max() >= n or (np.bincount(o, minlength=n) != 1).any()):
        raise DataError(f"order must be a permutation of the {n} vertices (each exactly once)")
    return np.ascontiguousarray(o, dtype=np.int32)


def _check_max_size(max_size) -> int | None:
    if max_size is None:
        return None
    if isinstance(max_size, (bool, np.bool_)) or not isinstance(max_size, (int, np.integer)) \
            or max_size < 1:
        raise ConfigError(f"max_size (PAD's scale threshold s) must be an integer >= 1 or None, "
                          f"got {max_size!r}")
    return int(max_size)


def search_scs(neighbours, max_size: int | None = 10, cyclic: bool = True, order=None) -> tuple[np.ndarray, int]:
    """The validated search of :func:`strongly_connected_subgraphs` before its ids are made
    canonical: (raw SCS id per vertex or -1, sweeps over the start order)."""
    nbr = _check_neighbours(neighbours)
    s = _check_max_size(max_size)
    if not isinstance(cyclic, (bool, np.bool_)):
        raise ConfigError(f"cyclic must be True or False, got {cyclic!r}")
    n = nbr.shape[0]
    starts = _check_order(order, n)
    if n == 0:
        return np.empty(0, np.int32), 0
    budget = n if s is None else min(s, n)
    if not cyclic:  # reachability groups: no components needed
        return _search(nbr, np.zeros(n, np.int32), np.full(1, n, np.int32), starts, budget,
                       False, _GONE)
    comp, n_comp = _tarjan(nbr)
    sizes = np.bincount(comp, minlength=n_comp).astype(np.int32)
    if s is None:  # no scale constraint: the components themselves (see "Ablations" above)
        return np.where(sizes[comp] >= 2, comp, -1).astype(np.int32), 1
    return _search(_confine(nbr, comp), comp, sizes, starts, budget, True, _GONE)


def strongly_connected_subgraphs(neighbours, *, max_size: int | None = 10, cyclic: bool = True,
                                 order=None) -> np.ndarray:
    """PAD's SCS search (section "Affinity Diffusion across Neighbourhoods", Fig 3).

    neighbours: (N, k) int, row i = the k nearest other samples of i, nearest first (PAD Eq 1);
      -1 = no edge. max_size: the scale threshold s (None: no scale constraint). cyclic: the cyclic
      constraint (False: a group is whatever the diffusion reached). order: permutation giving the
      start vertices (default 0..N-1).
    Returns (N,) int64 group ids 0..G-1, numbered by smallest member; every vertex outside an SCS
    has a group of its own. The module docstring defines the search exactly.
    """
    raw, _ = search_scs(neighbours, max_size, cyclic, order)
    return _canonical_ids(raw)


def _check_groups(groups) -> np.ndarray:
    g = np.asarray(groups)
    if g.ndim != 1 or not np.issubdtype(g.dtype, np.integer) or g.dtype == np.bool_:
        raise DataError(f"groups must be a 1-D integer array, got shape {g.shape} dtype {g.dtype}")
    if g.size and g.min() < 0:
        raise DataError("groups must be non-negative ids (every vertex belongs to a group)")
    return g.astype(np.int64, copy=False)


def group_members(groups, max_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each vertex's group as a padded row, for PAD Eq 3's C(x_i) ("including x_i").

    Returns members (N, M) int64 and mask (N, M) bool, M = ``max_size`` or the largest group size.
    Row i holds i first, then the other members of its group (ascending, except that the member
    displaced by i takes i's place); padding repeats i (always a valid index) with mask False.
    """
    g = _check_groups(groups)
    n = g.shape[0]
    sizes = np.bincount(g) if n else np.zeros(0, np.int64)
    width = int(sizes.max()) if n else 1
    if max_size is not None:
        if int(max_size) < width:
            raise DataError(f"a group has {width} members, more than max_size={max_size}")
        width = int(max_size)
    by_group = np.argsort(g, kind="stable")  # vertices grouped, ascending within each group
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n else sizes
    pos = np.empty(n, np.int64)
    pos[by_group] = np.arange(n) - start[g[by_group]]  # rank of each vertex inside its group
    table = np.empty((sizes.shape[0], width), np.int64)
    table[g[by_group], pos[by_group]] = by_group
    members = table[g]  # (N, width); entries beyond the group size are garbage until masked
    rows = np.arange(n)
    members[rows, pos] = members[rows, 0]  # move the first member into i's slot, i to the front
    members[:, 0] = rows
    mask = np.arange(width)[None, :] < sizes[g][:, None]
    return np.where(mask, members, rows[:, None]), mask


def neighbourhood_members(neighbours) -> tuple[np.ndarray, np.ndarray]:
    """"Diffusion off" (PAD Table 3): C(x_i) = {x_i} + its kNN row, in :func:`group_members`'
    format: members (N, k + 1) int64 with i first, mask False where the row had -1."""
    nbr = _check_neighbours(neighbours).astype(np.int64)
    rows = np.arange(nbr.shape[0])
    mask = np.concatenate([np.ones((nbr.shape[0], 1), bool), nbr >= 0], axis=1)
    members = np.concatenate([rows[:, None], np.where(nbr >= 0, nbr, rows[:, None])], axis=1)
    return members, mask


@dataclass(frozen=True)
class SCSQuality:
    """SCS statistics of PAD Fig 4 (diagnostics only: labels describe the structure, never make it).

    n_scs: groups with >= 2 members; coverage: fraction of vertices inside one; mean_size /
    max_size: over those groups; precision: fraction of SCS members whose label is their SCS's
    majority label (member-weighted); pair_precision: fraction of ordered pairs of distinct members
    of one SCS that share a label (each member taken as the anchor in turn). NaN when n_scs = 0.
    """

    n_vertices: int
    n_scs: int
    coverage: float
    mean_size: float
    max_size: int
    precision: float
    pair_precision: float

    def as_dict(self) -> dict:
        return asdict(self)


def scs_quality(groups, labels) -> SCSQuality:
    """Size and class precision of the SCS in ``groups`` (PAD Fig 4); see :class:`SCSQuality`."""
    g = _check_groups(groups)
    lab = np.asarray(labels)
    if lab.shape != g.shape:
        raise DataError(f"labels must have one entry per vertex ({g.shape[0]}), got {lab.shape}")
    n = g.shape[0]
    sizes = np.bincount(g) if n else np.zeros(0, np.int64)
    in_scs = sizes[g] >= 2 if n else np.zeros(0, bool)
    n_scs = int((sizes >= 2).sum())
    if n_scs == 0:
        return SCSQuality(n, 0, 0.0, float("nan"), 0, float("nan"), float("nan"))
    _, lab_ids = np.unique(lab[in_scs], return_inverse=True)
    pairs, pair_counts = np.unique(np.stack([g[in_scs], lab_ids.ravel()]), axis=1,
                                   return_counts=True)  # (SCS, label) pairs and their counts
    majority = np.zeros(sizes.shape[0], np.int64)
    np.maximum.at(majority, pairs[0], pair_counts)  # largest same-label count per SCS
    scs_sizes = sizes[sizes >= 2]
    members = int(scs_sizes.sum())
    same_pairs = float((pair_counts * (pair_counts - 1)).sum())
    all_pairs = float((scs_sizes * (scs_sizes - 1)).sum())
    return SCSQuality(n, n_scs, members / n, float(scs_sizes.mean()), int(scs_sizes.max()),
                      float(majority.sum()) / members, same_pairs / all_pairs)
