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

import math

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
    last two convolutions per (pair, position) (``score``, a 1x1 convolution being a matrix product over
    the channels): the same function as ``forward``, to float rounding. ``score``'s intermediates are
    written into buffers kept from one step to the next (:class:`PairScores`)."""

    def __init__(self, shallow_channels: int, deep_dim: int, width: int = 512):
        super().__init__()
        self.shallow_channels = shallow_channels
        self.net = nn.Sequential(
            nn.Conv2d(shallow_channels + deep_dim, width, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1, bias=False), nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, 1, bias=False),
        )
        self.workspace = Workspace()

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        shallow = shallow if shallow.ndim == 4 else shallow[:, :, None, None]  # a vector is a 1x1 map
        d = deep[:, :, None, None].expand(-1, -1, *shallow.shape[2:])
        return self.net(torch.cat([shallow, d.to(shallow.dtype)], dim=1)).squeeze(1)

    def project(self, deep: Tensor, shallow: Tensor) -> tuple[Tensor, Tensor]:
        """(W_d d: (b, width), W_s s: (B, H*W, width)), the first convolution's two halves; the maps'
        positions as rows (a channels-last map makes that a view)."""
        shallow = shallow if shallow.ndim == 4 else shallow[:, :, None, None]
        w = self.net[0].weight[:, :, 0, 0]
        c = self.shallow_channels
        positions = shallow.permute(0, 2, 3, 1).reshape(shallow.shape[0], -1, c)
        return F.linear(deep.to(positions.dtype), w[:, c:]), F.linear(positions, w[:, :c])

    def score(self, deep_part: Tensor, shallow_part: Tensor, rows: Tensor, cols: Tensor, max_pairs: int = 0) -> Tensor:
        """T of the P pairs (deep row ``rows[k]``, shallow map ``cols[k]``) from the projected halves
        (b, width) and (B, H*W, width): (P, H*W). ``max_pairs``: the most pairs a batch of this size
        can have (the buffers are made that large once)."""
        return PairScores.apply(shallow_part, deep_part, rows, cols, self.net[2].weight[:, :, 0, 0],
                                self.net[4].weight[0, :, 0, 0], self.workspace, max_pairs)


class Workspace:
    """Buffers reused from one call to the next, grown when too small: the pairs' intermediates are
    large (pairs x positions x width floats: 64 MiB for 128 rows, 4 pairs each, an 8x8 map and width
    512), and a fresh allocation of that size is new memory from the system every step (glibc maps it
    and unmaps it on release), which costs the CPU about as much again as the arithmetic on it. Not
    state: nothing of it is saved or compared."""

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, capacity: int = 0) -> Tensor:
        """A (``shape``) view of buffer ``name`` (dtype and device of ``like``), at least ``capacity``
        elements large, so a batch with fewer pairs than the last reuses it."""
        n = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(n, capacity), dtype=like.dtype, device=like.device)
            self.buffers[name] = buf
        return buf[:n].view(shape)


class PairScores(torch.autograd.Function):
    """T's last two layers on P (row, map) pairs at every position, from the first layer's halves:
    h1 = relu(W_s s_p + W_d d_i), h2 = relu(W2 h1), T = w3 . h2 (DCCM Sec 3.4, the local discriminator
    of Hjelm et al. 2019), with the gradients autograd would give for that expression.

    h1 and h2 (needed by the backward) live in the discriminator's :class:`Workspace`, as do the
    backward's two gradients of their size; it writes nothing it saved, so a retained graph gives the
    same gradients twice. A second forward writes into the same buffers: the first one's backward then
    fails on autograd's version check of its saved tensors (never a wrong gradient). Computed in the
    projections' dtype (bf16 under autocast, as the convolutions would), autocast off inside."""

    @staticmethod
    def forward(ctx, shallow_part, deep_part, rows, cols, w2, w3, workspace, max_pairs):  # type: ignore[override]
        with torch.autocast(shallow_part.device.type, enabled=False):
            n_pairs, (_, positions, width) = rows.numel(), shallow_part.shape
            w2, w3 = w2.to(shallow_part.dtype), w3.to(shallow_part.dtype)
            capacity = max(n_pairs, max_pairs) * positions * width
            h1 = workspace.get("h1", (n_pairs, positions, width), shallow_part, capacity)
            torch.index_select(shallow_part, 0, cols, out=h1)
            h1.add_(deep_part.to(h1.dtype).index_select(0, rows)[:, None, :]).relu_()
            h2 = workspace.get("h2", (n_pairs * positions, width), shallow_part, capacity)
            torch.mm(h1.view(-1, width), w2.t(), out=h2).relu_()
            scores = torch.mv(h2, w3).view(n_pairs, positions)
        ctx.save_for_backward(h1, h2, w2, w3, rows, cols)
        ctx.workspace, ctx.capacity = workspace, capacity
        ctx.shapes = (shallow_part.shape, deep_part.shape, deep_part.dtype)
        return scores

    @staticmethod
    def backward(ctx, grad_scores):  # type: ignore[override]
        h1, h2, w2, w3, rows, cols = ctx.saved_tensors
        shallow_shape, deep_shape, deep_dtype = ctx.shapes
        n_pairs, positions, width = h1.shape
        with torch.autocast(h1.device.type, enabled=False):
            g = grad_scores.to(h2.dtype).reshape(-1, 1)
            g2 = ctx.workspace.get("grad_h2", tuple(h2.shape), h2, ctx.capacity)  # dL/d(W2 h1): through T's last ReLU
            torch.mul(g, w3, out=g2)  # dL/dh2, into the buffer (a fresh tensor of that size is new memory)
            torch.ops.aten.threshold_backward.grad_input(g2, h2, 0.0, grad_input=g2)
            grad_w3 = h2.t().mv(g.view(-1))
            grad_w2 = g2.t().mm(h1.view(-1, width))
            g1 = ctx.workspace.get("grad_h1", tuple(h2.shape), h2, ctx.capacity)  # dL/d(W_s s + W_d d), per pair
            torch.mm(g2, w2, out=g1)
            torch.ops.aten.threshold_backward.grad_input(g1, h1.view(-1, width), 0.0, grad_input=g1)
            g1 = g1.view(n_pairs, positions, width)
            grad_shallow = h1.new_zeros(shallow_shape).index_add_(0, cols, g1)
            grad_deep = h1.new_zeros(deep_shape).index_add_(0, rows, g1.sum(dim=1)).to(deep_dtype)
        return grad_shallow, grad_deep, None, None, grad_w2, grad_w3, None, None


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
    scores = discriminator.score(deep_part, shallow_part, rows, partners[rows, cols], max_pairs=partners.numel())
    per_pair = F.softplus(sign[rows, cols].to(torch.float32)[:, None] * at_least_float32(scores)).mean(dim=1)
    n_pos = positives.shape[1]
    counts = torch.stack([valid[:, :n_pos].sum(1), valid[:, n_pos:].sum(1)], dim=1)  # (b, 2)
    share = per_pair / counts[rows, (cols >= n_pos).long()].to(per_pair.dtype)  # each part a mean
    return torch.zeros(deep.shape[0], dtype=per_pair.dtype, device=deep.device).index_add(0, rows, share)
