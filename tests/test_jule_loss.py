"""JULE's weighted triplet loss (losses/jule.py, Eq 35) against an independent computation, under a
split into processes, and under gradient descent on a tiny case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepclust.errors import ConfigError, DataError
from deepclust.losses.jule import weighted_triplet_loss


def independent(z: np.ndarray, labels: np.ndarray, k_c: int, gamma: float, margin: float) -> np.ndarray:
    """Each anchor: all same-cluster others as positives, its K_c nearest other-cluster rows as
    negatives, the mean of max(0, gamma d_ij - d_ik + margin), written with loops."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    out = np.zeros(len(z))
    for i in range(len(z)):
        dist = {j: float(((z[i] - z[j]) ** 2).sum()) for j in range(len(z))}
        pos = [j for j in range(len(z)) if j != i and labels[j] == labels[i]]
        neg = sorted((j for j in range(len(z)) if labels[j] != labels[i]), key=lambda j: dist[j])[:k_c]
        terms = [max(0.0, gamma * dist[j] - dist[k] + margin) for j in pos for k in neg]
        out[i] = np.mean(terms) if terms else 0.0
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k_c", [1, 5])
def test_value_equals_independent_computation(seed, k_c):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(24, 6))
    labels = rng.integers(0, 5, 24)
    labels[0] = 7  # a row alone in its cluster: no positive, term 0
    t = torch.tensor(z)
    lab = torch.tensor(labels)
    got = weighted_triplet_loss(t, lab, t, lab, torch.arange(24), k_c=k_c).numpy()
    np.testing.assert_allclose(got, independent(z, labels, k_c, 2.0, 0.2), rtol=1e-10, atol=1e-12)
    assert got[0] == 0.0


def test_processes_add_up_to_one_process():
    """Rows split over 3 'processes' against the same global batch: the same terms and the same
    gradient as one process (the contract's DDP rule)."""
    rng = np.random.default_rng(3)
    z = torch.tensor(rng.normal(size=(12, 4)), requires_grad=True)
    lab = torch.tensor(rng.integers(0, 3, 12))
    one = weighted_triplet_loss(z, lab, z, lab, torch.arange(12))
    (g_one,) = torch.autograd.grad(one.sum(), z)
    parts = [weighted_triplet_loss(z[s], lab[s], z, lab, torch.arange(12)[s])
             for s in (slice(0, 4), slice(4, 9), slice(9, 12))]
    torch.testing.assert_close(torch.cat(parts), one)
    (g_split,) = torch.autograd.grad(sum(p.sum() for p in parts), z)
    torch.testing.assert_close(g_split, g_one)


def test_gradient_steps_pull_positives_and_push_negatives():
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(9, 3)), requires_grad=True)
    lab = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    same = (lab[:, None] == lab[None, :]) & ~torch.eye(9, dtype=torch.bool)
    other = lab[:, None] != lab[None, :]

    def mean_distances():
        x = torch.nn.functional.normalize(z.detach(), dim=1)
        d = torch.cdist(x, x) ** 2
        return d[same].mean().item(), d[other].mean().item()

    pos0, neg0 = mean_distances()
    opt = torch.optim.SGD([z], lr=0.1)
    for _ in range(30):
        opt.zero_grad()
        weighted_triplet_loss(z, lab, z, lab, torch.arange(9)).mean().backward()
        opt.step()
    pos1, neg1 = mean_distances()
    assert pos1 < 0.5 * pos0
    assert neg1 > neg0


def test_bad_input_is_refused():
    z = torch.zeros(4, 3)
    lab = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError):
        weighted_triplet_loss(z, lab, z, lab, torch.arange(4), k_c=0)
    with pytest.raises(DataError):
        weighted_triplet_loss(z, lab[:3], z, lab, torch.arange(4))
    with pytest.raises(DataError):
        weighted_triplet_loss(z, lab, torch.zeros(4, 2), lab, torch.arange(4))
