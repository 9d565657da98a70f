"""A time budget instead of a fixed epoch count: ``train.budget`` ("10m", "90s", "1h30m").

When the configuration gives no ``train.epochs``, ``resolution.resolve`` calls :func:`fit_to_budget`:
each candidate backbone (:func:`budget_candidates`) is measured on the real trainer
(``calibration.TrainerCalibration``: the steps, the discoveries, the methods trained after the
configured one, and what follows training), and :func:`plan_budget` chooses the most capable
candidate and the largest epochs per unit (``train.epochs``; per round for AND / PCP) whose
estimated run (:meth:`Costs.training_seconds`) fits the budget left after what was spent so far and
the finish, times ``RESERVE``. The chosen ``train.epochs``, ``net.backbone`` and ``train.budget`` are
written into the resolved configuration, so a resumed or re-run configuration trains the same
schedule without measuring again; the measurements go to the run's metrics (``resolution.budget``).

Constants: ``DEFAULT_BUDGET`` is what a run with neither epochs nor a preset gets; ``MIN_EPOCHS``
passes over the data (a memory bank refreshes each row once an epoch: fewer passes leave a bigger
network with stale features, so a cheaper network trained longer is preferred); a budget never buys
more than ``MAX_EPOCHS_PER_UNIT`` (the papers' 200 a round); ``RESERVE`` leaves a tenth for what the
measurement does not see (the spread of step times, discoveries that cost more later). Several
processes would each measure and could choose differently: a budget is refused there, and with
neither epochs nor budget ``FALLBACK_EPOCHS`` are trained.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from .calibration import TrainerCalibration
from .config import Config, TrainConfig, validate
from .data import ImageSet
from .durations import format_seconds, parse_budget  # noqa: F401  (re-exported)
from .errors import ConfigError
from .nets import default_backbone

__all__ = ["CANDIDATES", "budget_candidates", "DEFAULT_BUDGET", "MIN_EPOCHS", "MAX_EPOCHS_PER_UNIT", "RESERVE",
           "FALLBACK_EPOCHS", "parse_budget", "format_seconds", "Span", "Costs", "Probes", "epochs_for_budget",
           "method_schedule", "plan_budget", "fit_to_budget", "unused_budget_note", "describe"]

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
    checkpoint spread over it); ``steady_images_per_second``: steps once a structure exists (None:
    as epoch 0's); ``discovery_seconds``: each discovery, at a warm timing; ``finish_seconds``: what
    follows the training (the full feature passes, the cluster head and the metrics);
    ``phase_seconds``: the stages, the methods trained after the configured one, whose lengths are
    fixed: training time that does not depend on E (the name the plan's report and the run's metrics
    give it)."""
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


def epochs_for_budget(seconds: float, n_images: int, costs: Costs, schedule: Schedule,
                      max_per_unit: int = MAX_EPOCHS_PER_UNIT) -> int:
    """The largest epochs-per-unit E in [0, max_per_unit] whose estimated training time
    (:meth:`Costs.training_seconds`) fits in ``seconds`` (0 when not even one epoch per unit does).
    ``schedule(E) -> Span`` (:func:`method_schedule`) holds the method's rounds."""
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


def _smallest_reaching(schedule: Schedule, min_total: int, max_per_unit: int) -> int:
    for e in range(1, max_per_unit + 1):
        if schedule(e).total >= min_total:
            return e
    return max_per_unit


@dataclass(frozen=True)
class Probes:
    """The measurements a plan asks of a candidate backbone (``calibration.TrainerCalibration``'s,
    or stand-ins): ``measure(backbone, need)`` -> training images per second of epoch 0 (``need``:
    the rate that would reach the minimum epochs, so a measurement may stop early on a clearly slower
    candidate; it may raise ConfigError, RuntimeError or ValueError for a backbone that cannot be
    built for these images, which is then skipped). Asked only of a candidate that passes on
    throughput (or the last): ``discovery(backbone)`` -> :class:`Costs` fields of its discoveries
    (``discovery_seconds``, ``steady_images_per_second``) when its schedule discovers;
    ``stages(backbone)`` -> seconds of the methods trained after the configured one;
    ``finish(backbone)`` -> seconds of what follows training. None: free."""
    measure: Callable[[str, float], float]
    discovery: Callable[[str], dict[str, float]] | None = None
    stages: Callable[[str], float] | None = None
    finish: Callable[[str], float] | None = None


def plan_budget(budget_seconds: float, n_images: int, candidates: tuple[str, ...] | list[str], probes: Probes,
                schedule: Schedule, *, started: float | None = None, min_epochs: int = MIN_EPOCHS,
                max_per_unit: int = MAX_EPOCHS_PER_UNIT, reserve: float = RESERVE,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Choose (backbone, epochs per unit) for a budget: the first candidate whose epochs reach
    ``min_epochs`` within ``reserve`` x (the budget - the seconds spent since ``started`` - its
    finish), else the one with the most epochs (at least one per unit, with a warning when that
    overruns). ``started``: the ``clock()`` reading when the run began (None: now); the measuring
    counts too. Returns the report: ``backbone``, ``epochs`` (per unit), ``total_epochs``,
    ``estimated_seconds`` (training), ``finish_seconds``, ``phase_seconds`` (the stages),
    ``before_seconds``, ``calibration_seconds``, ``estimated_total_seconds``, ``candidates`` (one row
    per candidate measured) and the constants used; ``warning`` when nothing fits."""
    if not candidates:
        raise ValueError("plan_budget needs at least one candidate backbone")
    start = clock()
    origin = start if started is None else float(started)
    total_min = schedule(_smallest_reaching(schedule, min_epochs, max_per_unit)).total

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
    or the error that ruled it out. Discoveries, later methods and finish are measured for a
    candidate that reaches ``min_epochs`` on its throughput alone, and for the ``last`` (lightest)
    one, which the run trains when none reaches it: its plan then counts its steps once a structure
    exists and its finish, not epoch 0's steps for every epoch."""
    row: dict[str, Any] = {"backbone": name}
    try:
        costs = Costs(float(probes.measure(name, need)))
    except (ConfigError, RuntimeError, ValueError) as e:
        row["error"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        return row
    e = epochs_for_budget(seconds_left(), n_images, costs, schedule, max_per_unit=max_per_unit)
    if schedule(e).total >= min_epochs or last:
        if probes.discovery is not None and schedule(max(e, 1)).discoveries > 0:
            costs = dataclasses.replace(costs, **_discovery_costs(probes.discovery(name)))
        if probes.stages is not None:
            costs = dataclasses.replace(costs, phase_seconds=float(probes.stages(name)))
        if probes.finish is not None:
            costs = dataclasses.replace(costs, finish_seconds=float(probes.finish(name)))
        e = epochs_for_budget(seconds_left(costs.finish_seconds), n_images, costs, schedule, max_per_unit=max_per_unit)
    span = schedule(e)
    row.update({k: round(v, 3) for k, v in dataclasses.asdict(costs).items() if v})
    row.update(epochs=e, total_epochs=span.total, discoveries=span.discoveries, costs=costs,
               estimated_seconds=round(costs.training_seconds(span, n_images), 1) if e > 0 else None)
    return row


def _discovery_costs(measured: dict[str, float]) -> dict[str, float]:
    """The discovery fields of :class:`Costs` a discovery probe gave (``discovery_seconds``,
    ``steady_images_per_second``), as floats."""
    fields = ("discovery_seconds", "steady_images_per_second")
    return {k: float(v) for k, v in measured.items() if k in fields and v is not None}


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
# The method's schedule, and the plan on the real measurement


def _with_epochs(cfg: Config, epochs: int) -> Config:
    return validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=int(epochs))))


def method_schedule(cls: type, cfg: Config) -> Schedule:
    """``E -> Span(total epochs, discoveries, epochs before the first)`` for ``cfg.method`` (its class
    ``cls``, ``methods.method_class``) with ``train.epochs = E``, asked of the class
    (``Method.epochs_of`` / ``discovers_at``: the schedule depends only on the configuration), so
    every method's rounds count without a per-method table."""

    def schedule(epochs: int) -> Span:
        run = _with_epochs(cfg, epochs)
        total = int(cls.epochs_of(run))
        at = [e for e in range(total) if cls.discovers_at(run, e)]
        return Span(total, len(at), at[0] if at else total)

    return schedule


def fit_to_budget(cfg, method: type, images: np.ndarray, view_spec, *, backbone_auto: bool, labels: np.ndarray | None = None,
                  evaluated: ImageSet | None = None, started: float | None = None, probes: Probes | None = None,
                  clock: Callable[[], float] = time.perf_counter):
    """(Config with ``train.epochs``, ``net.backbone`` and ``train.budget`` filled in, report) for a
    configuration whose ``train.epochs`` is None. ``method``: the class of ``cfg.method``; ``images``: the training images, uint8
    (N, H, W[, 3]); ``view_spec``: the resolved ``views.ViewSpec``; ``labels``: the training labels
    if any -- never used to choose anything, only so that the timed discovery and finish include the
    label diagnostics and scores the run computes; ``evaluated``: the images clustered and scored
    after training (default: the training images); ``started``: the ``clock()`` reading when the run
    began. ``probes``: the measurements (default: a :class:`calibration.TrainerCalibration`)."""
    world = cfg.train.devices * cfg.train.num_nodes
    if world > 1:
        if cfg.train.budget is not None:
            raise ConfigError("train.budget: the time budget is measured in one process; with several devices "
                              "or nodes give the number of epochs (--epochs)")
        return _with_epochs(cfg, FALLBACK_EPOCHS), {"epochs": FALLBACK_EPOCHS,
                                                    "reason": "several processes: no calibration"}
    n = len(images)
    schedule = method_schedule(method, cfg)
    probe_epochs = _smallest_reaching(schedule, MIN_EPOCHS, MAX_EPOCHS_PER_UNIT)
    candidates = budget_candidates(images) if backbone_auto else (cfg.net.backbone,)
    text = cfg.train.budget if cfg.train.budget is not None else DEFAULT_BUDGET
    seconds = parse_budget(text)
    calibration = None
    if probes is None:
        calibration = TrainerCalibration(cfg, images, view_spec, labels=labels, evaluated=evaluated,
                                         probe_epochs=probe_epochs, clock=clock)
        probes = Probes(calibration.measure, calibration.discovery, calibration.stages, calibration.finish)
    try:
        report = plan_budget(seconds, n, candidates, probes, schedule, started=started, clock=clock)
    finally:
        if calibration is not None:
            calibration.close()
    report = {"budget": text, "n_images": n, **report}
    train = dataclasses.replace(cfg.train, epochs=report["epochs"], budget=text)
    net = dataclasses.replace(cfg.net, backbone=report["backbone"])
    return validate(dataclasses.replace(cfg, net=net, train=train)), report


def budget_candidates(images: np.ndarray) -> tuple[str, ...]:
    """The backbones a budget may choose for these images (uint8 (N, H, W[, 3])): the one that
    ``net.backbone: auto`` gives them without a budget (:func:`nets.default_backbone`, the network
    every preset was chosen with on the development data), then the lighter ones of
    :data:`CANDIDATES` when it cannot reach ``MIN_EPOCHS``; never a more capable one (on 8x8 digits
    at 2 minutes ResNet-18 lost to JULE's CNN: benchmarks/results/backbone-budget-digits.json)."""
    shape = ImageSet(images=images)  # its channels / image_size: the rule resolution's auto reads
    first = default_backbone(shape.channels, shape.image_size)
    return CANDIDATES[CANDIDATES.index(first):] if first in CANDIDATES else CANDIDATES


def unused_budget_note(train: TrainConfig) -> dict[str, str] | None:
    """A note for the log when ``train.budget`` is set but explicit epochs (a preset's or --epochs) win."""
    if train.budget is None or train.epochs is None:
        return None
    return {"ignored": f"epochs: {train.epochs} as configured (train.budget {train.budget} chooses the "
                       "epochs only when train.epochs is none: --set train.epochs=none)"}


def _stages_part(report: dict[str, Any]) -> str:
    seconds = report.get("phase_seconds") or 0
    return f" ({format_seconds(seconds)} of it the stages after the method)" if seconds else ""


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
            f"{format_seconds(report['estimated_seconds'] or 0)} of training{_stages_part(report)} after "
            f"{format_seconds(report.get('before_seconds', 0))} of start-up, loading and resolving and "
            f"{format_seconds(report['calibration_seconds'])} of calibration, then about "
            f"{format_seconds(report.get('finish_seconds', 0))} for the clusters and metrics")
    return line + (f"; warning: {report['warning']}" if report.get("warning") else "")
