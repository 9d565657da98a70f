"""Does the time budget keep its word? One budgeted fit, its plan against what the run then took.

    python benchmarks/budget_plan.py --data digits --budget 2m          # the README's first command
    python benchmarks/budget_plan.py --data mnist-test --budget 2m
    python benchmarks/budget_plan.py --data usps --budget 10m
    python benchmarks/budget_plan.py --data cifar10-test --budget 10m
    python benchmarks/budget_plan.py --data fashion-mnist --budget 60m

Runs ``deepclust fit --data D --budget B`` as a user would (the library's defaults: PAD, the backbone
and epochs the budget chooses, K estimated from the pixels unless --n-clusters is given; --method,
--config and --set change that) and records, in RESULTS/budget-plan-D-B[-TAG].json:
 - ``planned``: the plan's estimates (``metrics.json`` -> ``resolution.budget``): seconds before
   the plan (loading, K, views), of calibration, of training, of what follows training (passes,
   head, metrics), the whole run; the chosen backbone, epochs and measured costs (steps of epoch 0
   and once a structure exists, first and later discoveries);
 - ``actual``: the training seconds the run logged (``train_seconds``), the wall seconds of the
   whole fit timed here, what followed training (wall - before - calibration - training), and the
   same costs read off the run's log (epoch 0's images/s, the median images/s of the epochs from
   the first discovery on, the first discovery's seconds and the median of the later ones; log
   images/s are steps only, the plan's include each epoch's checkpoint), the seconds of the epochs'
   records against ``train_seconds`` (the rest: checkpoints and log writes);
 - ``ratios``: actual / planned training, wall / budget; ``within_15pct`` for each (issue 29's
   goal: planned training within 15% of the time given).

Nothing is tuned: the settings are the library defaults (``chosen_on``; --chosen-on when --config
or --set change them). Run it alone on the machine: it takes the budget and refuses to start (exit
2) while a fit or another benchmark runs. Bad arguments: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import LIBRARY_DEFAULTS, budget_plan_of, data_spec, exclusive, fail, save_result

TOLERANCE = 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data spec or short name (digits, usps, mnist-test, ...)")
    p.add_argument("--budget", required=True, help="the time budget, e.g. 2m, 10m, 60m")
    p.add_argument("--method", help="a deepclust method (default: the library's)")
    p.add_argument("--n-clusters", type=int, help="K (default: estimated from the pixels, as a user's fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="a preset name or a YAML file under the benchmark's options")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chosen-on", default=LIBRARY_DEFAULTS, help="the data the settings were chosen on")
    p.add_argument("--tag", default="", help="suffix of the result's name")
    args = p.parse_args(argv)
    from deepclust.durations import parse_budget
    from deepclust.errors import ConfigError

    try:
        args.budget_seconds = parse_budget(args.budget, where="--budget")
    except ConfigError as e:
        fail(str(e))
    if args.n_clusters is not None and args.n_clusters < 1:
        fail(f"--n-clusters must be at least 1, got {args.n_clusters}")
    return args


def fit_config(args, out: str):
    """The fit's configuration: preset/--config, then the options given here; epochs left to the budget."""
    from deepclust.config import read_yaml, set_dotted
    from deepclust.configure import build_config

    layer: dict = {"data": {"spec": data_spec(args.data)}, "out": out,
                   "train": {"seed": args.seed, "progress": False, "epochs": None, "budget": args.budget}}
    if args.method:
        layer["method"] = args.method
    if args.n_clusters is not None:
        layer["cluster"] = {"n_clusters": args.n_clusters}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set takes KEY=VALUE, got '{item}'")
        set_dotted(layer, key, value)
    return build_config(*([read_yaml(args.config)] if args.config else []), layer)


def _median(values: list) -> float | None:
    values = [float(v) for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def actual_costs(log: list[dict]) -> dict:
    """The run's own costs from its log: epoch 0's steps, the steps once a structure exists, the first
    and later discoveries, and the sum of the epochs' seconds."""
    found = [r for r in log if "discovery_seconds" in r]
    first = log.index(found[0]) if found else len(log)
    return {"images_per_second": log[0].get("images_per_second") if log else None,
            "steady_images_per_second": _median([r.get("images_per_second") for r in log[first:]]),
            "first_discovery_seconds": found[0]["discovery_seconds"] if found else None,
            "discovery_seconds": _median([r["discovery_seconds"] for r in found[1:]]),
            "discoveries": len(found), "epochs": len(log),
            "epoch_records_seconds": round(sum(r.get("seconds", 0.0) for r in log), 3)}


def compare(plan: dict, metrics: dict, log: list[dict], wall: float, budget_seconds: float) -> dict:
    """Planned against actual (see the module doc); pure, so it can be checked on made-up numbers."""
    chosen = next((r for r in plan.get("candidates", []) if r.get("backbone") == plan.get("backbone")), {})
    planned = {k: plan.get(k) for k in ("backbone", "epochs", "total_epochs", "before_seconds", "calibration_seconds",
                                        "estimated_seconds", "finish_seconds", "estimated_total_seconds", "warning")}
    planned["costs"] = {k: v for k, v in chosen.items() if k.endswith(("_seconds", "_per_second"))
                        and k != "estimated_seconds"}
    train = float(metrics["train_seconds"])
    before = float(plan.get("before_seconds") or 0) + float(plan.get("calibration_seconds") or 0)
    actual = {"train_seconds": train, "wall_seconds": round(wall, 2), "epochs": metrics.get("epochs"),
              "finish_seconds": round(wall - before - train, 2), "costs": actual_costs(log)}
    actual["costs"]["checkpoint_and_log_seconds"] = round(train - actual["costs"]["epoch_records_seconds"], 3)
    est = plan.get("estimated_seconds") or 0
    ratios = {"training_actual_over_planned": round(train / est, 3) if est else None,
              "wall_over_budget": round(wall / budget_seconds, 3)}
    within = {"training": est > 0 and abs(train / est - 1) <= TOLERANCE,
              "wall": 1 - TOLERANCE <= wall / budget_seconds <= 1 + TOLERANCE}
    return {"planned": planned, "actual": actual, "ratios": ratios, "within_15pct": within}


def run(args) -> dict:
    from deepclust.runs import fit_run

    out = Path(tempfile.mkdtemp(prefix="deepclust-budget-")) / "run"
    try:
        cfg = fit_config(args, str(out))
        t0 = time.perf_counter()
        metrics = fit_run(cfg)
        wall = time.perf_counter() - t0
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    plan = budget_plan_of(metrics)
    if "candidates" not in plan:
        fail(f"the fit made no budget plan ({plan.get('ignored') or plan.get('reason') or 'epochs given'})")
    scores = {k: metrics.get(k) for k in ("acc", "nmi", "ari", "knn_top1", "n_clusters", "head_seconds")}
    return {**compare(plan, metrics, log, wall, args.budget_seconds), "scores": scores,
            "method": metrics.get("method"), "plan": plan}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = f"budget-plan-{args.data}-{args.budget}" + (f"-{args.tag}" if args.tag else "")
    with exclusive(name):
        result = run(args)
    save_result(name, {"data": args.data, "spec": data_spec(args.data), "budget": args.budget,
                       "budget_seconds": args.budget_seconds, "seed": args.seed, **result},
                chosen_on=args.chosen_on)


if __name__ == "__main__":
    main()
