"""Hostile inputs: every value is checked where it enters (seeds, labels, Clusterer parameters, the
types of a --config file), in one line and before any training; image files are read as a viewer
shows them, and every file not read is counted and named with its reason."""

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from PIL import Image
from sklearn.base import clone

import deepclust.api
from deepclust import Clusterer
from deepclust.data import load_images
from deepclust.data.sources import read_image
from deepclust.errors import ConfigError, DataError

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
    ({"no_such_option": 1}, "unknown option options.no_such_option"),
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
