"""JULE: joint agglomerative clustering and representation learning (Yang, Parikh, Batra, CVPR 2016;
``../shared/papers/JULE_cvpr2016.txt``). DRAFT for issue 24: not registered in ``METHODS`` yet; it
assumes the loop hooks of the lifecycle issue (``total_epochs`` re-read every epoch, the ``inv``
rate schedule per optimiser step, ``discover`` returning everything that persists).

The recurrence (Alg 1, Sec 3.6), in periods of ``period_epochs`` epochs (the paper: "about 20"):
 * period 0: the initial over-clustering (1-NN components, ``structure.agglomeration``) of the raw
   pixels (``ctx.images``), L2-normalised as the paper does; no merges (the authors' code trains
   its first period on the initial clusters);
 * period p >= 1: features of every image (un-augmented ``embedding`` = ip1 L2-normalised: the
   network has no projection head), the directed kNN graph of Eq 4 rebuilt from them, then
   ceil(eta x n_c) greedy merges by Eq 7 (``period_merges``), never past the target n_c*;
 * every period trains the network on the weighted triplet loss of Eq 35 (``losses.jule``) against
   the current clusters; the run ends with the period whose discovery reached n_c*.
The structure is the current labels and the period; ``set_structure`` only stores them.

Batches (ours; the authors' code draws uniform batches, where clusters of ~4 images rarely meet in
a batch of 100): each epoch the images of every cluster, in a seeded random order, are cut into
chunks of ``per_cluster`` images, the chunks shuffled and concatenated, then cut into batches; so a
batch holds several same-cluster rows (positives) from many clusters (negatives).

Discovery runs on rank 0 while the others wait in the broadcast: the slowest step is the kNN search
plus the agglomeration of the first merging period (most clusters); at 70,000 images it is bounded
by the agglomeration benchmark (<= 60 s target) plus a faiss kNN pass, far below the process
group's time-out (torch.distributed's default 30 minutes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import option
from ..errors import ConfigError
from ..losses.jule import weighted_triplet_loss
from ..structure.agglomeration import (
    MODES,
    directed_knn_graph,
    initial_clusters,
    merge_clusters,
    period_merges,
)
from ..structure.batching import epoch_generator, split_batches
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

FEATURES = FeatureRequest("embedding", augmented=False)


@dataclass
class JuleOptions:
    """JULE (Yang et al. 2016), Table 2 and Sec 4.1.2."""

    k_s: int = option(20, low=1)  # neighbours of the sample graph (Eq 4)
    a: float = option(1.0, low=0, low_open=True)  # sigma^2 = a x mean squared kNN distance (Eq 4)
    k_c: int = option(5, low=1)  # neighbour clusters in Eq 7, negatives per anchor in Eq 35
    lam: float = option(1.0, low=0)  # lambda of Eq 7
    gamma: float = option(2.0, low=0, low_open=True)  # positive weight of Eq 35
    margin: float = option(0.2, low=0)  # triplet margin (appendix A.3)
    eta: float = option(0.9, low=0, low_open=True, high=1)  # unrolling rate (0.2 for face data)
    period_epochs: int = option(20, low=1)  # epochs of network training per period
    affinity: str = option("exact", choices=MODES)  # Eq 14, or the approximations Eq 19 / Eq 21
    alpha: float = option(0.0, low=-1, low_open=True)  # alpha of Eq 21
    per_cluster: int = option(4, low=2)  # same-cluster rows drawn together into a batch (ours)


class Jule(Method):
    name = "jule"
    Options = JuleOptions
    uses_bank = False
    embedding_head = False  # ip1, L2-normalised (Table 9: ip1 -> l2-norm -> wt-loss)
    taps = ("embedding",)
    cluster_head = ("method", "embedding", 0)  # SF: the recurrence's own clusters

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None):
        super().__init__(cfg, n_images, tap_dims)
        self.target = cfg.cluster.n_clusters or 10

    @classmethod
    def check_data(cls, options: JuleOptions, n_images: int) -> None:
        if options.k_s >= n_images:
            raise ConfigError(f"options.k_s ({options.k_s}) must be smaller than the number of images ({n_images})")

    # -- length ----------------------------------------------------------------------------------
    def _periods_left(self, n_clusters: int) -> int:
        """Merging periods still needed to go from n_clusters to the target (Sec 3.6)."""
        left = 0
        while n_clusters > self.target:
            n_clusters -= period_merges(n_clusters, self.options.eta, self.target)
            left += 1
        return left

    def total_epochs(self) -> int:
        """Periods until n_c* is reached, each ``period_epochs`` long; before the first discovery an
        estimate from initial clusters of ~4 images (Sec 3.6), replaced once they are known."""
        if self.structure is None:
            return self.options.period_epochs * (1 + self._periods_left(math.ceil(self.n_images / 4)))
        period, n_c = int(self.structure["period"]), int(self.structure["n_clusters"])
        return self.options.period_epochs * (period + 1 + self._periods_left(n_c))

    # -- structure -------------------------------------------------------------------------------
    def needs_discovery(self, epoch: int) -> bool:
        return epoch % self.options.period_epochs == 0

    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return () if epoch == 0 else (FEATURES,)

    def discover(self, ctx: DiscoveryContext) -> Structure:
        period = ctx.epoch // self.options.period_epochs
        if period == 0:
            pixels = ctx.images.reshape(len(ctx.images), -1).float().cpu().numpy()
            labels = initial_clusters(pixels)  # Sec 3.6: raw intensities, L2-normalised
        else:
            o = self.options
            x = ctx.features(FEATURES.tap).float().cpu().numpy()
            current = self.structure["labels"].cpu().numpy()
            n_c = int(current.max()) + 1
            w = directed_knn_graph(x, o.k_s, a=o.a)  # Eq 4, rebuilt from this period's features
            labels = merge_clusters(w, current, period_merges(n_c, o.eta, self.target), k_c=o.k_c,
                                    lam=o.lam, mode=o.affinity, alpha=o.alpha)
        return {"labels": torch.from_numpy(labels), "period": torch.tensor(period),
                "n_clusters": torch.tensor(int(labels.max()) + 1)}

    # -- batches and loss ------------------------------------------------------------------------
    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        """Chunks of ``per_cluster`` same-cluster images, shuffled, cut into batches (see above)."""
        g = epoch_generator(seed, epoch)
        labels = self.structure["labels"].cpu()
        order = torch.randperm(n, generator=g)
        order = order[torch.sort(labels[order], stable=True).indices]  # by cluster, random within
        sorted_labels = labels[order]
        start = torch.searchsorted(sorted_labels, sorted_labels, side="left")
        rank = torch.arange(n) - start  # position within its cluster
        chunk = torch.unique_consecutive(sorted_labels * n + rank // self.options.per_cluster,
                                         return_inverse=True)[1]
        place = torch.randperm(int(chunk.max()) + 1, generator=g)[chunk]
        return split_batches(order[torch.sort(place * n + rank, stable=True).indices], batch_size)

    def batch_loss(self, step: Step) -> Tensor:
        o = self.options
        labels = self.structure["labels"].to(step.idx.device)
        z = step.outputs[0]["embedding"]
        return weighted_triplet_loss(z, labels[step.idx], step.gather(z), labels[step.gidx.to(labels.device)],
                                     step.positions, k_c=o.k_c, gamma=o.gamma, margin=o.margin)

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        current = self.structure["labels"].cpu().numpy()
        out: dict[str, Any] = {"period": int(self.structure["period"]),
                               "n_clusters": int(self.structure["n_clusters"])}
        if labels is not None:
            from ..evaluate import nmi

            out["nmi_clusters"] = round(nmi(labels, current), 4)
        return out

    # -- the method's own clusters (SF) ----------------------------------------------------------
    def final_features(self) -> tuple[FeatureRequest, ...]:
        return (FEATURES,)

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray:
        """SF: the recurrence's clusters; if training stopped above the target (a shortened run),
        the remaining merges on the final features."""
        current = self.structure["labels"].cpu().numpy()
        n_c = int(current.max()) + 1
        if n_c <= self.target:
            return current.astype(np.int64)
        o = self.options
        w = directed_knn_graph(ctx.features(FEATURES.tap).float().cpu().numpy(), o.k_s, a=o.a)
        return merge_clusters(w, current, n_c - self.target, k_c=o.k_c, lam=o.lam, mode=o.affinity,
                              alpha=o.alpha)
