"""deepclust: unsupervised deep image clustering and representation learning."""

__version__ = "0.1.0"

from . import methods as _methods  # noqa: E402,F401  (registers every method's options with the config)
