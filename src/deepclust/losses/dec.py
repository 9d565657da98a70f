"""DEC (Xie, Girshick & Farhadi, "Unsupervised Deep Embedding for Clustering Analysis", ICML 2016),
Sec 3.1: the soft assignment (Eq 1), the target distribution (Eq 3) and the KL divergence between
them (Eq 2).

Eq 1, Student's t kernel between an embedded point z_i and a centroid mu_j:
    q_ij = (1 + |z_i - mu_j|^2 / alpha)^(-(alpha + 1) / 2) / sum_j' (same for j')
Eq 3, the target: the soft assignments squared and divided by the soft cluster frequencies
f_j = sum_i q_ij (over the whole data set), normalised per point:
    p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j')
Eq 2, the objective: L = KL(P || Q) = sum_i sum_j p_ij log(p_ij / q_ij), P fixed (no gradient).

Per-row terms follow the loop's rule (losses/__init__.py): the loop sums the rows and divides by the
global batch, so the loss is the mean over the batch of each row's KL(P_i || Q_i).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..precision import at_least_float32


def squared_distances(z: Tensor, centroids: Tensor) -> Tensor:
    """(B, K) |z_i - mu_j|^2 in at least float32 with autocast off, as |z|^2 - 2 z.mu + |mu|^2
    (no (B, K, D) tensor), clamped at 0 against the expansion's rounding."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, mu = at_least_float32(z), at_least_float32(centroids)
        dtype = torch.promote_types(z.dtype, mu.dtype)
        z, mu = z.to(dtype), mu.to(dtype)
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ mu.t() + (mu * mu).sum(1)
        return d2.clamp_min(0)


def log_soft_assignment(z: Tensor, centroids: Tensor, alpha: float = 1.0) -> Tensor:
    """(B, K) log q of DEC Eq 1: log of the Student's t kernel with ``alpha`` degrees of freedom,
    normalised over the centroids in log space (no underflow for far centroids)."""
    log_kernel = -(alpha + 1) / 2 * torch.log1p(squared_distances(z, centroids) / alpha)  # DEC Eq 1
    return log_kernel - torch.logsumexp(log_kernel, dim=1, keepdim=True)


def soft_assignment(z: Tensor, centroids: Tensor, alpha: float = 1.0) -> Tensor:
    """(B, K) q of DEC Eq 1 (rows sum to 1)."""
    return log_soft_assignment(z, centroids, alpha).exp()


@torch.no_grad()
def target_distribution(q: Tensor) -> Tensor:
    """(N, K) p of DEC Eq 3 from the soft assignments ``q`` (N, K) of the whole data set: q squared,
    divided by the soft cluster frequency f_j = sum_i q_ij, normalised per row. In float64."""
    q = q.double()
    weight = q ** 2 / q.sum(0)  # DEC Eq 3: q_ij^2 / f_j
    return weight / weight.sum(1, keepdim=True)


def kl_rows(target: Tensor, log_q: Tensor) -> Tensor:
    """(B,) KL(P_i || Q_i) = sum_j p_ij (log p_ij - log q_ij), DEC Eq 2 per row; the target carries no
    gradient, 0 log 0 = 0."""
    p = target.detach().to(log_q.dtype)
    return (torch.special.xlogy(p, p) - p * log_q).sum(1)  # DEC Eq 2


def dec_rows(z: Tensor, centroids: Tensor, target: Tensor, alpha: float = 1.0) -> Tensor:
    """(B,) DEC Eq 2's per-row terms for this process's rows: KL(P_i || Q_i) with Q_i from the rows'
    features ``z`` and the ``centroids`` (Eq 1) and P_i their rows of the target (Eq 3)."""
    return kl_rows(target, log_soft_assignment(z, centroids, alpha))
