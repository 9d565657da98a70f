import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args: str, cwd=None, timeout: int = 300, env=None, isolated: bool = False) -> subprocess.CompletedProcess:
    """Run `deepclust ...` and return its exit code, stdout and stderr. In this process (the same
    ``main`` a user's command calls, with stdout / stderr captured and the environment restored)
    unless ``isolated`` (or a ``cwd`` / ``env`` is given): then in a fresh `python -m deepclust`."""
    if not (isolated or cwd or env):
        return _run_in_process(list(args))
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "deepclust", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=e)


def assert_one_line_error(proc, *fragments):
    """A failed command that printed exactly one stderr line (no traceback) holding every fragment."""
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from deepclust.cli import main

    out, err, saved = io.StringIO(), io.StringIO(), dict(os.environ)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["deepclust", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    """300 of scikit-learn's 8x8 digits, with labels and a train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.target))[:300]
    images = np.round(d.images[idx] * 255 / 16).astype(np.uint8)
    split = (np.arange(300) >= 240).astype(np.int8)
    path = tmp_path_factory.mktemp("data") / "digits300.npz"
    np.savez(path, images=images, labels=d.target[idx].astype(np.int64), split=split)
    return path


# The smallest configuration of every registered method that still reaches the paths where its
# structure matters: at least two discoveries before the kill epoch, and a resume that lands in the
# middle of a round with a structure, a vote history or a trained classifier to restore (a method
# added to deepclust.methods.METHODS must add a line here and in KILL_EPOCH; a test checks it).
# Shared by the contract tests run for every method (DDP equality, kill + resume, shuffled labels).
METHOD_SMOKE: dict[str, dict] = {
    # the per-step "inv" rate: its step count must survive the kill too
    "instance": {"train": {"epochs": 2}, "optim": {"schedule": "inv", "inv_gamma": 0.05}},
    # round 0 = epoch 0; rounds 1 and 2 discover at epochs 1 and 3; the kill lands in round 2's second epoch
    "and": {"train": {"epochs": 2}, "options": {"rounds": 2, "round0_epochs": 1}},
    # N_t = 300, 95, 30, 10, 10: clusters from epoch 1, history collected from epoch 1, the vote fires
    # at epochs 3 and 4 (after the resume)
    "pcp": {"train": {"epochs": 5}, "options": {"history": 2, "vote_from": 0.2}},
    # re-clustered at epochs 0 and 2; the resumed epoch 3 trains the classifier of epoch 2's clusters
    "deepcluster": {"train": {"epochs": 4}, "options": {"clusters": 20, "reassign": 2}},
    "pad": {"train": {"epochs": 4}},  # SCS discovery at epochs 1, 2 and 3 (epoch 0: instance + HPE)
    # the paper's net and optimiser; its diagnostics pass (a discovery) at every epoch start
    "dccm": {"train": {"epochs": 3}, "net": {"backbone": "dccm_cnn"},
             "optim": {"optimizer": "rmsprop", "lr": 0.001, "weight_decay": 0},
             "options": {"discriminator_width": 32}},
    # 2 epochs a period, the paper's optimiser (inv per step); 64 initial clusters of the 300 digits,
    # eta 0.7: 64 -> 19 -> 10 at epochs 2 and 4, so the run ends after 6 epochs (4 periods planned)
    "jule": {"train": {"epochs": 2}, "options": {"eta": 0.7},
             "optim": {"lr": 0.01, "nesterov": False, "weight_decay": 5e-5, "schedule": "inv"}},
}
# The epoch whose checkpoint a SIGKILL prevents (after its log record): the resume restarts there.
KILL_EPOCH: dict[str, int] = {"instance": 1, "and": 4, "pcp": 3, "deepcluster": 3, "pad": 3, "dccm": 2,
                             "jule": 3}  # jule: the second epoch of period 1; the resume discovers at 4


# The learned clustering phase after a method (``cluster.head: scan``, methods/scan.py): contract
# cases of their own, named METHOD+PHASE. Instance discrimination for 2 epochs, then 2 SCAN epochs
# (neighbours mined at epoch 2) and 2 self-labelling epochs (the head chosen at epoch 4); a low
# confidence threshold so that self-labelling has targets on a 2-epoch network. The kill lands in
# the second SCAN epoch: the resume restores the neighbours and the phase's Adam state, then chooses
# the head itself.
PHASE_SMOKE: dict[str, dict] = {
    "instance+scan": {**METHOD_SMOKE["instance"], "cluster": {"head": "scan"},
                      "scan": {"epochs": 2, "self_label_epochs": 2, "confidence": 0.3, "heads": 3}},
    # DEC (methods/dec.py) after 2 instance epochs: 4 DEC epochs, its target updated at epochs 2 and 4
    # (the first with the k-means centres); tol 0, so its length is fixed. The kill lands in the second
    # epoch of the second update interval: the resume restores the target, the centres and SGD's momentum.
    "instance+dec": {**METHOD_SMOKE["instance"], "cluster": {"head": "dec"},
                     "dec": {"epochs": 4, "update_interval": 2, "tol": 0}},
}
KILL_EPOCH["instance+scan"] = 3
KILL_EPOCH["instance+dec"] = 5


def fake_calibration(rates, calls: list | None = None) -> type:
    """A stand-in for ``budget.TrainerCalibration`` that trains nothing: ``rates`` images per second
    (one figure, or one per backbone), discoveries and what follows training free; every backbone
    measured is appended to ``calls``."""
    class FakeCalibration:
        def __init__(self, cfg, images, view_spec, **kw):
            assert view_spec is not None and len(images) > 0

        def measure(self, backbone, need=None):
            if calls is not None:
                calls.append(backbone)
            return float(rates[backbone] if isinstance(rates, dict) else rates)

        def discovery(self, backbone):
            return {"discovery_seconds": 0.0}

        def finish(self, backbone):
            return 0.0

        def stages(self, backbone):
            return 0.0

        def close(self):
            pass

    return FakeCalibration


def smoke_layer(method: str, data: str, out, **extra) -> dict:
    """A full configuration layer for a quick run of ``method`` (or of a ``PHASE_SMOKE`` case) on
    ``data`` (CPU, no progress bar)."""
    from deepclust.config import merge_layers

    case = METHOD_SMOKE[method] if method in METHOD_SMOKE else PHASE_SMOKE[method]
    layer = {"method": method.split("+")[0], "out": str(out), "data": {"spec": data}, "cluster": {"n_clusters": 10},  # the digits' K
             "optim": {"batch_size": 64},
             # one thread, as the subprocesses of the contract tests (OMP_NUM_THREADS=1): runs compared
             # bit for bit must reduce their floats in the same order
             "train": {"seed": 3, "progress": False, "accelerator": "cpu", "threads": 1}}
    return merge_layers(layer, case, extra)
