"""The clustering stage on balanced and imbalanced development data (issue 29): does a head empty a
cluster, and does it stay at or above the spectral head of the same network?

    python benchmarks/cluster_stage.py --data digits --ratio 10          # digits subsampled 10:1
    python benchmarks/cluster_stage.py --data digits --ratio 1           # digits as they are

For each seed the method is fitted once per head in --heads (``cluster.head``; every other head is
scored on the same network by the run itself, so the spectral head of a run without a learned stage
is the reference). ``--ratio R`` keeps, of class c (classes in label order, c = 0..C-1),
round(n_max * R ** (-c / (C - 1))) images drawn by a generator seeded 0, with n_max the smallest
class's count: the largest class holds R times the smallest (SCAN's users report its self-labelling
collapsing a 60/40 set). Labels only build the subset and score the clusters; K = the class count,
given as in every benchmark here. Nothing is tuned: the settings are the library's (--config,
--set change them; --chosen-on then says where they were chosen).

The result, RESULTS/cluster-stage-DATA-rR.json, holds every run and per head: ACC / NMI / ARI mean
and std, the runs that left a cluster empty, the smallest cluster, and the difference to the spectral
head (on the embedding and on the backbone) of the runs without a learned stage. Run it alone on
the machine (exit 2 while a fit or another benchmark runs); bad arguments: one line, exit 2.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import LIBRARY_DEFAULTS, data_spec, exclusive, fail, load_labelled, mean_std, save_result, write_npz

LEARNED = ("scan", "method")  # heads that train: their runs are not the spectral reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="short name or data spec with labels (default digits)")
    p.add_argument("--ratio", type=float, default=10.0, help="largest / smallest class (default 10; 1 keeps all)")
    p.add_argument("--method", default="pad", help="deepclust method (default pad, the library's)")
    p.add_argument("--heads", nargs="+", default=["graph", "agglomerative", "scan"], help="cluster.head of each fit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40, help="the method's epochs (default 40)")
    p.add_argument("--config", help="a preset name or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--chosen-on", default=LIBRARY_DEFAULTS)
    args = p.parse_args(argv)
    if args.ratio < 1:
        fail(f"--ratio must be at least 1, got {args.ratio}")
    if args.epochs < 1:
        fail(f"--epochs must be at least 1, got {args.epochs}")
    return args


def imbalanced_counts(class_sizes: np.ndarray, ratio: float) -> np.ndarray:
    """Images kept per class (in label order): a geometric fall from the smallest class's count to
    1 / ratio of it; pure, so tests can check the ratio."""
    n_max = int(class_sizes.min())
    c = len(class_sizes)
    steps = np.arange(c) / max(c - 1, 1)
    return np.maximum(1, np.round(n_max * ratio ** -steps)).astype(int)


def imbalanced_indices(labels: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Indices of the imbalanced subset (all images when ratio is 1), in the original order."""
    if ratio == 1:
        return np.arange(len(labels))
    classes, sizes = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(labels == k), n, replace=False)
                           for k, n in zip(classes, imbalanced_counts(sizes, ratio))])
    return np.sort(keep)


def head_rows(runs_by_head: dict[str, list[dict]], k: int) -> dict:
    """Per head: scores over seeds, empty clusters, the smallest cluster, and the spectral reference."""
    reference = [r for h, rs in runs_by_head.items() if h not in LEARNED for r in rs]
    spectral = {f: mean_std([x["acc"] for r in reference for x in r.get("heads") or []
                             if (x["head"], x["features"]) == ("spectral", f)]) for f in ("embedding", "backbone")}
    out = {}
    for head, runs in runs_by_head.items():
        sizes = [r["cluster_sizes"] for r in runs]
        row = {k_: mean_std([r[k_] for r in runs]) for k_ in ("acc", "nmi", "ari")}
        row["runs_with_empty_cluster"] = sum(len(s) < k or min(s) == 0 for s in sizes)
        row["smallest_cluster"] = min(min(s) if len(s) == k else 0 for s in sizes)
        for f, ref in spectral.items():
            if ref:
                row[f"acc_minus_spectral_{f}"] = round(row["acc"]["mean"] - ref["mean"], 4)
                row[f"spectral_{f}_acc"] = ref
        out[head] = row
    return out


def main(argv: list[str] | None = None) -> None:
    import accuracy

    args = parse_args(argv)
    images = load_labelled(args.data)
    if images.labels is None:
        fail(f"data '{args.data}' has no labels to build the subset and score it")
    images = images.subset(imbalanced_indices(images.labels, args.ratio))
    name = f"cluster-stage-{args.data}-r{args.ratio:g}"
    with exclusive(name), tempfile.TemporaryDirectory(prefix="deepclust-stage-") as tmp:
        spec = write_npz(images, Path(tmp) / "subset.npz")
        runs_by_head = {}
        for head in args.heads:
            fit_args = argparse.Namespace(split="all", epochs=args.epochs, config=args.config, heads=True,
                                          probe=[], set=[*args.set, f"cluster.head={head}"])
            runs_by_head[head] = accuracy.deep_method(args.method, spec, args.seeds, fit_args)["runs"]
    _, counts = np.unique(images.labels, return_counts=True)
    save_result(name, {"data": args.data, "spec": data_spec(args.data), "ratio": args.ratio, "method": args.method,
                       "epochs": args.epochs, "class_sizes": counts.tolist(), "n_images": len(images),
                       "summary": head_rows(runs_by_head, len(counts)),
                       "runs": runs_by_head}, chosen_on=args.chosen_on)


if __name__ == "__main__":
    main()
