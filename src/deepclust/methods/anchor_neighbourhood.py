"""AND: Unsupervised Deep Learning by Neighbourhood Discovery (Huang et al., ICML 2019).

Round 0 is instance discrimination (Eq 2). At the start of round r = 1..R the anchor neighbourhoods
N_k(x) (Eq 1) and the entropy H(x) of each bank row's softmax (Eq 5) are computed from the memory
bank; the lowest-entropy fraction S = r / R (Eq 6) of anchors is trained with its neighbourhood
(Eq 3), the rest as single instances: Eq 7. Memory update: Eq 8 (MemoryBank.update).

Choices the paper leaves open, settled as the authors' reference code does (Raymond-sci/AND):
 - entropy over softmax(memory . memory^T / T), diagonal included, T = memory temperature (0.1);
 - the learning-rate schedule restarts every round (milestones count from the round's start;
   fractions, ``optim.milestones_frac``, are of the round's length);
 - neighbourhoods are rebuilt only at round starts and stay fixed during a round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ..config import option
from ..errors import ConfigError
from ..losses import instance_loss, neighbourhood_loss
from ..structure.neighbourhoods import (
    curriculum_fraction,
    entropy_and_neighbours,
    neighbourhood_quality,
    select_lowest_entropy,
)
from .base import DiscoveryContext, Method, Step, Structure


@dataclass
class AndOptions:
    """AND (Huang et al., ICML 2019)."""

    # R of Eq 6; round 0 (instance discrimination) comes on top
    rounds: int = option(4, low=1, flag="AND: curriculum rounds R after round 0 (paper: 4)")
    neighbours: int = option(1, low=1, flag="AND: neighbourhood size k (paper: 1)")  # k of Eq 1
    # linear: S = r/R (Eq 6); one-off: S = 1 from round 1 (Table 6)
    curriculum: str = option("linear", choices=("linear", "one-off"), flag="AND: linear (paper) | one-off")
    round0_epochs: int | None = option(None, low=0)  # epochs of round 0; None: as every other round


class AnchorNeighbourhoodDiscovery(Method):
    name = "and"
    needs_k_to_train = False  # neighbourhoods of the bank, never K
    Options = AndOptions

    @classmethod
    def check_data(cls, options: AndOptions, n_images: int) -> None:
        if options.neighbours >= n_images:
            raise ConfigError(f"options.neighbours (k={options.neighbours}) must be smaller than N={n_images}")

    @staticmethod
    def _round0(cfg) -> int:
        o = cfg.options
        return cfg.train.epochs if o.round0_epochs is None else o.round0_epochs

    @classmethod
    def epochs_of(cls, cfg) -> int:
        return cls._round0(cfg) + cfg.options.rounds * cfg.train.epochs

    @classmethod
    def rounds_of(cls, cfg, epoch: int) -> tuple[int, int]:
        """(round, epoch within the round) of a run of ``cfg``."""
        r0 = cls._round0(cfg)
        if epoch < r0:
            return 0, epoch
        per = max(cfg.train.epochs, 1)
        return 1 + (epoch - r0) // per, (epoch - r0) % per

    def round_of(self, epoch: int) -> tuple[int, int]:
        """(round, epoch within the round)."""
        return self.rounds_of(self.cfg, epoch)

    def schedule_epoch(self, epoch: int) -> int:
        return self.round_of(epoch)[1]

    def schedule_length(self, epoch: int) -> int:
        return self._round0(self.cfg) if self.round_of(epoch)[0] == 0 else self.cfg.train.epochs

    def phase(self, epoch: int) -> str:
        return f"round {self.round_of(epoch)[0]}"

    @classmethod
    def discovers_at(cls, cfg, epoch: int) -> bool:
        r, e = cls.rounds_of(cfg, epoch)
        return r >= 1 and e == 0

    def discover(self, ctx: DiscoveryContext) -> Structure:
        r, _ = self.round_of(ctx.epoch)
        entropy, neighbours = entropy_and_neighbours(  # AND Eq 1 and Eq 5, one pass over the bank
            ctx.bank.features, self.options.neighbours, ctx.bank.temperature
        )
        fraction = curriculum_fraction(r, self.options.rounds, self.options.curriculum)
        selected = select_lowest_entropy(entropy, fraction)
        return {"neighbours": neighbours, "selected": selected, "entropy": entropy}

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        if self.structure is None:
            return {}
        out: dict[str, Any] = {"selected": int(self.structure["selected"].sum())}
        if labels is not None:
            q = neighbourhood_quality(self.structure["neighbours"], self.structure["selected"], labels)
            out.update(consistent=q.consistent, consistent_fraction=q.consistent_fraction)
        return out

    def batch_loss(self, step: Step) -> Tensor:
        idx = step.idx
        logits = step.bank.logits(step.outputs[0]["embedding"])
        if self.structure is None:
            return instance_loss(logits, idx)  # round 0: Eq 2
        s = self.structure
        dev = logits.device
        return neighbourhood_loss(  # Eq 7
            logits, idx, s["neighbours"].to(dev)[idx], s["selected"].to(dev)[idx]
        )
