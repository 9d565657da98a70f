"""PCP (Zhang et al., ICPR 2020): instance and cluster terms over the memory bank's non-parametric
softmax P(i|v) = exp(v_i . v / T) / sum_j exp(v_j . v / T) (PCP Eq 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, DataError


def pcp_loss(logits: Tensor, positives: Tensor, mask: Tensor, *, form: str = "logsum",
             reduction: str = "mean") -> Tensor:
    """Per-sample PCP loss (B,): Eq 4 for single instances, the cluster term for clustered samples.

    logits: (B, N) = v_j . bank^T / T (``MemoryBank.logits``). positives: (B, M) bank indices of
    sample j's purified cluster S_c, j itself included, or just j for a single instance
    (``structure.purification.batch_members``). mask: (B, M) bool, False for padding; every row
    needs at least one valid entry. Only the (B, M) gathered logits are formed besides the input.

    ``form``:
    - ``"logsum"`` (default): -log sum_{i in S_c} P(i|v_j), the reference code's AND-style term
      (``ICRcriterion`` in zhangyifei0115/PCP ``lib/criterion_icr.py``: p_jj + sum over the
      neighbours); chosen as default because the paper's figures come from that code.
    - ``"eq5"``: Eq 5 as printed, -sum_{i in S_c} log P(i|v_j) per sample j. ``reduction="mean"``
      (default) divides it by |S_c|; ``"sum"`` keeps the printed sum, which grows with the cluster
      (a member of a 5,000-sample cluster would weigh 5,000 instance terms).

    For a single instance (one valid positive, j itself) every form is Eq 4, -log P(j|v_j), so
    summing over the batch gives Eq 6 = Eq 4 + Eq 5.
    """
    if form not in ("logsum", "eq5"):
        raise ConfigError(f"PCP loss form must be 'logsum' or 'eq5', got {form!r}")
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"eq5 reduction must be 'mean' or 'sum', got {reduction!r}")
    if logits.ndim != 2 or positives.ndim != 2 or positives.shape[0] != logits.shape[0]:
        raise DataError(f"expected logits (B, N) and positives (B, M), got {tuple(logits.shape)} "
                        f"and {tuple(positives.shape)}")
    if mask.shape != positives.shape:
        raise DataError(f"mask must have the shape of positives {tuple(positives.shape)}, got {tuple(mask.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
    log_z = torch.logsumexp(logits, dim=1)  # PCP Eq 3 denominator
    pos = logits.gather(1, positives.long())
    if form == "logsum":
        return log_z - torch.logsumexp(pos.masked_fill(~mask, float("-inf")), dim=1)
    count = mask.sum(dim=1).to(logits.dtype)
    summed = pos.masked_fill(~mask, 0.0).sum(dim=1)
    if reduction == "mean":  # -(1/|S_c|) sum_i log P(i|v_j)
        return log_z - summed / count
    return count * log_z - summed  # PCP Eq 5 as printed: -sum_i log P(i|v_j)
