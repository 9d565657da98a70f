"""DeepCluster (Caron et al., ECCV 2018): the classifier is trained on the k-means pseudo-labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError


def deepcluster_loss(logits: Tensor, pseudo_labels: Tensor) -> Tensor:
    """Per-sample multinomial logistic loss (B,) of the classifier's ``logits`` (B, K) against the
    pseudo-labels (B,) in [0, K): DeepCluster Eq 1 (the loss l of the supervised objective, with y_n
    the cluster assignments of Eq 2), ``nn.CrossEntropyLoss`` in the original ``main.py``.

    Computed in at least float32 (autocast-safe). Shapes are checked here; the label range is not (that
    would cost a device sync per step) and is left to ``cross_entropy``.
    """
    if logits.ndim != 2 or pseudo_labels.shape != (logits.shape[0],):
        raise DataError(f"expected logits (B, K) and labels (B,), got {tuple(logits.shape)} and "
                        f"{tuple(pseudo_labels.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
    return F.cross_entropy(logits, pseudo_labels.long(), reduction="none")
