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
    deadline = time.time() + 120  # the rebuild's name is unique: .run.partial-XXXXXXXX
    while time.time() < deadline and not any(log.read_text().count("\n") >= 1
                                             for log in tmp_path.glob(".run.partial-*/log.jsonl")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(tmp_path.glob(".run.partial-*/log.jsonl")), "the overwrite never started training"
    assert _digest(out) == before
    assert run_cli("evaluate", "--run", str(out)).returncode == 0
    # a later overwrite that finishes replaces the run, and leaves nothing beside it (the killed
    # rebuild, which carries the run marker, included)
    _fit(out, small_npz, "--overwrite")
    assert "seed: 1" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


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


# -- issue 23: one writer however the path is spelled, one line for every failure --------------------

def _error_line(proc, *fragments):
    """One ``deepclust: error:`` line (other lines only ``deepclust:`` notes), no traceback, non-zero."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("deepclust: error:")]
    assert len(errors) == 1 and all(line.startswith("deepclust: ") for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def _spawn(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "deepclust", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _links(tmp_path):
    """real/z (an empty directory) and links/z, a symbolic link to it."""
    real = tmp_path / "real" / "z"
    real.mkdir(parents=True)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "z").symlink_to(real)
    return real, tmp_path / "links" / "z"


def test_the_run_lock_is_keyed_by_the_real_directory(tmp_path):
    from deepclust.errors import DataError
    from deepclust.locks import claim_run_dir

    real, link = _links(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "up").symlink_to(tmp_path / "real")
    spellings = [link, tmp_path / "a" / ".." / "real" / "z", tmp_path / "links" / ".." / "real" / "z",
                 tmp_path / "up" / "z"]
    for first in (real, *spellings):
        held = claim_run_dir(first)  # flock is per open file: a second claim in this process conflicts too
        try:
            for other in (real, *spellings):
                with pytest.raises(DataError, match="another deepclust process"):
                    claim_run_dir(other)
        finally:
            held.release()
    held = claim_run_dir(tmp_path / "up" / "new")  # a directory not made yet: its existing ancestor resolved
    try:
        with pytest.raises(DataError, match="another deepclust process"):
            claim_run_dir(tmp_path / "real" / "new")
    finally:
        held.release()


def test_two_resumes_through_a_link_leave_one_writer(tmp_path, small_npz):
    real, link = _links(tmp_path)
    p = _spawn("fit", "--data", f"npz:{small_npz}", "--epochs", "40", "--out", str(real), "--seed", "1",
               "--views", "digits", *FAST)
    deadline = time.time() + 120
    while time.time() < deadline and not (real / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    p.kill()
    p.communicate()
    assert (real / "checkpoints" / "last.pt").exists() and not (real / "metrics.json").exists()
    procs = [_spawn("fit", "--resume", "--out", str(out), "--no-progress") for out in (real, link)]
    results = [(q.returncode, err) for q, (_, err) in ((q, q.communicate(timeout=300)) for q in procs)]
    trained = [err for rc, err in results if rc == 0 and "nothing to resume" not in err]
    assert len(trained) == 1, results
    for rc, err in results:
        if rc != 0:
            assert "another deepclust process is writing" in err and len(err.strip().splitlines()) == 1, err
    epochs = [json.loads(line)["epoch"] for line in (real / "log.jsonl").read_text().splitlines()]
    assert epochs == list(range(40))
    assert link.is_symlink() and json.loads((real / "metrics.json").read_text())["epochs"] == 40


def _folder(root, n=20, bad=()):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    for name in bad:
        (root / name).write_bytes(b"\x89PNG not really")
    return root


def test_resize_beyond_memory_is_one_line_before_any_image_is_resized(tmp_path):
    import resource

    data, out = _folder(tmp_path / "imgs", n=30), tmp_path / "run"

    def cap():  # a safety net: a guard that regressed fails with MemoryError, never takes the machine
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "deepclust", "fit", "--data", f"folder:{data}", "--resize", "100000",
                           "--epochs", "1", "--out", str(out), *FAST], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=cap)
    _error_line(proc, "30 image(s) resized to 100000x100000", "available", "--resize")
    assert not out.exists()


def test_training_memory_is_checked_before_anything_is_allocated(tmp_path, small_npz, monkeypatch):
    import deepclust.limits

    monkeypatch.setattr(deepclust.limits, "available_memory", lambda: 10**6)
    out = tmp_path / "run"
    line = _error_line(run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "1", "--out", str(out), *FAST),
                       "training on 300 image(s) of 1x8x8", "1.0 MB is available")
    assert "kNN structures" in line
    assert not out.exists()


def _enospc_on(fragment, monkeypatch):
    """Make io's low-level write fail with ENOSPC for temporary files whose name holds ``fragment``."""
    import errno

    import deepclust.io

    real_write = deepclust.io._write

    def write(f, data):
        if fragment in getattr(f, "name", ""):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(f, data)

    monkeypatch.setattr(deepclust.io, "_write", write)


def _no_tmp(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, small_npz, monkeypatch):
    out = tmp_path / "run"
    _fit(out, small_npz)
    before = _digest(out)
    _enospc_on("last.pt", monkeypatch)
    proc = run_cli("fit", "--method", "pad", "--data", f"npz:{small_npz}", "--epochs", "2", "--out", str(out),
                   "--overwrite", "--views", "digits", *FAST)
    line = _error_line(proc, f"cannot write {tmp_path / '.run.partial-'}", "No space left on device",
                       "errno 28, ENOSPC")
    assert f"{os.sep}checkpoints{os.sep}last.pt" in line
    assert _digest(out) == before and not _no_tmp(tmp_path)
    assert not list(tmp_path.glob(".run.partial-*"))  # the failed rebuild is removed
    # a first run that fails the same way is no run: --resume says so, a plain fit starts it again
    fresh = tmp_path / "fresh"
    _error_line(run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "2", "--out", str(fresh), *FAST),
                "ENOSPC", str(fresh / "checkpoints" / "last.pt"))
    assert (fresh / "config.yaml").exists() and not _no_tmp(tmp_path)
    monkeypatch.undo()
    _error_line(run_cli("fit", "--resume", "--out", str(fresh), "--no-progress"),
                "stopped before its first checkpoint")
    _fit(fresh, small_npz)


def test_a_full_disk_while_appending_to_the_log_is_one_line(tmp_path, small_npz, monkeypatch):
    """The per-epoch append to log.jsonl (not an atomic write) fails as one line too."""
    import errno

    import deepclust.io

    real_write = deepclust.io._write

    def write(f, data):  # the appends only: the file itself, opened for appending
        if getattr(f, "name", "").endswith("log.jsonl") and "a" in getattr(f, "mode", ""):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(f, data)

    monkeypatch.setattr(deepclust.io, "_write", write)
    out = tmp_path / "run"
    proc = run_cli("fit", "--method", "pad", "--data", f"npz:{small_npz}", "--epochs", "2", "--out", str(out),
                   "--views", "digits", *FAST)
    _error_line(proc, f"cannot write {out / 'log.jsonl'}", "errno 28, ENOSPC")
    assert not _no_tmp(tmp_path)


def test_a_full_tmpfs_is_one_line_and_loses_nothing(tmp_path, small_npz):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the ENOSPC variant above covers the same code path")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        out = disk / "run"
        small = tmp_path / "d100.npz"
        with np.load(small_npz) as z:
            np.savez(small, images=z["images"][:100], labels=z["labels"][:100])
        _fit(out, small, "--dim", "16")
        before = _digest(out)
        proc = run_cli("fit", "--method", "pad", "--data", "digits", "--epochs", "2", "--out", str(out),
                       "--overwrite", "--views", "digits", *FAST)
        _error_line(proc, f"cannot write {disk / '.run.partial-'}", "errno 28, ENOSPC")
        assert _digest(out) == before and not _no_tmp(disk)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_start_that_left_no_checkpoint_is_not_a_run(tmp_path, small_npz):
    out = tmp_path / "run"
    _fit(out, small_npz)
    for name in ("metrics.json", "model.safetensors", "head.npz", "embeddings.npy", "labels.npy"):
        (out / name).unlink()
    (out / "checkpoints" / "last.pt").unlink()  # what a first start that failed before its checkpoint leaves
    (out / "notes.txt").write_text("mine")
    _error_line(run_cli("fit", "--resume", "--out", str(out), "--no-progress"),
                "nothing to resume", "stopped before its first checkpoint")
    again = _fit(out, small_npz, "--seed", "4")
    assert "starting again" in again.stderr
    assert "seed: 4" in (out / "config.yaml").read_text() and (out / "metrics.json").exists()
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files were cleared
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    mine = tmp_path / "mine"  # a config.yaml fit did not write is never cleared
    mine.mkdir()
    (mine / "config.yaml").write_text("method: pad\n")
    _error_line(run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "1", "--out", str(mine), *FAST),
                "is not a deepclust run", "'config.yaml'")
    assert (mine / "config.yaml").read_text() == "method: pad\n"


def test_a_dangling_link_as_out_is_one_line(tmp_path, small_npz):
    (tmp_path / "z").symlink_to(tmp_path / "missing" / "z")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    for out in (tmp_path / "z", tmp_path / "gone" / "run"):
        _error_line(run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "1", "--out", str(out), *FAST),
                    "symbolic link", "does not exist")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "nowhere").exists()


def test_skipped_images_are_counted_in_one_line_and_in_the_metrics(tmp_path):
    data, out = _folder(tmp_path / "imgs", bad=("b/bad.png",)), tmp_path / "run"
    proc = run_cli("fit", "--data", f"folder:{data}", "--epochs", "1", "--out", str(out), "--views", "digits", *FAST,
                   "--n-clusters", "2", isolated=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # one line for the skipped files (other warnings, e.g. an unbalanced partition after one epoch on a
    # handful of images, may follow it), and no traceback
    assert [line for line in lines if "skipped" in line or "unreadable" in line] == [
        f"deepclust: warning: skipped 1 image file(s) under {data}: b/bad.png (unreadable)"], lines
    assert all(line.startswith("deepclust: ") for line in lines), lines
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == {"count": 1,
                                                                                "first": ["b/bad.png (unreadable)"]}


def test_resume_with_another_method_names_the_clash(tmp_path, small_npz):
    out = tmp_path / "run"
    _fit(out, small_npz, "--method", "pad")
    _error_line(run_cli("fit", "--resume", "--out", str(out), "--method", "pcp", "--no-progress"),
                "--resume continues the pad run", "not a pcp run")


def test_predict_on_other_channels_does_not_suggest_resize(tmp_path, small_npz):
    out = tmp_path / "run"
    _fit(out, small_npz)
    colour = tmp_path / "colour.npz"
    np.savez(colour, images=np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), dtype=np.uint8))
    line = _error_line(run_cli("predict", "--run", str(out), "--data", f"npz:{colour}", "--out",
                               str(tmp_path / "p.npy")), "3 channel(s)", "with 1")
    assert "--resize" not in line


def test_overwrite_through_a_link_replaces_the_run_and_leaves_no_stray(tmp_path, small_npz):
    real, link = _links(tmp_path)
    _fit(real, small_npz)
    _fit(link, small_npz, "--overwrite", "--seed", "5")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert "seed: 5" in (real / "config.yaml").read_text()
    visible = sorted(p.name for d in (tmp_path / "links", tmp_path / "real") for p in d.iterdir()
                     if not p.name.startswith("."))
    assert visible == ["z", "z"], visible
