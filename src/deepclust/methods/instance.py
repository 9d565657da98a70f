"""Instance discrimination (Wu et al., CVPR 2018): every image is its own class, scored against the
memory bank with a non-parametric softmax (AND Eq 2), or NCE for large N (``memory.nce_k``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import instance_loss
from ..memory import MemoryBank
from .base import Method


class InstanceDiscrimination(Method):
    name = "instance"

    def batch_loss(self, embeddings: list[Tensor], idx: Tensor, bank: MemoryBank) -> Tensor:
        x = embeddings[0]
        if self.cfg.memory.nce_k:
            g = torch.Generator().manual_seed(int(idx[0]) * 7919 + int(idx.sum()))
            return bank.nce_loss(x, idx, self.cfg.memory.nce_k, generator=g)
        return instance_loss(bank.logits(x), idx)
