"""The learned clustering stage after any method (``cluster.head: scan``): SCAN (Van Gansbeke,
Vandenhende, Georgoulis, Proesmans & Van Gool, ECCV 2020; reference code
wvangansbeke/Unsupervised-Classification), a method of its own on the method contract, trained
after the configured one (``methods.STAGES``: ``cluster.head: scan`` adds it to the run).

The loop (``train.Trainer.fit``) runs the method's epochs, then this method's epochs with the same
hooks (discovery on rank 0, global batches seeded by (seed, epoch), per-row losses against the
gathered batch, checkpoint after every epoch); its options are the ``scan`` section; its hooks give
its optimiser (``make_optimizer``: Adam as SCAN's, or plain SGD, ``scan.optimizer``), its rate
(``learning_rate``: constant, ``scan.lr``, 1e-3, not their 1e-4: see ScanOptions), whether the network
learns (``scan.backbone``) and its modules, the heads:
 - discovery at its start: the k = 20 nearest neighbours of every image in the run's
   embedding (a full pass of the un-augmented images; ``structure.knn.mine_neighbours``, Sec 3.1);
 - SCAN epochs (Eq 2, ``losses/scan.py``): H linear heads Linear(D, K) on ``cluster.features`` (the
   backbone output; SCAN's head) trained with the network; a global batch is A anchors, every image
   once an epoch, followed by one neighbour of each drawn uniformly from its k (the authors'
   ``NeighborsDataset``); both augmented (as the authors'); one forward for both halves;
 - the head kept across epochs (the authors' ``scan.py``: after every epoch ``scan_evaluate`` ranks
   the heads by Eq 2 with the entropy weighed by 1 on their validation data, and the model of the
   lowest loss so far is saved and used at the end): every SCAN epoch after the first starts with a
   discovery that scores, over the whole data (its mined pairs; no labels), the heads the last epoch
   left and the head kept before, by Eq 2 with lambda 1 (:data:`SELECTION_ENTROPY_WEIGHT`); the
   lowest is kept, as its eval-mode affine map (the structure: checkpointed, so a resumed run keeps
   it). The network is not kept with it (the loop owns it): with ``scan.backbone: frozen`` this is
   SCAN's rule exactly; with the network trained, a head kept from an earlier epoch competes on the
   features of the current network, so the choice is always of a map of the features the run saves;
 - self-labelling epochs (Sec 3.3, optional): at their start the kept head goes into the slot of the
   live head of the lowest loss (``reset_parameters``) and only it trains further: the un-augmented
   image (the weak view, no gradient) gives the target where its top probability > 0.99, the
   augmented image (the strong view) is trained with a cross-entropy weighted n / count_c per class
   of the global batch's confident targets (the authors' class balancing);
 - the final clusters: the argmax of the kept head (the last epoch's heads scored against it at the
   end when no self-labelling ran; the self-labelled head otherwise, as the authors' ``selflabel.py``
   keeps its last model), an affine map of the features, so ``predict`` assigns new images through
   it (a ``linear`` head.npz, as DCCM's).

Choices, written down:
 - Imbalance: Eq 2's entropy term pulls towards equal clusters (its maximum is the uniform mean
   prediction); ``scan.entropy_weight`` (5, SCAN's configs) is the knob: lower it for data known
   to be imbalanced. Self-labelling keeps the class weights on by default (``scan.class_balance``):
   without them the largest cluster's confident targets dominate the cross-entropy and the small
   clusters are absorbed (the collapse SCAN's users report on a 60/40 two-class set). Self-labelling
   is off by default (``scan.self_label_epochs: 0``): it sharpens what Eq 2 found and cannot repair it.
 - The head is chosen as the authors' ``scan_evaluate`` chooses it (Eq 2, entropy weighed by 1) on
   the whole data set (every image its own validation: the stage has no held-out split), among the
   heads whose argmax leaves no cluster empty when there are any (training with lambda = 1 let
   heads empty clusters: on digits subsampled 10:1 every head had two empty clusters).
 - Sizes: the entropy term asks for equal clusters and is kept as SCAN's. Size priors that follow the
   data were tried on development data (heads trained on frozen PAD features of digits and its 10:1
   subset) and not adopted: the cluster sizes of the embedding's agglomerative partition, alone or
   halfway to equal sizes (a KL divergence to the sorted profile, either direction); each head's own
   sizes of the epoch before, floored; a floor on each cluster's share instead of the entropy; heads
   trained with lambdas spread from 5 down to 1. Each either emptied clusters or left some of a few
   images, or cost the balanced set what it gained on the 10:1 subset.
 - Neighbours come from a full pass of the embedding, not a method's memory bank: every method has
   an embedding, the bank holds features of augmented images of past epochs.
 - ``scan.backbone: frozen`` trains the heads only, the network in eval mode (the authors'
   ``update_cluster_head_only``). With the network trained, the projection head of the embedding
   is frozen when the heads read the backbone (it does not reach the loss; DDP refuses parameters
   without a gradient).
 - ``scan.normalise`` (off): a BatchNorm without affine parameters before the heads. SCAN's heads
   read the features as they are; on fixed features of thin clusters the linear heads found the
   partition only once the features were whitened (tests/test_scan.py), and on digits the two
   were within a seed's spread.
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
from ..losses.scan import class_weights, scan_objective, scan_rows, self_label_rows
from ..precision import at_least_float32
from ..structure.batching import epoch_generator, split_batches
from ..structure.knn import mine_neighbours
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

@dataclass(frozen=True)
class ScanOptions:
    """The stage's options: the configuration's ``scan`` section (``--set scan.epochs=20``)."""

    epochs: int = option(10, low=1)  # epochs of Eq 2 (each: every image once as an anchor, with a neighbour)
    self_label_epochs: int = option(0, low=0)  # then self-labelling (Sec 3.3); 0: none
    heads: int = option(10, low=1, high=100)  # heads trained at once; the lowest Eq 2 kept (no labels)
    neighbours: int = option(20, low=1)  # k mined from the run's embedding (SCAN: 20)
    entropy_weight: float = option(5.0, low=0, high=100)  # lambda of Eq 2 (SCAN's configs: 5); it
                                     # pulls towards equal clusters: lower it for imbalanced data
    confidence: float = option(0.99, low=0, high=1, high_open=True)  # self-labelling threshold
    class_balance: bool = True  # self-labelling's class weights n / count_c (guards against collapse)
    lr: float = option(1e-3, low=0, high=10, low_open=True)  # Adam, constant. SCAN's 1e-4 is for ~20k
                          # steps; on digits (PAD 40 epochs, 20 phase epochs, frozen) 1e-4 gave ACC 0.661, 1e-3 0.946
    weight_decay: float = option(1e-4, low=0, high=1)
    optimizer: str = option("adam", choices=("adam", "sgd"))  # adam: SCAN's; sgd: plain, the step is the gradient
                                                              # times lr (the contract's one-step DDP test)
    backbone: str = option("train", choices=("train", "frozen"))  # frozen: only the heads learn (eval-mode net)
    normalise: bool = False  # the heads read the features standardised (a BatchNorm without affine parameters)


PROBABILITIES = FeatureRequest("cluster_probabilities")
# The entropy's weight in the head choice: the authors' ``scan_evaluate`` ranks heads by consistency
# minus the entropy of the mean prediction, weight 1 (their training weight, ``scan.entropy_weight``,
# is 5).
SELECTION_ENTROPY_WEIGHT = 1.0
EMBEDDING = FeatureRequest("embedding")


def clusters_used(probabilities: Tensor) -> Tensor:
    """(H,) how many clusters each head's argmax gives at least one image; probabilities (N, H, K)."""
    n, h, k = probabilities.shape
    counts = torch.zeros(h, k, device=probabilities.device)
    counts.scatter_add_(1, probabilities.argmax(-1).t(), torch.ones(h, n, device=probabilities.device))
    return (counts > 0).sum(1)


class Scan(Method):
    """SCAN as a method trained after another: its epochs counted from its own start."""

    name = "scan"
    Options = ScanOptions
    needs_k_to_train = True  # its K-way heads
    uses_bank = False
    cluster_features = "backbone"  # SCAN's heads read the backbone output

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        s = self.options
        self.k = self.n_clusters()
        self.layer = cfg.cluster.features
        if self.layer not in ("backbone", "embedding"):
            raise ConfigError(f"cluster.head scan reads the backbone or the embedding, not '{self.layer}'")
        self.taps = (self.layer,)
        # H heads as one Linear(D, H K): every head's parameters take part in every step (DDP); with
        # ``scan.normalise`` after a BatchNorm without affine parameters (features standardised)
        d = self.tap_dims[self.layer]
        norm = [nn.BatchNorm1d(d, affine=False)] if s.normalise else []
        self.modules["heads"] = nn.Sequential(*norm, nn.Linear(d, s.heads * self.k))
        self.best: int | None = None  # the live head final_clusters kept (None: an earlier epoch's map)
        self.final_map: tuple[Tensor, Tensor] | None = None  # the map final_clusters kept (None: self-labelled)

    @classmethod
    def options_of(cls, cfg):
        return cfg.stages[cls.name]

    # -- schedule ---------------------------------------------------------------------------
    @classmethod
    def epochs_of(cls, cfg) -> int:
        s = cls.options_of(cfg)
        return s.epochs + s.self_label_epochs

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        """Epoch 0 mines the neighbours; every later SCAN epoch starts by scoring the heads the epoch
        before left (the head kept across epochs), and so does the self-labelling's first."""
        s = cls.options_of(cfg)
        return epoch < s.epochs or (s.self_label_epochs > 0 and epoch == s.epochs)

    def self_labelling(self, epoch: int) -> bool:
        return epoch >= self.options.epochs

    def phase(self, epoch: int) -> str:
        return "self-label" if self.self_labelling(epoch) else "scan"

    def trains_network(self) -> bool:
        return self.options.backbone == "train"

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam (SCAN's) or plain SGD (``scan.optimizer``), without momentum: the step is the gradient
        times the rate."""
        o = self.options
        make = torch.optim.SGD if o.optimizer == "sgd" else torch.optim.Adam
        return make(params, lr=o.lr, weight_decay=o.weight_decay)

    def learning_rate(self, epoch: int, steps: int) -> float:
        return self.options.lr  # constant, as SCAN's

    def rate_per_step(self) -> bool:
        return False

    def views_at(self, epoch: int) -> int:
        return 2 if self.self_labelling(epoch) else 1

    def plain_views(self, epoch: int) -> tuple[int, ...]:
        return (0,) if self.self_labelling(epoch) else ()  # the weak view: the image itself

    # -- structure: mined neighbours, then the head kept across epochs ------------------------
    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return (EMBEDDING,) if epoch == 0 else (PROBABILITIES, FeatureRequest(self.layer))

    def discover(self, ctx: DiscoveryContext) -> Structure:
        """Epoch 0: the mined neighbours. Later: the head kept so far (SCAN's ``scan.py`` keeps the
        lowest ``scan_evaluate`` loss over its epochs) against the heads the last epoch left, all
        scored on the current features; at the self-labelling's start also the head it trains."""
        if ctx.epoch == 0:
            neighbours = mine_neighbours(ctx.features(EMBEDDING.tap).float(), self.options.neighbours)
            return {"neighbours": neighbours.long().cpu()}
        keep = self.keep_best(ctx.features(PROBABILITIES.tap), ctx.features(self.layer), ctx.epoch - 1)
        out = {"neighbours": self.structure["neighbours"].cpu(), **{k: v.cpu() for k, v in keep.items()}}
        if self.self_labelling(ctx.epoch):  # the slot self-labelling trains: the kept head goes there
            out["best"] = keep["kept_slot"].clone()
        return out

    def selection_loss(self, probabilities: Tensor) -> Tensor:
        """(H,) SCAN's head-selection loss of every head on the whole data: Eq 2 over all (image,
        mined neighbour) pairs with the entropy weighed by :data:`SELECTION_ENTROPY_WEIGHT` (the
        authors' ``scan_evaluate``), +inf for a head whose argmax leaves a cluster empty when some
        head leaves none (labels never enter)."""
        neighbours = self.structure["neighbours"].to(probabilities.device)
        loss = scan_objective(probabilities.float(), neighbours, SELECTION_ENTROPY_WEIGHT)
        full = clusters_used(probabilities) == self.k
        return loss.masked_fill(~full, float("inf")) if full.any() else loss

    def lowest_loss_head(self, probabilities: Tensor) -> int:
        """The head of the lowest :meth:`selection_loss`."""
        return int(self.selection_loss(probabilities).argmin())

    def keep_best(self, probabilities: Tensor, features: Tensor, epoch: int) -> dict[str, Tensor]:
        """The head to keep after the stage's ``epoch`` (from 0): the lowest :meth:`selection_loss`
        among the live heads (``probabilities``, (N, H, K)) and the head kept before (its saved map
        applied to the same ``features``; a tie keeps the newer). Returns its map (``kept_weight``, ``kept_bias``:
        argmax(weight x + bias) of the layer), the epoch that trained it, its loss, ``kept_slot``
        (the live head of the lowest loss) and ``kept_live`` (whether the kept head is that one)."""
        h, old = self.options.heads, "kept_weight" in self.structure
        if old:
            extra = self.kept_probabilities(features).to(probabilities.device)
            probabilities = torch.cat([probabilities, extra[:, None]], dim=1)
        loss = self.selection_loss(probabilities)
        live = int(loss[:h].argmin())
        slot = {"kept_slot": torch.tensor(live)}
        if not old or loss[live] <= loss[h]:
            weight, bias = self.head_map(live)
            return {"kept_weight": weight, "kept_bias": bias, "kept_epoch": torch.tensor(epoch),
                    "kept_loss": loss[live].double().cpu(), "kept_live": torch.tensor(True), **slot}
        return {**{k: self.structure[k].cpu() for k in ("kept_weight", "kept_bias", "kept_epoch")},
                "kept_loss": loss[h].double().cpu(), "kept_live": torch.tensor(False), **slot}

    def kept_probabilities(self, features: Tensor) -> Tensor:
        """(N, K) the kept head's probabilities of ``features`` (its map in float64, softmax)."""
        w, b = self.structure["kept_weight"].double(), self.structure["kept_bias"].double()
        x = features.flatten(1).double().to(w.device)
        return torch.softmax(x @ w.T + b, dim=-1).float()

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        out: dict[str, Any] = {}
        if "best" in self.structure:
            out["scan_head"] = int(self.structure["best"])
        if "kept_epoch" in self.structure:  # the head kept across epochs so far
            out["scan_kept_epoch"] = int(self.structure["kept_epoch"])
            out["scan_kept_loss"] = round(float(self.structure["kept_loss"]), 6)
        if labels is not None:  # SCAN's Fig 2 diagnostic: the share of mined neighbours of one class
            nb = self.structure["neighbours"].cpu().numpy()
            out["neighbour_purity"] = round(float((labels[nb] == labels[:, None]).mean()), 4)
        return out

    # -- batches and loss -------------------------------------------------------------------
    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        """SCAN epochs: A = batch_size / 2 anchors (each image once an epoch), then one neighbour of
        each, drawn from its mined k by a generator of (seed, epoch). Self-labelling: uniform."""
        order = torch.randperm(n, generator=epoch_generator(seed, epoch))
        if self.self_labelling(epoch):
            return split_batches(order, batch_size)
        nb = self.structure["neighbours"].cpu()
        pick = torch.randint(nb.shape[1], (n,), generator=epoch_generator(seed + 7_919, epoch))
        partners = nb[order, pick[order]]
        return [torch.cat([a, p]) for a, p in zip(split_batches(order, max(1, batch_size // 2)),
                                                    split_batches(partners, max(1, batch_size // 2)))]

    def forward(self, taps: dict[str, Tensor]) -> dict[str, Tensor]:
        x = taps[self.layer].flatten(1)
        logits = at_least_float32(self.modules["heads"](x)).view(len(x), -1, self.k)
        taps["cluster_logits"] = logits
        taps["cluster_probabilities"] = torch.softmax(logits, dim=-1)
        return taps

    def batch_loss(self, step: Step) -> Tensor:
        if self.self_labelling(step.epoch):
            return self.self_label_loss(step)
        p = step.outputs[0]["cluster_probabilities"]
        all_p = step.gather(p)
        anchors = len(step.gidx) // 2  # rows [0, A) anchors, [A, 2A) their neighbours in order
        partner = all_p[(step.positions + anchors) % (2 * anchors)]
        return scan_rows(p, partner, all_p[:anchors].mean(0), self.options.entropy_weight)

    def self_label_loss(self, step: Step) -> Tensor:
        best = int(self.structure["best"])
        with torch.no_grad():
            weak = step.gather(step.outputs[0]["cluster_probabilities"][:, best].detach(), False)
            top, targets = weak.max(dim=1)
            confident = top > self.options.confidence
            weight = class_weights(targets, confident, self.k, self.options.class_balance)
            weight_sum = (weight[targets] * confident.float()).sum()
        rows = step.positions
        strong = step.outputs[1]["cluster_logits"][:, best]
        return self_label_rows(strong, targets[rows], confident[rows], weight, weight_sum, len(step.gidx))

    # -- the kept head ------------------------------------------------------------------------
    def final_features(self) -> tuple[FeatureRequest, ...]:
        return (PROBABILITIES, FeatureRequest(self.layer))

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray:
        """The clusters of the head kept across epochs (the last epoch's heads scored too), or, after
        self-labelling, of the head it trained (SCAN's ``selflabel.py`` keeps its last model)."""
        p = ctx.features(PROBABILITIES.tap)
        if "best" in self.structure:
            self.best, self.final_map = int(self.structure["best"]), None
            return p[:, self.best].argmax(dim=1).cpu().numpy()
        keep = self.keep_best(p, ctx.features(self.layer), self.options.epochs - 1)
        self.best = int(keep["kept_slot"]) if bool(keep["kept_live"]) else None
        self.final_map = (keep["kept_weight"], keep["kept_bias"])
        x = ctx.features(self.layer).flatten(1).float().cpu()
        return (x @ keep["kept_weight"].float().T + keep["kept_bias"].float()).argmax(dim=1).numpy()

    def reset_parameters(self) -> list[nn.Parameter]:
        """At the self-labelling's start, where the head kept across the SCAN epochs is an earlier
        epoch's, its map goes into the slot self-labelling trains, and the heads' Linear is returned
        (the loop drops its optimiser state): SCAN's self-labelling starts from the kept model.
        Nothing otherwise."""
        s = self.structure or {}
        if "best" not in s or bool(s.get("kept_live", True)):
            return []
        *norm, linear = self.modules["heads"]
        rows = slice(int(s["best"]) * self.k, (int(s["best"]) + 1) * self.k)
        a, c = s["kept_weight"].double(), s["kept_bias"].double()
        if norm:  # undo the fold of head_map: weight = A sigma, bias = c + A mu
            mean, sd = norm[0].running_mean.double(), torch.sqrt(norm[0].running_var.double() + norm[0].eps)
            a, c = a * sd, c + a @ mean
        with torch.no_grad():
            linear.weight[rows] = a.to(linear.weight)
            linear.bias[rows] = c.to(linear.bias)
        return [linear.weight, linear.bias]

    @torch.no_grad()
    def head_map(self, slot: int) -> tuple[Tensor, Tensor]:
        """Head ``slot`` in eval mode as an affine map of the layer, (K, D) and (K,) float32 on the
        CPU: the BatchNorm with its running statistics folded into the Linear (softmax keeps the
        order, so its cluster is argmax(A x + c))."""
        *norm, linear = self.modules["heads"]
        rows = slice(slot * self.k, (slot + 1) * self.k)
        a, c = linear.weight[rows].double(), linear.bias[rows].double()
        if norm:
            scale = 1 / torch.sqrt(norm[0].running_var.double() + norm[0].eps)
            a, c = a * scale, c - (a * scale) @ norm[0].running_mean.double()
        return a.float().cpu(), c.float().cpu()

    def assignment_map(self) -> AssignmentMap:
        """The kept head as argmax(A x + c) of the layer (:meth:`head_map`, or the map kept from an
        earlier epoch)."""
        if self.final_map is not None:
            a, c = self.final_map
        else:
            a, c = self.head_map(self.best if self.best is not None else int(self.structure["best"]))
        return AssignmentMap(self.layer, a.float().numpy(), c.float().numpy())
