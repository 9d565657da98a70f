"""Structure discovery as pure functions on arrays (numpy or torch), tested without any network."""

from .clustering import assign_to_centroids, kmeans, spectral, spectral_embedding
from .knn import knn_graph, topk_cosine
from .neighbourhoods import (
    curriculum_fraction,
    entropy_and_neighbours,
    neighbourhood_quality,
    select_lowest_entropy,
    similarity_block_rows,
)

__all__ = [
    "assign_to_centroids", "curriculum_fraction", "entropy_and_neighbours", "kmeans", "knn_graph",
    "neighbourhood_quality", "select_lowest_entropy", "similarity_block_rows", "spectral",
    "spectral_embedding", "topk_cosine",
]
