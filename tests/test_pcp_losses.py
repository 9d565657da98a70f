"""PCP (ICPR 2020) losses Eq 4-6, the invariant-spreading warm-up loss (Ye et al., CVPR 2019) and
DeepCluster's cross-entropy: values against direct slow computations, gradients via autograd, and
the multi-process decomposition of the pairwise loss."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepclust.errors import ConfigError, DataError
from deepclust.losses.deepcluster import deepcluster_loss
from deepclust.losses.invariant_spreading import invariant_spreading_loss
from deepclust.losses.pcp import pcp_loss
from deepclust.structure.purification import batch_members, member_table

T = 0.1


def _bank_batch(seed=0, n=30, d=8, b=5):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    x = F.normalize(torch.randn(b, d, generator=g), dim=1)
    return bank, x


def _members():
    # batch of 3 over a bank of 30: row 0 single (sample 4), row 1 in {2, 7, 9}, row 2 in {11, 12}
    positives = torch.tensor([[4, 4, 4], [2, 7, 9], [11, 12, 11]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return positives, mask


def _slow_pcp(logits, positives, mask, form, reduction):
    p = torch.softmax(logits.double(), dim=1)  # PCP Eq 3
    out = []
    for j in range(logits.shape[0]):
        members = positives[j][mask[j]].tolist()
        if form == "logsum":
            out.append(-torch.log(sum(p[j, i] for i in members)))
        else:
            s = -sum(torch.log(p[j, i]) for i in members)  # PCP Eq 5 for sample j
            out.append(s / len(members) if reduction == "mean" else s)
    return torch.stack(out)


@pytest.mark.parametrize("form,reduction", [("logsum", "mean"), ("eq5", "mean"), ("eq5", "sum")])
def test_pcp_loss_against_direct_computation(form, reduction):
    bank, x = _bank_batch(b=3)
    logits = x @ bank.t() / T
    positives, mask = _members()
    got = pcp_loss(logits, positives, mask, form=form, reduction=reduction)
    assert got.shape == (3,)
    assert torch.allclose(got.double(), _slow_pcp(logits, positives, mask, form, reduction), atol=1e-5)
    # a single instance is Eq 4, -log P(j|v_j), whatever the form
    assert got[0].item() == pytest.approx(-torch.log_softmax(logits[0], 0)[4].item(), abs=1e-5)
    # extra padding changes nothing
    wide_pos = torch.cat([positives, torch.randint(0, 30, (3, 4))], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    assert torch.allclose(pcp_loss(logits, wide_pos, wide_mask, form=form, reduction=reduction), got)


@pytest.mark.parametrize("form,reduction", [("logsum", "mean"), ("eq5", "mean"), ("eq5", "sum")])
def test_pcp_loss_gradient_matches_the_derivation(form, reduction):
    bank, x = _bank_batch(seed=1, b=3)
    logits = (x @ bank.t() / T).requires_grad_(True)
    positives, mask = _members()
    pcp_loss(logits, positives, mask, form=form, reduction=reduction).sum().backward()
    p = torch.softmax(logits.detach(), 1)
    member = torch.zeros_like(p).scatter_add_(1, positives, mask.float())  # 1 on S_c (padding adds 0)
    if form == "logsum":  # d/dz [-log sum_S p] = p - p 1_S / sum_S p
        expected = p - p * member / (p * member).sum(1, keepdim=True)
    elif reduction == "mean":  # d/dz [-(1/|S|) sum_S log p] = p - 1_S / |S|
        expected = p - member / member.sum(1, keepdim=True)
    else:
        expected = member.sum(1, keepdim=True) * p - member
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_pcp_loss_with_purified_members():
    targets = np.array([0, -1, 0, 1, 1, 1, -1, 0] + [-1] * 22)
    bank, x = _bank_batch(seed=2, b=4)
    idx = torch.tensor([0, 1, 4, 6])
    positives, mask = batch_members(targets, *member_table(targets), idx)
    logits = x @ bank.t() / T
    got = pcp_loss(logits, positives, mask)
    logp = torch.log_softmax(logits.double(), 1)
    expected = [-torch.logsumexp(logp[0, [0, 2, 7]], 0), -logp[1, 1], -torch.logsumexp(logp[2, [3, 4, 5]], 0),
                -logp[3, 6]]
    assert torch.allclose(got.double(), torch.stack(expected), atol=1e-5)


def test_pcp_loss_bad_input():
    bank, x = _bank_batch(b=3)
    logits = x @ bank.t()
    positives, mask = _members()
    with pytest.raises(ConfigError):
        pcp_loss(logits, positives, mask, form="and")
    with pytest.raises(ConfigError):
        pcp_loss(logits, positives, mask, form="eq5", reduction="max")
    with pytest.raises(DataError):
        pcp_loss(logits, positives[:2], mask[:2])
    with pytest.raises(DataError):
        pcp_loss(logits, positives, mask[:, :2])


# -- invariant spreading (Ye et al. 2019) ------------------------------------------------------------------
def _views(seed=0, b=6, d=5):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(b, d, generator=g, dtype=torch.float64)
    raw_hat = raw + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)
    return raw.requires_grad_(True), raw_hat.requires_grad_(True)


def _slow_paper(f, fh, t):
    """Ye et al. Eq 2, 3, 6 term by term, per query j."""
    b = f.shape[0]
    e = lambda u, v: torch.exp(u @ v / t)  # noqa: E731
    out = []
    for j in range(b):
        p_pos = e(f[j], fh[j]) / sum(e(f[k], fh[j]) for k in range(b))  # Eq 2
        neg = 0.0
        for i in range(b):
            if i != j:
                p_ij = e(f[i], f[j]) / sum(e(f[k], f[j]) for k in range(b))  # Eq 3: P(i|f_j)
                neg = neg + torch.log(1 - p_ij)
        out.append(-torch.log(p_pos) - neg)
    return torch.stack(out)


def _slow_reference(f, fh, t):
    """The authors' BatchCriterion restated: 2B stacked rows, keys detached, self excluded; the
    loss divided by 2B (returned as the scalar)."""
    x = torch.cat([f, fh])
    n = x.shape[0]
    total = 0.0
    for a in range(n):
        partner = (a + n // 2) % n
        sims = torch.stack([torch.exp(x[a] @ x[b].detach() / t) for b in range(n)])
        z = sum(sims[b] for b in range(n) if b != a)
        total = total + torch.log(sims[partner] / z)
        for b in range(n):
            if b not in (a, partner):
                total = total + torch.log(1 - sims[b] / z)
    return -total / n


def test_is_paper_form_against_direct_computation():
    raw, raw_hat = _views()
    f, fh = F.normalize(raw, dim=1), F.normalize(raw_hat, dim=1)
    pos = torch.arange(6)
    got = invariant_spreading_loss(f, fh, f, fh, pos, T)
    expected = _slow_paper(f, fh, T)
    assert got.shape == (6,) and torch.allclose(got.double(), expected, atol=1e-4)
    g1 = torch.autograd.grad(got.sum(), (raw, raw_hat), retain_graph=True)
    g2 = torch.autograd.grad(expected.sum(), (raw, raw_hat))
    assert all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip(g1, g2))


def test_is_reference_form_against_batch_criterion():
    raw, raw_hat = _views(seed=1)
    f, fh = F.normalize(raw, dim=1), F.normalize(raw_hat, dim=1)
    got = invariant_spreading_loss(f, fh, f, fh, torch.arange(6), T, form="reference")
    expected = _slow_reference(f, fh, T)
    assert got.mean().item() == pytest.approx(expected.item(), abs=1e-4)
    g1 = torch.autograd.grad(got.mean(), (raw, raw_hat), retain_graph=True)
    g2 = torch.autograd.grad(expected, (raw, raw_hat))
    assert all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_is_two_ranks_sum_to_one_rank(form):
    raw, raw_hat = _views(seed=2, b=9)
    f, fh = F.normalize(raw, dim=1), F.normalize(raw_hat, dim=1)
    one = invariant_spreading_loss(f, fh, f, fh, torch.arange(9), T, form=form)
    g_one = torch.autograd.grad(one.sum(), (raw, raw_hat), retain_graph=True)
    ranks = [torch.tensor([0, 3, 4, 7, 8]), torch.tensor([1, 2, 5, 6])]  # uneven, interleaved
    # "paper": the gather must pass gradients (f_all = f); "reference": keys are detached anyway,
    # so a plain all-gather (detached f_all) gives the same gradient
    f_all, fh_all = (f, fh) if form == "paper" else (f.detach(), fh.detach())
    parts = [invariant_spreading_loss(f[p], fh[p], f_all, fh_all, p, T, form=form) for p in ranks]
    assert torch.allclose(sum(x.sum() for x in parts), one.sum(), atol=1e-10)
    for p, x in zip(ranks, parts):
        assert torch.allclose(x, one[p], atol=1e-10)
    g_two = torch.autograd.grad(sum(x.sum() for x in parts), (raw, raw_hat))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_one, g_two))


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_is_invariance_lowers_the_loss_and_stays_finite(form):
    f = torch.eye(8)[:6].requires_grad_(True)  # spread-out, orthogonal
    noisy = F.normalize(f.detach() + 0.8 * torch.randn(6, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    same = invariant_spreading_loss(f, f, f, f, torch.arange(6), 0.05, form=form)
    other = invariant_spreading_loss(f, noisy, f, noisy, torch.arange(6), 0.05, form=form)
    assert (same < other).all()
    same.sum().backward()
    assert torch.isfinite(f.grad).all()


def test_is_bad_input():
    f = F.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(ConfigError):
        invariant_spreading_loss(f, f, f, f, torch.arange(4), 0.0)
    with pytest.raises(ConfigError):
        invariant_spreading_loss(f, f, f, f, torch.arange(4), T, form="simclr")
    with pytest.raises(DataError):
        invariant_spreading_loss(f, f[:3], f, f, torch.arange(4), T)
    with pytest.raises(DataError):
        invariant_spreading_loss(f, f, f, f, torch.arange(3), T)


# -- DeepCluster --------------------------------------------------------------------------------------------
def test_deepcluster_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    got = deepcluster_loss(logits, labels)
    expected = -torch.log_softmax(logits, 1)[torch.arange(7), labels]
    assert got.shape == (7,) and torch.allclose(got, expected, atol=1e-6)
    assert deepcluster_loss(logits.bfloat16(), labels).dtype == torch.float32
    assert got.mean().item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    with pytest.raises(DataError):
        deepcluster_loss(logits, labels[:3])
    assert math.isfinite(got.sum().item())
