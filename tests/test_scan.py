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
    from deepclust.methods import DiscoveryContext, FeatureRequest
    from deepclust.methods.scan import EMBEDDING, PROBABILITIES, Scan

    cfg = build_config({"cluster": {"n_clusters": 3, "head": "scan", "features": "backbone"},
                        "scan": {"heads": 2, "neighbours": 4, "epochs": 2, "self_label_epochs": 1}})
    phase = Scan(cfg, 30, {"backbone": 8})
    assert [e for e in range(phase.total_epochs()) if phase.needs_discovery(e)] == [0, 1, 2]
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
    ctx2 = DiscoveryContext(epoch=2, n_images=30, seed=0, device=torch.device("cpu"),
                            passes={PROBABILITIES: p, FeatureRequest("backbone"): x})
    s2 = phase.discover(ctx2)
    assert phase.structure is s0 and torch.equal(s2["neighbours"], s0["neighbours"])
    assert int(s2["best"]) == int(s2["kept_slot"]) == phase.lowest_loss_head(p) and bool(s2["kept_live"])
    assert int(s2["kept_epoch"]) == 1  # the epoch that trained the heads this pass scored
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


# -- the head kept across epochs, chosen as SCAN chooses it ---------------------------------------


def _blobs(n_per: int = 20, k: int = 3, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """k tight blobs along orthogonal directions: every mined neighbour within its blob."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    x = 5 * np.eye(d)[y] + rng.normal(0, 0.1, (len(y), d))
    return torch.from_numpy(x.astype(np.float32)), y


def _phase(x: torch.Tensor, k: int = 3, heads: int = 3, **scan):
    from deepclust.methods.scan import Scan

    cfg = build_config({"cluster": {"n_clusters": k, "head": "scan", "features": "backbone"},
                        "scan": {"heads": heads, "neighbours": 4, **scan}})
    phase = Scan(cfg, len(x), {"backbone": x.shape[1]})
    phase.set_structure({"neighbours": torch.from_numpy(mine_neighbours(x.numpy(), 4))})
    return phase


def _discover(phase, x: torch.Tensor, epoch: int):
    """The phase's discovery of ``epoch`` on the pass its modules give ``x`` (eval mode), as the loop runs it."""
    from deepclust.methods import DiscoveryContext, FeatureRequest
    from deepclust.methods.scan import PROBABILITIES

    phase.modules.eval()
    with torch.no_grad():
        p = phase.forward({"backbone": x})["cluster_probabilities"]
    passes = {PROBABILITIES: p, FeatureRequest("backbone"): x}
    ctx = DiscoveryContext(epoch=epoch, n_images=len(x), seed=0, device=torch.device("cpu"), passes=passes)
    return phase.discover(ctx), ctx


def test_heads_are_chosen_with_the_entropy_weighed_1_as_scan_evaluate():
    """Head 0 follows the data's 6:2 split and keeps every pair together; head 1 splits 4:4 across
    pairs. Eq 2 with the training lambda 5 prefers head 1; SCAN's evaluation (lambda 1) head 0, and
    so does the stage, whatever its training lambda."""
    from deepclust.methods.scan import SELECTION_ENTROPY_WEIGHT, Scan

    a = torch.tensor([[0.99, 0.01]] * 6 + [[0.01, 0.99]] * 2)
    b = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4)
    p = torch.stack([a, b], dim=1)  # (8, 2 heads, 2)
    nb = torch.tensor([[1, 2], [0, 2], [0, 1], [2, 1], [5, 3], [4, 3], [7, 6], [6, 7]])
    assert scan_objective(p, nb, 5.0).argmin() == 1 and scan_objective(p, nb, 1.0).argmin() == 0
    assert SELECTION_ENTROPY_WEIGHT == 1.0
    cfg = build_config({"cluster": {"n_clusters": 2, "head": "scan", "features": "backbone"},
                        "scan": {"heads": 2, "entropy_weight": 5.0}})
    phase = Scan(cfg, 8, {"backbone": 4})
    phase.set_structure({"neighbours": nb})
    assert phase.lowest_loss_head(p) == 0


def test_the_head_of_an_earlier_epoch_is_kept_when_later_epochs_score_worse():
    """After epoch 0 head 1 separates the blobs; the next epochs leave every head worse (random
    weights): the kept head is epoch 0's, whose map gives the run's clusters and ``predict``."""
    x, y = _blobs()
    phase = _phase(x, epochs=3)
    linear = phase.modules["heads"][-1]
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
        linear.bias.zero_()
        linear.weight[3:6] = torch.eye(3, 6)  # head 1: the blobs' own directions
    s1, _ = _discover(phase, x, 1)
    assert int(s1["kept_epoch"]) == 0 and int(s1["kept_slot"]) == 1 and bool(s1["kept_live"])
    phase.set_structure(s1)
    with torch.no_grad():
        linear.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(2))
    s2, ctx = _discover(phase, x, 2)
    assert not bool(s2["kept_live"]) and int(s2["kept_epoch"]) == 0
    assert float(s2["kept_loss"]) == pytest.approx(float(s1["kept_loss"]), rel=1e-6)  # the same features
    assert torch.equal(s2["kept_weight"], s1["kept_weight"]) and "best" not in s2
    phase.set_structure(s2)
    assert phase.reset_parameters() == []  # not the self-labelling's start: the heads stay as trained
    labels = phase.final_clusters(ctx)
    assert clustering_scores(y, labels)["acc"] == 1.0 and phase.best is None
    layer, a, c = phase.assignment_map()
    assert np.array_equal((x.numpy() @ a.T + c).argmax(1), labels)
    assert np.array_equal(a, s1["kept_weight"].numpy())


@pytest.mark.parametrize("normalise", [False, True])
def test_self_labelling_starts_from_the_head_kept_across_epochs(normalise):
    """At the self-labelling's discovery an earlier epoch's kept head goes into the slot it trains:
    that slot's eval-mode map (the standardising BatchNorm folded in) is then the kept map, and the
    Linear's optimiser state is dropped (its parameters returned)."""
    x, _ = _blobs()
    phase = _phase(x, epochs=2, self_label_epochs=1, normalise=normalise)
    *norm, linear = phase.modules["heads"]
    g = torch.Generator().manual_seed(3)
    if normalise:
        norm[0].running_mean.copy_(torch.randn(6, generator=g))
        norm[0].running_var.copy_(torch.rand(6, generator=g) + 0.5)
    kept_w, kept_b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    phase.set_structure({**phase.structure, "kept_weight": kept_w, "kept_bias": kept_b, "kept_epoch": torch.tensor(0),
                         "kept_loss": torch.tensor(0.0, dtype=torch.float64), "kept_slot": torch.tensor(2),
                         "kept_live": torch.tensor(False), "best": torch.tensor(2)})
    before = linear.weight[:6].clone()
    params = phase.reset_parameters()
    assert params == [linear.weight, linear.bias]
    a, c = phase.head_map(2)
    assert torch.allclose(a, kept_w, atol=1e-5) and torch.allclose(c, kept_b, atol=1e-5)
    assert torch.equal(linear.weight[:6], before)  # the other heads untouched


@pytest.mark.slow
def test_the_kept_head_survives_a_kill_and_resume(tmp_path, small_npz):
    """Three SCAN epochs without self-labelling, killed in the third after its log record: the head
    kept at the second epoch's discovery comes back from the checkpoint, and the resumed run's log
    (the kept epoch and loss each epoch), clusters and saved head equal the uninterrupted run's."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    from deepclust.runs import fit_run, resume_run

    def layer(out):
        return _scan_layer(f"npz:{small_npz}", out, scan={"epochs": 3, "self_label_epochs": 0})

    fit_run(build_config(layer(tmp_path / "ref")))
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    spec = {"layers": {"instance+scan": layer(tmp_path / "run")}, "kill_epoch": 4}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "_workers.py"), "kill", json.dumps(spec)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    resume_run(build_config({"out": str(tmp_path / "run"), "train": {"progress": False}}))
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("ref", "run")]
    assert [r.get("scan_kept_epoch") for r in logs[0]][3:] == [r.get("scan_kept_epoch") for r in logs[1]][3:]
    assert all("scan_kept_epoch" in r for r in logs[0][3:])  # discoveries at the second and third SCAN epochs
    assert len(logs[0]) == len(logs[1])
    for mine, theirs in zip(logs[1], logs[0]):
        keys = {k for k in mine.keys() | theirs.keys() if "seconds" not in k and k != "images_per_second"}
        for k in keys:
            a, b = mine.get(k), theirs.get(k)
            numbers = isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
            assert (a == pytest.approx(b, rel=1e-6, abs=1e-9)) if numbers else a == b, (k, mine, theirs)
    assert np.array_equal(np.load(tmp_path / "run" / "labels.npy"), np.load(tmp_path / "ref" / "labels.npy"))
    heads = [np.load(tmp_path / d / "head.npz") for d in ("ref", "run")]
    assert np.array_equal(heads[0]["weight"], heads[1]["weight"])
