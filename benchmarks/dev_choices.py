"""The development sweep: the measurements behind the defaults and the CPU presets, on the
development data only (scikit-learn's digits and USPS; never MNIST, Fashion-MNIST or CIFAR-10).

    python benchmarks/dev_choices.py --data digits usps --methods instance and pad pcp deepcluster \
        --views mild strong --seeds 0 1 --epochs 40
    python benchmarks/dev_choices.py --data digits usps --methods pad instance --views mild \
        --schedules frac cosine constant --seeds 0 1 2 --epochs 40 --tag schedules

For every (data, method, views, learning-rate schedule, seed) it trains one run with the shared CPU
settings (the network the data gets by default, SGD Nesterov lr 0.03, batch 128, the same total
epochs for every method: AND as 4 rounds + round 0 of epochs / 5, PCP as one round), then reads clusters off the trained network
in every way on offer - k-means and spectral clustering (K and 2K eigenvectors) on the backbone layer
and on the embedding, and the method's own clusters - and records ACC / NMI / ARI, kNN top-1 and
train seconds. Results: benchmarks/results/dev-choices-DATA[-TAG].json (rows, and means over seeds).

Schedules (``--schedules``, issue 29): ``frac``, the rate x0.1 at half and three quarters of the run
(``optim.milestones_frac: [0.5, 0.75]``, the library default and the *-cpu presets' since issue 29);
``cosine`` over the run; ``constant``, no decay -- what every 40-epoch run of the sweeps recorded
before issue 29 had (the fixed milestones 80/120/160 were never reached).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from common import class_count, data_spec, exclusive, mean_std, save_result

VIEWS = {
    "mild": {"preset": "digits"},  # the package's geometric jitter preset as it stands
    "strong": {"preset": "digits", "rotation": 20, "shift": 0.15, "rescale": [0.8, 1.2], "crop_scale": [0.5, 1.0]},
}


SCHEDULES = {
    "frac": {"schedule": "step", "milestones": None, "milestones_frac": [0.5, 0.75]},
    "cosine": {"schedule": "cosine", "milestones": None},
    "constant": {"schedule": "step", "milestones": None, "milestones_frac": None},
}


def method_layer(variant: str, epochs: int) -> dict:
    """``METHOD[:key=value,...]``: a method with some of its options set (e.g. pcp:images_per_cluster=50)."""
    method, _, sets = variant.partition(":")
    options = dict(item.split("=", 1) for item in sets.split(",") if item)
    layer = {"method": method, "train": {"epochs": epochs}, "options": options}
    if method == "and":
        layer["train"]["epochs"] = max(1, epochs // 5)
        options.setdefault("rounds", 4)
    return layer


def read_heads(run: Path, k: int, seed: int) -> list[dict]:
    """Every head on both layers of a finished run (labels only score)."""
    from deepclust.configure import run_config
    from deepclust.evaluate import clustering_scores
    from deepclust.heads import normalise
    from deepclust.inference import load_network
    from deepclust.resolution import load_data
    from deepclust.structure.clustering import kmeans, spectral
    from deepclust.train import extract_features

    cfg = run_config(run)
    images = load_data(cfg.data)
    net, views = load_network(run, cfg, images)
    rows = []
    for layer in ("backbone", "embedding"):
        x = normalise(extract_features(net, views, images.images, layer=layer)[0])
        t0 = time.perf_counter()
        pred = kmeans(x, k, seed=seed, n_init=3)[0]
        rows.append({"head": "kmeans", "features": layer, "seconds": time.perf_counter() - t0,
                     **clustering_scores(images.labels, pred)})
        for comps in (k, 2 * k):
            t0 = time.perf_counter()
            pred = spectral(x, k, seed=seed, n_components=comps)[0]
            rows.append({"head": f"spectral-{'K' if comps == k else '2K'}", "features": layer,
                         "seconds": time.perf_counter() - t0, **clustering_scores(images.labels, pred)})
    return rows


def one_run(data: str, method: str, views: str, seed: int, epochs: int, schedule: str = "frac") -> dict:
    from deepclust.config import merge_layers
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    out = Path(tempfile.mkdtemp(prefix="deepclust-dev-")) / "run"
    layer = merge_layers({"out": str(out), "data": {"spec": data_spec(data)},
                          "cluster": {"n_clusters": class_count(data_spec(data))},  # the papers' K
                          "views": VIEWS[views], "optim": SCHEDULES[schedule],
                          "train": {"seed": seed, "progress": False}},
                         method_layer(method, epochs))
    try:
        m = fit_run(build_config(layer))
        heads = read_heads(out, m["n_clusters"], seed)
        own = next((h for h in m.get("heads", []) if h["head"] == "method"), None)
        if own:
            heads.append({"head": "method", "features": own["features"], "seconds": own["head_seconds"],
                          **{k: own[k] for k in ("acc", "nmi", "ari")}})
        return {"data": data, "method": method, "views": views, "schedule": schedule, "seed": seed,
                "epochs": m["epochs"],
                "train_seconds": m["train_seconds"], "knn_top1": m.get("knn_top1"), "heads": heads,
                "config": json.loads(json.dumps(build_config(layer).to_dict()))}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def summarise(rows: list[dict]) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        for h in r["heads"]:
            key = (r["method"], r["views"], r.get("schedule", "frac"), h["head"], h["features"])
            groups[key].append({**h, "knn_top1": r["knn_top1"], "train_seconds": r["train_seconds"]})
    return [{"method": m, "views": v, "schedule": sc, "head": h, "features": f,
             **{key: mean_std([x[key] for x in xs]) for key in ("acc", "nmi", "ari", "knn_top1", "train_seconds")}}
            for (m, v, sc, h, f), xs in sorted(groups.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["digits", "usps"], choices=["digits", "usps"])
    p.add_argument("--methods", nargs="+", default=["instance", "and", "pad", "pcp", "deepcluster"])
    p.add_argument("--views", nargs="+", default=list(VIEWS), choices=list(VIEWS))
    p.add_argument("--schedules", nargs="+", default=["frac"], choices=list(SCHEDULES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    for data in args.data:
        name = f"dev-choices-{data}" + (f"-{args.tag}" if args.tag else "")
        with exclusive(name):
            rows = []
            for method in args.methods:
                for views, schedule in [(v, sc) for v in args.views for sc in args.schedules]:
                    for seed in args.seeds:
                        rows.append(one_run(data, method, views, seed, args.epochs, schedule))
                        best = max(rows[-1]["heads"], key=lambda h: h["acc"])
                        print(json.dumps({k: rows[-1][k] for k in ("data", "method", "views", "schedule", "seed",
                                                                   "knn_top1", "train_seconds")} | {"best": best}),
                              flush=True)
            save_result(name, {"data": data, "epochs": args.epochs, "seeds": args.seeds, "schedules": args.schedules,
                                        "summary": summarise(rows), "runs": rows},
                        chosen_on="n/a: this is the development sweep the defaults are chosen from")


if __name__ == "__main__":
    main()
