"""Data larger than memory at ImageNet's count (issue 43): a synthetic set of 1.28M small images
written to a store, a streamed epoch and a PAD discovery at that size, and the streamed path's speed
against the in-memory path where both fit.

    python benchmarks/scale.py                                   # 1.28M images of 32 px, grey
    python benchmarks/scale.py --n 20000 --compare-n 3000 --epochs 2 --out /tmp/scale.json   # smoke

The images: ten smooth random templates (one per synthetic class) plus uniform noise, uint8, generated
chunk by chunk from --seed and written to an uncompressed npz member as they are made (never held
whole). Each part below runs in a fresh spawned process, whose peak resident memory (VmHWM) is its
own; the run's part is that less ``memory_before_mb`` (the interpreter and the libraries).

 - ``write``: the npz -> the store (``data.streams.npz_input`` + ``data.store.write_store``), seconds,
   bytes, peak memory; then ``open_store(verify=True)`` (every shard hashed) timed.
 - ``epoch``: ``fit_run`` of instance discrimination for one epoch on the 1.28M images, streamed
   (``DEEPCLUST_MEMORY`` set below the in-memory estimate), --backbone (mlp), NCE with --nce-k noise
   samples (a full softmax over a 1.28M bank is 42 GFLOP a step of 256: the papers' GPU setting, not
   this CPU's), no checkpoint, K-means head: images/s of the epoch (log.jsonl), the run's seconds
   (the final feature pass and the head included) and peak memory.
 - ``discovery``: PAD's own ``discover`` on a 1.28M x 128 bank (unit vectors drawn around 1,000
   centres: neighbourhoods, not noise): the bank's kNN (``structure.knn``: exact up to 250,000 rows,
   faiss's inverted-file index above, its recall against the exact search measured on 1,000 rows
   after the discovery) and the SCS search; seconds and peak memory (before the recall check).
 - ``compare``: at --compare-n images (or --compare-data, e.g. mnist-test), instance discrimination and
   PAD for --epochs epochs in memory and streamed, the same configuration (full softmax): images/s
   (the median of the epochs after the first) and the ratio streamed / in memory (goal >= 0.9).
--parts runs some of them (``epoch`` needs ``write``'s store: it writes it). Results:
benchmarks/results/scale-n{N}-{SIDE}px.json, or scale-compare-DATA.json for ``--parts compare``
(common.save_result), or --out. The script
refuses to start (exit 2) while a fit or another benchmark runs (the machine lock).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NOT_TUNED, data_spec, exclusive, machine, memory_mb, save_result  # noqa: E402

CLASSES = 10
CHUNK = 16384  # images generated at a time
PARTS = ("write", "epoch", "discovery", "compare")


def synthetic_npz(path: Path, n: int, side: int, channels: int, seed: int) -> float:
    """Write ``n`` synthetic images to ``path`` (an npz with one uncompressed ``images`` member),
    chunk by chunk; returns the seconds it took."""
    t0, rng = time.perf_counter(), np.random.default_rng(seed)
    shape = (side, side) if channels == 1 else (side, side, channels)
    coarse = rng.random((CLASSES, 4, 4, channels)).astype(np.float32)
    templates = np.kron(coarse, np.ones((side // 4, side // 4, 1), np.float32))[:, :side, :side]
    templates = templates.reshape(CLASSES, *shape) * 160
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
            zf.open("images.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            noise = rng.integers(0, 96, (m, *shape), dtype=np.uint8)
            f.write((templates[rng.integers(0, CLASSES, m)].astype(np.uint8) + noise).tobytes())
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- parts (spawned)


def part_write(npz: str, store_dir: str) -> dict:
    from deepclust.data.store import open_store, write_store
    from deepclust.data.streams import fingerprint, listing, npz_input

    before = memory_mb("VmRSS")
    fp, files = fingerprint("npz", npz, f"npz:{npz}", "all", None), listing("npz", npz)
    t0 = time.perf_counter()
    write_store(store_dir, npz_input(npz, npz, None, fp, files))
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    store = open_store(store_dir, fingerprint=fp, files=files, verify=True)
    return {"seconds": round(seconds, 2), "verify_seconds": round(time.perf_counter() - t0, 2),
            "store_bytes": sum(s["bytes"] for s in store.manifest["shards"]), "shards": len(store.shards),
            "images_per_second": round(store.n / seconds, 1), "memory_before_mb": round(before, 1),
            "peak_memory_mb": round(memory_mb(), 1)}


def part_fit(layer: dict, cap: str | None) -> dict:
    """One fit_run of ``layer`` (streamed when ``cap`` is given): its epochs' rates and peak memory."""
    if cap:
        os.environ["DEEPCLUST_MEMORY"] = cap
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    before = memory_mb("VmRSS")
    t0 = time.perf_counter()
    metrics = fit_run(build_config(layer))
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(layer["out"]) / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_second"] for r in log]
    return {"path": metrics["resolution"]["data"]["path"], "images_per_second_per_epoch": rates,
            "images_per_second": statistics.median(rates[1:] or rates),
            "discovery_seconds": [r.get("discovery_seconds") for r in log], "run_seconds": round(seconds, 1),
            "memory_before_mb": round(before, 1), "peak_memory_mb": round(memory_mb(), 1)}


def part_discovery(n: int, dim: int, seed: int) -> dict:
    import torch

    from deepclust.configure import build_config
    from deepclust.methods import DiscoveryContext, method_class

    before = memory_mb("VmRSS")
    cfg = build_config({"method": "pad", "cluster": {"n_clusters": CLASSES}, "net": {"dim": dim},
                        "train": {"epochs": 2, "accelerator": "cpu"}})
    pad = method_class("pad")(cfg, n, {"embedding": dim})
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(1000, dim, generator=gen), dim=1)
    bank = centres[torch.randint(0, 1000, (n,), generator=gen)] + 0.3 * torch.randn(n, dim, generator=gen) / dim ** 0.5
    pad.bank.features.copy_(torch.nn.functional.normalize(bank, dim=1))
    del bank
    ctx = DiscoveryContext(epoch=1, n_images=n, seed=seed, device=torch.device("cpu"), bank=pad.bank)
    t0 = time.perf_counter()
    structure = pad.discover(ctx)
    seconds = time.perf_counter() - t0
    groups = structure["groups"].numpy()
    peak = memory_mb()
    return {"seconds": round(seconds, 2), "groups": int(groups.max()) + 1, "memory_before_mb": round(before, 1),
            "peak_memory_mb": round(peak, 1), **knn_recall(pad.bank.features.numpy(), pad.options.neighbours, seed)}


def knn_recall(bank, k: int, seed: int, queries: int = 1000) -> dict:
    """The kNN search the discovery used (``structure.knn.topk_cosine``, ``auto``: exact up to EXACT_MAX
    rows, faiss's inverted-file index above) against the exact search, for ``queries`` random rows: the
    share of the true k + 1 nearest (the row itself included) it found."""
    from deepclust.structure.knn import EXACT_MAX, topk_cosine

    rows = np.sort(np.random.default_rng(seed).choice(len(bank), queries, replace=False))
    _, found = topk_cosine(bank[rows], bank, k + 1)
    _, exact = topk_cosine(bank[rows], bank, k + 1, backend="faiss")
    recall = float(np.mean([np.intersect1d(a, b).size / (k + 1) for a, b in zip(found, exact)]))
    return {"knn_search": "exact" if len(bank) <= EXACT_MAX else "faiss IVF (approximate)",
            "knn_recall": round(recall, 4), "knn_recall_queries": queries}


def spawned(fn, *args):
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


# ----------------------------------------------------------------------------- configurations


def layer(method: str, spec: str, out: Path, store_dir: Path, args, *, epochs: int, nce_k: int = 0) -> dict:
    return {"method": method, "out": str(out), "data": {"spec": spec, "store": str(store_dir)},
            "net": {"backbone": args.backbone}, "cluster": {"n_clusters": CLASSES, "head": "kmeans"},
            "views": {"preset": "none"}, "eval": {"knn_k": 10}, "memory": {"nce_k": nce_k},
            "optim": {"batch_size": args.batch_size},
            "train": {"epochs": epochs, "progress": False, "checkpoint": False, "seed": args.seed,
                      "threads": args.threads}}


def stream_cap(layer_: dict, shape: tuple[int, int, int, int]) -> str:
    """A DEEPCLUST_MEMORY between the streamed and in-memory estimates: the run streams."""
    from deepclust.configure import build_config
    from deepclust.limits import MARGIN, training_parts

    cfg = build_config(layer_)
    memory = sum(training_parts(cfg, *shape, streamed=False).values())
    streamed = sum(training_parts(cfg, *shape, streamed=True).values())
    return str(int((memory + streamed) / 2 / MARGIN))


def compare(args, tmp: Path) -> dict:
    """Instance discrimination and PAD, in memory and streamed, on the comparison data."""
    from deepclust.data import load_images

    if args.compare_data:
        spec = data_spec(args.compare_data)
    else:
        synthetic_npz(tmp / "compare.npz", args.compare_n, args.side, args.channels, args.seed + 1)
        spec = f"npz:{tmp / 'compare.npz'}"
    images = load_images(spec)
    shape = (len(images), images.channels, *images.image_size)
    del images
    out = {"data": args.compare_data or f"synthetic n={args.compare_n}", "n": shape[0]}
    for method in ("instance", "pad"):
        runs = {}
        for path in ("memory", "stream"):
            lay = layer(method, spec, tmp / f"{method}-{path}", tmp / f"{method}-store", args, epochs=args.epochs)
            runs[path] = spawned(part_fit, lay, stream_cap(lay, shape) if path == "stream" else None)
            assert runs[path]["path"] == path, runs[path]
        runs["ratio"] = round(runs["stream"]["images_per_second"] / runs["memory"]["images_per_second"], 3)
        out[method] = runs
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_280_000, help="images of the store (1.28M: ImageNet's train set)")
    p.add_argument("--side", type=int, default=32, help="image side in pixels (16 to 32)")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--backbone", default="mlp")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--nce-k", type=int, default=4096, help="NCE noise samples of the epoch at --n")
    p.add_argument("--dim", type=int, default=128, help="bank dimension of the discovery")
    p.add_argument("--compare-n", type=int, default=60_000, help="synthetic images of the comparison")
    p.add_argument("--compare-data", help="a data spec or short name for the comparison instead (mnist-test)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of each comparison run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, help="where the npz and the store are written (default: a temporary "
                                             "directory, removed after; they take about 2 x N x side^2 x channels bytes)")
    p.add_argument("--out", type=Path, help="write the JSON here instead of benchmarks/results/")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                   help="what to run (default all); compare alone: --parts compare --compare-data mnist-test")
    args = p.parse_args(argv)
    at_n = [part for part in args.parts if part != "compare"]
    name = (f"scale-n{args.n}-{args.side}px" + ("" if args.channels == 1 else "-rgb") if at_n
            else f"scale-compare-{args.compare_data or f'synthetic-n{args.compare_n}'}")
    with exclusive(name), tempfile.TemporaryDirectory(dir=args.dir) as tmp_:
        tmp = Path(tmp_)
        result = {"parts": args.parts, "n": args.n, "image": [args.channels, args.side, args.side],
                  "decoded_bytes": args.n * args.channels * args.side ** 2} if at_n else {"parts": args.parts}
        if {"write", "epoch"} & set(args.parts):
            result.update(at_size(args, tmp))
        if "discovery" in args.parts:
            result["discovery"] = spawned(part_discovery, args.n, args.dim, args.seed)
        if "compare" in args.parts:
            result["compare"] = compare(args, tmp)
    finish(name, result, args.out)


def at_size(args, tmp: Path) -> dict:
    """The npz of --n images, its store (``write``) and a streamed epoch on it (``epoch``)."""
    out = {"npz_seconds": round(synthetic_npz(tmp / "big.npz", args.n, args.side, args.channels, args.seed), 1)}
    out["write"] = spawned(part_write, str(tmp / "big.npz"), str(tmp / "store"))
    if "epoch" in args.parts:
        lay = layer("instance", f"npz:{tmp / 'big.npz'}", tmp / "epoch", tmp / "store", args, epochs=1,
                    nce_k=args.nce_k)  # the store just written, reused (its source's fingerprint matches)
        out["epoch"] = spawned(part_fit, lay, stream_cap(lay, (args.n, args.channels, args.side, args.side)))
    (tmp / "big.npz").unlink()
    shutil.rmtree(tmp / "store")
    return out


def finish(name: str, result: dict, out: Path | None) -> None:
    if out is None:
        save_result(name, result, chosen_on=NOT_TUNED)
        return
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "command": " ".join(sys.argv), **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
