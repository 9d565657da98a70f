"""k-nearest neighbours by cosine similarity, in row blocks (no N x N matrix), and sparse kNN
affinity graphs built from them. Exact up to :data:`EXACT_MAX` keys on the CPU; above it faiss's
inverted-file index (approximate: an exact search of 1.28M x 128-d rows is about 4e14 floating-point
operations, an hour on this 2-core CPU), as faiss's own guidelines advise from about a million rows."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from .neighbourhoods import similarity_block_rows


EXACT_MAX = 250_000  # CPU arrays with more keys: the inverted-file index (``ivf``) in ``auto``
IVF_NPROBE = 16  # lists visited per query, of about 4 sqrt(N) (faiss IndexIVFFlat)
IVF_TRAIN_PER_LIST = 40  # training rows per list (faiss warns below 39)


def _normalise_np(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def topk_cosine(queries, keys, k: int, *, exclude_self: bool = False, block: int | None = None,
                backend: str = "auto"):
    """Exact top-k cosine neighbours of each query among ``keys`` (rows are L2-normalised here).

    Returns (similarities (Nq, k) float32, descending; indices (Nq, k) int64), numpy for numpy
    input and torch for torch input. ``exclude_self``: queries are the keys; each row's own index
    is never returned. Backends: ``torch`` (blocked matmul + topk, any device), ``faiss`` (exact
    IndexFlatIP on CPU), ``ivf`` (faiss IndexIVFFlat: approximate, :func:`_ivf_index`), ``auto``
    (torch on a GPU tensor; on the CPU torch up to 20,000 keys, faiss up to :data:`EXACT_MAX`, ivf above).
    """
    is_torch = isinstance(queries, Tensor)
    nk = keys.shape[0]
    kk = k + (1 if exclude_self else 0)
    if not 1 <= k <= nk - (1 if exclude_self else 0):
        raise ValueError(f"k={k} out of range for {nk} keys")
    if backend == "auto":
        backend = "torch" if (is_torch and queries.is_cuda) or nk <= 20_000 else "faiss" if nk <= EXACT_MAX else "ivf"
    if backend in ("faiss", "ivf"):
        import faiss

        q = _normalise_np(queries.detach().cpu().numpy() if is_torch else queries)
        kx = q if exclude_self and keys is queries else _normalise_np(
            keys.detach().cpu().numpy() if isinstance(keys, Tensor) else keys)
        index = faiss.IndexFlatIP(kx.shape[1]) if backend == "faiss" else _ivf_index(kx)
        index.add(kx)
        sims, idx = index.search(q, kk)
        if exclude_self:
            sims, idx = _drop_self(sims, idx, k)
        sims, idx = sims.astype(np.float32), idx.astype(np.int64)
        return (torch.from_numpy(sims), torch.from_numpy(idx)) if is_torch else (sims, idx)
    q = queries if is_torch else torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    kt = keys if isinstance(keys, Tensor) else torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))
    q = torch.nn.functional.normalize(q.float(), dim=1)
    kt = torch.nn.functional.normalize(kt.float(), dim=1)
    block = block or similarity_block_rows(nk)
    sims = torch.empty(q.shape[0], k, dtype=torch.float32, device=q.device)
    idx = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    kt_t = kt.t().contiguous()
    with torch.no_grad():
        for start in range(0, q.shape[0], block):
            stop = min(start + block, q.shape[0])
            s = q[start:stop] @ kt_t
            if exclude_self:
                rows = torch.arange(stop - start, device=q.device)
                s[rows, rows + start] = -float("inf")
            top = torch.topk(s, k, dim=1)
            sims[start:stop], idx[start:stop] = top.values, top.indices
    if is_torch:
        return sims, idx
    return sims.numpy(), idx.numpy()


def _ivf_index(keys: np.ndarray, seed: int = 0):
    """An empty faiss IndexIVFFlat (inner product) for the L2-normalised ``keys``: 4 sqrt(N) lists
    (the low end of faiss's guideline, 4 to 16 sqrt(N)), trained by k-means on a seeded sample of
    :data:`IVF_TRAIN_PER_LIST` rows a list, :data:`IVF_NPROBE` lists searched per query. On 300,000
    unit vectors around 1,000 centres (benchmarks/scale.py's bank) 8 probes found 0.9998 of the exact
    6 nearest in 15 s (train, add, search), where sqrt(N) lists and 32 probes took 88 s for the
    same recall. A query's own list is always among those searched, so a key is found by its own
    query (``exclude_self``)."""
    import faiss

    n, d = keys.shape
    nlist = max(1, min(int(4 * np.sqrt(n)), n // IVF_TRAIN_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False)
    index.train(keys[np.sort(sample)])
    index.nprobe = min(IVF_NPROBE, nlist)
    return index


def _drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from faiss results of k + 1 (or the last column if absent)."""
    n = idx.shape[0]
    own = idx == np.arange(n)[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True  # self not among the k+1 (duplicates): drop the farthest instead
    keep = ~own
    return sims[keep].reshape(n, k), idx[keep].reshape(n, k)


def knn_graph(features, k: int, *, symmetrize: str = "max", backend: str = "auto") -> sp.csr_matrix:
    """Sparse symmetric kNN affinity graph (no self loops).

    Weights: cosine similarity mapped to [0, 1] as (1 + s) / 2 — monotone in the similarity, never
    negative, and free of a bandwidth to tune. ``symmetrize``: ``max`` (edge if either is a
    neighbour of the other), ``mean`` ((W + W^T) / 2) or ``min`` (mutual kNN only).
    """
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    n = x.shape[0]
    sims, idx = topk_cosine(x, x, k, exclude_self=True, backend=backend)
    w = np.clip((1.0 + sims) / 2.0, 1e-6, 1.0).ravel()
    rows = np.repeat(np.arange(n), k)
    a = sp.csr_matrix((w, (rows, idx.ravel())), shape=(n, n))
    if symmetrize == "max":
        return a.maximum(a.T).tocsr()
    if symmetrize == "mean":
        return ((a + a.T) * 0.5).tocsr()
    if symmetrize == "min":
        return a.minimum(a.T).tocsr()
    raise ValueError(f"unknown symmetrize '{symmetrize}'")


def mine_neighbours(features, k: int, *, backend: str = "auto"):
    """SCAN's mining step (Van Gansbeke et al., ECCV 2020, Sec 3.1): the indices of every image's k
    nearest other images by cosine similarity, (N, k) int64 (numpy for numpy input, torch for torch).
    k is cut to N - 1 on tiny data."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("mining neighbours needs at least 2 images")
    _, idx = topk_cosine(features, features, min(k, n - 1), exclude_self=True, backend=backend)
    return idx
