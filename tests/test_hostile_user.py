"""A hostile user's inputs and outputs, case by case (issue 41's numbered findings); each test here
failed on the code before them and passes after.

1. --overwrite deletes only a deepclust run, never a folder of the user's; a plain fit never writes
   into a folder that is not a run.                               (section: where outputs land)
2. The rebuild's and the backup's names never meet the user's (OUT.old, OUT.partial).     (same)
3. predict / export / report outputs never land on the run's own files or the input data.  (same)
4. --out refuses the root, the home directory and the data; no lock file beside --out.    (same)
5. Seeds and labels validated where they enter, before any training.      (section: values in)
6. A damaged run file is one line naming it, never a traceback or a segfault.  (section: run files)
7. Images read as a viewer shows them; every skipped file counted with its reason; identical
   images refused.                                                        (section: values in)
8. Clusterer.set_params / score, --config types, Pillow's bomb warning (values in); option values
   starting with '-' (where outputs land).
9. Two processes equal one on every CPU: tests/test_contract.py::test_two_processes_equal_one (the
   contract's own test, run for every method).
Where the user owns files, every one is checked to survive byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from sklearn.base import clone

import deepclust.api
from conftest import ROOT, assert_one_line_error, run_cli
from deepclust import Clusterer
from deepclust.data import load_images
from deepclust.data.sources import read_image
from deepclust.errors import ConfigError, DataError


# == where outputs land (cases 1-4, 8's option values) =======================================================

FAST_RUN = ["--backbone", "mlp", "--no-progress", "--batch-size", "64", "--n-clusters", "10"]


def _digest(root) -> dict:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fit(data, out, *extra):
    return run_cli("fit", "--data", f"npz:{data}", "--epochs", "1", "--out", str(out), "--seed", "1", *FAST_RUN, *extra)


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
                   *FAST_RUN, *flags)
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
    proc = run_cli("fit", "--data", "npz:/no/such/data.npz", "--out", "/", *FAST_RUN, *flags)
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
    proc = run_cli("fit", "--out", str(tmp_path / "r"), *FAST_RUN, flag, value)
    assert_one_line_error(proc, *fragments)
    assert "expected one argument" not in proc.stderr and not (tmp_path / "r").exists()


def test_negative_numbers_and_missing_values_are_unchanged(tmp_path):
    """Negative numbers already reached the validator; an option after a value flag is no value."""
    assert_one_line_error(run_cli("fit", "--out", str(tmp_path / "r"), "--seed", "-1", *FAST_RUN), "train.seed")
    assert_one_line_error(run_cli("fit", "--out", str(tmp_path / "r"), "--lr", "-0.1", *FAST_RUN), "optim.lr")
    assert_one_line_error(run_cli("fit", "--out", "--overwrite", *FAST_RUN), "--out: expected one argument")
    assert not (tmp_path / "r").exists()


# == values in (cases 5, 7, 8) ===============================================================================

FAST = ["--epochs", "1", "--backbone", "mlp", "--no-progress"]


def _refused_before_training(proc, out: Path, *fragments: str) -> None:
    """One error line holding every fragment, exit 2, and no run directory: nothing was trained."""
    assert_one_line_error(proc, "deepclust: error:", *fragments)
    assert proc.returncode == 2 and not out.exists()


def _digits(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images[:n] * 255 / 16).astype(np.uint8), d.target[:n].astype(np.int64)


def _png(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def _folder(root: Path, n: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        _png(root / ("a" if i % 2 else "b") / f"{i:02d}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    return root


def _bomb_png(path: Path, width: int = 10_000, height: int = 10_000) -> None:
    """A valid 1-bit PNG of width x height black pixels (about 12 kB on disk; 10000 x 10000 is above
    Pillow's decompression-bomb limit of 89,478,485 pixels but below twice it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = (b"\x00" + bytes((width + 7) // 8)) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
                     + chunk(b"IEND", b""))


# -- seeds and labels ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["2147483648", "99999999999999999999"], ids=["above-int32", "above-int64"])
def test_a_seed_out_of_range_is_refused_by_the_validator(tmp_path, small_npz, seed):
    """On the old code: faiss's seed setter's OverflowError and torch.manual_seed's ValueError, after training."""
    out = tmp_path / "run"
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--seed", seed, "--out", str(out), *FAST)
    _refused_before_training(proc, out, "train.seed", "<= 2147483647", seed)
    with pytest.raises(ConfigError, match="train.seed"):
        Clusterer(seed=int(seed))


def test_a_derived_k_means_seed_beyond_int32_is_reduced_for_faiss():
    """DeepCluster and PCP seed k-means with seed * 1000 + epoch, beyond faiss's 32-bit range for a seed
    above 2,147,483 (an OverflowError on the old code); reduced modulo 2**31, it clusters as that seed."""
    from deepclust.structure.clustering import kmeans

    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    big = (2**31 - 1) * 1000 + 3
    assert np.array_equal(kmeans(x, 3, seed=big)[0], kmeans(x, 3, seed=big % 2**31)[0])


def test_negative_npz_labels_are_refused_naming_the_file(tmp_path):
    images, y = _digits()
    data, out = tmp_path / "bad.npz", tmp_path / "run"
    np.savez(data, images=images, labels=y - 1)
    proc = run_cli("fit", "--data", f"npz:{data}", "--n-clusters", "3", "--out", str(out), *FAST)
    _refused_before_training(proc, out, f"npz file {data}: labels must be non-negative, found -1")


def test_npz_labels_beyond_their_classes_are_refused(tmp_path):
    images, y = _digits()
    data, out = tmp_path / "bad.npz", tmp_path / "run"
    np.savez(data, images=images, labels=y, classes=np.array(["zero", "one"]))
    proc = run_cli("fit", "--data", f"npz:{data}", "--n-clusters", "3", "--out", str(out), *FAST)
    _refused_before_training(proc, out, f"npz file {data}", "must index its 2 'classes', found 9")


def test_negative_labels_given_to_fit_are_refused_before_training(monkeypatch):
    images, y = _digits()

    def trained(*args, **kwargs):
        raise AssertionError("fit_run was called")

    monkeypatch.setattr(deepclust.api, "fit_run", trained)
    est = Clusterer(method="instance", n_clusters=3, epochs=1, backbone="mlp", progress=False)
    with pytest.raises(DataError, match="y: labels must be non-negative, found -1"):
        est.fit(images, y - 1)


def test_labels_near_1e12_are_renumbered_where_they_enter(tmp_path):
    images, y = _digits(120)
    data, out = tmp_path / "huge.npz", tmp_path / "run"
    np.savez(data, images=images, labels=y * 10**11 + 7)
    d = load_images(f"npz:{data}")
    assert d.labels.tolist() == y.tolist()  # 0..9 in the order of the values
    assert d.classes == [str(c * 10**11 + 7) for c in range(10)]  # the values kept as class names
    proc = run_cli("fit", "--data", f"npz:{data}", "--n-clusters", "3", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert 0 <= json.loads((out / "metrics.json").read_text())["knn_top1"] <= 1


# -- image files -----------------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    picture = np.zeros((16, 32, 3), np.uint8)
    picture[:, :16] = 255  # as stored: landscape, left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: a phone held upright; a viewer turns it 90 degrees clockwise
    _png(tmp_path / "imgs" / "phone.jpg", picture, exif=exif.tobytes(), quality=95)
    seen = read_image(tmp_path / "imgs" / "phone.jpg")
    assert seen.shape == (32, 16, 3)  # portrait, as the user sees it
    assert seen[:14].mean() > 240 and seen[18:].mean() < 15  # the white half is now on top
    assert load_images(f"folder:{tmp_path / 'imgs'}").images.shape == (1, 32, 16, 3)


def test_hidden_files_are_counted_and_named_with_their_reason(tmp_path):
    data, out = _folder(tmp_path / "imgs"), tmp_path / "run"
    _png(data / "a" / ".hidden.png", np.zeros((8, 8), np.uint8))
    _png(data / ".ipynb_checkpoints" / "copy.png", np.zeros((8, 8), np.uint8))
    skipped = [".ipynb_checkpoints/copy.png (hidden folder)", "a/.hidden.png (hidden file)"]
    assert load_images(f"folder:{data}").skipped == skipped
    proc = run_cli("fit", "--data", f"folder:{data}", "--n-clusters", "2", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "skipped" in line]
    assert lines == [f"deepclust: warning: skipped 2 image file(s) under {data}: {', '.join(skipped)}"]
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == {"count": 2, "first": skipped}


def test_an_image_above_pillows_limit_is_skipped_with_our_own_line(tmp_path, capsys):
    data = _folder(tmp_path / "imgs")
    _bomb_png(data / "a" / "big.png")
    _bomb_png(data / "b" / "huge.png", 14_000, 14_000)  # above twice the limit: Pillow raises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_images(f"folder:{data}")
        with pytest.raises(DataError, match=r"big.png: too large, 10000 x 10000 pixels$"):
            Clusterer().fit([data / "a" / "01.png", data / "a" / "big.png"])
    assert [str(w.message) for w in caught] == []  # no DecompressionBombWarning, nor any other
    skipped = ["a/big.png (too large, 10000 x 10000 pixels)",
               f"b/huge.png (too large, over {2 * Image.MAX_IMAGE_PIXELS} pixels)"]
    assert d.skipped == skipped and len(d) == 20
    assert capsys.readouterr().err.splitlines() == [
        f"deepclust: warning: skipped 2 image file(s) under {data}: {', '.join(skipped)}"]


@pytest.mark.parametrize("k", [[], ["--n-clusters", "3"]], ids=["auto", "given"])
def test_a_folder_of_identical_images_is_refused_not_split(tmp_path, k):
    data, out = tmp_path / "imgs", tmp_path / "run"
    same = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    for i in range(30):
        _png(data / f"{i:02d}.png", same)
    proc = run_cli("fit", "--data", f"folder:{data}", *k, "--out", str(out), *FAST)
    _refused_before_training(proc, out, "all 30 images are identical: nothing to cluster")


# -- Clusterer parameters and --config types ---------------------------------------------------------

@pytest.mark.parametrize("bad, fragment", [
    ({"epochs": -5}, "train.epochs: must be >= 0, got -5"),
    ({"settings": {"options.no_such_option": 1}}, "unknown option options.no_such_option"),
    ({"seed": 2**31}, "train.seed"),
], ids=["epochs", "unknown-name", "seed"])
def test_set_params_is_as_strict_as_fit(bad, fragment):
    est = Clusterer(method="instance", n_clusters=3, epochs=2)
    before = est.get_params()
    with pytest.raises(ConfigError, match=fragment):
        est.set_params(**bad)
    assert est.get_params() == before  # nothing changed
    with pytest.raises(ConfigError, match=fragment):
        Clusterer(method="instance", **bad)  # so no clone of an invalid estimator can exist either
    assert clone(est).get_params() == before


def test_score_with_labels_of_the_wrong_length_names_both_lengths():
    images, y = _digits(60)
    est = Clusterer(method="instance", n_clusters=2, epochs=1, backbone="mlp", progress=False).fit(images)
    with pytest.raises(ValueError, match="y has 10 labels for 60 images"):
        est.score(images, y[:10])


@pytest.mark.parametrize("yaml_text, flags, fragment", [
    ("train: 5\n", ["--epochs", "1"], "train: expected a mapping, got 5"),
    ("train:\n  epochs: five\n", ["--epochs", "1"], "train.epochs: expected an integer, got 'five'"),
    ("optim: [0.1]\n", ["--lr", "0.1", "--epochs", "1"], "optim: expected a mapping, got [0.1]"),
], ids=["section-not-a-mapping", "value-of-the-wrong-type", "section-a-list"])
def test_config_values_of_the_wrong_type_are_refused_even_when_flags_set_the_section(
        tmp_path, small_npz, yaml_text, flags, fragment):
    config, out = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text(yaml_text)
    proc = run_cli("fit", "--config", str(config), "--data", f"npz:{small_npz}", *flags, "--out", str(out),
                   "--backbone", "mlp", "--no-progress")
    _refused_before_training(proc, out, fragment)


# == run files (case 6) ======================================================================================

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
