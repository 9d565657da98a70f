"""Speed of PAD's SCS search (deepclust.structure.scs) beside scipy's strongly connected components.

    python benchmarks/scs_search.py --n 1280000 --k 5            # the ImageNet-sized target: <= 3 s
    python benchmarks/scs_search.py --n 20000 --k 5 --out /tmp/scs.json   # smoke run

Two graphs per run, each an (N, k) neighbour-index array, nearest first (PAD Eq 1, cosine):
  * ``gaussian``: N random Gaussian vectors in ``--dim`` dimensions (default 4), exact cosine kNN.
    Up to 16 dimensions the kNN comes from a KD-tree on the L2-normalised vectors (on the unit
    sphere the Euclidean order is the cosine order, so it is exact; well under a minute at
    N = 1.28M and dim 4 on one core); above 16 from ``topk_cosine`` (exact, blocked; practical up
    to ~10^5 rows on this CPU). Such graphs have one giant strongly connected component (99.7% of
    the vertices), the hard case for the search: nearly every start runs the budgeted DFS.
  * real features (``--features``, default mnist-test; ``none`` skips it): pixels of a shared
    .npz, exact cosine kNN with ``topk_cosine``. For N above the set's size the graph is the
    disjoint union of copies of that exact kNN graph (plus the exact kNN graph of a random subset
    for the remainder), so its local structure -- hubs, mutual pairs, component sizes -- is that of
    real features; the set's labels give the SCS precision (PAD Fig 4) as a by-product.
In both, vertex ids are a random permutation, as in a memory bank, so the search reads rows at
random.

Each side is timed in a fresh (spawned) process, which also gives its own peak memory (VmHWM).
The search's own share is peak_memory_mb - memory_before_mb; the rest is the interpreter, the
libraries (importing deepclust.structure loads torch) and the graph.
  * ours: ``strongly_connected_subgraphs(nbr, max_size=s)``, the whole public call (validation,
    components, searches, canonical ids); the first call on a tiny graph (numba compile or cache
    load) is reported as ``compile_seconds``; then the median of ``--repeats`` calls;
  * reference: scipy ``connected_components(connection='strong')`` on the CSR graph (building the
    CSR included) plus the size cut (each component split into consecutive chunks of at most s
    vertices; not strongly connected pieces, only the cost floor of a linear pass); the median of
    ``--repeats`` calls after an untimed call on a tiny graph.
JSON: n, k, s, seconds, reference_seconds, ratio (ours / reference) and peak_memory_mb for the
slower of the two graphs (the headline), the same per graph under ``graphs``; written to
benchmarks/results/scs_search-n{N}-k{K}.json through common.save_result, or to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NOT_TUNED, SHARED_DATA, exclusive, machine, memory_mb, save_result  # noqa: E402

REAL = {"mnist-test": SHARED_DATA / "mnist_test.npz", "usps": SHARED_DATA / "usps.npz",
        "cifar10-test": SHARED_DATA / "cifar10_test.npz"}


# ----------------------------------------------------------------------------- graphs


def _knn_exact(x: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine kNN rows (self excluded, nearest first) of the rows of x."""
    from deepclust.structure.knn import topk_cosine

    x = np.asarray(x, np.float32)
    k_eff = min(k, x.shape[0] - 1)
    if x.shape[1] <= 16:  # KD-tree on the unit sphere: Euclidean order = cosine order
        from scipy.spatial import cKDTree

        u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        idx = cKDTree(u).query(u, k=k_eff + 1, workers=1)[1]
        own = idx == np.arange(len(u))[:, None]
        own[~own.any(axis=1), -1] = True  # duplicates: drop the farthest instead of self
        idx = idx[~own].reshape(len(u), k_eff)
    else:
        idx = topk_cosine(x, x, k_eff, exclude_self=True)[1]
    out = np.full((x.shape[0], k), -1, np.int64)
    out[:, :k_eff] = idx
    return out


def _relabel(nbr: np.ndarray, labels: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """The same graph with vertex ids permuted at random (rows moved, entries renamed)."""
    perm = rng.permutation(nbr.shape[0])  # old id -> new id
    out, lab = np.empty_like(nbr), np.empty_like(labels)
    out[perm] = np.where(nbr >= 0, perm[np.maximum(nbr, 0)], -1)
    lab[perm] = labels
    return out.astype(np.int32), lab


def gaussian_graph(n: int, k: int, dim: int, rng) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return _relabel(_knn_exact(x, k), np.zeros(n, np.int64), rng)[0]


def real_graph(name: str, n: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, labels): exact kNN of a data set's pixels, tiled to n vertices."""
    data = np.load(REAL.get(name, name))
    x = data["images"].reshape(len(data["images"]), -1).astype(np.float32)
    y = data["labels"] if "labels" in data.files else np.zeros(len(x), np.int64)
    base = _knn_exact(x, k) if n >= len(x) else None
    parts, labels, offset = [], [], 0
    while offset < n:
        take = min(len(x), n - offset)
        if take == len(x):
            nbr, lab = base, y
        else:  # the remainder: exact kNN graph of a random subset
            pick = np.sort(rng.choice(len(x), take, replace=False))
            nbr, lab = _knn_exact(x[pick], k), y[pick]
        parts.append(np.where(nbr >= 0, nbr + offset, -1))
        labels.append(lab)
        offset += take
    return _relabel(np.concatenate(parts), np.concatenate(labels), rng)


# ----------------------------------------------------------------------------- timed sides


def reference_groups(nbr: np.ndarray, s: int) -> np.ndarray:
    """scipy's strongly connected components, then each split into chunks of at most s."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    n, k = nbr.shape
    valid = nbr.ravel() >= 0
    rows = np.repeat(np.arange(n, dtype=np.int32), k)[valid]
    a = sp.csr_matrix((np.ones(rows.size, np.int8), (rows, nbr.ravel()[valid])), shape=(n, n))
    n_comp, comp = connected_components(a, directed=True, connection="strong")
    order = np.argsort(comp, kind="stable")
    sizes = np.bincount(comp, minlength=n_comp)
    starts = np.cumsum(sizes) - sizes
    chunks = -(-sizes // s)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - starts[comp[order]]
    return (np.cumsum(chunks) - chunks)[comp] + rank // s


def _time_side(side: str, path: str, s: int, repeats: int, labels_path: str | None) -> dict:
    """Runs in a fresh process: load the graph, time one side, report its peak memory."""
    nbr = np.load(path)
    out: dict = {}
    if side == "ours":
        from deepclust.structure.scs import scs_quality, search_scs, strongly_connected_subgraphs

        t0 = time.perf_counter()
        strongly_connected_subgraphs(np.array([[1], [0], [0]]), max_size=s)
        out["compile_seconds"] = round(time.perf_counter() - t0, 3)
        fn = lambda: strongly_connected_subgraphs(nbr, max_size=s)  # noqa: E731
    else:
        reference_groups(np.array([[1], [0], [0]]), s)  # scipy's lazy imports, untimed
        fn = lambda: reference_groups(nbr, s)  # noqa: E731
    before = memory_mb("VmRSS")  # interpreter, libraries (torch: deepclust.structure), the graph
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        groups = fn()
        times.append(time.perf_counter() - t0)
    sizes = np.bincount(groups)
    out.update(seconds=round(statistics.median(times), 4), all_seconds=[round(t, 4) for t in times],
               peak_memory_mb=round(memory_mb(), 1),
               memory_before_mb=round(before, 1), n_groups_2_or_more=int((sizes >= 2).sum()),
               coverage=round(float((sizes[groups] >= 2).mean()), 4),
               mean_size=round(float(sizes[sizes >= 2].mean()), 3) if (sizes >= 2).any() else None)
    if side == "ours":
        out["sweeps"] = search_scs(nbr, s)[1]
        if labels_path:
            q = scs_quality(groups, np.load(labels_path))
            out.update(precision=round(q.precision, 4), pair_precision=round(q.pair_precision, 4))
    return out


def measure(name: str, nbr: np.ndarray, labels, s: int, repeats: int, tmp: Path) -> dict:
    path = str(tmp / f"{name}.npy")
    np.save(path, nbr)
    labels_path = None
    if labels is not None:
        labels_path = str(tmp / f"{name}-labels.npy")
        np.save(labels_path, labels)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        ours = pool.apply(_time_side, ("ours", path, s, repeats, labels_path))
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        ref = pool.apply(_time_side, ("reference", path, s, repeats, None))
    comp_sizes = np.bincount(reference_groups(nbr, nbr.shape[0]))
    return {"graph": name, "n": int(nbr.shape[0]), "k": int(nbr.shape[1]), "s": s,
            "seconds": ours["seconds"], "reference_seconds": ref["seconds"],
            "ratio": round(ours["seconds"] / ref["seconds"], 3),
            "peak_memory_mb": ours["peak_memory_mb"],
            "largest_strong_component": int(comp_sizes.max()),
            "ours": ours, "reference": ref}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_280_000)
    p.add_argument("--k", type=int, default=5, help="neighbours per vertex (PAD: 5)")
    p.add_argument("--s", type=int, default=10, help="scale threshold (PAD: 10)")
    p.add_argument("--dim", type=int, default=4, help="dimension of the random Gaussian features")
    p.add_argument("--features", default="mnist-test",
                   help="real features: mnist-test, usps, cifar10-test, an .npz path, or none")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the JSON here instead of benchmarks/results/")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    graphs = []
    with exclusive(f"scs_search-n{args.n}"), tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        nbr = gaussian_graph(args.n, args.k, args.dim, rng)
        build = {"gaussian": round(time.perf_counter() - t0, 1)}
        graphs.append(measure(f"gaussian-d{args.dim}", nbr, None, args.s, args.repeats, Path(tmp)))
        if args.features != "none":
            t0 = time.perf_counter()
            nbr, labels = real_graph(args.features, args.n, args.k, rng)
            build[args.features] = round(time.perf_counter() - t0, 1)
            graphs.append(measure(Path(args.features).stem, nbr, labels, args.s, args.repeats,
                                  Path(tmp)))
    worst = max(graphs, key=lambda g: g["seconds"])
    result = {key: worst[key] for key in ("n", "k", "s", "seconds", "reference_seconds", "ratio")}
    result.update(peak_memory_mb=max(g["peak_memory_mb"] for g in graphs), headline=worst["graph"],
                  graph_build_seconds=build, graphs=graphs)
    if args.out is None:
        save_result(f"scs_search-n{args.n}-k{args.k}", result, chosen_on=NOT_TUNED)
        return
    result = {"benchmark": f"scs_search-n{args.n}-k{args.k}",
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "command": " ".join(sys.argv), **result}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
