import pytest
import torch
import torch.nn.functional as F

from deepclust.config import Config, build_config, read_yaml
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


def test_nce_loss_is_finite_and_positive():
    bank = MemoryBank(100, 8, seed=0)
    x = F.normalize(torch.randn(4, 8), dim=1)
    loss = bank.nce_loss(x, torch.arange(4), 16, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss > 0).all()
    assert float(bank.nce_z) > 0


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
