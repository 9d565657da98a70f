"""A run end to end: resolve the configuration from the data, train, read clusters off the features,
evaluate, and write the run directory.

The run directory's lifecycle (one writer, atomic files, nothing lost) is ``rundir.py``; here:
 - **Resume** restores everything training depends on (``train.py``) and gives the same result as an
   uninterrupted run; the log is rewritten from the checkpoint's history (no duplicate records), time
   is cumulative, resuming a finished run changes nothing and says so, and flags that contradict the
   run being resumed are refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, build_config
from .data import ImageSet, load_images
from .data.sources import MAX_LISTED
from .errors import ConfigError, DataError
from .io import save_array, save_json, save_text
from .limits import check_training
from .rundir import finished_run, is_launched_child, prepare_out_dir, read_run_config, real_out, swap_in

ALL_HEADS = (("kmeans", "embedding"), ("kmeans", "backbone"), ("spectral", "embedding"), ("spectral", "backbone"))
RESUME_MAY_CHANGE = ("train.progress", "train.threads", "out")  # flags that --resume accepts


def load_data(cfg: Config, spec: str | None = None) -> ImageSet:
    d = cfg.data
    return load_images(spec or d.spec, split=d.split, root=d.root, download=d.download, resize=d.resize)


def resolve(cfg: Config, images: ImageSet) -> Config:
    """Fill every ``auto`` / ``None`` from the data, check what depends on it, and return a new Config."""
    from .methods import method_class
    from .nets import default_backbone

    n = len(images)
    if n < 2:
        raise DataError(f"data '{images.spec}' has {n} image(s); at least 2 are needed")
    raw = cfg.to_dict()
    if cfg.net.backbone == "auto":
        raw["net"]["backbone"] = default_backbone(images.channels, images.image_size)
    raw["net"]["input_shape"] = [images.channels, *images.image_size]
    notes: dict = {}
    _resolve_views(raw["views"], images, notes)
    _resolve_cluster(raw, cfg, images)
    if raw["optim"]["batch_size"] > n:
        raw["optim"]["batch_size"] = n - n % (cfg.train.devices * cfg.train.num_nodes)
    method_class(cfg.method).check_data(cfg.options, n)
    resolved = build_config(raw)
    if resolved.train.epochs is None:  # epochs (and an auto backbone) fitted to train.budget (budget.py)
        from .budget import fit_to_budget

        train = training_subset(resolved, images)
        resolved, notes["budget"] = fit_to_budget(
            resolved, train.images, view_spec(resolved), labels=train.labels,
            backbone_auto=cfg.net.backbone == "auto" and raw["cluster"]["features"] in ("backbone", "embedding"))
    elif resolved.train.budget is not None:  # explicit epochs win over a budget; say so
        from .budget import unused_budget_note

        notes["budget"] = unused_budget_note(resolved)
    if notes and not is_launched_child():
        _announce(notes)
    resolved.resolution = notes  # the evidence and measurements, for the run's log / metrics
    return resolved


def _resolve_views(views: dict, images: ImageSet, notes: dict) -> None:
    """``views`` (a raw config section) filled in place: an ``auto`` preset chosen from the pixels
    (view_rules.py; fields given explicitly win), then every unset field from the preset."""
    from .views import VIEW_PRESETS

    if views["preset"] == "auto":
        from .view_rules import choose_views

        chosen, notes["views"] = choose_views(images.images)
        views["preset"] = notes["views"]["preset"]
        views.update({f: v for f, v in chosen.items() if views[f] is None})
    preset = VIEW_PRESETS[views["preset"]]
    for f in ("crop_scale", "flip", "rotation", "shift", "rescale", "color_jitter", "grayscale_p"):
        if views[f] is None:
            value = getattr(preset, f)
            views[f] = list(value) if isinstance(value, tuple) else value


def _resolve_cluster(raw: dict, cfg: Config, images: ImageSet) -> None:
    """The cluster section filled in place: K from the labels when known (else 10), the head, features
    and eigenvector count from the method's defaults (chosen on the development data), checked."""
    from .methods import method_class
    from .nets import EmbeddingNet

    cl = raw["cluster"]
    if cl["n_clusters"] is None:
        cl["n_clusters"] = int(len(np.unique(images.labels))) if images.labels is not None else 10
    if cl["n_clusters"] > len(images):
        raise ConfigError(f"n_clusters (K={cl['n_clusters']}) is larger than the number of images (N={len(images)})")
    head, features, eigenvectors = method_class(cfg.method).cluster_head
    for key, default in (("head", head), ("features", features)):
        if cl[key] == "auto":
            cl[key] = default
    if cl["eigenvectors"] is None:
        cl["eigenvectors"] = eigenvectors
    if cl["features"] not in ("backbone", "embedding"):
        names = EmbeddingNet(raw["net"]["backbone"], images.channels, images.image_size, dim=cfg.net.dim,
                             sobel=cfg.net.sobel).layer_names()
        if cl["features"] not in names:
            raise ConfigError(f"cluster.features: unknown layer '{cl['features']}'; this network has: "
                              f"{', '.join(names)}")


def _announce(notes: dict) -> None:
    """One stderr line per automatic choice (views from the pixels, epochs fitted to the budget)."""
    from .budget import describe
    from .view_rules import describe as describe_views

    for key, line in (("views", describe_views), ("budget", describe)):
        if key in notes:
            print(f"deepclust: {line(notes[key])}", file=sys.stderr)


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
# Features -> clusters -> metrics


def fit_cluster_head(cfg: Config, features: np.ndarray, kind: str, method_labels: np.ndarray | None = None,
                     trained_rows: np.ndarray | None = None):
    """A head read off ``features`` (never labels): k-means, spectral, or the method's own clusters
    (``method``: kept for the rows it was trained on, other rows by the head's kNN vote)."""
    from .heads import fit_head, head_from_labels

    k = cfg.cluster.n_clusters
    if kind != "method":
        comps = cfg.cluster.eigenvectors * k if cfg.cluster.eigenvectors else None
        return fit_head(features, kind, k, seed=cfg.train.seed, n_neighbors=cfg.cluster.n_neighbors,
                        n_components=comps)
    if method_labels is None:
        raise ConfigError(f"cluster.head: method '{cfg.method}' has no clusters of its own; use kmeans or spectral")
    rows = np.arange(len(features)) if trained_rows is None else trained_rows
    head = head_from_labels(features[rows], method_labels, max(k, int(method_labels.max()) + 1), kind="method")
    labels = head.predict(features)
    labels[rows] = method_labels
    head.labels_ = labels
    return head


def _scores(images: ImageSet, pred: np.ndarray) -> dict[str, Any]:
    from .evaluate import clustering_scores

    return clustering_scores(images.labels, pred) if images.labels is not None else {}


def _knn_scores(cfg: Config, images: ImageSet, embedding: np.ndarray, features: np.ndarray) -> dict[str, Any]:
    from .evaluate import knn_top1, linear_probe

    m: dict[str, Any] = {}
    t = cfg.eval.knn_temperature or cfg.memory.temperature
    kk = min(cfg.eval.knn_k, len(images) - 1)
    split = images.split
    both = split is not None and bool((split == 0).any()) and bool((split == 1).any())
    if both:
        tr, te = split == 0, split == 1
        m["knn_top1"] = knn_top1(embedding[tr], images.labels[tr], embedding[te], images.labels[te],
                                 k=min(kk, int(tr.sum())), temperature=t)
        m["knn_protocol"] = "test split against train split"
    else:
        m["knn_top1"] = knn_top1(embedding, images.labels, k=kk, temperature=t)
        m["knn_protocol"] = "leave-one-out"
    if cfg.eval.linear_probe and both:
        m["linear_probe_top1"] = linear_probe(features[split == 0], images.labels[split == 0],
                                              features[split == 1], images.labels[split == 1], seed=cfg.train.seed)
    return m


def compute_metrics(cfg: Config, images: ImageSet, features: np.ndarray, embedding: np.ndarray,
                    *, head=None, method_labels: np.ndarray | None = None, trained_rows=None,
                    layers: dict[str, np.ndarray] | None = None) -> tuple[dict[str, Any], Any]:
    """Cluster ``features`` (the layer ``cluster.features`` names) with the configured head (labels
    never enter it), then score against labels if any.

    Keys: n_images, n_clusters, cluster_head, cluster_features, cluster_sizes, collapse (report),
    head_seconds; with labels: acc, nmi, nmi_geometric, ari (the chosen head), ``heads`` (every
    post-hoc head on the backbone and embedding layers, and the method's own clusters when it has
    them: acc / nmi / ari / seconds each), kmeans_embedding_acc / _nmi / _ari (the papers' protocol),
    knn_top1 (test split against train split when both exist, else leave-one-out), knn_protocol.
    """
    from .evaluate import collapse_report

    k = cfg.cluster.n_clusters
    t0 = time.perf_counter()
    if head is None:
        head = fit_cluster_head(cfg, features, cfg.cluster.head, method_labels, trained_rows)
        pred = head.labels_
    else:
        pred = head.predict(features)
    head_seconds = time.perf_counter() - t0
    collapse = collapse_report(pred, max(k, int(pred.max()) + 1))
    sizes = collapse.pop("sizes")
    if collapse["collapsed"]:
        print(f"deepclust: warning: the clustering collapsed: {collapse['warning']}", file=sys.stderr)
    m: dict[str, Any] = {"n_images": len(images), "n_clusters": k, "cluster_head": cfg.cluster.head,
                         "cluster_features": cfg.cluster.features, "head_seconds": round(head_seconds, 3),
                         "cluster_sizes": sizes, "collapse": collapse, **_scores(images, pred)}
    if images.labels is not None:
        layers = dict(layers or {})
        layers.setdefault(cfg.cluster.features, features)
        layers.setdefault("embedding", embedding)
        m["heads"] = score_heads(cfg, images, layers, method_labels, trained_rows,
                                 known={(cfg.cluster.head, cfg.cluster.features): (m, head_seconds)})
        km = next(h for h in m["heads"] if (h["head"], h["features"]) == ("kmeans", "embedding"))
        m.update({f"kmeans_embedding_{key}": km[key] for key in ("acc", "nmi", "ari")})
        m.update(_knn_scores(cfg, images, embedding, features))
    return _plain(m), head


def score_heads(cfg: Config, images: ImageSet, layers: dict[str, np.ndarray], method_labels=None,
                trained_rows=None, known: dict | None = None) -> list[dict[str, Any]]:
    """Scores of every post-hoc head on every given layer (and of the method's own clusters)."""
    combos = [c for c in ALL_HEADS if c[1] in layers]
    if method_labels is not None:
        combos.append(("method", cfg.cluster.features if cfg.cluster.features in layers else "embedding"))
    rows = []
    for kind, layer in combos:
        if known and (kind, layer) in known:
            m, seconds = known[(kind, layer)]
            scores = {key: m[key] for key in ("acc", "nmi", "ari")}
        else:
            t0 = time.perf_counter()
            head = fit_cluster_head(cfg, layers[layer], kind, method_labels, trained_rows)
            seconds = time.perf_counter() - t0
            scores = {key: v for key, v in _scores(images, head.labels_).items() if key in ("acc", "nmi", "ari")}
        rows.append({"head": kind, "features": layer, **scores, "head_seconds": round(seconds, 3)})
    return rows


def _plain(m: dict[str, Any]) -> dict[str, Any]:
    for key, v in list(m.items()):
        if isinstance(v, (np.floating, np.integer)):
            m[key] = v.item()
    return m


# ----------------------------------------------------------------------------------------------
# fit


def _resume_config(out: Path, cfg: Config, given: dict | None) -> Config:
    """The run's own configuration; a flag given with --resume must not contradict it."""
    from .config import set_dotted

    run_cfg = build_config(read_run_config(out))
    run = run_cfg.to_dict()
    if str((given or {}).get("method", run["method"])).strip().lower() != run["method"]:  # issue 23
        raise ConfigError(f"--resume continues the {run['method']} run in {out}, not a {given['method']} run; "
                          "drop --method or start a new run with another --out")
    for key, value in _flatten(given or {}):
        if key in RESUME_MAY_CHANGE:
            continue
        probe: dict = {}
        set_dotted(probe, key, value)
        wanted = build_config(run, probe).to_dict()
        if _lookup(wanted, key) != _lookup(run, key):
            raise ConfigError(f"--resume continues the run as it was configured: {key} is "
                              f"{_lookup(run, key)!r} there, not {value!r}; drop the flag or start a new run")
    run_cfg.out, run_cfg.train.progress = str(out), cfg.train.progress
    run_cfg.train.threads = cfg.train.threads or run_cfg.train.threads
    return run_cfg


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def fit_run(cfg: Config, *, resume: bool = False, overwrite: bool = False, fabric=None,
            given: dict | None = None) -> dict[str, Any]:
    """Train, cluster, evaluate and write the run directory. Returns metrics.json's content (an empty
    dict on processes other than rank 0). ``given``: the options the user set explicitly (checked
    against the run on ``resume``)."""
    from .locks import claim_run_dir, machine_activity

    out = real_out(cfg.out)  # the directory itself, however --out spells it (links, ..)
    primary = not is_launched_child()
    claim = claim_run_dir(out) if primary else None
    try:
        with machine_activity():
            if primary:
                prepare_out_dir(out, resume, overwrite)
            if resume:
                cfg = _resume_config(out, cfg, given)
                if primary and (done := finished_run(out)) is not None:
                    print(f"deepclust: the run in {out} has finished; nothing to resume", file=sys.stderr)
                    return done
            return _fit(cfg, out, resume, overwrite, fabric, primary)
    finally:
        if claim is not None:
            claim.release()


def _fit(cfg: Config, out: Path, resume: bool, overwrite: bool, fabric, primary: bool) -> dict[str, Any]:
    from .train import Trainer, make_fabric

    images = load_data(cfg)
    check_training(cfg, len(images), images.channels, *images.image_size)  # before any allocation
    cfg = resolve(cfg, images)
    work = out.with_name(out.name + ".partial") if overwrite else out
    if primary:
        if overwrite and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        save_text(work / "config.yaml", cfg.to_yaml())
    fabric = fabric or make_fabric(cfg)
    fabric.launch()
    train_images = training_subset(cfg, images)
    trainer = Trainer(cfg, train_images.images, work, fabric=fabric, labels=train_images.labels,
                      view_spec=view_spec(cfg))
    result = trainer.fit(resume=resume)
    if fabric.global_rank != 0:
        return {}
    metrics = _write_outputs(cfg, images, result, work, fabric.device)
    if overwrite:
        swap_in(work, out)
    return metrics


def _write_outputs(cfg: Config, images: ImageSet, result, work: Path, device) -> dict[str, Any]:
    from .train import extract_features

    layers = {}
    for layer in dict.fromkeys((cfg.cluster.features, "backbone")):
        layers[layer], embedding = extract_features(result.net, result.views, images.images, device=device,
                                                    layer=layer)
    features = layers[cfg.cluster.features]
    trained = np.flatnonzero(images.split == 0) if cfg.data.train_on == "train" else None
    metrics, head = compute_metrics(cfg, images, features, embedding, method_labels=result.method_clusters,
                                    trained_rows=trained, layers=layers)
    save_model(work, result.net)
    head.save(work / "head.npz")
    save_array(work / "embeddings.npy", embedding.astype(np.float32))
    save_array(work / "labels.npy", head.labels_.astype(np.int64))
    ips = result.images_per_second
    metrics = {"method": cfg.method, "data": cfg.data.spec, "epochs": result.epochs,
               "train_seconds": round(result.train_seconds, 2),
               "images_per_second": round(ips, 1) if ips is not None else None, **metrics,
               "resolution": getattr(cfg, "resolution", {}),  # views chosen from the data, budget plan
               "skipped_images": {"count": len(images.skipped), "first": images.skipped[:MAX_LISTED]}}
    save_json(work / "metrics.json", metrics)  # written last: its presence marks a finished run
    return metrics


def save_model(out: Path, net) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    from .io import save_bytes

    save_bytes(out / "model.safetensors", save(state))


def load_network(run: Path, cfg: Config, images: ImageSet):
    from safetensors.torch import load_file

    from .nets import EmbeddingNet
    from .views import BatchViews

    shape = [images.channels, *images.image_size]
    if cfg.net.input_shape is not None and cfg.net.input_shape[0] != shape[0]:
        raise DataError(f"data '{images.spec}' has {shape[0]} channel(s) but run {run} was trained on images "
                        f"with {cfg.net.input_shape[0]}; use images with {cfg.net.input_shape[0]} channel(s)")
    if cfg.net.input_shape is not None and list(cfg.net.input_shape) != shape:
        c, h, w = cfg.net.input_shape
        raise DataError(f"data '{images.spec}' is {shape[1]}x{shape[2]} with {shape[0]} channel(s) but run {run} "
                        f"was trained on {h}x{w} with {c}; pass --resize {h} (square images) or use matching images")
    from .methods import method_class

    net = EmbeddingNet(cfg.net.backbone, images.channels, images.image_size, dim=cfg.net.dim, sobel=cfg.net.sobel,
                       head=method_class(cfg.method).embedding_head)
    path = run / "model.safetensors"
    if not path.exists():
        raise DataError(f"run {run} has no model.safetensors (did training finish?)")
    try:
        net.load_state_dict(load_file(str(path)))
    except (RuntimeError, OSError) as e:
        raise DataError(f"cannot load the network of run {run} for data '{images.spec}': "
                        f"{str(e).splitlines()[0][:200]}") from None
    return net, BatchViews(view_spec(cfg), images.channels)


# ----------------------------------------------------------------------------------------------
# evaluate / predict


def evaluate_run(run: str | Path, *, data: str | None = None, overrides: dict | None = None,
                 write: bool = True) -> dict[str, Any]:
    """Recompute a finished run's features, clusters and metrics (optionally on other data or with
    another head: ``overrides={"cluster": {"head": "kmeans"}}``)."""
    from .train import extract_features

    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    cfg = build_config(read_run_config(run), overrides or {})
    if cfg.cluster.head == "method":
        raise ConfigError("evaluate cannot re-run a method's own clustering; use the run's labels.npy, "
                          "or --cluster-head kmeans|spectral")
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


def compare_heads(run: str | Path, combos=ALL_HEADS) -> list[dict]:
    """Scores of several (head, features) choices on one finished run, features extracted once.
    Needs labels for the scores (the heads never see them)."""
    from .train import extract_features

    run = Path(run)
    cfg = build_config(read_run_config(run))
    images = load_data(cfg)
    net, views = load_network(run, cfg, images)
    layers = {}
    for layer in {f for _, f in combos}:
        layers[layer], _ = extract_features(net, views, images.images, layer=layer)
    return score_heads(cfg, images, layers)


def predict_run(run: str | Path, data: str, *, split: str = "all",
                resize: int | str | None = None) -> tuple[np.ndarray, ImageSet]:
    """Assign new images to a finished run's clusters with its saved head (``resize``: to the run's
    square image size). Size and channels must match the run's. Returns (cluster per image, the
    images)."""
    from .heads import ClusterHead
    from .train import extract_features

    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    data_layer = {"split": split} if resize is None else {"split": split, "resize": resize}
    cfg = build_config(read_run_config(run), {"data": data_layer})
    images = load_data(cfg, data)
    net, views = load_network(run, cfg, images)
    head_path = run / "head.npz"
    if not head_path.exists():
        raise DataError(f"run {run} has no head.npz (did training finish?)")
    head = ClusterHead.load(head_path)
    features, _ = extract_features(net, views, images.images, layer=cfg.cluster.features)
    return head.predict(features), images
