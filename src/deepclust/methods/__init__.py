"""Methods: each a short file composing the shared parts (memory bank, structure, losses), with its
own options. The registries below are the one line a new method adds; they are asked by name
(:func:`method_class`, :func:`run_methods`), and nothing is registered anywhere else by importing
this package.

A run is a list of methods trained one after another on the same network (:func:`run_methods`):
the configured ``method``, then the one ``cluster.head`` names in :data:`STAGES` (a cluster head
that is trained: SCAN). Each method's own clusters are read by the cluster head of its place in the
run: ``method`` for the configured one, a stage's registered name for the stage."""

from __future__ import annotations

import dataclasses

from ..config import Config
from ..errors import ConfigError
from ..nets import EmbeddingNet
from .anchor_neighbourhood import AnchorNeighbourhoodDiscovery
from .base import DiscoveryContext, FeatureRequest, Method, Step
from .dccm import Dccm
from .dec import Dec
from .deepcluster import DeepCluster
from .instance import InstanceDiscrimination
from .jule import Jule
from .pad import Pad
from .pcp import ProgressiveClusterPurification
from .scan import Scan

METHODS: dict[str, type[Method]] = {
    "instance": InstanceDiscrimination,
    "and": AnchorNeighbourhoodDiscovery,
    "pcp": ProgressiveClusterPurification,
    "deepcluster": DeepCluster,
    "pad": Pad,
    "dccm": Dccm,
    "jule": Jule,
}

def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; known: {', '.join(METHODS)}") from None


def option_flags() -> dict[str, tuple[str, str]]:
    """The methods' own command-line flags (and ``Clusterer`` parameters): every field of a registered
    method's ``Options`` declared with ``option(flag=HELP)``, as NAME -> (``options.NAME``, HELP). The
    flag sets the configured method's option of that name; a name several methods declare is one flag,
    its help theirs joined."""
    flags: dict[str, tuple[str, str]] = {}
    for cls in METHODS.values():
        for f in dataclasses.fields(cls.Options):
            text = f.metadata.get("flag")
            if text:
                before = flags.get(f.name, (None, None))[1]
                flags[f.name] = (f"options.{f.name}", text if before is None else f"{before}; {text}")
    return flags


def build_network(cfg: Config, shape) -> EmbeddingNet:
    """The network ``cfg`` describes for images of ``shape`` (C, H, W), untrained, with the configured
    method's embedding head (``Method.embedding_head``) and its backbone options (JULE's ip1)."""
    method = method_class(cfg.method)
    return EmbeddingNet(cfg.net.backbone, shape[0], tuple(shape[1:]), dim=cfg.net.dim, sobel=cfg.net.sobel,
                        head=method.embedding_head, backbone_options=method.backbone_options(cfg.options))


def build_method(cfg: Config, n_images: int, tap_dims: dict[str, int] | None = None, **net_info) -> Method:
    """The configured method for ``n_images`` training images; ``net_info``: ``tap_shapes``,
    ``shallow_layer`` (see ``Method.__init__``)."""
    return method_class(cfg.method)(cfg, n_images, tap_dims, **net_info)


# Methods trained after the configured one, added by the cluster head of the same name: the head is
# what they learn (their ``assignment_map``).
STAGES: dict[str, type[Method]] = {
    "scan": Scan,
    "dec": Dec,
}
METHOD_HEAD = "method"  # the cluster head that reads the configured method's own clusters


def stage_class(head: str) -> type[Method] | None:
    """The method the cluster head ``head`` adds to a run (:data:`STAGES`), or None."""
    return STAGES.get(head)


def run_methods(cfg: Config) -> dict[str, type[Method]]:
    """The classes a run of ``cfg`` trains, in order, each under the cluster head that reads its own
    clusters: ``cfg.method`` under :data:`METHOD_HEAD`, then the one ``cluster.head`` adds
    (:data:`STAGES`), if any, under that name."""
    stage = stage_class(cfg.cluster.head)
    return {METHOD_HEAD: method_class(cfg.method), **({cfg.cluster.head: stage} if stage is not None else {})}


__all__ = ["METHODS", "METHOD_HEAD", "STAGES", "DiscoveryContext", "FeatureRequest", "Method", "Step",
           "build_method", "build_network", "method_class", "option_flags", "run_methods", "stage_class"]
