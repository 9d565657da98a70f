"""The method contract: the hooks every method fills in, and the contexts the training loop hands it.

One contract serves all seven methods (instance discrimination, AND, PAD, PCP, DeepCluster, DCCM,
JULE; ``../shared/design/method-contract.md`` sets their needs side by side) and the methods a run
trains after them (SCAN, ``cluster.head: scan``): a run is a list of methods on one network
(``methods.run_methods``), each set up in turn (``network_parameters`` it trains, ``make_optimizer``)
and trained for its ``total_epochs``, epochs numbered from its own start. The loop
(``deepclust.train.Trainer.fit``) calls, per epoch of a method::

    if method.needs_discovery(epoch):                       # structure, on rank 0, then broadcast
        features = full passes for method.discovery_features(epoch)      # all ranks share the pass
        structure = method.discover(DiscoveryContext(...))               # rank 0 only
        method.set_structure(structure)                                  # every rank
    for gidx in method.batches(epoch, ...):                  # global batches, seeded; default uniform
        outputs = model(views)     # per view: the network's taps (method.taps), then method.forward
        loss = method.batch_loss(Step(...)).sum() * world / len(gidx)
        backward, optimiser step (network + method.modules) at method.learning_rate(...)
        method.after_step(step)                              # default: memory-bank update (AND Eq 8)
    after training: method.final_clusters(DiscoveryContext(...))  # the method's own clusters, or None

The structure lifecycle (the rule every method keeps; ``tests/test_contract.py`` enforces it by
killing each method mid-round and comparing the resumed run with an uninterrupted one, and by
comparing every rank's method state under DDP):
 - ``discover(ctx)`` runs on rank 0 only and **mutates nothing**: it returns everything that must
   persist from one discovery to the next (the structure and any history it keeps, e.g. PCP's vote
   history) as a dict of tensors, or None. It may read ``self.structure`` (the previous one).
 - ``set_structure(s)`` runs on every rank with the broadcast structure, again on resume and after
   ``load_state_dict``: it is **idempotent** (any number of calls, same state) and derives what it
   needs from ``s`` alone.
 - ``reset_parameters()`` runs on every rank once after each *fresh* discovery (never on resume): it
   re-initialises the method's own parameters that a new structure invalidates (DeepCluster's
   classifier) and returns them, so the loop drops their optimiser state.
 - The checkpoint holds the structure, the method's modules and its bank; nothing else of a method
   persists, so a resumed run and every rank hold the same state.

What a method may own and ask for:
 - ``modules`` (an ``nn.ModuleDict``): trainable parts of its own (DeepCluster's classifier, DCCM's
   K-way head and discriminator). They are in the optimiser, wrapped by Fabric with the network,
   saved in the checkpoint and restored by ``--resume``; under DDP their BatchNorm layers are those
   of the global batch, as the network's (``train.sync_batchnorm``).
 - ``taps``: the network outputs the loss needs (``embedding``, ``backbone``, or any stage name such
   as ``conv2``; stage outputs keep their shape). ``forward(taps)`` adds the method modules' outputs.
 - a memory bank (``make_bank``; None for DeepCluster, DCCM, JULE). ``after_step`` updates it from
   the features of all processes, gathered in rank order, so every replica's bank is identical.
 - full passes of features over the training images (``discovery_features``: un-augmented, or one
   seeded augmented view) for discovery on fresh features (DeepCluster, JULE), not the bank.
 - the batches of an epoch (``batches``): DeepCluster / PCP sample uniformly over clusters, JULE by
   cluster. They must come from generators seeded by (seed, epoch) so runs repeat and every process
   cuts the same global batches.
 - its length (``total_epochs``): read by the loop before every epoch, so it may depend on the
   current structure (JULE trains until its merges reach the target cluster count); the learning
   rate (``learning_rate``, set each epoch or, ``rate_per_step``, each step) follows
   ``optim.schedule`` by default (``step`` milestones, fixed or fractions of ``schedule_length``,
   ``cosine`` over it, or Caffe's ``inv`` per step); SCAN's is constant.
 - its network's build options (``backbone_options``, a class question of its options, passed by
   ``methods.build_network`` to ``nets.build_backbone``: JULE's ``ip1``); none by default.
 - its optimiser (``make_optimizer``: ``cfg.optim``'s by default) over the network's parameters it
   trains (``network_parameters``; ``trains_network`` False keeps the network frozen, in eval mode)
   and its modules'.
 - what it needs of the configuration, checked where it is read: K is ``n_clusters()``, which
   refuses a configuration that resolution has not completed.
 - its own final clusters (``final_clusters``; ``--cluster-head method``).

The DDP rule for losses: ``batch_loss`` returns one term per local row; the loop sums them and scales
by world size / global batch, so DDP's gradient average equals the one-process mean. A loss over pairs
or triplets within the batch computes, for each local row, its terms against the *gathered* global
batch (``Step.gather``, with gradient), which keeps the same rule: the local rows' terms of all
processes add up to the one-process loss.

A method never sees labels. ``describe`` may be given labels by the loop, to log diagnostics of the
structure it found; nothing it returns feeds back.

Options: each method declares an ``Options`` dataclass in its own file, built from ``options:`` of the
configuration with ``deepclust.config.option`` fields (ranges checked by the one validator) and
``check(self)`` for rules across fields; ``check_data(options, n_images)`` for rules that need the
data size (a method trained after another reads its own section, SCAN's ``scan``, through
``options``). The registries (``methods/__init__.py``) map the name to the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..config import Config
from ..errors import ConfigError
from ..heads import AssignmentMap
from ..memory import MemoryBank
from ..schedules import build_optimizer, learning_rate
from ..structure.batching import uniform_batches
from ..views import draw_generator

Structure = dict[str, Tensor]


@dataclass
class NoOptions:
    """This method has no options beyond the shared ones."""


@dataclass(frozen=True)
class FeatureRequest:
    """A full pass of ``tap`` over the training images, in dataset order, network in eval mode:
    of the plain images, or (``augmented``) of one view drawn from the (seed, epoch) generators.
    ``tap`` is a network layer (``EmbeddingNet.layer_names``) or an output the method's ``forward``
    adds (DCCM's cluster probabilities)."""

    tap: str = "embedding"
    augmented: bool = False


@dataclass
class DiscoveryContext:
    """What discovery may read: the bank, the requested full passes, the raw images, a seeded
    generator. Built by the loop on rank 0."""

    epoch: int
    n_images: int
    seed: int
    device: torch.device
    bank: MemoryBank | None = None
    passes: dict[FeatureRequest, Tensor] = field(default_factory=dict)
    images: Tensor | None = None  # uint8 (N, C, H, W), dataset order; None when streamed (``reads_images``)

    def features(self, tap: str = "embedding", augmented: bool = False) -> Tensor:
        key = FeatureRequest(tap, augmented)
        if key not in self.passes:
            raise ConfigError(f"discovery asked for features '{tap}' (augmented={augmented}) that its "
                              "method did not request in discovery_features")
        return self.passes[key]

    def generator(self, *keys: int) -> torch.Generator:
        """A CPU generator seeded by (seed, epoch, *keys): the same on every process and resume."""
        return draw_generator(self.seed, self.epoch, 7_000_001, *keys)


@dataclass
class Step:
    """One training step as a method's loss sees it (this process's rows of the global batch)."""

    epoch: int
    step: int
    idx: Tensor  # (B_local,) dataset indices of this process's rows
    gidx: Tensor  # (B,) dataset indices of the whole global batch, in order
    positions: Tensor  # (B_local,) where this process's rows sit in the global batch
    outputs: list[dict[str, Tensor]]  # per view: taps + method outputs for the local rows
    bank: MemoryBank | None
    world: int = 1
    gather_fn: Callable[[Tensor, bool], Tensor] | None = None
    extra_rows: Tensor | None = None  # local row positions that have views 1.. (None: every row)

    def gather(self, t: Tensor, grad: bool = True) -> Tensor:
        """The global batch's rows of a per-row tensor of this process (rows in global order).
        With ``grad`` the gradient flows back to every process's own rows."""
        if self.world == 1 or self.gather_fn is None:
            return t
        return self.gather_fn(t, grad)


class Method:
    """Base class: the defaults suit a memory-bank method trained on uniform batches."""

    name: str = ""
    Options: type = NoOptions
    n_views: int = 1
    taps: tuple[str, ...] = ("embedding",)
    uses_bank: bool = True
    embedding_head: bool = True  # False: the embedding is the normalised backbone output (no projection)
    # Its discovery reads every image's pixels at once (``DiscoveryContext.images``): a run whose images
    # are streamed from a store (datapath.py), which never holds them whole, refuses the method.
    reads_images: bool = False
    # The default cluster head (cluster.head / features / eigenvectors "auto"): (kind, layer, spectral
    # eigenvectors per cluster), chosen per method on the development data (digits, USPS:
    # benchmarks/results/dev-choices-*.json). Spectral on the backbone layer with 2K eigenvectors is
    # the best or tied-best way for instance discrimination, AND, PCP and DeepCluster there.
    cluster_head: tuple[str, str, int] = ("spectral", "backbone", 2)
    # Whether the method reads K (``n_clusters()``) while it trains (its structure, modules or length);
    # each method declares it. A run none of whose methods does is trained without K when K is not
    # given, and K is read off its learned features afterwards (``scoring.settle_n_clusters``).
    needs_k_to_train: bool = True
    # A method added to the run by its cluster head (``methods.STAGES``): the layer that head reads
    # when ``cluster.features`` is auto (None: the configured method's choice above).
    cluster_features: str | None = None

    def __init__(self, cfg: Config, n_images: int, tap_dims: dict[str, int] | None = None,
                 tap_shapes: dict[str, tuple[int, ...]] | None = None, shallow_layer: str | None = None):
        """``tap_dims`` / ``tap_shapes``: the flat size / per-sample shape of every network tap;
        ``shallow_layer``: the stage a shallow-vs-deep loss reads (``nets.Backbone.shallow_layer``)."""
        self.cfg = cfg
        self.n_images = n_images
        self.tap_dims = tap_dims or {}
        self.tap_shapes = tap_shapes or {}
        self.shallow_layer = shallow_layer
        self.structure: Structure | None = None
        self.modules = nn.ModuleDict()
        self.bank: MemoryBank | None = self.make_bank()

    @classmethod
    def options_of(cls, cfg: Config) -> Any:
        """This method's own options in ``cfg``: the configured method's ``options`` (a stage
        reads its section, ``cfg.stages[name]``)."""
        return cfg.options

    @property
    def options(self):
        return self.options_of(self.cfg)

    @classmethod
    def backbone_options(cls, options: Any) -> dict[str, Any]:
        """Keywords of ``nets.build_backbone`` that the method's options set (``methods.build_network``
        passes them; JULE: its ip1). None by default."""
        return {}

    @classmethod
    def check_data(cls, options: Any, n_images: int) -> None:
        """Option rules that depend on the number of training images (ConfigError when broken)."""

    def make_bank(self) -> MemoryBank | None:
        if not self.uses_bank:
            return None
        m = self.cfg.memory
        dim = self.cfg.net.dim if self.embedding_head else self.tap_dims["backbone"]
        return MemoryBank(self.n_images, dim, temperature=m.temperature, eta=m.eta,
                          seed=self.cfg.train.seed)

    # -- schedule ---------------------------------------------------------------------------
    # A question of the configuration alone, answered by the class (the time budget asks it before
    # any network or bank exists, ``budget.method_schedule``): a method overrides ``epochs_of`` and
    # ``discovers_at``; the instance hooks ``total_epochs`` / ``needs_discovery`` ask them.
    @classmethod
    def epochs_of(cls, cfg: Config) -> int:
        """Epochs of a run of ``cfg`` (all rounds)."""
        return cfg.train.epochs

    @classmethod
    def discovers_at(cls, cfg: Config, epoch: int) -> bool:
        """Whether a run of ``cfg`` discovers structure before ``epoch``."""
        return False

    def total_epochs(self) -> int:
        return self.epochs_of(self.cfg)

    def schedule_epoch(self, epoch: int) -> int:
        """The epoch the learning-rate schedule sees (AND restarts it each round)."""
        return epoch

    def schedule_length(self, epoch: int) -> int:
        """Epochs of the span the learning-rate schedule covers at ``epoch`` (the run; a method that
        restarts the schedule, the round): what ``optim.milestones_frac`` and ``cosine`` are
        fractions of. Read from the configuration (and, for JULE, the checkpointed structure), so a
        resumed run -- and a budgeted one, whose ``train.epochs`` the plan wrote -- keeps it."""
        return self.total_epochs()

    def phase(self, epoch: int) -> str:
        return ""

    # -- how it trains: what the loop asks when it sets the method up, and each epoch -----------
    def trains_network(self) -> bool:
        """Whether the network learns while this method trains (a method after the first may train
        its own modules alone: the network then stays in eval mode and out of the optimiser)."""
        return True

    def network_parameters(self, net: nn.Module) -> list[nn.Parameter]:
        """The network's parameters this method trains; the others are frozen while it trains (out of
        backward and of its optimiser). All of them when it trains the network, the projection head
        (``net.head``) only when ``embedding`` is among its taps: a part that does not reach the loss
        gets no gradient, which DDP refuses."""
        if not self.trains_network():
            return []
        head = set() if "embedding" in self.taps else {id(p) for p in net.head.parameters()}
        return [p for p in net.parameters() if id(p) not in head]

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """Its optimiser over ``params`` (the network's it trains, then its modules'): ``cfg.optim``."""
        return build_optimizer(self.cfg.optim, params)

    def learning_rate(self, epoch: int, steps: int) -> float:
        """The rate at ``epoch`` after ``steps`` optimiser steps of the run: ``optim.schedule`` over
        the span ``schedule_epoch`` / ``schedule_length`` give."""
        return learning_rate(self.cfg.optim, self.schedule_epoch(epoch), steps, self.schedule_length(epoch))

    def rate_per_step(self) -> bool:
        """Whether the rate is set before every optimiser step (Caffe's ``inv``), not once an epoch."""
        return self.cfg.optim.schedule == "inv"

    def n_clusters(self) -> int:
        """K, ``cluster.n_clusters``: resolution sets it before training (``resolution.resolve``), and
        a method that needs it asks here, so an unresolved configuration is refused, not guessed."""
        k = self.cfg.cluster.n_clusters
        if k is None:
            raise ConfigError(f"{self.name or type(self).__name__} needs cluster.n_clusters, which "
                              "resolution.resolve sets before training: give K or resolve the configuration")
        return int(k)

    def views_at(self, epoch: int) -> int:
        """Augmented views per sample at ``epoch`` (PCP's two-view warm-up ends part-way)."""
        return self.n_views

    def plain_views(self, epoch: int) -> tuple[int, ...]:
        """Views made without augmentation (DCCM pairs the original image, view 0, with a transformed
        one); their random draws are still made, so the other views do not change."""
        return ()

    def extra_view_rows(self, epoch: int, gidx: Tensor) -> Tensor | None:
        """Which rows of the global batch get views 1.. (bool (B,)), or None for every row: PAD
        needs a second view only for its isolated samples. Views are still drawn for the whole
        global batch, so the draws do not depend on the selection or the process count."""
        return None

    # -- structure discovery ------------------------------------------------------------------
    def needs_discovery(self, epoch: int) -> bool:
        return self.discovers_at(self.cfg, epoch)

    def discovery_features(self, epoch: int) -> tuple[FeatureRequest, ...]:
        return ()

    def discover(self, ctx: DiscoveryContext) -> Structure | None:
        """Rank 0: the new structure, with everything that must persist to the next discovery.
        Mutates nothing (see the lifecycle in the module docstring)."""
        return None

    def set_structure(self, structure: Structure | None) -> None:
        """Every rank, with the broadcast structure (on the training device); idempotent: also run on
        resume and by ``load_state_dict``. Derived state comes from ``structure`` alone."""
        self.structure = structure

    def reset_parameters(self) -> list[nn.Parameter]:
        """Every rank, once after each fresh discovery (never on resume): re-initialise what the new
        structure invalidates and return those parameters (their optimiser state is dropped)."""
        return []

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        """Diagnostics of the current structure for the log (labels only describe, never steer)."""
        return {}

    # -- batches and loss -------------------------------------------------------------------------
    def batches(self, epoch: int, n: int, batch_size: int, seed: int) -> list[Tensor]:
        return uniform_batches(n, batch_size, seed, epoch)

    def forward(self, taps: dict[str, Tensor]) -> dict[str, Tensor]:
        """Add the outputs of the method's own modules (runs inside the Fabric-wrapped forward)."""
        return taps

    def batch_loss(self, step: Step) -> Tensor:
        raise NotImplementedError

    def after_step(self, step: Step) -> None:
        """Memory-bank update from the first view's embeddings of every process (AND Eq 8)."""
        if self.bank is not None:
            feats = step.gather(step.outputs[0]["embedding"].detach().float(), False)
            self.bank.update(step.gidx.to(feats.device), feats)

    # -- final clusters ---------------------------------------------------------------------------
    def final_features(self) -> tuple[FeatureRequest, ...]:
        return ()

    def assignment_map(self) -> AssignmentMap | None:
        """The method's own clusters of any image as argmax(weight x + bias) of the network's
        ``layer`` (DCCM's softmax head in eval mode, a stage's learned head): the run's head then
        reads them through it, and ``predict`` uses it on new images. None: new images join the
        method's clusters by the kNN vote over the trained ones."""
        return None

    def final_clusters(self, ctx: DiscoveryContext) -> np.ndarray | None:
        """The method's own clusters of the training images (int64 (N,)), or None (post-hoc heads only)."""
        return None

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"structure": self.structure, "modules": self.modules.state_dict(),
                "bank": self.bank.state_dict() if self.bank is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.modules.load_state_dict(state.get("modules") or {})
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        self.set_structure(state.get("structure"))
