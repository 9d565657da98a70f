"""PCP: Progressive Cluster Purification (Zhang, Liu, Zhou, Wang, Wang & Ye, ICPR 2020).

Each epoch t of a round (Algorithm 1): N_t clusters (PC, Eq 1, falling log-linearly from N to the
floor N_t0) by k-means of the memory bank; CP_r keeps the (1 - gamma) of each cluster nearest its
centroid; CP_s (Eq 2) votes over the last ``history`` clusterings with decay alpha, dropping kept
members that vote < ``drop_below`` with their cluster's anchor and pulling back filtered ones that
vote >= ``pull_back_at``; the loss is Eq 6 = Eq 4 (single instances) + Eq 5 (purified clusters) on
the bank's non-parametric softmax (Eq 3); the bank is updated as in AND Eq 8. The warm-up branch
(Sec III-C, "Warm-up") adds the invariant-and-spreading loss of Ye et al. (CVPR 2019) on two views,
weighted 0.8 falling to 0.5 over the warm-up, then dropped.

Where the paper is silent, the authors' code (zhangyifei0115/PCP; ``../shared/design/reference-notes.md``)
settles it:
 - k-means on the bank (features of augmented images), faiss, 20 iterations, every epoch;
 - CP_s starts at half of the round (epoch 100 of 200); its history holds the raw k-means labels;
   before it, clusters of at most 5 members are kept whole (``keep_whole_up_to``);
 - the cluster term is AND-style, -log sum_{i in S_c} P(i|v_j) (``loss_form: logsum``); Eq 5 as
   printed (sum of logs over members, averaged) is ``loss_form: eq5``;
 - the IS branch is the reference ``BatchCriterion`` form; PCP weight t = 0.2 + 0.3 e / E_w over the
   warm-up (IS weight 1 - t: 0.8 -> 0.5), then PCP alone; E_w = 0.9 of the round (180 of 200);
 - batches are uniform over images (the reference's shuffled loader); ``sampling: clusters`` draws
   uniformly over the purified clusters (DeepCluster's sampler) instead;
 - rounds (Table IV-V): each round restarts the learning-rate schedule, the PC schedule and the
   voting history; the warm-up runs in round 0 only.
The vote history is part of the structure (``past``, the raw k-means labels of the last ``history``
collecting epochs, oldest first): ``discover`` returns the new history with the new clusters, so it is
broadcast to every rank and restored on resume with them; it carries over only within a round.
Ours: clustering is skipped while N_t > N / 2 (clusters of 1-2 members, all single instances after
CP_r with gamma >= 0.5 and min_size 2 except the kept-whole ones) - it only saves k-means time at
large N_t; the method's own final clusters are k-means of the final bank with K = cluster.n_clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import option
from ..errors import ConfigError
from ..losses.invariant_spreading import invariant_spreading_loss
from ..losses.pcp import pcp_loss
from ..structure.batching import epoch_generator, split_batches, uniform_batches
from ..structure.clustering import kmeans
from ..structure.purification import (
    batch_members,
    member_table,
    progressive_cluster_count,
    purification_quality,
    purify_clusters,
)
from ..structure.sampling import uniform_over_clusters
from .base import DiscoveryContext, Method, Step, Structure


@dataclass
class PcpOptions:
    """PCP (Zhang et al., ICPR 2020); every ablation of Tables I-IV is a combination of these."""

    rounds: int = option(1, low=1)  # Table IV-V: rounds of ``train.epochs`` epochs each
    floor: int | None = option(None, low=1)  # N_t0 (Eq 1 floor, Table III); None: see images_per_cluster
    images_per_cluster: int | None = option(50, low=1)  # floor None: N_t0 = max(K, N // this), 50 as the
                                                        # reference (50,000 / N_c 1k); None: N_t0 = K
    start: int | None = option(None, low=1)  # N_0 of Eq 1; None: N (the paper)
    progressive: bool = True  # PC (Table I); off: N_t = N_t0 from the first epoch (DeepCluster-style)
    gamma: float = option(0.5, low=0, high=1, high_open=True)  # CP_r filtering ratio (Table II); 0: off
    voting: bool = True  # CP_s (Table I-II)
    alpha: float = option(0.8, low=0, high=1, low_open=True, high_open=True)  # Eq 2 decay
    history: int = option(15, low=1)  # past clusterings in the vote (reference: 15)
    drop_below: float = option(0.0, low=-100, high=100)  # CP_s threshold for kept members
    pull_back_at: float = option(3.0, low=-100, high=100)  # CP_s threshold for filtered samples
    vote_from: float = option(0.5, low=0, high=1)  # CP_s from this fraction of the round (100 / 200)
    keep_whole_up_to: int = option(5, low=0)  # before CP_s: clusters this small are kept whole
    min_size: int = option(2, low=1)  # purified clusters smaller than this become single instances
    loss_form: str = option("logsum", choices=("logsum", "eq5"))
    warmup: bool = True  # the IS branch (PCP* of Tables III-IV)
    warmup_fraction: float = option(0.9, low=0, high=1)  # of round 0 (180 / 200)
    warmup_pcp_weight: list[float] = option([0.2, 0.5], low=0, high=1)  # PCP weight t at start / end
    sampling: str = option("images", choices=("images", "clusters"))
    kmeans_iters: int = option(20, low=1)

    def check(self) -> None:
        if len(self.warmup_pcp_weight) != 2:
            raise ConfigError("options.warmup_pcp_weight: expected two numbers (start, end)")


class ProgressiveClusterPurification(Method):
    name = "pcp"
    needs_k_to_train = True  # its floor N_t0 = max(K, N // images_per_cluster) (Eq 1)
    Options = PcpOptions
    n_views = 2

    @classmethod
    def check_data(cls, options: PcpOptions, n_images: int) -> None:
        for name in ("floor", "start"):
            value = getattr(options, name)
            if value is not None and value > n_images:
                raise ConfigError(f"options.{name} ({value}) is larger than the number of images (N={n_images})")

    # -- schedule -------------------------------------------------------------------------------
    @classmethod
    def epochs_of(cls, cfg) -> int:
        return cfg.options.rounds * cfg.train.epochs

    def round_of(self, epoch: int) -> tuple[int, int]:
        per = max(self.cfg.train.epochs, 1)
        return epoch // per, epoch % per

    def schedule_epoch(self, epoch: int) -> int:
        return self.round_of(epoch)[1]

    def schedule_length(self, epoch: int) -> int:
        return self.cfg.train.epochs

    def phase(self, epoch: int) -> str:
        return f"round {self.round_of(epoch)[0]}"

    def _warmup_weight(self, epoch: int) -> float | None:
        """PCP weight t during the IS warm-up (round 0), None after it."""
        o = self.options
        r, e = self.round_of(epoch)
        span = o.warmup_fraction * self.cfg.train.epochs
        if not o.warmup or r > 0 or e >= span:
            return None
        start, end = o.warmup_pcp_weight
        return start + (end - start) * e / max(span, 1.0)

    def views_at(self, epoch: int) -> int:
        return 2 if self._warmup_weight(epoch) is not None else 1

    # -- structure ------------------------------------------------------------------------------
    def floor(self) -> int:
        o = self.options
        if o.floor is not None:
            return min(o.floor, self.n_images)
        k = self.n_clusters()
        return max(k, self.n_images // o.images_per_cluster) if o.images_per_cluster else k

    def clusters_at(self, epoch: int) -> int:
        o = self.options
        _, e = self.round_of(epoch)
        if not o.progressive:
            return self.floor()
        return progressive_cluster_count(e, self.cfg.train.epochs, self.n_images, self.floor(), start=o.start)  # PCP Eq 1

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        return True

    def discover(self, ctx: DiscoveryContext) -> Structure | None:
        o = self.options
        k = self.clusters_at(ctx.epoch)
        past = self._history(ctx.epoch)
        if k > self.n_images // 2:  # all single instances (see the module docstring); the history stays
            return {"epoch": torch.tensor(ctx.epoch), "past": past} if len(past) else None
        feats = ctx.bank.features.float().cpu().numpy()
        labels, centroids, _ = kmeans(feats, k, seed=self.cfg.train.seed * 1000 + ctx.epoch, n_iter=o.kmeans_iters)
        collecting = self._collecting(ctx.epoch)
        voting = collecting and len(past) >= o.history  # CP_s once the history is full
        purified = purify_clusters(feats, labels, past=past.numpy() if voting else None, gamma=o.gamma,
                                   alpha=o.alpha, drop_below=o.drop_below, pull_back_at=o.pull_back_at,
                                   keep_whole_up_to=0 if collecting else o.keep_whole_up_to, min_size=o.min_size)
        members, offsets = member_table(purified.targets)
        labels_t = torch.from_numpy(labels)
        if collecting:
            past = torch.cat([past, labels_t[None]])[-o.history:]
        return {"targets": torch.from_numpy(purified.targets), "members": torch.from_numpy(members),
                "offsets": torch.from_numpy(offsets), "labels": labels_t, "past": past,
                "epoch": torch.tensor(ctx.epoch), "voting": torch.tensor(voting)}

    def _history(self, epoch: int) -> Tensor:
        """The vote history carried into ``epoch``: the last structure's, if it is of the same round
        (a new round restarts the vote, Table IV-V)."""
        s = self.structure
        if s is None or "past" not in s or self.round_of(int(s["epoch"]))[0] != self.round_of(epoch)[0]:
            return torch.zeros(0, self.n_images, dtype=torch.int64)
        return s["past"].cpu()

    def _clusters(self) -> Structure | None:
        """The current purified clusters, or None (no structure yet, or all single instances)."""
        return self.structure if self.structure is not None and "targets" in self.structure else None

    def _collecting(self, epoch: int) -> bool:
        """The vote's history fills from ``vote_from`` on (the reference starts it at epoch 100)."""
        o = self.options
        return o.voting and self.round_of(epoch)[1] >= o.vote_from * self.cfg.train.epochs

    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        if self.options.sampling == "images" or self._clusters() is None:
            return uniform_batches(n, batch_size, seed, epoch)
        order = uniform_over_clusters(self.structure["targets"].cpu(), n, epoch_generator(seed, epoch))
        return split_batches(order, batch_size)

    # -- loss -----------------------------------------------------------------------------------
    def batch_loss(self, step: Step) -> Tensor:
        z = step.outputs[0]["embedding"]
        logits = step.bank.logits(z)
        s = self._clusters()
        if s is None:
            positives, mask = step.idx[:, None], torch.ones_like(step.idx[:, None], dtype=torch.bool)
        else:
            positives, mask = batch_members(s["targets"], s["members"], s["offsets"], step.idx)
        loss = pcp_loss(logits, positives, mask, form=self.options.loss_form)  # PCP Eq 4-6
        t = self._warmup_weight(step.epoch)
        if t is None:
            return loss
        zhat = step.outputs[1]["embedding"]
        spread = invariant_spreading_loss(z, zhat, step.gather(z), step.gather(zhat), step.positions,
                                          self.cfg.memory.temperature, form="reference")
        return t * loss + (1.0 - t) * spread

    # -- diagnostics, final clusters, state -------------------------------------------------------
    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        """Each epoch's purification: the share of single instances (Eq 4 rows; no labels needed) and,
        when labels exist, the majority-class purity of the purified sets (Eq 5) and of the raw
        k-means clusters they came from. Diagnostics only: nothing here reaches training."""
        if self._clusters() is None:
            return {"clusters": 0, "single_fraction": 1.0, **({"purity": None} if labels is not None else {})}
        targets = self.structure["targets"].cpu().numpy()
        out: dict[str, Any] = {"clusters": int(targets.max()) + 1 if (targets >= 0).any() else 0,
                               "single_fraction": round(float((targets < 0).mean()), 4)}
        if labels is not None:
            q = purification_quality(targets, labels, self.structure["labels"].cpu().numpy())
            out.update(purity=round(q.purity, 4) if q.purity == q.purity else None,
                       raw_purity=round(q.raw_purity, 4) if q.raw_purity is not None else None)
        return out

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray:
        feats = ctx.bank.features.float().cpu().numpy()
        labels, _, _ = kmeans(feats, self.n_clusters(), seed=self.cfg.train.seed,
                              n_iter=self.options.kmeans_iters)
        return labels
