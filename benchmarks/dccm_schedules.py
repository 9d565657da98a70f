"""DCCM's two schedules at equal time on this machine (issue 44): the authors' per-block schedule
(options.schedule block: main.py train) against the per-mini-batch one (Algorithm 1, the CPU default),
both with dccm-cpu's settings, over seeds, on one data set.

    python benchmarks/dccm_schedules.py --data digits --block-epochs 5
    python benchmarks/dccm_schedules.py --data usps --block-epochs 1
    python benchmarks/dccm_schedules.py --data usps --block-epochs 1 --seeds 1 2 --add-seeds
    python benchmarks/dccm_schedules.py --data digits --block-epochs 1 --seeds 0 --quick   # a smoke test

Per seed, first the block schedule: dccm-cpu with options.schedule block and the authors' block
(1,000 images, 10 passes, 2 draws of each mini-batch) and mini-batches of 32, for --block-epochs
passes over the data in blocks; then the per-mini-batch run of the same seed (dccm-cpu as it is,
batches of 256) with a time budget of the seconds the block run's fit took from its start to its
metrics, so the budget chooses its epochs to spend the same time (its calibration counts in its
budget). Both rows record their training seconds, which show how equal the two were.

--add-seeds runs only the seeds given and merges them into the two results already saved (as
accuracy.py --add-seeds: refused, with nothing written, when a seed is there or the settings differ).
Results, in accuracy.py's format (every seed's scores, resolved configuration and heads):
RESULTS/accuracy-dccm-DATA-block-eE.json and RESULTS/accuracy-dccm-DATA-minibatch-at-block-eE.json.
The settings are dccm-cpu's, chosen on digits (the development data). The script takes the machine
(it refuses to start while a fit or another benchmark runs).

How long (this 2-core CPU, measured): a data epoch of the block schedule trains about 20 x N images
(10 passes, 2 draws; about 20 per-mini-batch epochs), and each seed then runs the per-mini-batch
schedule as long. --data digits --block-epochs 5: the block run 116 s a seed (1,797 images, 2
blocks), 4 minutes a seed with the other, 12 for 3 seeds; --data usps --block-epochs 1: the block run
558 s (9,298 images, 10 blocks), about 19 minutes a seed, an hour for 3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from accuracy import RUN_KEYS, SCORES, earlier_commands, heads_summary, recorded, run_heads, seed_config, unseeded
from common import data_spec, exclusive, fail, git_state, mean_std, resolved_config, save_result

CHOSEN_ON = "digits (dccm-cpu's settings; the block schedule's are the authors')"
BLOCK = ["options.schedule=block", "options.block_size=1000", "options.block_repeats=10", "options.block_draws=2",
         "optim.batch_size=32"]


def one_run(spec: str, seed: int, settings: list[str], epochs: int | None, split: str) -> tuple[dict, float]:
    """One fit of dccm-cpu with ``settings`` (KEY=VALUE): (its accuracy.py row, its seconds)."""
    from deepclust.runs import fit_run

    args = argparse.Namespace(config="dccm-cpu", split=split, epochs=epochs, set=settings)
    out = tempfile.mkdtemp(prefix="deepclust-bench-")
    try:
        cfg = seed_config("dccm", spec, seed, args, out)
        t0 = time.perf_counter()
        m = fit_run(cfg)
        seconds = time.perf_counter() - t0
        heads = run_heads(m, out, True)
        config = resolved_config(out, cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    run = {"seed": seed, **{k: m.get(k) for k in RUN_KEYS}, "fit_seconds": round(seconds, 1), "config": config}
    if heads is not None:
        run["heads"] = heads
    print({k: run.get(k) for k in ("seed", "acc", "nmi", "epochs", "train_seconds", "fit_seconds")}, flush=True)
    return run, seconds


def result(runs: list[dict], args, schedule: str) -> dict:
    summary = {k: mean_std([r.get(k) for r in runs]) for k in (*SCORES, "fit_seconds")
               if any(r.get(k) is not None for r in runs)}
    return {"method": "dccm", "data": args.data, "spec": data_spec(args.data), "split": args.split,
            "seeds": [r["seed"] for r in runs], "quick": args.quick, "schedule": schedule,
            "block_epochs": args.block_epochs, "summary": summary, "heads_summary": heads_summary(runs), "runs": runs}


def settings(config: dict) -> str:
    """A run's configuration less what each seed's run decides for itself (accuracy.unseeded; and the
    per-mini-batch run's budget, the seconds its block run took)."""
    c = json.loads(unseeded(config, False))
    c.get("train", {}).pop("budget", None)
    return json.dumps(c, sort_keys=True)


def merged(name: str, old: dict | None, runs: list[dict]) -> list[dict]:
    """The recorded runs and the new ones, by seed; refuses (exit 2, nothing written) when the new
    runs' settings differ from the recorded ones'."""
    if old is None:
        return runs
    if {settings(r["config"]) for r in runs} - {settings(r["config"]) for r in old["runs"]}:
        fail(f"--add-seeds: the new runs' settings differ from {name}'s; nothing saved")
    return sorted(old["runs"] + runs, key=lambda r: r["seed"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="data spec or short name (default digits)")
    p.add_argument("--split", default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--block-epochs", type=int, required=True,
                   help="passes over the data in blocks of the block schedule (its train.epochs)")
    p.add_argument("--quick", action="store_true", help="blocks of 200, 2 passes: a smoke test of the script")
    p.add_argument("--add-seeds", action="store_true", help="add these seeds' runs to the two results of the "
                   "same data and block epochs (refused when a seed is there or the settings differ)")
    args = p.parse_args(argv)
    if args.block_epochs < 1:
        fail("--block-epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = data_spec(args.data)
    block = BLOCK + (["options.block_size=200", "options.block_repeats=2"] if args.quick else [])
    tag = f"e{args.block_epochs}" + ("-quick" if args.quick else "")
    names = {"block": f"accuracy-dccm-{args.data}-block-{tag}",
             "minibatch": f"accuracy-dccm-{args.data}-minibatch-at-block-{tag}"}
    with exclusive(f"dccm-schedules-{args.data}-{tag}"):
        # accuracy.py's reading of a result to add to (a seed already there refused)
        adding = argparse.Namespace(add_seeds=args.add_seeds, seeds=args.seeds, method="dccm")
        old = {schedule: recorded(name, adding) for schedule, name in names.items()}
        runs: dict[str, list[dict]] = {"block": [], "minibatch": []}
        for seed in args.seeds:
            run, seconds = one_run(spec, seed, block, args.block_epochs, args.split)
            runs["block"].append(run)
            budget = [f"train.budget={max(int(seconds), 1)}s", "train.epochs=none"]
            runs["minibatch"].append(one_run(spec, seed, budget, None, args.split)[0])
        state = git_state()
        for schedule, name in names.items():  # both merged before either is saved: a refusal writes nothing
            runs[schedule] = merged(name, old[schedule], [r | state for r in runs[schedule]])
        for schedule, name in names.items():
            save_result(name, result(runs[schedule], args, schedule) | earlier_commands(old[schedule]),
                        chosen_on=CHOSEN_ON)


if __name__ == "__main__":
    main()
