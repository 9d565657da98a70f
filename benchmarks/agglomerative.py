"""Speed of JULE's agglomeration (deepclust.structure.agglomeration) beside scikit-learn's
AgglomerativeClustering on the same kNN connectivity, in the same run.

    python benchmarks/agglomerative.py --n 70000               # the issue-24 target: <= 60 s
    python benchmarks/agglomerative.py --n 2000 --out /tmp/agg.json   # smoke run

Features: the first N images of ``--data`` (default Fashion-MNIST, train then test, from
/usr/share/datasets/fashion-mnist; for N up to 10,000 ``mnist-test`` is the fallback when it is not
installed), pixels scaled to [0, 1], PCA to ``--pca`` dimensions (50; scikit-learn, randomized,
seed 0), then L2-normalised (JULE normalises its features). Shared by both sides and untimed:
the directed kNN graph of JULE Eq 4 (K_s = 20, faiss, exact) and the initial clusters (1-NN
components), whose times are reported as ``graph_seconds`` and ``init_seconds``.

Each side runs in a fresh (spawned) process, which also gives its own peak memory (VmHWM):
  * ours: ``merge_clusters`` from the initial clusters down to ``--target`` (10) in one period
    (the whole forward pass on fixed features; exact Eq 13-14 unless ``--mode``; clusters under
    ``--small-fraction`` of the mean size set aside at the cut, as JULE's final cut does), after an untimed
    call on a tiny graph (numba compile or cache load: ``compile_seconds``);
  * reference: ``AgglomerativeClustering(n_clusters=target, connectivity=C, linkage=--linkage)``
    (ward by default), C the symmetrised pattern of the same kNN graph, on the same features, from
    single samples (scikit-learn takes no initial clustering).
``seconds`` / ``reference_seconds`` / ``ratio`` are one timed call each; the JSON also has both
sides' NMI (geometric, the JULE paper's convention, and arithmetic) and ACC against the labels, a
by-product that steers nothing. Written to benchmarks/results/agglomerative-n{N}.json through
common.save_result (provenance, machine lock), or to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NOT_TUNED, exclusive, fail, load_labelled, machine, memory_mb, save_result  # noqa: E402


def features(name: str, n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(PCA features, labels, data name) of the first n images."""
    from sklearn.decomposition import PCA

    from deepclust.errors import DeepclustError

    try:
        images = load_labelled(name, limit=n)
    except DeepclustError as e:
        if name != "fashion-mnist" or n > 10_000:
            fail(str(e))
        name, images = "mnist-test", load_labelled("mnist-test", limit=n)
    if len(images) < n:
        fail(f"{name} has {len(images)} images, fewer than --n {n}")
    x = images.images.reshape(n, -1).astype(np.float32) / 255.0
    z = PCA(dim, svd_solver="randomized", random_state=seed).fit_transform(x).astype(np.float32)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), images.labels, name


def _time_side(side: str, tmp: str, args: dict) -> dict:
    """Runs in a fresh process: one side, timed, with its peak memory."""
    import scipy.sparse as sp

    w = sp.load_npz(f"{tmp}/graph.npz")
    out: dict = {}
    if side == "ours":
        from deepclust.structure.agglomeration import merge_clusters, small_cluster_floor

        init = np.load(f"{tmp}/init.npy")
        t0 = time.perf_counter()
        tiny = sp.csr_matrix(np.array([[0, 1.0, 0.5], [1.0, 0, 0.2], [0.5, 0.3, 0]]))
        merge_clusters(tiny, np.arange(3), 2, mode=args["mode"])
        out["compile_seconds"] = round(time.perf_counter() - t0, 3)
        c = int(init.max()) + 1
        before = memory_mb("VmRSS")
        t0 = time.perf_counter()
        floor = small_cluster_floor(len(init), args["target"], args["small_fraction"])
        labels = merge_clusters(w, init, c - args["target"], k_c=args["k_c"], mode=args["mode"],
                                min_size=floor)
    else:
        from sklearn.cluster import AgglomerativeClustering

        x = np.load(f"{tmp}/features.npy")
        conn = ((w + w.T) > 0).astype(np.float64).tocsr()
        before = memory_mb("VmRSS")
        t0 = time.perf_counter()
        labels = AgglomerativeClustering(n_clusters=args["target"], connectivity=conn,
                                         linkage=args["linkage"]).fit_predict(x)
    out.update(seconds=round(time.perf_counter() - t0, 3), peak_memory_mb=round(memory_mb(), 1),
               memory_before_mb=round(before, 1))
    np.save(f"{tmp}/{side}-labels.npy", labels)
    return out


def scores(y: np.ndarray, labels: np.ndarray) -> dict:
    from deepclust.evaluate import cluster_acc, nmi

    return {"acc": round(cluster_acc(y, labels), 4), "nmi_geometric": round(nmi(y, labels, "geometric"), 4),
            "nmi_arithmetic": round(nmi(y, labels), 4), "sizes": np.bincount(labels).tolist()}


def run(args) -> dict:
    import scipy.sparse as sp

    from deepclust.structure.agglomeration import directed_knn_graph, initial_clusters

    x, y, data = features(args.data, args.n, args.pca, args.seed)
    t0 = time.perf_counter()
    w = directed_knn_graph(x, args.k_s, backend="faiss")
    graph_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    init = initial_clusters(x, backend="faiss")
    init_s = time.perf_counter() - t0
    side_args = {"mode": args.mode, "k_c": args.k_c, "target": args.target, "linkage": args.linkage,
                 "small_fraction": args.small_fraction}
    with tempfile.TemporaryDirectory() as tmp:
        sp.save_npz(f"{tmp}/graph.npz", w)
        np.save(f"{tmp}/init.npy", init)
        np.save(f"{tmp}/features.npy", x)
        ctx = mp.get_context("spawn")
        sides = {}
        for side in ("ours", "reference"):
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                sides[side] = pool.apply(_time_side, (side, tmp, side_args))
            sides[side]["scores"] = scores(y, np.load(f"{tmp}/{side}-labels.npy"))
    c = int(init.max()) + 1
    return {"n": args.n, "seconds": sides["ours"]["seconds"],
            "reference_seconds": sides["reference"]["seconds"],
            "ratio": round(sides["ours"]["seconds"] / sides["reference"]["seconds"], 3),
            "peak_memory_mb": sides["ours"]["peak_memory_mb"], "data": data,
            "features": f"PCA-{args.pca} of the pixels (randomized, seed {args.seed}), L2-normalised",
            "k_s": args.k_s, "k_c": args.k_c, "target": args.target, "mode": args.mode,
            "small_fraction": args.small_fraction,
            "reference": f"sklearn AgglomerativeClustering(linkage={args.linkage!r}) on the symmetrised "
                         "kNN connectivity, from single samples",
            "graph_seconds": round(graph_s, 3), "init_seconds": round(init_s, 3),
            "initial_clusters": c, "initial_mean_size": round(args.n / c, 3),
            "ours": sides["ours"], "reference_side": sides["reference"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=70_000)
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist-test, usps or an .npz spec")
    p.add_argument("--pca", type=int, default=50)
    p.add_argument("--k-s", type=int, default=20, help="neighbours per sample (JULE Table 2: 20)")
    p.add_argument("--k-c", type=int, default=5, help="neighbour clusters in Eq 7 (JULE Table 2: 5)")
    p.add_argument("--target", type=int, default=10)
    p.add_argument("--mode", default="exact", choices=("exact", "eq19", "eq21"))
    p.add_argument("--small-fraction", type=float, default=0.05,
                   help="clusters under this fraction of the mean size are set aside at the cut (0: off)")
    p.add_argument("--linkage", default="ward", choices=("ward", "average", "complete", "single"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here instead of benchmarks/results/")
    args = p.parse_args(argv)
    if not 2 <= args.target < args.n or args.pca < 1 or args.k_s < 1:
        fail(f"need 2 <= --target < --n, --pca >= 1, --k-s >= 1 (got {args.target}, {args.n}, {args.pca}, {args.k_s})")
    name = f"agglomerative-n{args.n}"
    with exclusive(name):
        result = run(args)
    if args.out is None:
        save_result(name, result, chosen_on=NOT_TUNED)
        return
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "command": " ".join(sys.argv), **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
