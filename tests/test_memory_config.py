import pytest
import torch
import torch.nn.functional as F

from deepclust.config import Config, read_yaml
from deepclust.configure import build_config
from deepclust.errors import ConfigError
from deepclust.memory import MemoryBank


def test_bank_update_is_eq8_and_renormalised():
    bank = MemoryBank(5, 4, eta=0.5, seed=0)
    old = bank.features.clone()
    x = F.normalize(torch.randn(2, 4), dim=1)
    idx = torch.tensor([3, 1])
    bank.update(idx, x)
    expected = F.normalize(0.5 * old[idx] + 0.5 * x, dim=1)
    assert torch.allclose(bank.features[idx], expected)
    assert torch.equal(bank.features[[0, 2, 4]], old[[0, 2, 4]])
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(5))


def test_bank_logits_and_probabilities():
    bank = MemoryBank(6, 3, temperature=0.1, seed=1)
    x = F.normalize(torch.randn(2, 3), dim=1)
    assert torch.allclose(bank.logits(x), x @ bank.features.T / 0.1)
    assert torch.allclose(bank.probabilities_of(x).sum(1), torch.ones(2))


def test_nce_loss_equals_an_independent_computation():
    """Wu et al. 2018 Eq 5-7 in float64 numpy: P(i|v) = exp(v_i.v/T) / Z with Z = N x the mean of
    exp(.) over the first batch's positives and noise; h = P / (P + k/N); loss = -log h(pos) -
    sum log(1 - h(noise))."""
    import numpy as np

    n, k, t = 100, 16, 0.1
    bank = MemoryBank(n, 8, temperature=t, seed=0)
    x = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    idx = torch.tensor([3, 50, 7, 99])
    loss = bank.nce_loss(x, idx, k, generator=torch.Generator().manual_seed(0))
    noise = torch.randint(0, n, (4, k), generator=torch.Generator().manual_seed(0)).numpy()
    mem, v = bank.features.double().numpy(), x.double().numpy()
    rows = np.concatenate([idx.numpy()[:, None], noise], axis=1)
    scores = np.exp(np.einsum("bd,bkd->bk", v, mem[rows]) / t)
    z = scores.mean() * n
    p = scores / z
    pn = k / n
    expected = -(np.log(p[:, 0] / (p[:, 0] + pn)) + np.log(pn / (p[:, 1:] + pn)).sum(axis=1))
    assert np.allclose(loss.double().numpy(), expected, rtol=1e-5)
    assert float(bank.nce_z) == pytest.approx(z, rel=1e-5)


def test_config_round_trip_and_validation(tmp_path):
    cfg = build_config({"method": "and", "train": {"epochs": "7"}, "options": {"rounds": 2}})
    assert cfg.train.epochs == 7 and cfg.options.rounds == 2
    path = tmp_path / "c.yaml"
    cfg.save(path)
    again = build_config(read_yaml(str(path)))
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        build_config({"train": {"epochs": "abc"}})
    with pytest.raises(ConfigError, match="unknown option optim.lrr"):
        build_config({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="unknown method"):
        build_config({"method": "nope"})
    with pytest.raises(ConfigError, match="memory.temperature"):
        build_config({"memory": {"temperature": 0}})
    with pytest.raises(ConfigError, match="options.curriculum"):
        build_config({"method": "and", "options": {"curriculum": "sometimes"}})
    with pytest.raises(ConfigError, match="unknown option options.rounds"):
        build_config({"method": "instance", "options": {"rounds": 3}})
    assert isinstance(Config(), Config)


def test_every_shipped_preset_builds():
    from deepclust.config import preset_path

    names = sorted(p.stem for p in preset_path("x").parent.glob("*.yaml"))
    assert names, "no presets found"
    for name in names:
        cfg = build_config(read_yaml(name))
        assert cfg.method in name.split("-")[0] or name.startswith(cfg.method), name


def test_config_is_frozen_and_its_resolution_is_declared(tmp_path):
    import dataclasses

    from deepclust.config import merge_layers

    cfg = build_config({"method": "pad", "train": {"epochs": 2}})
    for section, name in ((cfg, "out"), (cfg.train, "epochs"), (cfg.views, "preset")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, None)
    assert cfg.resolution == {} and "resolution" in {f.name for f in dataclasses.fields(cfg)}
    resolved = dataclasses.replace(cfg, resolution={"views": {"preset": "digits"}})
    assert resolved == cfg and "resolution" not in resolved.to_dict()  # evidence, not an option
    with pytest.raises(ConfigError, match="unknown option resolution"):
        build_config({"resolution": {"views": {}}})  # never read from YAML
    assert merge_layers({"train": {"epochs": 1, "seed": 2}}, None, {"train": {"epochs": 3}}) == \
        {"train": {"epochs": 3, "seed": 2}}


def test_the_method_registry_is_asked_by_name():
    from deepclust.config import config_from_dict
    from deepclust.methods import METHODS

    with pytest.raises(ConfigError, match="unknown method 'nope'; known: " + ", ".join(METHODS)):
        build_config({"method": "nope"})
    asked = []

    def options_class(name):
        asked.append(name)
        return METHODS[name].Options

    cfg = config_from_dict({"method": "and", "options": {"rounds": 2}}, options_class)
    assert asked == ["and"] and cfg.options.rounds == 2


def test_resume_takes_the_runs_own_configuration(tmp_path):
    from deepclust.configure import resume_config, resume_request

    run = build_config({"method": "and", "out": "elsewhere", "train": {"epochs": 3, "threads": 2},
                        "options": {"rounds": 1}})
    (tmp_path / "config.yaml").write_text(run.to_yaml())
    given = {"out": str(tmp_path), "train": {"progress": False, "epochs": 3}}
    cfg = resume_config(tmp_path, resume_request(given), given)
    assert cfg.out == str(tmp_path) and not cfg.train.progress and cfg.train.threads == 2
    assert cfg.train.epochs == 3 and cfg.options.rounds == 1 and cfg.method == "and"
    with pytest.raises(ConfigError, match="train.epochs is 3 there, not 5"):
        resume_config(tmp_path, resume_request(given), {"train": {"epochs": 5}})
    with pytest.raises(ConfigError, match="--resume needs --out"):
        resume_request({"train": {"progress": False}})
