"""JULE: joint agglomerative clustering and representation learning (Yang, Parikh, Batra, CVPR 2016;
``../shared/papers/JULE_cvpr2016.txt``), on the method contract (issue 24).

The recurrence (Alg 1, Sec 3.6), in periods of ``train.epochs`` epochs each (the paper: "about 20";
``--epochs`` counts epochs per period, as AND's per round):
 * period 0: the initial over-clustering (1-NN chains, ``structure.agglomeration``) of the raw
   pixels (``ctx.images``), L2-normalised as the paper does; no merges (the authors' code trains
   its first period on the initial clusters);
 * period p >= 1: features of every image (un-augmented ``embedding`` = ip1 L2-normalised: the
   network has no projection head; Table 9's ip1 -> l2-norm -> wt-loss; ``options.ip1`` says what
   ``jule_cnn``'s ip1 is: ``linear``, the paper's and the authors' models' Linear, or ``bn_relu``,
   Linear -> BN -> ReLU), the directed kNN graph of Eq 4 rebuilt from them (K_s = 20, a = 1), then
   ceil(eta x n_c) greedy merges by Eq 7 (K_c = 5, lambda = 1; ``period_merges``), never past the
   target n_c* (``cluster.n_clusters``). With ``options.small_fraction`` > 0 (ours) Eq 7's merge
   sequence goes on past ceil(eta x n_c) and each period is cut at its last point where m = n_c -
   ceil(eta x n_c) clusters hold at least that fraction of the mean size n / m, the smaller ones
   then joining the large cluster they share the most kNN edge weight with (the plain cut where no
   point has m such clusters; ``structure.agglomeration.merge_clusters``, ``min_size``); 0 is the
   paper's cut after exactly ceil(eta x n_c) merges;
 * every period trains the network on the weighted triplet loss of Eq 35 (``losses.jule``;
   gamma = 2, margin 0.2) against the current clusters; Alg 1 trains once more after the merges
   that reach n_c* (its step 6 precedes the test of step 10), so the run ends with the period whose
   discovery reached n_c* (the authors' ``train.lua`` breaks before that last training).
The structure is the current labels, the period and the cluster count; ``set_structure`` only
stores them; ``discover`` reads the previous labels and returns the new ones.

Length (``total_epochs``, re-read by the loop before every epoch): once a structure exists,
``train.epochs`` x (periods so far + periods still needed from its cluster count to n_c*, each
merging ceil(eta n_c)) -- exact, since the merge counts are fixed by the counts alone. Before the
first discovery (the progress bar of epoch 0, and the time budget, which asks the class:
``epochs_of``) the number of initial clusters is unknown: the plan is ``options.planned_periods``
periods (4: period 0 and three merging ones, what eta = 0.9 needs from ~N/4 initial clusters down
to 10 for N from about 4,000 to 40,000). Discoveries are at every period's first epoch.

The rate: ``optim.schedule: inv`` counts the run's optimiser steps without restarting per period,
as both of the authors' codes do: the Caffe original that the paper ran (Sec 4.1.2: "We use Caffe";
jwyang/JULE-Caffe ``src/caffe/solver.cpp``: ``UpdateModels`` trains from the solver's run-wide
``iter_``, which the inv policy reads) and the Torch port (``train.lua``: ``iter = epoch *
(#indices) + t - 1``, ``epoch`` counted over the whole recurrence). The paper's text sets the base
rate 0.01 "for each partially unrolled period", which could be read as a restart every period; we
follow the code. The momentum: Caffe's ``SGDSolver::ComputeUpdateValue`` keeps history = rate x
gradient + momentum x history, undampened, as PyTorch's SGD (``dampening`` 0) here; the Torch port
calls ``optim.sgd``, whose dampening defaults to the momentum (v = 0.9 v + 0.1 g): its steps are
about a tenth of the Caffe original's and ours at momentum 0.9.

Batches (ours; the authors' code draws uniform batches, where clusters of ~4 images rarely meet in
a batch of 100): each epoch the images of every cluster, in a seeded random order, are cut into
chunks of ``per_cluster`` images, the chunks shuffled and concatenated, then cut into batches; so a
batch holds several same-cluster rows (positives) from many clusters (negatives).

Discovery runs on rank 0 while the others wait in the structure broadcast: the slowest one is the
first merging period (the most clusters): a faiss kNN pass plus the agglomeration, at 70,000 images
bounded by the agglomeration benchmark's 60 s target, far below the process group's time-out
(Lightning's DDP strategy passes torch's ``default_pg_timeout``, 30 minutes, to every backend,
NCCL included), so no collective times out while rank 0 merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import option
from ..errors import ConfigError
from ..losses.jule import weighted_triplet_loss
from ..nets import IP1
from ..structure.agglomeration import (
    MODES,
    agglomerate,
    directed_knn_graph,
    initial_clusters,
    merge_clusters,
    period_merges,
    small_cluster_floor,
)
from ..structure.batching import epoch_generator, split_batches, uniform_batches
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

FEATURES = FeatureRequest("embedding", augmented=False)


@dataclass
class JuleOptions:
    """JULE (Yang et al. 2016), Table 2, Sec 3.6 and appendix A.3; ``train.epochs`` is the epochs
    per period (Sec 3.6: "about 20")."""

    k_s: int = option(20, low=1)  # neighbours of the sample graph (Eq 4)
    a: float = option(1.0, low=0, low_open=True)  # sigma^2 = a x mean squared kNN distance (Eq 4)
    k_c: int = option(5, low=1)  # neighbour clusters in Eq 7, negatives per anchor in Eq 35
    lam: float = option(1.0, low=0)  # lambda of Eq 7
    gamma: float = option(2.0, low=0, low_open=True)  # positive weight of Eq 35
    margin: float = option(0.2, low=0)  # triplet margin (appendix A.3)
    eta: float = option(0.9, low=0, low_open=True, high=1)  # unrolling rate (Sec 3.6; 0.2 for face data)
    affinity: str = option("exact", choices=MODES)  # Eq 14, or the approximations Eq 19 / Eq 21
    alpha: float = option(0.0, low=-1, low_open=True)  # alpha of Eq 21
    per_cluster: int = option(4, low=2)  # same-cluster rows drawn together into a batch (ours)
    planned_periods: int = option(4, low=1)  # the length planned before the first discovery (ours)
    # the small-cluster rule (ours): every period's cut sets aside clusters under this fraction of the
    # mean size n / (clusters after the period), Eq 7 merging past ceil(eta n_c) until that many large
    # clusters remain (structure.agglomeration.merge_clusters, min_size); 0: the paper's plain cut
    small_fraction: float = option(0.05, low=0, high=1)
    # jule_cnn's ip1 before the L2 normalisation: "linear" (JULE Table 9: ip1 -> l2-norm; the authors'
    # Torch models_def/*.lua nn.Linear -> nn.Normalize(2)) or "bn_relu" (Linear -> BN -> ReLU, the other
    # backbones' last layer); other backbones have no ip1 (ignored). Linear measured better in the
    # paper's settings on digits and USPS, SF and RC (benchmarks/results/ablation-jule-ip1-*.json);
    # jule-cpu keeps bn_relu (its own measurement, in its comment)
    ip1: str = option("linear", choices=IP1)


class Jule(Method):
    name = "jule"
    reads_images = True  # period 0: the initial clusters of the raw pixels (ctx.images)
    needs_k_to_train = True  # merges until n_c* = K: its length
    Options = JuleOptions
    uses_bank = False
    embedding_head = False  # ip1, L2-normalised (Table 9: ip1 -> l2-norm -> wt-loss; what ip1 is: options.ip1)
    taps = ("embedding",)
    cluster_head = ("method", "embedding", 2)  # SF: the recurrence's own clusters (RC: --cluster-head agglomerative)

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        self.target = self.n_clusters()

    @classmethod
    def backbone_options(cls, options: JuleOptions) -> dict[str, Any]:
        return {"ip1": options.ip1}  # jule_cnn's ip1 (JULE Table 9)

    @classmethod
    def check_data(cls, options: JuleOptions, n_images: int) -> None:
        if options.k_s >= n_images:
            raise ConfigError(f"options.k_s ({options.k_s}) must be smaller than the number of images ({n_images})")

    # -- length: periods of train.epochs, until n_c* is reached -----------------------------------
    @classmethod
    def epochs_of(cls, cfg) -> int:
        """The planned length (no structure yet): ``options.planned_periods`` periods."""
        return (cfg.train.epochs or 0) * cfg.options.planned_periods

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        return bool(cfg.train.epochs) and epoch % cfg.train.epochs == 0  # each period's first epoch

    def _periods_left(self, n_clusters: int) -> int:
        """Merging periods still needed to go from n_clusters to the target (Sec 3.6)."""
        left = 0
        while n_clusters > self.target:
            n_clusters -= period_merges(n_clusters, self.options.eta, self.target)
            left += 1
        return left

    def total_epochs(self) -> int:
        """Periods until n_c* is reached (see the module doc); the plan before the first discovery."""
        if self.structure is None:
            return self.epochs_of(self.cfg)
        period, n_c = int(self.structure["period"]), int(self.structure["n_clusters"])
        return (self.cfg.train.epochs or 0) * (period + 1 + self._periods_left(n_c))

    def phase(self, epoch: int) -> str:
        return f"period {epoch // max(self.cfg.train.epochs or 1, 1)}"

    # -- structure -------------------------------------------------------------------------------
    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return () if epoch == 0 else (FEATURES,)

    def discover(self, ctx: DiscoveryContext) -> Structure:
        period = ctx.epoch // self.cfg.train.epochs
        if period == 0:
            pixels = ctx.images.reshape(len(ctx.images), -1).float().cpu().numpy()
            labels = initial_clusters(pixels)  # Sec 3.6: raw intensities, L2-normalised
        else:
            o = self.options
            x = ctx.features(FEATURES.tap).float().cpu().numpy()
            current = self.structure["labels"].cpu().numpy()
            n_c = int(current.max()) + 1
            w = directed_knn_graph(x, o.k_s, a=o.a)  # Eq 4, rebuilt from this period's features
            merges = period_merges(n_c, o.eta, self.target)
            labels = merge_clusters(w, current, merges, k_c=o.k_c, lam=o.lam, mode=o.affinity,
                                    alpha=o.alpha, min_size=self._floor(n_c - merges, len(x)))  # Eq 7, 13-14
        return {"labels": torch.from_numpy(labels), "period": torch.tensor(period),
                "n_clusters": torch.tensor(int(labels.max()) + 1)}

    def _floor(self, n_after: int, n_images: int) -> int:
        """min_size of a period's merges: clusters under ``small_fraction`` of that period's mean
        size n / n_after are set aside at every cut (ours). Applied only at the last cut, tiny
        clusters that Eq 7 never picks survived the earlier periods while real ones merged, so the
        last period started with fewer than n_c* large clusters and the rule found no cut (USPS,
        jule-cpu, seeds 0 and 2: clusters of 3-4 images in the final ten)."""
        return small_cluster_floor(n_images, max(n_after, self.target), self.options.small_fraction)

    # -- batches and loss ------------------------------------------------------------------------
    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        """Chunks of ``per_cluster`` same-cluster images, shuffled, cut into batches (see above);
        uniform before any structure exists (the budget's probe cuts its batches first)."""
        if self.structure is None:
            return uniform_batches(n, batch_size, seed, epoch)
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
        # JULE Eq 35 against the gathered global batch (the contract's DDP rule)
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
        """SF: the recurrence's clusters. If training stopped above the target (a run of 0 epochs),
        the remaining merges on the final features (from the initial clusters if none exist)."""
        o = self.options
        x = ctx.features(FEATURES.tap).float().cpu().numpy()
        if self.structure is None:
            return agglomerate(x, min(self.target, len(x)), k_s=o.k_s, a=o.a, k_c=o.k_c, lam=o.lam,
                               mode=o.affinity, alpha=o.alpha, min_size=self._floor(0, len(x)))
        current = self.structure["labels"].cpu().numpy()
        n_c = int(current.max()) + 1
        if n_c <= self.target:
            return current.astype(np.int64)
        w = directed_knn_graph(x, o.k_s, a=o.a)
        return merge_clusters(w, current, n_c - self.target, k_c=o.k_c, lam=o.lam, mode=o.affinity,
                              alpha=o.alpha, min_size=self._floor(self.target, len(x)))
