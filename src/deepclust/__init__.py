"""deepclust: unsupervised deep image clustering and representation learning.

    from deepclust import Clusterer
    labels = Clusterer(method="pad").fit(images).labels_   # K estimated from the images
"""

# first: durations reads the clock when imported, what a command's time budget counts from
from . import durations as _durations  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    """``deepclust.Clusterer`` imported on first use, so that ``import deepclust`` (and the command
    line's start) does not load torch."""
    if name == "Clusterer":
        from .api import Clusterer

        return Clusterer
    raise AttributeError(f"module 'deepclust' has no attribute {name!r}")


__all__ = ["Clusterer", "__version__"]
