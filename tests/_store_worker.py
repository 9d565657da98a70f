"""Worker processes for ``tests/test_store.py``, run as

    python tests/_store_worker.py rss  SPEC_JSON   # prints {"growth": bytes, "anon": bytes, "path": ...} last
    python tests/_store_worker.py kill SPEC_JSON   # dies by SIGKILL in the middle of a streamed epoch
    python tests/_store_worker.py write SPEC_JSON  # dies by SIGKILL while writing a store

rss: a warm-up run of the same configuration on ``warm`` (the libraries loaded, numba compiled, the
allocator's pools grown for the network and a batch of this image size), then the peak resident
memory reset (``/proc/self/clear_refs``: 5 resets VmHWM; ``ru_maxrss`` cannot be reset) and the
measured run: ``growth`` is VmHWM after it less VmRSS before it (the store's file pages included),
``anon`` the sampled peak of RssAnon during it less RssAnon before it.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class _AnonPeak:
    """The peak of ``RssAnon`` (the process's own memory, without the store's file pages that the
    kernel may reclaim at will) sampled every millisecond by a thread: the images a run holds stay
    for the whole run, so a sampled peak cannot miss them."""

    def __init__(self) -> None:
        import threading
        self.peak, self.done = _status("RssAnon"), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _status("RssAnon"))

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.peak


def rss(spec: dict) -> None:
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    fit_run(build_config(spec["warm"]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, anon = _status("VmRSS"), _status("RssAnon")
    sampler = _AnonPeak()
    metrics = fit_run(build_config(spec["layer"]))
    print(json.dumps({"growth": _status("VmHWM") - base, "anon": sampler.stop() - anon,
                      "path": metrics["resolution"]["data"]["path"]}))


def kill(spec: dict) -> None:
    """SIGKILL at step ``kill_step`` of epoch ``kill_epoch``, with batches read ahead in flight."""
    from deepclust import train
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    original = train.Trainer.step

    def step_or_die(self, t, epoch, step, gidx, batch=None):
        if epoch == spec["kill_epoch"] and step == spec["kill_step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, t, epoch, step, gidx, batch)

    train.Trainer.step = step_or_die
    fit_run(build_config(spec["layer"]))


def write(spec: dict) -> None:
    """SIGKILL after the store's first shard is written."""
    from deepclust.data import store
    from deepclust.data.streams import npz_input

    shards = []
    original = store.atomic_write

    def write_or_die(path, fn):
        original(path, fn)
        shards.append(path)
        if len(shards) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    store.atomic_write = write_or_die
    fp = {"spec": f"npz:{spec['npz']}", "split": "all", "resize": None}
    store.write_store(spec["store"], npz_input(spec["npz"], spec["npz"], None, fp, None), shard_bytes=spec["shard"])


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    {"rss": rss, "kill": kill, "write": write}[sys.argv[1]](json.loads(sys.argv[2]))
