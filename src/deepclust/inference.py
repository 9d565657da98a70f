"""A finished run used again: its network loaded, its features re-clustered and re-scored
(``evaluate``), new images assigned to its clusters (``predict``), its clusters re-cut at another K
from the tree it kept (``recut``: no network, no images, no training). Nothing of the run is changed;
``evaluate`` writes ``metrics_evaluate.json`` beside the run's own metrics. Every file of the run is
read through :class:`runfiles.RunFiles`, which refuses a missing or damaged one in one line, and
the run's outputs (``labels.npy``, ``embeddings.npy``) are checked before anything else is done."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .data import ImageSet
from .errors import ConfigError, DataError
from .heads import HEADS, ClusterHead, OwnClusters
from .io import save_json
from .methods import METHOD_HEAD, build_network, stage_class
from .nets import EmbeddingNet
from .datapath import inference_images
from .resolution import view_spec
from .runfiles import RunFiles, damaged
from .structure.hierarchy import cut
from .evaluate import knn_report, probe_report
from .scoring import ALL_HEADS, compute_metrics, score_heads
from .train import extract_features
from .views import BatchViews


def load_network(run: Path | RunFiles, cfg: Config, images: ImageSet) -> tuple[EmbeddingNet, BatchViews]:
    """The trained network of ``run`` (its ``model.safetensors``, checked by
    :meth:`RunFiles.state`) and its un-augmenting views (:func:`network_from_state`)."""
    files = run if isinstance(run, RunFiles) else RunFiles(run)
    return network_from_state(cfg, images, files.state(), files.path)


def network_from_state(cfg: Config, images: ImageSet, state: dict, run) -> tuple[EmbeddingNet, BatchViews]:
    """The network ``cfg`` describes with the trained weights ``state`` (a ``model.safetensors``
    state dict, from a file or held in memory by ``api.Clusterer``), and its un-augmenting views, for
    ``images`` of the size and channels it was trained on (DataError in one line otherwise)."""
    shape = [images.channels, *images.image_size]
    if cfg.net.input_shape is not None and cfg.net.input_shape[0] != shape[0]:
        raise DataError(f"data '{images.spec}' has {shape[0]} channel(s) but run {run} was trained on images "
                        f"with {cfg.net.input_shape[0]}; use images with {cfg.net.input_shape[0]} channel(s)")
    if cfg.net.input_shape is not None and list(cfg.net.input_shape) != shape:
        c, h, w = cfg.net.input_shape
        raise DataError(f"data '{images.spec}' is {shape[1]}x{shape[2]} with {shape[0]} channel(s) but run {run} "
                        f"was trained on {h}x{w} with {c}; pass --resize {h} (square images) or use matching images")
    net = build_network(cfg, shape)
    try:
        net.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot load the network of run {run} for data '{images.spec}': "
                        f"{str(e).splitlines()[0][:200]}") from None
    return net, BatchViews(view_spec(cfg.views), images.channels)


def check_head_width(files: RunFiles, head: ClusterHead, features: np.ndarray, layer: str) -> None:
    """``head.npz`` must read features as wide as the network's ``layer`` gives (one line naming
    the file otherwise: a head of another run, or damaged)."""
    if head.width != features.shape[1]:
        raise damaged(files.path / "head.npz", f"the head reads {head.width}-d features but the run's "
                                               f"network gives {features.shape[1]}-d ones at '{layer}'")


def trained_head(files: RunFiles, cfg: Config) -> ClusterHead | None:
    """The run's saved head where ``cfg.cluster.head`` is one trained with the network (a method the
    head adds to the run, ``methods.STAGES``): read, never fitted again. None for a head fitted on
    the features; ConfigError in one line where the run trained no such head (its own configuration
    names another, or its saved head is no affine map of the features)."""
    if stage_class(cfg.cluster.head) is None:
        return None
    saved = files.head()
    if saved.assignment_map(cfg.cluster.features) is None or files.config().cluster.head != cfg.cluster.head:
        raise ConfigError(f"run {files.path} trained no {cfg.cluster.head} head; use --cluster-head {'|'.join(HEADS)}")
    return saved


def fitted_images(run: Path, cfg: Config, n: int, purpose: str) -> ImageSet:
    """The images a run of ``n`` was fitted on, read again through its data spec (DataError in one
    line when the data no longer holds ``n`` images; ``purpose`` names who needs them)."""
    images = inference_images(cfg)
    if len(images) != n:
        raise DataError(f"run {run} clustered {n} images but its data '{cfg.data.spec}' now has "
                        f"{len(images)}; {purpose} needs the images the run was fitted on")
    return images


def evaluate_run(run: str | Path, *, data: str | None = None, overrides: dict | None = None,
                 write: bool = True) -> dict[str, Any]:
    """Recompute a finished run's features, clusters and metrics (optionally on other data or with
    another head: ``overrides={"cluster": {"head": "kmeans"}}``)."""
    files = RunFiles(run)
    cfg = files.config(overrides)
    if cfg.cluster.head == METHOD_HEAD:
        raise ConfigError("evaluate cannot re-run a method's own clustering; use the run's labels.npy, "
                          f"or --cluster-head {'|'.join(HEADS)}")
    files.outputs(keep=False)
    prior, state = files.metrics(), files.state()
    saved = trained_head(files, cfg)
    images = inference_images(cfg, data)
    net, views = network_from_state(cfg, images, state, files.path)
    features, embedding = extract_features(net, views, images.images, layer=cfg.cluster.features)
    if cfg.cluster.n_clusters > len(images):
        raise ConfigError(f"n_clusters (K={cfg.cluster.n_clusters}) is larger than the number of images "
                          f"(N={len(images)})")
    own = {}
    if saved is not None:  # the head the run trained: its saved affine map
        check_head_width(files, saved, features, cfg.cluster.features)
        own[cfg.cluster.head] = OwnClusters(map=saved.assignment_map(cfg.cluster.features))
    metrics, head = compute_metrics(cfg, images, features, embedding, own=own)
    metrics = {"method": cfg.method, "data": data or cfg.data.spec, **metrics}
    for key in ("epochs", "train_seconds", "images_per_second"):
        if key in prior:
            metrics.setdefault(key, prior[key])
    if write:  # beside, never over, the run's own metrics.json
        save_json(files.path / "metrics_evaluate.json", metrics)
    return metrics


PROTOCOLS = ("clusters", "knn", "linear", "mlp")


def probe_run(run: str | Path, protocol: str, *, features: str = "embedding", write: bool = True) -> dict[str, Any]:
    """A representation protocol on a finished run: weighted kNN (``eval.knn_k``, the run's
    temperature), a linear probe or DCCM's one-hidden-layer MLP (``evaluate.probe_report``: the
    data's train/test split, else seeded stratified 5-fold). ``features``: ``embedding`` (the saved
    ``embeddings.npy``) or a layer of the trained network recomputed on the fitted images (e.g.
    ``conv5``, where AND / PAD / PCP put their linear classifier). The labels of the fitted images
    are read here for the score alone. Writes ``metrics_evaluate_PROTOCOL[_LAYER].json``."""
    if protocol not in PROTOCOLS[1:]:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got '{protocol}'")
    files = RunFiles(run)
    run, cfg = files.path, files.config()
    _, x = files.outputs()
    images = fitted_images(run, cfg, len(x), f"--protocol {protocol}")
    if images.labels is None:
        raise DataError(f"data '{cfg.data.spec}' has no labels; --protocol {protocol} scores against labels")
    if features != "embedding":
        net, views = load_network(files, cfg, images)
        x, _ = extract_features(net, views, images.images, layer=features)
    if protocol == "knn":
        temperature = cfg.eval.knn_temperature or cfg.memory.temperature
        m = knn_report(x, None, images.labels, images.split, k=cfg.eval.knn_k, temperature=temperature)
        m = {"protocol": "knn", "top1": m["knn_top1"], "split": m["knn_protocol"], "k": cfg.eval.knn_k,
             "temperature": temperature}
    else:
        m = probe_report(x, images.labels, images.split, protocol=protocol, seed=cfg.train.seed)
    where = "embeddings.npy" if features == "embedding" else f"layer {features}"
    m = {"method": cfg.method, "data": cfg.data.spec, "features": where, **m}
    if write:
        suffix = "" if features == "embedding" else f"_{features}"
        save_json(run / f"metrics_evaluate_{protocol}{suffix}.json", m)
    return m


def compare_heads(run: str | Path, combos=ALL_HEADS) -> list[dict]:
    """Scores of several (head, features) choices on one finished run, features extracted once.
    Needs labels for the scores (the heads never see them)."""
    files = RunFiles(run)
    cfg = files.config()
    images = inference_images(cfg)
    net, views = load_network(files, cfg, images)
    layers = {}
    for layer in {f for _, f in combos}:
        layers[layer], _ = extract_features(net, views, images.images, layer=layer)
    return score_heads(cfg.cluster, cfg.train.seed, images, layers)


def predict_run(run: str | Path, data: str, *, split: str = "all",
                resize: int | str | None = None) -> tuple[np.ndarray, ImageSet]:
    """Assign new images to a finished run's clusters with its saved head (``resize``: to the run's
    square image size). Size and channels must match the run's. Returns (cluster per image, the
    images)."""
    files = RunFiles(run)
    data_layer = {"split": split} if resize is None else {"split": split, "resize": resize}
    cfg = files.config({"data": data_layer})
    files.outputs(keep=False)
    state, head = files.state(), files.head()
    images = inference_images(cfg, data)
    net, views = network_from_state(cfg, images, state, files.path)
    features, _ = extract_features(net, views, images.images, layer=cfg.cluster.features)
    check_head_width(files, head, features, cfg.cluster.features)
    return head.predict(features), images


def recut_run(run: str | Path, n_clusters: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The clusters of a finished run's images at ``n_clusters`` (K'), cut from its ``hierarchy.npz``
    (``structure.hierarchy.cut``: the run's own clusters at its K, unions of them below it, parts of
    them above it). Returns (cluster per image, in the order of ``labels.npy``; a summary: the run's
    K, the level's sizes and, per new cluster, the run's clusters it holds)."""
    files = RunFiles(run)
    if not (files.path / "hierarchy.npz").exists():
        raise DataError(f"run {files.path} has no hierarchy.npz (fitted before runs kept their cluster tree, "
                        "or not finished); fit it again to re-cut it")
    tree = files.hierarchy()
    labels, _ = files.outputs(keep=False)
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise ConfigError(f"n_clusters must be a whole number, got {n_clusters!r}")
    recut = cut(tree, int(n_clusters))
    pairs = np.unique(np.c_[recut, labels], axis=0)  # (new, run cluster) pairs holding images, sorted
    parts = np.split(pairs[:, 1], np.flatnonzero(np.diff(pairs[:, 0])) + 1)  # every new cluster holds one
    holds = {str(c): part.tolist() for c, part in enumerate(parts)}
    return recut, {"n_images": len(recut), "n_clusters": int(n_clusters), "run_n_clusters": tree.n_clusters,
                   "cluster_sizes": np.bincount(recut, minlength=int(n_clusters)).tolist(),
                   "run_clusters": holds}
