"""Methods: each a short file composing the shared parts (memory bank, structure, losses)."""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from .anchor_neighbourhood import AnchorNeighbourhoodDiscovery
from .base import Method
from .instance import InstanceDiscrimination

METHODS: dict[str, type[Method]] = {
    "instance": InstanceDiscrimination,
    "and": AnchorNeighbourhoodDiscovery,
}


def build_method(cfg: Config, n_images: int) -> Method:
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ConfigError(f"unknown method '{cfg.method}'; known: {', '.join(METHODS)}") from None
    return cls(cfg, n_images)


__all__ = ["METHODS", "Method", "build_method"]
