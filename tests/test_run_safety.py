"""A run directory cannot be hijacked or corrupted (issue 14): weights-only checkpoints, one writer,
overwrite that keeps the old run until the new one is whole, honest resume accounting, one-line
errors for every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli

FAST = ["--backbone", "mlp", "--no-progress", "--batch-size", "64"]


def _one_line(proc, *fragments):
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _fit(out, data, *extra):
    proc = run_cli("fit", "--data", f"npz:{data}", "--epochs", "2", "--out", str(out), "--seed", "1", *FAST, *extra)
    assert proc.returncode == 0, proc.stderr
    return proc


def _digest(run) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_resume_refuses_a_checkpoint_that_carries_code(tmp_path, small_npz):
    out = tmp_path / "run"
    _fit(out, small_npz)
    (out / "metrics.json").unlink()  # an unfinished run, so --resume reads the checkpoint
    marker = tmp_path / "PWNED"
    os.environ["PWNED_MARKER"] = str(marker)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    state["rng"]["python"] = _Exploit()
    torch.save(state, out / "checkpoints" / "last.pt")
    proc = run_cli("fit", "--resume", "--out", str(out), "--no-progress")
    _one_line(proc, "refusing checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage", "truncate"])
def test_resume_of_a_damaged_checkpoint_is_one_line(tmp_path, small_npz, content):
    out = tmp_path / "run"
    _fit(out, small_npz)
    (out / "metrics.json").unlink()
    ckpt = out / "checkpoints" / "last.pt"
    if content == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        ckpt.write_bytes(content)
    _one_line(run_cli("fit", "--resume", "--out", str(out), "--no-progress"), "checkpoint")


def test_two_fits_on_one_out_leave_one_whole_run(tmp_path, small_npz):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    procs = [subprocess.Popen([sys.executable, "-m", "deepclust", "fit", "--data", f"npz:{small_npz}", "--epochs", "4",
                               "--out", str(out), "--seed", str(seed), *FAST], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (11, 12)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    ok = [r for r in results if r[0].returncode == 0]
    failed = [r for r in results if r[0].returncode != 0]
    assert len(ok) == 1 and len(failed) == 1, [r[2][-500:] for r in results]
    lines = [line for line in failed[0][2].strip().splitlines() if line.strip()]
    assert len(lines) == 1 and ("another deepclust process" in lines[0] or "already holds a run" in lines[0]), lines
    winner_seed = 11 if ok[0][0] is procs[0] else 12
    assert f"seed: {winner_seed}" in (out / "config.yaml").read_text()
    assert np.load(out / "labels.npy").shape == (300,)
    assert not list(out.parent.glob(".*.tmp")) and not list(out.rglob(".*.tmp"))
    assert run_cli("evaluate", "--run", str(out)).returncode == 0


def test_killed_overwrite_keeps_the_old_run_whole(tmp_path, small_npz):
    out = tmp_path / "run"
    _fit(out, small_npz)
    before = _digest(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.Popen([sys.executable, "-m", "deepclust", "fit", "--data", f"npz:{small_npz}", "--epochs", "500",
                          "--out", str(out), "--overwrite", "--seed", "9", *FAST], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out.with_name("run.partial") / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert log.exists(), "the overwrite never started training"
    assert _digest(out) == before
    assert run_cli("evaluate", "--run", str(out)).returncode == 0
    # a later overwrite that finishes replaces the run, and leaves nothing beside it
    _fit(out, small_npz, "--overwrite")
    assert "seed: 1" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["run"]


def test_predict_checks_size_and_channels_for_every_backbone(tmp_path, small_npz):
    out = tmp_path / "run"
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "1", "--out", str(out), "--backbone",
                   "resnet18", "--no-progress", "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr
    big = tmp_path / "big.npz"
    np.savez(big, images=np.random.default_rng(0).integers(0, 255, (20, 16, 16), dtype=np.uint8))
    _one_line(run_cli("predict", "--run", str(out), "--data", f"npz:{big}", "--out", str(tmp_path / "p.npy")),
              "--resize 8")
    ok = run_cli("predict", "--run", str(out), "--data", f"npz:{big}", "--resize", "8", "--out", str(tmp_path / "p.npy"))
    assert ok.returncode == 0, ok.stderr
    colour = tmp_path / "colour.npz"
    np.savez(colour, images=np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8))
    _one_line(run_cli("predict", "--run", str(out), "--data", f"npz:{colour}", "--out", str(tmp_path / "q.npy")),
              "channel")


@pytest.mark.parametrize("setting, fragment", [
    ("memory.temperature=inf", "memory.temperature: must be a finite number"),
    ("memory.temperature=nan", "memory.temperature: must be a finite number"),
    ("optim.lr=-1", "optim.lr: must be > 0"),
    ("memory.eta=1.5", "memory.eta: must be > 0 and <= 1"),
    ("optim.momentum=1", "optim.momentum"),
    ("views.rotation=1e9", "views.rotation"),
])
def test_options_that_cannot_train_are_refused(tmp_path, small_npz, setting, fragment):
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--out", str(tmp_path / "r"), "--set", setting, *FAST)
    _one_line(proc, fragment)
    assert not (tmp_path / "r").exists()


def test_resume_accounting(tmp_path, small_npz):
    out = tmp_path / "run"
    _fit(out, small_npz)
    metrics = (out / "metrics.json").read_text()
    again = run_cli("fit", "--resume", "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "has finished; nothing to resume" in again.stderr
    assert (out / "metrics.json").read_text() == metrics
    m = json.loads(metrics)
    assert m["train_seconds"] > 0 and isinstance(m["images_per_second"], float)
    (out / "metrics.json").unlink()
    _one_line(run_cli("fit", "--resume", "--out", str(out), "--epochs", "5", "--no-progress"),
              "train.epochs is 2 there")
    same = run_cli("fit", "--resume", "--out", str(out), "--epochs", "2", "--no-progress")
    assert same.returncode == 0, same.stderr


def test_unwritable_out_is_found_before_the_data(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli("fit", "--data", "npz:/no/such/data.npz", "--out", str(blocker / "run"), *FAST)
    _one_line(proc, "cannot write")
