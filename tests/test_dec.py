"""DEC (Xie, Girshick & Farhadi, ICML 2016) as deepclust's clustering stage ``dec``: Eq 1-3 against
hand computations, the gradients against Sec 3.1.3's Eq 4-5, the target's properties, the structure
lifecycle, the assignment map against argmax q, and a run of the stage through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli

from deepclust.configure import build_config
from deepclust.errors import ConfigError
from deepclust.losses.dec import dec_rows, kl_rows, log_soft_assignment, soft_assignment, target_distribution

Z = [[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]]
MU = [[0.0, 1.0], [2.0, 0.0]]


def _q_by_hand(z, mu, alpha):
    rows = []
    for zi in z:
        k = [(1 + sum((a - b) ** 2 for a, b in zip(zi, m)) / alpha) ** (-(alpha + 1) / 2) for m in mu]
        rows.append([v / sum(k) for v in k])
    return rows


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_soft_assignment_is_eq_1(alpha):
    """z_0 = (0, 0): |z - mu|^2 = 1 and 4, so with alpha = 1 the kernels are 1/2 and 1/5, q = (5/7, 2/7)."""
    got = soft_assignment(torch.tensor(Z, dtype=torch.float64), torch.tensor(MU, dtype=torch.float64), alpha)
    assert got.tolist() == [pytest.approx(r, rel=1e-12) for r in _q_by_hand(Z, MU, alpha)]
    if alpha == 1.0:
        assert got[0].tolist() == pytest.approx([5 / 7, 2 / 7], rel=1e-12)
    far = soft_assignment(torch.tensor([[1e4, 0.0]]), torch.tensor(MU), alpha)  # no underflow, rows sum to 1
    assert torch.isfinite(far).all() and far.sum().item() == pytest.approx(1.0)


def test_target_is_eq_3():
    q = torch.tensor(_q_by_hand(Z, MU, 1.0), dtype=torch.float64)
    f = [sum(q[i, j].item() for i in range(3)) for j in range(2)]
    want = []
    for i in range(3):
        w = [q[i, j].item() ** 2 / f[j] for j in range(2)]
        want.append([v / sum(w) for v in w])
    got = target_distribution(q)
    assert got.tolist() == [pytest.approx(r, rel=1e-12) for r in want]


def test_the_target_strengthens_confident_rows_and_weighs_clusters_by_their_frequency():
    """Sec 3.1.2's aims: rows sum to 1; with equal cluster frequencies every row's largest share
    grows (and its argmax stays); a row split evenly between a large and a small cluster leans to
    the small one (p_ij / p_ik = (q_ij / q_ik)^2 f_k / f_j)."""
    q = torch.softmax(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), 1).double()
    q = torch.cat([q, q.roll(1, 1), q.roll(2, 1), q.roll(3, 1)])  # every cluster the same frequency
    p = target_distribution(q)
    assert torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype))
    assert (p.max(1).values >= q.max(1).values - 1e-12).all() and torch.equal(p.argmax(1), q.argmax(1))
    skewed = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    p = target_distribution(skewed)
    f = skewed.sum(0)
    assert p[0, 0] < 0.5 < p[0, 1]
    ratio = (skewed[1, 0] / skewed[1, 1]) ** 2 * f[1] / f[0]
    assert (p[1, 0] / p[1, 1]).item() == pytest.approx(ratio.item(), rel=1e-12)


def test_kl_is_eq_2_per_row_with_0_log_0_as_0():
    q = torch.tensor(_q_by_hand(Z, MU, 1.0), dtype=torch.float64)
    p = target_distribution(q)
    got = kl_rows(p, q.log())
    for i in range(3):
        want = sum(p[i, j].item() * math.log(p[i, j].item() / q[i, j].item()) for j in range(2))
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert kl_rows(q, q.log()).abs().max() < 1e-15  # KL(Q || Q) = 0
    zero = kl_rows(torch.tensor([[1.0, 0.0]], dtype=torch.float64), q[:1].log())
    assert zero.item() == pytest.approx(-math.log(q[0, 0].item()), rel=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_gradients_are_eq_4_and_eq_5(alpha):
    """Sec 3.1.3: dL/dz_i = (a+1)/a sum_j (1 + |z_i - mu_j|^2 / a)^-1 (p_ij - q_ij)(z_i - mu_j), and
    dL/dmu_j = -(a+1)/a sum_i (same), with P fixed; L the sum of the rows' KL."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    p = target_distribution(soft_assignment(z.detach() + 0.3, mu.detach(), alpha))  # any fixed target
    dec_rows(z, mu, p, alpha).sum().backward()
    with torch.no_grad():
        q = soft_assignment(z, mu, alpha)
        diff = z[:, None, :] - mu[None, :, :]  # (N, K, D)
        w = ((p - q) / (1 + (diff ** 2).sum(-1) / alpha))[..., None] * diff * (alpha + 1) / alpha
    assert torch.allclose(z.grad, w.sum(1), atol=1e-12)
    assert torch.allclose(mu.grad, -w.sum(0), atol=1e-12)


# -- the stage -------------------------------------------------------------------------------------


def _stage(n=30, d=4, k=3, **dec):
    from deepclust.methods.dec import Dec

    cfg = build_config({"cluster": {"n_clusters": k, "head": "dec", "features": "embedding"}, "dec": dec})
    return Dec(cfg, n, {"embedding": d})


def _context(stage, epoch, z):
    from deepclust.methods import DiscoveryContext

    return DiscoveryContext(epoch=epoch, n_images=len(z), seed=0, device=torch.device("cpu"),
                            passes={stage.features: z})


def _blobs(n_per=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    return torch.cat([c + 0.3 * torch.randn(n_per, 4, generator=g) for c in centres])


def test_the_stage_discovers_without_mutating_and_sets_its_centres_only_after_its_first_discovery():
    """methods/base.py's lifecycle: discover returns the target (and at epoch 0 the k-means centres)
    and changes nothing; set_structure any number of times gives the same state; reset_parameters
    copies the k-means centres in after epoch 0's discovery only; a later target reads the current
    centres and counts the assignments that changed."""
    from deepclust.structure.clustering import kmeans

    stage = _stage(update_interval=2, epochs=6)
    assert [e for e in range(stage.total_epochs()) if stage.needs_discovery(e)] == [0, 2, 4]
    z = _blobs()
    s0 = stage.discover(_context(stage, 0, z))
    assert stage.structure is None and float(stage.mu.detach().abs().sum()) == 0  # nothing changed
    _, centres, _ = kmeans(z.numpy(), 3, seed=stage.cfg.train.seed, n_iter=50, n_init=20)
    assert np.allclose(s0["kmeans"].numpy(), centres)
    q = soft_assignment(z, s0["kmeans"])
    assert torch.allclose(s0["target"], target_distribution(q).float()) and float(s0["changed"]) == 1.0
    for _ in range(2):
        stage.set_structure(s0)
    assert stage.reset_parameters() == [stage.mu] and np.allclose(stage.mu.detach().numpy(), centres)
    with torch.no_grad():
        stage.mu[0] += 100.0  # a trained centre, far away: its cluster's images move to the others
    before = stage.mu.detach().clone()
    s2 = stage.discover(_context(stage, 2, z))
    assert "kmeans" not in s2 and torch.equal(stage.mu.detach(), before) and stage.structure is s0
    assert torch.allclose(s2["target"], target_distribution(soft_assignment(z, before)).float())
    assert float(s2["changed"]) == pytest.approx(float((s2["assigned"] != s0["assigned"]).double().mean()))
    assert 0 < float(s2["changed"]) < 1
    stage.set_structure(s2)
    assert stage.reset_parameters() == [] and torch.equal(stage.mu.detach(), before)


def test_the_stage_stops_once_fewer_than_tol_of_the_assignments_change():
    """Sec 3.1.3's stop: a target update with fewer than tol changed ends the stage after its epoch."""
    stage = _stage(epochs=10, tol=0.05)
    z = _blobs()
    stage.set_structure(stage.discover(_context(stage, 0, z)))
    stage.reset_parameters()
    assert stage.total_epochs() == 10  # the first update changes everything (nothing before it)
    stage.set_structure(stage.discover(_context(stage, 3, z)))  # the same features: nothing changed
    assert float(stage.structure["changed"]) == 0 and stage.total_epochs() == 4
    off = _stage(epochs=10, tol=0)
    off.set_structure(stage.structure)
    assert off.total_epochs() == 10  # tol 0: every epoch


def test_the_assignment_map_is_argmax_q():
    """weight 2 mu, bias -|mu|^2 of the embedding: its argmax is argmax q (the nearest centre) of
    every row, the stage's own final clusters."""
    stage = _stage(n=200, d=5, k=7)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        stage.mu.copy_(torch.randn(7, 5, generator=g))
    z = torch.randn(200, 5, generator=g) * 2
    layer, weight, bias = stage.assignment_map()
    assert layer == "embedding" and weight.shape == (7, 5) and bias.shape == (7,)
    mapped = (z.numpy() @ weight.T + bias).argmax(1)
    assert np.array_equal(mapped, soft_assignment(z, stage.mu.detach()).argmax(1).numpy())
    assert np.array_equal(mapped, stage.final_clusters(_context(stage, 0, z)))
    assert np.array_equal(mapped, torch.cdist(z, stage.mu.detach()).argmin(1).numpy())


def test_the_batch_loss_is_the_rows_kl_against_their_target():
    stage = _stage(n=30)
    z = _blobs()
    stage.set_structure(stage.discover(_context(stage, 0, z)))
    stage.reset_parameters()
    from deepclust.methods import Step

    idx = torch.tensor([3, 17, 25])
    out = stage.forward({"embedding": z[idx] + 0.1})
    step = Step(epoch=0, step=0, idx=idx, gidx=idx, positions=torch.arange(3), outputs=[out], bank=None)
    got = stage.batch_loss(step)
    want = dec_rows(z[idx] + 0.1, stage.mu, stage.structure["target"][idx])
    assert got.shape == (3,) and torch.allclose(got, want)
    got.sum().backward()
    assert stage.mu.grad is not None and stage.mu.grad.abs().sum() > 0


def test_a_dec_run_writes_its_head_and_scores_it(tmp_path, small_npz):
    """The command line with --cluster-head dec: the method's epochs, then the stage's, logged as
    ``dec``; the head is the stage's map (a linear head.npz of the embedding), scored beside the
    post-hoc heads; predict gives the trained images the run's own clusters."""
    from deepclust.heads import ClusterHead
    from deepclust.inference import predict_run

    out = tmp_path / "run"
    r = run_cli("fit", "--data", f"npz:{small_npz}", "--method", "instance", "--epochs", "1", "--n-clusters", "10",
                "--cluster-head", "dec", "--batch-size", "64", "--threads", "1", "--no-progress",
                "--set", "dec.epochs=2", "--set", "dec.tol=0", "--out", str(out))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cluster_head"] == "dec" and metrics["cluster_features"] == "embedding"
    assert [h for h in metrics["heads"] if h["head"] == "dec"][0]["acc"] == metrics["acc"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["phase"] for rec in log] == ["", "dec", "dec"]
    assert {"dec_changed", "dec_non_empty", "dec_nmi"} <= set(log[1])
    head = ClusterHead.load(out / "head.npz")
    assert head.kind == "linear" and head.weight.shape == (10, 128)
    predicted, _ = predict_run(out, f"npz:{small_npz}")
    assert (predicted == np.load(out / "labels.npy")).all()


@pytest.mark.parametrize("setting, fragment", [
    ("dec.alpha=0", "dec.alpha: must be > 0"),
    ("dec.update_interval=0", "dec.update_interval: must be >= 1"),
    ("dec.tol=2", "dec.tol: must be >= 0 and <= 1"),
    ("dec.momentum=1", "dec.momentum: must be >= 0 and < 1"),
    ("dec.backbone=half", "dec.backbone: 'half' is not one of train, frozen"),
    ("dec.centres=3", "unknown option dec.centres"),
])
def test_bad_options_are_refused_in_one_line(tmp_path, setting, fragment):
    r = run_cli("fit", "--data", "digits", "--cluster-head", "dec", "--set", setting, "--out", str(tmp_path / "run"))
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "run").exists()


def test_dec_reads_the_backbone_or_the_embedding_only():
    with pytest.raises(ConfigError, match="backbone or the embedding"):
        from deepclust.methods.dec import Dec

        Dec(build_config({"cluster": {"n_clusters": 3, "head": "dec", "features": "conv1"}}), 10, {"conv1": 8})


def test_a_budgeted_run_with_the_dec_head_is_measured(tmp_path, monkeypatch):
    """The time budget times the stage through the trainer's public steps, knowing no stage by name:
    its discoveries (the k-means, then the targets), its steps and its final pass; RNG and the
    working directory untouched."""
    from sklearn.datasets import load_digits

    from deepclust import calibration
    from deepclust.data import ImageSet
    from deepclust.resolution import resolve, view_spec

    monkeypatch.chdir(tmp_path)
    d = load_digits()
    images = ImageSet(images=np.round(d.images[:300] * 255 / 16).astype(np.uint8), labels=d.target[:300],
                      spec="digits")
    cfg = resolve(build_config({"method": "pad", "cluster": {"n_clusters": 10, "head": "dec"},
                                "dec": {"epochs": 2}, "optim": {"batch_size": 64},
                                "train": {"epochs": 2, "accelerator": "cpu", "threads": 1}}), images)
    rng = torch.get_rng_state()
    cal = calibration.TrainerCalibration(cfg, images.images, view_spec(cfg.views), labels=images.labels,
                                         min_seconds=0.0, max_steps=1)
    assert cal.measure("jule_cnn") > 0
    assert cal.stages("jule_cnn") > 0 and cal.finish("jule_cnn") > 0
    cal.close()
    assert torch.equal(torch.get_rng_state(), rng) and list(tmp_path.iterdir()) == []
