"""Limits a machine can meet, checked before anything is allocated.

A request that cannot fit (``--resize 100000`` on 30 images asks for about a terabyte) is refused in
one line naming the estimate and the memory available, instead of being killed by the kernel's
out-of-memory killer hours or gigabytes later. The estimates are pure functions of sizes (bytes);
:func:`check_fits` is the one comparison: a request is refused when its estimate exceeds
:data:`MARGIN` of the memory available (``MemAvailable`` of ``/proc/meminfo``, else the free pages
``os.sysconf`` reports; no check where neither is known).

What is estimated (floors of what is really used, never upper bounds):
 - loading with ``resize``: the resized uint8 images twice (one array per image, then the stacked
   array), checked before any image is resized (and, for a folder, before any file is read);
 - training: the images (the array and its tensor), a batch of views as float32, the memory bank
   and the features extracted at the end (N x dim float32 each), a batch's similarities to the whole
   bank (full softmax: logits, probabilities and their gradient) and the kNN structures (N x k
   int64 indices + float32 similarities, k the larger of ``eval.knn_k`` and ``cluster.n_neighbors``)
   and, in the estimates that choose between memory and a store (:func:`training_parts`), the block of
   similarities the exact kNN computes at once (at most 2**26 floats, 268 MB) and a full pass's block
   of images as float32.
   The network's parameters, optimiser state and activations are not estimated.
Everything is held in host memory first, so the check is against host memory.

The memory a run may use is the memory available, or less where :data:`MEMORY_ENV` says so
(:func:`allowed_memory`). Training whose images do not fit it streams them from a store on disk
(``datapath.py``): then the images part is the prefetched batches alone
(:func:`training_bytes` with ``streamed=True``), and what still cannot fit -- the bank, the kNN
structures, the features gathered for discovery -- is refused in one line before anything is written.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError, DataError

MEMORY_ENV = "DEEPCLUST_MEMORY"  # the memory a run may use ("8GB", "500MB", bytes), at most what is available
PREFETCHED = 3  # uint8 batches of a streamed run alive at once: the one trained on, two read ahead
MARGIN = 0.9  # refuse an estimate above this fraction of the available memory (the rest: Python, torch, the OS)
PASS_BLOCK = 512  # images per forward of a full pass (train.PASS_BATCH, extract_features)
KNN_BLOCK = 1 << 26  # float32 similarities of one block of the exact kNN (neighbourhoods.similarity_block_rows)
VIEW_COPIES = 4  # float32 copies of a batch alive at once: views of two kinds, the network input, a scratch


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping, or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def parse_bytes(text: str, where: str = MEMORY_ENV) -> int:
    """``"8GB"``, ``"500 MB"``, ``"1.5G"``, ``"2GiB"`` or a number of bytes (decimal units as :func:`human`
    writes them; ``KiB``.. binary); ConfigError in one line otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)b?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{where}: expected a memory size such as 8GB or 500MB, got {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_kmgtp".index(m.group(2) or "_"))


def allowed_memory() -> int | None:
    """Bytes a run may use: the memory available, capped by :data:`MEMORY_ENV` when it is set."""
    available, cap = available_memory(), os.environ.get(MEMORY_ENV)
    if not cap:
        return available
    cap_bytes = parse_bytes(cap)
    return cap_bytes if available is None else min(cap_bytes, available)


def fits(parts: dict[str, int], available: int | None) -> bool:
    """The one rule: an estimate fits when it is at most MARGIN of the memory available (or that is unknown)."""
    return available is None or sum(parts.values()) <= MARGIN * available


def human(n: float) -> str:
    """Bytes in the largest unit that keeps the number at least 1 (decimal units: 1 GB = 1e9 B)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def resized_bytes(n: int, channels: int, side: int) -> dict[str, int]:
    """Loading ``n`` images resized to ``side`` x ``side``: one uint8 array per image, then stacked."""
    one = n * channels * side * side
    return {"resized images": one, "their stacked copy": one}


def training_bytes(n: int, channels: int, height: int, width: int, *, batch: int, dim: int, full_softmax: bool,
                   knn_k: int, streamed: bool = False, processes: int = 1, blocks: bool = False) -> dict[str, int]:
    """Floors of the memory a training run holds at once, by part (see the module docstring):
    ``processes`` on this machine, each holding its images (the uint8 array and its tensor; streamed:
    PREFETCHED batches), bank and structures; ``blocks``: the exact kNN's block of similarities and a
    full pass's block of images as float32 (its input and the views' copy) too."""
    image = channels * height * width
    batch = min(batch, n)
    held = PREFETCHED * batch * image if streamed else 2 * n * image  # streamed: batches read ahead
    parts = {"images" if not streamed else "prefetched batches": processes * held,
             "a batch of views": VIEW_COPIES * batch * image * 4,  # float32
             "memory bank and features": 2 * n * dim * 4,
             "kNN structures": n * min(knn_k, max(n - 1, 1)) * (8 + 4)}
    if blocks:
        parts["a block of kNN similarities"] = 4 * min(n * n, KNN_BLOCK)
        parts["a block of a full pass"] = 2 * min(n, PASS_BLOCK) * image * 4
    if full_softmax:
        parts["a batch's similarities to the bank"] = 3 * batch * n * 4
    return parts


def check_fits(what: str, parts: dict[str, int], hint: str, available: int | None = None) -> None:
    """The one rule: DataError in one line when the estimate exceeds MARGIN of the available memory."""
    available = available_memory() if available is None else available
    need = sum(parts.values())
    if fits(parts, available):
        return
    biggest = ", ".join(f"{name} {human(b)}" for name, b in sorted(parts.items(), key=lambda kv: -kv[1])[:3])
    raise DataError(f"{what} need about {human(need)} of memory ({biggest}) but {human(available)} is "
                    f"{'allowed (' + MEMORY_ENV + ')' if os.environ.get(MEMORY_ENV) else 'available'}; {hint}")


def check_resized(n: int, channels: int, side: int, available: int | None = None) -> None:
    """Before resizing ``n`` images of ``channels`` channels to ``side`` x ``side``."""
    check_fits(f"{n} image(s) resized to {side}x{side}", resized_bytes(n, channels, side),
               "use a smaller --resize", available)


def check_training(cfg, n: int, channels: int, height: int, width: int, available: int | None = None) -> None:
    """Before training ``cfg`` on ``n`` images of ``channels`` x ``height`` x ``width``."""
    parts = training_bytes(n, channels, height, width, batch=cfg.optim.batch_size, dim=cfg.net.dim,
                           full_softmax=cfg.memory.nce_k == 0,
                           knn_k=max(cfg.eval.knn_k, cfg.cluster.n_neighbors))
    check_fits(f"training on {n} image(s) of {channels}x{height}x{width}", parts,
               "use fewer or smaller images (--resize) or a smaller --batch-size", available)


def training_parts(cfg, n: int, channels: int, height: int, width: int, *, streamed: bool) -> dict[str, int]:
    """:func:`training_bytes` of ``cfg`` on ``n`` images, for every process ``cfg`` starts on this machine."""
    return training_bytes(n, channels, height, width, batch=cfg.optim.batch_size, dim=cfg.net.dim,
                          full_softmax=cfg.memory.nce_k == 0, knn_k=max(cfg.eval.knn_k, cfg.cluster.n_neighbors),
                          streamed=streamed, processes=cfg.train.devices, blocks=True)
