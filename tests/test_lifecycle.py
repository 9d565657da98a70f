"""The structure lifecycle of ``methods/base.py``, for every registered method: ``discover`` mutates
nothing, ``set_structure`` is idempotent (and so is ``load_state_dict``), parameters are
re-initialised only after a fresh discovery; the BatchNorm rule covers the method's own modules;
similarities stay float32 under bf16 autocast; the per-step ``inv`` rate (its resume is in the
contract's kill test: instance discrimination's smoke configuration uses it)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import METHOD_SMOKE, smoke_layer

from deepclust.configure import build_config
from deepclust.losses.invariant_spreading import invariant_spreading_loss
from deepclust.memory import MemoryBank
from deepclust.methods import METHODS, DiscoveryContext, build_method
from deepclust.nets import GlobalBatchNorm
from deepclust.schedules import learning_rate
from deepclust.train import Trainer

N = 120
TAPS = {"conv2": 128, "backbone": 24, "embedding": 128}
SHAPES = {"conv2": (8, 4, 4), "backbone": (24,), "embedding": (128,)}


def _method(name: str):
    cfg = build_config(smoke_layer(name, "digits", "/nonexistent"))
    return build_method(cfg, N, tap_dims=TAPS, tap_shapes=SHAPES, shallow_layer="conv2")


def _context(method, epoch: int, seed: int = 0) -> DiscoveryContext:
    g = torch.Generator().manual_seed(seed)
    passes = {r: torch.nn.functional.normalize(torch.randn(N, TAPS.get(r.tap, 16), generator=g), dim=1)
              for r in method.discovery_features(epoch)}
    return DiscoveryContext(epoch=epoch, n_images=N, seed=3, device=torch.device("cpu"), bank=method.bank,
                            passes=passes, images=torch.randint(0, 256, (N, 1, 8, 8), dtype=torch.uint8,
                                                                generator=g))


def _snapshot(method) -> dict:
    """Everything the method object holds (tensors cloned), its modules' and bank's state included."""
    out = {}
    for k, v in vars(method).items():
        if k == "cfg":
            continue
        if isinstance(v, nn.Module):
            out[k] = {n: t.clone() for n, t in v.state_dict().items()}
        else:
            out[k] = copy.deepcopy(v)
    return out


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _discovery_epochs(method) -> list[int]:
    return [e for e in range(method.total_epochs()) if method.needs_discovery(e)]


DISCOVERING = sorted(m for m in METHODS if _discovery_epochs(_method(m)))  # all but instance discrimination


@pytest.mark.parametrize("name", DISCOVERING)
def test_discover_mutates_nothing_and_set_structure_is_idempotent(name):
    method = _method(name)
    if name in ("and", "pad", "pcp"):  # a bank with some structure in it: a few tight groups
        g = torch.Generator().manual_seed(1)
        centres = torch.randn(6, method.bank.dim, generator=g)
        method.bank.fill(centres[torch.arange(N) % 6] + 0.05 * torch.randn(N, method.bank.dim, generator=g))
    for epoch in _discovery_epochs(method):
        before = _snapshot(method)
        structure = method.discover(_context(method, epoch, seed=epoch))
        assert _equal(_snapshot(method), before), f"{name}: discover changed the method at epoch {epoch}"
        method.set_structure(structure)
        method.reset_parameters()
        once = _snapshot(method)
        for _ in range(2):
            method.set_structure(structure)
        assert _equal(_snapshot(method), once), f"{name}: set_structure is not idempotent at epoch {epoch}"
        state = copy.deepcopy(method.state_dict())
        fresh = _method(name)
        fresh.load_state_dict(state)
        fresh.load_state_dict(state)
        assert _equal(_snapshot(fresh), once), f"{name}: load_state_dict does not restore the method"


def test_pcp_vote_history_travels_with_the_structure_and_restarts_each_round():
    method = _method("pcp")
    o = method.options
    seen = []
    for epoch in _discovery_epochs(method):
        s = method.discover(_context(method, epoch))
        method.set_structure(s)
        seen.append(0 if s is None or "past" not in s else len(s["past"]))
    collecting = [e for e in range(method.total_epochs()) if method._collecting(e)]
    assert max(seen) == min(o.history, len(collecting))
    assert bool(method.structure["voting"])  # the vote fired once the history was full
    next_round = method.cfg.train.epochs  # a discovery in another round starts an empty history
    assert len(method._history(next_round)) == 0 and len(method._history(next_round - 1)) == o.history


def test_deepcluster_reinitialises_its_classifier_only_after_a_fresh_clustering():
    method = _method("deepcluster")
    s = method.discover(_context(method, 0))
    method.set_structure(s)
    first = [p.detach().clone() for p in method.reset_parameters()]
    with torch.no_grad():
        for p in method.modules.parameters():
            p.add_(1.0)  # "training"
    trained = [p.detach().clone() for p in method.modules.parameters()]
    method.set_structure(s)  # resume / load_state_dict: the trained classifier stays
    assert all(torch.equal(a, b) for a, b in zip(trained, method.modules.parameters()))
    again = method.reset_parameters()  # the same (seed, epoch) draw as the first time
    assert all(torch.equal(a, b) for a, b in zip(first, again))


class _TwoProcessFabric:
    """What ``Trainer.begin`` asks of Fabric, for a world of two on the CPU (no process group)."""

    device = torch.device("cpu")
    global_rank, world_size = 0, 2

    def setup(self, module, optimizer):
        return module, optimizer


def test_batchnorm_rule_covers_the_method_modules(small_npz):
    cfg = build_config(smoke_layer("deepcluster", f"npz:{small_npz}", "/nonexistent", net={"backbone": "jule_cnn"}))
    images = np.load(small_npz)["images"]
    trainer = Trainer(cfg, images, "/nonexistent", fabric=_TwoProcessFabric())
    trainer.method.modules["classifier"] = nn.Sequential(nn.Linear(TAPS["backbone"], 4), nn.BatchNorm1d(4))
    trainer.start(resume=False)
    trainer.begin(0)
    norms = [m for m in trainer.method.modules.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlobalBatchNorm) for m in norms)
    assert all(isinstance(m, GlobalBatchNorm) for m in trainer.net.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_bank_logits_and_pair_similarities_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(500, 64, seed=1)
    x = torch.nn.functional.normalize(torch.randn(32, 64, generator=g), dim=1)
    exact = x @ bank.features.t() / bank.temperature
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = x @ bank.features.t() / bank.temperature
        logits = bank.logits(x)
        nce = bank.nce_loss(x, torch.arange(32), k=16, generator=torch.Generator().manual_seed(2))
    assert naive.dtype == torch.bfloat16 and (naive.float() - exact).abs().max() > 1e-3  # what it guards
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, exact, rtol=1e-6, atol=1e-5)
    assert nce.dtype == torch.float32
    f, fh = (torch.nn.functional.normalize(torch.randn(16, 64, generator=g), dim=1) for _ in range(2))
    pos = torch.arange(16)
    for form in ("paper", "reference"):
        plain = invariant_spreading_loss(f, fh, f, fh, pos, 0.1, form=form)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = invariant_spreading_loss(f, fh, f, fh, pos, 0.1, form=form)
        torch.testing.assert_close(auto, plain, rtol=1e-5, atol=1e-5)


def test_inv_schedule_decays_per_step_as_caffe():
    o = build_config({"optim": {"schedule": "inv", "lr": 0.01, "inv_gamma": 1e-4, "inv_power": 0.75}}).optim
    assert learning_rate(o, 0, 0) == pytest.approx(0.01)
    assert learning_rate(o, 0, 10_000) == pytest.approx(0.01 * 2 ** -0.75)
    assert learning_rate(o, 5, 10_000) == learning_rate(o, 0, 10_000)  # epochs do not enter
    step = build_config({"optim": {"lr": 0.1, "milestones": [2], "gamma": 0.5}}).optim
    assert [learning_rate(step, e, 999) for e in (0, 1, 2)] == pytest.approx([0.1, 0.1, 0.05])


def test_inv_schedule_sets_the_rate_every_step_and_counts_across_epochs(tmp_path, small_npz):
    from deepclust.runs import fit_run

    layer = smoke_layer("instance", f"npz:{small_npz}", tmp_path / "run",
                        optim={"schedule": "inv", "lr": 0.05, "inv_gamma": 0.1, "inv_power": 1.0})
    fit_run(build_config(layer))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = -(-300 // 64)  # batches per epoch: 300 images, batch 64
    assert log[0]["lr"] == pytest.approx(0.05)
    assert log[0]["lr_last"] == pytest.approx(0.05 / (1 + 0.1 * (steps - 1)))
    assert log[1]["lr"] == pytest.approx(0.05 / (1 + 0.1 * steps))  # the count runs on across epochs
    assert METHOD_SMOKE["instance"]["train"]["epochs"] == len(log)
