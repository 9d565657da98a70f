"""Accuracy benchmark: fit + evaluate a method over several seeds, record mean and std.

    python benchmarks/accuracy.py --method instance --data digits [--seeds 0 1 2] [--quick]
    python benchmarks/accuracy.py --method kmeans-pixels --data mnist-test     # baselines on raw pixels
    python benchmarks/accuracy.py --method spectral-pixels --data usps

--data takes any deepclust data spec, or a short name: mnist-test, usps, cifar10-test (the files in
../shared/data) and fashion-mnist. Extra options go to the run's configuration: --config FILE,
--epochs N, --set KEY=VALUE. The result is saved as benchmarks/results/accuracy-METHOD-DATA[-TAG].json
and printed as the last line.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from common import data_spec, mean_std, save_result

SCORES = ("acc", "nmi", "ari", "knn_top1", "kmeans_embedding_acc", "kmeans_embedding_nmi",
          "kmeans_embedding_ari", "train_seconds", "images_per_second", "head_seconds")


def pixel_baseline(kind: str, spec: str, seeds: list[int], split: str) -> dict:
    """k-means / spectral clustering on raw pixels scaled to [0, 1] (the papers' pixel baselines)."""
    from deepclust.data import load_images
    from deepclust.evaluate import clustering_scores
    from deepclust.structure import kmeans, spectral

    images = load_images(spec, split=split)
    x = images.images.reshape(len(images), -1).astype(np.float32) / 255.0
    k = len(np.unique(images.labels))
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        if kind == "kmeans-pixels":
            pred, _, _ = kmeans(x, k, seed=seed, n_init=10 if len(x) < 20000 else 3)
        else:
            pred, _ = spectral(x, k, seed=seed)
        runs.append({**clustering_scores(images.labels, pred), "seconds": time.perf_counter() - t0})
    return {"runs": runs, "n_images": len(images), "n_clusters": k}


def deep_method(method: str, spec: str, seeds: list[int], args) -> dict:
    from deepclust.config import build_config, read_yaml, set_dotted
    from deepclust.runs import compare_heads, fit_run

    runs = []
    for seed in seeds:
        layer: dict = {"method": method, "data": {"spec": spec, "split": args.split},
                       "train": {"seed": seed, "progress": False}}
        if args.epochs is not None:
            layer["train"]["epochs"] = args.epochs
        for item in args.set:
            key, value = item.split("=", 1)
            set_dotted(layer, key, value)
        layers = [read_yaml(args.config)] if args.config else []
        out = tempfile.mkdtemp(prefix="deepclust-bench-")
        layer["out"] = out
        cfg = build_config(*layers, layer)
        try:
            m = fit_run(cfg)
            heads = compare_heads(out) if args.heads and m.get("acc") is not None else None
        finally:
            shutil.rmtree(out, ignore_errors=True)
        runs.append({k: m.get(k) for k in (*SCORES, "epochs", "n_images", "n_clusters", "cluster_head",
                                            "cluster_features", "cluster_sizes")})
        if heads is not None:
            runs[-1]["heads"] = heads
        print({k: runs[-1][k] for k in ("acc", "nmi", "knn_top1", "kmeans_embedding_acc", "train_seconds")},
              flush=True)
    return {"runs": runs, "config": cfg.to_dict()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--data", default="digits")
    p.add_argument("--split", default="all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config")
    p.add_argument("--epochs", type=int)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--tag", default="")
    p.add_argument("--no-heads", dest="heads", action="store_false",
                   help="skip scoring k-means / spectral on embedding / backbone features per run")
    p.add_argument("--quick", action="store_true", help="one seed, 2 epochs: a smoke test of the script")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    spec = data_spec(args.data)
    t0 = time.perf_counter()
    if args.method in ("kmeans-pixels", "spectral-pixels"):
        out = pixel_baseline(args.method, spec, args.seeds, args.split)
        keys = ("acc", "nmi", "ari", "seconds")
    else:
        out = deep_method(args.method, spec, args.seeds, args)
        keys = SCORES
    summary = {k: mean_std([r.get(k) for r in out["runs"]]) for k in keys if any(r.get(k) is not None for r in out["runs"])}
    name = f"accuracy-{args.method}-{args.data}" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick else "")
    save_result(name, {"method": args.method, "data": args.data, "spec": spec, "split": args.split,
                       "seeds": args.seeds, "quick": args.quick, "summary": summary,
                       "wall_seconds": round(time.perf_counter() - t0, 1), **out})


if __name__ == "__main__":
    main()
