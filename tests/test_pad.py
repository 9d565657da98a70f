"""PAD (AAAI 2020): Eq 3-5 against direct slow computations, the hard-positive choice, options,
discovery on a crafted bank, views and diagnostics."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepclust.configure import build_config
from deepclust.errors import ConfigError
from deepclust.losses.pad import hard_positive, hpe_cosine_loss, hpe_kl_loss, scs_loss
from deepclust.methods import DiscoveryContext, Step
from deepclust.methods.pad import Pad, PadOptions

T = 0.1


def _softmax_row(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def _logits(b=5, n=12, d=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1)
    bank = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    return x, bank, x @ bank.T / T


# -- losses ---------------------------------------------------------------------------------------


def test_scs_loss_is_eq3_on_hand_built_groups():
    _, _, logits = _logits()
    idx = torch.tensor([0, 3, 5, 7, 9])
    members = torch.tensor([[0, 1, 2], [3, 3, 3], [5, 8, 5], [7, 4, 11], [9, 9, 9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    got = scs_loss(logits, members, mask)
    for r in range(5):
        p = _softmax_row(logits[r].tolist())  # PAD Eq 2 over the whole bank
        group = [int(j) for j, m in zip(members[r], mask[r]) if m]
        assert got[r].item() == pytest.approx(-math.log(sum(p[j] for j in group)), rel=1e-5)
    # an isolated sample (C(x) = {x}) gets the instance loss, as the paper says
    assert got[1].item() == pytest.approx(-math.log(_softmax_row(logits[1].tolist())[3]), rel=1e-5)
    assert got[4].item() == pytest.approx(-math.log(_softmax_row(logits[4].tolist())[9]), rel=1e-5)


def test_hard_positive_is_the_member_with_the_smallest_affinity():
    logits = torch.zeros(4, 10)
    logits[0, [0, 2, 4, 6]] = torch.tensor([9.0, 3.0, 1.0, 2.0])  # 4 is the least similar member
    logits[1, [1, 3]] = torch.tensor([-5.0, 0.5])  # the sample itself is never its own hard positive
    logits[2, [5, 7]] = torch.tensor([4.0, -9.0])  # 7 is padding (masked): not a candidate
    idx = torch.tensor([0, 1, 5, 8])
    members = torch.tensor([[0, 2, 4, 6], [1, 3, 1, 1], [5, 8, 7, 5], [8, 8, 8, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    hp, found = hard_positive(logits, members, mask, idx)
    assert hp.tolist() == [4, 3, 8, 8]
    assert found.tolist() == [True, True, True, False]  # row 3 is isolated: hp = itself, not found


def test_hpe_kl_is_eq4_in_the_printed_direction():
    _, _, logits = _logits(seed=1)
    _, _, logits_hp = _logits(seed=2)
    got = hpe_kl_loss(logits, logits_hp)
    for r in range(logits.shape[0]):
        p, q = _softmax_row(logits[r].tolist()), _softmax_row(logits_hp[r].tolist())
        kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q))  # sum_j p_ij log(p_ij / p_hp,j)
        kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q))
        assert got[r].item() == pytest.approx(kl_pq, rel=1e-4, abs=1e-6)
        assert abs(kl_pq - kl_qp) > 1e-3  # the test tells the two directions apart
    assert torch.allclose(hpe_kl_loss(logits, logits), torch.zeros(logits.shape[0]), atol=1e-6)


def test_hpe_cosine_is_one_minus_cosine():
    x, bank, _ = _logits()
    got = hpe_cosine_loss(x * 3.0, bank[:5])  # scale does not matter: a cosine
    want = [1.0 - float(np.dot(a, b)) for a, b in zip(x.numpy(), bank[:5].numpy())]
    assert got.tolist() == pytest.approx(want, abs=1e-6)


def test_autograd_of_eq3_and_eq4():
    x, bank, _ = _logits(dtype=torch.float64)
    y = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=1)
    members = torch.tensor([[0, 1], [1, 1], [2, 6], [3, 4], [4, 4]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 0]], dtype=torch.bool)
    x, y = x.requires_grad_(), y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: scs_loss(a @ bank.T / T, members, mask), (x,))
    # both sides of the KL carry gradient (an isolated sample's second view) ...
    assert torch.autograd.gradcheck(lambda a, b: hpe_kl_loss(a @ bank.T / T, b @ bank.T / T), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: hpe_cosine_loss(a, b), (x, y))
    # ... and the Eq 3 gradient (per row: sum_j p_ij x~_j - sum_{j in C} p_ij x~_j / sum_C p, over T)
    logits = x @ bank.T / T
    scs_loss(logits, members, mask).sum().backward()
    p = torch.softmax(logits.detach(), dim=1)
    for r in range(5):
        group = members[r][mask[r]]
        w = p[r, group] / p[r, group].sum()
        want = (p[r] @ bank - w @ bank[group]) / T
        assert torch.allclose(x.grad[r], want, atol=1e-10)


# -- options --------------------------------------------------------------------------------------


def _cfg(dim=16, **options):
    return build_config({"method": "pad", "net": {"dim": dim}, "options": options})


def test_options_defaults_are_the_papers():
    o = _cfg().options
    assert isinstance(o, PadOptions)
    assert (o.neighbours, o.max_size, o.cyclic, o.diffusion, o.knn_group_size) == (5, 10, True, True, 10)
    assert (o.hpe, o.hpe_weight, o.hpe_detach_view, o.start_epoch) == ("kl", 0.8, False, 1)
    assert _cfg(max_size=None).options.max_size is None  # scale constraint off (Table 4)
    assert build_config({"method": "pad", "options": {"max_size": "none"}}).options.max_size is None


@pytest.mark.parametrize("options, match", [
    ({"max_size": 0}, "options.max_size"), ({"neighbours": 0}, "options.neighbours"),
    ({"hpe": "mse"}, "options.hpe"), ({"hpe_weight": -0.1}, "options.hpe_weight"),
    ({"start_epoch": -1}, "options.start_epoch"), ({"knn_group_size": 0}, "options.knn_group_size"),
    ({"cyclic": "maybe"}, "options.cyclic"), ({"lambda": 0.8}, "unknown option options.lambda"),
])
def test_bad_options_give_one_line_config_errors(options, match):
    with pytest.raises(ConfigError, match=match) as e:
        _cfg(**options)
    assert "\n" not in str(e.value)


def test_check_data_refuses_k_as_large_as_the_data():
    Pad.check_data(PadOptions(neighbours=5), 6)
    with pytest.raises(ConfigError, match="options.neighbours"):
        Pad.check_data(PadOptions(neighbours=6), 6)
    with pytest.raises(ConfigError, match="options.knn_group_size"):
        Pad.check_data(PadOptions(diffusion=False, knn_group_size=10), 10)


# -- discovery ------------------------------------------------------------------------------------


def _crafted_bank(groups=10, size=6, dim=16, outliers=1, seed=0):
    """``groups`` tight groups of ``size`` around orthogonal axes, then ``outliers`` lone points."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:groups].repeat_interleave(size, dim=0)
    tight = centres + 0.05 * torch.randn(groups * size, dim, generator=g)
    lone = torch.eye(dim)[groups:groups + outliers] + 0.05 * torch.randn(outliers, dim, generator=g)
    labels = np.concatenate([np.repeat(np.arange(groups), size), groups + np.arange(outliers)])
    return F.normalize(torch.cat([tight, lone]), dim=1), labels


def _method(feats, epoch=1, **options):
    m = Pad(_cfg(dim=feats.shape[1], **options), feats.shape[0])
    m.bank.fill(feats)
    ctx = DiscoveryContext(epoch=epoch, n_images=feats.shape[0], seed=0, device=torch.device("cpu"), bank=m.bank)
    assert m.needs_discovery(epoch)
    m.set_structure(m.discover(ctx))
    return m


def test_discovery_finds_the_tight_groups_and_leaves_the_outlier_alone():
    feats, labels = _crafted_bank()
    m = _method(feats)
    groups = m.structure["groups"].numpy()
    # each group of 6 is one SCS (every member's 5 nearest neighbours are its 5 mates)
    for c in range(10):
        assert len(set(groups[labels == c])) == 1
    assert len(set(groups[:60])) == 10
    assert (groups[60] != groups[:60]).all()  # nobody points back at the outlier: isolated
    d = m.describe(labels)
    assert d == {"scs_count": 10, "scs_coverage": round(60 / 61, 4), "scs_mean_size": 6.0, "scs_max_size": 6,
                 "scs_precision": 1.0, "scs_pair_precision": 1.0}
    assert "scs_precision" not in m.describe(None) and m.describe(None)["scs_count"] == 10
    # the batch's C(x_i): the row itself and its mates; the outlier alone
    members, mask = m._members(torch.tensor([0, 60, 13]))
    assert sorted(members[0][mask[0]].tolist()) == list(range(6))
    assert members[1][mask[1]].tolist() == [60]
    assert sorted(members[2][mask[2]].tolist()) == list(range(12, 18))


def test_discovery_options_reach_the_search():
    feats, labels = _crafted_bank(groups=4, size=8, dim=8, outliers=0)
    small = _method(feats, neighbours=7, max_size=3).structure["groups"].numpy()
    assert np.bincount(small).max() <= 3  # the scale threshold s cuts the groups of 8
    whole = _method(feats, neighbours=7, max_size=None).structure["groups"].numpy()
    assert sorted(np.bincount(whole).tolist()) == [8, 8, 8, 8]  # scale constraint off
    # the same epoch gives the same structure (seeded start order), as a resumed run needs
    again = _method(feats, neighbours=7, max_size=3).structure["groups"].numpy()
    assert np.array_equal(small, again)


def test_diffusion_off_uses_knn_groups():
    feats, labels = _crafted_bank(groups=4, size=12, dim=8, outliers=0)
    m = _method(feats, diffusion=False)
    nbrs = m.structure["neighbours"]
    assert nbrs.shape == (48, 10) and "groups" not in m.structure
    sims = feats @ feats.T
    sims.fill_diagonal_(-2)
    assert torch.equal(nbrs.sort(dim=1).values, sims.topk(10, dim=1).indices.sort(dim=1).values)
    members, mask = m._members(torch.tensor([5, 40]))
    assert members.shape == (2, 11) and bool(mask.all()) and members[:, 0].tolist() == [5, 40]
    assert m.describe(labels) == {"group_mean_size": 11, "group_precision": 1.0}
    assert m.views_at(1) == 1  # every sample has a group: no second view needed


def test_views_and_phases():
    feats, _ = _crafted_bank()
    m = Pad(_cfg(), 61)
    assert not m.needs_discovery(0) and m.phase(0) == "instance" and m.views_at(0) == 2
    assert _method(feats).views_at(1) == 2  # the outlier is isolated: its HPE needs a second view
    tight, _ = _crafted_bank(outliers=0)
    assert _method(tight).views_at(1) == 1  # nobody isolated
    assert _method(feats, hpe="off").views_at(1) == 1
    assert Pad(_cfg(hpe="off"), 61).views_at(0) == 1
    assert Pad(_cfg(start_epoch=0), 61).needs_discovery(0)


# -- the whole loss (Eq 5) on a crafted batch -------------------------------------------------------


def _step(m, idx, x, view):
    idx = torch.as_tensor(idx)
    outputs = [{"embedding": x}] + ([{"embedding": view}] if view is not None else [])
    return Step(epoch=1, step=0, idx=idx, gidx=idx, positions=torch.arange(len(idx)), outputs=outputs, bank=m.bank)


@pytest.mark.parametrize("hpe", ["kl", "cosine"])
def test_batch_loss_is_eq5_against_a_slow_computation(hpe):
    feats, _ = _crafted_bank()
    m = _method(feats, hpe=hpe, hpe_weight=0.7)
    bank = m.bank.features.double()
    g = torch.Generator().manual_seed(3)
    idx = [0, 60, 13, 59]
    x = F.normalize(feats[idx] + 0.3 * torch.randn(4, 16, generator=g), dim=1).requires_grad_()
    view = F.normalize(feats[idx] + 0.3 * torch.randn(4, 16, generator=g), dim=1).requires_grad_()
    got = m.batch_loss(_step(m, idx, x, view))
    groups = m.structure["groups"].numpy()
    for r, i in enumerate(idx):
        z = (bank @ x[r].detach().double() / T).tolist()
        p = _softmax_row(z)
        mates = [int(j) for j in np.flatnonzero(groups == groups[i])]
        want = -math.log(sum(p[j] for j in mates))  # Eq 3
        others = [j for j in mates if j != i]
        target = bank[min(others, key=lambda j: z[j])] if others else view[r].detach().double()
        if hpe == "kl":
            q = _softmax_row((bank @ target / T).tolist())
            want += 0.7 * sum(a * math.log(a / b) for a, b in zip(p, q))  # lambda Eq 4
        else:
            want += 0.7 * (1 - float(x[r].detach().double() @ target))
        assert got[r].item() == pytest.approx(want, rel=1e-4)
    got.sum().backward()
    # only the isolated sample's second view receives a gradient
    assert view.grad[1].abs().sum() > 0
    assert view.grad[[0, 2, 3]].abs().sum() == 0


def test_detached_view_and_hpe_off():
    feats, _ = _crafted_bank()
    idx = [0, 60]
    x = F.normalize(feats[idx] + 0.2, dim=1).requires_grad_()
    view = F.normalize(feats[idx] - 0.2, dim=1).requires_grad_()
    m = _method(feats, hpe_detach_view=True)
    m.batch_loss(_step(m, idx, x, view)).sum().backward()
    assert view.grad is None or view.grad.abs().sum() == 0
    off = _method(feats, hpe="off")
    got = off.batch_loss(_step(off, idx, x.detach(), None))
    assert torch.allclose(got, scs_loss(off.bank.logits(x.detach()), *off._members(torch.tensor(idx))))


def test_memory_update_is_eq6():
    feats, _ = _crafted_bank()
    m = _method(feats)
    x = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    before = m.bank.features.clone()
    idx = torch.tensor([4, 60, 20])
    m.after_step(_step(m, idx, x, None))
    want = F.normalize(0.5 * before[idx] + 0.5 * x, dim=1)  # (1 - eta) x~ + eta x, eta = 0.5
    assert torch.allclose(m.bank.features[idx], want, atol=1e-6)
    assert torch.equal(m.bank.features[:4], before[:4])


@pytest.mark.parametrize("data", ["cifar10", "cifar100", "svhn", "mnist", "stl10"])
def test_gpu_presets_hold_the_papers_settings(data):
    from deepclust.config import read_yaml

    cfg = build_config(read_yaml(f"pad-{data}-alexnet"))
    assert cfg.method == "pad" and cfg.data.spec == data and cfg.net.backbone == "alexnet"
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov) == ("sgd", 0.03, 0.9, True)
    assert (cfg.optim.milestones, cfg.optim.gamma, cfg.train.epochs) == ([80, 120, 160], 0.1, 200)
    assert (cfg.options.neighbours, cfg.options.max_size, cfg.options.hpe_weight, cfg.memory.eta) == (5, 10, 0.8, 0.5)
    assert cfg.views.flip is True and cfg.views.preset == "natural"
    assert cfg.data.train_on == ("all" if data in ("mnist", "stl10") else "train")


def test_state_dict_round_trip_restores_the_groups_and_views():
    feats, labels = _crafted_bank()
    m = _method(feats)
    fresh = Pad(_cfg(), 61)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.structure["groups"], m.structure["groups"]) and fresh.views_at(1) == 2
    idx = torch.tensor([0, 60, 13])
    assert all(torch.equal(a, b) for a, b in zip(fresh._members(idx), m._members(idx)))
    assert torch.equal(fresh.bank.features, m.bank.features)


def test_a_batch_without_isolated_rows_trains(tmp_path, small_npz):
    """Cyclic constraint off (Table 4) groups every sample on digits, so batches have no row that
    needs a second view: the step must take the empty set of extra views (it once raised in
    affine_grid, found by the Table 3-6 ablation benchmark)."""
    from conftest import smoke_layer

    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    layer = smoke_layer("pad", f"npz:{small_npz}", tmp_path / "run", options={"cyclic": False},
                        optim={"batch_size": 16})
    m = fit_run(build_config(layer))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["scs_coverage"] >= 0.8  # most samples grouped: some batches of 16 have no isolated row
    assert np.isfinite(m["acc"])
