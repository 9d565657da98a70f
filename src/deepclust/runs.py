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
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save

from .config import Config
from .configure import resume_config
from .data import ImageSet
from .data.sources import MAX_LISTED
from .io import ensure_dir, save_array, save_bytes, save_json, save_npz, save_text
from .limits import check_training
from .locks import claim_run_dir, machine_activity
from .rundir import (check_out, finished_run, is_launched_child, mark_run, prepare_out_dir, real_out, swap_in,
                     unique_dir)
from .resolution import describe_n_clusters, load_data, resolve, training_subset, view_spec
from .scoring import compute_metrics
from .structure.hierarchy import build_hierarchy
from .train import Trainer, TrainResult, extract_features, make_fabric

WORK_ENV = "DEEPCLUST_RUN_WORK"  # the directory rank 0 writes, for the ranks Fabric launches


def fit_run(cfg: Config, *, resume: bool = False, overwrite: bool = False, fabric=None,
            given: dict | None = None, images: ImageSet | None = None,
            started: float | None = None) -> dict[str, Any]:
    """Train, cluster, evaluate and write the run directory. Returns metrics.json's content (an empty
    dict on processes other than rank 0). ``given``: the options the user set explicitly (checked
    against the run on ``resume``). ``images``: images held in memory (``api.Clusterer``), used
    instead of loading ``cfg.data.spec``. ``started``: the ``time.perf_counter()`` reading a time
    budget counts from (the command line's: deepclust's first line, durations.entry_started; None: now, as for the API)."""
    started = time.perf_counter() if started is None else started  # (budget.py)
    out = real_out(cfg.out)  # the directory itself, however --out spells it (links, ..)
    check_out(out, None if resume else cfg.data.spec)  # before any lock or file
    primary = not is_launched_child()
    claim = claim_run_dir(out) if primary else None
    try:
        with machine_activity():
            if primary:
                prepare_out_dir(out, resume, overwrite)
            if resume:
                cfg = resume_config(out, cfg, given)
                if primary and (done := finished_run(out)) is not None:
                    print(f"deepclust: the run in {out} has finished; nothing to resume", file=sys.stderr)
                    return done
            return _fit(cfg, out, resume, overwrite, fabric, primary, images, started)
    finally:
        if claim is not None:
            claim.release()


def _fit(cfg: Config, out: Path, resume: bool, overwrite: bool, fabric, primary: bool,
         images: ImageSet | None, started: float) -> dict[str, Any]:
    images = load_data(cfg.data) if images is None else images
    check_training(cfg, len(images), images.channels, *images.image_size)  # before any allocation
    cfg = resolve(cfg, images, started)
    work = _work_dir(out, overwrite, primary)
    try:
        if primary:
            mark_run(work)  # first thing: what makes the directory recognisable as the tool's
            save_text(work / "config.yaml", cfg.to_yaml())
        metrics = _train(cfg, images, work, resume, fabric)
    except BaseException:
        if overwrite and primary:  # the rebuild this process made; the old run is untouched
            shutil.rmtree(work, ignore_errors=True)
        raise
    if overwrite and primary:
        swap_in(work, out)
    return metrics


def _work_dir(out: Path, overwrite: bool, primary: bool) -> Path:
    """The directory the run is written to: ``out``, or for ``--overwrite`` a rebuild beside it under
    a name made unique here (``.OUT.partial-XXXXXXXX``: never a name of the user's). Launched ranks,
    which write nothing, are told it by the environment."""
    if not primary:
        return Path(os.environ.get(WORK_ENV) or out)
    work = unique_dir(out, "partial") if overwrite else out
    ensure_dir(work)
    os.environ[WORK_ENV] = str(work)
    return work


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
    cfg = _settle_n_clusters(cfg, metrics.pop("n_clusters_found", None), work)
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


def _settle_n_clusters(cfg: Config, found: dict | None, work: Path) -> Config:
    """The run's K read off the learned features (``found``: ``scoring.compute_metrics``'s
    ``n_clusters_found``): where the run trained without K, K and its evidence go into the
    configuration (``config.yaml`` written again, with K) and its resolution; where K came from the
    pixels, the check goes beside that estimate. Either way one stderr line says what was found."""
    if found is None:
        return cfg
    print(f"deepclust: {describe_n_clusters(found)}", file=sys.stderr)
    if found["role"] == "check":
        return dataclasses.replace(cfg, resolution={**cfg.resolution, "n_clusters_check": found})
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, n_clusters=found["k"]),
                              resolution={**cfg.resolution, "n_clusters": found})
    save_text(work / "config.yaml", cfg.to_yaml())  # before metrics.json: K is the run's from now on
    return cfg


def save_model(out: Path, net) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_bytes(out / "model.safetensors", save(state))
