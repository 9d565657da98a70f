"""Which network wins at which image size and budget: the measurements the backbone rule of the
time budget is to be chosen from (issue 29), on the development data only (digits, USPS).

    python benchmarks/backbone_budget.py --data digits usps --budgets 2m 10m --seeds 0 1 2
    python benchmarks/backbone_budget.py --data digits --resize 32 --budgets 10m --seeds 0 1 2

The rule today (``deepclust/budget.py``): the most capable candidate -- ResNet-18, then AlexNet, then
JULE's CNN -- whose measured throughput buys at least ``MIN_EPOCHS`` (20) passes over the data
within the budget. Nothing measured says that capacity beats epochs at a given budget: on digits at
two minutes it picked AlexNet for 8x8 images (issue 29). For every (data, image size, budget, seed)
this fits the library's defaults (PAD unless --method; K = the number of classes, the papers'
protocol) with the budget once per backbone of ``--backbones`` (``net.backbone`` fixed: the budget
then chooses only the epochs) and once with ``auto`` (what the rule picks), recording ACC / NMI /
ARI, kNN top-1, the epochs the budget bought, the plan's warning, training and wall seconds.
``--resize S`` resizes every image to S x S (several sizes: several results), since the rule is
about image size as much as budget. Results: RESULTS/backbone-budget-DATA[-rS][-TAG].json with
every run and, per (budget, backbone), means over seeds, the winner by NMI per budget and the
rule's choice beside it. Time: about the sum of the budgets of all runs (backbones + 1 per budget and
seed), plus each run's clustering. Run it alone: it refuses to start while a fit or another
benchmark runs. Bad arguments: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import budget_plan_of, class_count, data_spec, exclusive, fail, mean_std, save_result

BACKBONES = ("auto", "resnet18", "alexnet", "jule_cnn", "dccm_cnn", "mlp")
SCORES = ("acc", "nmi", "ari", "knn_top1", "epochs", "train_seconds", "wall_seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["digits", "usps"], choices=["digits", "usps"])
    p.add_argument("--budgets", nargs="+", default=["2m", "10m"])
    p.add_argument("--backbones", nargs="+", default=["resnet18", "alexnet", "jule_cnn"], choices=BACKBONES[1:])
    p.add_argument("--resize", type=int, nargs="+", default=[None], help="image sides to resize to (default: as is)")
    p.add_argument("--method", help="a deepclust method (default: the library's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="")
    p.add_argument("--no-auto", action="store_true", help="skip the rule's own run (only the fixed backbones)")
    args = p.parse_args(argv)
    from deepclust.durations import parse_budget
    from deepclust.errors import ConfigError

    try:
        args.budget_seconds = {b: parse_budget(b, where="--budgets") for b in args.budgets}
    except ConfigError as e:
        fail(str(e))
    if any(s is not None and s < 4 for s in args.resize):
        fail(f"--resize takes image sides of at least 4, got {args.resize}")
    return args


def one_run(data: str, size: int | None, budget: str, backbone: str, seed: int, method: str | None) -> dict:
    from deepclust.configure import build_config
    from deepclust.inference import compare_heads
    from deepclust.runs import fit_run

    spec = data_spec(data)
    out = Path(tempfile.mkdtemp(prefix="deepclust-backbone-")) / "run"
    layer = {"out": str(out), "data": {"spec": spec, "resize": size}, "net": {"backbone": backbone},
             "cluster": {"n_clusters": class_count(spec)},  # the papers' K
             "train": {"seed": seed, "progress": False, "epochs": None, "budget": budget}}
    if method:
        layer["method"] = method
    try:
        t0 = time.perf_counter()
        m = fit_run(build_config(layer))
        wall = time.perf_counter() - t0
        heads = compare_heads(str(out)) if m.get("acc") is not None else None  # every head, same features
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    plan = budget_plan_of(m)
    return {"data": data, "resize": size, "budget": budget, "asked": backbone, "backbone": plan.get("backbone"),
            "seed": seed, "wall_seconds": round(wall, 1), "warning": plan.get("warning"),
            "planned_seconds": plan.get("estimated_seconds"),
            **{k: m.get(k) for k in SCORES if k != "wall_seconds"},
            "heads": [{k: h.get(k) for k in ("head", "features", "acc", "nmi", "ari")} for h in heads or []]}


def summarise(rows: list[dict]) -> dict:
    """Per (budget, asked backbone): means over seeds; per budget: the winner by mean NMI among the
    fixed backbones, and what ``auto`` (the rule) chose."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["budget"], r["asked"])].append(r)
    table = [{"budget": b, "backbone": a, "chosen": sorted({r["backbone"] for r in rs if r["backbone"]}),
              **{k: mean_std([r.get(k) for r in rs]) for k in SCORES}} for (b, a), rs in sorted(groups.items())]
    verdict = {}
    for budget in sorted({r["budget"] for r in rows}):
        fixed = [t for t in table if t["budget"] == budget and t["backbone"] != "auto" and t["nmi"]]
        rule = next((t for t in table if t["budget"] == budget and t["backbone"] == "auto"), None)
        if fixed:
            best = max(fixed, key=lambda t: t["nmi"]["mean"])
            verdict[budget] = {"best_by_nmi": best["backbone"], "best_nmi": best["nmi"]["mean"],
                               "rule_chose": rule["chosen"] if rule else None,
                               "rule_nmi": rule["nmi"].get("mean") if rule else None}
    return {"table": table, "verdict": verdict}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for data in args.data:
        for size in args.resize:
            name = f"backbone-budget-{data}" + (f"-r{size}" if size else "") + (f"-{args.tag}" if args.tag else "")
            with exclusive(name):
                rows = []
                for budget in args.budgets:
                    for seed in args.seeds:
                        for backbone in (() if args.no_auto else ("auto",)) + tuple(args.backbones):
                            rows.append(one_run(data, size, budget, backbone, seed, args.method))
                            print(json.dumps(rows[-1]), flush=True)
            save_result(name, {"data": data, "resize": size, "budgets": args.budgets, "seeds": args.seeds,
                               "method": args.method, "summary": summarise(rows), "runs": rows},
                        chosen_on="n/a: the development sweep the backbone rule is to be chosen from")


if __name__ == "__main__":
    main()
