"""Data sources: digits, npz, folders, and the torchvision sets read from small files the tests write
in each dataset's real on-disk format (no network)."""

from __future__ import annotations

import bz2
import gzip
import io
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from deepclust.data import DATASET_NAMES, ImageSet, load_images
from deepclust.data import torchvision_sets
from deepclust.data.torchvision_sets import FASHION_ENV, read_idx
from deepclust.errors import DataError


@pytest.fixture(autouse=True)
def _no_debian_fashion_mnist(monkeypatch, tmp_path):
    """Tests see Debian's fashion-mnist files only where they ask for them."""
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "no-debian-fashion-mnist"))


# -- digits ---------------------------------------------------------------------------------------

def test_digits():
    d = load_images("digits")
    assert d.images.shape == (1797, 8, 8) and d.images.dtype == np.uint8 and d.images.flags.c_contiguous
    assert d.images.min() == 0 and d.images.max() == 255
    assert d.labels.dtype == np.int64 and d.labels.shape == (1797,) and set(d.labels.tolist()) == set(range(10))
    assert d.split is None and d.names is None and d.classes == [str(i) for i in range(10)]
    assert d.channels == 1 and d.image_size == (8, 8) and len(d) == 1797 and d.spec == "digits"
    from sklearn.datasets import load_digits

    assert np.array_equal(d.images, np.round(load_digits().images * 255 / 16).astype(np.uint8))
    assert load_images("DIGITS").images.shape == (1797, 8, 8)  # names are case-insensitive
    assert load_images("digits", resize=12).images.shape == (1797, 12, 12)
    with pytest.raises(DataError, match="has no train/test split; use split=all"):
        load_images("digits", split="train")


# -- npz ------------------------------------------------------------------------------------------

def test_npz_single_multi_float_and_splits(tmp_path, capsys):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    np.savez(a, images=np.full((3, 4, 4), 7, np.uint8), labels=np.array([0, 1, 2]), split=np.array([0, 0, 1]),
             names=np.array(["a0", "a1", "a2"]))
    np.savez(b, images=np.full((2, 4, 4, 1), 0.5, np.float32), labels=np.array([3, 4]), split=np.array([1, 1]),
             names=np.array(["b0", "b1"]))
    np.savez(c, images=np.zeros((2, 4, 4, 3), np.uint8))
    one = load_images(f"npz:{a}")
    assert one.images.shape == (3, 4, 4) and one.labels.tolist() == [0, 1, 2] and one.names == ["a0", "a1", "a2"]
    both = load_images(f"NPZ:{a}, {b}")
    assert both.images.shape == (5, 4, 4) and both.images.dtype == np.uint8  # (N,H,W,1) squeezed
    assert both.images[3].tolist() == [[128] * 4] * 4  # floats in [0, 1] scaled to 0..255
    assert both.labels.dtype == np.int64 and both.labels.tolist() == [0, 1, 2, 3, 4]
    assert both.split.dtype == np.int8 and both.split.tolist() == [0, 0, 1, 1, 1]
    assert both.names == ["a0", "a1", "a2", "b0", "b1"]
    test = load_images(f"npz:{a},{b}", split="test")
    assert test.labels.tolist() == [2, 3, 4] and test.names == ["a2", "b0", "b1"]
    train = load_images(f"npz:{a},{b}", split="train")
    assert train.labels.tolist() == [0, 1] and (train.split == 0).all()
    assert len(load_images(f"npz:{a},{b}", split="all")) == 5
    assert len(load_images(str(a))) == 3  # a bare .npz path works too
    rgb = load_images(f"npz:{c}")
    assert rgb.channels == 3 and rgb.labels is None and rgb.split is None
    with pytest.raises(DataError, match="no train/test split"):
        load_images(f"npz:{c}", split="test")
    only_test = tmp_path / "t.npz"
    np.savez(only_test, images=np.zeros((2, 4, 4), np.uint8), split=np.ones(2, np.int8))
    with pytest.raises(DataError, match="has no train images"):
        load_images(f"npz:{only_test}", split="train")
    capsys.readouterr()
    mixed = load_images(f"npz:{a},{only_test}")  # only_test has no labels and no names: both dropped
    assert mixed.labels is None and mixed.names is None and mixed.split.tolist() == [0, 0, 1, 1, 1]
    lines = capsys.readouterr().err.splitlines()
    assert sorted(line.split(":")[2].strip() for line in lines) == ["'labels' dropped", "'names' dropped"]
    assert all(line.startswith("deepclust: warning: ") for line in lines)


def test_npz_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((3, 4, 4), np.uint8))

    def fails(spec: str, match: str, **kw) -> None:
        with pytest.raises(DataError, match=match):
            load_images(spec, **kw)

    fails(f"npz:{tmp_path / 'missing.npz'}", f"^no such file or directory: {tmp_path / 'missing.npz'}$")
    fails(str(tmp_path / "missing.npz"), "^no such file or directory")  # bare path
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 2, 2)))
    fails(f"npz:{tmp_path / 'nokey.npz'}", "npz file .*nokey.npz has no 'images' array")
    np.savez(tmp_path / "nan.npz", images=np.full((2, 2, 2), np.nan))
    fails(f"npz:{tmp_path / 'nan.npz'}", "NaN")
    np.savez(tmp_path / "range.npz", images=np.full((2, 2, 2), 300.0))
    fails(f"npz:{tmp_path / 'range.npz'}", r"must lie in \[0, 1\] or \[0, 255\]")
    np.savez(tmp_path / "bigger.npz", images=np.zeros((2, 5, 5), np.uint8))
    fails(f"npz:{good},{tmp_path / 'bigger.npz'}", r"disagree on image shape \(4x4, 5x5\); pass resize=SIDE")
    assert load_images(f"npz:{good},{tmp_path / 'bigger.npz'}", resize=6).images.shape == (5, 6, 6)
    np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    fails(f"npz:{good},{tmp_path / 'rgb.npz'}", "mix grayscale and RGB")
    np.savez(tmp_path / "labels.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(2))
    fails(f"npz:{tmp_path / 'labels.npz'}", "'labels' has 2 entries for 3 images")
    np.savez(tmp_path / "split.npz", images=np.zeros((2, 4, 4), np.uint8), split=np.array([0, 2]))
    fails(f"npz:{tmp_path / 'split.npz'}", "'split' values must be 0")
    np.savez(tmp_path / "obj.npz", images=np.zeros((2, 4, 4), np.uint8), names=np.array(["x", None], dtype=object))
    fails(f"npz:{tmp_path / 'obj.npz'}", "'names' is an object array")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    fails(f"npz:{tmp_path / 'junk.npz'}", "cannot read npz file")
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 4, 4, 2), np.uint8))
    fails(f"npz:{tmp_path / 'shape.npz'}", r"expected images shaped \(N,H,W\) or \(N,H,W,3\)")
    fails("npz:", "names no path")
    fails(f"npz:{tmp_path}", "is a directory, not an npz file; use folder:")
    fails("imagenet-42", "^unknown dataset 'imagenet-42'; known: digits, npz:PATH, folder:PATH, mnist, ")
    fails("digits", "split must be train, test or all", split="val")
    fails("digits", "resize must be a positive integer", resize=0)
    assert all(name in DATASET_NAMES for name in ("digits", "mnist", "cifar100-20", "stl10"))


@pytest.mark.parametrize("name, shape, n_train", [("mnist_test", (10000, 28, 28), 0),
                                                   ("usps", (9298, 16, 16), 7291),
                                                   ("cifar10_test", (10000, 32, 32, 3), 0)])
def test_shared_npz_files_when_present(name, shape, n_train):
    path = SHARED_DATA / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    d = load_images(f"npz:{path}")
    assert d.images.shape == shape and d.images.dtype == np.uint8 and d.images.flags.c_contiguous
    assert d.labels.dtype == np.int64 and set(d.labels.tolist()) == set(range(10))
    assert (d.split == 0).sum() == n_train and len(load_images(str(path), split="test")) == shape[0] - n_train
    if name == "cifar10_test":
        assert d.channels == 3 and len(d.names) == 10000 and d.names[0].endswith(".png")
        assert np.allclose(d.images.reshape(-1, 3).mean(0) / 255, [0.494, 0.485, 0.450], atol=0.002)


# -- folders --------------------------------------------------------------------------------------

def _save(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def test_folder_classes_mixed_modes_sizes_and_resize(tmp_path):
    root = tmp_path / "imgs"
    _save(root / "cats" / "a.png", np.full((6, 6), 10, np.uint8))  # grayscale
    _save(root / "cats" / "sub" / "b.PNG", np.full((6, 6, 3), (20, 30, 40), np.uint8))  # RGB, upper-case ext
    _save(root / "dogs" / "c.bmp", np.full((6, 6, 4), (50, 60, 70, 128), np.uint8))  # RGBA -> RGB
    (root / "dogs" / "notes.txt").write_text("not an image, ignored")
    _save(root / ".ipynb_checkpoints" / "copy.png", np.zeros((6, 6), np.uint8))  # hidden: ignored
    d = load_images(f"folder:{root}")
    assert d.images.shape == (3, 6, 6, 3) and d.channels == 3  # one colour image makes all RGB
    assert d.images[0, 0, 0].tolist() == [10, 10, 10] and d.images[1, 0, 0].tolist() == [20, 30, 40]
    assert d.images[2, 0, 0].tolist() == [50, 60, 70]
    assert d.classes == ["cats", "dogs"] and d.labels.tolist() == [0, 0, 1]
    assert d.names == ["cats/a.png", "cats/sub/b.PNG", "dogs/c.bmp"] and d.split is None
    with pytest.raises(DataError, match="no train/test split"):
        load_images(f"folder:{root}", split="train")

    _save(root / "dogs" / "big.jpg", np.full((9, 7, 3), 200, np.uint8))
    with pytest.raises(DataError, match=r"^images under .* have mixed sizes \(6x6, 9x7\); pass resize=SIDE"):
        load_images(f"folder:{root}")
    resized = load_images(f"folder:{root}", resize=8)
    assert resized.images.shape == (4, 8, 8, 3) and resized.labels.tolist() == [0, 0, 1, 1]
    assert resized.images[0].min() == resized.images[0].max() == 10  # bilinear keeps a flat image flat


def test_folder_grayscale_modes(tmp_path):
    root = tmp_path / "gray"
    _save(root / "l.png", np.full((5, 5), 100, np.uint8))
    _save(root / "p.gif", np.full((5, 5), 60, np.uint8))  # GIF: a palette ('P') image of greys
    _save(root / "one.png", np.full((5, 5), 255, np.uint8), bits=1)
    Image.fromarray(np.full((5, 5), 255, np.uint8)).convert("1").save(root / "two.tif")  # mode '1'
    _save(root / "w16.png", np.full((5, 5), 65535, np.uint16))  # 16-bit: 'I;16'
    d = load_images(str(root))  # a bare directory path works too
    assert d.images.shape == (5, 5, 5) and d.channels == 1 and d.labels is None and d.classes is None
    by_name = dict(zip(d.names, d.images[:, 0, 0].tolist()))
    assert by_name == {"l.png": 100, "one.png": 255, "p.gif": 60, "two.tif": 255, "w16.png": 255}


def test_folder_corrupt_files_are_skipped_with_one_warning(tmp_path, capsys):
    root = tmp_path / "imgs"
    _save(root / "a" / "ok.png", np.full((4, 4), 1, np.uint8))
    _save(root / "b" / "ok.jpg", np.full((4, 4), 2, np.uint8))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    (root / "b" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "garbage.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "b" / "empty.webp").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one stderr line, never a Python warning (issue 23)
        d = load_images(f"folder:{root}")
    messages = capsys.readouterr().err.splitlines()
    assert len(messages) == 1 and messages[0].startswith("deepclust: warning: skipped 3 image file(s)")
    assert all(f"{n} (unreadable)" in messages[0] for n in ("b/truncated.png", "b/garbage.jpg", "b/empty.webp"))
    assert d.names == ["a/ok.png", "b/ok.jpg"] and d.labels.tolist() == [0, 1]
    assert sorted(d.skipped) == ["b/empty.webp (unreadable)", "b/garbage.jpg (unreadable)",
                                 "b/truncated.png (unreadable)"]
    assert d.subset([0]).skipped == d.skipped


def test_folder_flat_empty_missing_and_stray_top_level_images(tmp_path, capsys):
    flat = tmp_path / "flat"
    _save(flat / "x.png", np.zeros((4, 4), np.uint8))
    _save(flat / "y.png", np.zeros((4, 4), np.uint8))
    d = load_images(f"folder:{flat}")
    assert d.labels is None and d.classes is None and d.names == ["x.png", "y.png"]
    _save(flat / "sub" / "z.png", np.zeros((4, 4), np.uint8))
    assert load_images(f"folder:{flat}").labels is None
    assert "outside class sub-folders" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"^no images found under {empty}$"):
        load_images(f"folder:{empty}")
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no images found"):
        load_images(f"folder:{only_bad}")
    assert "x.png" in capsys.readouterr().err
    with pytest.raises(DataError, match="^no such file or directory"):
        load_images(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="^no such file or directory"):
        load_images(str(tmp_path / "nope"))


def test_subset_keeps_fields_aligned():
    s = ImageSet(np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2), np.arange(5), np.array([0, 1, 0, 1, 0], np.int8),
                 [f"n{i}" for i in range(5)], ["c"], "x")
    for pick in (np.array([False, True, False, True, False]), [1, 3], slice(1, 4, 2)):
        part = s.subset(pick)
        assert part.labels.tolist() == [1, 3] and part.split.tolist() == [1, 1] and part.names == ["n1", "n3"]
        assert np.array_equal(part.images, s.images[[1, 3]]) and part.classes == ["c"] and part.spec == "x"
    assert len(s.subset([])) == 0 and s.subset(2).images.shape == (1, 2, 2)


# -- torchvision formats --------------------------------------------------------------------------

def _idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """An idx file: two zero bytes, type code 0x08 (uint8), ndim, big-endian int32 dims, data."""
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data += np.asarray(array, np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def _write_mnist_like(directory: Path, n_train: int = 5, n_test: int = 3, gz: bool = False) -> np.ndarray:
    """The four MNIST idx files; returns the train images followed by the test images."""
    suffix = ".gz" if gz else ""
    images = np.random.default_rng(0).integers(0, 256, (n_train + n_test, 28, 28), dtype=np.uint8)
    _idx(directory / f"train-images-idx3-ubyte{suffix}", images[:n_train], gz)
    _idx(directory / f"train-labels-idx1-ubyte{suffix}", np.arange(n_train) % 10, gz)
    _idx(directory / f"t10k-images-idx3-ubyte{suffix}", images[n_train:], gz)
    _idx(directory / f"t10k-labels-idx1-ubyte{suffix}", np.arange(n_test) % 10, gz)
    return images


def test_idx_reader(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "a-idx3-ubyte", arr)
    _idx(tmp_path / "b-idx3-ubyte.gz", arr, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)
    assert np.array_equal(read_idx(tmp_path / "b-idx3-ubyte.gz"), arr)
    (tmp_path / "short").write_bytes((tmp_path / "a-idx3-ubyte").read_bytes()[:-1])
    with pytest.raises(DataError, match="does not match its dimensions"):
        read_idx(tmp_path / "short")
    (tmp_path / "text").write_text("hello")
    with pytest.raises(DataError, match="not an idx file"):
        read_idx(tmp_path / "text")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read idx file"):
        read_idx(tmp_path / "bad.gz")


def test_mnist_and_fashion_mnist_from_torchvision_raw_folders(tmp_path):
    # torchvision 0.29 looks for the uncompressed idx files in ROOT/<ClassName>/raw/
    images = _write_mnist_like(tmp_path / "MNIST" / "raw")
    m = load_images("mnist", root=str(tmp_path))
    assert m.images.shape == (8, 28, 28) and np.array_equal(m.images, images)
    assert m.split.tolist() == [0] * 5 + [1] * 3 and m.labels.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert m.classes == [str(i) for i in range(10)] and m.spec == "mnist"
    test = load_images("MNIST", root=str(tmp_path), split="test")
    assert np.array_equal(test.images, images[5:]) and (test.split == 1).all()
    assert len(load_images("mnist", root=str(tmp_path), split="train")) == 5
    _write_mnist_like(tmp_path / "FashionMNIST" / "raw", n_train=2, n_test=1)
    f = load_images("fashion_mnist", root=str(tmp_path))
    assert f.images.shape == (3, 28, 28) and f.classes[0] == "T-shirt/top" and f.split.tolist() == [0, 0, 1]


def test_fashion_mnist_from_debian_idx_files(tmp_path, monkeypatch):
    deb = tmp_path / "debian"
    images = _write_mnist_like(deb, n_train=4, n_test=2, gz=True)  # the Debian package ships .gz files
    monkeypatch.setenv(FASHION_ENV, str(deb))
    f = load_images("fashion-mnist", root=str(tmp_path / "nothing-here"))
    assert np.array_equal(f.images, images) and f.labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert f.split.tolist() == [0, 0, 0, 0, 1, 1] and len(f.classes) == 10
    assert len(load_images("fashion-mnist", split="test", root=str(tmp_path / "nothing-here"))) == 2
    monkeypatch.delenv(FASHION_ENV)
    monkeypatch.setattr(torchvision_sets, "DEBIAN_FASHION_MNIST_DIR", str(deb))  # the module-level default
    assert len(load_images("fashion-mnist", root=str(tmp_path / "nothing-here"))) == 6


def test_missing_torchvision_sets_say_download(tmp_path, monkeypatch):
    for name in ("mnist", "fashion-mnist", "usps", "cifar10", "cifar100", "cifar100-20", "svhn", "stl10"):
        with pytest.raises(DataError, match=f"^dataset '{name}' not found under {tmp_path}; pass --download to "
                                            r"fetch it \(needs internet\)$"):
            load_images(name, root=str(tmp_path))
    import torchvision.datasets as tvd

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    with pytest.raises(DataError, match="^dataset 'mnist' could not be downloaded into .*Error downloading"):
        load_images("mnist", root=str(tmp_path), download=True)


def test_usps_bz2_libsvm(tmp_path):
    # torchvision reads ROOT/usps.bz2 and ROOT/usps.t.bz2: libsvm lines "label 1:v1 ... 256:v256" with
    # labels 1..10 and values in [-1, 1]
    def write(name: str, n: int) -> None:
        lines = []
        for i in range(n):
            values = " ".join(f"{j + 1}:{(j % 3) - 1}" for j in range(256))
            lines.append(f"{i % 10 + 1} {values}")
        (tmp_path / name).write_bytes(bz2.compress("\n".join(lines).encode() + b"\n"))

    write("usps.bz2", 4)
    write("usps.t.bz2", 2)
    u = load_images("usps", root=str(tmp_path))
    assert u.images.shape == (6, 16, 16) and u.images.dtype == np.uint8
    assert u.labels.tolist() == [0, 1, 2, 3, 0, 1] and u.split.tolist() == [0, 0, 0, 0, 1, 1]
    assert u.images[0, 0, :3].tolist() == [0, 127, 255]  # -1, 0, 1 -> 0..255
    assert len(load_images("usps", root=str(tmp_path), split="test")) == 2


def _skip_integrity(monkeypatch, *classes) -> None:
    """torchvision checks each file's md5 against the real dataset's (the class's ``_check_integrity``
    and, for the CIFAR meta file, the module-level ``check_integrity``). The tests' files are small
    stand-ins in the same format, so those checks are switched off here; everything else — paths,
    file names, parsing — is torchvision's own code."""
    import importlib

    for cls in classes:
        monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
        module = importlib.import_module(cls.__module__)
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


def _cifar_rows(n: int, first: int) -> np.ndarray:
    """n CIFAR rows of 3072 bytes: the R, G and B 32x32 planes, one after the other (row-major)."""
    planes = np.stack([np.full((n, 32 * 32), first + c, np.uint8) for c in range(3)], axis=1)
    return planes.reshape(n, 3072)


def test_cifar10_cifar100_and_cifar100_coarse(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    _skip_integrity(monkeypatch, tvd.CIFAR10, tvd.CIFAR100)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        entry = {"data": _cifar_rows(2, 10 * i), "labels": [i % 10, (i + 1) % 10],
                 "filenames": [f"{name}_{j}.png" for j in range(2)]}
        (c10 / name).write_bytes(pickle.dumps(entry))
    (c10 / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    c = load_images("cifar10", root=str(tmp_path))
    assert c.images.shape == (12, 32, 32, 3) and c.split.tolist() == [0] * 10 + [1] * 2
    assert c.images[0, 5, 7].tolist() == [0, 1, 2] and c.images[11, 0, 0].tolist() == [50, 51, 52]  # CHW -> HWC
    assert c.labels.tolist()[:4] == [0, 1, 1, 2] and c.classes[3] == "class3"
    assert load_images("CIFAR-10", root=str(tmp_path), split="test").labels.tolist() == [5, 6]

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for name, n in (("train", 3), ("test", 2)):
        entry = {"data": _cifar_rows(n, 0), "fine_labels": [10 * i for i in range(n)],
                 "coarse_labels": [19 - i for i in range(n)]}
        (c100 / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]}
    (c100 / "meta").write_bytes(pickle.dumps(meta))
    fine = load_images("cifar100", root=str(tmp_path))
    assert fine.images.shape == (5, 32, 32, 3) and fine.labels.tolist() == [0, 10, 20, 0, 10]
    assert len(fine.classes) == 100
    coarse = load_images("cifar100-20", root=str(tmp_path))
    assert coarse.labels.tolist() == [19, 18, 17, 19, 18] and coarse.classes[19] == "coarse19"
    assert coarse.split.tolist() == [0, 0, 0, 1, 1]
    assert load_images("cifar100-20", root=str(tmp_path), split="test").labels.tolist() == [19, 18]


def test_svhn_mat_and_stl10_binary(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd

    _skip_integrity(monkeypatch, tvd.SVHN, tvd.STL10)
    # SVHN: ROOT/{train,test}_32x32.mat with X shaped (32, 32, 3, N) and y (N, 1), where 10 means digit 0
    for name, n in (("train_32x32.mat", 3), ("test_32x32.mat", 2)):
        x = np.zeros((32, 32, 3, n), np.uint8)
        x[0, 1, 2, :] = 200  # row 0, column 1, blue
        scipy.io.savemat(tmp_path / name, {"X": x, "y": np.array([[10], [1], [2]][:n], np.uint8)})
    s = load_images("svhn", root=str(tmp_path))
    assert s.images.shape == (5, 32, 32, 3) and s.labels.tolist() == [0, 1, 2, 0, 1]
    assert (s.images[:, 0, 1, 2] == 200).all() and s.images.sum() == 200 * 5
    assert s.split.tolist() == [0, 0, 0, 1, 1]

    # STL10: ROOT/stl10_binary/{train,test}_{X,y}.bin; X is N x 3 x 96 x 96 bytes, each channel stored
    # column-major; y holds labels 1..10
    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    for part, n in (("train", 2), ("test", 1)):
        x = np.zeros((n, 3, 96, 96), np.uint8)
        x[:, 0, 5, 2] = 77  # column 5, row 2, red
        (stl / f"{part}_X.bin").write_bytes(x.tobytes())
        (stl / f"{part}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
    (stl / "class_names.txt").write_text("\n".join(f"thing{i}" for i in range(10)))
    t = load_images("stl10", root=str(tmp_path))
    assert t.images.shape == (3, 96, 96, 3) and t.labels.tolist() == [0, 1, 0] and t.split.tolist() == [0, 0, 1]
    assert (t.images[:, 2, 5, 0] == 77).all() and t.images.sum() == 77 * 3
    assert t.classes[0] == "thing0"


def test_debian_fashion_mnist_when_installed(monkeypatch):
    monkeypatch.delenv(FASHION_ENV)
    if not Path(torchvision_sets.DEBIAN_FASHION_MNIST_DIR).is_dir():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    f = load_images("fashion-mnist", split="test", root="/nonexistent")
    assert f.images.shape == (10000, 28, 28) and f.images.dtype == np.uint8
    assert np.bincount(f.labels).tolist() == [1000] * 10 and (f.split == 1).all()
