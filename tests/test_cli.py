"""The command line contract: outputs of fit and evaluate, and one-line errors on bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_cli

FAST = ["--backbone", "mlp", "--no-progress", "--batch-size", "64"]


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_fit_writes_the_run_and_evaluate_recomputes_it(tmp_path, small_npz):
    out = tmp_path / "run"
    proc = run_cli("fit", "--method", "instance", "--data", f"npz:{small_npz}", "--epochs", "2",
                   "--out", str(out), "--seed", "1", "--n-clusters", "10", *FAST)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    for name in ("config.yaml", "checkpoints/last.pt", "embeddings.npy", "labels.npy", "metrics.json",
                 "model.safetensors", "head.npz", "log.jsonl"):
        assert (out / name).exists(), name
    emb = np.load(out / "embeddings.npy")
    labels = np.load(out / "labels.npy")
    assert emb.shape == (300, 128) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert labels.shape == (300,) and labels.dtype == np.int64 and labels.max() < 10
    m = json.loads((out / "metrics.json").read_text())
    for key in ("method", "data", "n_images", "n_clusters", "epochs", "train_seconds", "images_per_second",
                "acc", "nmi", "ari", "knn_top1", "kmeans_embedding_acc", "cluster_sizes"):
        assert key in m, key
    assert m["n_images"] == 300 and m["n_clusters"] == 10 and m["epochs"] == 2
    assert m["knn_protocol"] == "test split against train split"
    assert sum(m["cluster_sizes"]) == 300
    assert printed["acc"] == m["acc"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    ev = run_cli("evaluate", "--run", str(out))
    assert ev.returncode == 0, ev.stderr
    again = json.loads(ev.stdout)
    for key in ("acc", "nmi", "ari", "knn_top1"):
        assert again[key] == pytest.approx(m[key], abs=1e-6), key
    # evaluate with another head and feature layer writes metrics_evaluate.json, not metrics.json
    ev2 = run_cli("evaluate", "--run", str(out), "--cluster-head", "kmeans", "--cluster-features", "embedding")
    assert ev2.returncode == 0, ev2.stderr
    assert json.loads(ev2.stdout)["cluster_head"] == "kmeans"
    assert (out / "metrics_evaluate.json").exists()
    assert json.loads((out / "metrics.json").read_text()) == m
    # predict: the run's own images get the run's own clusters back
    pred = run_cli("predict", "--run", str(out), "--data", f"npz:{small_npz}", "--out", str(tmp_path / "p.npy"))
    assert pred.returncode == 0, pred.stderr
    assert (np.load(tmp_path / "p.npy") == labels).mean() > 0.9
    pred_csv = run_cli("predict", "--run", str(out), "--data", "digits", "--out", str(tmp_path / "p.csv"))
    assert pred_csv.returncode == 0, pred_csv.stderr
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "name,cluster"
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1798
    wrong = run_cli("predict", "--run", str(out), "--data", f"npz:{ROOT.parent / 'shared/data/usps.npz'}",
                    "--out", str(tmp_path / "q.npy"))
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    # the saved configuration is reusable as --config
    out2 = tmp_path / "run2"
    proc2 = run_cli("fit", "--config", str(out / "config.yaml"), "--out", str(out2), "--no-progress")
    assert proc2.returncode == 0, proc2.stderr
    assert np.allclose(np.load(out2 / "embeddings.npy"), emb, atol=1e-5)


def test_existing_run_is_not_clobbered(tmp_path, small_npz):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("method: instance\n")
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "1", "--out", str(out), *FAST)
    assert_one_line_error(proc, "is not a deepclust run", "'config.yaml'")
    assert (out / "config.yaml").read_text() == "method: instance\n"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--data", "npz:/no/such/file.npz"], "/no/such/file.npz"),
        (["--data", "folder:/no/such/dir"], "/no/such/dir"),
        (["--method", "nope"], "unknown method"),
        (["--data", "imagenet-42"], "unknown dataset"),
        (["--epochs", "ten"], "expected an integer"),
        (["--n-clusters", "5000"], "larger than the number of images"),
        (["--set", "optim.lrr=3"], "unknown option"),
        (["--config", "/no/such.yaml"], "config file not found"),
        (["--cluster-features", "conv9"], "unknown layer"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, args, fragment):
    proc = run_cli("fit", "--out", str(tmp_path / "r"), "--epochs", "1", *FAST, *args)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r").exists()


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("fit", "--data", f"folder:{empty}", *FAST), "no images")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(mixed / "b.png")
    assert_one_line_error(run_cli("fit", "--data", f"folder:{mixed}", "--out", str(tmp_path / "r"), *FAST),
                          "mixed sizes")


def test_evaluate_missing_run(tmp_path):
    assert_one_line_error(run_cli("evaluate", "--run", str(tmp_path / "nope")), "no such run directory")


def test_labels_never_reach_training(tmp_path, small_npz):
    """Shuffled labels give exactly the same embeddings and clusters."""
    d = dict(np.load(small_npz))
    d["labels"] = np.random.default_rng(5).permutation(d["labels"])
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, **d)
    outs = []
    for i, path in enumerate((small_npz, shuffled)):
        out = tmp_path / f"r{i}"
        proc = run_cli("fit", "--data", f"npz:{path}", "--epochs", "1", "--out", str(out), "--seed", "3", *FAST)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    assert np.array_equal(np.load(outs[0] / "embeddings.npy"), np.load(outs[1] / "embeddings.npy"))
    assert np.array_equal(np.load(outs[0] / "labels.npy"), np.load(outs[1] / "labels.npy"))


def test_kill_and_resume_equals_uninterrupted(tmp_path, small_npz):
    args = ["fit", "--method", "and", "--data", f"npz:{small_npz}", "--epochs", "3", "--rounds", "2",
            "--seed", "2", *FAST]
    ref = tmp_path / "ref"
    proc = run_cli(*args, "--out", str(ref))
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    p = subprocess.Popen([sys.executable, "-m", "deepclust", *args, "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    deadline = time.time() + 900  # a loaded machine can take minutes; the loop ends at the third epoch
    while time.time() < deadline and p.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    proc = run_cli("fit", "--resume", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert np.allclose(np.load(out / "embeddings.npy"), np.load(ref / "embeddings.npy"), atol=1e-6)
    assert np.array_equal(np.load(out / "labels.npy"), np.load(ref / "labels.npy"))


def test_method_help_names_every_registered_method_and_the_default():
    from deepclust.config import Config
    from deepclust.methods import METHODS

    r = run_cli("fit", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert f"{' | '.join(METHODS)} (default: {Config.method})" in text and Config.method == "pad"
