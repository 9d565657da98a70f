"""Timing a run on this machine for the time budget (``budget.py``): the real ``train.Trainer``,
built as the run builds it, driven through its public steps (``start``, ``begin``, ``step``,
``discover``, ``final``, ``checkpoint_state``) one at a time, with nothing written and the global
RNG states restored afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import Config, validate
from .data import ImageSet
from .heads import AssignmentMap, OwnClusters
from .scoring import compute_metrics
from .train import Trainer, Training, extract_features, make_fabric, preserved_rng

FINISH_SAMPLE = 1000  # images per timing of the cluster head and metrics (then twice as many)
# images of an untimed first finish: first-call costs (numba compiling the agglomeration on a fresh
# install, imports) are paid once in a process, here, and not again by the run
FINISH_WARMUP = 500


class TrainingProbe:
    """A :class:`train.Trainer`'s training steps, discoveries and final passes, timed one at a time:
    the trainer is started as for a fresh run, and each of its methods (``place``: 0 the configured
    one, then those after it) is begun when first timed, in the run's order. The steps of an epoch
    are its batches in order, drawn at its first step and again after each discovery of that method
    (they may need its structure: DeepCluster samples over its pseudo-labels); a discovery runs as
    the loop runs it, with the label diagnostics it logs.
    Training changes the global RNG states: measure inside :func:`train.preserved_rng`."""

    def __init__(self, trainer: Trainer, clock: Callable[[], float] = time.perf_counter):
        self.trainer, self.clock = trainer, clock
        trainer.start(resume=False)
        self.begun: dict[int, Training] = {}
        self.steps: dict[int, int] = {}  # place -> steps taken
        self.batch_cache: dict[tuple[int, int], list[Tensor]] = {}  # (place, epoch) -> its batches
        self.training(0)

    def training(self, place: int) -> Training:
        """The run's method at ``place``, set up to train (once)."""
        if place not in self.begun:
            self.begun[place] = self.trainer.begin(place)
        return self.begun[place]

    def batches(self, epoch: int, place: int = 0) -> list[Tensor]:
        """The batches of epoch ``epoch`` of the method at ``place`` (drawn once per structure)."""
        if (place, epoch) not in self.batch_cache:
            cfg = self.trainer.cfg
            method = self.trainer.methods[place]
            self.batch_cache[place, epoch] = method.batches(epoch, self.trainer.n, cfg.optim.batch_size,
                                                            cfg.train.seed)
        return self.batch_cache[place, epoch]

    def _timed(self, work) -> float:
        """Seconds of ``work()`` on this clock, the device synchronised before the reading."""
        t = self.clock()
        work()
        if self.trainer.fabric.device.type == "cuda":
            torch.cuda.synchronize()
        return self.clock() - t

    def time_step(self, epoch: int = 0, place: int = 0) -> tuple[int, float]:
        """(images, seconds) of the next training step of ``epoch`` of the method at ``place`` (its
        views and loss, with the structure it holds): forward, loss, backward, optimiser step and
        the method's ``after_step`` (the bank update)."""
        t, step = self.training(place), self.steps.get(place, 0)
        batches = self.batches(epoch, place)
        gidx = batches[step % len(batches)]
        seconds = self._timed(lambda: self.trainer.step(t, epoch, step, gidx))
        self.steps[place] = step + 1
        return len(gidx), seconds

    def time_discovery(self, epoch: int, place: int = 0) -> float:
        """Seconds of the discovery of ``epoch`` of the method at ``place`` on the current state."""
        t = self.training(place)
        for key in [k for k in self.batch_cache if k[0] == place]:  # a new structure: batches drawn again
            del self.batch_cache[key]
        return self._timed(lambda: self.trainer.discover(t, epoch))

    def time_final(self, epoch: int, place: int) -> float:
        """Seconds of the final passes and clusters of the method at ``place`` after ``epoch``."""
        return self._timed(lambda: self.trainer.final(self.training(place).method, epoch))

    def checkpoint_seconds(self) -> float:
        """Seconds to serialise an epoch's checkpoint, in memory."""
        return self._timed(lambda: torch.save(self.trainer.checkpoint_state(0, []), io.BytesIO()))


def extrapolate_seconds(points: list[tuple[int, float]], n: int) -> float:
    """Seconds at size ``n`` from timings at one or two smaller sizes [(size, seconds), ...]: the
    largest one scaled by (n / size) ** p, p the growth between the two sizes clipped to [1, 2]
    (k-means grows linearly, the exact kNN graphs of the spectral head and of the kNN accuracy
    quadratically), 2 when one timing is too small to tell, 1 with one size."""
    (m2, t2) = points[-1]
    if n <= m2:
        return t2
    p = 1.0
    if len(points) > 1:
        m1, t1 = points[0]
        p = math.log(t2 / t1) / math.log(m2 / m1) if t1 > 0 and t2 > 0 and m2 > m1 else 2.0
    return t2 * (n / m2) ** min(max(p, 1.0), 2.0)


class TrainerCalibration:
    """The measurements a budget's plan asks for (``budget.Probes``), on the real trainer of one
    candidate backbone at a time (the live one): :meth:`measure` (training images per second of
    epoch 0), :meth:`discovery` (the :class:`budget.Costs` fields of the structure discoveries),
    :meth:`stages` (seconds of the methods trained after the configured one) and :meth:`finish`
    (seconds of what follows training).

    One process, one device (as ``make_fabric`` picks for ``train.accelerator``), the configured
    views, methods, batch size, precision and threads. ``evaluated``: the images the run clusters
    and scores afterwards (all loaded images; default the training images, with ``labels``).
    """

    def __init__(self, cfg: Config, images: np.ndarray, view_spec, *, labels: np.ndarray | None = None,
                 evaluated: ImageSet | None = None, probe_epochs: int = 1, min_seconds: float = 1.5,
                 max_steps: int = 4, clock: Callable[[], float] = time.perf_counter):
        self.cfg, self.images, self.view_spec, self.labels = cfg, images, view_spec, labels
        self.evaluated = evaluated if evaluated is not None else ImageSet(images=images, labels=labels)
        self.probe_epochs = max(1, int(probe_epochs))
        self.min_seconds, self.max_steps, self.clock = min_seconds, max_steps, clock
        self.discovery_at_start: set[str] = set()  # candidates whose steps needed a discovery first
        self.live: tuple[str, TrainingProbe] | None = None

    def _config(self, backbone: str) -> Config:
        train = dataclasses.replace(self.cfg.train, epochs=self.probe_epochs, devices=1, num_nodes=1,
                                    checkpoint=False, progress=False)
        return validate(dataclasses.replace(self.cfg, net=dataclasses.replace(self.cfg.net, backbone=backbone),
                                            train=train))

    def measure(self, backbone: str, need: float | None = None) -> float:
        """Training images per second of epoch 0 with ``backbone`` (it becomes the live candidate):
        one untimed warm-up step, then steps until ``min_seconds`` or ``max_steps``, their median,
        with each epoch's checkpoint spread over the epoch. ``need``: the rate that would reach the
        plan's minimum; a candidate clearly below it is not timed further."""
        self.close()
        try:
            with preserved_rng():
                cfg = self._config(backbone)
                trainer = Trainer(cfg, self.images, Path("deepclust-calibration-never-written"),
                                  fabric=make_fabric(cfg.train), labels=self.labels, view_spec=self.view_spec)
                probe = TrainingProbe(trainer, clock=self.clock)
                self.live = (backbone, probe)
                if trainer.method.needs_discovery(0):  # the steps need the structure (DeepCluster)
                    probe.time_discovery(0)  # untimed here: its first-call costs; discovery() times it again
                    self.discovery_at_start.add(backbone)
                return self._images_per_second(probe, trainer.fabric.device.type == "cpu", need)
        except Exception:
            self.close()
            raise

    def _images_per_second(self, probe: TrainingProbe, cpu: bool, need: float | None, epoch: int = 0) -> float:
        images, seconds = probe.time_step(epoch)  # warm-up: first-call costs, not timed
        warm = images / max(seconds, 1e-9)
        if need is not None and cpu and warm < need / 4:
            return warm  # even allowing the first call 4x its steady cost, far too slow (CPU only:
            # a GPU's first step can be 100x its steady cost)
        rates, elapsed = [], 0.0
        while True:
            images, seconds = probe.time_step(epoch)
            rates.append(images / max(seconds, 1e-9))
            elapsed += seconds
            if need is not None and rates[-1] < need / 2:
                break  # clearly too slow: the estimate is good enough to reject it
            if elapsed >= self.min_seconds or len(rates) >= self.max_steps:
                break
        ips = float(np.median(rates))  # one step still paying first-call costs does not set it
        if self.cfg.train.checkpoint:  # each epoch ends with a checkpoint: its serialisation, per epoch
            n = len(self.images)
            probe.checkpoint_seconds()  # the first one grows its buffers: timed again
            ips = n / (n / ips + probe.checkpoint_seconds())
        return ips

    def _live_probe(self, backbone: str) -> TrainingProbe | None:
        return self.live[1] if self.live is not None and self.live[0] == backbone else None

    def discovery(self, backbone: str) -> dict[str, float]:
        """The discovery costs of the live candidate (empty for another, or without discoveries): a
        discovery (the one before epoch 0 when the method needs it there, else the first later one
        of the probe schedule, on the state the timed steps left) timed after a first one that paid
        the first-call costs (imports, allocations, numba compiling), which the run, in this process,
        does not pay again; after a later first one, the steps with that structure too (they may
        differ from epoch 0's: PAD's second views)."""
        probe = self._live_probe(backbone)
        if probe is None:
            return {}
        method = probe.trainer.method
        out: dict[str, float] = {}
        with preserved_rng():
            if backbone in self.discovery_at_start:  # its first call was made before the steps
                epoch = 0
            else:
                epoch = next((e for e in range(1, method.total_epochs()) if method.needs_discovery(e)), None)
                if epoch is None:
                    return {}
                probe.time_discovery(epoch)  # the first: first-call costs, not counted
                out["steady_images_per_second"] = self._images_per_second(probe, False, None, epoch)
            out["discovery_seconds"] = probe.time_discovery(epoch)
        return out

    def stages(self, backbone: str) -> float:
        """Seconds of the methods trained after the configured one (a learned cluster head), for the
        live candidate (0 without any): each one's discoveries, each of its epochs as its batches at
        the median of a few timed steps (after an untimed one) with an epoch's checkpoint (an epoch
        costs what the first epoch after the latest discovery costs), and its final pass. Their
        lengths do not follow ``train.epochs``: the plan takes their cost before choosing it."""
        probe = self._live_probe(backbone)
        if probe is None:
            return 0.0
        with preserved_rng(), contextlib.redirect_stderr(io.StringIO()):
            return sum(self._method_seconds(probe, place) for place in range(1, len(probe.trainer.methods)))

    def _method_seconds(self, probe: TrainingProbe, place: int) -> float:
        method = probe.training(place).method
        seconds, epoch_seconds = 0.0, None
        for epoch in range(method.total_epochs()):
            if method.needs_discovery(epoch):
                seconds += probe.time_discovery(epoch, place)
                epoch_seconds = None  # a new structure: its epochs timed again
            if epoch_seconds is None:
                epoch_seconds = self._epoch_seconds(probe, epoch, place)
            seconds += epoch_seconds
        return seconds + probe.time_final(method.total_epochs(), place)

    def _epoch_seconds(self, probe: TrainingProbe, epoch: int, place: int) -> float:
        probe.time_step(epoch, place)  # warm-up: first-call costs, not timed
        times: list[float] = []
        while not times or (sum(times) < self.min_seconds and len(times) < self.max_steps):
            times.append(probe.time_step(epoch, place)[1])
        checkpoint = probe.checkpoint_seconds() if self.cfg.train.checkpoint else 0.0
        return len(probe.batches(epoch, place)) * float(np.median(times)) + checkpoint

    def finish(self, backbone: str) -> float:
        """Seconds of what follows training, for the live candidate (0 for another): the full passes
        (each layer the run reads off every evaluated image, and the method's own final passes) at
        the cost per image measured here, plus the cluster head and the metrics (every head and the
        kNN accuracy when there are labels), timed on the network as it is on FINISH_SAMPLE and twice
        as many evaluated images and extrapolated (:func:`extrapolate_seconds`), after an untimed
        first finish on FINISH_WARMUP of them (first-call costs: the run does not pay them again)."""
        probe = self._live_probe(backbone)
        if probe is None:
            return 0.0
        trainer, ev = probe.trainer, self.evaluated
        n = len(ev)
        sizes = (n,) if n <= 2 * FINISH_SAMPLE else (FINISH_SAMPLE, 2 * FINISH_SAMPLE)
        order = np.random.default_rng(0).permutation(n)
        layers = tuple(dict.fromkeys((self.cfg.cluster.features, "backbone")))
        points, pass_seconds = [], 0.0
        with preserved_rng(), contextlib.redirect_stderr(io.StringIO()):  # no collapse warnings
            for m in (min(n, FINISH_WARMUP), *sizes):  # the first, untimed: first-call costs
                sub = ev.subset(np.sort(order[:m]))
                t = self.clock()
                feats = {name: extract_features(trainer.net, trainer.views, sub.images, device=trainer.fabric.device,
                                                layer=name) for name in layers}
                pass_seconds = (self.clock() - t) / (m * len(layers))
                own = self._stand_ins(trainer, feats[layers[0]][0])
                t = self.clock()
                compute_metrics(self.cfg, sub, feats[layers[0]][0], feats[layers[0]][1], own=own,
                                layers={name: f[0] for name, f in feats.items()})
                points.append((m, self.clock() - t))
        passes = len(layers) + len(trainer.method.final_features())
        return pass_seconds * n * passes + extrapolate_seconds(points[1:], n)

    def _stand_ins(self, trainer: Trainer, features: np.ndarray) -> dict[str, OwnClusters]:
        """Stand-ins for the own clusters of the run's methods, which the calibration has not
        trained, by the cluster head that reads them: the configured method's clusters where the
        run's head reads them; each later method's assignment map (random, on ``cluster.features``)."""
        # K not given to a run that trains without it is read off the features after training: a
        # stand-in count here, for the timing only
        k, (first, *later) = self.cfg.cluster.n_clusters or 2, trainer.cluster_heads
        own = {first: OwnClusters(labels=np.arange(len(features)) % k)} if self.cfg.cluster.head == first else {}
        for head in later:
            weights = np.random.default_rng(0).standard_normal((k, features.shape[1])).astype(np.float32)
            own[head] = OwnClusters(map=AssignmentMap(self.cfg.cluster.features, weights, np.zeros(k, np.float32)))
        return own

    def close(self) -> None:
        if self.live is not None:
            self.live = None
            if torch.cuda.is_available():  # hand the candidate's memory back before the next one
                gc.collect()
                torch.cuda.empty_cache()
