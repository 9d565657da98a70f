"""A finished run used again: its network loaded, its features re-clustered and re-scored
(``evaluate``), new images assigned to its clusters (``predict``). Nothing of the run is changed;
``evaluate`` writes ``metrics_evaluate.json`` beside the run's own metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from .config import Config
from .configure import run_config
from .data import ImageSet
from .errors import ConfigError, DataError
from .heads import ClusterHead
from .io import save_json
from .methods import method_class
from .nets import EmbeddingNet
from .resolution import load_data, view_spec
from .evaluate import knn_report, probe_report
from .scoring import ALL_HEADS, compute_metrics, score_heads
from .train import extract_features
from .views import BatchViews


def load_network(run: Path, cfg: Config, images: ImageSet) -> tuple[EmbeddingNet, BatchViews]:
    """The trained network of ``run`` (its ``model.safetensors``) and its un-augmenting views
    (:func:`network_from_state`)."""
    path = run / "model.safetensors"
    if not path.exists():
        raise DataError(f"run {run} has no model.safetensors (did training finish?)")
    try:
        state = load_file(str(path))
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot load the network of run {run}: {str(e).splitlines()[0][:200]}") from None
    return network_from_state(cfg, images, state, run)


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
    net = EmbeddingNet(cfg.net.backbone, images.channels, images.image_size, dim=cfg.net.dim, sobel=cfg.net.sobel,
                       head=method_class(cfg.method).embedding_head)
    try:
        net.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot load the network of run {run} for data '{images.spec}': "
                        f"{str(e).splitlines()[0][:200]}") from None
    return net, BatchViews(view_spec(cfg.views), images.channels)


def run_dir(run: str | Path) -> Path:
    """``run`` as a path, DataError in one line if it is not a directory."""
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    return run


def run_outputs(run: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A finished run's clusters (``labels.npy``, int64 (N,)) and embeddings (``embeddings.npy``,
    float32 (N, D)); a missing, unreadable or inconsistent file is a one-line DataError."""
    run = run_dir(run)
    for name in ("labels.npy", "embeddings.npy"):
        if not (run / name).exists():
            raise DataError(f"run {run} has no {name} (did training finish?)")
    try:
        clusters = np.load(run / "labels.npy", allow_pickle=False).astype(np.int64)
        embedding = np.load(run / "embeddings.npy", allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the clusters of run {run}: {str(e).splitlines()[0][:200]}") from None
    if clusters.ndim != 1 or embedding.ndim != 2 or len(clusters) != len(embedding) or clusters.min() < 0:
        raise DataError(f"run {run}: labels.npy {clusters.shape} and embeddings.npy {embedding.shape} do not match")
    return clusters, embedding


def fitted_images(run: Path, cfg: Config, n: int, purpose: str) -> ImageSet:
    """The images a run of ``n`` was fitted on, read again through its data spec (DataError in one
    line when the data no longer holds ``n`` images; ``purpose`` names who needs them)."""
    images = load_data(cfg.data)
    if len(images) != n:
        raise DataError(f"run {run} clustered {n} images but its data '{cfg.data.spec}' now has "
                        f"{len(images)}; {purpose} needs the images the run was fitted on")
    return images


def evaluate_run(run: str | Path, *, data: str | None = None, overrides: dict | None = None,
                 write: bool = True) -> dict[str, Any]:
    """Recompute a finished run's features, clusters and metrics (optionally on other data or with
    another head: ``overrides={"cluster": {"head": "kmeans"}}``)."""
    run = run_dir(run)
    cfg = run_config(run, overrides)
    if cfg.cluster.head == "method":
        raise ConfigError("evaluate cannot re-run a method's own clustering; use the run's labels.npy, "
                          "or --cluster-head kmeans|spectral|agglomerative|graph")
    images = load_data(cfg.data, data)
    net, views = load_network(run, cfg, images)
    features, embedding = extract_features(net, views, images.images, layer=cfg.cluster.features)
    if cfg.cluster.n_clusters > len(images):
        raise ConfigError(f"n_clusters (K={cfg.cluster.n_clusters}) is larger than the number of images "
                          f"(N={len(images)})")
    phase_map = None
    if cfg.cluster.head == "scan":  # the head the run trained: its saved affine map
        saved = ClusterHead.load(run / "head.npz")
        if saved.kind != "linear" or run_config(run).cluster.head != "scan":
            raise ConfigError(f"run {run} trained no scan head; use --cluster-head kmeans|spectral|agglomerative|graph")
        phase_map = (cfg.cluster.features, saved.centroids, saved.bias)
    metrics, head = compute_metrics(cfg, images, features, embedding, phase_map=phase_map)
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
    run = run_dir(run)
    cfg = run_config(run)
    _, x = run_outputs(run)
    images = fitted_images(run, cfg, len(x), f"--protocol {protocol}")
    if images.labels is None:
        raise DataError(f"data '{cfg.data.spec}' has no labels; --protocol {protocol} scores against labels")
    if features != "embedding":
        net, views = load_network(run, cfg, images)
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
    run = Path(run)
    cfg = run_config(run)
    images = load_data(cfg.data)
    net, views = load_network(run, cfg, images)
    layers = {}
    for layer in {f for _, f in combos}:
        layers[layer], _ = extract_features(net, views, images.images, layer=layer)
    return score_heads(cfg.cluster, cfg.train.seed, images, layers)


def predict_run(run: str | Path, data: str, *, split: str = "all",
                resize: int | str | None = None) -> tuple[np.ndarray, ImageSet]:
    """Assign new images to a finished run's clusters with its saved head (``resize``: to the run's
    square image size). Size and channels must match the run's. Returns (cluster per image, the
    images)."""
    run = run_dir(run)
    data_layer = {"split": split} if resize is None else {"split": split, "resize": resize}
    cfg = run_config(run, {"data": data_layer})
    images = load_data(cfg.data, data)
    net, views = load_network(run, cfg, images)
    head_path = run / "head.npz"
    if not head_path.exists():
        raise DataError(f"run {run} has no head.npz (did training finish?)")
    head = ClusterHead.load(head_path)
    features, _ = extract_features(net, views, images.images, layer=cfg.cluster.features)
    return head.predict(features), images
