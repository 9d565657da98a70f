"""What every method must satisfy, run for every registered method (``deepclust.methods.METHODS``):

- labels never steer anything: shuffled labels give identical embeddings and clusters;
- two processes (gloo DDP on the CPU, the default BatchNorm backbone) equal one process with the
  same global batch (after the smoke run, or after one step for the methods in ``ONE_STEP``), and every part of the method's state (bank, structure with its history, own
  modules) is identical on both ranks after every epoch;
- a run SIGKILLed between its log record and its checkpoint, after at least two discoveries and in the
  middle of a round, then resumed, equals an uninterrupted run record by record, with exactly one log
  record per epoch.
The learned clustering phases after a method (``PHASE_SMOKE``: ``instance+scan``, ``instance+dec``) are
cases of their own in all three.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import KILL_EPOCH, METHOD_SMOKE, PHASE_SMOKE, ROOT, smoke_layer

from deepclust.config import merge_layers
from deepclust.configure import build_config
from deepclust.methods import METHODS, stage_class
from deepclust.runs import fit_run, resume_run

ALL = sorted(METHODS) + sorted(PHASE_SMOKE)
WORKER = str(ROOT / "tests" / "_workers.py")


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("DEEPCLUST_RUN_OUT", None)
    env.update(extra)
    return env


def _outputs(out) -> dict:
    return {"embeddings": np.load(out / "embeddings.npy"), "labels": np.load(out / "labels.npy"),
            "log": [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()],
            "metrics": json.loads((out / "metrics.json").read_text())}


@pytest.fixture(scope="module")
def references(tmp_path_factory, small_npz):
    """One uninterrupted one-process run of every method."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for m in ALL:
        fit_run(build_config(smoke_layer(m, f"npz:{small_npz}", root / m)))
        runs[m] = _outputs(root / m)
    return runs


def test_every_method_has_a_smoke_configuration():
    assert set(METHOD_SMOKE) == set(METHODS)
    assert set(KILL_EPOCH) == set(METHODS) | set(PHASE_SMOKE)


@pytest.mark.parametrize("method", ALL)
def test_shuffled_labels_change_nothing(tmp_path, small_npz, references, method):
    d = dict(np.load(small_npz))
    d["labels"] = np.random.default_rng(5).permutation(d["labels"])
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, **d)
    fit_run(build_config(smoke_layer(method, f"npz:{shuffled}", tmp_path / "run")))
    got, ref = _outputs(tmp_path / "run"), references[method]
    assert np.array_equal(got["embeddings"], ref["embeddings"])
    assert np.array_equal(got["labels"], ref["labels"])
    assert got["metrics"]["cluster_sizes"] == ref["metrics"]["cluster_sizes"]


@pytest.mark.parametrize("method", ALL)
def test_bf16_mixed_precision_runs(tmp_path, small_npz, method):
    """bf16-mixed is the default on a GPU (train.make_fabric); the CPU's autocast takes the same
    paths (a float32 sentinel in a bfloat16 tensor broke JULE's loss there, found on an H200)."""
    layer = merge_layers(smoke_layer(method, f"npz:{small_npz}", tmp_path / "run"),
                         {"train": {"precision": "bf16-mixed"}})
    fit_run(build_config(layer))
    got = _outputs(tmp_path / "run")
    assert np.isfinite(got["embeddings"]).all() and len(got["labels"]) == len(got["embeddings"])
    losses = [r["loss"] for r in got["log"] if r.get("loss") is not None]
    assert losses and np.isfinite(losses).all()


def test_a_phase_leaves_the_method_epochs_unchanged(references):
    """The phase's parameters are drawn from a generator of their own: the method's epochs of a run
    with the phase equal those of the run without it, record by record; the phase's epochs follow."""
    for case in PHASE_SMOKE:
        method = case.split("+")[0]
        n = len(references[method]["log"])
        assert all(_same_record(a, b) for a, b in zip(references[case]["log"][:n], references[method]["log"]))
        cfg = build_config(smoke_layer(case, "digits", "/nonexistent"))
        assert len(references[case]["log"]) - n == stage_class(cfg.cluster.head).epochs_of(cfg), case


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Cases compared with one process after ONE optimiser step of each stage, where DDP's guarantee ends:
# the step's gradient is the one-process gradient up to the order of a float sum, and nothing more.
# - DCCM thresholds its own predictions (pseudo-graph and pseudo-labels): a rounding difference flips a
#   pair over the threshold and the runs part after a few steps.
# - The clustering stage (SCAN) trains with Adam, which divides each gradient by its own size: where
#   the true gradient is 0 (a bias or a weight row in front of a BatchNorm) the rounding noise becomes
#   steps of the whole rate, and the runs part by 1e-4 (AVX2) to 1.5e-3 (AVX-512) in the embedding.
# The one-step runs use plain SGD, so the step is the gradient times the rate, and every parameter must
# agree tightly; the stage's one-step run has every stage (method, SCAN, self-labelling) take one step
# of the whole data set. Its mined neighbours' closest call (20th against 21st) is 1.4e-5 apart here,
# two orders above the runs' difference. The smoke runs of these cases are checked for what holds over
# many steps: every rank's state identical every epoch, the same epochs and stages as one process.
ONE_STEP = {"dccm": {"train": {"epochs": 1}, "optim": {"batch_size": 300, "optimizer": "sgd"}},
            "instance+scan": {"train": {"epochs": 1}, "optim": {"batch_size": 600, "optimizer": "sgd"},
                              "scan": {"epochs": 1, "self_label_epochs": 1, "confidence": 0.0,
                                       "optimizer": "sgd"}}}


def _checkpoint_tensors(out) -> dict:
    import torch

    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    return {**{f"net.{k}": v for k, v in state["model"].items()},
            **{f"{name}.{k}": v for name, method in state["methods"].items() for k, v in method["modules"].items()}}


def _ddp(layers: dict) -> None:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, "ddp", json.dumps({"layers": layers})],
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), NODE_RANK="0", WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


def _ranks_identical(m: str, out) -> None:
    """Every rank's bank, structure and own modules identical after every epoch (the log's flags)."""
    checked = set()
    for record in _outputs(out)["log"]:
        for key in (k for k in record if k.endswith("_identical_across_ranks")):
            assert record[key] is True, (m, key, record)
            checked.add(key.split("_")[0])
    expected = {"bank"} if METHODS[m.split("+")[0]].uses_bank else set()
    expected |= {"structure"} if m != "instance" else set()  # a phase's: its mined neighbours
    expected |= {"modules"} if any(not k.startswith("net.") for k in _checkpoint_tensors(out)) else set()
    assert checked == expected, (m, checked)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, small_npz, references):
    layers = {m: smoke_layer(m, f"npz:{small_npz}", tmp_path / m, train={"devices": 2}) for m in ALL}
    layers.update({f"{m}-one": merge_layers(smoke_layer(m, f"npz:{small_npz}", tmp_path / f"{m}-one",
                                                         train={"devices": 2}), one)
                   for m, one in ONE_STEP.items()})
    _ddp(layers)
    for m, one in sorted(ONE_STEP.items()):
        fit_run(build_config(merge_layers(smoke_layer(m, f"npz:{small_npz}", tmp_path / f"{m}-ref"), one)))
        ref, two = _checkpoint_tensors(tmp_path / f"{m}-ref"), _checkpoint_tensors(tmp_path / f"{m}-one")
        assert ref.keys() == two.keys()
        for k in ref:
            assert torch_close(ref[k], two[k]), (m, k, (ref[k].double() - two[k].double()).abs().max())
        assert np.allclose(_outputs(tmp_path / f"{m}-one")["embeddings"],
                           _outputs(tmp_path / f"{m}-ref")["embeddings"], atol=1e-4), m
        _ranks_identical(m, tmp_path / f"{m}-one")
    for m in ALL:
        got, ref = _outputs(tmp_path / m), references[m]
        _ranks_identical(m, tmp_path / m)
        assert [(r["epoch"], r.get("phase")) for r in got["log"]] == [(r["epoch"], r.get("phase")) for r in ref["log"]]
        assert np.isfinite(got["embeddings"]).all() and len(got["labels"]) == len(ref["labels"])
        if m in ONE_STEP:
            continue
        assert np.allclose(got["embeddings"], ref["embeddings"], atol=1e-4), \
            (m, np.abs(got["embeddings"] - ref["embeddings"]).max())
        assert (got["labels"] == ref["labels"]).mean() > 0.99, m


def torch_close(a, b) -> bool:
    if not a.is_floating_point():
        return bool((a == b).all())
    return bool(((a.double() - b.double()).abs() <= 1e-5 + 1e-4 * b.double().abs()).all())


@pytest.mark.slow
@pytest.mark.parametrize("method", ALL)
def test_kill_between_log_and_checkpoint_then_resume(tmp_path, small_npz, references, method):
    """Killed after at least two discoveries, in the middle of a round (``KILL_EPOCH``), then resumed:
    the same log (losses and diagnostics, epoch by epoch), embeddings and labels as the uninterrupted run."""
    out, kill = tmp_path / "run", KILL_EPOCH[method]
    layer = smoke_layer(method, f"npz:{small_npz}", out)
    p = subprocess.run([sys.executable, WORKER, "kill", json.dumps({"layers": {method: layer}, "kill_epoch": kill})],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    assert not (out / "metrics.json").exists()
    assert [r["epoch"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == \
        list(range(kill + 1))
    resume_run(build_config({"out": str(out), "train": {"progress": False}}))
    got, ref = _outputs(out), references[method]
    assert [r["epoch"] for r in got["log"]] == list(range(len(ref["log"])))
    for mine, theirs in zip(got["log"], ref["log"]):
        assert _same_record(mine, theirs), (mine, theirs)
    assert np.allclose(got["embeddings"], ref["embeddings"], atol=1e-6)
    assert np.array_equal(got["labels"], ref["labels"])
    assert got["metrics"]["train_seconds"] > 0


def _same_record(a: dict, b: dict) -> bool:
    """Two log records equal but for timings: numbers to float rounding, everything else exactly."""
    keys = {k for k in a.keys() | b.keys() if "seconds" not in k and k != "images_per_second"}
    for k in keys:
        x, y = a.get(k), b.get(k)
        numbers = isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool)
        if not (x == pytest.approx(y, rel=1e-6, abs=1e-9) if numbers else x == y):
            return False
    return True


# -- DCCM's per-block schedule (options.schedule: block, the authors' main.py train), a case of its own
# in the three contract tests: 3 blocks of the 300 digits, 2 passes a block in mini-batches of 32 (3 a
# pass, the remainder left out), each mini-batch on 2 draws, one epoch a pass: 6 epochs, the block
# predicted at epochs 0, 2 and 4. The kill lands in block 1's second pass (epoch 3): the resume
# restores the block's prediction and trains on it without predicting again.
DCCM_BLOCK = {"options": {"schedule": "block", "block_size": 100, "block_repeats": 2, "block_draws": 2,
                          "block_epochs": 2},
              "optim": {"batch_size": 32}, "train": {"epochs": 1}}
DCCM_BLOCK_KILL = 3
# One optimiser step of the schedule (one block of all 300 images, one pass of one mini-batch, one
# draw), compared as ONE_STEP's cases are: plain SGD, every parameter within 1e-5 + 1e-4 |x|.
DCCM_BLOCK_ONE_STEP = {"options": {"block_size": 300, "block_repeats": 1, "block_draws": 1, "block_epochs": 1},
                       "optim": {"batch_size": 300, "optimizer": "sgd"}}


def _block_layer(small_npz, out, *more: dict) -> dict:
    return merge_layers(smoke_layer("dccm", f"npz:{small_npz}", out), DCCM_BLOCK, *more)


@pytest.fixture(scope="module")
def block_reference(tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp("reference") / "dccm-block"
    fit_run(build_config(_block_layer(small_npz, out)))
    return _outputs(out)


def test_dccm_block_shuffled_labels_change_nothing(tmp_path, small_npz, block_reference):
    d = dict(np.load(small_npz))
    d["labels"] = np.random.default_rng(5).permutation(d["labels"])
    np.savez(tmp_path / "shuffled.npz", **d)
    fit_run(build_config(_block_layer(tmp_path / "shuffled.npz", tmp_path / "run")))
    got = _outputs(tmp_path / "run")
    assert [r["phase"] for r in got["log"]] == [f"epoch 0 block {b}" for b in (0, 0, 1, 1, 2, 2)]
    assert np.array_equal(got["embeddings"], block_reference["embeddings"])
    assert np.array_equal(got["labels"], block_reference["labels"])
    assert [r["loss"] for r in got["log"]] == [r["loss"] for r in block_reference["log"]]


@pytest.mark.slow
def test_dccm_block_two_processes_equal_one(tmp_path, small_npz, block_reference):
    """One step of the schedule in two processes equals one process (the block's prediction gathered
    from both, the mini-batch's terms against the gathered batch); the smoke run's block structure and
    modules are identical on both ranks every epoch, with the same epochs and blocks as one process."""
    _ddp({"smoke": _block_layer(small_npz, tmp_path / "two", {"train": {"devices": 2}}),
          "one": _block_layer(small_npz, tmp_path / "one-two", DCCM_BLOCK_ONE_STEP, {"train": {"devices": 2}})})
    fit_run(build_config(_block_layer(small_npz, tmp_path / "one-ref", DCCM_BLOCK_ONE_STEP)))
    ref, two = _checkpoint_tensors(tmp_path / "one-ref"), _checkpoint_tensors(tmp_path / "one-two")
    assert ref.keys() == two.keys()
    for k in ref:
        assert torch_close(ref[k], two[k]), (k, (ref[k].double() - two[k].double()).abs().max())
    for out in (tmp_path / "one-two", tmp_path / "two"):
        _ranks_identical("dccm", out)
    got = _outputs(tmp_path / "two")
    assert [(r["epoch"], r["phase"]) for r in got["log"]] == [(r["epoch"], r["phase"]) for r in block_reference["log"]]
    assert np.isfinite(got["embeddings"]).all() and len(got["labels"]) == len(block_reference["labels"])


@pytest.mark.slow
def test_dccm_block_kill_in_the_middle_of_a_block_then_resume(tmp_path, small_npz, block_reference):
    """Killed after block 1's first pass (epoch 3's record written, not its checkpoint): the resume
    restarts in the middle of the block's repeats, from the block's restored prediction (no new one:
    epoch 3 records no discovery), and equals the uninterrupted run record by record."""
    out = tmp_path / "run"
    spec = {"layers": {"dccm-block": _block_layer(small_npz, out)}, "kill_epoch": DCCM_BLOCK_KILL}
    p = subprocess.run([sys.executable, WORKER, "kill", json.dumps(spec)], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    killed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in killed] == list(range(DCCM_BLOCK_KILL + 1))
    assert killed[-1]["phase"] == killed[-2]["phase"] == "epoch 0 block 1" and "discovery_seconds" not in killed[-1]
    resume_run(build_config({"out": str(out), "train": {"progress": False}}))
    got = _outputs(out)
    assert [r["epoch"] for r in got["log"]] == list(range(len(block_reference["log"])))
    for mine, theirs in zip(got["log"], block_reference["log"]):
        assert _same_record(mine, theirs), (mine, theirs)
    assert np.allclose(got["embeddings"], block_reference["embeddings"], atol=1e-6)
    assert np.array_equal(got["labels"], block_reference["labels"])
