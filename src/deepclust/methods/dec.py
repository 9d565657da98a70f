"""A clustering stage after any method (``cluster.head: dec``): DEC (Xie, Girshick & Farhadi,
"Unsupervised Deep Embedding for Clustering Analysis", ICML 2016; reference code piiswrong/dec), a
method of its own on the method contract, trained after the configured one (``methods.STAGES``).

DEC's Sec 3 on the run's network in place of its stacked autoencoder (the method before it is the
initialisation, Sec 3.2's role):
 - its features z: the layer ``cluster.features`` names (auto: the embedding, DEC's z: the run's
   low-dimensional output; or the backbone), read as the network gives them;
 - the cluster centres mu_j: a K x D parameter of its own (``modules["centroids"]``), initialised at
   the stage's first discovery by k-means of a full pass of z (Sec 3.2: 20 restarts, the best kept;
   ``reset_parameters`` copies them in, after that discovery only, never on resume) and optimised
   with the network by SGD with momentum (Sec 3.1.3; the reference solver: lr 0.01, momentum 0.9,
   no weight decay, a constant rate);
 - the soft assignment q (Eq 1, Student's t with alpha = 1, ``losses/dec.py``) of the batch's rows
   to the current centres in ``forward``; the loss KL(P_i || Q_i) of each row (Eq 2);
 - the target P (Eq 3) is the structure: recomputed from a full pass with the current centres every
   ``dec.update_interval`` epochs (DEC recomputes it every T iterations, the reference code 20 of
   batch 256; an epoch of digits in batches of 128 is 14) and fixed in between;
 - the stop (Sec 3.1.3): the stage ends once fewer than ``dec.tol`` (0.1%) of the images change
   their assignment (argmax q) between two consecutive target updates, or after ``dec.epochs``;
 - its clusters: argmax q, the nearest centre, which is linear in z: argmax(2 mu_j . z - |mu_j|^2),
   saved as a ``linear`` head.npz (``assignment_map``), so ``predict`` reads new images through it.

Choices, written down:
 - The images are trained un-augmented (view 0 plain), as DEC's; the target comes from the same
   plain images, network in eval mode.
 - The stop is checked where the loop checks a method's length, before an epoch and after its
   discovery: the epoch whose target update finds fewer than ``tol`` changes still trains on that
   target (one update interval more than DEC's, which stops before training on it).
 - ``dec.backbone: frozen`` trains the centres alone on fixed features (the network in eval mode).
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
from ..losses.dec import kl_rows, log_soft_assignment, soft_assignment, target_distribution
from ..structure.clustering import kmeans
from .base import DiscoveryContext, FeatureRequest, Method, Step, Structure

KMEANS_RESTARTS = 20  # DEC Sec 3.2 (the reference code: sklearn's KMeans(n_init=20)); the best kept
KMEANS_ITERS = 50  # Lloyd iterations a restart


@dataclass(frozen=True)
class DecOptions:
    """The stage's options: the configuration's ``dec`` section (``--set dec.epochs=20``)."""

    epochs: int = option(10, low=1)  # at most; the stage ends earlier once ``tol`` is met
    update_interval: int = option(1, low=1)  # epochs between target updates (DEC's T iterations)
    alpha: float = option(1.0, low=0, low_open=True, high=1000)  # Student's t degrees of freedom (DEC: 1)
    tol: float = option(0.001, low=0, high=1)  # stop below this share of changed assignments (DEC: 0.1%);
                                               # 0: train all ``epochs``
    lr: float = option(0.01, low=0, high=10, low_open=True)  # SGD, constant (the reference solver's 0.01)
    momentum: float = option(0.9, low=0, high=1, high_open=True)  # the reference solver's 0.9
    backbone: str = option("train", choices=("train", "frozen"))  # frozen: only the centres learn


class Centroids(nn.Module):
    """DEC's cluster centres mu (K, D), a parameter optimised with the network (Sec 3.1.3)."""

    def __init__(self, k: int, d: int):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(k, d))  # k-means at the stage's first discovery


class Dec(Method):
    """DEC as a method trained after another: its epochs counted from its own start."""

    name = "dec"
    Options = DecOptions
    needs_k_to_train = True  # its K centres
    uses_bank = False
    cluster_features = "embedding"  # DEC's z: the run's low-dimensional output

    def __init__(self, cfg, n_images: int, tap_dims: dict[str, int] | None = None, **net_info):
        super().__init__(cfg, n_images, tap_dims, **net_info)
        self.k = self.n_clusters()
        self.layer = cfg.cluster.features
        if self.layer not in ("backbone", "embedding"):
            raise ConfigError(f"cluster.head dec reads the backbone or the embedding, not '{self.layer}'")
        self.taps = (self.layer,)
        self.features = FeatureRequest(self.layer)  # plain images, network in eval mode
        self.modules["centroids"] = Centroids(self.k, self.tap_dims[self.layer])

    @classmethod
    def options_of(cls, cfg):
        return cfg.stages[cls.name]

    @property
    def mu(self) -> nn.Parameter:
        return self.modules["centroids"].mu

    # -- schedule and how it trains -----------------------------------------------------------
    @classmethod
    def epochs_of(cls, cfg) -> int:
        return cls.options_of(cfg).epochs

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        return epoch % cls.options_of(cfg).update_interval == 0

    def total_epochs(self) -> int:
        """``dec.epochs``, or fewer once a target update found fewer than ``dec.tol`` of the
        assignments changed (Sec 3.1.3): the run ends after that update's epoch."""
        s, o = self.structure, self.options
        if s is not None and o.tol > 0 and float(s["changed"]) < o.tol:
            return min(o.epochs, int(s["epoch"]) + 1)
        return o.epochs

    def phase(self, epoch: int) -> str:
        return "dec"

    def trains_network(self) -> bool:
        return self.options.backbone == "train"

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """SGD with momentum, no weight decay (DEC Sec 3.1.3; the reference solver)."""
        o = self.options
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)

    def learning_rate(self, epoch: int, steps: int) -> float:
        return self.options.lr  # constant, as the reference solver's

    def rate_per_step(self) -> bool:
        return False

    def plain_views(self, epoch: int) -> tuple[int, ...]:
        return (0,)  # DEC trains on the images themselves

    # -- structure: the target distribution ------------------------------------------------------
    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return (self.features,)

    def discover(self, ctx: DiscoveryContext) -> Structure:
        """The target P (Eq 3) of every image from a full pass and the current centres (at the
        stage's first discovery the k-means centres, Sec 3.2, kept in the structure for
        ``reset_parameters``); the assignments and the share that changed since the last update."""
        z = ctx.features(self.features.tap).float()
        out: Structure = {"epoch": torch.tensor(ctx.epoch)}
        if ctx.epoch == 0:
            _, centres, _ = kmeans(z.cpu().numpy(), self.k, seed=self.cfg.train.seed, n_iter=KMEANS_ITERS,
                                   n_init=KMEANS_RESTARTS)
            out["kmeans"] = mu = torch.from_numpy(centres)
        else:
            mu = self.mu.detach().float().cpu()
        q = soft_assignment(z.cpu(), mu, self.options.alpha)  # DEC Eq 1
        assigned = q.argmax(1)
        before = None if self.structure is None or ctx.epoch == 0 else self.structure["assigned"].cpu()
        changed = 1.0 if before is None else float((assigned != before).double().mean())
        out.update(target=target_distribution(q).float(), assigned=assigned,  # DEC Eq 3
                   changed=torch.tensor(changed, dtype=torch.float64))
        return out

    def reset_parameters(self) -> list[nn.Parameter]:
        """After the stage's first discovery only (never on resume): the centres from its k-means."""
        if "kmeans" not in self.structure or int(self.structure["epoch"]) != 0:
            return []
        with torch.no_grad():
            self.mu.copy_(self.structure["kmeans"].to(self.mu.device, self.mu.dtype))
        return [self.mu]

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        assigned = self.structure["assigned"].cpu().numpy()
        out: dict[str, Any] = {"dec_changed": round(float(self.structure["changed"]), 6),
                               "dec_non_empty": int(np.unique(assigned).size)}
        if labels is not None:
            from ..evaluate import nmi

            out["dec_nmi"] = round(nmi(labels, assigned), 4)
        return out

    # -- loss ---------------------------------------------------------------------------------------
    def forward(self, taps: dict[str, Tensor]) -> dict[str, Tensor]:
        taps["dec_log_q"] = log_soft_assignment(taps[self.layer].flatten(1), self.mu, self.options.alpha)
        return taps

    def batch_loss(self, step: Step) -> Tensor:
        target = self.structure["target"][step.idx]
        return kl_rows(target, step.outputs[0]["dec_log_q"])  # DEC Eq 2, per row

    # -- the clusters -----------------------------------------------------------------------------
    def final_features(self) -> tuple[FeatureRequest, ...]:
        return (self.features,)

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray:
        z = ctx.features(self.features.tap).float()
        return soft_assignment(z, self.mu.detach(), self.options.alpha).argmax(1).cpu().numpy()

    @torch.no_grad()
    def assignment_map(self) -> AssignmentMap:
        """argmax q = the nearest centre (Eq 1's kernel falls with the distance) = argmax of
        2 mu_j . z - |mu_j|^2 (|z|^2 is the same for every j): weight 2 mu, bias -|mu|^2."""
        mu = self.mu.detach().double().cpu()
        return AssignmentMap(self.layer, (2 * mu).float().numpy(), (-(mu * mu).sum(1)).float().numpy())
