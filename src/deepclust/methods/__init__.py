"""Methods: each a short file composing the shared parts (memory bank, structure, losses), with its
own options. The registry below is the one line a new method adds; it is asked by name
(:func:`method_class`), and nothing is registered anywhere else by importing this package."""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .anchor_neighbourhood import AnchorNeighbourhoodDiscovery
from .base import DiscoveryContext, FeatureRequest, Method, Step
from .dccm import Dccm
from .deepcluster import DeepCluster
from .instance import InstanceDiscrimination
from .jule import Jule
from .pad import Pad
from .pcp import ProgressiveClusterPurification
from .scan import ScanPhase

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


def build_method(cfg: Config, n_images: int, tap_dims: dict[str, int] | None = None, **net_info) -> Method:
    """The configured method for ``n_images`` training images; ``net_info``: ``tap_shapes``,
    ``shallow_layer`` (see ``Method.__init__``)."""
    return method_class(cfg.method)(cfg, n_images, tap_dims, **net_info)


def build_phase(cfg: Config, n_images: int, tap_dims: dict[str, int] | None = None) -> Method | None:
    """The training phase after the method's epochs that ``cluster.head`` asks for (``scan``:
    the learned clustering stage, ``methods/scan.py``), or None."""
    return ScanPhase(cfg, n_images, tap_dims) if cfg.cluster.head == "scan" else None


__all__ = ["METHODS", "DiscoveryContext", "FeatureRequest", "Method", "Step", "build_method", "build_phase",
           "method_class"]
