"""Data larger than memory (issue 43): the sharded image store (``data/store.py``), the switch that
streams from it (``datapath.py``) and the trainer's streamed images (``imagesource.py``).

- the store holds what ``load_images`` returns, bit for bit (npz of uint8 or floats, a folder mixing
  grey, colour and palette images with hidden and unreadable files), read by index in any order;
- a run whose images do not fit the memory allowed (``DEEPCLUST_MEMORY``, set between the in-memory
  and the streamed estimates) streams, says so, reuses the store, and equals the in-memory run bit
  for bit; killed in the middle of a streamed epoch and resumed, it equals the uninterrupted run;
  two "nodes" on localhost (one gloo process each, one shared store written by both) equal one;
- the reader's resident memory stays under a cap smaller than the store; a streamed PAD run does
  not hold the images (its peak growth is the in-memory run's less the images' copies);
- a shard changed, truncated or deleted, a source changed, a full disk or a kill while writing:
  refused in one line naming the file, or no store left that a later run would trust.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_one_line_error, run_cli, smoke_layer
from test_contract import WORKER, _env, _free_port, _outputs, _same_record

from deepclust import inference
from deepclust import io as dio
from deepclust.config import merge_layers
from deepclust.configure import build_config
from deepclust.data import load_images, store
from deepclust.data.streams import fingerprint, folder_input, listing, npz_input
from deepclust.datapath import open_data
from deepclust.limits import MARGIN, MEMORY_ENV, training_parts
from deepclust.runs import fit_run, resume_run

STORE_WORKER = str(ROOT / "tests" / "_store_worker.py")


def stream_cap(layer: dict, shape: tuple[int, int, int, int]) -> str:
    """A DEEPCLUST_MEMORY between the streamed and the in-memory estimates of ``layer`` on images of
    ``shape`` (N, C, H, W): the run streams."""
    cfg = build_config(layer)
    memory = sum(training_parts(cfg, *shape, streamed=False).values())
    streamed = sum(training_parts(cfg, *shape, streamed=True).values())
    assert streamed < memory
    return str(int((memory + streamed) / 2 / MARGIN))


def _layer(method: str, npz, out, store_dir, **extra) -> dict:
    """The contract's smoke configuration of ``method`` with its store at ``store_dir``."""
    return merge_layers(smoke_layer(method, f"npz:{npz}", out, **extra), {"data": {"store": str(store_dir)}})


def _write(directory, npz, shard_bytes=None) -> store.Store:
    fp = fingerprint("npz", str(npz), f"npz:{npz}", "all", None)
    files = listing("npz", str(npz))
    store.write_store(directory, npz_input(str(npz), str(npz), None, fp, files), shard_bytes=shard_bytes)
    return store.open_store(directory, fingerprint=fp, files=files)


# -- the store holds the loaded images ---------------------------------------------------------------

def test_store_of_an_npz_equals_the_loaded_images_in_any_order(tmp_path, small_npz):
    s = _write(tmp_path / "s", small_npz, shard_bytes=1000)  # 15 images a shard
    loaded = load_images(f"npz:{small_npz}")
    assert len(s.shards) == 20 and s.n == 300
    idx = np.array([299, 0, 17, 17, 150, 3, 298, 16, 15])  # unsorted, repeated, across shards
    assert np.array_equal(s.read(idx)[:, 0], loaded.images[idx])
    assert np.array_equal(s.read_range(0, 300)[:, 0], loaded.images)
    fields = s.fields()
    assert np.array_equal(fields["labels"], loaded.labels) and np.array_equal(fields["split"], loaded.split)


def test_store_of_float_images_converts_as_loading_does(tmp_path):
    x = np.random.default_rng(0).random((50, 6, 5, 3)).astype(np.float32)  # [0, 1]: scaled by 255
    np.savez(tmp_path / "f.npz", images=x, names=np.array([f"im{i}" for i in range(50)]))
    s = _write(tmp_path / "s", tmp_path / "f.npz", shard_bytes=900)
    loaded = load_images(f"npz:{tmp_path / 'f.npz'}")
    assert np.array_equal(s.read_range(0, 50).transpose(0, 2, 3, 1), loaded.images)
    assert s.fields()["names"] == loaded.names


def _mixed_folder(root) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(root / c / f"g{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / "b" / "colour.png")
    grey_palette = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).convert("P")
    grey_palette.save(root / "a" / "palette.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(root / "a" / ".hidden.png")


def test_store_of_a_folder_equals_the_loaded_images(tmp_path, monkeypatch):
    _mixed_folder(tmp_path / "f")
    monkeypatch.setattr("deepclust.data.streams.CHUNK_BYTES", 5 * 12 * 10 * 3)  # five images a chunk
    loaded = load_images(f"folder:{tmp_path / 'f'}")
    for resize in (None, 8):
        spec = f"folder:{tmp_path / 'f'}"
        fp, files = fingerprint("folder", str(tmp_path / "f"), spec, "all", resize), listing("folder", str(tmp_path / "f"))
        store.write_store(tmp_path / f"s{resize}", folder_input(str(tmp_path / "f"), spec, resize, fp, files),
                          shard_bytes=700)
        s = store.open_store(tmp_path / f"s{resize}", fingerprint=fp, files=files)
        want = loaded if resize is None else load_images(spec, resize=resize)
        assert np.array_equal(s.read_range(0, s.n).transpose(0, 2, 3, 1), want.images)
        fields = s.fields()
        assert fields["names"] == want.names and fields["skipped"] == want.skipped
        assert np.array_equal(fields["labels"], want.labels) and fields["classes"] == want.classes


# -- the switch, and equality with the in-memory run ---------------------------------------------------

@pytest.fixture(scope="module")
def in_memory(tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp("memory") / "run"
    fit_run(build_config(smoke_layer("pad", f"npz:{small_npz}", out)))
    return _outputs(out)


def test_a_run_that_does_not_fit_streams_says_so_reuses_the_store_and_equals_memory(tmp_path, small_npz,
                                                                                   in_memory, monkeypatch):
    layer = _layer("pad", small_npz, tmp_path / "run", tmp_path / "store")
    monkeypatch.setenv(MEMORY_ENV, stream_cap(layer, (300, 1, 8, 8)))
    args = ["fit", "--config", str(_yaml(tmp_path, layer)), "--out", str(tmp_path / "run")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert f"images streamed from the store {tmp_path / 'store'} (written in" in proc.stderr
    got = _outputs(tmp_path / "run")
    note = got["metrics"]["resolution"]["data"]
    assert note["path"] == "stream" and note["store_written"] and "do not fit in" in note["reason"]
    assert np.array_equal(got["embeddings"], in_memory["embeddings"])
    assert np.array_equal(got["labels"], in_memory["labels"])
    assert all(_same_record(a, b) for a, b in zip(got["log"], in_memory["log"]))
    again = run_cli(*args[:-1], str(tmp_path / "again"))
    assert again.returncode == 0 and f"store {tmp_path / 'store'} (reused)" in again.stderr, again.stderr
    assert np.array_equal(_outputs(tmp_path / "again")["labels"], in_memory["labels"])
    monkeypatch.delenv(MEMORY_ENV)
    small = run_cli(*args[:-1], str(tmp_path / "small"))
    assert "images held in memory" in small.stderr and "fit in" in small.stderr


def test_evaluate_predict_and_the_report_stream_a_run_that_streamed(tmp_path, small_npz, monkeypatch):
    """A run whose images did not fit is read again through its store by the commands of a finished
    run (``datapath.inference_images``): never loaded whole (``StoredImages`` refuses conversion), the
    same answers as the images held in memory."""
    proc = _fit_streamed(tmp_path, small_npz, monkeypatch)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    streamed = inference.evaluate_run(run, write=False), inference.predict_run(run, f"npz:{small_npz}")
    assert isinstance(streamed[1][1].images, store.StoredImages)
    report = run_cli("report", "--run", str(run), "--out", str(tmp_path / "page.html"))
    assert report.returncode == 0 and "streamed from the store" in report.stderr, report.stderr
    monkeypatch.delenv(MEMORY_ENV)
    held = inference.evaluate_run(run, write=False), inference.predict_run(run, f"npz:{small_npz}")
    assert isinstance(held[1][1].images, np.ndarray)
    assert streamed[0]["acc"] == held[0]["acc"] and streamed[0]["cluster_sizes"] == held[0]["cluster_sizes"]
    assert np.array_equal(streamed[1][0], held[1][0])


def _yaml(tmp_path, layer: dict):
    import yaml

    path = tmp_path / "layer.yaml"
    path.write_text(yaml.safe_dump(layer))
    return path


def test_jule_and_a_bank_that_cannot_fit_are_refused_in_one_line(tmp_path, small_npz, monkeypatch):
    layer = _layer("jule", small_npz, tmp_path / "run", tmp_path / "s")
    monkeypatch.setenv(MEMORY_ENV, stream_cap(layer, (300, 1, 8, 8)))
    with pytest.raises(Exception, match="jule reads every image's pixels at once") as e:
        open_data(build_config(layer))
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()
    monkeypatch.setenv(MEMORY_ENV, "100KB")
    proc = run_cli("fit", "--data", f"npz:{small_npz}", "--out", str(tmp_path / "r"), "--epochs", "1",
                   "--store", str(tmp_path / "s"))
    assert_one_line_error(proc, "training on 300 image(s) of 1x8x8, streamed from a store", "even streamed, the bank",
                          f"{MEMORY_ENV}")


# -- validation ------------------------------------------------------------------------------------

def _fit_streamed(tmp_path, npz, monkeypatch, out="run"):
    layer = _layer("pad", npz, tmp_path / out, tmp_path / "store", train={"epochs": 1})
    monkeypatch.setenv(MEMORY_ENV, stream_cap(layer, (300, 1, 8, 8)))
    return run_cli("fit", "--config", str(_yaml(tmp_path, layer)), "--out", str(tmp_path / out))


def test_a_changed_truncated_or_deleted_shard_is_refused_naming_it(tmp_path, small_npz, monkeypatch):
    monkeypatch.setattr(store, "SHARD_BYTES", 4096)  # 64 images a shard: 5 shards
    assert _fit_streamed(tmp_path, small_npz, monkeypatch).returncode == 0
    shard = tmp_path / "store" / "shard-00002.npy"
    original, stat = shard.read_bytes(), shard.stat()
    changed = bytearray(original)
    changed[-1] ^= 0xFF
    for damage, words in ((bytes(changed), "was changed (its SHA-256 differs"), (original[:-10], "truncated"),
                          (None, "is missing")):
        shard.unlink()
        if damage is not None:
            shard.write_bytes(damage)
        assert_one_line_error(_fit_streamed(tmp_path, small_npz, monkeypatch, out=f"r{len(words)}"),
                              f"store {tmp_path / 'store'}", "shard-00002.npy", words)
    shard.write_bytes(bytes(changed))  # changed, its mtime put back: the cheap check passes, verify does not
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    store.open_store(tmp_path / "store")
    with pytest.raises(store.DataError, match="shard-00002.npy was changed"):
        store.open_store(tmp_path / "store", verify=True)


def test_a_changed_source_is_refused_naming_the_file(tmp_path, small_npz, monkeypatch):
    npz = tmp_path / "data.npz"
    npz.write_bytes(small_npz.read_bytes())
    assert _fit_streamed(tmp_path, npz, monkeypatch).returncode == 0
    d = dict(np.load(npz))
    d["images"] = d["images"][::-1].copy()
    np.savez(npz, **d)
    assert_one_line_error(_fit_streamed(tmp_path, npz, monkeypatch, out="r2"), f"store {tmp_path / 'store'}",
                          f"{npz} was modified", "remove the store")


def test_a_folder_source_names_the_file_added(tmp_path):
    _mixed_folder(tmp_path / "f")
    spec, base = f"folder:{tmp_path / 'f'}", str(tmp_path / "f")
    fp = fingerprint("folder", base, spec, "all", 8)
    store.write_store(tmp_path / "s", folder_input(base, spec, 8, fp, listing("folder", base)))
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "f" / "a" / "new.png")
    with pytest.raises(store.DataError, match="a/new.png was added"):
        store.open_store(tmp_path / "s", fingerprint=fp, files=listing("folder", base))


def test_a_full_disk_while_writing_the_store_leaves_nothing_to_trust(tmp_path, small_npz, monkeypatch):
    monkeypatch.setattr(store, "SHARD_BYTES", 4096)
    real_write = dio._write

    def write(f, data):
        if "shard-00001.npy" in getattr(f, "name", ""):  # the store's second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(f, data)

    monkeypatch.setattr(dio, "_write", write)
    assert_one_line_error(_fit_streamed(tmp_path, small_npz, monkeypatch), f"cannot write {tmp_path / 'store'}",
                          "errno 28, ENOSPC")
    assert not [p.name for p in tmp_path.iterdir() if "store" in p.name]  # no store, no partial one
    monkeypatch.setattr(dio, "_write", real_write)
    proc = _fit_streamed(tmp_path, small_npz, monkeypatch, out="r2")
    assert proc.returncode == 0 and "(written in" in proc.stderr, proc.stderr


def test_a_killed_store_write_leaves_no_store_and_is_cleaned_up(tmp_path, small_npz):
    spec = {"npz": str(small_npz), "store": str(tmp_path / "s"), "shard": 4096}
    p = subprocess.run([sys.executable, STORE_WORKER, "write", json.dumps(spec)], env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    partial = [q.name for q in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".s.partial-") and not store.is_store(tmp_path / "s")
    assert not (tmp_path / partial[0] / "manifest.json").exists()
    _write(tmp_path / "s", small_npz)  # the next writer removes the dead one's directory
    assert [q.name for q in tmp_path.iterdir()] == ["s"]


# -- memory ----------------------------------------------------------------------------------------

READER = """
import sys, numpy as np, torch
sys.path.insert(0, {src!r})
from deepclust.data.store import StoredImages, open_store
from deepclust.imagesource import StreamedImages
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
s = StreamedImages(StoredImages(open_store({store!r})))
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
order = torch.randperm(s.shape[0], generator=torch.Generator().manual_seed(0))
total = 0
for blocks in (list(torch.split(order, 256)), list(torch.split(torch.arange(s.shape[0]), 512))):
    for x in s.reader(blocks):  # an epoch of random batches, then a full pass
        total += int(x[:, :, 0, 0].sum())
print(status("VmHWM") - base)
"""


def test_reading_a_store_larger_than_the_cap_stays_under_it(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8000, 64, 64, 3), dtype=np.uint8)  # 98 MB
    np.savez(tmp_path / "big.npz", images=images)
    _write(tmp_path / "s", tmp_path / "big.npz", shard_bytes=8 << 20)
    del images
    code = READER.format(src=str(ROOT / "src"), store=str(tmp_path / "s"))
    p = subprocess.run([sys.executable, "-c", code], env=_env(MALLOC_MMAP_THRESHOLD_="131072"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    growth, cap = int(p.stdout.split()[-1]), 40 * 10**6
    assert growth < cap < 8000 * 64 * 64 * 3, growth


def _rss_spec(tmp_path, name: str) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.integers(0, 256, (5, 96, 96, 3)).astype(np.float32)

    def blobs(n: int) -> np.ndarray:
        labels = rng.integers(0, 5, n)
        return np.clip(centres[labels] * 0.8 + rng.normal(0, 30, (n, 96, 96, 3)), 0, 255).astype(np.uint8)

    for part, n in (("warm", 300), ("big", 2000)):
        if not (tmp_path / f"{part}.npz").exists():
            np.savez(tmp_path / f"{part}.npz", images=blobs(n))

    def layer(part: str) -> dict:
        return {"method": "pad", "out": str(tmp_path / f"{name}-{part}"),
                "data": {"spec": f"npz:{tmp_path / f'{part}.npz'}", "store": str(tmp_path / f"{name}-{part}-store")},
                "net": {"backbone": "mlp"}, "cluster": {"n_clusters": 5, "head": "kmeans"}, "eval": {"knn_k": 10},
                "views": {"preset": "none"}, "optim": {"batch_size": 32},
                "train": {"epochs": 2, "progress": False, "threads": 1, "seed": 0}}

    return {"warm": layer("warm"), "layer": layer("big")}


@pytest.mark.slow
def test_a_streamed_pad_run_does_not_hold_the_images(tmp_path):
    """The same PAD run (2,000 colour images of 96 px, 55 MB decoded, held twice in memory: the array
    and its channels-first tensor) in memory and streamed (the cap between the estimates), each after a warm-up
    run of the same shape; peak growth of the process's anonymous memory (RssAnon, sampled: the store's
    file pages are the kernel's to reclaim and vary run to run) with malloc's mmap threshold fixed (so
    that freed blocks leave the resident set). The bound lies between a streamed run that held one copy
    (0.5 of ``held`` saved) and one that holds none (1.0): measured 0.90-1.02 on this machine, while
    VmHWM's growth varied by 26 MB run to run (a CI run saved 0.78 by it)."""
    growth = {}
    for name in ("memory", "stream"):
        spec = _rss_spec(tmp_path, name)
        cap = stream_cap(spec["layer"], (2000, 3, 96, 96)) if name == "stream" else None
        env = _env(MALLOC_MMAP_THRESHOLD_="131072", **({MEMORY_ENV: cap} if cap else {}))
        p = subprocess.run([sys.executable, STORE_WORKER, "rss", json.dumps(spec)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        result = json.loads(p.stdout.strip().splitlines()[-1])
        assert result["path"] == name
        growth[name] = result["anon"]
    held = 2 * 2000 * 96 * 96 * 3
    assert growth["memory"] - growth["stream"] > 0.7 * held, growth
    assert np.array_equal(np.load(tmp_path / "memory-big" / "labels.npy"), np.load(tmp_path / "stream-big" / "labels.npy"))


# -- kill and resume, many nodes ---------------------------------------------------------------------

@pytest.mark.slow
def test_kill_in_the_middle_of_a_streamed_epoch_then_resume(tmp_path, small_npz, in_memory, monkeypatch):
    layer = _layer("pad", small_npz, tmp_path / "run", tmp_path / "store")
    cap = stream_cap(layer, (300, 1, 8, 8))
    spec = {"layer": layer, "kill_epoch": 2, "kill_step": 2}  # 5 steps an epoch: batches read ahead in flight
    p = subprocess.run([sys.executable, STORE_WORKER, "kill", json.dumps(spec)], env=_env(**{MEMORY_ENV: cap}),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    assert [r["epoch"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())] == [0, 1]
    monkeypatch.setenv(MEMORY_ENV, cap)
    resume_run(build_config({"out": str(tmp_path / "run"), "train": {"progress": False}}))
    got = _outputs(tmp_path / "run")
    assert got["metrics"]["resolution"]["data"]["path"] == "stream"
    assert [r["epoch"] for r in got["log"]] == [r["epoch"] for r in in_memory["log"]]
    assert all(_same_record(a, b) for a, b in zip(got["log"], in_memory["log"]))
    assert np.array_equal(got["embeddings"], in_memory["embeddings"])
    assert np.array_equal(got["labels"], in_memory["labels"])


@pytest.mark.slow
def _launcher_env(launcher: str, rank: int, port: str) -> dict[str, str]:
    """What each launcher sets for the task of ``rank`` of two, one a machine: torchrun's variables,
    or srun's (``--nodes 2 --ntasks-per-node 1``), which Fabric's SLURMEnvironment reads."""
    if launcher == "torchrun":
        return dict(RANK=str(rank), LOCAL_RANK="0", NODE_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port)
    return dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(rank),
                SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_NODELIST="127.0.0.1", SLURM_JOB_ID="1",
                SLURM_JOB_NAME="deepclust", MASTER_PORT=port)


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_streaming_from_one_store_equal_one_process(tmp_path, small_npz, in_memory, launcher):
    """``--num-nodes 2`` as torchrun or srun starts it on two machines (one process each), both on
    localhost over gloo, both streaming from one store on a shared file system (both write it: the
    first rename wins, the other opens it)."""
    layer = _layer("pad", small_npz, tmp_path / "run", tmp_path / "store", train={"num_nodes": 2})
    cap, port = stream_cap(layer, (300, 1, 8, 8)), str(_free_port())
    procs = [subprocess.Popen([sys.executable, WORKER, "ddp", json.dumps({"layers": {"pad": layer}})],
                              env=_env(**_launcher_env(launcher, r, port), **{MEMORY_ENV: cap}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    got = _outputs(tmp_path / "run")
    assert got["metrics"]["resolution"]["data"]["path"] == "stream"
    assert all(r["bank_identical_across_ranks"] and r.get("structure_identical_across_ranks", True) for r in got["log"])
    assert np.allclose(got["embeddings"], in_memory["embeddings"], atol=1e-4)
    assert (got["labels"] == in_memory["labels"]).mean() > 0.99


def test_images_larger_than_half_the_gpu_stream(tmp_path, small_npz, monkeypatch):
    """The in-memory path copies every image to every device: a set over DEVICE_SHARE of the GPU's
    memory streams however much host memory there is (the GPU's size stood in for: none is lent here)."""
    import deepclust.datapath as datapath

    monkeypatch.setattr(datapath, "device_memory", lambda cfg: 2 * 300 * 64 - 1)  # just under twice the images
    images, note = open_data(build_config(_layer("pad", small_npz, tmp_path / "run", tmp_path / "s")))
    assert note["path"] == "stream" and "exceed 50% of the GPU's" in note["reason"] and not images.in_memory
    monkeypatch.setattr(datapath, "device_memory", lambda cfg: 2 * 300 * 64)
    assert open_data(build_config(_layer("pad", small_npz, tmp_path / "run", tmp_path / "s")))[1]["path"] == "memory"


def test_a_store_is_never_written_into_a_directory_of_the_users(tmp_path, small_npz, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    layer = _layer("pad", small_npz, tmp_path / "run", tmp_path / "mine")
    monkeypatch.setenv(MEMORY_ENV, stream_cap(layer, (300, 1, 8, 8)))
    with pytest.raises(store.DataError, match="is not an image store and not empty"):
        open_data(build_config(layer))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
