"""DCCM: Deep Comprehensive Correlation Mining (Wu, Long, Wang, Qian, Li, Lin & Zha, ICCV 2019).

A K-way softmax head on the network (Eq 1) is trained, per mini-batch (Algorithm 1), from the
correlations of its own predictions:
 - the pseudo-graph W of the original images (cosine of predictions >= thres_1 = 0.95, Eq 2) with a
   binary cross-entropy on every pair of the batch (Eq 3);
 - the confident pseudo-labels (argmax where the top probability >= thres_2 = 0.9, Eq 7-8) with a
   cross-entropy (Eq 9);
 - local robustness (Eq 12): a transformed view of every image trained with the graph and labels of
   its original;
 - triplet mutual information (Eq 13-14): a local discriminator tells (deep, shallow) feature pairs
   of one image or of pseudo-graph neighbours from pairs of non-neighbours (Jensen-Shannon estimate);
 - the total Eq 15: L^_PG + alpha L^_PL + beta L_MI with alpha = 5, beta = 0.1 (the paper; the
   authors' cfgs/cifar10.yaml weighs graph 1 / label 5 / MI 0.05 and trains the transformed view only:
   ``beta: 0.05`` and ``original_terms: false`` give those weights and that view. Their label term is
   not a cross-entropy: ``WeightedBCE`` (utils/util.py) averages a binary cross-entropy over the K
   outputs, about CE / K, so alpha = 5 on our cross-entropy weighs the pseudo-labels about K times
   theirs).
The clusters are the head's argmax (Eq 7): the method's own head, the default.

Choices where the paper is silent or differs from the authors' code (Cory-M/DCCM), written down:
 - **Per mini-batch** (Algorithm 1), as the paper describes: the graph and labels come from the
   original images of the same global batch, predicted in the same forward as their transformed
   views (one forward, one DDP pass, BatchNorm over both). The authors' code (main.py ``train``;
   ``large_bs`` 1000, ``small_bs`` 32, ``repeated`` 10) predicts a 1,000-image block without
   gradient, then makes 10 passes over the block in mini-batches of 32 (31 a pass), each mini-batch
   trained on two augmented draws: 620 optimiser steps a block, each image trained about 20 times an
   epoch, all on the block's fixed graph and labels. One epoch here is one pass in global batches of
   256 (200 epochs: about 1/160 of their steps). Their schedule is not offered yet (it needs a
   no-grad prediction of a block mid-epoch, a discovery per block).
 - The head: Linear(D, K) -> BatchNorm1d(K) -> softmax, as the authors' ``fc_layer`` (Table 4's
   "Linear(64, c) SoftMax" with their BN); the Linear starts as an identity (``eye_``, their init).
   Under DDP its BatchNorm is the global batch's (the contract's BatchNorm rule). The authors'
   convolutions are kaiming-normal and every Linear starts as the identity; here only the head's.
 - S and D (Sec 6.4): S = the backbone's ``shallow_layer`` (the 32 px net: the second conv's map
   after its max-pool, the authors' ``layers: [7, 19]``; the larger nets: the third conv), D = the
   backbone output (the first fc layer of Table 4, after its ReLU; the authors' layer 19 is that
   layer's BatchNorm output before the ReLU). MI is estimated on the view that is trained with the
   graph (the transformed one; the original when local robustness is off).
 - Pairs (Table 6): V1 (nearest positive + random negatives) by default, two negatives per anchor
   as the authors' code; the image's own (d, s) pair is always a positive. Random draws come from
   generators of (seed, epoch, step) for the global batch, so every process draws the same.
 - The embedding (for the post-hoc heads and kNN) is the L2-normalised backbone output: DCCM trains
   no projection head.
 - Diagnostics (``diagnostics``, labels only describe): a full pass of the head's probabilities at
   every epoch start gives the share of confident predictions, the histogram of the largest
   probability (Fig 6a), and with labels the argmax's ACC / NMI / ARI and the BCubed precision and
   recall of the pseudo-graph on 1,000 images (Fig 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import option
from ..errors import ConfigError
from ..heads import AssignmentMap
from ..losses.dccm import LocalDiscriminator, graph_loss, label_loss, mi_loss
from ..precision import at_least_float32
from ..structure.pseudo_graph import (
    PAIR_STRATEGIES,
    bcubed,
    mi_pairs,
    prediction_similarity,
    pseudo_graph,
    pseudo_labels,
)
from ..views import draw_generator
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

PROBABILITIES = FeatureRequest("probabilities")
DIAGNOSTIC_SAMPLE = 1000  # images in the BCubed estimate (the authors' large batch)


@dataclass
class DccmOptions:
    """DCCM (Wu et al., ICCV 2019). Table 3's ablation: M1 = every correlation off (L_PG alone),
    M2 = local_robustness, M3 = + pseudo_labels, M4 = + mutual_information (the default)."""

    graph_threshold: float = option(0.95, low=0, high=1)  # thres_1, Eq 2
    label_threshold: float = option(0.9, low=0, high=1)  # thres_2, Eq 8
    alpha: float = option(5.0, low=0, high=100)  # Eq 15
    beta: float = option(0.1, low=0, high=100)  # Eq 15
    local_robustness: bool = True  # LR: transformed views with the originals' graph and labels (Eq 12)
    pseudo_labels: bool = True  # PL: Eq 9 (and Eq 12's L'_PL)
    mutual_information: bool = True  # MI: Eq 14
    original_terms: bool = True  # Eq 15's L_PG, L_PL on the originals too (off: the authors' code)
    pairs: str = option("nearest-random", choices=PAIR_STRATEGIES)  # Table 6: V1, V2, V3, V4
    negatives: int = option(2, low=1, high=64)  # per anchor (the authors' code: 2)
    discriminator_width: int = option(512, low=1)  # the 1x1 convolutions' width (Hjelm et al.: 512)
    diagnostics: bool = True  # a full pass of the head each epoch for the log (Fig 5, Fig 6a)

    def check(self) -> None:
        if self.mutual_information and self.beta == 0:
            raise ConfigError("options.beta is 0 while options.mutual_information is on; turn one off")


class Dccm(Method):
    name = "dccm"
    needs_k_to_train = True  # its K-way head
    Options = DccmOptions
    uses_bank = False
    embedding_head = False
    # DCCM reads its clusters off its own head (Eq 7): the method's head is the default.
    cluster_head = ("method", "backbone", 2)

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        o = self.options
        self.k = self.n_clusters()
        self.n_views = 2 if o.local_robustness else 1
        if o.mutual_information and self.shallow_layer is None:
            raise ConfigError("dccm: the network names no shallow layer for the mutual-information loss")
        self.taps = ("backbone",) + ((self.shallow_layer,) if o.mutual_information else ())
        deep = self.tap_dims["backbone"]
        head = nn.Sequential(nn.Linear(deep, self.k), nn.BatchNorm1d(self.k))
        nn.init.eye_(head[0].weight)  # the authors' initialisation
        nn.init.zeros_(head[0].bias)
        self.modules["head"] = head
        if o.mutual_information:
            shape = self.tap_shapes[self.shallow_layer]
            self.modules["discriminator"] = LocalDiscriminator(shape[0], deep, o.discriminator_width)

    # -- views -----------------------------------------------------------------------------------
    def views_at(self, epoch: int) -> int:
        return self.n_views

    def plain_views(self, epoch: int) -> tuple[int, ...]:
        return (0,)  # view 0 is the original image (Sec 3.3), view 1 its transformation

    # -- network outputs and loss -----------------------------------------------------------------
    def forward(self, taps: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.modules["head"](taps["backbone"])
        taps["probabilities"] = torch.softmax(at_least_float32(logits), dim=1)  # Eq 1
        return taps

    def batch_loss(self, step: Step) -> Tensor:
        o = self.options
        original = step.outputs[0]
        p0 = original["probabilities"]
        all_p0 = step.gather(p0)
        with torch.no_grad():
            s0 = prediction_similarity(all_p0)
            graph = pseudo_graph(s0, o.graph_threshold)  # Eq 2, of the originals
            labels, confident = pseudo_labels(all_p0, o.label_threshold)  # Eq 7-8
        rows = step.positions
        # (local predictions, the gathered batch's) of each trained view: the originals' gathered once
        trained = [(p0, all_p0)] if o.original_terms or not o.local_robustness else []
        if o.local_robustness:  # Eq 12: the transformed view, the originals' W and y
            p1 = step.outputs[1]["probabilities"]
            trained.append((p1, step.gather(p1)))
        loss = torch.zeros(p0.shape[0], dtype=torch.float32, device=p0.device)
        for p, all_p in trained:
            loss = loss + graph_loss(prediction_similarity(p, all_p), graph[rows])  # Eq 3
            if o.pseudo_labels:
                loss = loss + o.alpha * label_loss(p, labels[rows], confident[rows])  # Eq 9
        if o.mutual_information:
            loss = loss + o.beta * self._mi(step, step.outputs[-1], graph, s0)  # Eq 14
        return loss

    def _mi(self, step: Step, view: dict[str, Tensor], graph: Tensor, similarity: Tensor) -> Tensor:
        """Eq 14 on ``view``: each row's own (d, s) pair and its pseudo-graph partner are positives."""
        g = draw_generator(self.cfg.train.seed, step.epoch, step.step, 8_000_017)
        pairs = mi_pairs(graph, similarity, step.positions, g, self.options.pairs, self.options.negatives)
        positives = torch.stack([step.positions.long(), pairs.positive], dim=1)
        shallow = step.gather(view[self.shallow_layer])
        return mi_loss(self.modules["discriminator"], view["backbone"], shallow, positives, pairs.negatives)

    # -- diagnostics (labels describe, never steer) and the method's own clusters -----------------
    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        return cfg.options.diagnostics  # the diagnostics pass; training needs no discovery

    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return (PROBABILITIES,)

    def discover(self, ctx: DiscoveryContext) -> Structure:
        return {"probabilities": ctx.features(PROBABILITIES.tap).float().cpu()}

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        p = self.structure["probabilities"].float().cpu()
        top, pred = p.max(dim=1)
        hist = torch.histc(top.clamp(0.1, 1.0), bins=9, min=0.1, max=1.0) / len(top)  # Fig 6a
        out: dict[str, Any] = {"confident_fraction": round(float((top >= self.options.label_threshold).float().mean()), 4),
                               "clusters_used": int(pred.unique().numel()),
                               "max_probability_hist": [round(float(h), 4) for h in hist]}
        if labels is not None:
            from ..evaluate import clustering_scores

            out.update({f"head_{k}": round(float(v), 4) for k, v in clustering_scores(labels, pred.numpy()).items()
                        if k in ("acc", "nmi", "ari")})
            sample = torch.randperm(len(p), generator=torch.Generator().manual_seed(0))[:DIAGNOSTIC_SAMPLE]
            graph = pseudo_graph(prediction_similarity(p[sample]), self.options.graph_threshold)
            precision, recall = bcubed(graph, torch.as_tensor(labels)[sample])  # Fig 5
            out.update(bcubed_precision=round(precision, 4), bcubed_recall=round(recall, 4))
        return out

    def final_features(self) -> tuple[FeatureRequest, ...]:
        return (PROBABILITIES,)

    @torch.no_grad()
    def assignment_map(self) -> AssignmentMap:
        """The head in eval mode is affine (Linear, then BatchNorm with its running statistics) and
        the softmax keeps the order, so Eq 7's argmax of any image is argmax(A x + c) of its backbone
        features: what ``predict`` applies to new images."""
        linear, norm = self.modules["head"][0], self.modules["head"][1]
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        a = linear.weight * scale[:, None]
        c = (linear.bias - norm.running_mean) * scale + norm.bias
        return AssignmentMap("backbone", a.float().cpu().numpy(), c.float().cpu().numpy())

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray:
        return ctx.features(PROBABILITIES.tap).argmax(dim=1).cpu().numpy()  # Eq 7
