"""The JULE method (methods/jule.py): its pure parts without the loop (batches by cluster, the
length from the structure, one period's merges), then whole runs: the data-dependent end, SF and
RC both scored in metrics.json, and ``predict`` with either head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import smoke_layer

from deepclust.configure import build_config
from deepclust.methods.base import DiscoveryContext
from deepclust.methods.jule import FEATURES, Jule


def make(n: int, target: int = 10, epochs: int = 20, **options) -> Jule:
    cfg = build_config({"method": "jule", "cluster": {"n_clusters": target}, "train": {"epochs": epochs},
                        "options": options})
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
    m = make(2000, target=10, eta=0.9, epochs=20, planned_periods=5)
    assert m.total_epochs() == 100 == Jule.epochs_of(m.cfg)  # before any structure: the plan
    m.set_structure({"labels": torch.zeros(2000, dtype=torch.long), "period": torch.tensor(0),
                     "n_clusters": torch.tensor(500)})
    assert m.total_epochs() == 20 * (1 + 2)  # 500 -> 50 -> 10
    m.set_structure({"labels": torch.zeros(2000, dtype=torch.long), "period": torch.tensor(2),
                     "n_clusters": torch.tensor(10)})
    assert m.total_epochs() == 60


def test_discovery_merges_one_period_from_the_current_clusters():
    rng = np.random.default_rng(0)
    x = np.repeat(np.eye(16)[:4], 50, axis=0) * 3 + rng.normal(size=(200, 16)) * 0.3
    m = make(200, target=4, eta=0.9, k_s=10, epochs=20)
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


# -- whole runs (300 digits, the contract's smoke configuration: 2 epochs a period) -----------------


@pytest.fixture(scope="module")
def sf_run(tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp("jule") / "sf"
    from deepclust.runs import fit_run

    fit_run(build_config(smoke_layer("jule", f"npz:{small_npz}", out)))
    return out


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_the_run_ends_with_the_period_that_reaches_the_target(sf_run):
    log = _log(sf_run)
    periods = [r for r in log if "n_clusters" in r]  # one record per discovery
    epochs = 2
    assert [r["epoch"] for r in periods] == list(range(0, len(log), epochs))
    counts = [r["n_clusters"] for r in periods]
    assert counts[-1] == 10 and all(c > 10 for c in counts[:-1])  # the last period starts at n_c*
    assert len(log) == epochs * len(periods)  # and trains once, then the run stops
    planned = Jule.epochs_of(build_config(smoke_layer("jule", "digits", "/nonexistent")))
    assert planned != len(log)  # the length came from the structure, not the plan
    assert json.loads((sf_run / "metrics.json").read_text())["epochs"] == len(log)


def test_a_restored_method_stops_at_the_same_epoch(sf_run):
    from deepclust.methods import build_method
    from deepclust.train import read_checkpoint

    state = read_checkpoint(sf_run / "checkpoints" / "last.pt")
    fresh = build_method(build_config(state["config"]), 300, tap_dims={})
    assert fresh.total_epochs() == Jule.epochs_of(fresh.cfg)  # the plan, before the structure
    fresh.load_state_dict(state["methods"]["jule"])
    assert fresh.total_epochs() == len(_log(sf_run)) == state["epoch"] + 1


def test_sf_and_rc_both_scored_with_geometric_nmi(sf_run):
    m = json.loads((sf_run / "metrics.json").read_text())
    assert m["cluster_head"] == "method" and m["cluster_features"] == "embedding"  # SF, the default
    rows = {(h["head"], h["features"]): h for h in m["heads"]}
    sf, rc = rows[("method", "embedding")], rows[("agglomerative", "embedding")]
    assert sf["acc"] == m["acc"] and sf["nmi_geometric"] == m["nmi_geometric"]
    assert all(0 < h[k] <= 1 for h in (sf, rc) for k in ("acc", "nmi", "nmi_geometric"))
    sf_labels = np.load(sf_run / "labels.npy")
    assert np.unique(sf_labels).size == 10


@pytest.mark.parametrize("head", ["method", "agglomerative"])
def test_predict_new_images_with_sf_and_rc(tmp_path, small_npz, sf_run, head):
    from deepclust.inference import predict_run
    from deepclust.runs import fit_run

    run = sf_run
    if head != "method":
        run = tmp_path / "rc"
        fit_run(build_config(smoke_layer("jule", f"npz:{small_npz}", run, cluster={"head": head})))
    labels = np.load(run / "labels.npy")
    pred, images = predict_run(run, f"npz:{small_npz}")
    assert len(pred) == 300 and (pred == labels).mean() > 0.95  # the training images keep their clusters
    d = dict(np.load(small_npz))
    new = tmp_path / "new.npz"
    np.savez(new, images=d["images"][::-1].copy())
    again, _ = predict_run(run, f"npz:{new}")
    assert np.array_equal(again, pred[::-1])  # new images (here re-ordered): the same rule, row by row


# -- the network and the presets named after the paper (issue 44) ---------------------------------


@pytest.mark.parametrize("ip1,layers", [("linear", [torch.nn.Flatten, torch.nn.Linear]),
                                        ("bn_relu", [torch.nn.Flatten, torch.nn.Linear, torch.nn.BatchNorm1d,
                                                     torch.nn.ReLU])])
def test_options_ip1_builds_the_network_the_run_trains(ip1, layers):
    """``options.ip1`` reaches the network of a run (train.build_network: the Trainer, runfiles and
    inference all build it), and a run's saved configuration rebuilds the same one."""
    from deepclust.train import build_network

    cfg = build_config({"method": "jule", "net": {"backbone": "jule_cnn"}, "options": {"ip1": ip1}})
    net = build_network(cfg, (1, 16, 16))
    assert [type(m) for m in net.backbone.ip1] == layers
    again = build_network(build_config(cfg.to_dict()), (1, 16, 16))
    again.load_state_dict(net.state_dict())  # strict: the same layers


def test_ip1_is_refused_outside_its_choices():
    from deepclust.errors import ConfigError

    with pytest.raises(ConfigError, match="ip1"):
        build_config({"method": "jule", "options": {"ip1": "relu"}})


def test_the_paper_presets_have_the_papers_ip1_and_say_each_departure():
    """jule-usps / jule-mnist-test / jule-mnist: Table 9's Linear ip1 (measured better on digits and USPS,
    issue 44), the small-cluster rule on as a stated departure; jule-cpu keeps its measured bn_relu; a
    run without a preset gets the paper's ip1."""
    from deepclust.config import preset_path
    from deepclust.configure import load_config

    for name in ("jule-usps", "jule-mnist-test", "jule-mnist"):
        cfg = load_config(name)
        assert cfg.options.ip1 == "linear" and cfg.options.small_fraction == 0.05
        assert cfg.optim.momentum == 0.9 and cfg.optim.schedule == "inv" and cfg.views.preset == "none"
        comment = preset_path(name).read_text().split("\nmethod:")[0]
        for departure in ("small_fraction", "inv decay", "batches by cluster", "dampens"):
            assert departure in comment, (name, departure)
    assert load_config("jule-cpu").options.ip1 == "bn_relu"
    assert build_config({"method": "jule"}).options.ip1 == "linear"
