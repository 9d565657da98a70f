"""The configuration resolved once from the data: every ``auto`` / ``None`` filled in, with the
evidence of each automatic choice (``Config.resolution``), into one frozen Config.

 - views: an ``auto`` preset chosen from the pixels (``view_rules.py``), fields given explicitly win;
 - network: the backbone for the image size and channels, the input shape recorded;
 - images: a set whose images are all identical is refused (nothing to cluster);
 - clusters: K when not given (``auto``): where no method of the run reads K while it trains
   (``Method.needs_k_to_train``: instance discrimination, AND, PAD), left to be read off the learned
   features after training (``scoring.settle_n_clusters``, ``structure/n_clusters.py``); else
   estimated from the pixels of the training images (PCP's floor, DeepCluster's K', DCCM's head,
   JULE's target, SCAN's heads need it before training), never from their labels, and checked on the
   learned features after training; head / features / eigenvectors from the method's defaults;
 - epochs: fitted to ``train.budget`` by timing the real training step (``budget.py``) when none are
   given.
The resolved configuration is what ``config.yaml`` holds: resolving it again changes nothing and
measures nothing.

Images streamed from a store (``datapath.py``: ``ImageSet.in_memory`` is False) are never read whole
here: whether they are all identical is the store's record, the views are chosen from the same seeded
sample ``view_rules`` reads, and K is estimated from the pixels of a seeded sample of
:data:`PIXEL_SAMPLE` images (all of them up to that many: then the same K as in memory).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from . import budget, view_rules
from .config import VIEW_FIELDS, ClusterConfig, Config, DataConfig, NetConfig, ViewsConfig, validate
from .data import ImageSet, load_images
from .errors import ConfigError, DataError
from .methods import method_class, stage_class
from .nets import EmbeddingNet, default_backbone
from .rundir import is_launched_child
from .structure.n_clusters import estimate_from_pixels, identical_images
from .views import VIEW_PRESETS, ViewSpec

PIXEL_SAMPLE = 10_000  # streamed images K is estimated from (estimate_n_clusters reads at most as many)


def load_data(data: DataConfig, spec: str | None = None) -> ImageSet:
    """The images ``cfg.data`` names (``spec`` instead of its own, for evaluate / predict)."""
    return load_images(spec or data.spec, split=data.split, root=data.root, download=data.download,
                       resize=data.resize)


def resolve(cfg: Config, images: ImageSet, started: float | None = None) -> Config:
    """Fill every ``auto`` / ``None`` from the data, check what depends on it, and return the new
    Config, its ``resolution`` holding the evidence and measurements of each automatic choice.
    ``started``: the ``time.perf_counter()`` reading when the run began (a budget counts what was
    spent since: loading the images, estimating K)."""
    n = len(images)
    if n < 2:
        raise DataError(f"data '{images.spec}' has {n} image(s); at least 2 are needed")
    method = method_class(cfg.method)
    method.check_data(cfg.options, n)
    notes: dict = {}
    cluster = _resolve_cluster(cfg.cluster, method, cfg.data, images, notes)
    net = _resolve_net(cfg.net, cluster.features, images)
    views = _resolve_views(cfg.views, images, notes)
    world = cfg.train.devices * cfg.train.num_nodes
    optim = cfg.optim if cfg.optim.batch_size <= n else dataclasses.replace(cfg.optim, batch_size=n - n % world)
    resolved = validate(dataclasses.replace(cfg, net=net, views=views, cluster=cluster, optim=optim))
    if resolved.train.epochs is None:  # epochs (and an auto backbone) fitted to train.budget (budget.py)
        train, spec = training_subset(resolved.data, images), view_spec(views)
        resolved, notes["budget"] = budget.fit_to_budget(
            resolved, method, train.images, spec, labels=train.labels, evaluated=images, started=started,
            backbone_auto=cfg.net.backbone == "auto" and cluster.features in ("backbone", "embedding"))
    elif resolved.train.budget is not None:  # explicit epochs win over a budget; say so
        notes["budget"] = budget.unused_budget_note(resolved.train)
    if notes and not is_launched_child():
        _announce(notes)
    return dataclasses.replace(resolved, resolution=notes)


def _resolve_cluster(cl: ClusterConfig, method: type, data: DataConfig, images: ImageSet,
                     notes: dict) -> ClusterConfig:
    """K when not given: left to be read off the learned features after training where no method of
    the run reads K while it trains (``Method.needs_k_to_train``), else estimated from the pixels of
    the training images (never from the labels: the evidence goes to ``notes["n_clusters"]``); the
    head, features and eigenvector count from the ``method`` class's defaults (``Method.cluster_head``,
    chosen on the development data), the features from the stage the head adds to the run where it
    names the layer its head reads (``Method.cluster_features``)."""
    head, features, eigenvectors = method.cluster_head
    head = head if cl.head == "auto" else cl.head
    stage = stage_class(head)
    if stage is not None and stage.cluster_features is not None:  # the layer a stage's head reads
        features = stage.cluster_features
    k = cl.n_clusters
    needing = [c.name for c in (method, stage) if c is not None and c.needs_k_to_train] if k is None else []
    train = training_subset(data, images) if needing else None
    sample = pixel_sample(train, PIXEL_SAMPLE) if needing else None
    if _identical(images):  # any K would split them arbitrarily (DeepCluster cannot whiten them)
        raise DataError(f"all {len(images)} images are identical: nothing to cluster")
    if needing:
        k, found = estimate_from_pixels(sample, seed=0)
        notes["n_clusters"] = {**found, "when": "before training", "needed_by": needing}
        if not train.in_memory and len(train) > PIXEL_SAMPLE:
            notes["n_clusters"]["pixels_of"] = f"a seeded sample of {PIXEL_SAMPLE} of the {len(train)} streamed images"
    elif k is None:
        notes["n_clusters"] = {"k": None, "when": "after training", "trained_without_k": method.name}
    if k is not None and k > len(images):
        raise ConfigError(f"n_clusters (K={k}) is larger than the number of images (N={len(images)})")
    return dataclasses.replace(cl, n_clusters=k, head=head,
                               features=features if cl.features == "auto" else cl.features,
                               eigenvectors=eigenvectors if cl.eigenvectors is None else cl.eigenvectors)


def _resolve_net(net: NetConfig, features: str, images: ImageSet) -> NetConfig:
    """The backbone for the image size and channels (``auto``), the Sobel filter (``auto``: on for
    colour input), the input shape, and the layer the clusters are read from checked against the
    network."""
    backbone = default_backbone(images.channels, images.image_size) if net.backbone == "auto" else net.backbone
    sobel = images.channels == 3 if net.sobel is None else net.sobel  # auto: on for colour input
    if features not in ("backbone", "embedding"):
        names = EmbeddingNet(backbone, images.channels, images.image_size, dim=net.dim, sobel=sobel).layer_names()
        if features not in names:
            raise ConfigError(f"cluster.features: unknown layer '{features}'; this network has: {', '.join(names)}")
    return dataclasses.replace(net, backbone=backbone, sobel=sobel, input_shape=[images.channels, *images.image_size])


def _resolve_views(views: ViewsConfig, images: ImageSet, notes: dict) -> ViewsConfig:
    """An ``auto`` preset chosen from the pixels (view_rules.py; fields given explicitly win), then
    every unset field from the preset."""
    given = {f: getattr(views, f) for f in VIEW_FIELDS}
    preset = views.preset
    if preset == "auto":
        chosen, notes["views"] = view_rules.choose_views(pixel_sample(images, view_rules.SAMPLE_SIZE))
        notes["views"]["n_images"] = len(images)
        preset = notes["views"]["preset"]
        given.update({f: v for f, v in chosen.items() if given[f] is None})
    spec = VIEW_PRESETS[preset]
    for f, value in given.items():
        if value is None:
            value = getattr(spec, f)
            given[f] = list(value) if isinstance(value, tuple) else value
    return dataclasses.replace(views, preset=preset, **given)


def _announce(notes: dict) -> None:
    """One stderr line per automatic choice (K, views from the pixels, epochs fitted to the budget)."""
    for key, line in (("n_clusters", describe_n_clusters), ("views", view_rules.describe),
                      ("budget", budget.describe)):
        if key in notes:
            print(f"deepclust: {line(notes[key])}", file=sys.stderr)


def describe_n_clusters(note: dict) -> str:
    """The stderr line of an estimated K: which K, from what, why, and the runner-up."""
    if note.get("k") is None:
        return (f"n_clusters auto: {note['trained_without_k']} trains without K; K is read off its learned "
                "features after training")
    if note.get("role") == "check":
        verdict = "agrees with" if note["agrees"] else "differs by more than 20% from"
        return (f"n_clusters check: {_found(note)} {verdict} the K = {note['k_before']} estimated from the "
                "pixels before training (kept); set --n-clusters to choose K")
    if note.get("role") == "estimate":  # read off the learned features
        return f"n_clusters {note['k']} (auto): {_found(note)}; set --n-clusters to choose K"
    if "silhouette" not in note:
        return f"n_clusters {note['k']} (auto) from the {note['features']}: {note['criterion']}"
    score = note["silhouette"][str(note["k"])]
    lo, hi = note["k_range"]
    runner = note.get("runner_up")
    second = f", runner-up K = {runner['k']} ({runner['score']:.3f})" if runner else ""
    return (f"n_clusters {note['k']} (auto): the best silhouette ({score:.3f}) of spectral clustering of the "
            f"{note['features']} for K = {lo}..{hi} on {note['n_images']} images{second}; "
            "set --n-clusters to choose K")


def _found(note: dict) -> str:
    """K read off the learned features, in words: the K, the criterion and its score, the runner-up."""
    if "scores" not in note:  # the graph's components, or too little to compare
        return f"K = {note['k']} from {note['features']} after training: {note['criterion']}"
    lo, hi = note["k_range"]
    runner = note.get("runner_up")
    second = f", runner-up K = {runner['k']} ({runner['score']:.3f})" if runner else ""
    return (f"K = {note['k']} from {note['features']} after training: {note['criterion']} "
            f"{note['scores'][str(note['k'])]:.3f} over K = {lo}..{hi} on {note['n_images']} images{second}")


def training_subset(data: DataConfig, images: ImageSet) -> ImageSet:
    """The images trained on: all loaded, or only the train split (``data.train_on: train``)."""
    if data.train_on == "all":
        return images
    if images.split is None or not (images.split == 0).any():
        raise DataError(f"data '{images.spec}' has no train split; use data.train_on=all")
    return images.subset(images.split == 0)


def view_spec(views: ViewsConfig) -> ViewSpec:
    """The augmentation of a resolved ``views`` section: its preset with every field of the section
    (:data:`config.VIEW_FIELDS`; pairs as tuples)."""
    given = {f: getattr(views, f) for f in VIEW_FIELDS}
    return dataclasses.replace(VIEW_PRESETS[views.preset],
                               **{f: tuple(v) if isinstance(v, list) else v for f, v in given.items()})


def _identical(images: ImageSet) -> bool:
    return identical_images(images.images) if images.in_memory else images.images.identical()


def pixel_sample(images: ImageSet, size: int, seed: int = 0) -> np.ndarray:
    """The images held in memory; of streamed ones, a seeded sample of ``size`` in dataset order: the
    sample ``view_rules`` draws (all images up to ``size``)."""
    if images.in_memory:
        return images.images
    n = len(images)
    return images.images[np.sort(np.random.default_rng(seed).choice(n, size=min(n, size), replace=False))]
