"""Invariant and spreading instance features (Ye et al., CVPR 2019), the warm-up branch of PCP
(PCP Sec III-C "Warm-up": "Following IS [30] ... random data augmentation invariant and instance
spread-out features").

A loss over pairs within the global batch. Under multi-process training every process computes the
terms of ITS rows against the gathered global batch; the per-sample terms of all processes then sum
to the one-process total. Gradients: with ``form="reference"`` the other rows enter only as
detached keys, so a plain (non-differentiable) all-gather gives the exact one-process gradient; with
``form="paper"`` they carry gradient, so ``f_all``/``fhat_all`` must come from a differentiable
gather (e.g. ``torch.distributed.nn.functional.all_gather``) for the gradients to match as well.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..precision import at_least_float32, similarities


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012); each branch is evaluated
    on a safe stand-in where it is not used, so no NaN gradient leaks through ``where``."""
    near_zero = x > -math.log(2.0)
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


def _check(f_local, fhat_local, f_all, fhat_all, local_positions, temperature) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if f_local.ndim != 2 or fhat_local.shape != f_local.shape:
        raise DataError(f"f_local and fhat_local must both be (B_local, D), got {tuple(f_local.shape)} "
                        f"and {tuple(fhat_local.shape)}")
    if f_all.ndim != 2 or fhat_all.shape != f_all.shape or f_all.shape[1] != f_local.shape[1]:
        raise DataError(f"f_all and fhat_all must both be (B, {f_local.shape[1]}), got {tuple(f_all.shape)} "
                        f"and {tuple(fhat_all.shape)}")
    if local_positions.shape != (f_local.shape[0],):
        raise DataError(f"local_positions must have shape ({f_local.shape[0]},), got {tuple(local_positions.shape)}")


def _paper_terms(f, fh, f_all, pos, t) -> Tensor:
    """Ye et al. Eq 2, 3, 6 with the m = B instance classes of the first view, regrouped by query:
    term_j = -log P(j|f^_j) - sum_{i != j} log(1 - P(i|f_j)). Summed over j this is Eq 6."""
    rows = torch.arange(f.shape[0], device=f.device)
    s_hat = similarities(fh, f_all, t)  # (b, B): f_k . f^_j / tau
    log_pos = s_hat[rows, pos] - torch.logsumexp(s_hat, dim=1)  # Eq 2: log P(j|f^_j)
    s = similarities(f, f_all, t)  # (b, B): f_i . f_j / tau
    log_p = s - torch.logsumexp(s, dim=1, keepdim=True)  # Eq 3: log P(i|f_j), the sum over all k
    own = torch.zeros_like(s, dtype=torch.bool)
    own[rows, pos] = True  # i = j is not a negative
    log_neg = _log1mexp(torch.where(own, torch.full_like(log_p, -1.0), log_p)).masked_fill(own, 0.0)
    return -log_pos - log_neg.sum(dim=1)  # Eq 6, per query j


def _reference_terms(f, fh, f_all, fhat_all, pos, t) -> Tensor:
    """The authors' ``BatchCriterion`` (mangye16/Unsupervised_Embedding_Learning ``BatchAverage.py``,
    reused by PCP ``lib/BatchAverage.py``): both views stacked (2B rows); each row a is a query
    against the other 2B - 1 rows as detached keys (``x.t().data``), its positive is its other view
    a'; term_a = -log P(a'|a) - sum_{b != a, a'} log(1 - P(b|a)). The per-sample term is the mean
    of its two rows, so the batch mean equals the reference's loss (which divides by 2B)."""
    b_all = f_all.shape[0]
    keys = torch.cat([f_all, fhat_all]).detach()  # (2B, D)
    queries = torch.cat([f, fh])  # (2b, D): first view at pos, second view at B + pos
    self_col = torch.cat([pos, pos + b_all])
    partner = torch.cat([pos + b_all, pos])
    rows = torch.arange(queries.shape[0], device=f.device)
    own = torch.zeros(queries.shape[0], keys.shape[0], dtype=torch.bool, device=f.device)
    own[rows, self_col] = True
    s = similarities(queries, keys, t).masked_fill(own, float("-inf"))
    log_p = s - torch.logsumexp(s, dim=1, keepdim=True)  # self excluded from the denominator
    log_pos = log_p[rows, partner]
    skip = own.clone()
    skip[rows, partner] = True
    log_neg = _log1mexp(torch.where(skip, torch.full_like(log_p, -1.0), log_p)).masked_fill(skip, 0.0)
    terms = -log_pos - log_neg.sum(dim=1)
    return 0.5 * (terms[: f.shape[0]] + terms[f.shape[0]:])


def invariant_spreading_loss(f_local: Tensor, fhat_local: Tensor, f_all: Tensor, fhat_all: Tensor,
                             local_positions: Tensor, temperature: float, *,
                             form: str = "paper") -> Tensor:
    """Per-sample invariant-spreading loss (B_local,) for this process's rows.

    f_local, fhat_local: (B_local, D) L2-normalised embeddings of two augmented views of this
    process's samples; f_all, fhat_all: (B, D) the same for the whole global batch, rows in global
    order; local_positions: (B_local,) the positions of this process's rows in the global batch.
    The sum of the per-sample terms over all processes equals the one-process loss on the global
    batch (tested). Computed in float32 at least (float64 input stays float64).

    ``form``:
    - ``"paper"`` (default): Ye et al. Eq 2, 3 and 6, with f_k (k = 1..B, first view) as the
      instance classes: J = -sum_i log P(i|f^_i) - sum_i sum_{j != i} log(1 - P(i|f_j)). The
      double sum is regrouped by query j (each P(i|f_j) belongs to the row of f_j), which needs
      only this process's rows against the global batch: O(B_local x B), no B x B per process.
    - ``"reference"``: the authors' code (see ``_reference_terms``), which differs from the printed
      equations: both views are queries and keys (2B - 1 candidates, itself excluded), keys carry
      no gradient, and the per-sample term averages the two views' rows. PCP's reference code
      uses this one for its warm-up branch.
    """
    if form not in ("paper", "reference"):
        raise ConfigError(f"invariant-spreading form must be 'paper' or 'reference', got {form!r}")
    _check(f_local, fhat_local, f_all, fhat_all, local_positions, temperature)
    f, fh, fa, fha = (at_least_float32(x) for x in (f_local, fhat_local, f_all, fhat_all))
    pos = local_positions.to(f.device).long()
    if form == "paper":
        return _paper_terms(f, fh, fa, pos, temperature)
    return _reference_terms(f, fh, fa, fha, pos, temperature)
