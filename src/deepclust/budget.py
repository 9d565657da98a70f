"""A time budget instead of a fixed epoch count: ``train.budget`` ("10m", "90s", "1h30m").

When the configuration gives no ``train.epochs`` (None, the default), ``resolution.resolve`` chooses the
number of epochs -- and, for ``net.backbone: auto``, the backbone -- so that training fits the
budget on the machine at hand (:func:`fit_to_budget`):

1. **Measure.** For each candidate backbone, in order of capacity (:data:`CANDIDATES`: ResNet-18,
   AlexNet, JULE's CNN), build the real ``train.Trainer`` on these images with the resolved views,
   method, memory bank and optimiser, and time a few of its training steps (:class:`TrainerCalibration`:
   one untimed warm-up step, then steps until 1.5 s or 4 steps have passed; a candidate that is
   clearly too slow -- under half the throughput it needs after one timed step, or on a CPU under a
   quarter after the warm-up step -- is not timed further). The figure is training images per
   second, each image with all its views and the method's loss, backward, optimiser step and
   bank update, and each epoch's checkpoint (its serialisation, timed in memory) spread over the
   epoch. A method whose schedule has structure discovery (AND's rounds, DeepCluster's
   k-means, PAD's SCS search, PCP's clustering) has one discovery timed too -- with the label
   diagnostics the loop logs after it when the data has labels -- and its cost is counted once
   per discovery of the schedule.
2. **Plan** (:func:`plan_budget`, pure, with the measurement injected). With R = ``RESERVE`` x the
   budget left after the measurements, a candidate gets the largest epochs-per-unit E (``train.epochs``:
   per round for AND / PCP) whose estimated time ``total_epochs(E) x N / throughput +
   discoveries(E) x discovery seconds`` fits R, capped at ``MAX_EPOCHS_PER_UNIT``. The first
   (most capable) candidate whose total reaches ``MIN_EPOCHS`` is chosen; if none does, the one with
   the most epochs (at least one per unit, with a warning when that overruns the budget).
   ``total_epochs`` and the discovery count come from the method's own hooks
   (``Method.epochs_of`` / ``discovers_at``, :func:`method_schedule`), so rounds are handled
   for every method: AND trains round 0 plus ``options.rounds`` rounds of E epochs, PCP
   ``options.rounds`` x E.
3. **Record.** ``train.epochs``, ``net.backbone`` and ``train.budget`` are written into the resolved
   configuration (``config.yaml``: resuming or re-running it trains the same schedule, no
   re-measurement); the measurements (images/s and discovery seconds per candidate, the estimate,
   the calibration's own seconds) are returned for the run's log.

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
   round; the default learning-rate milestones 80/120/160 are made for it). A budget never buys more.
 - ``RESERVE = 0.9``: the time the measurement does not see -- the spread of step times on a shared
   machine, first-epoch costs, discoveries that cost more later in training (PCP's k-means) --
   comes out of the remaining tenth. The budget covers calibration and training; the cluster head
   and metrics afterwards (0.3-3% of training time in the README's table) come on top.
 - Several processes (``train.devices`` x ``num_nodes`` > 1): each process would measure on its own
   and could choose differently, so a budget is refused there (give ``--epochs``), and with neither
   epochs nor budget the former fixed default, ``FALLBACK_EPOCHS = 15``, is used.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import Config, TrainConfig, validate
from .durations import format_seconds, parse_budget  # noqa: F401  (re-exported)
from .errors import ConfigError
from .methods import method_class
from .train import Trainer, TrainingProbe, make_fabric, preserved_rng

__all__ = ["CANDIDATES", "DEFAULT_BUDGET", "MIN_EPOCHS", "MAX_EPOCHS_PER_UNIT", "RESERVE", "FALLBACK_EPOCHS",
           "parse_budget", "format_seconds", "epochs_for_budget", "method_schedule", "plan_budget",
           "TrainerCalibration", "fit_to_budget", "unused_budget_note", "describe"]

CANDIDATES: tuple[str, ...] = ("resnet18", "alexnet", "jule_cnn")  # most capable first
DEFAULT_BUDGET = "10m"
MIN_EPOCHS = 20
MAX_EPOCHS_PER_UNIT = 200
RESERVE = 0.9
FALLBACK_EPOCHS = 15

Schedule = Callable[[int], tuple[int, int]]  # epochs per unit -> (total epochs, discoveries)

# ----------------------------------------------------------------------------------------------
# Planning (pure: the measurements are injected)


def epochs_for_budget(seconds: float, n_images: int, images_per_second: float, schedule: Schedule,
                      discovery_seconds: float = 0.0, max_per_unit: int = MAX_EPOCHS_PER_UNIT) -> int:
    """The largest epochs-per-unit E in [0, max_per_unit] whose estimated training time
    ``total(E) * n_images / images_per_second + discoveries(E) * discovery_seconds`` fits in
    ``seconds`` (0 when not even one epoch per unit does). ``schedule(E) -> (total, discoveries)``
    (:func:`method_schedule`): the method's rounds are in it, so this is the per-method hook."""
    if images_per_second <= 0 or seconds <= 0:
        return 0
    lo, hi = 0, int(max_per_unit)
    if estimate_seconds(hi, n_images, images_per_second, schedule, discovery_seconds) <= seconds:
        return hi
    while hi - lo > 1:  # invariant: lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        if estimate_seconds(mid, n_images, images_per_second, schedule, discovery_seconds) <= seconds:
            lo = mid
        else:
            hi = mid
    return lo


def estimate_seconds(epochs: int, n_images: int, images_per_second: float, schedule: Schedule,
                     discovery_seconds: float = 0.0) -> float:
    total, discoveries = schedule(int(epochs))
    return total * n_images / images_per_second + discoveries * discovery_seconds


def _smallest_reaching(schedule: Schedule, min_total: int, max_per_unit: int) -> int:
    for e in range(1, max_per_unit + 1):
        if schedule(e)[0] >= min_total:
            return e
    return max_per_unit


def _takes_need(measure: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(measure).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def plan_budget(budget_seconds: float, n_images: int, candidates: tuple[str, ...] | list[str],
                measure: Callable[..., float], schedule: Schedule, *,
                measure_discovery: Callable[[str], float] | None = None, min_epochs: int = MIN_EPOCHS,
                max_per_unit: int = MAX_EPOCHS_PER_UNIT, reserve: float = RESERVE,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Choose (backbone, epochs per unit) for a budget (see the module doc).

    ``measure(backbone)`` or ``measure(backbone, need)`` -> training images per second (``need``:
    the throughput that would reach ``min_epochs``, so a real measurement may stop early on a
    clearly slower candidate); it may raise (ConfigError, RuntimeError, ValueError) for a backbone
    that cannot be built for these images, which is then skipped. ``measure_discovery(backbone)``
    -> seconds of one structure discovery (asked only for a candidate that passes on throughput and
    whose schedule discovers). ``clock`` times the calibration, which counts against the budget.
    Returns the report: ``backbone``, ``epochs`` (per unit), ``total_epochs``, ``estimated_seconds``,
    ``candidates`` (one row per candidate measured), ``calibration_seconds`` and the constants used;
    ``warning`` when nothing fits.
    """
    if not candidates:
        raise ValueError("plan_budget needs at least one candidate backbone")
    start = clock()
    e_min = _smallest_reaching(schedule, min_epochs, max_per_unit)
    total_min = schedule(e_min)[0]
    pass_need = _takes_need(measure)

    def seconds_left() -> float:  # the calibration so far counts against the budget
        return reserve * (budget_seconds - (clock() - start))

    rows: list[dict[str, Any]] = []
    chosen = None
    for name in candidates:
        left = seconds_left()
        need = total_min * n_images / left if left > 0 else math.inf
        measure_one = (lambda b, need=need: measure(b, need)) if pass_need else measure
        rows.append(_measure_candidate(name, measure_one, measure_discovery, seconds_left, n_images,
                                       schedule, min_epochs, max_per_unit))
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
    report = {"budget_seconds": round(float(budget_seconds), 3), "backbone": chosen["backbone"],
              "epochs": int(chosen["epochs"]), "total_epochs": int(chosen["total_epochs"]),
              "estimated_seconds": chosen["estimated_seconds"], "candidates": rows,
              "calibration_seconds": round(clock() - start, 3), "min_epochs": min_epochs,
              "max_epochs_per_unit": max_per_unit, "reserve": reserve}
    if warning:
        report["warning"] = warning
    return report


def _measure_candidate(name: str, measure: Callable[[str], float],
                       measure_discovery: Callable[[str], float] | None, seconds_left: Callable[[], float],
                       n_images: int, schedule: Schedule, min_epochs: int, max_per_unit: int) -> dict[str, Any]:
    """One candidate's row of the plan: its throughput, the epochs that fit what is left of the budget
    (less one discovery's seconds when its schedule discovers), or the error that ruled it out."""
    row: dict[str, Any] = {"backbone": name}
    try:
        ips = float(measure(name))
    except (ConfigError, RuntimeError, ValueError) as e:
        row["error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return row
    row["images_per_second"] = round(ips, 2)
    disc = 0.0
    e = epochs_for_budget(seconds_left(), n_images, ips, schedule, 0.0, max_per_unit)
    if schedule(e)[0] >= min_epochs and measure_discovery is not None and schedule(e)[1] > 0:
        disc = float(measure_discovery(name))
        row["discovery_seconds"] = round(disc, 3)
        e = epochs_for_budget(seconds_left(), n_images, ips, schedule, disc, max_per_unit)
    total, discoveries = schedule(e)
    row.update(epochs=e, total_epochs=total, discoveries=discoveries,
               estimated_seconds=round(estimate_seconds(e, n_images, ips, schedule, disc), 1) if e > 0 else None)
    return row


def _best_short_of_budget(measured: list[dict[str, Any]], budget_seconds: float, n_images: int,
                          schedule: Schedule, min_epochs: int) -> tuple[dict[str, Any], str]:
    """No candidate reaches ``min_epochs``: the one that gets most epochs (at least one), and why."""
    chosen = max(measured, key=lambda r: (r["total_epochs"], r["images_per_second"]))
    if chosen["epochs"] >= 1:
        return chosen, (f"no candidate reaches {min_epochs} epochs within {format_seconds(budget_seconds)}; "
                        f"{chosen['backbone']} gets {chosen['total_epochs']}")
    ips = chosen["images_per_second"]
    chosen = dict(chosen, epochs=1, total_epochs=schedule(1)[0], discoveries=schedule(1)[1],
                  estimated_seconds=round(estimate_seconds(1, n_images, ips, schedule,
                                                           chosen.get("discovery_seconds", 0.0)), 1))
    return chosen, (f"the budget of {format_seconds(budget_seconds)} allows less than one epoch per unit "
                    f"with any candidate; training {chosen['total_epochs']} epoch(s), about "
                    f"{format_seconds(chosen['estimated_seconds'])}")


# ----------------------------------------------------------------------------------------------
# The method's schedule and the real measurement


def _with_epochs(cfg: Config, epochs: int) -> Config:
    return validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=int(epochs))))


def method_schedule(cfg: Config) -> Schedule:
    """``E -> (total epochs, discoveries)`` for ``cfg.method`` with ``train.epochs = E``, asked of the
    method class (``Method.epochs_of`` / ``discovers_at``: the schedule depends only on the
    configuration), so every method's rounds count without a per-method table."""
    cls = method_class(cfg.method)

    def schedule(epochs: int) -> tuple[int, int]:
        run = _with_epochs(cfg, epochs)
        total = int(cls.epochs_of(run))
        return total, sum(1 for e in range(total) if cls.discovers_at(run, e))

    return schedule


class TrainerCalibration:
    """Measurements on the real training step (``train.Trainer`` and its ``TrainingProbe``):
    ``self(backbone, need)`` -> training images per second, ``self.discovery(backbone)`` -> seconds
    of one discovery.

    One process, one device (as ``make_fabric`` picks for ``train.accelerator``), the configured
    views, method, batch size, precision and threads. Nothing is written; the global RNG states
    (torch, numpy, python) are restored afterwards, so the run that follows is unchanged.
    """

    def __init__(self, cfg: Config, images: np.ndarray, view_spec, *, labels: np.ndarray | None = None,
                 probe_epochs: int = 1, min_seconds: float = 1.5, max_steps: int = 4,
                 clock: Callable[[], float] = time.perf_counter):
        self.cfg, self.images, self.view_spec, self.labels = cfg, images, view_spec, labels
        self.probe_epochs = max(1, int(probe_epochs))
        self.min_seconds, self.max_steps, self.clock = min_seconds, max_steps, clock
        self.discovery_at_start: dict[str, float] = {}
        self._live: tuple[str, TrainingProbe] | None = None

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
                self._live = (backbone, probe)
                if trainer.method.needs_discovery(0):  # the steps need the structure (DeepCluster)
                    self.discovery_at_start[backbone] = probe.time_discovery(0)
                return self._images_per_second(probe, trainer.fabric.device.type == "cpu", need)
        except Exception:
            self.close()
            raise

    def _images_per_second(self, probe: TrainingProbe, cpu: bool, need: float | None) -> float:
        images, seconds = probe.time_step()  # warm-up: first-call costs, not timed
        warm = images / max(seconds, 1e-9)
        if need is not None and cpu and warm < need / 4:
            return warm  # even allowing the first call 4x its steady cost, far too slow (CPU only:
            # a GPU's first step can be 100x its steady cost)
        seen, elapsed = 0, 0.0
        while True:
            images, seconds = probe.time_step()
            seen, elapsed = seen + images, max(elapsed + seconds, 1e-9)
            if need is not None and seen / elapsed < need / 2:
                break  # clearly too slow: the estimate is good enough to reject it
            if elapsed >= self.min_seconds or probe.steps > self.max_steps:
                break
        ips = seen / elapsed
        if self.cfg.train.checkpoint:  # each epoch ends with a checkpoint: its serialisation, per epoch
            n = len(self.images)
            ips = n / (n / ips + probe.checkpoint_seconds())
        return ips

    def discovery(self, backbone: str) -> float:
        """Seconds of one structure discovery: the one before epoch 0 when the method needs it there,
        else the first later one of the probe schedule, on the state the timed steps left."""
        if backbone in self.discovery_at_start:
            return self.discovery_at_start[backbone]
        if self._live is None or self._live[0] != backbone:
            return 0.0
        probe = self._live[1]
        method = probe.trainer.method
        later = next((e for e in range(1, method.total_epochs()) if method.needs_discovery(e)), None)
        if later is None:
            return 0.0
        with preserved_rng():
            return probe.time_discovery(later)

    def close(self) -> None:
        if self._live is not None:
            self._live = None
            if torch.cuda.is_available():  # hand the candidate's memory back before the next one
                gc.collect()
                torch.cuda.empty_cache()


def fit_to_budget(cfg, images: np.ndarray, view_spec, *, backbone_auto: bool, labels: np.ndarray | None = None,
                  measure=None, measure_discovery=None, clock: Callable[[], float] = time.perf_counter):
    """(Config with ``train.epochs``, ``net.backbone`` and ``train.budget`` filled in, report) for a
    configuration whose ``train.epochs`` is None (see the module doc). ``images``: the training
    images, uint8 (N, H, W[, 3]); ``view_spec``: the resolved ``views.ViewSpec``; ``labels``: the
    training labels if any -- never used to choose anything, only so that the timed discovery
    includes the label diagnostics the training loop logs after each discovery. ``measure`` /
    ``measure_discovery`` replace the real measurement (tests)."""
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
    seconds = parse_budget(text)
    candidates = CANDIDATES if backbone_auto else (cfg.net.backbone,)
    probe = None
    if measure is None:
        probe = TrainerCalibration(cfg, images, view_spec, labels=labels,
                                   probe_epochs=_smallest_reaching(schedule, MIN_EPOCHS, MAX_EPOCHS_PER_UNIT),
                                   clock=clock)
        measure, measure_discovery = probe, probe.discovery
    try:
        report = plan_budget(seconds, n, candidates, measure, schedule, measure_discovery=measure_discovery,
                             clock=clock)
    finally:
        if probe is not None:
            probe.close()
    report = {"budget": text, "n_images": n, **report}
    train = dataclasses.replace(cfg.train, epochs=report["epochs"], budget=text)
    net = dataclasses.replace(cfg.net, backbone=report["backbone"])
    return validate(dataclasses.replace(cfg, net=net, train=train)), report


def unused_budget_note(train: TrainConfig) -> dict[str, str] | None:
    """A note for the log when ``train.budget`` is set but explicit epochs (a preset's or --epochs) win."""
    if train.budget is None or train.epochs is None:
        return None
    return {"ignored": f"epochs: {train.epochs} as configured (train.budget {train.budget} chooses the "
                       "epochs only when train.epochs is none: --set train.epochs=none)"}


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
            f"{format_seconds(report['estimated_seconds'] or 0)} of training after "
            f"{format_seconds(report['calibration_seconds'])} of calibration")
    return line + (f"; warning: {report['warning']}" if report.get("warning") else "")
