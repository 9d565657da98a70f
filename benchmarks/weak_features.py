"""The graph head's rule, chosen on development data (issue 29): when does JULE's agglomeration of the
kNN graph chain into one large cluster, and does the graph's modularity show it without labels?

    python benchmarks/weak_features.py --data digits usps --noise 0 0.25 0.5 0.75 1 --trained 1 3

On the report data with weak features (CIFAR-10-test, kNN top-1 0.35-0.43) the agglomerative head made
one cluster of half the images; the development data's trained features are never that weak. So the
features here are made weak on purpose, on digits and USPS only: the pixels (scaled to [0, 1]) plus
Gaussian noise of standard deviation --noise, centred; and the embeddings of the defaults (PAD) after
--trained epochs. For every case, and for the same case subsampled to a 10:1 class ratio
(cluster_stage.imbalanced_indices): the kNN top-1 of the features (how weak they are), and of the
agglomerative, spectral (K eigenvectors, PAD's) and k-means heads: ACC / NMI, the largest cluster
over its share N / K, and the modularity of the partition on the head's cosine 10-NN graph; then the
graph head's choice (``heads.graph_labels``, margin ``heads.GRAPH_MARGIN``) and its ACC.

Result: RESULTS/weak-features.json (rows, and a summary of the modularity gap where agglomeration
won and where it lost). Labels only score. Run it alone (exit 2 while a fit or benchmark runs).
"""

from __future__ import annotations

import argparse

import numpy as np

from cluster_stage import imbalanced_indices
from common import data_spec, exclusive, fail, load_labelled, mean_std, save_result

CHOSEN_ON = "digits, usps (development data; the margin is read off this result)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["digits", "usps"], choices=["digits", "usps"])
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trained", type=int, nargs="*", default=[1, 3], help="PAD epochs of the trained cases")
    p.add_argument("--ratio", type=float, default=10.0, help="class ratio of the imbalanced copies (1: none)")
    args = p.parse_args(argv)
    if min(args.noise, default=0) < 0 or min(args.trained, default=1) < 1:
        fail("--noise must be >= 0 and --trained epochs >= 1")
    return args


def noisy_pixels(images, sigma: float, seed: int = 0) -> np.ndarray:
    x = np.stack([np.asarray(i, np.float32).ravel() for i in images.images]) / 255.0
    x = x + sigma * np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    return x - x.mean(0)


def trained_embedding(name: str, epochs: int, k: int) -> np.ndarray:
    from deepclust import Clusterer

    return Clusterer(method="pad", n_clusters=k, epochs=epochs, seed=0, progress=False).fit(data_spec(name)).embedding_


def case_row(x: np.ndarray, y: np.ndarray, k: int) -> dict:
    """Every head's partition of ``x``, scored, with its modularity on the 10-NN graph."""
    from deepclust.evaluate import clustering_scores, knn_top1
    from deepclust.heads import GRAPH_MARGIN, fit_head, graph_kept, normalise
    from deepclust.structure.clustering import modularity
    from deepclust.structure.knn import knn_graph

    x = normalise(x)
    graph = knn_graph(x, 10)
    row = {"n": len(x), "knn_top1": round(knn_top1(x, y), 4)}
    for kind in ("agglomerative", "spectral", "kmeans"):
        labels = fit_head(x, kind, k, n_components=k).labels_
        s = clustering_scores(y, labels)
        row[kind] = {"acc": round(s["acc"], 4), "nmi": round(s["nmi"], 4),
                     "largest_over_share": round(float(np.bincount(labels).max() * k / len(x)), 2),
                     "modularity": round(modularity(graph, labels), 4)}
    # the graph head's rule (heads.graph_labels) on these same two partitions and graph: the spectral
    # head above is spectral_of_graph on knn_graph(x, 10) with the seed graph_labels uses
    row["modularity_gap"] = round(row["spectral"]["modularity"] - row["agglomerative"]["modularity"], 4)
    kept = graph_kept({name: row[name]["modularity"] for name in ("agglomerative", "spectral")})
    row["graph"] = {"kept": kept, "acc": row[kept]["acc"], "margin": GRAPH_MARGIN}
    return row


def summary(rows: list[dict]) -> dict:
    agg_won = [r["modularity_gap"] for r in rows if r["agglomerative"]["acc"] >= r["spectral"]["acc"]]
    agg_lost = [r["modularity_gap"] for r in rows if r["agglomerative"]["acc"] < r["spectral"]["acc"]]
    best = [max(r["agglomerative"]["acc"], r["spectral"]["acc"]) for r in rows]
    return {"gap_where_agglomerative_won": mean_std(agg_won), "gap_where_agglomerative_lost": mean_std(agg_lost),
            "margins": margin_sweep(rows),
            "acc": {h: mean_std([r[h]["acc"] for r in rows]) for h in ("agglomerative", "spectral", "kmeans", "graph")},
            "graph_picked_the_better_of_two": sum(r["graph"]["acc"] == b for r, b in zip(rows, best)),
            "rows": len(rows)}


def margin_sweep(rows: list[dict], step: float = 0.0025, top: float = 0.5) -> dict:
    """For margins 0, step, ..., top: in how many rows the rule (spectral when the modularity gap
    exceeds the margin) keeps the better of the two partitions; the best count and the margins that
    reach it (the interval the library's margin is taken from)."""
    margins = np.round(np.arange(0, top + step / 2, step), 4)
    spectral_better = np.array([r["spectral"]["acc"] > r["agglomerative"]["acc"] for r in rows])
    gaps = np.array([r["modularity_gap"] for r in rows])
    right = np.array([int(((gaps > m) == spectral_better).sum()) for m in margins])
    best = margins[right == right.max()]
    return {"best_count": int(right.max()), "of": len(rows), "best_from": float(best.min()),
            "best_to": float(best.max())}


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    with exclusive("weak-features"):
        for name in args.data:
            images = load_labelled(name)
            y, k = images.labels, len(np.unique(images.labels))
            cases = [(f"pixels+noise {s:g}", noisy_pixels(images, s)) for s in args.noise]
            cases += [(f"pad {e} epochs", trained_embedding(name, e, k)) for e in args.trained]
            part = imbalanced_indices(y, args.ratio) if args.ratio > 1 else None
            for label, x in cases:
                rows.append({"data": name, "features": label, "ratio": 1, **case_row(x, y, k)})
                if part is not None:
                    rows.append({"data": name, "features": label, "ratio": args.ratio,
                                 **case_row(x[part], y[part], k)})
                print(rows[-1], flush=True)
    save_result("weak-features", {"data": args.data, "noise": args.noise, "trained_epochs": args.trained,
                                  "ratio": args.ratio, "summary": summary(rows), "rows": rows},
                chosen_on=CHOSEN_ON)


if __name__ == "__main__":
    main()
