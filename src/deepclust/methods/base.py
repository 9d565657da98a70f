"""The hooks a method fills in. The training loop (``deepclust.train``) calls them in this order:

    for epoch in range(method.total_epochs()):
        if method.needs_discovery(epoch):             # on rank 0, result broadcast to all ranks
            method.set_structure(method.discover(epoch, bank))
        for each batch:
            embeddings = [net(view) for view in method.n_views views of the batch]
            loss = method.batch_loss(embeddings, idx, bank)   # per sample
            ... backward, optimiser step, bank.update(idx, embeddings[0])

A method never sees labels. ``describe`` may be given labels by the loop, to log diagnostics of the
structure it found (e.g. neighbourhood class consistency), and nothing it returns feeds back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from ..config import Config
from ..memory import MemoryBank

Structure = dict[str, Tensor]


class Method:
    name: str = ""
    n_views: int = 1

    def __init__(self, cfg: Config, n_images: int):
        self.cfg = cfg
        self.n_images = n_images
        self.structure: Structure | None = None

    # -- schedule ---------------------------------------------------------------------------
    def total_epochs(self) -> int:
        return self.cfg.train.epochs

    def schedule_epoch(self, epoch: int) -> int:
        """The epoch the learning-rate schedule sees (a method may restart it, as AND does per round)."""
        return epoch

    def phase(self, epoch: int) -> str:
        return ""

    # -- structure discovery ------------------------------------------------------------------
    def needs_discovery(self, epoch: int) -> bool:
        return False

    def discover(self, epoch: int, bank: MemoryBank) -> Structure | None:
        return None

    def set_structure(self, structure: Structure | None) -> None:
        self.structure = structure

    def describe(self, labels: np.ndarray | None) -> dict[str, Any]:
        """Diagnostics of the current structure for the log (labels only describe, never steer)."""
        return {}

    # -- loss -----------------------------------------------------------------------------------
    def batch_loss(self, embeddings: list[Tensor], idx: Tensor, bank: MemoryBank) -> Tensor:
        raise NotImplementedError

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"structure": self.structure}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.structure = state.get("structure")
