"""Data sources, on small files the tests write in each format."""

import bz2
import gzip
import pickle
import struct
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from deepclust.data import load_images
from deepclust.data.torchvision_sets import FASHION_ENV, read_idx
from deepclust.errors import DataError


def test_digits():
    d = load_images("digits")
    assert d.images.shape == (1797, 8, 8) and d.images.dtype == np.uint8
    assert d.images.max() == 255 and d.images.min() == 0
    assert d.labels.dtype == np.int64 and set(np.unique(d.labels)) == set(range(10))
    assert d.split is None and d.channels == 1 and d.image_size == (8, 8)
    with pytest.raises(DataError, match="no train/test split"):
        load_images("digits", split="train")


def test_npz_single_multi_float_and_errors(tmp_path):
    a = tmp_path / "a.npz"
    b = tmp_path / "b.npz"
    np.savez(a, images=np.full((3, 4, 4), 7, np.uint8), labels=np.array([0, 1, 2]), split=np.array([0, 0, 1]))
    np.savez(b, images=np.full((2, 4, 4), 0.5, np.float32), labels=np.array([3, 4]), split=np.array([1, 1]))
    one = load_images(f"npz:{a}")
    assert len(one) == 3 and one.labels.tolist() == [0, 1, 2]
    both = load_images(f"npz:{a},{b}")
    assert len(both) == 5 and both.images[3, 0, 0] == 128  # floats in [0, 1] scaled to 0..255
    assert both.split.tolist() == [0, 0, 1, 1, 1]
    test = load_images(f"npz:{a},{b}", split="test")
    assert test.labels.tolist() == [2, 3, 4]
    assert len(load_images(str(a))) == 3  # a bare .npz path works too
    with pytest.raises(DataError, match="no such file"):
        load_images(f"npz:{tmp_path / 'missing.npz'}")
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="no 'images' array"):
        load_images(f"npz:{bad}")
    nan = tmp_path / "nan.npz"
    np.savez(nan, images=np.full((2, 2, 2), np.nan))
    with pytest.raises(DataError, match="NaN"):
        load_images(f"npz:{nan}")
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((2, 5, 5), np.uint8))
    with pytest.raises(DataError, match="disagree on image shape"):
        load_images(f"npz:{a},{other}")
    with pytest.raises(DataError, match="unknown dataset"):
        load_images("imagenet-42")


def test_shared_npz_files_when_present():
    path = SHARED_DATA / "usps.npz"
    if not path.exists():
        pytest.skip("shared data not present")
    u = load_images(f"npz:{path}")
    assert u.images.shape == (9298, 16, 16) and (u.split == 0).sum() == 7291


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_classes_mixed_modes_corrupt_and_resize(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "cats" / "a.png", np.full((6, 6), 10, np.uint8))
    _png(root / "cats" / "sub" / "b.png", np.full((6, 6, 3), 20, np.uint8))
    _png(root / "dogs" / "c.png", np.full((6, 6), 30, np.uint8))
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dogs" / "notes.txt").write_text("ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_images(f"folder:{root}")
    assert any("broken.png" in str(w.message) for w in caught)
    assert d.images.shape == (3, 6, 6, 3)  # one colour image makes all RGB
    assert d.classes == ["cats", "dogs"] and d.labels.tolist() == [0, 0, 1]
    assert d.names == ["cats/a.png", "cats/sub/b.png", "dogs/c.png"]
    _png(root / "dogs" / "big.png", np.zeros((9, 9), np.uint8))
    with pytest.raises(DataError, match="mixed sizes"):
        load_images(f"folder:{root}")
    resized = load_images(f"folder:{root}", resize=8)
    assert resized.images.shape == (4, 8, 8, 3)


def test_folder_flat_empty_and_missing(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "x.png", np.zeros((4, 4), np.uint8))
    d = load_images(str(flat))  # a bare directory path works too
    assert d.labels is None and d.images.shape == (1, 4, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_images(f"folder:{empty}")
    with pytest.raises(DataError, match="no such directory"):
        load_images(f"folder:{tmp_path / 'nope'}")


# -- torchvision formats -------------------------------------------------------------------------

def _idx(path, array, gz=False):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[np.uint8], array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if gz else open)(path, "wb").write(data)


def _write_mnist(raw, n_train=5, n_test=3, gz=False):
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    _idx(raw / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 28, 28)), gz)
    _idx(raw / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10, gz)
    _idx(raw / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    _idx(raw / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, gz)


def test_idx_reader_plain_and_gz(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "a-idx3-ubyte", arr)
    _idx(tmp_path / "b-idx3-ubyte.gz", arr, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), arr)


def test_mnist_and_fashion_mnist_from_raw_idx(tmp_path, monkeypatch):
    _write_mnist(tmp_path / "MNIST" / "raw")
    m = load_images("mnist", root=str(tmp_path))
    assert m.images.shape == (8, 28, 28) and m.split.tolist() == [0] * 5 + [1] * 3
    assert len(load_images("mnist", root=str(tmp_path), split="test")) == 3
    # Fashion-MNIST from a Debian-style directory of gzipped idx files
    deb = tmp_path / "debian"
    _write_mnist(deb, n_train=4, n_test=2, gz=True)
    monkeypatch.setenv(FASHION_ENV, str(deb))
    f = load_images("fashion-mnist", root=str(tmp_path / "nothing"))
    assert f.images.shape == (6, 28, 28) and f.labels.tolist() == [0, 1, 2, 3, 0, 1]


def test_missing_torchvision_set_says_download(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "absent"))
    for name in ("mnist", "fashion-mnist", "usps", "cifar10", "svhn"):
        with pytest.raises(DataError, match="pass --download"):
            load_images(name, root=str(tmp_path))


def test_usps_bz2_libsvm(tmp_path):
    def write(name, n):
        lines = []
        for i in range(n):
            vals = " ".join(f"{j + 1}:{(j % 3) - 1}" for j in range(256))
            lines.append(f"{i % 10 + 1} {vals}")
        (tmp_path / name).write_bytes(bz2.compress("\n".join(lines).encode() + b"\n"))

    write("usps.bz2", 4)
    write("usps.t.bz2", 2)
    u = load_images("usps", root=str(tmp_path))
    assert u.images.shape == (6, 16, 16) and u.labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert u.images[0, 0, :3].tolist() == [0, 127, 255]


def _skip_integrity(monkeypatch, *classes):
    """torchvision checks each file's md5 against the real dataset's; the tests' files are small
    stand-ins in the same format, so the check is switched off for them."""
    import importlib

    for cls in classes:
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
        module = importlib.import_module(cls.__module__)
        if hasattr(module, "check_integrity"):
            monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)


def test_cifar10_and_cifar100_coarse(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    _skip_integrity(monkeypatch, tvd.CIFAR10, tvd.CIFAR100)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        data = np.full((2, 3 * 32 * 32), i, np.uint8)
        pickle.dump({"data": data, "labels": [i % 10, (i + 1) % 10]}, open(c10 / name, "wb"))
    pickle.dump({"label_names": [str(i) for i in range(10)]}, open(c10 / "batches.meta", "wb"))
    c = load_images("cifar10", root=str(tmp_path))
    assert c.images.shape == (12, 32, 32, 3) and c.split.sum() == 2
    assert c.images[11, 0, 0].tolist() == [5, 5, 5]

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for name, n in (("train", 3), ("test", 2)):
        pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": list(range(n)),
                     "coarse_labels": [19 - i for i in range(n)]}, open(c100 / name, "wb"))
    pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, open(c100 / "meta", "wb"))
    fine = load_images("cifar100", root=str(tmp_path))
    coarse = load_images("cifar100-20", root=str(tmp_path))
    assert fine.labels.tolist() == [0, 1, 2, 0, 1]
    assert coarse.labels.tolist() == [19, 18, 17, 19, 18]


def test_svhn_mat_and_stl10_binary(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd

    _skip_integrity(monkeypatch, tvd.SVHN, tvd.STL10)
    for name, n in (("train_32x32.mat", 3), ("test_32x32.mat", 2)):
        x = np.zeros((32, 32, 3, n), np.uint8)
        x[0, 1, 2, :] = 200  # row 0, column 1, blue
        scipy.io.savemat(tmp_path / name, {"X": x, "y": np.array([[10], [1], [2]][:n])})
    s = load_images("svhn", root=str(tmp_path))
    assert s.images.shape == (5, 32, 32, 3) and s.labels.tolist() == [0, 1, 2, 0, 1]  # 10 means digit 0
    assert s.images[0, 0, 1, 2] == 200

    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    for part, n in (("train", 2), ("test", 1)):
        (stl / f"{part}_X.bin").write_bytes(np.zeros((n, 3, 96, 96), np.uint8).tobytes())
        (stl / f"{part}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
    (stl / "class_names.txt").write_text("\n".join(str(i) for i in range(10)))
    t = load_images("stl10", root=str(tmp_path))
    assert t.images.shape == (3, 96, 96, 3) and t.labels.tolist() == [0, 1, 0]


def test_debian_fashion_mnist_when_installed():
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    f = load_images("fashion-mnist", split="test")
    assert f.images.shape == (10000, 28, 28) and len(np.unique(f.labels)) == 10
