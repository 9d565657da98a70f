"""A run from end to end: resolve the configuration against the data, train, read clusters off the
features, evaluate, and write the run directory.

    RUN/config.yaml        the full resolved configuration (reusable with --config)
    RUN/checkpoints/last.pt full training state, written atomically every epoch (--resume)
    RUN/log.jsonl          one JSON record per epoch
    RUN/model.safetensors  the network's weights
    RUN/head.npz           the fitted cluster head (centroids in its feature space), for predict
    RUN/embeddings.npy     float32 (N, D), dataset order
    RUN/labels.npy         int64 cluster of every image
    RUN/metrics.json       see ``compute_metrics``

Nothing is written before the configuration and the data have been checked, and every file is
written to a temporary name first and renamed, so a failure never leaves a half-written file or
destroys an earlier one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, build_config
from .data import ImageSet, load_images
from .errors import ConfigError, DataError

DEFAULT_VIEW_PRESET = {1: "digits", 3: "natural"}


def load_data(cfg: Config, spec: str | None = None) -> ImageSet:
    d = cfg.data
    return load_images(spec or d.spec, split=d.split, root=d.root, download=d.download, resize=d.resize)


def resolve(cfg: Config, images: ImageSet) -> Config:
    """Fill every ``auto`` / ``None`` from the data, check what depends on it, and return a new Config."""
    from .nets import default_backbone
    from .views import VIEW_PRESETS

    n = len(images)
    if n < 2:
        raise DataError(f"data '{images.spec}' has {n} image(s); at least 2 are needed")
    raw = cfg.to_dict()
    if cfg.net.backbone == "auto":
        raw["net"]["backbone"] = default_backbone(images.channels, images.image_size)
    views = raw["views"]
    if views["preset"] == "auto":
        views["preset"] = DEFAULT_VIEW_PRESET[images.channels]
    preset = VIEW_PRESETS[views["preset"]]
    for f in ("crop_scale", "flip", "rotation", "shift", "rescale", "color_jitter", "grayscale_p"):
        if views[f] is None:
            value = getattr(preset, f)
            views[f] = list(value) if isinstance(value, tuple) else value
    cl = raw["cluster"]
    if cl["n_clusters"] is None:
        cl["n_clusters"] = int(len(np.unique(images.labels))) if images.labels is not None else 10
    if cl["n_clusters"] > n:
        raise ConfigError(f"n_clusters (K={cl['n_clusters']}) is larger than the number of images (N={n})")
    if cl["head"] == "auto":
        cl["head"] = "spectral"
    if cl["features"] == "auto":
        cl["features"] = "backbone"
    if cl["features"] not in ("backbone", "embedding"):
        from .nets import EmbeddingNet

        names = EmbeddingNet(raw["net"]["backbone"], images.channels, images.image_size, dim=cfg.net.dim).layer_names()
        if cl["features"] not in names:
            raise ConfigError(f"cluster.features: unknown layer '{cl['features']}'; this network has: "
                              f"{', '.join(names)}")
    if raw["optim"]["batch_size"] > n:
        raw["optim"]["batch_size"] = n - n % (cfg.train.devices * cfg.train.num_nodes)
    if cfg.method == "and" and cfg.options.neighbours >= n:
        raise ConfigError(f"options.neighbours (k={cfg.options.neighbours}) must be smaller than N={n}")
    return build_config(raw)


def training_subset(cfg: Config, images: ImageSet) -> ImageSet:
    """The images trained on: all loaded, or only the train split (``data.train_on: train``)."""
    if cfg.data.train_on == "all":
        return images
    if images.split is None or not (images.split == 0).any():
        raise DataError(f"data '{images.spec}' has no train split; use data.train_on=all")
    return images.subset(images.split == 0)


def view_spec(cfg: Config):
    from .views import VIEW_PRESETS

    base = VIEW_PRESETS[cfg.views.preset]
    v = cfg.views
    return dataclasses.replace(
        base, crop_scale=tuple(v.crop_scale), flip=v.flip, rotation=v.rotation, shift=v.shift,
        rescale=tuple(v.rescale), color_jitter=v.color_jitter, grayscale_p=v.grayscale_p,
    )


# ----------------------------------------------------------------------------------------------
# Writing


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)

    _atomic_write(path, w)


def save_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------
# Features -> clusters -> metrics


def compute_metrics(cfg: Config, images: ImageSet, features: np.ndarray, embedding: np.ndarray,
                    *, head=None) -> tuple[dict[str, Any], Any]:
    """Cluster ``features`` (the layer ``cluster.features`` names) with the configured head (labels
    never enter it), then score against labels if any.

    Keys: n_images, n_clusters, cluster_head, cluster_features, cluster_sizes, collapse (report),
    head_seconds; with labels: acc, nmi, nmi_geometric, ari (the chosen head), kmeans_embedding_acc /
    _nmi / _ari (the papers' protocol: k-means on the embedding), knn_top1 (test split against train
    split when both exist, else leave-one-out), knn_protocol.
    """
    from .evaluate import clustering_scores, collapse_report, knn_top1
    from .heads import fit_head
    from .structure import kmeans

    k = cfg.cluster.n_clusters
    feats = features
    t0 = time.perf_counter()
    if head is None:
        head = fit_head(feats, cfg.cluster.head, k, seed=cfg.train.seed, n_neighbors=cfg.cluster.n_neighbors)
        pred = head.labels_
    else:
        pred = head.predict(feats)
    head_seconds = time.perf_counter() - t0
    collapse = collapse_report(pred, k)
    sizes = collapse.pop("sizes")
    if collapse["collapsed"]:
        print(f"deepclust: warning: the clustering collapsed: {collapse['warning']}", file=sys.stderr)
    m: dict[str, Any] = {
        "n_images": len(images), "n_clusters": k, "cluster_head": cfg.cluster.head,
        "cluster_features": cfg.cluster.features, "head_seconds": round(head_seconds, 3),
        "cluster_sizes": sizes, "collapse": collapse,
    }
    if images.labels is not None:
        m.update(clustering_scores(images.labels, pred))
        km_labels, _, _ = kmeans(embedding, k, seed=cfg.train.seed)
        m.update({f"kmeans_embedding_{key}": v for key, v in clustering_scores(images.labels, km_labels).items()})
        t = cfg.eval.knn_temperature or cfg.memory.temperature
        kk = min(cfg.eval.knn_k, len(images) - 1)
        split = images.split
        if split is not None and (split == 0).any() and (split == 1).any():
            tr, te = split == 0, split == 1
            m["knn_top1"] = knn_top1(embedding[tr], images.labels[tr], embedding[te], images.labels[te],
                                     k=min(kk, int(tr.sum())), temperature=t)
            m["knn_protocol"] = "test split against train split"
        else:
            m["knn_top1"] = knn_top1(embedding, images.labels, k=kk, temperature=t)
            m["knn_protocol"] = "leave-one-out"
        if cfg.eval.linear_probe and split is not None and (split == 0).any() and (split == 1).any():
            from .evaluate import linear_probe

            m["linear_probe_top1"] = linear_probe(features[split == 0], images.labels[split == 0],
                                                  features[split == 1], images.labels[split == 1],
                                                  seed=cfg.train.seed)
    for key, v in list(m.items()):
        if isinstance(v, (np.floating, np.integer)):
            m[key] = v.item()
    return m, head


# ----------------------------------------------------------------------------------------------
# fit / evaluate


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run unless asked to."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    has_run = (out / "config.yaml").exists() or (out / "checkpoints" / "last.pt").exists()
    if resume:
        if not (out / "checkpoints" / "last.pt").exists():
            raise DataError(f"nothing to resume: no checkpoint under {out / 'checkpoints'}")
    elif has_run and not overwrite:
        raise DataError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def fit_run(cfg: Config, *, resume: bool = False, overwrite: bool = False, fabric=None) -> dict[str, Any]:
    """Train, cluster, evaluate and write the run directory. Returns metrics.json's content
    (an empty dict on processes other than rank 0)."""
    from .train import Trainer, extract_features, make_fabric

    out = Path(cfg.out)
    if resume:  # the run's own configuration wins
        prepare_out_dir(out, resume, overwrite)
        progress = cfg.train.progress
        cfg = build_config(read_run_config(out))
        cfg.out, cfg.train.progress = str(out), progress
    images = load_data(cfg)
    cfg = resolve(cfg, images)
    fabric = fabric or make_fabric(cfg)
    fabric.launch()
    if fabric.global_rank == 0:
        if not resume:
            prepare_out_dir(out, resume, overwrite)
            if overwrite:
                for stale in ("log.jsonl", "checkpoints/last.pt", "metrics.json"):
                    (out / stale).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        save_text(out / "config.yaml", cfg.to_yaml())
    fabric.barrier()
    train_images = training_subset(cfg, images)
    trainer = Trainer(cfg, train_images.images, out, fabric=fabric, labels=train_images.labels,
                      view_spec=view_spec(cfg))
    result = trainer.fit(resume=resume)
    if fabric.global_rank != 0:
        return {}
    features, embedding = extract_features(result.net, result.views, images.images, device=fabric.device,
                                           layer=cfg.cluster.features)
    metrics, head = compute_metrics(cfg, images, features, embedding)
    save_model(out, result.net)
    head.save(out / "head.npz")
    save_array(out / "embeddings.npy", embedding.astype(np.float32))
    save_array(out / "labels.npy", head.labels_.astype(np.int64))
    metrics = {
        "method": cfg.method, "data": cfg.data.spec, "epochs": result.epochs,
        "train_seconds": round(result.train_seconds, 2),
        "images_per_second": round(result.images_per_second, 1), **metrics,
    }
    save_json(out / "metrics.json", metrics)
    return metrics


def save_model(out: Path, net) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _atomic_write(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))


def read_run_config(run: Path) -> dict:
    from .config import read_yaml

    path = run / "config.yaml"
    if not path.exists():
        raise DataError(f"not a run directory (no config.yaml): {run}")
    return read_yaml(str(path))


def load_network(run: Path, cfg: Config, images: ImageSet):
    from safetensors.torch import load_file

    from .nets import EmbeddingNet
    from .views import BatchViews

    net = EmbeddingNet(cfg.net.backbone, images.channels, images.image_size, dim=cfg.net.dim)
    path = run / "model.safetensors"
    if not path.exists():
        raise DataError(f"run {run} has no model.safetensors (did training finish?)")
    try:
        net.load_state_dict(load_file(str(path)))
    except RuntimeError:
        raise DataError(f"data '{images.spec}' ({images.channels} channel(s), {images.image_size[0]}x"
                        f"{images.image_size[1]}) does not fit the network of run {run}") from None
    return net, BatchViews(view_spec(cfg), images.channels)


def evaluate_run(run: str | Path, *, data: str | None = None, overrides: dict | None = None,
                 write: bool = True) -> dict[str, Any]:
    """Recompute a finished run's features, clusters and metrics (optionally on other data or with
    another head: ``overrides={"cluster": {"head": "kmeans"}}``)."""
    from .train import extract_features

    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    cfg = build_config(read_run_config(run), overrides or {})
    images = load_data(cfg, data)
    net, views = load_network(run, cfg, images)
    features, embedding = extract_features(net, views, images.images, layer=cfg.cluster.features)
    if cfg.cluster.n_clusters > len(images):
        raise ConfigError(f"n_clusters (K={cfg.cluster.n_clusters}) is larger than the number of images "
                          f"(N={len(images)})")
    metrics, head = compute_metrics(cfg, images, features, embedding)
    metrics = {"method": cfg.method, "data": data or cfg.data.spec, **metrics}
    prior = run / "metrics.json"
    if prior.exists():
        old = json.loads(prior.read_text())
        for key in ("epochs", "train_seconds", "images_per_second"):
            if key in old:
                metrics.setdefault(key, old[key])
    if write:  # beside, never over, the run's own metrics.json
        save_json(run / "metrics_evaluate.json", metrics)
    return metrics


def compare_heads(run: str | Path, combos=(("kmeans", "embedding"), ("kmeans", "backbone"),
                                          ("spectral", "embedding"), ("spectral", "backbone"))) -> list[dict]:
    """Scores of several (head, features) choices on one finished run, features extracted once.
    Used by the cluster-head benchmark; needs labels for the scores (the heads never see them)."""
    from .train import extract_features

    run = Path(run)
    cfg = build_config(read_run_config(run))
    images = load_data(cfg)
    net, views = load_network(run, cfg, images)
    cache: dict[str, np.ndarray] = {}
    rows = []
    for head, features in combos:
        if features not in cache:
            cache[features], embedding = extract_features(net, views, images.images, layer=features)
        c = build_config(cfg.to_dict(), {"cluster": {"head": head, "features": features}})
        m, _ = compute_metrics(c, images, cache[features], embedding)
        rows.append({"head": head, "features": features,
                     **{k: m.get(k) for k in ("acc", "nmi", "ari", "head_seconds")},
                     "collapsed": m["collapse"]["collapsed"]})
    return rows


def predict_run(run: str | Path, data: str, *, split: str = "all") -> tuple[np.ndarray, ImageSet]:
    """Assign new images to a finished run's clusters (its saved head: nearest centroid in the
    head's feature space). Returns (cluster per image, the images)."""
    from .heads import ClusterHead
    from .train import extract_features

    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    cfg = build_config(read_run_config(run), {"data": {"split": split}})
    images = load_data(cfg, data)
    net, views = load_network(run, cfg, images)
    head_path = run / "head.npz"
    if not head_path.exists():
        raise DataError(f"run {run} has no head.npz (did training finish?)")
    features, _ = extract_features(net, views, images.images, layer=cfg.cluster.features)
    return ClusterHead.load(head_path).predict(features), images
