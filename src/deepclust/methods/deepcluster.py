"""DeepCluster (Caron, Bojanowski, Joulin & Douze, ECCV 2018), the baseline of PCP.

Each epoch (Sec 3.2-3.3 and the authors' code, facebookresearch/deepcluster ``main.py``):
 1. features of every training image, network in eval mode, no augmentation;
 2. PCA to ``pca_dim`` (256) dimensions with whitening where the features have more, then L2
    normalisation (``structure.preprocess.deepcluster_whiten``); a smaller network's features
    (D <= 256) keep the leading components explaining ``pca_variance`` of their variance instead
    (label-free; whitening all of them would lift the noise directions to unit variance);
 3. k-means with ``clusters`` (K') centroids, ``kmeans_iters`` Lloyd iterations (faiss; faiss
    re-seeds an empty cluster by splitting a large one, the original's empty-cluster handling);
 4. the assignments are pseudo-labels for a linear classifier on top of the features, re-initialised
    every epoch (weights N(0, 0.01), bias 0, as ``main.py``) with its optimiser state dropped;
 5. batches drawn uniformly over the non-empty clusters (``UnifLabelSampler``), cross-entropy.

Choices where our skeleton differs from the original network, written down:
 - the features clustered are the backbone's output before its last ReLU (tap ``pre_relu``:
   ``ip1`` of JULE's CNN, ``fc2`` of AlexNet; a ResNet's pooled output has none), as the original
   clusters fc7 with the classifier's last ReLU removed (``main.py``); the classifier reads the
   output after the ReLU (tap ``backbone``), as the original's top layer after it re-appends the
   ReLU; the network has no projection head (``embedding_head = False``), so "embedding" is the
   backbone output L2-normalised;
 - the Sobel filter of the original is ``net.sobel``: ``auto`` in ``deepcluster-cpu`` (on for colour
   input, off for grey), on in ``deepcluster-cifar10-resnet18``;
 - the method's own final clusters (``--cluster-head method``) are DeepCluster's own clustering
   procedure (steps 1-3) run once more on the final network with K = ``cluster.n_clusters``, so
   over-clustered training (K' > K) still yields K clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import option
from ..errors import ConfigError
from ..losses.deepcluster import deepcluster_loss
from ..structure.batching import epoch_generator, split_batches
from ..structure.clustering import kmeans
from ..structure.preprocess import deepcluster_whiten
from ..structure.sampling import uniform_over_clusters
from ..views import draw_generator
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

FEATURES = FeatureRequest("pre_relu", augmented=False)


@dataclass
class DeepClusterOptions:
    """DeepCluster (Caron et al. 2018)."""

    clusters: int | None = option(None, low=2)  # K' of k-means; None: cluster.n_clusters (no over-clustering)
    pca_dim: int = option(256, low=1)  # the original's PCA dimension, used where the features have more
    # features of D <= pca_dim: the leading components explaining this share of the variance (a
    # label-free rule, fixed before measuring). digits, seed 0, deepcluster-cpu, its own clusters' ACC / NMI
    # (kNN top-1): 0.9 keeps 9 of ip1's 160, 0.936 / 0.889 (0.944); 0.95 keeps 12, 0.748 / 0.796 (0.948);
    # 1.0 whitens all 160, 0.682 / 0.649 (0.962). One seed: the own-clustering figure moves a lot
    pca_variance: float = option(0.9, low=0, low_open=True, high=1)
    kmeans_iters: int = option(20, low=1)  # the original's Lloyd iterations
    reassign: int = option(1, low=1)  # epochs between re-clusterings (the original: 1)
    init_std: float = option(0.01, low=0, low_open=True, high=1)  # classifier re-initialisation N(0, std)


class DeepCluster(Method):
    name = "deepcluster"
    needs_k_to_train = True  # k-means at K (or K') every epoch, its classifier K-way
    Options = DeepClusterOptions
    uses_bank = False
    embedding_head = False
    taps = ("backbone",)

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        self.k = self.options.clusters or self.n_clusters()
        self.modules["classifier"] = nn.Linear(self.tap_dims["backbone"], self.k)

    @classmethod
    def check_data(cls, options: DeepClusterOptions, n_images: int) -> None:
        if options.clusters is not None and options.clusters > n_images:
            raise ConfigError(f"options.clusters (K'={options.clusters}) is larger than the number of images "
                              f"(N={n_images})")

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        return epoch % cfg.options.reassign == 0

    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return (FEATURES,)

    def _cluster(self, features: Tensor, k: int, seed: int) -> tuple[np.ndarray, int]:
        o = self.options  # DeepCluster Sec 3.3 / main.py: PCA-whitening, L2 normalisation, k-means
        x = deepcluster_whiten(features.cpu().numpy(), target=o.pca_dim, variance=o.pca_variance)
        labels, _, _ = kmeans(x, k, seed=seed, n_iter=o.kmeans_iters)
        return labels, x.shape[1]

    def discover(self, ctx: DiscoveryContext) -> Structure:
        labels, dim = self._cluster(ctx.features(FEATURES.tap), self.k, seed=self.cfg.train.seed * 1000 + ctx.epoch)
        return {"labels": torch.from_numpy(labels), "epoch": torch.tensor(ctx.epoch), "pca_dim": torch.tensor(dim)}

    def reset_parameters(self) -> list[nn.Parameter]:
        """After each fresh clustering (never on resume): the classifier re-initialised for the new
        pseudo-labels, from a generator of (seed, epoch), the same on every process."""
        g = draw_generator(self.cfg.train.seed, int(self.structure["epoch"]), 5_000_011)
        layer = self.modules["classifier"]
        with torch.no_grad():  # DeepCluster main.py: top_layer.weight.normal_(0, 0.01), bias.zero_()
            w = torch.randn(layer.weight.shape, generator=g) * self.options.init_std
            layer.weight.copy_(w.to(layer.weight.device))
            layer.bias.zero_()
        return list(layer.parameters())

    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        labels = self.structure["labels"].cpu()
        order = uniform_over_clusters(labels, n, epoch_generator(seed, epoch))  # UnifLabelSampler
        return split_batches(order, batch_size)

    def forward(self, taps: dict[str, Tensor]) -> dict[str, Tensor]:
        taps["logits"] = self.modules["classifier"](taps["backbone"])
        return taps

    def batch_loss(self, step: Step) -> Tensor:
        labels = self.structure["labels"].to(step.idx.device)[step.idx]
        return deepcluster_loss(step.outputs[0]["logits"], labels)

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        assigned = self.structure["labels"].cpu().numpy()
        out: dict[str, Any] = {"clusters": self.k, "non_empty": int(np.unique(assigned).size)}
        if "pca_dim" in self.structure:
            out["pca_dim"] = int(self.structure["pca_dim"])
        if labels is not None:
            from ..evaluate import nmi

            out["nmi_pseudo_labels"] = round(nmi(labels, assigned), 4)
        return out

    def final_features(self) -> tuple[FeatureRequest, ...]:
        return (FEATURES,)

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray:
        return self._cluster(ctx.features(FEATURES.tap), self.n_clusters(), seed=self.cfg.train.seed)[0]
