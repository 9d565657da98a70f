"""SCAN (Van Gansbeke, Vandenhende, Georgoulis, Proesmans & Van Gool, "SCAN: Learning to Classify
Images without Labels", ECCV 2020): the clustering loss (Eq 2) and the self-labelling loss (Sec 3.3).

Eq 2, for a head with softmax outputs p:
    Lambda = -1/|D| sum_{X in D} sum_{k in N_X} log <p(X), p(k)>  +  lambda sum_c p'_c log p'_c,
    p'_c = 1/|D| sum_{X in D} p_c(X)
i.e. -log of the dot product of an image's and a mined neighbour's predictions, averaged, minus
lambda times the entropy of the batch's mean prediction (the authors' code: ``SCANLoss``, the
dot product's -log clamped at 100 as ``nn.BCELoss``, probabilities clamped at 1e-8 in the entropy;
lambda = 5 in their CIFAR / STL configs). Per-row terms follow the loop's rule (losses/__init__.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8  # the authors' clamp of probabilities inside the entropy
MAX_NLL = 100.0  # nn.BCELoss clamps log(x) at -100


def entropy(p: Tensor) -> Tensor:
    """H(p) = -sum_c p_c log p_c over the last axis (probabilities clamped at EPS as the authors')."""
    q = p.clamp_min(EPS)
    return -(q * q.log()).sum(-1)


def consistency(p: Tensor, q: Tensor) -> Tensor:
    """-log <p, q> over the last axis, clamped at 100 (Eq 2's first term for one pair)."""
    return -(p * q).sum(-1).log().clamp_min(-MAX_NLL)


def scan_rows(p: Tensor, partner: Tensor, anchor_mean: Tensor, entropy_weight: float) -> Tensor:
    """Per-row terms of Eq 2 summed over heads, for a global batch of anchors and their neighbours.

    p: (B_local, H, K) this process's rows; partner: (B_local, H, K) each row's partner (an anchor's
    neighbour, a neighbour's anchor); anchor_mean: (H, K) the mean prediction of the global batch's
    anchors. Every row carries its pair's consistency and the entropy term, so that the sum over the
    2A rows of the global batch divided by 2A is sum_h (mean over pairs of -log <p_i, p_j> -
    lambda H(mean p)): Eq 2 per head, the heads' losses added as the authors' training loop adds them."""
    return (consistency(p, partner) - entropy_weight * entropy(anchor_mean)).sum(-1)


@torch.no_grad()
def scan_objective(p: Tensor, neighbours: Tensor, entropy_weight: float, block: int = 4096) -> Tensor:
    """Eq 2 of every head on a whole data set, no gradient: (H,) = mean over all (image, mined
    neighbour) pairs of -log <p_i, p_j>, minus lambda H(mean p). p: (N, H, K); neighbours: (N, k).
    The authors' ``scan_evaluate`` ranks heads by it with lambda = 1, and so does the stage
    (``methods.scan.SELECTION_ENTROPY_WEIGHT``). Rows in blocks: no (N, k, H, K) tensor."""
    total = torch.zeros(p.shape[1], dtype=torch.float64, device=p.device)
    for start in range(0, len(p), block):
        rows = p[start:start + block].double()
        total += consistency(rows[:, None], p[neighbours[start:start + block]].double()).sum((0, 1))
    return total / neighbours.numel() - entropy_weight * entropy(p.double().mean(0))


def self_label_rows(logits_strong: Tensor, targets: Tensor, confident: Tensor, weight: Tensor,
                    weight_sum: Tensor, global_rows: int) -> Tensor:
    """Sec 3.3's self-labelling: the cross-entropy of the strong view's logits against the weak view's
    confident argmax, class-weighted as ``F.cross_entropy(weight=...)`` with mean reduction over the
    confident rows of the global batch: per-row terms B w_y CE / sum_confident w_y, 0 for the others
    (their sum over the global batch / B is that weighted mean).

    logits_strong: (B_local, K); targets, confident: (B_local,); weight: (K,) class weights;
    weight_sum: sum of weight[target] over the confident rows of the global batch (no gradient)."""
    ce = F.cross_entropy(logits_strong.float(), targets, reduction="none")
    w = weight[targets] * confident.float()
    return global_rows * w * ce / weight_sum.clamp_min(1e-12)


def class_weights(targets: Tensor, confident: Tensor, n_classes: int, balance: bool) -> Tensor:
    """The authors' class balancing (``ConfidenceBasedCE``): weight_c = n / count_c for the classes
    among the n confident targets, 1 for the others; all ones without ``balance``."""
    w = torch.ones(n_classes, dtype=torch.float32, device=targets.device)
    if balance and confident.any():
        counts = torch.bincount(targets[confident], minlength=n_classes).float()
        present = counts > 0
        w[present] = counts.sum() / counts[present]
    return w
