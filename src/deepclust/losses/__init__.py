"""Losses, one file per paper. Every loss returns per-sample terms (B,) for the rows of this process;
the training loop reduces them (sum x world size / global batch), so one process equals N processes.
Terms over pairs or triplets within a batch are computed for this process's rows against the gathered
global batch (``methods.base.Step.gather``), which keeps the same rule."""

from .instance import instance_loss
from .neighbourhood import neighbourhood_loss, positive_set_loss

__all__ = ["instance_loss", "neighbourhood_loss", "positive_set_loss"]
