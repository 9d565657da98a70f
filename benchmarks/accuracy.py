"""Accuracy benchmark: fit + evaluate a method over several seeds, record every seed and the summary
(mean, std, median, min, max).

    python benchmarks/accuracy.py --method and --data usps --config and-cpu --chosen-on digits,usps
    python benchmarks/accuracy.py --method kmeans-pixels --data mnist-test     # baselines on raw pixels
    python benchmarks/accuracy.py --method spectral-pixels --data usps

--chosen-on names the data the settings (preset, options, views, head) were chosen on, e.g.
"digits,usps" (development data), and is required for a trained method; the pixel baselines tune
nothing and record "n/a (no tuned settings)" unless it is given.

--data takes any deepclust data spec, or a short name: mnist-test, usps, cifar10-test (the files in
../shared/data) and fashion-mnist. Extra options go to the run's configuration: --config FILE,
--epochs N, --set KEY=VALUE. The result is saved as RESULTS/accuracy-METHOD-DATA[-TAG].json and printed
as the last line; RESULTS is benchmarks/results/ or $DEEPCLUST_RESULTS_DIR. Each run records its full
resolved configuration and, when the data has labels, the scores of every cluster head. The script
refuses to start (exit 2) while a deepclust fit or another benchmark runs on the machine.

--k-auto runs as a user who does not know K (``cluster.n_clusters: auto``, the default): each run
records the K it settled on with its evidence (``k_estimate``: criterion, score, runner-up) and its
distance from the number of classes, and, on the same trained network, the scores at the classes'
K (``at_classes``: ``deepclust evaluate --n-clusters K``, the heads refitted; labels only score).

--add-seeds runs only the seeds not yet in the result of the same name and adds them to it (the
summary recomputed over all): each run records the commit it ran at, and the script refuses (exit 2,
nothing written) when a seed is already there, or, before merging, when a new run's resolved
configuration differs from the recorded runs' in anything but its seed (the new runs are then saved
alone, as NAME-unmerged.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import numpy as np

from common import (NOT_TUNED, budget_plan_of, class_count, data_spec, exclusive, fail, git_state, mean_std,
                    resolved_config, result_path, save_result)

SCORES = ("acc", "nmi", "nmi_geometric", "ari", "knn_top1", "linear_top1", "kmeans_embedding_acc", "kmeans_embedding_nmi",
          "kmeans_embedding_ari", "train_seconds", "images_per_second", "head_seconds")
RUN_KEYS = (*SCORES, "epochs", "n_images", "n_clusters", "cluster_head", "cluster_features", "cluster_sizes",
            "cluster_head_choice")  # the graph head: the partition it kept and both modularities
PIXEL_BASELINES = ("kmeans-pixels", "spectral-pixels")


def pixel_baseline(kind: str, spec: str, seeds: list[int], split: str) -> dict:
    """k-means / spectral clustering on raw pixels scaled to [0, 1] (the papers' pixel baselines)."""
    from deepclust.data import load_images
    from deepclust.evaluate import clustering_scores
    from deepclust.structure import kmeans, spectral

    images = load_images(spec, split=split)
    if images.labels is None:
        fail(f"data '{spec}' has no labels to score against")
    x = images.images.reshape(len(images), -1).astype(np.float32) / 255.0
    k = len(np.unique(images.labels))
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        if kind == "kmeans-pixels":
            pred, _, _ = kmeans(x, k, seed=seed, n_init=10 if len(x) < 20000 else 3)
        else:
            pred, _ = spectral(x, k, seed=seed)
        runs.append({"seed": seed, **clustering_scores(images.labels, pred),
                     "seconds": time.perf_counter() - t0})
    return {"runs": runs, "n_images": len(images), "n_clusters": k}


def seed_config(method: str, spec: str, seed: int, args, out: str):
    """The configuration of one seed's run: preset/--config, then the benchmark's own layer."""
    from deepclust.config import read_yaml, set_dotted
    from deepclust.configure import build_config

    k = "auto" if getattr(args, "k_auto", False) else class_count(spec, args.split)  # the papers' K (--set wins)
    layer: dict = {"method": method, "data": {"spec": spec, "split": args.split},
                   "train": {"seed": seed, "progress": False}, "out": out, "cluster": {"n_clusters": k}}
    if args.epochs is not None:
        layer["train"]["epochs"] = args.epochs
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set takes KEY=VALUE, got '{item}'")
        set_dotted(layer, key, value)
    layers = [read_yaml(args.config)] if args.config else []
    return build_config(*layers, layer)


def run_heads(metrics: dict, out: str, wanted: bool) -> list[dict] | None:
    """Per-head scores: metrics.json's ``heads`` when the run wrote them, else recomputed
    (inference.compare_heads) on the run directory; None without labels or when not wanted."""
    if not wanted or metrics.get("acc") is None:
        return None
    if metrics.get("heads"):
        return metrics["heads"]
    from deepclust.inference import compare_heads

    return compare_heads(out)


def run_plan(metrics: dict) -> dict | None:
    """A budgeted run's plan (metrics.json's ``resolution.budget``, issue 29: planned against trained
    seconds): the budget, the network and epochs it chose, its estimated training seconds; None
    when the run was given its epochs."""
    plan = budget_plan_of(metrics)
    if "estimated_seconds" not in plan:
        return None
    return {k: plan.get(k) for k in ("budget_seconds", "backbone", "total_epochs", "estimated_seconds")}


def heads_summary(runs: list[dict]) -> dict:
    """Mean / std over seeds of every cluster head's scores, keyed "head/features" (e.g. JULE's RC
    clusters are "agglomerative/embedding", its SF clusters "method/embedding")."""
    combos = sorted({(h["head"], h.get("features", "-")) for r in runs for h in r.get("heads") or []})
    out = {}
    for head, features in combos:
        rows = [h for r in runs for h in r.get("heads") or [] if (h["head"], h.get("features", "-")) == (head, features)]
        out[f"{head}/{features}"] = {k: mean_std([h.get(k) for h in rows])
                                     for k in ("acc", "nmi", "nmi_geometric", "ari") if any(k in h for h in rows)}
    return out


def k_auto_record(metrics: dict, out: str, classes: int) -> dict:
    """A K-auto run's estimate (metrics.json's ``resolution.n_clusters``) with its distance from the
    number of classes, and the run re-scored at that number (the heads refitted on the same network:
    ``inference.evaluate_run``), with the largest cluster over its share N / K."""
    from deepclust.inference import evaluate_run

    note = (metrics.get("resolution") or {}).get("n_clusters") or {}
    k = metrics.get("n_clusters")
    at = evaluate_run(out, overrides={"cluster": {"n_clusters": classes}}, write=False)
    sizes = at.get("cluster_sizes") or []
    return {"k_estimate": note, "k_classes": classes, "k_relative_error": round(abs(k - classes) / classes, 3),
            "at_classes": {**{key: at.get(key) for key in ("acc", "nmi", "ari", "cluster_sizes", "cluster_head_choice")},
                           "largest_over_share": round(max(sizes) * classes / sum(sizes), 2) if sizes else None,
                           "heads": at.get("heads")}}


def deep_method(method: str, spec: str, seeds: list[int], args) -> dict:
    from deepclust.runs import fit_run

    runs = []
    for seed in seeds:
        out = tempfile.mkdtemp(prefix="deepclust-bench-")
        cfg = seed_config(method, spec, seed, args, out)
        try:
            m = fit_run(cfg)
            heads = run_heads(m, out, args.heads)
            for protocol, layer in args.probe:  # AND / PAD / PCP's linear protocol, DCCM's MLP (Fig 4)
                from deepclust.inference import probe_run

                m[probe_key(protocol, layer)] = probe_run(out, protocol, features=layer, write=False)["top1"]
            config = resolved_config(out, cfg)
            known_k = k_auto_record(m, out, class_count(spec, args.split)) if getattr(args, "k_auto", False) else {}
        finally:
            shutil.rmtree(out, ignore_errors=True)
        run = {"seed": seed, **{k: m.get(k) for k in (*RUN_KEYS, *probe_keys(args))}, **known_k, "config": config}
        if planned := run_plan(m):
            run["planned"] = planned
        if heads is not None:
            run["heads"] = heads
        runs.append(run)
        print({k: run[k] for k in ("seed", "acc", "nmi", "knn_top1", "kmeans_embedding_acc", "train_seconds")},
              flush=True)
    return {"heads_summary": heads_summary(runs), "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="a deepclust method, or kmeans-pixels / spectral-pixels")
    p.add_argument("--data", default="digits", help="data spec or short name (default digits)")
    p.add_argument("--split", default="all", help="all | train | test (default all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--chosen-on", help="the data the settings were chosen on, e.g. digits,usps "
                                       "(required for a trained method)")
    p.add_argument("--config", help="a preset name or a YAML file, under the benchmark's own options")
    p.add_argument("--epochs", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default="", help="suffix of the result's name")
    p.add_argument("--no-heads", dest="heads", action="store_false",
                   help="skip scoring k-means / spectral on embedding / backbone features per run")
    p.add_argument("--probe", nargs="*", metavar="PROTOCOL[:LAYER]",
                   help="also score probes on each run (the data's train/test split, else stratified 5-fold; "
                        "labels score only): alone, a linear probe on the embeddings (linear_top1); else "
                        "each of linear / mlp (DCCM's one hidden layer of 200 units) on the embeddings or a "
                        "layer of the network, e.g. mlp:conv4 mlp:fc (mlp_top1_conv4, mlp_top1_fc)")
    p.add_argument("--k-auto", action="store_true", help="K not given (auto): record the estimate, and the "
                                                         "scores at the classes' K on the same network")
    p.add_argument("--quick", action="store_true", help="one seed, 2 epochs: a smoke test of the script")
    p.add_argument("--add-seeds", action="store_true", help="add these seeds' runs to the result of the same "
                                                            "name (same settings; refuses a seed already there)")
    args = p.parse_args(argv)
    if args.method in PIXEL_BASELINES:
        args.chosen_on = args.chosen_on or NOT_TUNED
    elif not (args.chosen_on or "").strip():
        fail("--chosen-on DATA is required: name the data the settings were chosen on (e.g. digits,usps)")
    args.probe = probe_specs(args.probe)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    return args


def probe_specs(given: list[str] | None) -> list[tuple[str, str]]:
    """--probe's (protocol, layer) pairs: none when absent, the linear probe on the embeddings when
    given alone; a bad protocol fails in one line."""
    if given is None:
        return []
    specs = [(p, layer or "embedding") for p, _, layer in (g.partition(":") for g in given or ["linear"])]
    bad = [p for p, _ in specs if p not in ("linear", "mlp")]
    if bad:
        fail(f"--probe takes linear or mlp, optionally :LAYER, got '{bad[0]}'")
    return specs


def probe_key(protocol: str, layer: str) -> str:
    """The score's name: linear_top1 on the embeddings, mlp_top1_conv4 on a layer."""
    return f"{protocol}_top1" + ("" if layer == "embedding" else f"_{layer}")


def probe_keys(args) -> list[str]:
    """The probe scores a run records beyond RUN_KEYS (linear_top1 is one of them)."""
    return [key for key in (probe_key(p, layer) for p, layer in args.probe) if key not in RUN_KEYS]


def k_auto_summary(runs: list[dict]) -> dict:
    """The K each seed settled on, how many fell within 20% of the classes' count (the issue's bar),
    and the scores at the classes' K over the seeds."""
    at = [r["at_classes"] for r in runs]
    return {"k_found": [r["n_clusters"] for r in runs], "k_within_20pct": sum(r["k_relative_error"] <= 0.2 for r in runs),
            **{f"{key}_at_classes": mean_std([a.get(key) for a in at]) for key in ("acc", "nmi", "largest_over_share")}}


def recorded(name: str, args) -> dict | None:
    """--add-seeds: the result NAME already holds (its runs stamped with its commit), None without
    --add-seeds; refuses when there is none, or it holds one of the seeds asked for."""
    if not args.add_seeds:
        return None
    path = result_path(name)
    if not path.is_file():
        fail(f"--add-seeds: there is no {path} to add to")
    old = json.loads(path.read_text())
    if args.method in PIXEL_BASELINES or old.get("method") != args.method:
        fail(f"--add-seeds: {path.name} is not a trained method's result for {args.method}")
    if again := sorted(set(args.seeds) & {r["seed"] for r in old["runs"]}):
        fail(f"--add-seeds: {path.name} already holds seed(s) {again}")
    for run in old["runs"]:
        run.setdefault("commit", old.get("commit"))
        run.setdefault("dirty", old.get("dirty"))
    return old


def unseeded(config: dict, k_auto: bool) -> str:
    """A run's resolved configuration without what each seed's run decides for itself: the seed, the
    run folder, and where it was measured or read off the run, the budget's epochs and backbone and
    (--k-auto) the K settled after training."""
    c = json.loads(json.dumps(config))
    c.pop("out", None)
    train = c.setdefault("train", {})
    train.pop("seed", None)
    if train.get("budget") is not None:
        train.pop("epochs", None)
        c.setdefault("net", {}).pop("backbone", None)
    if k_auto:
        c.setdefault("cluster", {}).pop("n_clusters", None)
    return json.dumps(c, sort_keys=True)


def earlier_commands(old: dict | None) -> dict:
    """--add-seeds: the commands that made the result added to, for the merged result ({} without)."""
    return {"earlier_commands": old.get("earlier_commands", []) + [old["command"]]} if old else {}


def merged(name: str, old: dict, runs: list[dict], args) -> list[dict]:
    """The recorded runs and the new ones, by seed; new runs whose settings differ are saved alone
    as NAME-unmerged and the script stops (exit 2)."""
    want = {unseeded(r["config"], args.k_auto) for r in old["runs"]}
    if any(unseeded(r["config"], args.k_auto) not in want for r in runs):
        save_result(f"{name}-unmerged", {"method": args.method, "data": args.data, "runs": runs}, chosen_on=args.chosen_on)
        fail(f"--add-seeds: the new runs' settings differ from {name}'s; saved them as {name}-unmerged")
    return sorted(old["runs"] + runs, key=lambda r: r["seed"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = data_spec(args.data)
    name = (f"accuracy-{args.method}-{args.data}" + (f"-{args.tag}" if args.tag else "")
            + ("-quick" if args.quick else ""))
    with exclusive(name):
        old = recorded(name, args)
        t0 = time.perf_counter()
        if args.method in PIXEL_BASELINES:
            out = pixel_baseline(args.method, spec, args.seeds, args.split)
            keys: tuple[str, ...] = ("acc", "nmi", "ari", "seconds")
        else:
            out = deep_method(args.method, spec, args.seeds, args)
            keys = (*SCORES, *probe_keys(args))
            state = git_state()
            for run in out["runs"]:
                run |= {"commit": state["commit"], "dirty": state["dirty"]}
        wall = round(time.perf_counter() - t0, 1)
        if old is not None:
            out["runs"] = merged(name, old, out["runs"], args)
            out["heads_summary"] = heads_summary(out["runs"])
            wall += old.get("wall_seconds") or 0.0
        seeds = [r["seed"] for r in out["runs"]]
        summary = {k: mean_std([r.get(k) for r in out["runs"]]) for k in keys
                   if any(r.get(k) is not None for r in out["runs"])}
        if args.k_auto and args.method not in PIXEL_BASELINES:
            summary |= k_auto_summary(out["runs"])
        save_result(name, {"method": args.method, "data": args.data, "spec": spec, "split": args.split,
                           "seeds": seeds, "quick": args.quick, "summary": summary, "wall_seconds": wall,
                           **earlier_commands(old),
                           **out},
                    chosen_on=args.chosen_on)


if __name__ == "__main__":
    main()
