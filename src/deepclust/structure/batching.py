"""How an epoch is cut into global batches: pure functions of (N, batch size, seed, epoch), so every
process cuts the same batches and a resumed run cuts the ones it would have cut.

Each returns a list of int64 index tensors (the global batches, in order); a process takes its slice of
each. Sampling distributions over clusters (DeepCluster, PCP) produce an index sequence that
``split_batches`` cuts the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an epoch's sample order (the seeding of the original training loop)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def split_batches(order: Tensor, batch_size: int) -> list[Tensor]:
    """ceil(len / B) near-equal consecutive batches (no tiny last batch)."""
    steps = max(1, -(-len(order) // batch_size))
    return list(torch.tensor_split(order, steps))


def uniform_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """A fresh permutation of the N samples, every sample once an epoch."""
    return split_batches(torch.randperm(n, generator=epoch_generator(seed, epoch)), batch_size)
