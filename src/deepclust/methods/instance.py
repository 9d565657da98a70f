"""Instance discrimination (Wu et al., CVPR 2018): every image is its own class, scored against the
memory bank with a non-parametric softmax (AND Eq 2), or NCE for large N (``memory.nce_k``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..losses import instance_loss
from .base import Method, Step


class InstanceDiscrimination(Method):
    name = "instance"
    needs_k_to_train = False  # instance discrimination: no clusters while it trains

    def batch_loss(self, step: Step) -> Tensor:
        x, idx, bank = step.outputs[0]["embedding"], step.idx, step.bank
        if self.cfg.memory.nce_k:
            g = torch.Generator().manual_seed(int(idx[0]) * 7919 + int(idx.sum()))
            return bank.nce_loss(x, idx, self.cfg.memory.nce_k, generator=g)  # Wu et al. Eq 5-7
        return instance_loss(bank.logits(x), idx)  # Wu et al. Eq 2 / AND Eq 2
