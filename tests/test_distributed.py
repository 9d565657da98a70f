"""Two CPU processes (gloo DDP through Lightning Fabric) against one process with the same global batch."""

import json

import pytest
import torch

from conftest import run_cli


@pytest.mark.slow
def test_ddp_bank_identical_on_ranks_and_equal_to_one_process(tmp_path, small_npz):
    common = ["fit", "--method", "instance", "--data", f"npz:{small_npz}", "--backbone", "mlp", "--epochs", "1",
              "--batch-size", "64", "--accelerator", "cpu", "--seed", "4", "--no-progress"]
    two, one = tmp_path / "two", tmp_path / "one"
    p2 = run_cli(*common, "--devices", "2", "--out", str(two), timeout=240)
    assert p2.returncode == 0, p2.stderr[-3000:]
    p1 = run_cli(*common, "--devices", "1", "--out", str(one), timeout=240)
    assert p1.returncode == 0, p1.stderr[-3000:]

    record = json.loads((two / "log.jsonl").read_text().splitlines()[-1])
    assert record["bank_identical_across_ranks"] is True
    bank2 = torch.load(two / "checkpoints" / "last.pt", weights_only=False)["bank"]["features"]
    bank1 = torch.load(one / "checkpoints" / "last.pt", weights_only=False)["bank"]["features"]
    init = torch.load(one / "checkpoints" / "last.pt", weights_only=False)
    assert bank1.shape == bank2.shape == (300, 128)
    # every row was written during the epoch, and the two runs agree up to float rounding
    assert torch.allclose(bank1, bank2, atol=1e-5), (bank1 - bank2).abs().max()
    assert init["epoch"] == 0
