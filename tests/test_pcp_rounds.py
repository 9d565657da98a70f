"""PCP on crafted cases: the vote history restarts each round (the round check in the history is
live: without it round 1 would vote with round 0's clusterings), and the per-epoch purification
diagnostics (single-instance share without labels, purity of the purified sets with them)."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli, smoke_layer
from deepclust.configure import build_config
from deepclust.methods import DiscoveryContext, build_method

N = 120


def pcp(**options):
    layer = smoke_layer("pcp", "digits", "/nonexistent")
    layer["options"] = {**layer.get("options", {}), **options}
    cfg = build_config(layer)
    method = build_method(cfg, N, tap_dims={"backbone": 24, "embedding": 128}, tap_shapes={}, shallow_layer="conv2")
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(6, method.bank.dim, generator=g)  # six tight groups in the bank
    method.bank.fill(centres[torch.arange(N) % 6] + 0.05 * torch.randn(N, method.bank.dim, generator=g))
    return method


def context(method, epoch):
    return DiscoveryContext(epoch=epoch, n_images=N, seed=3, device=torch.device("cpu"), bank=method.bank,
                            passes={}, images=torch.zeros(N, 1, 8, 8, dtype=torch.uint8))


def test_vote_history_restarts_with_each_round():
    # 2 rounds of 5 epochs, clusters from each round's first epoch (no PC), history of 2 from epoch 1
    method = pcp(rounds=2, progressive=False, floor=6, history=2, vote_from=0.2)
    held, voted = [], []
    for epoch in range(method.total_epochs()):
        s = method.discover(context(method, epoch))
        method.set_structure(s)
        held.append(len(s["past"]))
        voted.append(bool(s["voting"]))
    assert held == [0, 1, 2, 2, 2, 0, 1, 2, 2, 2]  # round 1 starts empty (carried over it would be 2)
    assert voted == [False, False, False, True, True, False, False, False, True, True]


def test_purification_diagnostics_on_crafted_clusters():
    method = pcp()
    targets = torch.tensor([0, 0, 0, 1, 1, 1, -1, -1, -1, -1])  # -1: single instance (Eq 4)
    raw = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1, 1, 0])  # the k-means clusters they were purified from
    method.set_structure({"targets": targets, "labels": raw, "epoch": torch.tensor(3)})
    labels = np.array([0, 0, 1, 2, 2, 2, 0, 1, 2, 3])
    d = method.describe(labels)
    assert d["clusters"] == 2 and d["single_fraction"] == 0.4
    assert d["purity"] == pytest.approx(5 / 6, abs=1e-4)  # 2 of 3 and 3 of 3 share their majority class
    assert d["raw_purity"] == pytest.approx(0.7, abs=1e-4)  # 3 of 5 and 4 of 5
    blind = method.describe(None)  # without labels: the label-free share alone
    assert blind == {"clusters": 2, "single_fraction": 0.4}
    method.set_structure(None)  # before any clustering: all single instances, no purified set
    assert method.describe(labels) == {"clusters": 0, "single_fraction": 1.0, "purity": None}


def test_every_epoch_logs_the_purification(tmp_path, small_npz):
    out = tmp_path / "run"
    proc = run_cli("fit", "--method", "pcp", "--data", f"npz:{small_npz}", "--epochs", "4", "--out", str(out),
                   "--n-clusters", "10", "--backbone", "mlp", "--no-progress", "--batch-size", "64",
                   "--set", "options.floor=10", "--set", "train.threads=1")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert 0.0 <= r["single_fraction"] <= 1.0 and "purity" in r
    assert records[-1]["single_fraction"] < 1.0 and 0.0 < records[-1]["purity"] <= 1.0
