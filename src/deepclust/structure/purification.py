"""Progressive Cluster Purification (PCP, Zhang et al., ICPR 2020): the structure step as pure
functions on arrays.

One epoch of PCP Algorithm 1, split into functions:

  N_t = progressive_cluster_count(...)                  # PC, Eq 1 and Algorithm 1 line 3
  labels = k-means of the bank with N_t clusters         # structure.kmeans (line 5)
  purified = purify_clusters(features, labels, past=...) # CP_r (line 7) then CP_s (line 8, Eq 2)
  purified.targets                                       # per sample: cluster id, or -1 = single
  members, offsets = member_table(purified.targets)      # compact members of each cluster
  positives, mask = batch_members(targets, members, offsets, idx)   # per step, for losses.pcp

The building blocks (``distance_ranks``, ``reliable_mask``, ``voting_scores``, ``purify``,
``cluster_targets``) are public and tested on their own. Nothing forms an N x N matrix: the work is
O(N log N) sorting plus O(N D) distances in row blocks.

Where the paper is silent the choices follow the authors' code, zhangyifei0115/PCP (files
``PCP/main.py``, ``PCP/lib/pairscore.py``, ``PCP/lib/assigncluster.py``, ``PCP/lib/criterion_icr.py``),
each named where it is used; ``../shared/design/reference-notes.md`` summarises them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ..errors import ConfigError, DataError

# Rows of the (rows x D) float64 difference block used for distances: 2^22 elements = 32 MiB.
_BLOCK_ELEMENTS = 1 << 22


# -- PC: the cluster count (PCP Sec III-A) -------------------------------------------------------
def progressive_cluster_count(epoch: int, total_epochs: int, n: int, floor: int, *,
                              start: int | None = None) -> int:
    """Number of k-means clusters N_t at epoch t (PCP Eq 1 and Algorithm 1 line 3).

    lg N_t = (1 - t / T) lg N_0  (Eq 1), then N_t = max(N_t, N_t0) with N_t0 = ``floor``.

    - t = ``epoch`` counted from 0, as the reference loop (``for epoch in range(start_epoch, 200)``
      in ``PCP/main.py``), so t = 0 gives N_0 (the paper: "When t = 0, N_t equals to N") and t = T
      gives 1 before the floor; epochs past T keep the floor.
    - N_0 = ``start`` if given, else ``n`` (the paper). ``start`` is the reference code's variant of
      starting from a fixed count (there ``ndata`` = 50,000, the CIFAR training set); on a set
      smaller than ``start`` the count is capped at ``n`` (k-means needs K <= N).
    - Rounding: down, as the reference's ``int(math.pow(10, y))``, but computed as N_0 ** (1 - t/T)
      with a relative 1e-9 guard, so that exact values are not lost to float error (the reference
      gives 49,999 at t = 0 for N = 50,000; this gives 50,000, and agrees at every other epoch).
    """
    for name, value in (("epoch", epoch), ("total_epochs", total_epochs), ("n", n), ("floor", floor)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if epoch < 0 or total_epochs < 1 or n < 1:
        raise ConfigError(f"need epoch >= 0, total_epochs >= 1, n >= 1 (got {epoch}, {total_epochs}, {n})")
    if not 1 <= floor <= n:
        raise ConfigError(f"final cluster count N_t0={floor} must be within [1, N={n}]")
    n0 = n if start is None else int(start)
    if n0 < 1:
        raise ConfigError(f"start cluster count must be >= 1, got {start}")
    t = min(epoch, total_epochs)
    count = math.floor(n0 ** (1.0 - t / total_epochs) * (1.0 + 1e-9))  # PCP Eq 1
    return int(max(min(count, n), floor))  # Algorithm 1 line 3, capped at N


# -- CP_r: unreliable sample filtering (PCP Sec III-B) --------------------------------------------
def _check_features_labels(features, labels) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features)
    lab = np.asarray(labels)
    if x.ndim != 2:
        raise DataError(f"features must be a 2-D array (N, D), got shape {x.shape}")
    if lab.shape != (x.shape[0],):
        raise DataError(f"labels must have shape ({x.shape[0]},), got {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"cluster labels must be integers, got dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise DataError("cluster labels must be >= 0 (every sample in a k-means cluster)")
    if not np.isfinite(x).all():
        raise DataError("features contain NaN or infinite values")
    return x, lab.astype(np.int64, copy=False)


def cluster_means(features, labels, n_clusters: int | None = None) -> np.ndarray:
    """Mean feature of each cluster (K, D) float32 (zeros for an empty cluster), by one sparse
    product. This is the reference's centroid in CP_r (``np.mean(trainFeatures[images])`` in
    ``PCP/lib/pairscore.py``)."""
    x, lab = _check_features_labels(features, labels)
    k = int(n_clusters if n_clusters is not None else (lab.max() + 1 if lab.size else 0))
    sizes = np.bincount(lab, minlength=k).astype(np.float64)
    onehot = sp.csr_matrix((np.ones(lab.size, np.float32), (lab, np.arange(lab.size))), shape=(k, lab.size))
    sums = np.asarray(onehot @ np.asarray(x, dtype=np.float32))
    return (sums / np.maximum(sizes, 1.0)[:, None]).astype(np.float32)


def _centroid_distances(x: np.ndarray, lab: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of each row to its own cluster's centroid (N,), float64, in row
    blocks so the extra memory is O(block x D), never N x D."""
    n, d = x.shape
    block = max(1, _BLOCK_ELEMENTS // max(d, 1))
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        diff = x[start:stop].astype(np.float64) - centroids[lab[start:stop]]
        out[start:stop] = np.einsum("ij,ij->i", diff, diff)
    return out


def distance_ranks(features, labels, centroids=None) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's rank within its cluster by distance to the centroid, and each cluster's anchor.

    Returns ``rank`` (N,) int64 (0 = nearest the centroid) and ``anchors`` (K,) int64: the sample
    closest to each centroid (PCP Sec III-B, v_{i_c}(t) of Eq 2), -1 for an empty cluster.
    ``centroids`` (K, D): e.g. the k-means centroids; ``None`` uses the member means, as the
    reference code does. Distances are Euclidean (``PCP/lib/pairscore.py``). Ties: the lower sample
    index ranks first (a stable sort by (cluster, distance)), so the result is deterministic.
    """
    x, lab = _check_features_labels(features, labels)
    if centroids is None:
        c = cluster_means(x, lab).astype(np.float64)
    else:
        c = np.asarray(centroids, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != x.shape[1]:
            raise DataError(f"centroids must have shape (K, {x.shape[1]}), got {c.shape}")
        if lab.size and lab.max() >= c.shape[0]:
            raise DataError(f"cluster label {lab.max()} has no centroid (K={c.shape[0]})")
    k = c.shape[0]
    dist = _centroid_distances(x, lab, c)
    order = np.lexsort((dist, lab))  # by cluster, then distance; lexsort is stable: ties by index
    sizes = np.bincount(lab, minlength=k)
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(lab.size, dtype=np.int64)
    rank[order] = np.arange(lab.size) - starts[lab[order]]
    anchors = np.full(k, -1, dtype=np.int64)
    nonempty = sizes > 0
    anchors[nonempty] = order[starts[nonempty]]
    return rank, anchors


def _keep_counts(sizes: np.ndarray, gamma: float, keep_whole_up_to: int) -> np.ndarray:
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"filtering ratio gamma must be within [0, 1], got {gamma}")
    if keep_whole_up_to < 0:
        raise ConfigError(f"keep_whole_up_to must be >= 0, got {keep_whole_up_to}")
    # (1 - gamma) |S_c| rounded down, as the reference's int(len(images) * k_ratio); the 1e-9 guard
    # keeps e.g. (1 - 0.9) * 10 = 0.9999999999999998 at 1.
    keep = np.floor(sizes * (1.0 - gamma) + 1e-9).astype(np.int64)
    return np.where(sizes <= keep_whole_up_to, sizes, keep)


def reliable_mask(features, labels, centroids=None, gamma: float = 0.5, *,
                  keep_whole_up_to: int = 0) -> np.ndarray:
    """CP_r (PCP Sec III-B): in each cluster keep the (1 - gamma) fraction nearest its centroid.

    Returns a bool mask (N,): True for S^r_c(t) (reliable), False for N^r_c(t) (to be single
    instances). gamma is the paper's filtering ratio (gamma -> 1: instance discrimination); its
    default 0.5 is the paper's (Table II) and the reference's ``--cluster-ratio 0.5``.

    - Count kept in a cluster of m members: floor((1 - gamma) m), the reference's rounding, so a
      cluster of one member keeps none (it would be a single instance anyway: a cluster needs two
      members to be one, see ``cluster_targets``). No minimum of one is imposed.
    - ``keep_whole_up_to``: clusters of at most this many members are kept whole. The reference
      keeps clusters of <= 5 whole during its first 100 epochs (``PCP/lib/assigncluster.py``) and
      none after (``pairscore.py``); 0 (the default) filters every cluster.
    - Ranking and ties as ``distance_ranks`` (nearest first, lower index first).
    """
    rank, anchors = distance_ranks(features, labels, centroids)
    lab = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(lab, minlength=anchors.size)
    return rank < _keep_counts(sizes, gamma, keep_whole_up_to)[lab]


# -- CP_s: unstable sample filtering (PCP Sec III-B, Eq 2) -----------------------------------------
def voting_scores(history, anchors_of_sample, alpha: float = 0.8) -> np.ndarray:
    """PCP Eq 2: V_i = sum_k alpha^k delta(C_i(t-k), C_anchor(i)(t-k)), delta = +1 if equal else -1.

    ``history`` (n_hist, N) int: cluster labels of past clusterings, oldest first, NEWEST LAST, the
    current clustering included as the last row (k = 0). ``anchors_of_sample`` (N,): the sample
    index of the anchor of each sample's current cluster (``anchors[labels]``). The anchor's label
    at t-k is looked up as ``history[-1-k, anchor]``, i.e. where the anchor sample itself was then.

    Returns float64 (N,). Since the current row puts every sample with its anchor, the k = 0 term is
    +1: the reference starts each score at 1 and adds alpha^k for the 15 earlier clusterings it
    keeps (``anc_score = 1`` ... ``alpha ** (len(ICRset) - cluster_index)`` in ``pairscore.py``), so
    its setting is n_hist = 16 rows (Eq 2 with n = 15), alpha = 0.8, maximum score 4.86.
    """
    h = np.asarray(history)
    if h.ndim == 1:
        h = h[None, :]
    a = np.asarray(anchors_of_sample)
    if h.ndim != 2 or h.shape[0] < 1 or not np.issubdtype(h.dtype, np.integer):
        raise DataError(f"history must be an integer array (n_hist, N), got shape {h.shape}, dtype {h.dtype}")
    if h.size and h.min() < 0:
        raise DataError("history labels must be >= 0 (raw k-means labels, not purified targets)")
    if a.shape != (h.shape[1],) or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"anchors_of_sample must be integers of shape ({h.shape[1]},), got {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= h.shape[1]):
        raise DataError("anchors_of_sample must be sample indices within [0, N)")
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"decay rate alpha must be within (0, 1], got {alpha}")
    scores = np.zeros(h.shape[1], dtype=np.float64)
    for k in range(h.shape[0]):  # a loop over the history entries (15 or so), not over samples
        row = h[-1 - k]
        scores += alpha ** k * np.where(row == row[a], 1.0, -1.0)  # PCP Eq 2
    return scores


def purify(reliable, scores, drop_below: float = 0.0, pull_back_at: float = 3.0, *,
           protect=None) -> np.ndarray:
    """CP_s's two thresholds (PCP Sec III-B): S^s = reliable members with V >= ``drop_below`` plus
    filtered ones with V >= ``pull_back_at``. Returns the kept mask (N,) bool.

    Thresholds 0 and 3.0 are the paper's (Sec IV, Experimental Setting) and the reference's
    (``beta1 = 0``, ``beta2 = 3.0`` in ``pairscore.py``: drop when score < 0, pull back when
    score >= 3.0). ``protect`` (bool mask or indices): samples never dropped; the reference exempts
    each cluster's anchor from the drop test (its own score is the maximum anyway).
    """
    rel = np.asarray(reliable, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != rel.shape or rel.ndim != 1:
        raise DataError(f"reliable and scores must be 1-D of the same length, got {rel.shape} and {s.shape}")
    if drop_below > pull_back_at:
        raise ConfigError(f"drop threshold {drop_below} must not exceed the pull-back threshold {pull_back_at}")
    kept = np.where(rel, s >= drop_below, s >= pull_back_at)
    if protect is not None:
        guard = np.zeros_like(rel)
        guard[np.asarray(protect)] = True
        kept |= rel & guard
    return kept


def cluster_targets(labels, kept, min_size: int = 2) -> np.ndarray:
    """Final per-sample targets for PCP Eq 4-6: compact cluster ids, -1 for a single instance.

    A sample is in a cluster (Eq 5) if it was kept and at least ``min_size`` members of its cluster
    were kept; otherwise it is its own class (Eq 4). ``min_size`` = 2 is the reference's
    ``if len(cluster_reliable) > 1`` (a lone kept member is an instance). Ids are renumbered
    0..K'-1 in the order of the original cluster ids. Returns int64 (N,).
    """
    lab = np.asarray(labels, dtype=np.int64)
    keep = np.asarray(kept, dtype=bool)
    if keep.shape != lab.shape or lab.ndim != 1:
        raise DataError(f"labels and kept must be 1-D of the same length, got {lab.shape} and {keep.shape}")
    if min_size < 1:
        raise ConfigError(f"min_size must be >= 1, got {min_size}")
    if lab.size and lab.min() < 0:
        raise DataError("cluster labels must be >= 0")
    sizes = np.bincount(lab[keep], minlength=(lab.max() + 1) if lab.size else 0)
    in_cluster = keep & (sizes[lab] >= min_size) if lab.size else keep
    targets = np.full(lab.size, -1, dtype=np.int64)
    _, compact = np.unique(lab[in_cluster], return_inverse=True)
    targets[in_cluster] = compact
    return targets


@dataclass
class Purified:
    """Result of ``purify_clusters`` (arrays over the N samples unless said otherwise)."""

    targets: np.ndarray  # int64: compact cluster id (Eq 5), or -1 = single instance (Eq 4)
    reliable: np.ndarray  # bool: CP_r's S^r(t)
    kept: np.ndarray  # bool: after CP_s, S^s(t) (= reliable when no vote was taken)
    scores: np.ndarray | None  # float64: Eq 2 voting scores, None when no vote was taken
    anchors: np.ndarray  # int64 (K,): sample nearest each k-means centroid, -1 if empty

    @property
    def n_dropped(self) -> int:
        """Reliable samples that CP_s dropped."""
        return int((self.reliable & ~self.kept).sum())

    @property
    def n_pulled_back(self) -> int:
        """Filtered samples that CP_s pulled back."""
        return int((~self.reliable & self.kept).sum())


def purify_clusters(features, labels, *, past=None, centroids=None, gamma: float = 0.5,
                    alpha: float = 0.8, drop_below: float = 0.0, pull_back_at: float = 3.0,
                    keep_whole_up_to: int = 0, min_size: int = 2) -> Purified:
    """Cluster purification of one clustering (PCP Algorithm 1 lines 6-8): CP_r, then CP_s.

    ``labels`` (N,): this epoch's k-means labels (t). ``past`` (n_past, N), oldest first: the raw
    k-means labels of earlier epochs used by the vote (the reference keeps the last 15 and votes
    only once it has 15: with ``PCP/main.py``'s warm-up of 100 epochs that is from epoch 115 on);
    ``None`` or 0 rows: no vote (CP_r only). The caller appends ``labels`` to its history after this
    call, as the reference does (``ICRset.append(image_dict)``). Past labels are the raw k-means
    ones, not the purified targets (the reference stores ``images_dict``).
    """
    x, lab = _check_features_labels(features, labels)
    rank, anchors = distance_ranks(x, lab, centroids)
    sizes = np.bincount(lab, minlength=anchors.size)
    reliable = rank < _keep_counts(sizes, gamma, keep_whole_up_to)[lab]  # CP_r
    scores = None
    kept = reliable
    if past is not None and np.asarray(past).size:
        h = np.asarray(past)
        h = h[None, :] if h.ndim == 1 else h
        if h.ndim != 2 or h.shape[1] != lab.size:
            raise DataError(f"past labels must have shape (n_past, {lab.size}), got {h.shape}")
        scores = voting_scores(np.vstack([h, lab[None, :]]), anchors[lab], alpha)  # CP_s, Eq 2
        kept = purify(reliable, scores, drop_below, pull_back_at, protect=anchors[anchors >= 0])
    return Purified(cluster_targets(lab, kept, min_size), reliable, kept, scores, anchors)


# -- members for the loss (PCP Eq 4-6) --------------------------------------------------------------
def member_table(targets) -> tuple[np.ndarray, np.ndarray]:
    """Compact members of each purified cluster (CSR layout).

    Returns ``members`` (L,) int64, the sample indices with a target >= 0 sorted by (cluster,
    index), and ``offsets`` (K'+1,) int64: cluster c's members are ``members[offsets[c]:offsets[c+1]]``.
    Memory O(N); pass both with ``targets`` to ``batch_members`` at each step.
    """
    t = np.asarray(targets, dtype=np.int64)
    if t.ndim != 1:
        raise DataError(f"targets must be 1-D, got shape {t.shape}")
    inside = np.flatnonzero(t >= 0)
    members = inside[np.argsort(t[inside], kind="stable")]
    counts = np.bincount(t[inside], minlength=(t.max() + 1) if inside.size else 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return members.astype(np.int64), offsets


def batch_members(targets, members, offsets, idx) -> tuple[Tensor, Tensor]:
    """Positive sets of a batch for ``losses.pcp.pcp_loss``: a padded (B, M) index array and mask.

    Row j holds the members of sample idx[j]'s purified cluster S_c (idx[j] itself included, as
    i, j both range over S_c in Eq 5), or just idx[j] for a single instance (Eq 4). M is the largest
    set in this batch; padding repeats idx[j] with mask False. Torch tensors on the device of
    ``targets`` (numpy input is converted); memory O(B x M), never B x N.
    """
    t, mem, off, ix = (torch.as_tensor(a) for a in (targets, members, offsets, idx))
    mem, off, ix = mem.to(t.device).long(), off.to(t.device).long(), ix.to(t.device).long()
    if ix.ndim != 1:
        raise DataError(f"batch indices must be 1-D, got shape {tuple(ix.shape)}")
    c = t.long()[ix]
    single = c < 0
    cc = c.clamp(min=0)
    if mem.numel() == 0:
        return ix[:, None].clone(), torch.ones(ix.numel(), 1, dtype=torch.bool, device=ix.device)
    size = torch.where(single, torch.ones_like(c), off[cc + 1] - off[cc])
    width = int(size.max()) if ix.numel() else 1
    col = torch.arange(width, device=ix.device)
    mask = col[None, :] < size[:, None]
    pos = mem[(off[cc][:, None] + col[None, :]).clamp(max=mem.numel() - 1)]
    pos = torch.where(single[:, None] | ~mask, ix[:, None], pos)
    return pos, mask


# -- diagnostics (labels describe, never steer) -----------------------------------------------------
def _majority_purity(clusters: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of samples whose class is their cluster's majority class (clusters >= 0 only)."""
    inside = clusters >= 0
    if not inside.any():
        return float("nan")
    c, y = clusters[inside], np.unique(truth[inside], return_inverse=True)[1]
    pairs, counts = np.unique(np.stack([c, y], 1), axis=0, return_counts=True)
    order = np.lexsort((counts, pairs[:, 0]))  # by cluster, then count ascending
    last = np.r_[pairs[order[1:], 0] != pairs[order[:-1], 0], True]  # last row of each cluster
    return float(counts[order][last].sum() / inside.sum())


@dataclass
class PurificationQuality:
    n_clusters: int  # clusters used by Eq 5 (>= min_size kept members)
    clustered_fraction: float  # fraction of samples in those clusters
    single_fraction: float  # fraction treated as single instances (Eq 4)
    purity: float  # majority-class fraction over the clustered samples (nan if none)
    raw_purity: float | None  # same over the raw k-means clusters, when given


def purification_quality(targets, true_labels, raw_labels=None) -> PurificationQuality:
    """Diagnostics of the purified clusters for the log. Labels only describe the structure here;
    nothing returned feeds back into training."""
    t = np.asarray(targets, dtype=np.int64)
    y = np.asarray(true_labels)
    if y.shape != t.shape:
        raise DataError(f"true labels must have shape {t.shape}, got {y.shape}")
    clustered = float((t >= 0).mean()) if t.size else float("nan")
    raw = None if raw_labels is None else _majority_purity(np.asarray(raw_labels, dtype=np.int64), y)
    return PurificationQuality(int(np.unique(t[t >= 0]).size), clustered, 1.0 - clustered,
                               _majority_purity(t, y), raw)
