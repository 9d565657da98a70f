"""DCCM's structure within a batch (Wu et al., ICCV 2019, Sec 3.1-3.4 and supplementary 6.6): the
pseudo-graph of confident pairs (Eq 2), the confident pseudo-labels (Eq 7-8), and the pairs its
triplet mutual information is estimated on (Table 6's strategies V1-V4).

Pure functions on the predictions of one (global) batch: B x B at most, never N x N. Thresholds are
compared in float32 whatever the autocast context (``precision.similarities``), so a cosine of 0.9504
is not rounded to 0.95 and counted in, or 0.9496 rounded up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..precision import at_least_float32, similarities

PAIR_STRATEGIES = ("nearest-random", "nearest-farthest", "random-random", "topn-random")  # V1-V4


def prediction_similarity(p: Tensor, q: Tensor | None = None) -> Tensor:
    """Cosine similarity S_ij of prediction vectors (DCCM Sec 3.1), (n, m) in float32."""
    p = F.normalize(at_least_float32(p), dim=1)
    q = p if q is None else F.normalize(at_least_float32(q), dim=1)
    return similarities(p, q)


def pseudo_graph(similarity: Tensor, threshold: float = 0.95) -> Tensor:
    """DCCM Eq 2: W_ij = 1 where s_ij >= thres_1 (bool, the diagonal included: s_ii = 1)."""
    return at_least_float32(similarity) >= threshold


def pseudo_labels(probabilities: Tensor, threshold: float = 0.9) -> tuple[Tensor, Tensor]:
    """DCCM Eq 7-8: (y_i = argmax_k z_ik, V_i = [max_k z_ik >= thres_2]) as (int64, bool)."""
    top, y = at_least_float32(probabilities).max(dim=1)
    return y, top >= threshold


@dataclass(frozen=True)
class BlockGraph:
    """The pseudo-graph (Eq 2) and pseudo-labels (Eq 7-8) of a block of images predicted at once, for
    the authors' per-block schedule (Cory-M/DCCM main.py ``train``: ``comp_simi`` and ``mask`` of the
    block's predictions once, then every mini-batch of the block's repeated passes indexes them,
    ``mask[address,:][:,address]``). Made once per block (``of``); a mini-batch only indexes it."""

    where: Tensor  # (N,) int64: each image's row in the block, -1 outside it
    similarity: Tensor  # (n, n) float32 cosine of the block's predictions (Sec 3.1)
    graph: Tensor  # (n, n) bool, Eq 2
    labels: Tensor  # (n,) int64, Eq 7
    confident: Tensor  # (n,) bool, Eq 8

    @classmethod
    def of(cls, probabilities: Tensor, rows: Tensor, n_images: int, graph_threshold: float,
           label_threshold: float) -> "BlockGraph":
        """From the block's predictions ``probabilities`` (n, K) of the images ``rows`` (n,) of N."""
        where = torch.full((n_images,), -1, dtype=torch.int64, device=rows.device)
        where[rows] = torch.arange(len(rows), device=rows.device)
        similarity = prediction_similarity(probabilities)
        labels, confident = pseudo_labels(probabilities, label_threshold)
        return cls(where, similarity, pseudo_graph(similarity, graph_threshold), labels, confident)

    def batch(self, gidx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(graph (B, B), similarity (B, B), labels (B,), confident (B,)) of a global batch of the
        block's images (dataset indices ``gidx``)."""
        at = self.where[gidx]
        return self.graph[at][:, at], self.similarity[at][:, at], self.labels[at], self.confident[at]


@dataclass(frozen=True)
class MiPairs:
    """For each local anchor row: its positive partner (an index of the global batch, -1: none) and
    ``negatives`` partners (global indices, -1: none), chosen from the pseudo-graph."""

    positive: Tensor  # (b,) int64
    negatives: Tensor  # (b, n_neg) int64


def mi_pairs(graph: Tensor, similarity: Tensor, positions: Tensor, generator: torch.Generator,
             strategy: str = "nearest-random", n_negatives: int = 2) -> MiPairs:
    """Partners for the triplet mutual information (DCCM Eq 14, supplementary Table 6).

    ``graph`` / ``similarity``: (B, B) of the global batch; ``positions``: the local rows' places in
    it; ``generator``: seeded by (seed, epoch, step), so every process draws the same global choice.
    Positives (W_ij = 1, j != i): ``nearest`` = the most similar, ``random`` = a random one, ``topn`` =
    the partner of a row among the B most similar pairs of the batch (other rows get none).
    Negatives (W_ij = 0): ``random`` = distinct random ones, ``farthest`` = the least similar ones.
    A row without a candidate gets -1 (its term is dropped). The authors' utils/sampling.py (V1 only)
    raises only when a row has fewer than two non-neighbours ('threshold is too low', lines 19-20),
    and takes a row's negatives as the first two non-neighbours in the batch's (shuffled) order
    (lines 4-21); its positive is ``topk`` of the row's 0/1 mask with the row's own entry cut out,
    used as an index into the uncut batch (lines 24-30): a neighbour rather than the most similar one
    (for a neighbour after the row, the map one place before it), and for a row without a neighbour a
    non-neighbour."""
    if strategy not in PAIR_STRATEGIES:
        raise ConfigError(f"pair strategy '{strategy}' is not one of {', '.join(PAIR_STRATEGIES)}")
    b = graph.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=graph.device)
    pos_ok, neg_ok = graph & ~eye, ~graph & ~eye
    noise = torch.rand(b, b, generator=generator).to(graph.device)  # the global draw, then our rows
    sim = at_least_float32(similarity)
    pos_kind, neg_kind = strategy.split("-")
    if pos_kind == "topn":
        positive = _top_pairs(sim, pos_ok, b)
    else:
        score = sim if pos_kind == "nearest" else noise
        positive = _best(score, pos_ok, 1)[:, 0]
    neg_score = -sim if neg_kind == "farthest" else noise
    negatives = _best(neg_score, neg_ok, n_negatives)
    return MiPairs(positive[positions], negatives[positions])


def _best(score: Tensor, allowed: Tensor, k: int) -> Tensor:
    """Per row, the ``k`` allowed columns of highest score, -1 where fewer are allowed."""
    k = min(k, score.shape[1])
    masked = score.masked_fill(~allowed, float("-inf"))
    val, idx = masked.topk(k, dim=1)
    return idx.masked_fill(torch.isinf(val), -1)


def _top_pairs(sim: Tensor, allowed: Tensor, n: int) -> Tensor:
    """V4: the ``n`` most similar allowed pairs (i < j) of the batch; each row's partner is its most
    similar one among them (-1: in none). A mask of the chosen pairs and a max per row, not writes of
    several pairs to one row's entry, whose order is undefined on CUDA."""
    b = sim.shape[0]
    upper = torch.triu(allowed, diagonal=1)
    flat = sim.masked_fill(~upper, float("-inf")).flatten()
    val, idx = flat.topk(min(n, flat.numel()))
    chosen = torch.zeros(b * b, dtype=torch.bool, device=sim.device)
    chosen[idx[~torch.isinf(val)]] = True  # distinct indices: no two writes to one entry
    chosen = chosen.view(b, b)
    best, partner = sim.masked_fill(~(chosen | chosen.T), float("-inf")).max(dim=1)
    return partner.masked_fill(torch.isinf(best), -1)


def bcubed(graph_rows: Tensor, labels: Tensor) -> tuple[float, float]:
    """BCubed precision and recall of a pseudo-graph (DCCM Fig 5; Amigo et al. 2009), diagnostics only:
    for each item, the share of its graph neighbours (itself included) that share its label, and the
    share of the items with its label that are its neighbours; both averaged over the items."""
    same = labels[:, None] == labels[None, :]
    hits = (graph_rows & same).sum(1).float()
    precision = hits / graph_rows.sum(1).clamp_min(1).float()
    recall = hits / same.sum(1).float()
    return float(precision.mean()), float(recall.mean())
