"""The images a run trains on, as the trainer indexes them: held in memory (the whole set as one
uint8 tensor on the device, the path every run took before stores) or streamed from a store on disk
(``data/store.py``), read batch by batch ahead of the step that needs it.

Both give the same uint8 rows for the same indices, so a run is the same bit for bit on either
(``tests/test_store.py``); augmentation stays on the device. The trainer asks for

 - ``rows(idx)``: the images at ``idx`` (a CPU or device index tensor) on the device, now;
 - ``reader(blocks)``: the images of each index tensor of ``blocks`` in turn. Streamed, a background
   thread reads :data:`AHEAD` blocks ahead (a store read: one sorted fancy index per shard, page
   faults included, and the copy to the device), so the device waits only when reading is slower
   than the step; held in memory, each block is indexed when it is asked for.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .data.store import StoredImages

AHEAD = 2  # blocks read ahead of the one in use (limits.PREFETCHED counts all three)


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N,H,W) or (N,H,W,3) -> uint8 tensor (N,C,H,W)."""
    t = torch.from_numpy(np.ascontiguousarray(images))
    if t.ndim == 3:
        return t[:, None]
    return t.permute(0, 3, 1, 2).contiguous()


class MemoryImages:
    """The whole set as one uint8 tensor (N, C, H, W): on the CPU, then on the device (:meth:`to`)."""

    streamed = False

    def __init__(self, images: np.ndarray):
        self.cpu = images_to_tensor(images)
        self.data = self.cpu
        self.shape = tuple(self.cpu.shape)

    def to(self, device: torch.device) -> None:
        self.data = self.cpu.to(device)

    @property
    def tensor(self) -> Tensor:
        """Every image, dataset order (``DiscoveryContext.images``)."""
        return self.data

    def rows(self, idx: Tensor) -> Tensor:
        return self.data[idx.to(self.data.device)]

    def reader(self, blocks: list[Tensor]) -> Iterator[Tensor]:
        return (self.rows(b) for b in blocks)


class StreamedImages:
    """A store's images, read by index on demand (:class:`~deepclust.data.store.StoredImages`)."""

    streamed = True
    tensor = None  # never held whole: a method that reads every image is refused with a store (datapath.py)

    def __init__(self, images: StoredImages):
        self.images = images
        c, h, w = images.store.shape
        self.shape = (len(images), c, h, w)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        self.device = device

    def rows(self, idx: Tensor) -> Tensor:
        x = torch.from_numpy(self.images.nchw(idx.cpu().numpy()))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def reader(self, blocks: list[Tensor]) -> Iterator[Tensor]:
        return Prefetched(self.rows, blocks)


class Prefetched:
    """``read(block)`` of every block in order, computed by a background thread up to AHEAD blocks
    ahead; an exception in the thread is raised where its block is asked for. A daemon thread: a
    killed or failed run never waits for it."""

    def __init__(self, read: Callable[[Tensor], Tensor], blocks: list[Tensor], ahead: int = AHEAD):
        self.read, self.blocks, self.left = read, list(blocks), len(blocks)
        self.queue: queue.Queue = queue.Queue(maxsize=ahead)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="deepclust-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for block in self.blocks:
                item = (True, self.read(block))
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as e:  # handed to the consumer
            self.queue.put((False, e))

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self) -> Tensor:
        if not self.left:
            self.close()
            raise StopIteration
        ok, value = self.queue.get()
        if not ok:
            self.close()
            raise value
        self.left -= 1
        return value

    def close(self) -> None:
        self.stopped.set()


def image_source(images) -> MemoryImages | StreamedImages:
    """The trainer's view of ``images``: a numpy array held in memory, or a store's images."""
    return StreamedImages(images) if isinstance(images, StoredImages) else MemoryImages(images)
