"""Damaged run files: every command that reads a run (report, predict, evaluate, export) refuses a
missing or damaged file in one line naming it, exit 2, never a traceback or a crash; the report's
map is finite and one point per embedding, or a sentence saying why there is none."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, assert_one_line_error, run_cli

K = 10


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, small_npz):
    """One finished run shared by every case (each case damages a copy)."""
    out = tmp_path_factory.mktemp("hostile-runfiles") / "run"
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--epochs", "1", "--backbone", "mlp", "--no-progress",
                   "--batch-size", "64", "--n-clusters", str(K), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(fitted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    return run


def _npy(name, change):
    def damage(run):
        np.save(run / name, change(np.load(run / name)))
    return damage


def _json(name, change):
    def damage(run):
        (run / name).write_text(json.dumps(change(json.loads((run / name).read_text()))))
    return damage


def _model(change):
    def damage(run):
        path = str(run / "model.safetensors")
        save_file(change({k: v.clone() for k, v in load_file(path).items()}), path)
    return damage


def _truncated(name):
    def damage(run):
        (run / name).write_bytes((run / name).read_bytes()[: (run / name).stat().st_size // 2])
    return damage


def _set(a, where, value):
    a = a.copy()
    a[where] = value
    return a


def _first_weight_narrower(state):
    key = next(k for k in state if k.endswith(".weight") and state[k].dim() == 2)
    return {**state, key: state[key][:, :-1].contiguous()}


def _first_tensor_nan(state):
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    return state


def _head_of_other_width(run):
    np.savez(run / "head.npz", kind=np.array("kmeans"), n_clusters=np.array(K),
             centroids=np.eye(K, 64, dtype=np.float32), labels=np.zeros(0, np.int64),
             reference=np.zeros((0, 0), np.float16), reference_labels=np.zeros(0, np.int64))


def _config_invalid(run):
    path = run / "config.yaml"
    path.write_text(re.sub(r"n_clusters: \d+", "n_clusters: -3", path.read_text()))


# name -> (the file it damages, how)
DAMAGE = {
    "config-invalid": ("config.yaml", _config_invalid),
    "metrics-corrupt": ("metrics.json", lambda r: (r / "metrics.json").write_text('{"method": "pad", "n_clu')),
    "metrics-wrong-type": ("metrics.json", _json("metrics.json", lambda m: {**m, "n_clusters": "ten"})),
    "embeddings-other-width": ("embeddings.npy", _npy("embeddings.npy", lambda e: np.zeros((len(e), 64), e.dtype))),
    "embeddings-nan": ("embeddings.npy", _npy("embeddings.npy", lambda e: _set(e, (5, 3), np.nan))),
    "embeddings-missing": ("embeddings.npy", lambda r: (r / "embeddings.npy").unlink()),
    "labels-out-of-range": ("labels.npy", _npy("labels.npy", lambda x: _set(x, 7, K))),  # clusters are 0..K-1
    "labels-wrong-length": ("labels.npy", _npy("labels.npy", lambda x: x[:200])),
    "labels-not-integers": ("labels.npy", _npy("labels.npy", lambda x: x.astype(np.float32) + 0.5)),
    "model-truncated": ("model.safetensors", _truncated("model.safetensors")),
    "model-other-network": ("model.safetensors", _model(_first_weight_narrower)),
    "model-nan": ("model.safetensors", _model(_first_tensor_nan)),
    "head-other-width": ("head.npz", _head_of_other_width),
}

# every command that reads a run, as arguments of (run, a scratch folder, the run's data)
COMMANDS = {
    "report": lambda r, t, data: ["report", "--run", r, "--out", t / "r.html", "--no-progress"],
    "predict": lambda r, t, data: ["predict", "--run", r, "--data", data, "--out", t / "p.npy"],
    "evaluate": lambda r, t, data: ["evaluate", "--run", r],
    "evaluate-knn": lambda r, t, data: ["evaluate", "--run", r, "--protocol", "knn"],
    "export": lambda r, t, data: ["export", "--run", r, "--out", t / "c.csv", "--weights", t / "w.safetensors"],
}
# the files each command reads: the run's outputs always, the network where it runs, the head where it assigns
OUTPUTS = ("config.yaml", "metrics.json", "embeddings.npy", "labels.npy")
READS = {"report": OUTPUTS, "evaluate-knn": OUTPUTS, "evaluate": (*OUTPUTS, "model.safetensors"),
         "export": (*OUTPUTS, "model.safetensors"), "predict": (*OUTPUTS, "model.safetensors", "head.npz")}
CASES = [(damage, command) for damage, (name, _) in DAMAGE.items() for command in COMMANDS if name in READS[command]]
# damage that reaches native code when nothing catches it (t-SNE of rows that are all one point) runs
# in a process of its own: a crash is then a failed test, not the end of the test run
ISOLATED = {("embeddings-other-width", "report")}


@pytest.mark.parametrize("damage, command", CASES, ids=[f"{d}-{c}" for d, c in CASES])
def test_a_damaged_file_is_one_line_naming_it(fitted, small_npz, tmp_path, damage, command):
    run = _copy(fitted, tmp_path)
    name, apply = DAMAGE[damage]
    apply(run)
    args = COMMANDS[command](run, tmp_path, f"npz:{small_npz}")
    proc = run_cli(*map(str, args), isolated=(damage, command) in ISOLATED)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])  # a user error: not a crash (-11, 139)
    assert_one_line_error(proc, name)


def test_report_of_embeddings_that_are_all_one_point_says_why_there_is_no_map(fitted, tmp_path):
    """A collapsed network (every embedding the same, here zero) is a finished run: its report is
    written, with a sentence where the map would be."""
    run = _copy(fitted, tmp_path)
    _npy("embeddings.npy", np.zeros_like)(run)
    out = tmp_path / "r.html"
    proc = run_cli("report", "--run", str(run), "--out", str(out), "--no-progress", isolated=True)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    page = out.read_text()
    assert "No map: all 300 embeddings are the same point." in page and 'id="galleries"' in page


MAP_INPUTS = """
import numpy as np
from deepclust.report import map_2d
rng = np.random.default_rng(0)
inputs = {"zeros": np.zeros((100, 8)), "ones": np.ones((100, 8)), "huge": rng.normal(size=(100, 2)) * 1e30,
          "tiny": rng.normal(size=(100, 8)) * 1e-30, "one-column": rng.normal(size=(100, 1))}
for name, x in inputs.items():
    xy, how = map_2d(x.astype(np.float32))
    print(name, "none" if xy is None else (xy.shape == (100, 2) and bool(np.isfinite(xy).all())), how, flush=True)
"""


def test_the_map_is_finite_and_one_point_per_embedding_or_says_why_not():
    """Rows that are all one point (zeros, ones) get no map and a reason; rows of any scale or
    width get finite coordinates, one per row. In a process of its own: t-SNE crashes its process
    when its start is not finite."""
    proc = subprocess.run([sys.executable, "-c", MAP_INPUTS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert results["zeros"] == results["ones"] == "none all 100 embeddings are the same point"
    for name in ("huge", "tiny", "one-column"):
        assert results[name].startswith("True "), (name, results[name])


def test_report_reads_past_log_lines_that_are_not_records(fitted, tmp_path):
    """JSON that is not an object, an epoch that is text, bytes that are not UTF-8 and an integer
    beyond float's range are left out of the curves; the records around them are drawn."""
    run = _copy(fitted, tmp_path)
    with open(run / "log.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n{"epoch": "one", "loss": 1e999}\n\xff\xfe not UTF-8\n'
                + f'{{"epoch": 5, "loss": 0.5, "count": {10 ** 400}}}\n'.encode())
    proc = run_cli("report", "--run", str(run), "--out", str(tmp_path / "r.html"), "--no-progress")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert '<section id="curves"><h2>Training curves</h2><img' in (tmp_path / "r.html").read_text()
