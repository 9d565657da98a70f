"""Hostile-but-fair inputs (issue 14): symlinked folders read each real file once, predict's CSV
round-trips any file name, bad --config files and bad head.npz files give one line, never a traceback
or a pickle load."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepclust.config import read_yaml
from deepclust.data import ImageSet, load_images
from deepclust.errors import ConfigError, DataError
from deepclust.heads import ClusterHead, fit_head


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


# -- folders with symbolic links (item 2) --------------------------------------------------------

def test_folder_symlink_loop_is_not_followed(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "c0" / "a.png", 1)
    _png(root / "c0" / "b.png", 2)
    _png(root / "c1" / "c.png", 3)
    (root / "c0" / "up").symlink_to("..")  # a loop: c0/up/c0/up/... reaches every file again
    (root / "c1" / "top").symlink_to(tmp_path)  # an ancestor of the root: a loop too
    d = load_images(f"folder:{root}")
    assert d.names == ["c0/a.png", "c0/b.png", "c1/c.png"]
    assert d.labels.tolist() == [0, 0, 1] and d.classes == ["c0", "c1"]
    assert d.images[:, 0, 0].tolist() == [1, 2, 3]


def test_folder_of_linked_class_folders_and_duplicate_links(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "cats" / "x.png", 10)
    _png(elsewhere / "cats" / "y.png", 11)
    _png(elsewhere / "single.png", 12)
    root = tmp_path / "imgs"
    _png(root / "c0" / "a.png", 1)
    _png(root / "c1" / "b.png", 2)
    (root / "cats").symlink_to(elsewhere / "cats")  # the common layout: a folder of linked class folders
    (root / "kitties").symlink_to(elsewhere / "cats")  # the same real folder again: not read twice
    (root / "a_links").mkdir()
    (root / "a_links" / "dup.png").symlink_to(root / "c1" / "b.png")  # sorts first, but crosses a link
    (root / "c0" / "ext.png").symlink_to(elsewhere / "single.png")  # a linked file from outside: read
    (root / "c1" / "again.png").symlink_to(elsewhere / "single.png")  # ... once, under the first path
    d = load_images(f"folder:{root}")
    # one entry per real file; among several paths, the fewest links, then the fewest components,
    # then the sorted-first path wins: real class folders keep their files
    assert d.names == ["c0/a.png", "c0/ext.png", "c1/b.png", "cats/x.png", "cats/y.png"]
    assert d.classes == ["c0", "c1", "cats"] and d.labels.tolist() == [0, 0, 1, 2, 2]
    assert d.images[:, 0, 0].tolist() == [1, 12, 2, 10, 11]


def test_folder_broken_link_is_reported_not_fatal(tmp_path, capsys):
    root = tmp_path / "imgs"
    _png(root / "c0" / "a.png", 1)
    (root / "c0" / "gone.png").symlink_to(tmp_path / "missing.png")
    d = load_images(f"folder:{root}")
    assert re.search(r"skipped 1 image file\(s\) .*c0/gone.png \(unreadable\)", capsys.readouterr().err)
    assert d.names == ["c0/a.png"]


# -- predict's CSV (item 6) ------------------------------------------------------------------------

def test_predict_csv_round_trips_any_file_name(tmp_path, monkeypatch, capsys):
    import deepclust.inference
    from deepclust.cli import main

    names = ["plain.png", "a,b.png", 'say "hi".png', "line\nbreak.png", "cr\rlf.png", "naïve/日本 語.png",
             " lead and trail .png", "semi;colon\t.png", "\udcff-latin1-byte.png"]
    clusters = np.arange(len(names)) % 3
    images = ImageSet(np.zeros((len(names), 2, 2), np.uint8), names=names)
    monkeypatch.setattr(deepclust.inference, "predict_run", lambda run, data, split="all", resize=None: (clusters, images))
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(tmp_path), "--data", "digits", "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out, newline="", encoding="utf-8") as f:  # the file is valid UTF-8
        rows = list(csv.reader(f))
    expected = names[:-1] + ["\\xff-latin1-byte.png"]  # a name that is not UTF-8 keeps its byte as \xNN
    assert rows == [["name", "cluster"]] + [[n, str(c)] for n, c in zip(expected, clusters.tolist())]


# -- --config that is not a YAML file (item 11) ------------------------------------------------------

def test_read_yaml_refuses_what_is_not_a_yaml_text_file(tmp_path, monkeypatch):
    def fails(path, pattern):
        with pytest.raises(ConfigError, match=pattern) as e:
            read_yaml(str(path))
        assert "\n" not in str(e.value)

    fails(tmp_path, "is a directory, not a YAML file")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    fails(binary, r"is not UTF-8 text \(byte 128 is 0x80\)")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1\nout: café\n".encode("latin-1"))
    fails(latin1, "is not UTF-8 text")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"seed: 1\x00\x01\n")
    fails(nul, "^cannot parse")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000)
    fails(deep, "^cannot parse .*nested too deeply")
    scalar = tmp_path / "false.yaml"
    scalar.write_text("false\n")
    fails(scalar, "expected a mapping at the top level")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    fails(fifo, "is not a regular file")  # would block forever if opened
    locked = tmp_path / "locked.yaml"
    locked.write_text("seed: 1\n")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for a user
        def denied(self):
            raise PermissionError(13, "Permission denied", str(self))
        monkeypatch.setattr(Path, "read_bytes", denied)
    fails(locked, "^cannot read config .*: Permission denied$")
    monkeypatch.undo()
    locked.chmod(0o600)
    assert read_yaml(str(locked)) == {"seed": 1}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(str(empty)) == {}
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffseed: 2\n".encode("utf-8"))
    assert read_yaml(str(bom)) == {"seed": 2}


def test_cli_config_directory_is_one_line(tmp_path, capsys):
    from deepclust.cli import main

    assert main(["fit", "--config", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepclust: error:") and "is a directory" in err


# -- head.npz that is not a head (item 11) -----------------------------------------------------------

def _head_arrays(**changes) -> dict:
    head = fit_head(np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32), "spectral", 3)
    arrays = dict(kind=np.array(head.kind), n_clusters=np.array(head.n_clusters), centroids=head.centroids,
                  labels=head.labels_, reference=head.reference, reference_labels=head.reference_labels)
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


class _Payload:
    """Unpickling this object creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_head_round_trip_still_works(tmp_path):
    head = fit_head(np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32), "spectral", 3)
    head.save(tmp_path / "head.npz")
    loaded = ClusterHead.load(tmp_path / "head.npz")
    assert loaded.kind == "spectral" and loaded.n_clusters == 3 and loaded.labels_.tolist() == head.labels_.tolist()
    x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    assert loaded.predict(x).tolist() == head.predict(x).tolist()
    km = fit_head(np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32), "kmeans", 4)
    km.save(tmp_path / "km.npz")
    assert ClusterHead.load(tmp_path / "km.npz").predict(x).tolist() == km.predict(x).tolist()


@pytest.mark.parametrize("case,pattern", [
    ("object", "Object arrays cannot be loaded"),
    ("missing", "lacks centroids, reference_labels; not a head.npz"),
    ("kind", "kind must be one of kmeans, spectral"),
    ("kind_number", "kind must be one of"),
    ("k_float", "n_clusters must be an integer >= 1"),
    ("k_zero", "n_clusters must be an integer >= 1"),
    ("centroids_int", "centroids must be a finite float matrix"),
    ("centroids_nan", "centroids must be a finite float matrix"),
    ("centroids_shape", r"centroids have shape \(2, 6\) for 3 clusters"),
    ("labels_range", r"labels must be integers in \[0, 3\)"),
    ("ref_labels_float", "reference_labels must be integers"),
    ("ref_labels_range", "reference_labels must be integers"),
    ("ref_dim", "do not match centroids"),
    ("ref_count", "do not match centroids"),
])
def test_bad_head_npz_is_one_line_and_never_unpickled(tmp_path, case, pattern):
    marker = tmp_path / "PWNED"
    arrays = {
        "object": _head_arrays(labels=np.array([_Payload(str(marker))], dtype=object)),
        "missing": {k: v for k, v in _head_arrays().items() if k not in ("centroids", "reference_labels")},
        "kind": _head_arrays(kind=np.array("dbscan")),
        "kind_number": _head_arrays(kind=np.array(3)),
        "k_float": _head_arrays(n_clusters=np.array(3.0)),
        "k_zero": _head_arrays(n_clusters=np.array(0)),
        "centroids_int": _head_arrays(centroids=np.zeros((3, 6), np.int64)),
        "centroids_nan": _head_arrays(centroids=np.full((3, 6), np.nan, np.float32)),
        "centroids_shape": _head_arrays(centroids=np.zeros((2, 6), np.float32)),
        "labels_range": _head_arrays(labels=np.array([0, 1, 7])),
        "ref_labels_float": _head_arrays(reference_labels=np.zeros(40, np.float32)),
        "ref_labels_range": _head_arrays(reference_labels=np.full(40, -1)),
        "ref_dim": _head_arrays(reference=np.zeros((40, 5), np.float16)),
        "ref_count": _head_arrays(reference_labels=np.zeros(39, np.int64)),
    }[case]
    path = tmp_path / "head.npz"
    np.savez(path, **arrays)  # allow_pickle: object arrays are written as pickles
    with pytest.raises(DataError, match=pattern) as e:
        ClusterHead.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


def test_damaged_head_files_are_one_line(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **_head_arrays())
    raw = good.read_bytes()
    files = {"truncated.npz": raw[: len(raw) // 2], "empty.npz": b"", "garbage.npz": b"PK\x03\x04" + bytes(500),
             "text.npz": b"kind: kmeans\n"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "array.npy", np.zeros(3))
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF  # a bit error inside a member: the zip CRC check fails
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    for name in [*files, "array.npy", "flipped.npz", "missing.npz", "."]:
        with pytest.raises(DataError, match="^cannot read cluster head|is invalid") as e:
            ClusterHead.load(tmp_path / name)
        assert "\n" not in str(e.value), name


# -- head.npz files of every kind, and of the layout written before each kind saved its own arrays ----

def test_linear_head_files_of_both_layouts_predict_the_affine_map(tmp_path):
    """A ``linear`` head keeps its matrix as ``weight``; files that hold it as ``centroids`` (with the
    empty reference arrays every head once saved) load to the same head and the same clusters."""
    from deepclust.heads import AssignmentMap, LinearHead, OwnClusters, cluster_head

    rng = np.random.default_rng(0)
    a, c = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(30, 6))
    expected = (x.astype(np.float32) @ a.T + c).argmax(1)
    head = cluster_head(x, "method", 4, own=OwnClusters(map=AssignmentMap("backbone", a, c)),
                        layer="backbone")
    assert isinstance(head, LinearHead) and np.array_equal(head.labels_, expected)
    head.save(tmp_path / "new.npz")
    with np.load(tmp_path / "new.npz") as z:
        assert sorted(z.files) == ["bias", "kind", "labels", "n_clusters", "weight"]
    np.savez(tmp_path / "old.npz", kind=np.array("linear"), n_clusters=np.array(4), centroids=a, labels=expected,
             reference=np.zeros((0, 0), np.float16), reference_labels=np.zeros(0, np.int64), bias=c)
    for name in ("new.npz", "old.npz"):
        loaded = ClusterHead.load(tmp_path / name)
        assert isinstance(loaded, LinearHead) and loaded.width == 6 and np.array_equal(loaded.weight, a)
        assert np.array_equal(loaded.predict(x), expected) and np.array_equal(loaded.labels_, expected)
        assert loaded.assignment_map("backbone").layer == "backbone"
    np.savez(tmp_path / "no_bias.npz", kind=np.array("linear"), n_clusters=np.array(4), weight=a, labels=expected)
    with pytest.raises(DataError, match="lacks bias"):
        ClusterHead.load(tmp_path / "no_bias.npz")


@pytest.mark.parametrize("kind", ["kmeans", "spectral", "agglomerative", "graph", "method"])
def test_every_kind_round_trips_and_reads_the_older_layout(tmp_path, kind):
    """Each kind saves its own arrays and loads as its own class; a file of the older layout (every
    array of every kind, empty where unused) loads to a head predicting the same clusters."""
    from deepclust.heads import KINDS, GivenLabelsHead, OwnClusters, cluster_head

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(m, 0.1, size=(20, 5)) for m in (-2, 0, 2)]).astype(np.float32)
    own = OwnClusters(labels=np.repeat(np.arange(3), 20))
    head = cluster_head(x, kind, 3, own=own)
    assert type(head) is KINDS[kind] and (kind != "method" or isinstance(head, GivenLabelsHead))
    head.save(tmp_path / "new.npz")
    old = dict(kind=np.array(kind), n_clusters=np.array(head.n_clusters), centroids=head.centroids,
               labels=head.labels_, reference=np.zeros((0, 0), np.float16), reference_labels=np.zeros(0, np.int64),
               bias=np.zeros(0, np.float32))
    if kind != "kmeans":
        old.update(reference=head.reference, reference_labels=head.reference_labels)
    np.savez(tmp_path / "old.npz", **old)
    new = rng.normal(0, 2, size=(15, 5)).astype(np.float32)
    for name in ("new.npz", "old.npz"):
        loaded = ClusterHead.load(tmp_path / name)
        assert type(loaded) is type(head) and loaded.kind == kind and loaded.width == 5
        assert np.array_equal(loaded.labels_, head.labels_) and np.array_equal(loaded.predict(new), head.predict(new))
