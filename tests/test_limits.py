"""Memory limits (issue 23): the estimates, the one comparison, and where the checks run (before any
image is resized or read), with a fake "available memory": nothing here really allocates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import deepclust.limits as limits
from deepclust.configure import build_config
from deepclust.data import load_images
from deepclust.errors import DataError

GB = 10**9


def test_estimates_count_every_part():
    assert limits.resized_bytes(30, 3, 100_000) == {"resized images": 9 * 10**11, "their stacked copy": 9 * 10**11}
    parts = limits.training_bytes(1000, 3, 32, 32, batch=100, dim=128, full_softmax=True, knn_k=200)
    assert parts == {"images": 2 * 1000 * 3072, "a batch of views": limits.VIEW_COPIES * 100 * 3072 * 4,
                     "memory bank and features": 2 * 1000 * 128 * 4, "kNN structures": 1000 * 200 * 12,
                     "a batch's similarities to the bank": 3 * 100 * 1000 * 4}
    small = limits.training_bytes(5, 1, 8, 8, batch=128, dim=16, full_softmax=False, knn_k=200)
    assert small["kNN structures"] == 5 * 4 * 12 and small["a batch of views"] == limits.VIEW_COPIES * 5 * 64 * 4
    assert "a batch's similarities to the bank" not in small  # NCE: no full softmax over the bank


def test_human_units():
    assert [limits.human(b) for b in (512, 1500, 2.5e9, 1.8e12)] == ["512 B", "1.5 KB", "2.5 GB", "1.8 TB"]


def test_the_one_rule_refuses_above_the_margin_and_names_both_numbers():
    limits.check_fits("x", {"a": 9 * GB}, "hint", available=10 * GB)  # exactly at the margin: allowed
    with pytest.raises(DataError, match=r"^x need about 9\.1 GB of memory \(a 9\.1 GB\) but 10\.0 GB is available; "
                                        r"hint$"):
        limits.check_fits("x", {"a": 9 * GB + 10**8}, "hint", available=10 * GB)


def test_no_check_where_the_available_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: None)
    limits.check_resized(10**6, 3, 10**5)


def test_available_memory_reads_the_machine():
    n = limits.available_memory()
    assert n is None or n > 0


def test_bank_and_knn_at_large_n_are_refused():
    cfg = build_config({})
    limits.check_training(cfg, 70_000, 1, 28, 28, available=16 * GB)  # Fashion-MNIST fits in 16 GB
    with pytest.raises(DataError, match=r"training on 5000000 image\(s\) of 3x32x32 need about .* GB of memory "
                                        r"\(.*kNN structures 12\.0 GB.*\) but 16\.0 GB is available"):
        limits.check_training(cfg, 5_000_000, 3, 32, 32, available=16 * GB)


def test_resize_is_checked_before_any_file_is_read(tmp_path, monkeypatch):
    import deepclust.data.sources as sources

    for i in range(4):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / "c" / f"{i}.png")
    read = []
    monkeypatch.setattr(sources, "read_image", lambda path: read.append(path))
    monkeypatch.setattr(limits, "available_memory", lambda: 10**6)
    with pytest.raises(DataError, match=r"^4 image\(s\) resized to 1000x1000 need about 8\.0 MB .* 1\.0 MB is "
                                        r"available; use a smaller --resize$"):
        load_images(f"folder:{tmp_path}", resize=1000)
    assert read == []


def test_resize_of_arrays_is_checked_with_their_channels(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 10**6)
    assert load_images("digits", resize=10).image_size == (10, 10)  # 1797 x 100 x 2 bytes: fits
    with pytest.raises(DataError, match=r"^1797 image\(s\) resized to 100x100 need about 35\.9 MB"):
        load_images("digits", resize=100)
