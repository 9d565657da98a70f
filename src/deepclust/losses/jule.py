"""JULE's backward pass: the weighted triplet loss (Yang, Parikh, Batra, CVPR 2016, Eq 35).

Eq 35: L = -lambda / (K_c - 1) sum_{i,j,k} (gamma A(x_i, x_j) - A(x_i, x_k)), x_j from the same
cluster as x_i, x_k among "at most K_c neighbour samples of x_i from other clusters in a training
batch" (Sec 3.5.2), "a margin threshold like the triplet loss" (appendix A.3). As in the authors'
criterion (``criterions/TripletEmbedding.lua`` of jwyang/JULE.torch) the sample affinity is the
negative squared distance of the L2-normalised features and each triplet gives the hinge
max(0, gamma ||x_i - x_j||^2 - ||x_i - x_k||^2 + margin), gamma = 2 (Table 2), margin 0.2.

Triplets (ours, where the paper is loose): every row x_i of this process is an anchor; its
positives are all other rows of the global batch in its cluster (the authors' code takes every
pair within a cluster; the paper "randomly select[s]" one, which would need a random draw inside
the loss); its negatives are its K_c nearest rows of other clusters in the global batch (Sec
3.5.2), chosen without gradient. The row's term is the mean of its |P_i| x K_c hinges (0 for a row
with no positive or no negative in the batch), so the loop's mean over rows weighs every anchor
alike. Positives and negatives are rows of the gathered global batch (with gradient), so the local
terms of all processes add up to the one-process loss (the contract's DDP rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, DataError

__all__ = ["weighted_triplet_loss"]


def _check(z_local, labels_local, z_global, labels_global, positions_local, k_c, gamma, margin) -> None:
    if k_c < 1 or not gamma > 0 or margin < 0:
        raise ConfigError(f"need K_c >= 1, gamma > 0, margin >= 0; got {k_c}, {gamma}, {margin}")
    if z_local.ndim != 2 or z_global.ndim != 2 or z_local.shape[1] != z_global.shape[1]:
        raise DataError(f"features must be (b, D) and (B, D), got {tuple(z_local.shape)} and {tuple(z_global.shape)}")
    b, big_b = z_local.shape[0], z_global.shape[0]
    if labels_local.shape != (b,) or positions_local.shape != (b,) or labels_global.shape != (big_b,):
        raise DataError("labels and positions must have one entry per row")


def weighted_triplet_loss(z_local: Tensor, labels_local: Tensor, z_global: Tensor, labels_global: Tensor,
                          positions_local: Tensor, *, k_c: int = 5, gamma: float = 2.0,
                          margin: float = 0.2) -> Tensor:
    """Per-row weighted triplet terms (b,) of JULE Eq 35 for this process's rows.

    z_local (b, D): this process's features (L2-normalised here); labels_local (b,): their current
    cluster ids; z_global (B, D) and labels_global (B,): the gathered global batch in global order
    (with gradient for exact DDP gradients); positions_local (b,): the rows' places in it.
    Computed in float32 at least.
    """
    _check(z_local, labels_local, z_global, labels_global, positions_local, k_c, gamma, margin)
    dtype = torch.promote_types(z_local.dtype, torch.float32)
    a = torch.nn.functional.normalize(z_local.to(dtype), dim=1)
    g = torch.nn.functional.normalize(z_global.to(dtype), dim=1)
    # autocast (bf16-mixed, the default on a GPU) would run the product in bfloat16, where the
    # float32 sentinel below overflows: the distances stay in ``dtype``
    with torch.autocast(device_type=a.device.type, enabled=False):
        d = (2.0 - 2.0 * a @ g.t()).clamp_min(0.0)  # ||x_i - x_j||^2 on the unit sphere, (b, B)
    rows = torch.arange(a.shape[0], device=a.device)
    same = labels_local.to(a.device)[:, None] == labels_global.to(a.device)[None, :]
    positive = same.clone()
    positive[rows, positions_local.to(a.device).long()] = False  # not itself
    k = min(k_c, g.shape[0])
    far = torch.finfo(dtype).max
    with torch.no_grad():
        near = d.masked_fill(same, far).topk(k, dim=1, largest=False)  # K_c nearest of other clusters
    neg_ok = near.values < far  # fewer than K_c rows of other clusters: the rest are absent
    d_neg = d.gather(1, near.indices)  # (b, k), with gradient
    hinge = (gamma * d[:, :, None] - d_neg[:, None, :] + margin).clamp_min(0.0)  # (b, B, k)
    valid = positive[:, :, None] & neg_ok[:, None, :]
    count = valid.sum(dim=(1, 2))
    total = (hinge * valid).sum(dim=(1, 2))  # JULE Eq 35 with its margin (appendix A.3)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
