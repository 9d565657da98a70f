"""PAD (Zhang, Dong & Gong, "Unsupervised Deep Learning via Affinity Diffusion", AAAI 2020): the
group (SCS) loss, Eq 3, and the hard positive enhancement, Eq 4, on the memory bank's
non-parametric softmax p_ij = exp(x_i . x~_j / T) / sum_k exp(x_i . x~_k / T) (Eq 2).

Every function returns one term per row (B,); Eq 3-4's 1/n_bs mean is the training loop's
reduction. ``logits`` are (B, N) = x_i . bank / T (``MemoryBank.logits``), computed in at least float32.

Eq 3 is exactly AND's positive-set loss (``losses.neighbourhood.positive_set_loss``): -log of the
summed softmax mass of the sample's group C(x_i), C(x_i) including x_i itself; it is reused as is.

Eq 4, read off the paper:
 - direction: KL(p_i || p_hp) = sum_j p_ij log(p_ij / p_hp,j), as printed (p_i, the sample's own
   prediction, weighs the log-ratio); the paper detaches neither side;
 - the hard positive x_hp of a sample in a group is the member (other than itself) with the smallest
   affinity p_ij, i.e. the smallest logit of Eq 3's sum: the term Eq 4 is there to calibrate ("less
   similar neighbours can be overwhelmed due to over small quantity");
 - the hard positive's prediction p_hp is the softmax of its feature against the bank, the same
   Eq 2; the caller passes the feature (a bank row for a group member, a second augmented view for
   an isolated sample, see ``methods/pad.py``).
The ablation's "feature cosine similarity" (FCS, Table 5) is 1 - cos(x_i, x_hp): zero when the two
agree, the same gradient as -cos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .neighbourhood import positive_set_loss

__all__ = ["hard_positive", "hpe_cosine_loss", "hpe_kl_loss", "scs_loss"]


def _wide(t: Tensor) -> Tensor:
    """At least float32 (bf16 / fp16 logits under autocast; float64 stays, for gradcheck)."""
    return t if t.dtype == torch.float64 else t.float()


def scs_loss(logits: Tensor, members: Tensor, mask: Tensor) -> Tensor:
    """PAD Eq 3: -log sum_{j in C(x_i)} p_ij per row.

    members: (B, M) bank indices of each row's group, the row's own index among them (isolated
    samples: only it, Eq 3 then is the instance loss); mask: (B, M) bool, False for padding.
    """
    return positive_set_loss(_wide(logits), members, mask)


@torch.no_grad()
def hard_positive(logits: Tensor, members: Tensor, mask: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """PAD Eq 4's x_hp: the group member other than the sample with the smallest affinity p_ij.

    logits: (B, N); members / mask: (B, M) as for :func:`scs_loss`; idx: (B,) the rows' own bank
    indices. Returns (hp (B,) bank index, found (B,) bool); rows with no other member (isolated
    samples) get found = False and hp = their own index. Ties go to the first such member.
    """
    aff = _wide(logits.gather(1, members))
    candidate = mask & (members != idx[:, None])
    aff = aff.masked_fill(~candidate, float("inf"))
    col = aff.argmin(dim=1, keepdim=True)
    found = candidate.any(dim=1)
    hp = torch.where(found, members.gather(1, col).squeeze(1), idx)
    return hp, found


def hpe_kl_loss(logits: Tensor, logits_hp: Tensor) -> Tensor:
    """PAD Eq 4: sum_j p_ij log(p_ij / p_hp,j) per row, p = softmax over the bank (Eq 2).

    logits: (B, N) of the samples; logits_hp: (B, N) of their hard positives. Gradient flows into
    both sides wherever they carry one (a bank row carries none).
    """
    logp = torch.log_softmax(_wide(logits), dim=1)
    logq = torch.log_softmax(_wide(logits_hp), dim=1)
    return (logp.exp() * (logp - logq)).sum(dim=1)


def hpe_cosine_loss(x: Tensor, x_hp: Tensor) -> Tensor:
    """The FCS variant of PAD's HPE (Table 5 bottom): 1 - cos(x_i, x_hp) per row."""
    return 1.0 - F.cosine_similarity(_wide(x), _wide(x_hp), dim=1)
