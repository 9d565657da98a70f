"""Sampling an epoch uniformly over clusters (DeepCluster, Caron et al., ECCV 2018, Sec 3.3
"Avoiding trivial solutions": "sample images based on a uniform distribution over the classes, or
pseudo-labels"), as a pure function of (labels, size, seed).

The rule is the one of the original code's ``UnifLabelSampler`` (facebookresearch/deepcluster,
``util.py``); this is our own vectorised implementation with a ``torch.Generator``. Its output is
an index sequence that ``structure.batching.split_batches`` cuts into global batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError, DataError


def _generator(generator_or_seed) -> torch.Generator:
    if isinstance(generator_or_seed, torch.Generator):
        return generator_or_seed
    if isinstance(generator_or_seed, bool) or not isinstance(generator_or_seed, int):
        raise ConfigError(f"expected an integer seed or a torch.Generator, got {generator_or_seed!r}")
    return torch.Generator().manual_seed(generator_or_seed)


def _cluster_ids(labels, singles: str) -> tuple[Tensor, Tensor]:
    """(sample indices that take part, their dense cluster ids 0..K-1 over non-empty clusters)."""
    lab = torch.as_tensor(labels).cpu()
    if lab.ndim != 1 or lab.is_floating_point() or lab.dtype == torch.bool:
        raise DataError(f"labels must be a 1-D integer array, got shape {tuple(lab.shape)}, dtype {lab.dtype}")
    lab = lab.long()
    index = torch.arange(lab.numel())
    negative = lab < 0
    if singles == "exclude":
        index, lab = index[~negative], lab[~negative]
    elif singles == "own":
        lab = lab.clone()
        top = int(lab.max()) + 1 if lab.numel() else 0
        lab[negative] = top + torch.arange(int(negative.sum()))  # each -1 sample its own cluster
    else:
        raise ConfigError(f"singles must be 'own' or 'exclude', got {singles!r}")
    if lab.numel() == 0:
        raise DataError("no sample belongs to a cluster: nothing to sample")
    return index, torch.unique(lab, return_inverse=True)[1]  # empty clusters vanish here


def uniform_over_clusters(labels, n_samples: int, generator_or_seed, *, singles: str = "own",
                          cut: str = "random") -> Tensor:
    """An epoch's sample order drawn uniformly over the non-empty clusters (DeepCluster Sec 3.3).

    ``labels`` (N,) int: cluster of each sample (numpy or torch). Returns ``n_samples`` int64 sample
    indices (a CPU torch tensor), deterministic for a seed. ``generator_or_seed``: an int (seeds a
    fresh ``torch.Generator``) or a ``torch.Generator`` (e.g. ``batching.epoch_generator``).

    The rule of ``UnifLabelSampler`` (deepcluster ``util.py``):
    - K = number of non-empty clusters (empty ones are skipped), s = int(n_samples / K) + 1 draws
      per cluster;
    - a cluster of m members gives s draws without replacement when m > s, else s draws with
      replacement (the original's ``replace=(len(cluster) <= size_per_pseudolabel)``: equality
      draws with replacement);
    - the K s draws are concatenated and shuffled; ``cut="random"`` (default, the original) keeps
      the first ``n_samples``, so a cluster's count is s minus how many of its draws fell past the
      cut (the K s - n_samples <= K dropped draws are random). ``cut="balanced"`` drops them one each
      from distinct random clusters instead, so every cluster gets s or s - 1 (counts equal +-1).
    - ``singles``: labels < 0 mean "in no cluster" (PCP's single instances). ``"own"`` (default):
      each such sample is a cluster of its own, as PCP treats it as a class of its own (PCP Sec
      III-B); ``"exclude"``: never drawn. Note that PCP's reference code samples uniformly over
      images, not clusters (a shuffled loader in ``PCP/main.py``).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples must be a positive integer, got {n_samples!r}")
    if cut not in ("random", "balanced"):
        raise ConfigError(f"cut must be 'random' or 'balanced', got {cut!r}")
    g = _generator(generator_or_seed)
    index, cid = _cluster_ids(labels, singles)
    k = int(cid.max()) + 1
    sizes = torch.bincount(cid, minlength=k)
    per = n_samples // k + 1  # int(N / n_nonempty) + 1
    # members grouped by cluster, in random order within each cluster
    perm = torch.randperm(cid.numel(), generator=g)
    perm = perm[torch.argsort(cid[perm], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    cluster = torch.arange(k).repeat_interleave(per)  # (k * per,): cluster of each draw
    slot = torch.arange(per).repeat(k)  # draw number within the cluster
    m = sizes[cluster]
    uniform = torch.rand(cluster.numel(), generator=g, dtype=torch.float64)
    with_replacement = (uniform * m).long().minimum(m - 1)
    offset = torch.where(m > per, slot, with_replacement)  # m > per: the first `per` of a permutation
    draws = index[perm[starts[cluster] + offset]]
    if cut == "balanced":
        excess = draws.numel() - n_samples  # k * per - n_samples, within [1, k]
        dropped = torch.zeros(k, dtype=torch.bool)
        dropped[torch.randperm(k, generator=g)[:excess]] = True
        draws = draws[~(dropped[cluster] & (slot == per - 1))]
    draws = draws[torch.randperm(draws.numel(), generator=g)]
    return draws[:n_samples].clone()
