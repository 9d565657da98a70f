"""deepclust: unsupervised deep image clustering and representation learning."""

__version__ = "0.1.0"
