"""The DRAFT JULE method (methods/jule.py, not registered yet): its pure parts, without the loop."""

from __future__ import annotations

import types

import numpy as np
import torch

from deepclust.methods.base import DiscoveryContext
from deepclust.methods.jule import FEATURES, Jule, JuleOptions


def make(n: int, target: int = 10, **options) -> Jule:
    cfg = types.SimpleNamespace(options=JuleOptions(**options), cluster=types.SimpleNamespace(n_clusters=target),
                                train=types.SimpleNamespace(seed=0))
    return Jule(cfg, n, {})


def test_batches_hold_every_image_once_with_same_cluster_rows():
    m = make(1000, per_cluster=4)
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 50, 1000))
    m.set_structure({"labels": labels, "period": torch.tensor(0), "n_clusters": torch.tensor(50)})
    batches = m.batches(3, 1000, 100, seed=1)
    assert sorted(torch.cat(batches).tolist()) == list(range(1000))
    for b in batches:
        lab = labels[b]
        same = (lab[:, None] == lab[None, :]).sum(1) - 1
        assert (same >= 1).float().mean() > 0.9  # nearly every row has a positive in its batch
        assert lab.unique().numel() >= 15  # and many clusters give negatives
    again = m.batches(3, 1000, 100, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded by (seed, epoch)


def test_periods_until_the_target_set_the_length():
    m = make(2000, target=10, eta=0.9, period_epochs=20)
    m.set_structure({"labels": torch.zeros(2000, dtype=torch.long), "period": torch.tensor(0),
                     "n_clusters": torch.tensor(500)})
    assert m.total_epochs() == 20 * (1 + 2)  # 500 -> 50 -> 10
    m.set_structure({"labels": torch.zeros(2000, dtype=torch.long), "period": torch.tensor(2),
                     "n_clusters": torch.tensor(10)})
    assert m.total_epochs() == 60


def test_discovery_merges_one_period_from_the_current_clusters():
    rng = np.random.default_rng(0)
    x = np.repeat(np.eye(16)[:4], 50, axis=0) * 3 + rng.normal(size=(200, 16)) * 0.3
    m = make(200, target=4, eta=0.9, k_s=10)
    images = torch.from_numpy(((x - x.min()) / np.ptp(x) * 255).astype(np.uint8)).reshape(200, 1, 4, 4)
    s0 = m.discover(DiscoveryContext(epoch=0, n_images=200, seed=0, device=torch.device("cpu"), images=images))
    m.set_structure(s0)
    n0 = int(s0["n_clusters"])
    assert 200 / n0 > 2  # 1-NN components of several images
    ctx = DiscoveryContext(epoch=20, n_images=200, seed=0, device=torch.device("cpu"),
                           passes={FEATURES: torch.tensor(x, dtype=torch.float32)})
    s1 = m.discover(ctx)
    assert int(s1["n_clusters"]) == max(4, n0 - int(np.ceil(0.9 * n0))) and int(s1["period"]) == 1
    assert torch.equal(m.structure["labels"], s0["labels"])  # discover mutates nothing
