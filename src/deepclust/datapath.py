"""Where a run's images live: held in memory, or streamed from a store on disk -- chosen by whether
they fit the memory the run may use, and recorded (``resolution.data`` in metrics.json).

Said on stderr when the images stream, or when the run named a store or a memory cap
(:func:`announce`). The rule (:func:`open_data`), before any image is decoded where the size is
cheap to know (an npz's headers, a folder's file count and first image; a torchvision set is loaded
to be known):
 - the decoded images and the training's structures (``limits.training_parts``: the images twice,
   the bank, the kNN structures, a batch's views and similarities, for every process of this
   machine) fit within ``limits.MARGIN`` of the memory allowed (``limits.allowed_memory``: the
   memory available, capped by ``DEEPCLUST_MEMORY``), and on a GPU the images take at most
   :data:`DEVICE_SHARE` of its memory (the in-memory path copies them all to every device) -> in
   memory: the images loaded as they always were, the same run bit for bit;
 - else, when the structures fit with only a few batches of images (``streamed=True``) -> streamed:
   the store at ``data.store`` (default ``ROOT/stores/NAME-HASH``) opened, or written first from the
   source chunk by chunk (``data/streams.py``, ``data/store.py``); a store written from other data
   is refused in one line naming the changed file. A method whose discovery reads every image's
   pixels at once (``Method.reads_images``: JULE's initial clusters) is refused with a store;
 - else refused in one line: even streamed, the bank and structures do not fit.
The run is the same on either path (the same rows for the same indices, ``tests/test_store.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config
from .data import ImageSet, classify, load_images, load_source, select_split
from .data.sources import finalise
from .data.store import StoredImages, is_store, open_store, write_store
from .data.streams import array_input, array_listing, fingerprint, folder_input, listing, npz_input, probe
from .errors import DataError
from .limits import MEMORY_ENV, allowed_memory, check_fits, check_resized, check_training, fits, human, training_parts
from .methods import method_class, stage_class


DEVICE_SHARE = 0.5  # of a GPU's memory the images may take when held (the rest: network, bank, activations)


def device_memory(cfg: Config) -> int | None:
    """Bytes of memory of the GPU a run of ``cfg`` trains on; None on the CPU."""
    if cfg.train.accelerator not in ("auto", "cuda", "gpu"):
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def open_data(cfg: Config, images: ImageSet | None = None, *, training: bool = True) -> tuple[ImageSet, dict]:
    """The run's images (``images``: given in memory, as ``Clusterer`` does) and the note of the path
    taken (module docstring; :func:`announce` says it on stderr). ``training`` False: read for
    inference (no method's discovery will read every pixel at once)."""
    data, allowed, device = cfg.data, allowed_memory(), device_memory(cfg)
    kind, arg = ("array", "") if images is not None else classify(data.spec)
    shape = _shape(images) if images is not None else probe(kind, arg, data.split.lower(), data.resize)
    loaded = None
    if shape is None:  # a torchvision set or digits: loaded to be known
        loaded = load_source(data.spec, data.split, data.root, data.download, data.resize)
        shape = _shape(loaded)
    memory = training_parts(cfg, *shape, streamed=False)
    decoded = int(shape[0] * shape[1] * shape[2] * shape[3])
    note: dict[str, Any] = {"decoded_bytes": decoded, "allowed_bytes": allowed, "estimate_bytes": sum(memory.values()),
                            "device_bytes": device}
    on_device = device is None or decoded <= DEVICE_SHARE * device
    if fits(memory, allowed) and on_device:
        images = images if images is not None else (select_split(finalise(loaded), data.split.lower())
                                                    if loaded is not None else load_images(
                                                        data.spec, data.split, data.root, data.download, data.resize))
        check_training(cfg, len(images), images.channels, *images.image_size)  # the estimate was a floor
        note.update(path="memory", reason=f"{_estimate(memory)} fit in {_allowed(allowed)}")
    else:
        images, streamed = _streamed(cfg, kind, arg, images if images is not None else loaded, shape, allowed,
                                     training)
        reason = (f"{_estimate(memory)} do not fit in {_allowed(allowed)}" if not fits(memory, allowed) else
                  f"the decoded images ({human(decoded)}) exceed {DEVICE_SHARE:.0%} of the GPU's {human(device)}")
        note.update(path="stream", reason=reason, **streamed)
    return images, note


def _shape(images: ImageSet) -> tuple[int, int, int, int]:
    return (len(images), images.channels, *images.image_size)


def _estimate(parts: dict[str, int]) -> str:
    return f"the decoded images and training ({human(sum(parts.values()))})"


def _allowed(allowed: int | None) -> str:
    return "the memory allowed (unknown)" if allowed is None else f"{human(allowed)} allowed"


def announce(note: dict, cfg: Config) -> None:
    """The path's stderr line, where it is news: streamed, or held in memory though the run named a
    store or a memory cap. The default path (held, nothing asked) is recorded in metrics.json only,
    as resolution.py says only the automatic choices that change a run: a line on every fit would
    precede every later error's one line."""
    if note["path"] == "stream" or cfg.data.store or os.environ.get(MEMORY_ENV):
        print(f"deepclust: {describe(note)}", file=sys.stderr)


def describe(note: dict) -> str:
    """The stderr line of the data path taken, and why."""
    if note["path"] == "memory":
        return f"images held in memory: {note['reason']}"
    done = f"written in {note['write_seconds']:.1f} s" if note["store_written"] else "reused"
    return f"images streamed from the store {note['store']} ({done}): {note['reason']}"


def inference_images(cfg: Config, spec: str | None = None) -> ImageSet:
    """The images a finished run's command reads (evaluate, predict, the report, ``Clusterer.predict``
    on a data spec): ``cfg.data``'s, or ``spec``'s with the run's split and resize, by the same rule
    as a fit (:func:`open_data`): held where a run of them would fit, else streamed from a store (the
    run's own for the run's data; another spec's default store, never the run's)."""
    if spec is not None and spec != cfg.data.spec:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spec=spec, store=None))
    images, note = open_data(cfg, training=False)
    announce(note, cfg)
    return images


def _streamed(cfg: Config, kind: str, arg: str, loaded: ImageSet | None, shape, allowed,
              training: bool = True) -> tuple[ImageSet, dict]:
    """The run's images read from its store (written first when absent), after the checks that
    streaming can run at all."""
    n, parts = shape[0], training_parts(cfg, *shape, streamed=True)
    if cfg.data.resize and not fits(parts, allowed):  # a resize too large for anything: said as before streaming
        check_resized(n, shape[1], cfg.data.resize, allowed)
    check_fits(f"training on {n} image(s) of {shape[1]}x{shape[2]}x{shape[3]}, streamed from a store,", parts,
               "even streamed, the bank, the kNN structures and the batches must fit: use fewer or smaller "
               "images, a smaller --batch-size or --dim, or allow more memory (DEEPCLUST_MEMORY)", allowed)
    for cls in (method_class(cfg.method), stage_class(cfg.cluster.head)) if training else ():
        if cls is not None and cls.reads_images:
            raise DataError(f"{cls.name} reads every image's pixels at once (its initial clusters) and the "
                            f"{n} images do not fit in {_allowed(allowed)}; use fewer or smaller images (--resize)")
    data = cfg.data
    files = listing(kind, arg) if kind != "array" else array_listing(loaded)
    fp = fingerprint(kind, arg, data.spec, data.split.lower(), data.resize) if kind != "array" \
        else {"spec": f"array:{files[0][2][:16]}", "split": "all", "resize": None}  # a store per array
    directory = Path(data.store).expanduser() if data.store else default_store(data.root, fp)
    t0, written = time.perf_counter(), False
    if not is_store(directory):
        _check_empty(directory)
        source = array_input(loaded, fp, files) if loaded is not None else \
            (folder_input if kind == "folder" else npz_input)(arg, data.spec, data.resize, fp, files)
        written = write_store(directory, source)
    store = open_store(directory, fingerprint=fp, files=files)
    fields = store.fields()
    images = ImageSet(StoredImages(store), fields["labels"], fields["split"], fields["names"], fields["classes"],
                      data.spec if kind != "array" else loaded.spec, skipped=fields["skipped"])
    images = select_split(finalise(images), data.split.lower() if kind in ("npz", "folder") else "all")
    return images, {"store": str(directory), "store_written": written,
                    "write_seconds": round(time.perf_counter() - t0, 3) if written else None}


def _check_empty(directory: Path) -> None:
    """A store is written only where nothing of the user's would be mixed with it."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DataError(f"--store {directory} is not an image store and not empty; give a new or empty directory")


def default_store(root: str, fp: dict) -> Path:
    """``ROOT/stores/NAME-HASH``: NAME from the spec, HASH of its fingerprint's spec, split and resize."""
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(fp["spec"].split(":", 1)[-1].split(",")[0]).stem or "data")
    return Path(root).expanduser() / "stores" / f"{name[:40]}-{key}"
