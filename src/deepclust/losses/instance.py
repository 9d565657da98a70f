"""Instance discrimination (Wu et al., CVPR 2018): every image is its own class against the memory
bank's non-parametric softmax (AND Eq 2, PCP Eq 3-4)."""

from __future__ import annotations

import torch
from torch import Tensor


def instance_loss(logits: Tensor, idx: Tensor) -> Tensor:
    """-log p_ii, per sample (B,), from ``logits`` (B, N) = x_i . bank_j / T (Wu et al. Eq 2; AND Eq 2)."""
    return torch.logsumexp(logits, dim=1) - logits.gather(1, idx[:, None]).squeeze(1)
