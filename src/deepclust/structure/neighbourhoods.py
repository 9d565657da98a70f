"""Anchor neighbourhoods and the entropy curriculum of AND (Huang et al., ICML 2019).

Pure functions on a bank of L2-normalised features (torch tensors, any device). The bank is
processed in row blocks, so memory stays at O(block x N) and no N x N matrix is ever formed:
at N = 1.28M a block of 52 rows is a 256 MiB similarity slab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def similarity_block_rows(n: int, budget_elements: int = 1 << 26) -> int:
    """Rows per block so one (rows x N) float32 similarity block holds at most ``budget_elements``."""
    return int(max(1, min(n, budget_elements // max(n, 1), 8192)))


@torch.no_grad()
def entropy_and_neighbours(
    bank: Tensor, k: int, temperature: float, *, block: int | None = None
) -> tuple[Tensor, Tensor]:
    """One blocked pass over ``bank @ bank.T / T`` giving both AND quantities.

    Returns
      entropy (N,): H(x_i) = -sum_j p_ij log p_ij over the full softmax row (AND Eq 5), the
        diagonal included as in the reference code (softmax of memory . memory^T / T);
      neighbours (N, k): the k most cosine-similar other samples of each anchor (AND Eq 1; the
        anchor itself is added by the loss), exact, ties broken by lower index.
    """
    n = bank.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"neighbourhood size k={k} must be within [1, N-1] (N={n})")
    block = block or similarity_block_rows(n)
    entropy = torch.empty(n, dtype=torch.float32, device=bank.device)
    neighbours = torch.empty(n, k, dtype=torch.long, device=bank.device)
    bank_t = bank.t().contiguous()
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = bank[start:stop] @ bank_t  # (b, N) cosine similarities
        logp = torch.log_softmax(sim / temperature, dim=1)
        entropy[start:stop] = -(logp.exp() * logp).sum(dim=1)  # AND Eq 5
        rows = torch.arange(stop - start, device=bank.device)
        sim[rows, rows + start] = -float("inf")  # exclude the anchor itself
        neighbours[start:stop] = torch.topk(sim, k, dim=1).indices  # AND Eq 1
    return entropy, neighbours


def select_lowest_entropy(entropy: Tensor, fraction: float) -> Tensor:
    """The curriculum's selection (AND Eq 6): a boolean mask of the ``fraction`` of samples with the
    lowest entropy. Ties are broken by index, so the result is deterministic."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"selection fraction must be within [0, 1], got {fraction}")
    n = entropy.numel()
    count = int(round(fraction * n))
    mask = torch.zeros(n, dtype=torch.bool, device=entropy.device)
    if count:
        order = torch.argsort(entropy, stable=True)
        mask[order[:count]] = True
    return mask


def curriculum_fraction(round_index: int, rounds: int, curriculum: str = "linear") -> float:
    """S of AND Eq 6 for round r of R: r / R (linear), or 1 from round 1 on (one-off, Table 6)."""
    if round_index <= 0:
        return 0.0
    if curriculum == "one-off":
        return 1.0
    return min(1.0, round_index / rounds)


@dataclass
class NeighbourhoodQuality:
    selected: int  # number of anchor neighbourhoods used as neighbourhoods this round
    consistent: int  # of those, how many have every member in the anchor's class
    consistent_fraction: float


def neighbourhood_quality(neighbours: Tensor, selected: Tensor, labels: np.ndarray) -> NeighbourhoodQuality:
    """Class consistency of the selected neighbourhoods (the paper's Fig 6). Diagnostics only:
    labels are used to describe the structure, never to make it."""
    nb = neighbours.cpu().numpy()
    sel = selected.cpu().numpy().astype(bool)
    lab = np.asarray(labels)
    anchors = np.flatnonzero(sel)
    if anchors.size == 0:
        return NeighbourhoodQuality(0, 0, float("nan"))
    same = (lab[nb[anchors]] == lab[anchors, None]).all(axis=1)
    return NeighbourhoodQuality(int(anchors.size), int(same.sum()), float(same.mean()))
