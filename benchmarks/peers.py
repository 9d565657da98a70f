"""deepclust side by side with the library a user would pick instead: ClustPy's N2D and DEC on the
same images, in the same run, so the README compares ratios from one run.

    python benchmarks/peers.py --data usps|mnist-test|fashion-mnist [--split test] [--seeds 0 1 2]
        [--method M] [--deepclust-config PRESET_OR_FILE] [--set KEY=VALUE] [--epochs N]
        [--peers n2d dec] [--pretrain-epochs 100] [--clustering-epochs 150] [--limit N] [--chosen-on DATA] [--tag T]

Per seed, in this order: deepclust (``fit_run``, what ``deepclust fit`` runs: the library's defaults,
or --method / --deepclust-config / --set / --epochs), then each peer, all on the same images (loaded
once, the first --limit of them when given, handed to deepclust as an npz file) and the same torch
threads. Recorded for each: ACC / NMI / ARI (deepclust's own metric code for all), seconds of the
whole fit (deepclust: training, features, cluster head and its metrics; ClustPy: autoencoder
pre-training, manifold / clustering), and the ratios to deepclust's figures of the same seed.

The peers (ClustPy 0.0.3 defaults unless named here), on pixels scaled to [0, 1], flattened:
  N2D  autoencoder [D, 500, 500, 2000, 10] -> t-SNE -> Gaussian mixture. ClustPy's default manifold
       dimension is the number of clusters, which scikit-learn's Barnes-Hut t-SNE refuses for more
       than 3 ("'n_components' should be inferior to 4"), so N2D's defaults fail at K = 10; here
       manifold_params={"n_components": 2} (2-D t-SNE; the N2D paper uses UMAP, not installed here).
  DEC  the same autoencoder, k-means initialisation, then DEC's clustering loss.
--pretrain-epochs (default 100) and --clustering-epochs (DEC, default 150) are ClustPy's defaults.

ClustPy is optional (pip install -e '.[peers]', ClustPy 0.0.3); without it the script says so in one line and exits 2.
--chosen-on is required with --deepclust-config or --set (the data those settings were chosen on);
otherwise "n/a (no tuned settings)" is recorded. Saved as RESULTS/peers-DATA[-SPLIT][-limitN][-TAG].json
(RESULTS: benchmarks/results/ or $DEEPCLUST_RESULTS_DIR); refuses to start while a fit or another
benchmark runs (exit 2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common import (LIBRARY_DEFAULTS, class_count, data_spec, exclusive, fail, load_labelled, mean_std, save_result,
                    write_npz)

PEERS = ("n2d", "dec")
N2D_MANIFOLD = {"n_components": 2}  # ClustPy's default (n_components = K) fails at K = 10


def import_clustpy():
    """ClustPy's deep module, or one line on stderr and exit 2."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # ClustPy's progress bars (read when tqdm is imported)
    try:
        return importlib.import_module("clustpy.deep")
    except ImportError as e:
        fail(f"ClustPy is not installed ({e}); pip install -e '.[peers]' to run the peers")


def peer_model(name: str, k: int, seed: int, args, deep):
    if name == "n2d":
        return deep.N2D(n_clusters=k, pretrain_epochs=args.pretrain_epochs, manifold_params=dict(N2D_MANIFOLD),
                        random_state=seed)
    return deep.DEC(n_clusters=k, pretrain_epochs=args.pretrain_epochs, clustering_epochs=args.clustering_epochs,
                    random_state=seed)


def run_peer(name: str, images, seed: int, args, deep) -> dict:
    from deepclust.evaluate import clustering_scores

    x = images.images.reshape(len(images), -1).astype(np.float32) / 255.0
    k = int(len(np.unique(images.labels)))
    t0 = time.perf_counter()
    model = peer_model(name, k, seed, args, deep).fit(x)
    seconds = time.perf_counter() - t0
    scores = clustering_scores(images.labels, np.asarray(model.labels_))
    return {**{key: scores[key] for key in ("acc", "nmi", "ari")}, "seconds": round(seconds, 2)}


def run_deepclust(spec: str, seed: int, args) -> dict:
    from deepclust.config import read_yaml, set_dotted
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    out = tempfile.mkdtemp(prefix="deepclust-peers-")
    layer: dict = {"data": {"spec": spec}, "train": {"seed": seed, "progress": False}, "out": out,
                   "cluster": {"n_clusters": class_count(spec)}}  # the peers' K (--set wins)
    if args.method:
        layer["method"] = args.method
    if args.epochs is not None:
        layer["train"]["epochs"] = args.epochs
    for item in args.set:
        key, _, value = item.partition("=")
        set_dotted(layer, key, value)
    layers = [read_yaml(args.deepclust_config)] if args.deepclust_config else []
    try:
        t0 = time.perf_counter()
        m = fit_run(build_config(*layers, layer))
        seconds = time.perf_counter() - t0
        config = read_yaml(str(Path(out) / "config.yaml"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**{k: m.get(k) for k in ("acc", "nmi", "ari", "knn_top1", "train_seconds", "epochs",
                                      "cluster_head", "cluster_features")},
            "seconds": round(seconds, 2), "method": config.get("method"), "config": config}


def one_seed(spec: str, images, seed: int, args, deep) -> dict:
    dc = run_deepclust(spec, seed, args)
    systems = {f"deepclust ({dc['method']})": dc}
    for name in args.peers:
        s = run_peer(name, images, seed, args, deep)
        s["seconds_ratio_to_deepclust"] = round(s["seconds"] / dc["seconds"], 3)
        s["acc_ratio_to_deepclust"] = round(s["acc"] / dc["acc"], 3) if dc.get("acc") else None
        systems[f"ClustPy {name.upper()}"] = s
    print(json.dumps({"seed": seed, **{n: {k: s.get(k) for k in ("acc", "nmi", "seconds")}
                                       for n, s in systems.items()}}), flush=True)
    return {"seed": seed, "systems": systems}


def summarise(runs: list[dict]) -> dict:
    keys = ("acc", "nmi", "ari", "seconds", "train_seconds", "seconds_ratio_to_deepclust", "acc_ratio_to_deepclust")
    return {name: {k: mean_std([r["systems"][name].get(k) for r in runs]) for k in keys
                   if any(r["systems"][name].get(k) is not None for r in runs)}
            for name in runs[0]["systems"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="usps", help="short name or data spec (default usps)")
    p.add_argument("--split", default="all", help="all | train | test (default all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--method", help="deepclust method (default: the library's default)")
    p.add_argument("--deepclust-config", help="a deepclust preset or YAML file (default: none, the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a deepclust option")
    p.add_argument("--epochs", type=int, help="deepclust epochs (default: the library's)")
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--pretrain-epochs", type=int, default=100, help="ClustPy autoencoder epochs (default 100)")
    p.add_argument("--clustering-epochs", type=int, default=150, help="DEC clustering epochs (default 150)")
    p.add_argument("--limit", type=int, help="only the first N images (a smoke test; marked quick)")
    p.add_argument("--chosen-on", help="the data the deepclust settings were chosen on")
    p.add_argument("--tag", default="", help="suffix of the result's name (e.g. budget-140s)")
    args = p.parse_args(argv)
    if (args.deepclust_config or args.set) and not args.chosen_on:
        fail("--chosen-on DATA is required with --deepclust-config / --set: name the data those settings "
             "were chosen on")
    bad = [s for s in args.set if "=" not in s]
    if bad:
        fail(f"--set takes KEY=VALUE, got '{bad[0]}'")
    if min(args.pretrain_epochs, args.clustering_epochs) < 1:
        fail("--pretrain-epochs and --clustering-epochs must be positive")
    args.chosen_on = args.chosen_on or LIBRARY_DEFAULTS
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    deep = import_clustpy()
    data_name = args.data + (f"-{args.split}" if args.split != "all" else "")
    name = f"peers-{data_name}" + (f"-limit{args.limit}" if args.limit else "") + (f"-{args.tag}" if args.tag else "")
    with exclusive(name), tempfile.TemporaryDirectory(prefix="deepclust-peers-data-") as tmp:
        images = load_labelled(args.data, args.split, args.limit)
        if images.labels is None:
            fail(f"data '{args.data}' has no labels to score against")
        spec = write_npz(images, Path(tmp) / "images.npz")
        t0 = time.perf_counter()
        runs = [one_seed(spec, images, seed, args, deep) for seed in args.seeds]
        import clustpy

        save_result(name, {
            "data": args.data, "data_name": data_name, "spec": data_spec(args.data), "split": args.split,
            "n_images": len(images), "limit": args.limit, "quick": bool(args.limit), "seeds": args.seeds, "tag": args.tag,
            "clustpy": getattr(clustpy, "__version__", "?"),
            "peer_settings": {"n2d": {"manifold_params": N2D_MANIFOLD, "pretrain_epochs": args.pretrain_epochs},
                              "dec": {"pretrain_epochs": args.pretrain_epochs,
                                      "clustering_epochs": args.clustering_epochs},
                              "input": "pixels / 255, flattened"},
            "systems": summarise(runs), "runs": runs, "wall_seconds": round(time.perf_counter() - t0, 1),
        }, chosen_on=args.chosen_on)


if __name__ == "__main__":
    main()
