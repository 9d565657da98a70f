"""SCAN (Van Gansbeke et al., ECCV 2020) as deepclust's learned clustering stage: the loss against
independent computations, neighbour mining against brute force, the objective on synthetic features
where k-means fails, and the phase of a run (predict and evaluate through its kept head)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepclust.configure import build_config
from deepclust.errors import ConfigError
from deepclust.evaluate import clustering_scores
from deepclust.losses.scan import class_weights, scan_objective, scan_rows, self_label_rows
from deepclust.structure.clustering import kmeans
from deepclust.structure.knn import mine_neighbours


def _probabilities(shape, seed=0):
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2, dim=-1)


def test_scan_loss_is_eq_2_per_head_summed():
    """Global batch of 3 anchors and their 3 neighbours, 2 heads, K = 4: the rows' terms averaged
    equal, per head, -1/3 sum log <p_anchor, p_neighbour> + 5 sum_c mean_c log mean_c, added over heads,
    written out with plain Python loops."""
    p = _probabilities((6, 2, 4)).double()
    a = 3
    partner = p[[3, 4, 5, 0, 1, 2]]
    got = scan_rows(p, partner, p[:a].mean(0), 5.0).sum() / 6
    want = 0.0
    for h in range(2):
        pairs = [-math.log(sum(p[i, h, c].item() * p[i + a, h, c].item() for c in range(4))) for i in range(a)]
        mean = [sum(p[i, h, c].item() for i in range(a)) / a for c in range(4)]
        want += sum(pairs) / a + 5.0 * sum(m * math.log(m) for m in mean)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_scan_loss_gradient_flows_to_both_sides_and_the_entropy_weight_matters():
    logits = torch.randn(4, 1, 3, requires_grad=True, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, -1)
    loss = scan_rows(p, p[[2, 3, 0, 1]], p[:2].mean(0), 0.0).sum()
    loss.backward()
    assert (logits.grad.abs().sum((1, 2)) > 0).all()
    q = _probabilities((4, 1, 3))
    strong, weak = (scan_rows(q, q[[2, 3, 0, 1]], q[:2].mean(0), w).sum() for w in (5.0, 1.0))
    assert strong < weak


def test_scan_objective_matches_a_loop_over_all_pairs():
    p = _probabilities((7, 3, 4), seed=2).double()
    nb = torch.tensor([[(i + 1) % 7, (i + 3) % 7] for i in range(7)])
    got = scan_objective(p, nb, 2.0, block=3)  # blocks of rows: the same value
    for h in range(3):
        cons = np.mean([-math.log(float(p[i, h] @ p[j, h])) for i in range(7) for j in nb[i].tolist()])
        mean = p[:, h].double().mean(0)
        assert got[h].item() == pytest.approx(cons + 2.0 * float((mean * mean.log()).sum()), rel=1e-10)


def test_self_labelling_is_the_weighted_cross_entropy_of_the_confident_rows():
    """Per-row terms / B = F.cross_entropy(weight=n / count_c) over the confident rows (the authors'
    ConfidenceBasedCE); unconfident rows contribute nothing."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 3, generator=g)
    targets = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    confident = torch.tensor([True, True, True, True, False, True, False, False])
    w = class_weights(targets, confident, 3, balance=True)
    assert w.tolist() == pytest.approx([5 / 3, 5 / 1, 5 / 1])  # counts 3, 1, 1 of 5 confident
    weight_sum = (w[targets] * confident.float()).sum()
    rows = self_label_rows(logits, targets, confident, w, weight_sum, 8)
    want = F.cross_entropy(logits[confident], targets[confident], weight=w)
    assert (rows.sum() / 8).item() == pytest.approx(want.item(), rel=1e-6)
    assert (rows[~confident] == 0).all()
    assert class_weights(targets, confident, 3, balance=False).tolist() == [1.0, 1.0, 1.0]


def test_class_balance_gives_every_confident_cluster_the_same_total_weight():
    """The guard against collapse: a cluster with 1 confident row weighs as much as one with 90."""
    targets = torch.tensor([0] * 90 + [1] * 9 + [2])
    w = class_weights(targets, torch.ones(100, dtype=torch.bool), 4, balance=True)
    totals = torch.bincount(targets, weights=w[targets], minlength=4)
    assert totals[:3].tolist() == pytest.approx([100.0] * 3)
    assert w[3] == 1.0  # a cluster without confident rows keeps weight 1 (no rows to weigh)


def test_mined_neighbours_are_the_k_nearest_others_by_cosine():
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    got = mine_neighbours(x, 5)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    want = np.argsort(-s, axis=1)[:, :5]
    assert got.shape == (50, 5) and got.dtype == np.int64
    assert (np.sort(got, 1) == np.sort(want, 1)).all()
    assert mine_neighbours(x[:3], 20).shape == (3, 2)  # k cut to N - 1
    assert isinstance(mine_neighbours(torch.from_numpy(x), 5), torch.Tensor)


def _segments(seed: int, n_per: int = 150, k: int = 4, d: int = 10):
    """k thin segments of length 20 in random directions, centres about 3 apart, whitened: linearly
    separable, every neighbourhood within one segment, and k-means cuts across them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres *= 3 / np.linalg.norm(centres - centres.mean(0), axis=1, keepdims=True).mean()
    dirs = rng.normal(size=(k, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    x = np.concatenate([c + rng.uniform(-10, 10, (n_per, 1)) * v + rng.normal(0, 0.05, (n_per, d))
                        for c, v in zip(centres, dirs)])
    x -= x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return (x @ vt.T / s * np.sqrt(len(x))).astype(np.float32), np.repeat(np.arange(k), n_per)


def _train_heads(f: torch.Tensor, neighbours: torch.Tensor, k: int, heads: int, epochs: int) -> torch.Tensor:
    """SCAN's step on fixed features: linear heads, anchors with a random mined neighbour each, Adam."""
    torch.manual_seed(0)
    net = torch.nn.Linear(f.shape[1], heads * k)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for a in torch.randperm(len(f), generator=g).split(100):
            rows = torch.cat([a, neighbours[a, torch.randint(neighbours.shape[1], (len(a),), generator=g)]])
            p = torch.softmax(net(f[rows]).view(len(rows), heads, k), -1)
            n = len(a)
            loss = scan_rows(p, p[(torch.arange(2 * n) + n) % (2 * n)], p[:n].mean(0), 5.0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.softmax(net(f).view(len(f), heads, k), -1)


@pytest.mark.parametrize("seed", [0, 3])
def test_heads_recover_elongated_clusters_where_kmeans_fails(seed):
    """Thin segments in random directions: k-means (ACC < 0.85) cuts across them; of 10 SCAN heads
    several stop in a cut too, and the one with the lowest Eq 2 (no labels) is the truth."""
    x, truth = _segments(seed)
    lifted = np.concatenate([x, np.full((len(x), 1), 30.0, np.float32)], 1)  # cosine ~ Euclidean locally
    neighbours = torch.from_numpy(mine_neighbours(lifted, 20))
    assert (truth[neighbours.numpy()] == truth[:, None]).mean() > 0.99
    km, _, _ = kmeans(x, 4, seed=0)
    assert clustering_scores(truth, km)["acc"] < 0.85
    p = _train_heads(torch.from_numpy(x), neighbours, 4, heads=10, epochs=50)
    accs = [clustering_scores(truth, p[:, h].argmax(1).numpy())["acc"] for h in range(10)]
    best = int(scan_objective(p, neighbours, 5.0).argmin())
    assert accs[best] > 0.99, accs
    assert min(accs) < 0.9  # the choice matters: not every head finds it


# -- the phase of a run ------------------------------------------------------------------------------


def _scan_layer(data: str, out, **extra) -> dict:
    from conftest import smoke_layer

    return smoke_layer("instance+scan", data, out, **extra)


@pytest.mark.parametrize("normalise", [False, True])
def test_a_scan_run_predicts_and_evaluates_through_its_kept_head(tmp_path, small_npz, normalise):
    """The kept head as an affine map (with the standardising BatchNorm folded in) gives new images
    the clusters the run gave them."""
    from deepclust.heads import ClusterHead
    from deepclust.inference import evaluate_run, predict_run
    from deepclust.runs import fit_run

    out = tmp_path / "run"
    metrics = fit_run(build_config(_scan_layer(f"npz:{small_npz}", out, scan={"normalise": normalise})))
    assert metrics["cluster_head"] == "scan" and metrics["cluster_features"] == "backbone"
    assert any(h["head"] == "scan" for h in metrics["heads"])  # scored beside the post-hoc heads
    head = ClusterHead.load(out / "head.npz")
    assert head.kind == "linear" and head.weight.shape[0] == 10
    labels = np.load(out / "labels.npy")
    predicted, _ = predict_run(out, f"npz:{small_npz}")
    assert (predicted == labels).all()
    again = evaluate_run(out, write=False)
    assert again["cluster_sizes"] == metrics["cluster_sizes"]
    log = [__import__("json").loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["", "", "scan", "scan", "self-label", "self-label"]
    assert "neighbour_purity" in log[2] and "scan_head" in log[4]


def test_scan_reads_the_backbone_or_the_embedding_only(tmp_path, small_npz):
    from deepclust.runs import fit_run

    layer = _scan_layer(f"npz:{small_npz}", tmp_path / "run", cluster={"features": "conv1"},
                        net={"backbone": "jule_cnn"})
    with pytest.raises(ConfigError, match="backbone or the embedding"):
        fit_run(build_config(layer))


def test_the_kept_head_leaves_no_cluster_empty_when_a_head_can():
    """Head 0 has the lower Eq 2 but its argmax never gives cluster 2; head 1 uses all three."""
    from deepclust.methods.scan import Scan, clusters_used

    p = torch.tensor([[[0.98, 0.01, 0.01], [0.6, 0.2, 0.2]],
                      [[0.98, 0.01, 0.01], [0.6, 0.2, 0.2]],
                      [[0.01, 0.98, 0.01], [0.2, 0.6, 0.2]],
                      [[0.01, 0.98, 0.01], [0.2, 0.2, 0.6]]])
    assert clusters_used(p).tolist() == [2, 3]
    nb = torch.tensor([[1], [0], [3], [2]])
    assert scan_objective(p, nb, 1.0).argmin() == 0
    cfg = build_config({"cluster": {"n_clusters": 3, "head": "scan", "features": "backbone"},
                        "scan": {"heads": 2, "entropy_weight": 1.0}})
    phase = Scan(cfg, 4, {"backbone": 4})
    phase.set_structure({"neighbours": nb})
    assert phase.lowest_loss_head(p) == 1
    assert phase.lowest_loss_head(p[:, :1]) == 0  # no head uses all: the lowest Eq 2


def test_the_phase_discovers_without_mutating_and_sets_its_structure_idempotently():
    """The lifecycle of methods/base.py: discover returns the neighbours (then the chosen head with
    them) and changes nothing; set_structure any number of times gives the same state."""
    from deepclust.methods import DiscoveryContext
    from deepclust.methods.scan import EMBEDDING, PROBABILITIES, Scan

    cfg = build_config({"cluster": {"n_clusters": 3, "head": "scan", "features": "backbone"},
                        "scan": {"heads": 2, "neighbours": 4, "epochs": 2, "self_label_epochs": 1}})
    phase = Scan(cfg, 30, {"backbone": 8})
    assert [e for e in range(phase.total_epochs()) if phase.needs_discovery(e)] == [0, 2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g)
    ctx = DiscoveryContext(epoch=0, n_images=30, seed=0, device=torch.device("cpu"), passes={EMBEDDING: x})
    before = {k: v.clone() for k, v in phase.modules.state_dict().items()}
    s0 = phase.discover(ctx)
    assert phase.structure is None and set(s0) == {"neighbours"}
    assert torch.equal(s0["neighbours"], torch.from_numpy(mine_neighbours(x.numpy(), 4)))
    for _ in range(2):
        phase.set_structure(s0)
    p = torch.softmax(torch.randn(30, 2, 3, generator=g), -1)
    ctx2 = DiscoveryContext(epoch=2, n_images=30, seed=0, device=torch.device("cpu"), passes={PROBABILITIES: p})
    s2 = phase.discover(ctx2)
    assert phase.structure is s0 and torch.equal(s2["neighbours"], s0["neighbours"])
    assert int(s2["best"]) == phase.lowest_loss_head(p)
    assert all(torch.equal(before[k], v) for k, v in phase.modules.state_dict().items())
    assert [len(b) for b in phase.batches(0, 30, 10, 0)] == [10] * 6  # 5 anchors + their 5 neighbours
    batches = phase.batches(0, 30, 10, 0)
    assert sorted(torch.cat([b[:5] for b in batches]).tolist()) == list(range(30))  # every image an anchor
    assert all(int(b[5 + i]) in s0["neighbours"][int(b[i])].tolist() for b in batches for i in range(5))


def test_the_library_fits_and_predicts_through_the_scan_head():
    from deepclust import Clusterer
    from deepclust.data import load_images

    x = load_images("digits").images[:300]
    est = Clusterer(method="instance", n_clusters=10, epochs=1, progress=False, threads=1, batch_size=64,
                    cluster_head="scan", settings={"scan.epochs": 1, "scan.heads": 2}).fit(x)
    assert est.head_.kind == "linear"
    assert (est.predict(x) == est.labels_).all()


@pytest.mark.parametrize("normalise", [False, True])
def test_the_assignment_map_is_the_kept_head_in_eval_mode(normalise):
    """A x + c equals the kept head's logits (the standardising BatchNorm's running statistics
    folded in), so predict on new images gives the head's own argmax."""
    from deepclust.methods.scan import Scan

    cfg = build_config({"cluster": {"n_clusters": 4, "head": "scan", "features": "backbone"},
                        "scan": {"heads": 3, "normalise": normalise}})
    phase = Scan(cfg, 10, {"backbone": 6})
    g = torch.Generator().manual_seed(0)
    if normalise:
        bn = phase.modules["heads"][0]
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    phase.set_structure({"neighbours": torch.zeros(10, 2, dtype=torch.long), "best": torch.tensor(2)})
    phase.modules.eval()
    x = torch.randn(20, 6, generator=g) * 3
    with torch.no_grad():
        logits = phase.forward({"backbone": x})["cluster_logits"][:, 2]
    layer, a, c = phase.assignment_map()
    assert layer == "backbone"
    assert np.allclose(x.numpy() @ a.T + c, logits.numpy(), atol=1e-4)


def test_a_frozen_backbone_leaves_the_network_as_the_method_left_it(tmp_path, small_npz):
    """scan.backbone: frozen trains the heads alone: the run's embeddings equal those of the same run
    without the phase (the method's epochs are the same, the network in eval mode afterwards)."""
    from conftest import smoke_layer

    from deepclust.runs import fit_run

    fit_run(build_config(smoke_layer("instance", f"npz:{small_npz}", tmp_path / "plain")))
    fit_run(build_config(_scan_layer(f"npz:{small_npz}", tmp_path / "frozen", scan={"backbone": "frozen"})))
    plain, frozen = (np.load(tmp_path / d / "embeddings.npy") for d in ("plain", "frozen"))
    assert np.array_equal(plain, frozen)
    log = [__import__("json").loads(line) for line in (tmp_path / "frozen" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log[2:]] == ["scan", "scan", "self-label", "self-label"]
