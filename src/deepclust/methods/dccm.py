"""DCCM: Deep Comprehensive Correlation Mining (Wu, Long, Wang, Qian, Li, Lin & Zha, ICCV 2019).

A K-way softmax head on the network (Eq 1) is trained from the correlations of its own predictions
(per mini-batch as Algorithm 1, or per block of images as the authors' code; see the schedules below):
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

Choices where the paper is silent or differs from the authors' code (Cory-M/DCCM at 74b6057; files and
lines below are theirs), written down:
 - **Two schedules** (``options.schedule``). ``minibatch`` (the default, the CPU presets'): Algorithm
   1 as the paper prints it: the graph and labels come from the original images of the same global
   batch, predicted in the same forward as their transformed views (one forward, one DDP pass,
   BatchNorm over both); an epoch is one pass over the data in global batches of ``optim.batch_size``.
   ``block`` (the paper presets'): the authors' main.py ``train`` (lines 148-215; cfgs/cifar10.yaml
   ``large_bs`` 1000, ``repeated`` 10, main.py's ``small_bs`` 32): the data loader's shuffled blocks
   of 1,000 images are each predicted once without gradient (lines 153-163) and their graph and labels
   made once (``comp_simi``, ``mask``, 165-166); then ``repeated`` = 10 passes over the block, each a
   fresh order (169) cut into 1000 // 32 = 31 mini-batches (170; the remainder of 8 left out), each
   mini-batch trained on two augmented draws (the Keras ``datagen.flow`` loop broken at ``sign > 1``,
   182-215), one optimiser step each, on the rows and columns of the block's graph and labels
   (``mask[address,:][:,address]``, 176-179): 620 optimiser steps a block, each image trained about
   20 times a data epoch; 200 epochs of CIFAR-10 (60,000 images, 60 blocks) are 7.44M steps, where
   200 epochs per mini-batch of 256 are 47k. Here: ``train.epochs`` counts passes over the data in
   blocks (the authors' epochs); each data epoch is a seeded permutation cut into ceil(N /
   ``block_size``) near-equal blocks (60 of 1,000 for 60,000 images; the authors' loader would end
   with a short block); a discovery predicts each block (a full pass of the network, whose block rows
   are kept: ``discover``), ``set_structure`` makes its graph and labels once, and the block's
   ``block_repeats`` passes in mini-batches of ``optim.batch_size``, each mini-batch trained
   ``block_draws`` times, only index them (nothing of the block is predicted again). A block's passes
   make ``block_epochs`` epochs of the loop (a log record and a checkpoint each; the contract test
   kills one in the middle of a block's passes). Departures: the block's prediction normalises the
   head's BatchNorm by the block's own statistics, as the authors' (their every BatchNorm keeps no
   running statistics: models/cifar_C4_L2.py, ``track_running_stats=False``), but the backbone's
   BatchNorm layers by their running statistics (the discovery's pass is in eval mode); the trained
   views are the configured ones (the original too while ``original_terms`` is on: the paper's Eq 15;
   the authors train the transformed view only). A time budget does not plan this schedule (its plan
   prices epochs of mini-batches): it needs ``train.epochs``.
 - The rate: RMSprop(lr, alpha 0.9) and no schedule in the authors' main.py (line 75; nothing
   changes the rate afterwards): the paper presets keep it constant.
 - The head: Linear(D, K) -> BatchNorm1d(K) -> softmax, as the authors' ``fc_layer`` (Table 4's
   "Linear(64, c) SoftMax" with their BN); the Linear starts as an identity (``eye_``, their init).
   Under DDP its BatchNorm is the global batch's (the contract's BatchNorm rule). The authors'
   convolutions are kaiming-normal and every Linear starts as the identity; here only the head's.
 - S and D (Sec 6.4: "the output features after the second conv layer (S) and the first fc layer
   (D)"): S = the backbone's ``shallow_layer`` (the 32 px net: the second conv's map after its
   max-pool, the authors' ``layers: [7, 19]``, cfgs/cifar10.yaml line 17, counted by
   utils/functions.py ``forward`` over every non-Sequential module: module 7 is conv2's max-pool, 14x14
   at 32 px; the larger nets: the third conv), D = the backbone output (the first fc layer of Table
   4, after its ReLU). The authors' D is not that layer: their count goes on into ``fc_layer``
   (Linear 16, BatchNorm 17, ReLU 18, Linear 19), so module 19 is the K-way Linear's output before
   the head's BatchNorm (models/cifar_C4_L2.py line 37), a K-dim D (get_dim's ``V_channels``). MI is
   estimated on the last view, the transformed one (the original when local robustness is off).
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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import option
from ..errors import ConfigError
from ..heads import AssignmentMap
from ..losses.dccm import LocalDiscriminator, graph_loss, label_loss, mi_loss
from ..precision import at_least_float32
from ..structure.pseudo_graph import (
    PAIR_STRATEGIES,
    BlockGraph,
    bcubed,
    mi_pairs,
    prediction_similarity,
    pseudo_graph,
    pseudo_labels,
)
from ..views import draw_generator
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

PROBABILITIES = FeatureRequest("probabilities")
BACKBONE = FeatureRequest("backbone")
DIAGNOSTIC_SAMPLE = 1000  # images in the BCubed estimate (the authors' large batch)
SCHEDULES = ("minibatch", "block")  # Algorithm 1; the authors' main.py train
BLOCK_ORDER, PASS_ORDER = 6_000_011, 6_000_013  # keys of the block schedule's generators


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
    # minibatch: the graph and labels of each mini-batch's own originals (Algorithm 1); block: the
    # authors' main.py train (a block predicted once, repeated passes in mini-batches on its graph)
    schedule: str = option("minibatch", choices=SCHEDULES)
    block_size: int = option(1000, low=2, high=10_000)  # large_bs: images a block's graph spans
    block_repeats: int = option(10, low=1)  # repeated: passes over a block in mini-batches
    block_draws: int = option(2, low=1)  # augmented draws of each mini-batch, one optimiser step each
    block_epochs: int = option(1, low=1)  # epochs (log records, checkpoints) a block's passes make

    def check(self) -> None:
        if self.mutual_information and self.beta == 0:
            raise ConfigError("options.beta is 0 while options.mutual_information is on; turn one off")
        if self.schedule == "block" and self.block_repeats % self.block_epochs:
            raise ConfigError(f"options.block_epochs ({self.block_epochs}) must divide options.block_repeats "
                              f"({self.block_repeats}): each epoch makes the same number of passes over its block")


class Dccm(Method):
    name = "dccm"
    needs_k_to_train = True  # its K-way head
    Options = DccmOptions
    # the views of the default options, the original and its transformation (an instance sets its own
    # from its options): what benchmarks/throughput.py's plain loop makes per image for this method
    n_views = 2
    uses_bank = False
    embedding_head = False
    # DCCM reads its clusters off its own head (Eq 7): the method's head is the default.
    cluster_head = ("method", "backbone", 2)

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        o = self.options
        self.k = self.n_clusters()
        self.block_mode = o.schedule == "block"
        self.block: BlockGraph | None = None  # the current block's graph and labels (set_structure)
        # The views each step trains with the graph and labels (Eq 15's L_PG + L'_PG, L_PL + L'_PL):
        # the original (plain) when its terms are on or there is no transformed view, the transformed
        # one with local robustness (Eq 12). Per mini-batch the original is forwarded in any case:
        # the graph is its predictions'.
        trains_original = o.original_terms or not o.local_robustness
        originals = trains_original or not self.block_mode
        self.n_views = int(originals) + int(o.local_robustness)
        self.plain = (0,) if originals else ()
        self.trained_views = tuple(range(self.n_views))[0 if trains_original or not originals else 1:]
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
        return self.plain  # view 0 is the original image (Sec 3.3), the last one its transformation

    # -- network outputs and loss -----------------------------------------------------------------
    def forward(self, taps: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.modules["head"](taps["backbone"])
        taps["probabilities"] = torch.softmax(at_least_float32(logits), dim=1)  # Eq 1
        return taps

    def batch_loss(self, step: Step) -> Tensor:
        o = self.options
        trained = [step.outputs[v]["probabilities"] for v in self.trained_views]
        gathered = [step.gather(p) for p in trained]  # each trained view's predictions, global batch
        if self.block_mode:  # the block's graph and labels, predicted once before its passes
            graph, similarity, labels, confident = self.block.batch(step.gidx)
        else:  # Eq 2, 7-8 of the originals (view 0) of this global batch, in the same forward
            with torch.no_grad():
                all_p0 = gathered[0] if self.trained_views[0] == 0 else step.gather(step.outputs[0]["probabilities"])
                similarity = prediction_similarity(all_p0)
                graph = pseudo_graph(similarity, o.graph_threshold)
                labels, confident = pseudo_labels(all_p0, o.label_threshold)
        rows = step.positions
        loss = torch.zeros(trained[0].shape[0], dtype=torch.float32, device=trained[0].device)
        for p, all_p in zip(trained, gathered):  # Eq 15's L_PG + L'_PG and L_PL + L'_PL (Eq 12)
            loss = loss + graph_loss(prediction_similarity(p, all_p), graph[rows])  # Eq 3
            if o.pseudo_labels:
                loss = loss + o.alpha * label_loss(p, labels[rows], confident[rows])  # Eq 9
        if o.mutual_information:
            loss = loss + o.beta * self._mi(step, step.outputs[-1], graph, similarity)  # Eq 14
        return loss

    def _mi(self, step: Step, view: dict[str, Tensor], graph: Tensor, similarity: Tensor) -> Tensor:
        """Eq 14 on ``view``: each row's own (d, s) pair and its pseudo-graph partner are positives."""
        g = draw_generator(self.cfg.train.seed, step.epoch, step.step, 8_000_017)
        pairs = mi_pairs(graph, similarity, step.positions, g, self.options.pairs, self.options.negatives)
        positives = torch.stack([step.positions.long(), pairs.positive], dim=1)
        shallow = step.gather(view[self.shallow_layer])
        return mi_loss(self.modules["discriminator"], view["backbone"], shallow, positives, pairs.negatives)

    # -- the schedule: per mini-batch (Algorithm 1), or the authors' per block ---------------------
    # Per mini-batch an epoch is one pass in global batches (optim.batch_size) and training needs no
    # discovery. Per block (options.schedule: block) train.epochs counts passes over the data in
    # blocks, as the authors' epochs: each data epoch is a seeded permutation cut into ceil(N /
    # block_size) near-equal blocks; a discovery predicts the block (the full pass of the head, whose
    # block rows give its graph and labels), then block_repeats passes over it, each a fresh order cut
    # into mini-batches of optim.batch_size (the remainder left out, as the authors' 1000 // 32),
    # each mini-batch trained block_draws times on fresh augmented draws. A block's passes make
    # block_epochs epochs of the loop (a log record and a checkpoint each).
    def n_blocks(self) -> int:
        return max(1, math.ceil(self.n_images / self.options.block_size))

    def total_epochs(self) -> int:
        if not self.block_mode:
            return self.epochs_of(self.cfg)
        return self.cfg.train.epochs * self.n_blocks() * self.options.block_epochs

    @classmethod
    def epochs_of(cls, cfg) -> int:
        if cfg.options.schedule == "block":  # asked by the time budget alone (instances know N)
            raise ConfigError("dccm: options.schedule block counts train.epochs in passes over the data in "
                              "blocks, which a time budget does not plan (it plans epochs of mini-batches): "
                              "give train.epochs (--epochs)")
        return cfg.train.epochs

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        if cfg.options.schedule == "block":
            return epoch % cfg.options.block_epochs == 0  # each block's first epoch: its prediction
        return cfg.options.diagnostics  # the diagnostics pass; training needs no discovery

    def block_of(self, epoch: int) -> tuple[int, int, int]:
        """(data epoch, block, part of the block's passes) of the loop's ``epoch`` (block schedule)."""
        per_block = self.options.block_epochs
        per_data_epoch = self.n_blocks() * per_block
        return epoch // per_data_epoch, epoch % per_data_epoch // per_block, epoch % per_block

    def phase(self, epoch: int) -> str:
        if not self.block_mode:
            return ""
        data_epoch, block, _ = self.block_of(epoch)
        return f"epoch {data_epoch} block {block}"

    def block_rows(self, epoch: int) -> Tensor:
        """The dataset indices of the block the loop's ``epoch`` trains, in block order."""
        data_epoch, block, _ = self.block_of(epoch)
        order = torch.randperm(self.n_images, generator=draw_generator(self.cfg.train.seed, data_epoch, BLOCK_ORDER))
        return torch.tensor_split(order, self.n_blocks())[block]

    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        if not self.block_mode:
            return super().batches(epoch, n, batch_size, seed)
        o = self.options
        data_epoch, block, part = self.block_of(epoch)
        rows = self.block_rows(epoch)
        size = min(batch_size, len(rows))
        passes = o.block_repeats // o.block_epochs
        out = []
        for r in range(part * passes, (part + 1) * passes):  # the authors' index_loc, shuffled per pass
            order = rows[torch.randperm(len(rows), generator=draw_generator(seed, data_epoch, PASS_ORDER, block, r))]
            for j in range(len(rows) // size):
                out += [order[j * size:(j + 1) * size]] * o.block_draws  # the authors' sign > 1: break
        return out

    # -- structure: the block's prediction, or the diagnostics pass (labels describe, never steer) --
    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return (PROBABILITIES, BACKBONE) if self.block_mode else (PROBABILITIES,)

    def discover(self, ctx: DiscoveryContext) -> Structure:
        """The head's predictions of every image (the diagnostics, Fig 5 / 6a); for the block schedule
        also the block's rows and their predictions with the head's BatchNorm on the block's own
        statistics (``block_predictions``)."""
        structure = {"probabilities": ctx.features(PROBABILITIES.tap).float().cpu()}
        if self.block_mode:
            rows = self.block_rows(ctx.epoch)
            features = ctx.features(BACKBONE.tap)[rows.to(ctx.device)]
            structure.update(block=rows, block_probabilities=self.block_predictions(features))
        return structure

    @torch.no_grad()
    def block_predictions(self, features: Tensor) -> Tensor:
        """A block's predictions (Eq 1) from its backbone features: the head's Linear, then its
        BatchNorm normalising by the block's own mean and variance, as the authors' block forward
        (models/cifar_C4_L2.py builds every BatchNorm with track_running_stats=False: batch statistics
        in train and eval alike, over the 1,000 images of main.py's no-grad block forward). The
        running statistics, which this network's BatchNorm keeps, are those of an untrained head
        before the first steps: there every image gets nearly the same prediction (digits, a fresh
        dccm_cnn: every pair of the block over thres_1, against 11% with the block's statistics and 1%
        with every layer's). The backbone's BatchNorm layers use their running statistics (the
        discovery's pass is in eval mode). Nothing is updated (the running statistics untouched)."""
        linear, norm = self.modules["head"][0], self.modules["head"][1]
        logits = F.linear(features.to(linear.weight.dtype), linear.weight, linear.bias)
        logits = F.batch_norm(logits, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        return torch.softmax(at_least_float32(logits), dim=1).cpu()

    def set_structure(self, structure: Structure | None) -> None:
        """The structure, and for the block schedule the block's graph and labels made from its
        predictions (``BlockGraph``): once, here, not per mini-batch."""
        self.structure = structure
        self.block = None
        if structure is not None and "block" in structure:
            rows = structure["block"].long()
            self.block = BlockGraph.of(structure["block_probabilities"], rows, self.n_images,
                                       self.options.graph_threshold, self.options.label_threshold)

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        p = self.structure["probabilities"].float().cpu()
        top, pred = p.max(dim=1)
        hist = torch.histc(top.clamp(0.1, 1.0), bins=9, min=0.1, max=1.0) / len(top)  # Fig 6a
        out: dict[str, Any] = {"confident_fraction": round(float((top >= self.options.label_threshold).float().mean()), 4),
                               "clusters_used": int(pred.unique().numel()),
                               "max_probability_hist": [round(float(h), 4) for h in hist]}
        if self.block is not None:  # what the block's passes train on
            n = len(self.block.labels)
            out.update(block_images=n, block_confident_fraction=round(float(self.block.confident.float().mean()), 4),
                       block_graph_density=round(float((self.block.graph.sum() - n) / max(n * (n - 1), 1)), 4))
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
