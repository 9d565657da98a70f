"""Learning-rate schedules that follow the run's length (issue 29): milestones as fractions of the
run (or of each round), cosine over it; the papers' presets keep their fixed epochs."""

import json

import pytest

from deepclust import budget
from deepclust.config import read_yaml
from deepclust.configure import build_config
from deepclust.methods import build_method
from deepclust.schedules import learning_rate

from conftest import fake_calibration, smoke_layer

CPU_PRESETS = ("and-cpu", "instance-cpu", "pad-cpu", "pcp-cpu", "deepcluster-cpu", "dccm-cpu")
PAPER_FIXED = ("pad-mnist-alexnet", "and-cifar10-alexnet", "pcp-cifar10-resnet18")
PAPER_CONSTANT = ("dccm-cifar10", "dccm-cifar100-20", "dccm-stl10")  # the authors' RMSprop: no decay


def _rates(o, length, epochs=None):
    return [learning_rate(o, e, 0, length) for e in range(epochs or length)]


def _decays(rates):
    """Epochs at which the rate changed from the epoch before."""
    return [e for e in range(1, len(rates)) if rates[e] != pytest.approx(rates[e - 1])]


def test_fractions_decay_at_their_share_of_any_length():
    o = build_config({"optim": {"lr": 0.03, "milestones_frac": [0.5, 0.75], "gamma": 0.1}}).optim
    assert o.milestones is None
    for length, want in ((40, [20, 30]), (37, [19, 28]), (200, [100, 150]), (8, [4, 6])):
        rates = _rates(o, length)
        assert _decays(rates) == want
        assert rates[0] == pytest.approx(0.03) and rates[-1] == pytest.approx(0.03 * 0.01)
    # fixed epochs, when given, win: the papers' 80/120/160, never reached in 40 epochs
    fixed = build_config({"optim": {"milestones": [80, 120, 160]}}).optim
    assert _decays(_rates(fixed, 40)) == [] and _decays(_rates(fixed, 200)) == [80, 120, 160]
    # neither: a constant rate, with or without a length
    none = build_config({"optim": {"milestones_frac": None}}).optim
    assert learning_rate(none, 30) == none.lr
    with pytest.raises(ValueError, match="length"):
        learning_rate(o, 3)


def test_cosine_runs_from_the_rate_to_near_zero_over_the_length():
    o = build_config({"optim": {"lr": 0.1, "schedule": "cosine"}}).optim
    rates = _rates(o, 40)
    assert rates[0] == pytest.approx(0.1) and rates[20] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(rates, rates[1:])) and 0 < rates[-1] < 0.001
    assert _rates(o, 10)[5] == pytest.approx(0.05)  # halfway is halfway whatever the length
    warm = build_config({"optim": {"lr": 0.1, "schedule": "cosine", "warmup_epochs": 3}}).optim
    assert learning_rate(warm, 0, 0, 40) == pytest.approx(0.1 / 4)


def test_bad_schedule_values_are_refused():
    from deepclust.errors import ConfigError

    for bad in ({"milestones_frac": [1.5]}, {"milestones_frac": [0.0]}, {"schedule": "linear"}):
        with pytest.raises(ConfigError, match="optim"):
            build_config({"optim": bad})


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_every_cpu_preset_decays_within_its_run(preset):
    cfg = build_config(read_yaml(preset), {"cluster": {"n_clusters": 10}})  # K: resolved before any method is built
    assert cfg.optim.milestones is None and cfg.optim.milestones_frac
    m = build_method(cfg, 300, tap_dims={"conv2": 128, "backbone": 32, "embedding": 128},
                     tap_shapes={"conv2": (8, 4, 4), "backbone": (32,), "embedding": (128,)}, shallow_layer="conv2")
    rates = [learning_rate(cfg.optim, m.schedule_epoch(e), 0, m.schedule_length(e)) for e in range(m.total_epochs())]
    assert min(rates) == pytest.approx(cfg.optim.lr * cfg.optim.gamma ** 2)  # both decays reached


@pytest.mark.parametrize("preset", PAPER_FIXED)
def test_paper_presets_keep_their_fixed_milestones(preset):
    cfg = build_config(read_yaml(preset))
    assert cfg.optim.milestones in ([80, 120, 160], [120, 160])
    assert cfg.optim.milestone_epochs(7) == cfg.optim.milestones  # whatever the length


@pytest.mark.parametrize("preset", PAPER_CONSTANT)
def test_dccm_paper_presets_keep_the_rate_constant(preset):
    cfg = build_config(read_yaml(preset))
    assert cfg.optim.milestone_epochs(cfg.train.epochs) == []
    assert {learning_rate(cfg.optim, e, 0, cfg.train.epochs) for e in range(cfg.train.epochs)} == {cfg.optim.lr}


def test_and_fractions_are_of_each_round():
    cfg = build_config({"method": "and", "train": {"epochs": 8}, "options": {"rounds": 2, "round0_epochs": 4}})
    m = build_method(cfg, 300, tap_dims={"embedding": 128}, tap_shapes={"embedding": (128,)}, shallow_layer="conv2")
    rates = [learning_rate(cfg.optim, m.schedule_epoch(e), 0, m.schedule_length(e)) for e in range(m.total_epochs())]
    # round 0: 4 epochs (decays at 2, 3); rounds 1 and 2: 8 epochs each (at 4, 6), restarted
    assert m.total_epochs() == 20 and _decays(rates) == [2, 3, 4, 8, 10, 12, 16, 18]


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_40_epoch_run_decays_at_the_fractions(tmp_path, small_npz):
    from deepclust.runs import fit_run

    layer = smoke_layer("instance", f"npz:{small_npz}", tmp_path / "run", net={"backbone": "mlp"},
                        train={"epochs": 40, "checkpoint": False}, optim={"batch_size": 150, "lr": 0.02,
                                                                           "schedule": "step"})
    fit_run(build_config(layer))
    rates = [r["lr"] for r in _log(tmp_path / "run")]
    assert len(rates) == 40 and _decays(rates) == [20, 30]
    assert rates[0] == pytest.approx(0.02) and rates[-1] == pytest.approx(0.0002)


def test_a_budgeted_runs_decays_follow_its_planned_epochs(tmp_path, small_npz, monkeypatch):
    from deepclust.runs import fit_run

    monkeypatch.setattr(budget, "TrainerCalibration", fake_calibration(300.0))  # 300 images: 1 s an epoch
    layer = smoke_layer("instance", f"npz:{small_npz}", tmp_path / "run", net={"backbone": "mlp"},
                        train={"epochs": None, "budget": "9s", "checkpoint": False},
                        optim={"batch_size": 150, "schedule": "step"})
    fit_run(build_config(layer))
    planned = build_config(read_yaml(str(tmp_path / "run" / "config.yaml"))).train.epochs
    rates = [r["lr"] for r in _log(tmp_path / "run")]
    assert 4 <= planned <= 9 and len(rates) == planned  # what the plan wrote is what ran
    assert _decays(rates) == [-(-planned // 2), -(-3 * planned // 4)]
