"""A run end to end: resolve the configuration from the data, train, read clusters off the features,
evaluate, and write the run directory.

The jobs around it have their own modules: the configuration resolved from the data
(``resolution.py``), features -> clusters -> metrics (``scoring.py``), a finished run used again
(``inference.py``: evaluate / predict) and the run directory's lifecycle (``rundir.py``: one writer,
atomic files, nothing lost). Here:
 - **Resume** restores everything training depends on (``train.py``) and gives the same result as an
   uninterrupted run; the log is rewritten from the checkpoint's history (no duplicate records), time
   is cumulative, resuming a finished run changes nothing and says so, and flags that contradict the
   run being resumed are refused (``configure.resume_config``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save

from .config import Config
from .configure import resume_config
from .datapath import announce as announce_path
from .datapath import open_data
from .data import ImageSet
from .data.sources import MAX_LISTED
from .io import save_array, save_bytes, save_json, save_npz, save_text
from .rundir import check_out, claimed_run_dir, finished_run, is_launched_child, real_out, work_dir
from .resolution import describe_n_clusters, resolve, training_subset, view_spec
from .scoring import compute_metrics
from .structure.hierarchy import build_hierarchy
from .train import Trainer, TrainResult, extract_features, make_fabric

def fit_run(cfg: Config, *, overwrite: bool = False, fabric=None, images: ImageSet | None = None,
            started: float | None = None) -> dict[str, Any]:
    """Train, cluster, evaluate and write the run directory ``cfg.out`` (a new run; ``overwrite``:
    replacing a run there). Returns metrics.json's content (an empty dict on processes other than
    rank 0). ``images``: images held in memory (``api.Clusterer``), used instead of loading
    ``cfg.data.spec``. ``started``: the ``time.perf_counter()`` reading a time budget counts from (the
    command line's: deepclust's first line, durations.entry_started; None: now, as for the API)."""
    started = time.perf_counter() if started is None else started  # (budget.py)
    out = real_out(cfg.out)  # the directory itself, however --out spells it (links, ..)
    check_out(out, cfg.data.spec)  # before any lock or file
    with claimed_run_dir(out, resume=False, overwrite=overwrite) as primary:
        return _fit(cfg, out, False, overwrite, fabric, primary, images, started)


def resume_run(request: Config, *, given: dict | None = None, fabric=None,
               started: float | None = None) -> dict[str, Any]:
    """Continue the run in ``request.out`` from its checkpoint, as it was configured (its own
    ``config.yaml``; ``request`` may change only what ``configure.RESUME_MAY_CHANGE`` names, and a
    flag in ``given`` that contradicts the run is refused). A finished run is left as it is and its
    metrics returned."""
    started = time.perf_counter() if started is None else started
    out = real_out(request.out)
    check_out(out, None)
    with claimed_run_dir(out, resume=True, overwrite=False) as primary:
        cfg = resume_config(out, request, given)
        if primary and (done := finished_run(out)) is not None:
            print(f"deepclust: the run in {out} has finished; nothing to resume", file=sys.stderr)
            return done
        return _fit(cfg, out, True, False, fabric, primary, None, started)


def _fit(cfg: Config, out: Path, resume: bool, overwrite: bool, fabric, primary: bool,
         images: ImageSet | None, started: float) -> dict[str, Any]:
    images, path = open_data(cfg, images)  # in memory or streamed from a store
    cfg = resolve(cfg, images, started)
    cfg = dataclasses.replace(cfg, resolution={**cfg.resolution, "data": path})
    if not is_launched_child():  # which, and why, once the resolution has refused nothing
        announce_path(path, cfg)
    with work_dir(out, overwrite=overwrite, primary=primary, config_text=cfg.to_yaml()) as work:
        return _train(cfg, images, work, resume, fabric)


def _train(cfg: Config, images: ImageSet, work: Path, resume: bool, fabric) -> dict[str, Any]:
    """Train into ``work`` and write its outputs (rank 0; other ranks return an empty dict)."""
    train_images, spec = training_subset(cfg.data, images), view_spec(cfg.views)
    fabric = fabric or make_fabric(cfg.train)
    fabric.launch()
    trainer = Trainer(cfg, train_images.images, work, fabric=fabric, labels=train_images.labels, view_spec=spec)
    result = trainer.fit(resume=resume)
    if fabric.global_rank != 0:
        return {}
    return _write_outputs(cfg, images, result, work, fabric.device)


def _write_outputs(cfg: Config, images: ImageSet, result: TrainResult, work: Path, device) -> dict[str, Any]:
    layers = {}
    for layer in dict.fromkeys((cfg.cluster.features, "backbone")):
        layers[layer], embedding = extract_features(result.net, result.views, images.images, device=device,
                                                    layer=layer)
    features = layers[cfg.cluster.features]
    trained = np.flatnonzero(images.split == 0) if cfg.data.train_on == "train" else None
    metrics, head = compute_metrics(cfg, images, features, embedding, own=result.own, trained_rows=trained,
                                    layers=layers)
    if (found := metrics.pop("n_clusters_found", None)) is not None:  # K read off the learned features
        print(f"deepclust: {describe_n_clusters(found)}", file=sys.stderr)
        if found["role"] == "check":  # beside the pixels' estimate
            cfg = dataclasses.replace(cfg, resolution={**cfg.resolution, "n_clusters_check": found})
        else:  # the run trained without K: K is the run's from now on (config.yaml before metrics.json)
            cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, n_clusters=found["k"]),
                                      resolution={**cfg.resolution, "n_clusters": found})
            save_text(work / "config.yaml", cfg.to_yaml())
    tree = build_hierarchy(features, head.labels_, seed=cfg.train.seed)  # the merge tree of the clusters
    save_model(work, result.net)
    head.save(work / "head.npz")
    save_array(work / "embeddings.npy", embedding.astype(np.float32))
    save_array(work / "labels.npy", head.labels_.astype(np.int64))
    save_npz(work / "hierarchy.npz", leaves=tree.leaves, linkage=tree.linkage, groups=tree.groups)
    ips = result.images_per_second
    metrics = {"method": cfg.method, "data": cfg.data.spec, "epochs": result.epochs,
               "train_seconds": round(result.train_seconds, 2),
               "images_per_second": round(ips, 1) if ips is not None else None, **metrics,
               "resolution": cfg.resolution,  # views chosen from the data, budget plan, K
               "skipped_images": {"count": len(images.skipped), "first": images.skipped[:MAX_LISTED]}}
    save_json(work / "metrics.json", metrics)  # written last: its presence marks a finished run
    return metrics


def save_model(out: Path, net) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_bytes(out / "model.safetensors", save(state))
