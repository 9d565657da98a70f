"""A time budget instead of a fixed epoch count: ``train.budget`` ("10m", "90s", "1h30m").

When the configuration gives no ``train.epochs`` (None, the default), ``resolution.resolve`` chooses the
number of epochs -- and, for ``net.backbone: auto``, the backbone -- so that training fits the
budget on the machine at hand (:func:`fit_to_budget`):

1. **Measure.** For each candidate backbone (:func:`budget_candidates`: the network ``auto`` gives
   these images without a budget, then the lighter ones of :data:`CANDIDATES`, ResNet-18, AlexNet,
   JULE's CNN, in that order), build the real ``train.Trainer`` on these images with the resolved views,
   method, memory bank and optimiser, and time a few of its training steps (:class:`TrainerCalibration`:
   one untimed warm-up step, then steps until 1.5 s or 4 steps have passed, their median rate, so a
   step still paying first-call costs does not set it; a candidate that is clearly too slow -- under
   half the throughput it needs after one timed step, or on a CPU under a quarter after the warm-up
   step -- is not timed further). The figure is training images per
   second, each image with all its views and the method's loss, backward, optimiser step and
   bank update, and each epoch's checkpoint (its serialisation, timed in memory) spread over the
   epoch. For a candidate that passes on throughput, the rest of the run is measured too
   (:class:`Costs`):
   - a method whose schedule has structure discovery (AND's rounds, DeepCluster's k-means, PAD's
     SCS search, PCP's clustering) has its first discovery timed -- with the label diagnostics the
     loop logs after it when the data has labels -- then, when that discovery comes after epoch 0,
     a few steps with the structure it made (PAD's epoch 0 makes a second view of every image,
     its later epochs only of the isolated ones but add the group terms: the two costs differ,
     and timing epoch 0 alone charged every epoch epoch 0's), then the same discovery again, and every
     discovery of the run is counted at that second timing: the first call's costs (imports,
     allocations, numba compiling PAD's SCS search: 6.4 s against 0.03 s on digits) are paid by the
     calibration, in the run's own process (a budget never calibrates with several processes), so
     the run does not pay them again;
   - the learned clustering phase after the method's epochs (``cluster.head: scan``;
     :meth:`TrainerCalibration.phase`): its neighbour mining, its steps (anchors with their
     neighbours, and self-labelling's two views when configured) and the pass that reads its kept
     head. Its epochs are fixed, so its cost comes off the budget before the method's epochs are
     chosen (before issue 29's fix the plan left it out, and its finish measurement failed);
   - what follows training (:meth:`TrainerCalibration.finish`): the full feature passes at the
     measured cost per image, and the cluster head with the metrics (every head and the kNN
     accuracy when there are labels) timed on 1,000 and 2,000 of the images and extrapolated
     (:func:`extrapolate_seconds`), or timed on all of them for up to 2,000, after an untimed
     first finish on 500 (``FINISH_WARMUP``: first-call costs are paid by the calibration).
   What the run spent before the plan (loading the images, estimating K, choosing the views:
   ``started``, from ``runs.fit_run``; on the command line from the process's start, imports
   included: ``durations.process_started``) and the calibration itself count as spent.
2. **Plan** (:func:`plan_budget`, pure, with the measurements injected). With R = ``RESERVE`` x (the
   budget - the seconds spent so far - the finishing estimate), a candidate gets the largest
   epochs-per-unit E (``train.epochs``: per round for AND / PCP) whose estimated training time
   (:meth:`Costs.training_seconds`: epochs before the first discovery at epoch 0's throughput, the rest
   at the throughput with a structure, each discovery at its warm cost) fits R, capped at
   ``MAX_EPOCHS_PER_UNIT``. The first (most capable) candidate whose total reaches ``MIN_EPOCHS`` is
   chosen; if none does, the one with the most epochs (at least one per unit, with a warning when that
   overruns the budget). ``total_epochs``, the discovery count and the epochs before the first
   discovery come from the method's own hooks (``Method.epochs_of`` / ``discovers_at``,
   :func:`method_schedule`), so rounds are handled for every method: AND trains round 0 plus
   ``options.rounds`` rounds of E epochs, PCP ``options.rounds`` x E.
3. **Record.** ``train.epochs``, ``net.backbone`` and ``train.budget`` are written into the resolved
   configuration (``config.yaml``: resuming or re-running it trains the same schedule, no
   re-measurement; the learning-rate schedule's fractions, ``optim.milestones_frac``, are of that
   length); the measurements (per candidate: images/s, discovery seconds, finishing seconds; the
   estimates of training and of the whole run, the seconds spent before and in calibration) are
   returned for the run's log (``metrics.json``: ``resolution.budget``).

Constants and why:
 - ``DEFAULT_BUDGET = "10m"``: what a newcomer gets with neither epochs nor a preset. The bare
   defaults used to take about 17 minutes for AND on 10k grey images and 90 minutes for ResNet-18 on
   10k colour images on a 2-core CPU. Ten minutes there buy JULE's CNN about 130 epochs on 10k
   28 px grey images (2,440 images/s, the README's throughput figure) but fewer than 20 on 70k, so
   large data wants a larger stated budget (``--budget 60m``). Presets keep their own epochs.
 - ``MIN_EPOCHS = 20`` passes over the data (all rounds together): a memory bank refreshes each row
   once per epoch, so fewer passes leave a bigger network with a bank of stale features; a cheaper
   network trained longer is preferred then.
 - ``MAX_EPOCHS_PER_UNIT = 200``: the papers' schedule (AND, instance discrimination, PCP: 200 per
   round). A budget never buys more.
 - ``RESERVE = 0.9``: the time the measurement does not see -- the spread of step times on a shared
   machine, first-epoch costs, discoveries that cost more later in training (PCP's k-means) --
   comes out of the remaining tenth. The budget covers the whole ``fit`` from its start: loading,
   resolving, calibration, training, and the clusters and metrics afterwards; a plan that fits
   therefore ends between 0.9 and 1.0 of the budget when the model is right (tests/test_budget.py
   checks it against a fake clock; ``benchmarks/budget_plan.py`` records planned against actual).
 - Several processes (``train.devices`` x ``num_nodes`` > 1): each process would measure on its own
   and could choose differently, so a budget is refused there (give ``--epochs``), and with neither
   epochs nor budget the former fixed default, ``FALLBACK_EPOCHS = 15``, is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .config import Config, TrainConfig, validate
from .data import ImageSet
from .durations import format_seconds, parse_budget  # noqa: F401  (re-exported)
from .errors import ConfigError
from .methods import method_class
from .nets import default_backbone
from .scoring import compute_metrics
from .train import Trainer, TrainingProbe, extract_features, make_fabric, preserved_rng

__all__ = ["CANDIDATES", "budget_candidates", "DEFAULT_BUDGET", "MIN_EPOCHS", "MAX_EPOCHS_PER_UNIT", "RESERVE",
           "FALLBACK_EPOCHS", "parse_budget", "format_seconds", "Span", "Costs", "epochs_for_budget", "estimate_seconds",
           "method_schedule", "extrapolate_seconds", "plan_budget", "TrainerCalibration", "fit_to_budget",
           "unused_budget_note", "describe"]

CANDIDATES: tuple[str, ...] = ("resnet18", "alexnet", "jule_cnn")  # most capable first
DEFAULT_BUDGET = "10m"
MIN_EPOCHS = 20
MAX_EPOCHS_PER_UNIT = 200
RESERVE = 0.9
FALLBACK_EPOCHS = 15

# ----------------------------------------------------------------------------------------------
# The model of a run's time, and planning (pure: the measurements are injected)


class Span(NamedTuple):
    """What a run of E epochs per unit trains (:func:`method_schedule`)."""
    total: int  # epochs in all (every round)
    discoveries: int  # structure discoveries
    before: int  # epochs trained before the first discovery (the total when there is none)


Schedule = Callable[[int], Span]  # epochs per unit -> Span


@dataclass(frozen=True)
class Costs:
    """One candidate's measured costs: the model of the time a run takes on this machine.

    ``images_per_second``: training steps before any structure exists (epoch 0's, each epoch's
    checkpoint spread over it); ``steady_images_per_second``: steps once a structure exists (PAD's
    epoch 0 makes a second view of every image, later epochs only of its isolated ones, with group
    terms; None: as epoch 0's); ``discovery_seconds``: each discovery, timed after a first one
    that paid the first-call costs (the calibration runs in the run's process);
    ``finish_seconds``: what follows the training (the full feature passes, the cluster head and
    the metrics); ``phase_seconds``: the learned clustering phase after the method's epochs
    (``cluster.head: scan``), whose epochs are fixed: training time that does not depend on E."""
    images_per_second: float
    discovery_seconds: float = 0.0
    steady_images_per_second: float | None = None
    finish_seconds: float = 0.0
    phase_seconds: float = 0.0

    def training_seconds(self, span: Span, n_images: int) -> float:
        if self.steady_images_per_second:
            steps = (span.before * n_images / self.images_per_second
                     + (span.total - span.before) * n_images / self.steady_images_per_second)
        else:
            steps = span.total * n_images / self.images_per_second
        return steps + self.phase_seconds + max(span.discoveries, 0) * self.discovery_seconds


def _costs(images_per_second: float | Costs, discovery_seconds: float) -> Costs:
    if isinstance(images_per_second, Costs):
        return images_per_second
    return Costs(float(images_per_second), float(discovery_seconds))


def epochs_for_budget(seconds: float, n_images: int, images_per_second: float | Costs, schedule: Schedule,
                      discovery_seconds: float = 0.0, max_per_unit: int = MAX_EPOCHS_PER_UNIT) -> int:
    """The largest epochs-per-unit E in [0, max_per_unit] whose estimated training time
    (:meth:`Costs.training_seconds`; a bare throughput and ``discovery_seconds`` for the simple
    model) fits in ``seconds`` (0 when not even one epoch per unit does). ``schedule(E) -> Span``
    (:func:`method_schedule`): the method's rounds are in it, so this is the per-method hook."""
    costs = _costs(images_per_second, discovery_seconds)
    if costs.images_per_second <= 0 or seconds <= 0:
        return 0
    lo, hi = 0, int(max_per_unit)
    if costs.training_seconds(schedule(hi), n_images) <= seconds:
        return hi
    while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        if costs.training_seconds(schedule(mid), n_images) <= seconds:
            lo = mid
        else:
            hi = mid
    return lo


def estimate_seconds(epochs: int, n_images: int, images_per_second: float | Costs, schedule: Schedule,
                     discovery_seconds: float = 0.0) -> float:
    """Estimated training seconds of ``epochs`` per unit (see :func:`epochs_for_budget`)."""
    return _costs(images_per_second, discovery_seconds).training_seconds(schedule(int(epochs)), n_images)


def _smallest_reaching(schedule: Schedule, min_total: int, max_per_unit: int) -> int:
    for e in range(1, max_per_unit + 1):
        if schedule(e).total >= min_total:
            return e
    return max_per_unit


def _takes_need(measure: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(measure).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


@dataclass(frozen=True)
class Probes:
    """The measurements a plan asks for (see :func:`plan_budget`)."""
    measure: Callable[..., float]
    discovery: Callable[[str], float | dict] | None = None
    finish: Callable[[str], float] | None = None
    phase: Callable[[str], float] | None = None


def plan_budget(budget_seconds: float, n_images: int, candidates: tuple[str, ...] | list[str],
                measure: Callable[..., float], schedule: Schedule, *,
                measure_discovery: Callable[[str], float | dict] | None = None,
                measure_finish: Callable[[str], float] | None = None,
                measure_phase: Callable[[str], float] | None = None, started: float | None = None,
                min_epochs: int = MIN_EPOCHS, max_per_unit: int = MAX_EPOCHS_PER_UNIT, reserve: float = RESERVE,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Choose (backbone, epochs per unit) for a budget (see the module doc).

    ``measure(backbone)`` or ``measure(backbone, need)`` -> training images per second (``need``:
    the throughput that would reach ``min_epochs``, so a real measurement may stop early on a
    clearly slower candidate); it may raise (ConfigError, RuntimeError, ValueError) for a backbone
    that cannot be built for these images, which is then skipped. Asked only of a candidate that
    passes on throughput: ``measure_discovery(backbone)`` -> seconds of each discovery, or a dict of
    :class:`Costs` fields (each discovery, the steps once a structure exists),
    when its schedule discovers; ``measure_finish(backbone)`` -> seconds of what follows training;
    ``measure_phase(backbone)`` -> seconds of the learned clustering phase (part of training).
    ``started``: the ``clock()`` reading when the run began (data loading and the rest of the
    resolution so far count against the budget; None: now). ``clock`` times the calibration, which
    counts too. Returns the report: ``backbone``, ``epochs`` (per unit), ``total_epochs``,
    ``estimated_seconds`` (training), ``finish_seconds``, ``before_seconds``,
    ``calibration_seconds``, ``estimated_total_seconds``, ``candidates`` (one row per candidate
    measured) and the constants used; ``warning`` when nothing fits.
    """
    if not candidates:
        raise ValueError("plan_budget needs at least one candidate backbone")
    start = clock()
    origin = start if started is None else float(started)
    total_min = schedule(_smallest_reaching(schedule, min_epochs, max_per_unit)).total
    probes = Probes(measure, measure_discovery, measure_finish, measure_phase)

    def seconds_left(finish: float = 0.0) -> float:  # for training: what is spent so far counts
        return reserve * (budget_seconds - (clock() - origin) - finish)

    rows: list[dict[str, Any]] = []
    chosen = None
    for name in candidates:
        left = seconds_left()
        need = total_min * n_images / left if left > 0 else math.inf
        rows.append(_measure_candidate(name, probes, need, seconds_left, n_images, schedule, min_epochs, max_per_unit,
                                       last=name == candidates[-1]))
        if rows[-1].get("total_epochs", 0) >= min_epochs:
            chosen = rows[-1]
            break
    measured = [r for r in rows if "images_per_second" in r]
    if not measured:
        raise ConfigError("train.budget: no candidate backbone could be measured on these images: "
                          + "; ".join(f"{r['backbone']}: {r.get('error')}" for r in rows))
    warning = None
    if chosen is None:
        chosen, warning = _best_short_of_budget(measured, budget_seconds, n_images, schedule, min_epochs)
    for r in (*rows, chosen):
        r.pop("costs", None)  # the report holds plain values only (it goes to metrics.json)
    report = {"budget_seconds": round(float(budget_seconds), 3), "backbone": chosen["backbone"],
              "epochs": int(chosen["epochs"]), "total_epochs": int(chosen["total_epochs"]),
              "estimated_seconds": chosen["estimated_seconds"], "finish_seconds": chosen.get("finish_seconds", 0.0),
              "phase_seconds": chosen.get("phase_seconds", 0.0),
              "candidates": rows, "before_seconds": round(start - origin, 3),
              "calibration_seconds": round(clock() - start, 3), "min_epochs": min_epochs,
              "max_epochs_per_unit": max_per_unit, "reserve": reserve}
    report["estimated_total_seconds"] = round(report["before_seconds"] + report["calibration_seconds"]
                                              + (report["estimated_seconds"] or 0) + report["finish_seconds"], 1)
    if warning:
        report["warning"] = warning
    return report


def _measure_candidate(name: str, probes: Probes, need: float, seconds_left: Callable[..., float], n_images: int,
                       schedule: Schedule, min_epochs: int, max_per_unit: int, last: bool = False) -> dict[str, Any]:
    """One candidate's row of the plan: its costs, the epochs that fit what is left of the budget,
    or the error that ruled it out. Discovery and finish are measured for a candidate that reaches
    ``min_epochs`` on its throughput alone, and for the ``last`` (lightest) one, which the run trains
    when none reaches it: without them its plan counted epoch 0's steps for every epoch (PAD's steps
    once a structure exists ran at twice that rate on MNIST-test, and a 140 s plan trained 0.62 of
    its estimate; budget-plan-mnist-test-140s-n2d-half.json as of commit ce5cee3)."""
    row: dict[str, Any] = {"backbone": name}
    try:
        ips = float(probes.measure(name, need) if _takes_need(probes.measure) else probes.measure(name))
    except (ConfigError, RuntimeError, ValueError) as e:
        row["error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return row
    costs = Costs(ips)
    e = epochs_for_budget(seconds_left(), n_images, costs, schedule, max_per_unit=max_per_unit)
    if schedule(e).total >= min_epochs or last:
        if probes.discovery is not None and schedule(max(e, 1)).discoveries > 0:
            costs = dataclasses.replace(costs, **_discovery_costs(probes.discovery(name)))
        if probes.phase is not None:
            costs = dataclasses.replace(costs, phase_seconds=float(probes.phase(name)))
        if probes.finish is not None:
            costs = dataclasses.replace(costs, finish_seconds=float(probes.finish(name)))
        e = epochs_for_budget(seconds_left(costs.finish_seconds), n_images, costs, schedule, max_per_unit=max_per_unit)
    span = schedule(e)
    row.update({k: round(v, 3) for k, v in dataclasses.asdict(costs).items() if v})
    row.update(epochs=e, total_epochs=span.total, discoveries=span.discoveries, costs=costs,
               estimated_seconds=round(costs.training_seconds(span, n_images), 1) if e > 0 else None)
    return row


def _discovery_costs(measured: float | dict) -> dict[str, float]:
    """:class:`Costs` fields from a discovery measurement: one number (every discovery), or a dict."""
    if isinstance(measured, dict):
        fields = {f.name for f in dataclasses.fields(Costs)} - {"images_per_second", "finish_seconds", "phase_seconds"}
        return {k: float(v) for k, v in measured.items() if k in fields and v is not None}
    return {"discovery_seconds": float(measured)}


def _best_short_of_budget(measured: list[dict[str, Any]], budget_seconds: float, n_images: int,
                          schedule: Schedule, min_epochs: int) -> tuple[dict[str, Any], str]:
    """No candidate reaches ``min_epochs``: the one that gets most epochs (at least one), and why."""
    chosen = max(measured, key=lambda r: (r["total_epochs"], r["images_per_second"]))
    if chosen["epochs"] >= 1:
        return chosen, (f"no candidate reaches {min_epochs} epochs within {format_seconds(budget_seconds)}; "
                        f"{chosen['backbone']} gets {chosen['total_epochs']}")
    span = schedule(1)
    chosen = dict(chosen, epochs=1, total_epochs=span.total, discoveries=span.discoveries,
                  estimated_seconds=round(chosen["costs"].training_seconds(span, n_images), 1))
    return chosen, (f"the budget of {format_seconds(budget_seconds)} allows less than one epoch per unit "
                    f"with any candidate; training {chosen['total_epochs']} epoch(s), about "
                    f"{format_seconds(chosen['estimated_seconds'])}")


# ----------------------------------------------------------------------------------------------
# The method's schedule and the real measurement


def _with_epochs(cfg: Config, epochs: int) -> Config:
    return validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=int(epochs))))


def method_schedule(cfg: Config) -> Schedule:
    """``E -> Span(total epochs, discoveries, epochs before the first)`` for ``cfg.method`` with
    ``train.epochs = E``, asked of the method class (``Method.epochs_of`` / ``discovers_at``: the
    schedule depends only on the configuration), so every method's rounds count without a
    per-method table."""
    cls = method_class(cfg.method)

    def schedule(epochs: int) -> Span:
        run = _with_epochs(cfg, epochs)
        total = int(cls.epochs_of(run))
        at = [e for e in range(total) if cls.discovers_at(run, e)]
        return Span(total, len(at), at[0] if at else total)

    return schedule


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


FINISH_SAMPLE = 1000  # images per timing of the cluster head and metrics (then twice as many)
# images of an untimed first finish: first-call costs (numba compiling the agglomeration on a fresh
# install, imports) are paid once in a process, here, and not again by the run. Timed, they made a
# 2-minute digits plan with the SCAN stage expect 16.9 s for a finish that took 0.7 s
# (budget-plan-digits-2m-scan.json at commit fa4e634), 14% of the budget left unused.
FINISH_WARMUP = 500


class TrainerCalibration:
    """Measurements on the real training step (``train.Trainer`` and its ``TrainingProbe``):
    ``self(backbone, need)`` -> training images per second of epoch 0; ``self.discovery(backbone)``
    -> the discovery costs (:class:`Costs` fields: first, later, the steps once a structure exists);
    ``self.finish(backbone)`` -> seconds of what follows training.

    One process, one device (as ``make_fabric`` picks for ``train.accelerator``), the configured
    views, method, batch size, precision and threads. Nothing is written; the global RNG states
    (torch, numpy, python) are restored afterwards, so the run that follows is unchanged.
    ``evaluated``: the images the run clusters and scores afterwards (all loaded images; default
    the training images, with ``labels``).
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

    def __call__(self, backbone: str, need: float | None = None) -> float:
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
        """The discovery costs of the live candidate: a discovery (the one before epoch 0 when the
        method needs it there, else the first later one of the probe schedule, on the state the
        timed steps left) timed after a first one that paid the first-call costs (imports,
        allocations, numba compiling) -- the run, in this process, does not pay them again -- and,
        after a later first one, the steps with that structure (they may differ from epoch 0's:
        PAD's second views)."""
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

    def finish(self, backbone: str) -> float:
        """Seconds of what follows training, for the live candidate: the full passes (each layer
        the run reads off every evaluated image, and the method's own final passes) at the cost per
        image measured here, plus the cluster head and the metrics (every head and the kNN accuracy
        when there are labels), timed on the network as it is on FINISH_SAMPLE and twice as many
        evaluated images and extrapolated (:func:`extrapolate_seconds`), after an untimed first
        finish on FINISH_WARMUP of them (first-call costs: the run does not pay them again)."""
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
                own, learned = self._stand_ins(feats[layers[0]][0])
                t = self.clock()
                compute_metrics(self.cfg, sub, feats[layers[0]][0], feats[layers[0]][1], method_labels=own,
                                phase_map=learned, layers={name: f[0] for name, f in feats.items()})
                points.append((m, self.clock() - t))
        passes = len(layers) + len(trainer.method.final_features())
        return pass_seconds * n * passes + extrapolate_seconds(points[1:], n)

    def _stand_ins(self, features: np.ndarray):
        """Stand-ins for what the run's head reads and the calibration has not trained: the method's
        own clusters (``cluster.head: method``), the phase's kept head (``scan``: a linear map of
        the head's features, as ``heads.linear_head`` reads it)."""
        k, head = self.cfg.cluster.n_clusters, self.cfg.cluster.head
        own = np.arange(len(features)) % k if head == "method" else None
        learned = None
        if head == "scan":
            weights = np.random.default_rng(0).standard_normal((k, features.shape[1])).astype(np.float32)
            learned = (self.cfg.cluster.features, weights, np.zeros(k, np.float32))
        return own, learned

    def phase(self, backbone: str) -> float:
        """Seconds of the learned clustering phase after the method's epochs (``cluster.head:
        scan``, methods/scan.py) for the live candidate, 0 without one: its discoveries (mining the
        neighbours; choosing the head before self-labelling), each of its epochs as its batches at
        the median of a few timed steps (after an untimed one) with an epoch's checkpoint, and the
        pass that reads its kept head. Its epochs are fixed (``scan.epochs`` +
        ``scan.self_label_epochs``): the plan takes its cost before choosing the method's epochs."""
        probe = self._live_probe(backbone)
        if probe is None or probe.trainer.phase is None:
            return 0.0
        s = self.cfg.scan
        with preserved_rng(), contextlib.redirect_stderr(io.StringIO()):
            seconds = probe.time_phase_discovery(0) + s.epochs * self._phase_epoch(probe, 0)
            if s.self_label_epochs:
                seconds += probe.time_phase_discovery(s.epochs)
                seconds += s.self_label_epochs * self._phase_epoch(probe, s.epochs)
            return seconds + probe.time_phase_head(s.epochs + s.self_label_epochs)

    def _phase_epoch(self, probe: TrainingProbe, local: int) -> float:
        probe.time_phase_step(local)  # warm-up: first-call costs, not timed
        times: list[float] = []
        while not times or (sum(times) < self.min_seconds and len(times) < self.max_steps):
            times.append(probe.time_phase_step(local)[1])
        checkpoint = probe.checkpoint_seconds() if self.cfg.train.checkpoint else 0.0
        return len(probe.phase_batches(local)) * float(np.median(times)) + checkpoint

    def close(self) -> None:
        if self.live is not None:
            self.live = None
            if torch.cuda.is_available():  # hand the candidate's memory back before the next one
                gc.collect()
                torch.cuda.empty_cache()


def fit_to_budget(cfg, images: np.ndarray, view_spec, *, backbone_auto: bool, labels: np.ndarray | None = None,
                  evaluated: ImageSet | None = None, started: float | None = None, measure=None,
                  measure_discovery=None, measure_finish=None, measure_phase=None,
                  clock: Callable[[], float] = time.perf_counter):
    """(Config with ``train.epochs``, ``net.backbone`` and ``train.budget`` filled in, report) for a
    configuration whose ``train.epochs`` is None (see the module doc). ``images``: the training
    images, uint8 (N, H, W[, 3]); ``view_spec``: the resolved ``views.ViewSpec``; ``labels``: the
    training labels if any -- never used to choose anything, only so that the timed discovery and
    finish include the label diagnostics and scores the run computes; ``evaluated``: the images
    clustered and scored after training (default: the training images); ``started``: the
    ``clock()`` reading when the run began. ``measure`` / ``measure_discovery`` / ``measure_finish`` /
    ``measure_phase`` replace the real measurement (tests)."""
    world = cfg.train.devices * cfg.train.num_nodes
    if world > 1:
        if cfg.train.budget is not None:
            raise ConfigError("train.budget: the time budget is measured in one process; with several devices "
                              "or nodes give the number of epochs (--epochs)")
        return _with_epochs(cfg, FALLBACK_EPOCHS), {"epochs": FALLBACK_EPOCHS,
                                                    "reason": "several processes: no calibration"}
    n = len(images)
    schedule = method_schedule(cfg)
    text = cfg.train.budget if cfg.train.budget is not None else DEFAULT_BUDGET
    candidates = budget_candidates(images) if backbone_auto else (cfg.net.backbone,)
    probe = None
    if measure is None:
        probe = TrainerCalibration(cfg, images, view_spec, labels=labels, evaluated=evaluated,
                                   probe_epochs=_smallest_reaching(schedule, MIN_EPOCHS, MAX_EPOCHS_PER_UNIT),
                                   clock=clock)
        measure, measure_discovery, measure_finish, measure_phase = probe, probe.discovery, probe.finish, probe.phase
    try:
        report = plan_budget(parse_budget(text), n, candidates, measure, schedule, measure_discovery=measure_discovery,
                             measure_finish=measure_finish, measure_phase=measure_phase, started=started, clock=clock)
    finally:
        if probe is not None:
            probe.close()
    report = {"budget": text, "n_images": n, **report}
    train = dataclasses.replace(cfg.train, epochs=report["epochs"], budget=text)
    net = dataclasses.replace(cfg.net, backbone=report["backbone"])
    return validate(dataclasses.replace(cfg, net=net, train=train)), report


def budget_candidates(images: np.ndarray) -> tuple[str, ...]:
    """The backbones a budget may choose for these images (uint8 (N, H, W[, 3])): the one that
    ``net.backbone: auto`` gives them without a budget (:func:`nets.default_backbone`, the network
    every preset was chosen with on the development data), then the lighter ones of
    :data:`CANDIDATES` when it cannot reach ``MIN_EPOCHS``; never a more capable one. Capacity
    first lost on digits at 2 minutes (issue 29; benchmarks/results/backbone-budget-digits.json, 3
    seeds): ResNet-18 for 8x8 images NMI 0.847 +- 0.046, JULE's CNN 0.889 +- 0.016."""
    shape = ImageSet(images=images)  # its channels / image_size: the rule resolution's auto reads
    first = default_backbone(shape.channels, shape.image_size)
    return CANDIDATES[CANDIDATES.index(first):] if first in CANDIDATES else CANDIDATES


def unused_budget_note(train: TrainConfig) -> dict[str, str] | None:
    """A note for the log when ``train.budget`` is set but explicit epochs (a preset's or --epochs) win."""
    if train.budget is None or train.epochs is None:
        return None
    return {"ignored": f"epochs: {train.epochs} as configured (train.budget {train.budget} chooses the "
                       "epochs only when train.epochs is none: --set train.epochs=none)"}


def _phase_part(report: dict[str, Any]) -> str:
    phase = report.get("phase_seconds") or 0
    return f" ({format_seconds(phase)} of it the clustering phase)" if phase else ""


def describe(report: dict[str, Any]) -> str:
    """One line for the log: what was measured and chosen."""
    if "ignored" in report:
        return report["ignored"]
    if "candidates" not in report:
        return f"epochs {report.get('epochs')} ({report.get('reason', '')})"
    speeds = ", ".join(f"{r['backbone']} {r['images_per_second']:.0f}/s" if "images_per_second" in r
                       else f"{r['backbone']} failed" for r in report["candidates"])
    line = (f"budget {report['budget']}: measured {speeds}; chose {report['backbone']}, "
            f"{report['epochs']} epochs per unit ({report['total_epochs']} in all), about "
            f"{format_seconds(report['estimated_seconds'] or 0)} of training{_phase_part(report)} after "
            f"{format_seconds(report.get('before_seconds', 0))} of start-up, loading and resolving and "
            f"{format_seconds(report['calibration_seconds'])} of calibration, then about "
            f"{format_seconds(report.get('finish_seconds', 0))} for the clusters and metrics")
    return line + (f"; warning: {report['warning']}" if report.get("warning") else "")
