"""AND (ICML 2019): the structure step and the loss, with known answers."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepclust.losses import instance_loss, neighbourhood_loss, positive_set_loss
from deepclust.structure.neighbourhoods import (
    curriculum_fraction,
    entropy_and_neighbours,
    neighbourhood_quality,
    select_lowest_entropy,
)


def _hand_bank():
    # Two tight pairs (0,1) and (2,3) far apart, and a loose triple 4,5,6 close to each other:
    # the triple's softmax rows spread over three similar vectors -> higher entropy.
    v = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.99, 0.14, 0.0],
            [-1.0, 0.0, 0.0],
            [-0.99, -0.14, 0.0],
            [0.0, 0.0, 1.0],
            [0.0, 0.1, 0.995],
            [0.1, 0.0, 0.995],
        ]
    )
    return F.normalize(v, dim=1)


def test_entropy_matches_dense_formula_and_blocks_do_not_matter():
    bank = F.normalize(torch.randn(37, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    t = 0.1
    p = torch.softmax(bank @ bank.T / t, dim=1)
    expected = -(p * p.log()).sum(1)  # AND Eq 5, diagonal included
    for block in (1, 5, 37):
        h, nb = entropy_and_neighbours(bank, 3, t, block=block)
        assert torch.allclose(h, expected, atol=1e-5)
        sim = bank @ bank.T
        sim.fill_diagonal_(-2)
        assert torch.equal(nb, torch.topk(sim, 3, dim=1).indices)


def test_entropy_selection_on_hand_made_bank():
    bank = _hand_bank()
    h, nb = entropy_and_neighbours(bank, 1, 0.1)
    # pairs are each other's nearest neighbours (AND Eq 1)
    assert nb[:4, 0].tolist() == [1, 0, 3, 2]
    # the triple is denser -> larger entropy than every pair member
    assert h[4:].min() > h[:4].max()
    sel = select_lowest_entropy(h, 4 / 7)
    assert sel.tolist() == [True] * 4 + [False] * 3
    assert select_lowest_entropy(h, 0.0).sum() == 0
    assert select_lowest_entropy(h, 1.0).all()
    with pytest.raises(ValueError):
        select_lowest_entropy(h, 1.5)


def test_curriculum_fraction_eq6_and_one_off():
    assert [curriculum_fraction(r, 4) for r in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [curriculum_fraction(r, 4, "one-off") for r in range(5)] == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_neighbourhood_quality_counts_consistent_anchors():
    nb = torch.tensor([[1], [0], [3], [0]])
    sel = torch.tensor([True, True, True, False])
    labels = np.array([0, 0, 1, 2])
    q = neighbourhood_quality(nb, sel, labels)
    assert (q.selected, q.consistent) == (3, 2)
    assert q.consistent_fraction == pytest.approx(2 / 3)


def test_loss_is_instance_loss_when_nothing_selected():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 20, generator=g)
    idx = torch.arange(6)
    nb = torch.randint(0, 20, (6, 2), generator=g)
    none = torch.zeros(6, dtype=torch.bool)
    assert torch.allclose(neighbourhood_loss(logits, idx, nb, none), instance_loss(logits, idx))
    assert torch.allclose(instance_loss(logits, idx), F.cross_entropy(logits, idx, reduction="none"))


def test_neighbourhood_loss_is_minus_log_of_summed_probabilities():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 10, generator=g)
    idx = torch.tensor([0, 4, 7])
    nb = torch.tensor([[2, 3], [5, 9], [1, 8]])
    sel = torch.tensor([True, False, True])
    p = torch.softmax(logits, dim=1)
    expected = torch.stack([
        -torch.log(p[0, [0, 2, 3]].sum()),  # AND Eq 3
        -torch.log(p[1, 4]),  # Eq 2
        -torch.log(p[2, [7, 1, 8]].sum()),
    ])
    assert torch.allclose(neighbourhood_loss(logits, idx, nb, sel), expected, atol=1e-6)
    # padding mask of the general set loss
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, True]])
    pos = torch.cat([idx[:, None], nb], 1)
    assert torch.allclose(positive_set_loss(logits, pos, mask), expected, atol=1e-6)


@pytest.mark.parametrize("selected", [False, True])
def test_autograd_gradients_match_eq_9_to_11(selected):
    """The paper derives the gradients treating the bank row of x_i as x_i itself. Build exactly that
    (bank = X, one leaf) and compare autograd with Eq 9 (instance) and Eq 10-11 (neighbourhood).
    Eq 10 as printed drops the x_k factors inside the sums; the derivation gives
    dL/dx_i = 1/T [sum_k p_ik x_k - sum_{k in N} p~_ik x_k + (p_ii - p~_ii) x_i]."""
    torch.manual_seed(3)
    n, d, t, i = 9, 5, 0.5, 2
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    neighbours = torch.tensor([[4, 7]])
    logits = x[[i]] @ x.T / t
    loss = neighbourhood_loss(logits, torch.tensor([i]), neighbours, torch.tensor([selected])).sum()
    (grad,) = torch.autograd.grad(loss, x)

    xd = x.detach()
    p = torch.softmax(xd[i] @ xd.T / t, dim=0)
    expected = torch.zeros_like(xd)
    if not selected:
        expected[i] = ((p[:, None] * xd).sum(0) + (p[i] - 2) * xd[i]) / t  # Eq 9, i
        for j in range(n):
            if j != i:
                expected[j] = p[j] * xd[i] / t  # Eq 9, j
    else:
        members = [i, 4, 7]
        pt = torch.zeros(n, dtype=torch.float64)
        pt[members] = p[members] / p[members].sum()  # p~ of Eq 10
        expected[i] = ((p[:, None] * xd).sum(0) - (pt[:, None] * xd).sum(0) + (p[i] - pt[i]) * xd[i]) / t
        for j in range(n):
            if j != i:
                expected[j] = (p[j] - pt[j]) * xd[i] / t  # Eq 11 (pt is 0 outside N_k)
    assert torch.allclose(grad, expected, atol=1e-10)


def test_round_structure_and_schedule():
    from deepclust.configure import build_config
    from deepclust.memory import MemoryBank
    from deepclust.methods import DiscoveryContext, Step, build_method

    cfg = build_config({"method": "and", "train": {"epochs": 3}, "options": {"rounds": 4}})
    m = build_method(cfg, 50)
    assert m.total_epochs() == 15
    assert [m.round_of(e) for e in (0, 2, 3, 5, 6, 14)] == [(0, 0), (0, 2), (1, 0), (1, 2), (2, 0), (4, 2)]
    assert [e for e in range(15) if m.needs_discovery(e)] == [3, 6, 9, 12]
    bank = MemoryBank(50, 8, seed=0)
    s = m.discover(DiscoveryContext(epoch=6, n_images=50, seed=0, device=torch.device("cpu"), bank=bank))
    # round 2 of 4: half the anchors
    assert int(s["selected"].sum()) == 25 and s["neighbours"].shape == (50, 1)
    m.set_structure(s)
    emb = F.normalize(torch.randn(4, 8), dim=1)
    idx = torch.tensor([0, 1, 2, 3])
    expected = neighbourhood_loss(bank.logits(emb), idx, s["neighbours"][idx], s["selected"][idx])
    step = Step(epoch=6, step=0, idx=idx, gidx=idx, positions=idx, outputs=[{"embedding": emb}], bank=bank)
    assert torch.allclose(m.batch_loss(step), expected)
    assert math.isfinite(float(expected.sum()))
