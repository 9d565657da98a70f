"""Outputs that would land on what the user owns or on what they are made from (issue 41):
``--overwrite`` replaces only a deepclust run, the rebuild's and the backup's names never meet the
user's, no lock file is left beside ``--out``, ``--out`` refuses the root, the home directory and the
data, every output of predict / export / report is checked against the run's own files and the input
data, and option values starting with '-' reach the validator. Where the user owns files, every one
of them is checked to survive byte for byte."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli

FAST = ["--backbone", "mlp", "--no-progress", "--batch-size", "64", "--n-clusters", "10"]


def _digest(root) -> dict:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fit(data, out, *extra):
    return run_cli("fit", "--data", f"npz:{data}", "--epochs", "1", "--out", str(out), "--seed", "1", *FAST, *extra)


def _user_files(root, names=("thesis.txt",)):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"the user's {name}\n")
    return root


def _image_folder(root, n=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def shared(tmp_path_factory, small_npz):
    """(run, data): one finished run on its own copy of the digits (commands that fail to refuse must
    not damage the session's data)."""
    base = tmp_path_factory.mktemp("shared")
    data = base / "data.npz"
    shutil.copyfile(small_npz, data)
    proc = _fit(data, base / "run")
    assert proc.returncode == 0, proc.stderr
    return base / "run", data


def _copy_run(shared, dest):
    shutil.copytree(shared[0], dest, symlinks=True)
    return dest


# -- 1. --overwrite replaces only a run; a plain fit does not mix a run into a user's folder --------

@pytest.mark.parametrize("flags, fragments", [
    (["--overwrite"], ["--overwrite replaces only a deepclust run", "'thesis.txt'", "did not write"]),
    ([], ["is not a deepclust run", "'thesis.txt'"]),
])
def test_a_folder_that_is_not_a_run_is_never_written(tmp_path, small_npz, flags, fragments):
    ub = _user_files(tmp_path / "ub")
    before = _digest(tmp_path)
    assert_one_line_error(_fit(small_npz, ub, *flags), str(ub), *fragments)
    assert _digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["ub"]


@pytest.mark.parametrize("added", ["notes.txt", "checkpoints/best.pt"])
def test_overwrite_refuses_a_run_holding_a_users_file(tmp_path, shared, added):
    run = _user_files(_copy_run(shared, tmp_path / "run"), (added,))
    before = _digest(tmp_path)
    assert_one_line_error(_fit(shared[1], run, "--overwrite"), f"'{added}'", "did not write")
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("out, flags", [("uf", ["--overwrite"]), ("uf", []), ("uf/run", []),
                                        (".", ["--overwrite"]), (".", [])])
def test_out_refuses_the_data_folder(tmp_path, out, flags):
    uf = _image_folder(tmp_path / "uf")
    before = _digest(tmp_path)
    target = tmp_path / out
    proc = run_cli("fit", "--data", f"folder:{uf}", "--epochs", "1", "--out", str(target), "--views", "digits",
                   *FAST, *flags)
    assert_one_line_error(proc, "data folder", str(uf))
    assert _digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["uf"]


@pytest.mark.parametrize("flags", [["--overwrite"], []])
def test_out_refuses_the_home_directory(tmp_path, small_npz, monkeypatch, flags):
    home = _user_files(tmp_path / "home", ("thesis.txt", "photos/a.txt"))
    monkeypatch.setenv("HOME", str(home))
    before = _digest(tmp_path)
    assert_one_line_error(_fit(small_npz, "~", *flags), "home directory", str(home))
    assert _digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["home"]


# -- 2. the rebuild's and the backup's names never meet the user's ------------------------------------

@pytest.mark.parametrize("existing", [False, True])
def test_overwrite_leaves_every_name_beside_out_alone(tmp_path, shared, existing):
    siblings = ["run.old", "run.partial", ".run.partial-mine", ".run.old-mine"]
    for name in siblings:
        _user_files(tmp_path / name, ("keep.txt",))
    marked = _user_files(_copy_run(shared, tmp_path / ".run.partial-0000beef"), ("keep.txt",))  # not all its
    dead = _copy_run(shared, tmp_path / ".run.partial-0000dead")  # a killed rebuild: the tool's own
    if existing:
        _copy_run(shared, tmp_path / "run")
    before = {name: _digest(tmp_path / name) for name in (*siblings, marked.name)}
    proc = _fit(shared[1], tmp_path / "run", "--overwrite", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    assert {name: _digest(tmp_path / name) for name in before} == before
    assert not dead.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "run"])
    assert "seed: 7" in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / ".deepclust-run").is_file() and (tmp_path / "run" / "metrics.json").is_file()


# -- 3. no output lands on the run's own files or on the input data -----------------------------------

def _refusals(run, data, folder, link):
    return [
        (["export", "--run", run, "--weights", run / "model.safetensors"], ["--weights", "model.safetensors"]),
        (["export", "--run", run, "--out", run / "config.yaml"], ["--out", "config.yaml"]),
        (["export", "--run", run, "--out", run / "checkpoints" / "last.pt"], ["checkpoints"]),
        (["export", "--run", run, "--out", data], ["input data file", str(data)]),
        (["predict", "--run", run, "--data", f"npz:{data}", "--out", run / "labels.npy"], ["labels.npy"]),
        (["predict", "--run", link, "--data", f"npz:{data}", "--out", link / "embeddings.npy"], ["embeddings.npy"]),
        (["predict", "--run", run, "--data", f"folder:{folder}", "--out", folder / "p.csv"],
         ["input data folder", str(folder)]),
        (["report", "--run", run, "--out", run / "metrics.json", "--no-progress"], ["metrics.json"]),
    ]


def _own_run(shared, tmp_path):
    """A copy of the shared run and of its data, the copy's config.yaml naming the copied data."""
    run, data = _copy_run(shared, tmp_path / "run"), tmp_path / "data.npz"
    shutil.copyfile(shared[1], data)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(shared[1]), str(data)))
    return run, data


@pytest.mark.parametrize("case", range(8))
def test_outputs_never_land_on_the_run_or_its_data(tmp_path, shared, case):
    run, data = _own_run(shared, tmp_path)
    folder = _image_folder(tmp_path / "imgs", n=10)
    (tmp_path / "link").symlink_to(run)
    args, fragments = _refusals(run, data, folder, tmp_path / "link")[case]
    before = [_digest(run), _digest(folder), hashlib.sha256(data.read_bytes()).hexdigest()]
    assert_one_line_error(run_cli(*map(str, args)), str(args[-1] if args[-1] != "--no-progress" else args[-2]),
                          *fragments)
    assert [_digest(run), _digest(folder), hashlib.sha256(data.read_bytes()).hexdigest()] == before


def test_the_library_writers_check_their_output(tmp_path, shared):
    from deepclust import export, report
    from deepclust.errors import DataError

    run = _copy_run(shared, tmp_path / "run")
    before = _digest(run)
    with pytest.raises(DataError, match="model.safetensors"):
        export.export_weights(run, run / "model.safetensors")
    with pytest.raises(DataError, match="head.npz"):
        export.export_table(run, "csv", run / "head.npz")
    with pytest.raises(DataError, match="log.jsonl"):
        report.write_report(run, run / "log.jsonl", progress=False)
    assert _digest(run) == before
    assert export.export_table(run) == run / "clusters.csv"  # the tool's own outputs may go in the run


# -- 4. --out is never the root, and no lock file is left beside it -----------------------------------

@pytest.mark.parametrize("flags", [["--overwrite"], []])
def test_out_refuses_the_root(flags):
    before = sorted(os.listdir("/"))
    # data that does not exist: a regression would stop at the data, never write into /
    proc = run_cli("fit", "--data", "npz:/no/such/data.npz", "--out", "/", *FAST, *flags)
    assert_one_line_error(proc, "--out / is the root of the file system")
    assert sorted(os.listdir("/")) == before


def test_no_lock_file_is_left_beside_out(tmp_path, small_npz, monkeypatch):
    locks = tmp_path / "locks"
    monkeypatch.setenv("DEEPCLUST_LOCK_DIR", str(locks))
    user = _user_files(tmp_path / "user", ("a-file",))
    assert _fit(small_npz, user / "run").returncode == 0
    assert_one_line_error(_fit(small_npz, user / "run"), "already holds a run")
    assert_one_line_error(_fit(small_npz, user / "a-file"), "is not a directory")
    assert sorted(os.listdir(user)) == ["a-file", "run"]
    assert len(list((locks / "deepclust-locks").glob("*.lock"))) == 1  # the run's, in the lock directory


# -- 8 (command line): a value starting with '-' reaches the validator -------------------------------

@pytest.mark.parametrize("flag, value, fragments", [
    ("--budget", "-5m", ["train.budget", "must be positive", "'-5m'"]),
    ("--bud", "-5m", ["train.budget", "'-5m'"]),  # an abbreviation, as argparse allows
    ("--set", "-x", ["--set expects KEY=VALUE", "'-x'"]),
])
def test_a_value_starting_with_a_dash_reaches_the_validator(tmp_path, flag, value, fragments):
    proc = run_cli("fit", "--out", str(tmp_path / "r"), *FAST, flag, value)
    assert_one_line_error(proc, *fragments)
    assert "expected one argument" not in proc.stderr and not (tmp_path / "r").exists()


def test_negative_numbers_and_missing_values_are_unchanged(tmp_path):
    """Negative numbers already reached the validator; an option after a value flag is no value."""
    assert_one_line_error(run_cli("fit", "--out", str(tmp_path / "r"), "--seed", "-1", *FAST), "train.seed")
    assert_one_line_error(run_cli("fit", "--out", str(tmp_path / "r"), "--lr", "-0.1", *FAST), "optim.lr")
    assert_one_line_error(run_cli("fit", "--out", "--overwrite", *FAST), "--out: expected one argument")
    assert not (tmp_path / "r").exists()
