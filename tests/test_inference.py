"""inference.py's ``recut``: a finished run's clusters at another K, cut from the tree it kept
(``hierarchy.npz``), through ``deepclust recut``; and the tree checked on reading (runfiles.py)."""

import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from deepclust import inference
from deepclust.runfiles import RunFiles

# instance discrimination never reads K while it trains, so two runs of one seed differing only in K
# train the same network (a CPU run repeats for a seed) and differ only in the head's fit
FAST = ["--method", "instance", "--epochs", "2", "--backbone", "mlp", "--no-progress", "--batch-size", "64",
        "--seed", "1", "--cluster-head", "ward", "--cluster-features", "embedding"]
K, K2 = 6, 3


def nested(fine: np.ndarray, coarse: np.ndarray) -> bool:
    return all(len(np.unique(coarse[fine == c])) == 1 for c in np.unique(fine))


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return nested(a, b) and nested(b, a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_npz):
    out = {}
    for k in (K, K2):
        path = tmp_path_factory.mktemp("recut") / f"run{k}"
        proc = run_cli("fit", "--data", f"npz:{small_npz}", "--n-clusters", str(k), "--out", str(path), *FAST)
        assert proc.returncode == 0, proc.stderr
        out[k] = path
    return out


def recut(run, k, out):
    proc = run_cli("recut", "--run", str(run), "--n-clusters", str(k), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return np.load(out), json.loads(proc.stdout)


def test_recut_at_k_and_k2_equals_the_fits_at_k_and_k2(runs, tmp_path):
    """The ward head's fits at two K are nested (cuts of one tree of the same leaves), so a run fitted
    at K, re-cut at K2, is the run fitted at K2, and the other way round; at its own K a re-cut is
    the run's labels exactly."""
    fit_k, fit_k2 = (np.load(runs[k] / "labels.npy") for k in (K, K2))
    assert np.array_equal(np.load(runs[K] / "embeddings.npy"), np.load(runs[K2] / "embeddings.npy"))
    assert nested(fit_k, fit_k2)  # the nesting property itself: the fit at 6 refines the fit at 3
    same, summary = recut(runs[K], K, tmp_path / "same.npy")
    assert np.array_equal(same, fit_k) and summary["run_n_clusters"] == K
    coarser, summary = recut(runs[K], K2, tmp_path / "coarser.npy")
    assert same_partition(coarser, fit_k2) and summary["n_clusters"] == K2
    assert summary["cluster_sizes"] == np.bincount(coarser).tolist()
    assert sorted(c for held in summary["run_clusters"].values() for c in held) == list(range(K))
    finer, _ = recut(runs[K2], K, tmp_path / "finer.npy")
    assert same_partition(finer, fit_k)


def test_recut_of_any_head_nests_around_the_runs_clusters(runs, tmp_path, small_npz):
    run = tmp_path / "spectral"
    args = [a if a != "ward" else "spectral" for a in FAST]
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--n-clusters", "5", "--out", str(run), *args)
    assert proc.returncode == 0, proc.stderr
    labels = np.load(run / "labels.npy")
    assert np.array_equal(inference.recut_run(run, 5)[0], labels)
    coarse, fine = inference.recut_run(run, 2)[0], inference.recut_run(run, 11)[0]
    assert nested(labels, coarse) and nested(fine, labels)
    table = tmp_path / "fine.csv"
    proc = run_cli("recut", "--run", str(run), "--n-clusters", "11", "--out", str(table))
    assert proc.returncode == 0, proc.stderr
    rows = table.read_text().splitlines()
    assert rows[0] == "index,cluster" and len(rows) == len(labels) + 1
    assert [int(r.split(",")[1]) for r in rows[1:]] == fine.tolist()


def test_bad_input_is_one_line(runs, tmp_path):
    run = runs[K]
    leaves = len(RunFiles(run).hierarchy().groups)
    out = str(tmp_path / "r.npy")
    assert_one_line_error(run_cli("recut", "--run", str(run), "--n-clusters", "0", "--out", out), f"1 to {leaves}")
    assert_one_line_error(run_cli("recut", "--run", str(run), "--n-clusters", str(leaves + 1), "--out", out))
    assert_one_line_error(run_cli("recut", "--run", str(run), "--n-clusters", "three", "--out", out), "whole number")
    assert_one_line_error(run_cli("recut", "--run", str(run), "--n-clusters", "2", "--out", str(run / "labels.npy")),
                          "labels.npy")
    assert_one_line_error(run_cli("recut", "--run", str(run), "--n-clusters", "2", "--out", str(tmp_path / "r.txt")),
                          ".csv or .npy")
    assert_one_line_error(run_cli("recut", "--run", str(tmp_path / "nope"), "--n-clusters", "2", "--out", out),
                          "no such run")
    assert not (tmp_path / "r.npy").exists()


def damage(run, tmp_path, name, **change):
    copy = tmp_path / name
    shutil.copytree(run, copy)
    with np.load(run / "hierarchy.npz") as z:
        arrays = {key: z[key] for key in z.files}
    arrays.update(change)
    np.savez(copy / "hierarchy.npz", **arrays)
    return copy


def test_a_damaged_or_missing_tree_is_one_line(runs, tmp_path):
    run = runs[K]
    with np.load(run / "hierarchy.npz") as z:
        leaves, linkage, groups = z["leaves"], z["linkage"], z["groups"]
    swapped = linkage.copy()
    swapped[[0, -1]] = swapped[[-1, 0]]  # a merge made before its children exist
    moved = groups.copy()
    moved[groups == 0] = 1  # leaves no longer parts of the run's clusters
    from scipy.cluster.hierarchy import linkage as scipy_linkage

    foreign = scipy_linkage(np.random.default_rng(0).random((len(groups), 2)), "single")  # blind to the clusters
    cases = {"short": ({"leaves": leaves[:-1]}, "leaves must be"),
             "linkage": ({"linkage": linkage[:-1]}, "linkage must be"),
             "order": ({"linkage": swapped}, "not a merge tree"),
             "groups": ({"groups": moved}, "not parts of the clusters"),
             "foreign": ({"linkage": foreign}, "is not the partition of labels.npy"),
             "nan": ({"linkage": np.where(linkage == linkage.max(), np.nan, linkage)}, "finite")}
    for name, (change, fragment) in cases.items():
        copy = damage(run, tmp_path, name, **change)
        proc = run_cli("recut", "--run", str(copy), "--n-clusters", "2", "--out", str(tmp_path / f"{name}.npy"))
        assert_one_line_error(proc, "hierarchy.npz", fragment)
    garbage = damage(run, tmp_path, "garbage")
    (garbage / "hierarchy.npz").write_bytes(b"not a zip")
    assert_one_line_error(run_cli("recut", "--run", str(garbage), "--n-clusters", "2", "--out", str(tmp_path / "g.npy")),
                          "hierarchy.npz", "cannot be read")
    (garbage / "hierarchy.npz").unlink()
    assert_one_line_error(run_cli("recut", "--run", str(garbage), "--n-clusters", "2", "--out", str(tmp_path / "g.npy")),
                          "no hierarchy.npz")
