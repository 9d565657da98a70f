"""DCCM's loss terms (Wu, Long, Wang, Qian, Li, Lin & Zha, ICCV 2019), per local row of the batch.

- ``graph_loss``: Eq 3 (and Eq 12's L'_PG) with the binary cross-entropy of DAC [9] as l_g: row i's
  term is the mean over the global batch of BCE(s_ij, W_ij); s_ij is the cosine of the prediction
  vectors (non-negative after a softmax), W the pseudo-graph of the *original* images (Eq 2). The
  mean over all rows of these terms is the B x B mean of ``nn.BCELoss`` the authors use.
- ``label_loss``: Eq 9 (and Eq 12's L'_PL): V_i * cross-entropy of the prediction against the
  pseudo-label y_i of the original image (the paper's l_l; the authors' code uses a binary
  cross-entropy over the K outputs instead).
- ``mi_loss``: Eq 13-14, the Jensen-Shannon estimate of the mutual information between deep (d) and
  shallow (s) features, negated: mean over a row's positive pairs of sp(-T(d, s)) plus mean over its
  negative pairs of sp(T(d, s)), T averaged over the shallow map's positions (the authors' local
  discriminator, Hjelm et al. 2019). Pairs come from ``structure.pseudo_graph.mi_pairs``.
Everything in at least float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import at_least_float32

EPS = 1e-7


def graph_loss(similarity: Tensor, graph: Tensor) -> Tensor:
    """(b, B) cosine similarities of this process's rows to the global batch, (b, B) bool targets
    -> (b,) DCCM Eq 3 terms (mean over the batch of the binary cross-entropy)."""
    s = at_least_float32(similarity)
    # -log s where W = 1, -log(1 - s) where W = 0; only the branch not taken is clamped, so the
    # gradient stays smooth as s nears 1 (clamping s itself would switch it off there, and a rounding
    # difference between one process and N would then change the step)
    term = torch.where(graph, -torch.log(s.clamp_min(EPS)), -torch.log((1.0 - s).clamp_min(EPS)))
    return term.mean(dim=1)


def label_loss(probabilities: Tensor, labels: Tensor, confident: Tensor) -> Tensor:
    """(b, K) softmax outputs, (b,) pseudo-labels, (b,) bool V -> (b,) DCCM Eq 9 terms."""
    p = at_least_float32(probabilities)
    nll = -torch.log(p.gather(1, labels[:, None]).squeeze(1).clamp_min(EPS))
    return nll * confident.to(p.dtype)


class LocalDiscriminator(nn.Module):
    """T(d, s) of DCCM Sec 3.4 / Hjelm et al. 2019: three 1x1 convolutions (ReLU between, no bias, as
    the authors' code) on the shallow map concatenated with the deep vector copied to every position.
    ``forward`` returns one score per position, (P, H, W) for P pairs.

    The first convolution is linear in [s, d]: W [s; d] = W_s s + W_d d. ``mi_loss`` computes W_s s
    once per map of the batch and W_d d once per row (``project``), then only the sum, the ReLU and the
    last two convolutions per pair (``score``): the same function as ``forward``, to float rounding."""

    def __init__(self, shallow_channels: int, deep_dim: int, width: int = 512):
        super().__init__()
        self.shallow_channels = shallow_channels
        self.net = nn.Sequential(
            nn.Conv2d(shallow_channels + deep_dim, width, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1, bias=False),
        )

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        shallow = shallow if shallow.ndim == 4 else shallow[:, :, None, None]  # a vector is a 1x1 map
        d = deep[:, :, None, None].expand(-1, -1, *shallow.shape[2:])
        return self.net(torch.cat([shallow, d.to(shallow.dtype)], dim=1)).squeeze(1)

    def project(self, deep: Tensor, shallow: Tensor) -> tuple[Tensor, Tensor]:
        """(W_d d: (b, width), W_s s: (B, width, H, W)), the first convolution's two halves."""
        shallow = shallow if shallow.ndim == 4 else shallow[:, :, None, None]
        w = self.net[0].weight
        c = self.shallow_channels
        return F.linear(deep.to(shallow.dtype), w[:, c:, 0, 0]), F.conv2d(shallow, w[:, :c])

    def score(self, deep_part: Tensor, shallow_part: Tensor) -> Tensor:
        """T of P pairs from their projected halves (P, width) and (P, width, H, W): (P, H, W)."""
        return self.net[2:](torch.relu(shallow_part + deep_part[:, :, None, None])).squeeze(1)


def mi_loss(discriminator: LocalDiscriminator, deep: Tensor, shallow_all: Tensor, positives: Tensor,
            negatives: Tensor) -> Tensor:
    """(b,) DCCM Eq 14 terms for this process's rows.

    deep: (b, D) the rows' deep features; shallow_all: (B, C, H, W) the global batch's shallow maps
    (gathered with gradient); positives / negatives: (b, P) / (b, Q) indices into the global batch,
    -1 for none (a row's own map is among its positives). Term_i = mean_p sp(-T(d_i, s_p)) +
    mean_q sp(T(d_i, s_q)), T averaged over positions; a row without negatives has no second part.
    Positive and negative pairs are scored in one pass of the discriminator.
    """
    partners = torch.cat([positives, negatives], dim=1)
    sign = torch.cat([positives.new_full(positives.shape, -1), negatives.new_full(negatives.shape, 1)], dim=1)
    valid = partners >= 0
    rows, cols = torch.nonzero(valid, as_tuple=True)
    if rows.numel() == 0:
        return deep.new_zeros(deep.shape[0], dtype=torch.float32)
    deep_part, shallow_part = discriminator.project(deep, shallow_all)
    scores = discriminator.score(deep_part[rows], shallow_part[partners[rows, cols]])
    per_pair = F.softplus(sign[rows, cols].to(torch.float32)[:, None]
                          * at_least_float32(scores).flatten(1)).mean(dim=1)
    n_pos = positives.shape[1]
    counts = torch.stack([valid[:, :n_pos].sum(1), valid[:, n_pos:].sum(1)], dim=1)  # (b, 2)
    share = per_pair / counts[rows, (cols >= n_pos).long()].to(per_pair.dtype)  # each part a mean
    return torch.zeros(deep.shape[0], dtype=per_pair.dtype, device=deep.device).index_add(0, rows, share)
