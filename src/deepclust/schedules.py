"""The optimiser and learning-rate policy of ``cfg.optim``: what a method's ``make_optimizer`` and
``learning_rate`` hooks (``methods/base.py``) give by default."""

from __future__ import annotations

import math

import torch

from .config import OptimConfig


def learning_rate(o: OptimConfig, schedule_epoch: int, iteration: int = 0, length: int | None = None) -> float:
    """The rate of ``optim.schedule``, set per epoch unless said otherwise: ``step``, lr * gamma **
    (milestones passed by the schedule's epoch; ``OptimConfig.milestone_epochs(length)``: fixed
    epochs or fractions of the run); ``cosine``, lr * (1 + cos(pi * epoch / length)) / 2; both with
    an optional linear warm-up. ``length``: the epochs of the run (or round) the schedule spans
    (``Method.schedule_length``), needed by fractions and cosine. ``inv``, Caffe's inverse decay
    lr * (1 + inv_gamma * iteration) ** -inv_power over the run's optimiser steps, set per step (JULE)."""
    if o.schedule == "inv":
        return o.lr * (1.0 + o.inv_gamma * iteration) ** (-o.inv_power)
    if length is None and (o.schedule == "cosine" or (o.milestones is None and o.milestones_frac)):
        raise ValueError("learning_rate: this schedule follows the run's length; pass length")
    if o.schedule == "cosine":
        lr = o.lr * 0.5 * (1.0 + math.cos(math.pi * min(schedule_epoch, length) / max(length, 1)))
    else:
        lr = o.lr * o.gamma ** sum(schedule_epoch >= m for m in o.milestone_epochs(length or 0))
    if o.warmup_epochs and schedule_epoch < o.warmup_epochs:
        lr *= (schedule_epoch + 1) / (o.warmup_epochs + 1)
    return lr


def build_optimizer(o: OptimConfig, params) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optim`` names over ``params``."""
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    if o.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, alpha=0.9, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
