"""Representation probes: a linear classifier and DCCM's one-hidden-layer MLP on frozen features
(``evaluate.probe_report``) and ``deepclust evaluate --protocol knn|linear|mlp`` on a finished run."""

import json

import numpy as np
import pytest

from conftest import run_cli
from deepclust.errors import DataError
from deepclust.evaluate import probe_report


def blobs(n_per=60, classes=4, d=16, sep=6.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * sep
    x = np.concatenate([c + rng.standard_normal((n_per, d)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(classes), n_per)


@pytest.mark.parametrize("protocol", ["linear", "mlp"])
def test_probe_on_separable_features_is_near_perfect(protocol):
    x, y = blobs()
    r = probe_report(x, y, protocol=protocol)  # no split: stratified 5-fold
    assert r["top1"] >= 0.98 and len(r["folds"]) == 5 and "5-fold" in r["split"]
    assert r["hidden_units"] == (200 if protocol == "mlp" else None)


def test_probe_uses_the_data_split_and_is_at_chance_on_random_labels():
    x, y = blobs(seed=1)
    split = (np.arange(len(y)) % 4 == 0).astype(np.int8)  # a quarter tested
    r = probe_report(x, y, split, protocol="linear")
    assert r["top1"] >= 0.98 and "the data's split: 180 train, 60 test" == r["split"]
    shuffled = np.random.default_rng(2).permutation(y)  # the features say nothing of these labels
    assert probe_report(x, shuffled, split, protocol="linear")["top1"] < 0.5


def test_probe_needs_two_of_every_class():
    x, y = blobs(n_per=3)
    y[0] = 9  # a class of one image
    with pytest.raises(DataError, match="at least 2 images of every class"):
        probe_report(x, y)
    assert len(probe_report(*blobs(n_per=3))["folds"]) == 3  # folds shrink to the smallest class


def test_evaluate_protocols_on_a_finished_run(tmp_path, small_npz):
    out = tmp_path / "run"
    fit = run_cli("fit", "--method", "instance", "--data", f"npz:{small_npz}", "--epochs", "1", "--out", str(out),
                  "--n-clusters", "10", "--backbone", "mlp", "--no-progress", "--batch-size", "64")
    assert fit.returncode == 0, fit.stderr
    knn = json.loads(run_cli("evaluate", "--run", str(out), "--protocol", "knn").stdout)
    assert knn["top1"] == json.loads((out / "metrics.json").read_text())["knn_top1"]
    for protocol in ("linear", "mlp"):
        ev = run_cli("evaluate", "--run", str(out), "--protocol", protocol)
        assert ev.returncode == 0, ev.stderr
        m = json.loads(ev.stdout)
        assert m["protocol"] == protocol and m["split"].startswith("the data's split: 240 train, 60 test")
        assert 0.3 < m["top1"] <= 1.0  # 10 classes: a trained embedding of digits is far above chance
        assert json.loads((out / f"metrics_evaluate_{protocol}.json").read_text()) == m
    layer = run_cli("evaluate", "--run", str(out), "--protocol", "linear", "--features", "fc1")  # a network layer
    assert layer.returncode == 0, layer.stderr
    assert json.loads(layer.stdout)["features"] == "layer fc1" and (out / "metrics_evaluate_linear_fc1.json").exists()
    for bad, words in ((["--protocol", "svm"], "--protocol"), (["--protocol", "linear", "--data", "digits"], "--protocol"),
                       (["--protocol", "linear", "--features", "conv9"], "conv9"), (["--features", "fc1"], "--features")):
        proc = run_cli("evaluate", "--run", str(out), *bad)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert words in lines[0], lines[0]
