"""AND (Huang et al., ICML 2019): the neighbourhood loss over the memory bank's softmax."""

from __future__ import annotations

import torch
from torch import Tensor


def positive_set_loss(logits: Tensor, positives: Tensor, mask: Tensor | None = None) -> Tensor:
    """-log sum_{j in P_i} p_ij for a set of positives per row (AND Eq 3; PAD Eq 3's group loss).

    positives: (B, M) bank indices; mask: (B, M) bool, False for padding (rows may have different
    set sizes). Every row must have at least one valid positive. Returns (B,).
    """
    pos = logits.gather(1, positives)
    if mask is not None:
        pos = pos.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.logsumexp(pos, dim=1)


def neighbourhood_loss(logits: Tensor, idx: Tensor, neighbours: Tensor, selected: Tensor) -> Tensor:
    """AND Eq 7: selected anchors use their neighbourhood N_k(x_i) = {x_i} + k neighbours (Eq 3);
    the others stay single instances (Eq 2).

    idx: (B,) bank indices of the batch; neighbours: (B, k) their neighbours; selected: (B,) bool.
    """
    positives = torch.cat([idx[:, None], neighbours], dim=1)
    mask = torch.ones_like(positives, dtype=torch.bool)
    mask[:, 1:] = selected[:, None]
    return positive_set_loss(logits, positives, mask)
