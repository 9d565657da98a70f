"""The papers' evaluation protocols, as pure functions of features and labels.

Clustering: ACC with Hungarian matching, NMI (average method explicit: scikit-learn's default is the
arithmetic mean, JULE's code uses the geometric mean), ARI. Representation: weighted kNN (Wu et al.
2018; AND), linear probe. Cluster health: sizes and a collapse report (works without labels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.model_selection import StratifiedKFold

from .errors import DataError
from .structure.knn import topk_cosine


def cluster_acc(labels_true, labels_pred) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian); unmatched clusters count as errors."""
    y = np.asarray(labels_true).astype(np.int64)
    p = np.asarray(labels_pred).astype(np.int64)
    _, y = np.unique(y, return_inverse=True)
    _, p = np.unique(p, return_inverse=True)
    w = np.zeros((p.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(w, (p, y), 1)
    rows, cols = linear_sum_assignment(-w)
    return float(w[rows, cols].sum() / len(y))


def nmi(labels_true, labels_pred, average_method: str = "arithmetic") -> float:
    return float(normalized_mutual_info_score(labels_true, labels_pred, average_method=average_method))


def ari(labels_true, labels_pred) -> float:
    return float(adjusted_rand_score(labels_true, labels_pred))


def clustering_scores(labels_true, labels_pred) -> dict[str, float]:
    return {
        "acc": round(cluster_acc(labels_true, labels_pred), 4),
        "nmi": round(nmi(labels_true, labels_pred), 4),
        "nmi_geometric": round(nmi(labels_true, labels_pred, "geometric"), 4),
        "ari": round(ari(labels_true, labels_pred), 4),
    }


def knn_top1(train_features, train_labels, test_features=None, test_labels=None, *, k: int = 200,
             temperature: float = 0.1, n_classes: int | None = None) -> float:
    """Weighted kNN top-1 (Wu et al. 2018; AND Sec 4): each of the k most cosine-similar training
    samples votes for its class with weight exp(s / T). Leave-one-out on the training set when no
    test set is given (a sample never votes for itself)."""
    tr = np.asarray(train_features, dtype=np.float32)
    ytr = np.asarray(train_labels).astype(np.int64)
    loo = test_features is None
    te = tr if loo else np.asarray(test_features, dtype=np.float32)
    yte = ytr if loo else np.asarray(test_labels).astype(np.int64)
    k = min(k, tr.shape[0] - (1 if loo else 0))
    sims, idx = topk_cosine(te, tr, k, exclude_self=loo)
    c = n_classes or int(max(ytr.max(), yte.max()) + 1)
    w = torch.from_numpy(np.exp(sims / temperature))
    votes = torch.zeros(te.shape[0], c, dtype=torch.float64)
    votes.scatter_add_(1, torch.from_numpy(ytr[idx]), w.double())
    pred = votes.argmax(1).numpy()
    return round(float((pred == yte).mean()), 4)


def linear_probe(train_features, train_labels, test_features, test_labels, *, epochs: int = 100,
                 lr: float = 0.1, weight_decay: float = 1e-4, batch_size: int = 1024, seed: int = 0,
                 hidden: int | None = None) -> float:
    """A classifier on frozen, standardised features (SGD momentum 0.9, cosine rate, cross-entropy):
    test top-1. ``hidden=None``: linear (AND / PAD / PCP's linear classifier); ``hidden=200``: one
    hidden ReLU layer of 200 units, DCCM's non-linear protocol (Sec 4.4, Fig 4, after DIM)."""
    g = torch.Generator().manual_seed(seed)
    xtr = torch.as_tensor(np.asarray(train_features), dtype=torch.float32)
    xte = torch.as_tensor(np.asarray(test_features), dtype=torch.float32)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    yte = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    c = int(max(ytr.max(), yte.max()) + 1)
    torch.manual_seed(seed)
    d = xtr.shape[1]
    model = torch.nn.Linear(d, c) if not hidden else torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, c))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr), batch_size):
            b = perm[start:start + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr[b]), ytr[b]).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return round(float((model(xte).argmax(1) == yte).float().mean()), 4)


PROBE_HIDDEN = {"linear": None, "mlp": 200}  # DCCM Fig 4: "a single hidden layer (200 units)"


def probe_report(features, labels, split=None, *, protocol: str = "linear", folds: int = 5,
                 seed: int = 0) -> dict[str, Any]:
    """Top-1 of a supervised probe (``protocol`` linear or mlp) on frozen ``features``; the labels
    are the evaluation's own input and reach nothing else.

    Split: the data's own (train 0 -> test 1) when ``split`` has both parts, as the papers do on
    CIFAR; otherwise stratified ``folds``-fold cross-validation shuffled by ``seed`` (each image is
    tested once, by a probe that never saw it), reporting the mean over the folds and each fold's
    figure; fewer folds when the smallest class has fewer members (at least 2 per class needed)."""
    x, y = np.asarray(features, dtype=np.float32), np.asarray(labels).astype(np.int64)
    hidden = PROBE_HIDDEN[protocol]
    out: dict[str, Any] = {"protocol": protocol, "hidden_units": hidden}
    if split is not None and bool((split == 0).any()) and bool((split == 1).any()):
        tr, te = split == 0, split == 1
        out["top1"] = linear_probe(x[tr], y[tr], x[te], y[te], seed=seed, hidden=hidden)
        out["split"] = f"the data's split: {int(tr.sum())} train, {int(te.sum())} test"
        return out
    smallest = int(np.bincount(y)[np.unique(y)].min())
    k = min(folds, smallest)
    if k < 2:
        raise DataError("a probe needs at least 2 images of every class (no train/test split to use)")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    accs = [linear_probe(x[a], y[a], x[b], y[b], seed=seed, hidden=hidden) for a, b in cv.split(x, y)]
    out["top1"] = round(float(np.mean(accs)), 4)
    out["folds"] = accs
    out["split"] = f"stratified {k}-fold cross-validation, seed {seed} (the data has no train/test split)"
    return out


def cluster_sizes(labels, n_clusters: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_clusters).tolist()


def collapse_report(labels, n_clusters: int, *, dominant_fraction: float = 0.5) -> dict[str, Any]:
    """Sizes of the clusters and whether the clustering collapsed: some cluster is empty, or one
    cluster holds more than ``dominant_fraction`` of the images (with K >= 2). No labels needed."""
    sizes = cluster_sizes(labels, n_clusters)
    n = max(sum(sizes), 1)
    empty = sum(1 for s in sizes if s == 0)
    largest = max(sizes) / n
    problems = []
    if empty:
        problems.append(f"{empty} of {n_clusters} clusters are empty")
    if n_clusters >= 2 and largest > dominant_fraction:
        problems.append(f"one cluster holds {largest:.0%} of the images")
    return {"sizes": sizes, "empty": empty, "largest_fraction": round(largest, 4),
            "collapsed": bool(problems), "warning": "; ".join(problems) or None}


def head_scores(labels_true, heads: list[tuple[str, str, Any, float]]) -> list[dict[str, Any]]:
    """One row per fitted head (kind, layer, predicted labels, seconds): its ACC, NMI (arithmetic, and
    geometric: JULE's convention) and ARI."""
    rows = []
    for kind, layer, pred, seconds in heads:
        scores = clustering_scores(labels_true, pred)
        kept = ("acc", "nmi", "nmi_geometric", "ari")
        rows.append({"head": kind, "features": layer, **{key: scores[key] for key in kept},
                     "head_seconds": round(seconds, 3)})
    return rows


def knn_report(embedding, features, labels, split, *, k: int, temperature: float, seed: int = 0,
               probe: bool = False) -> dict[str, Any]:
    """Weighted kNN top-1 of ``embedding``: the test split against the train split when ``split``
    (0 train, 1 test) has both, else leave-one-out; with ``probe`` and both splits, a linear probe
    on ``features`` too."""
    m: dict[str, Any] = {}
    kk = min(k, len(labels) - 1)
    both = split is not None and bool((split == 0).any()) and bool((split == 1).any())
    if both:
        tr, te = split == 0, split == 1
        m["knn_top1"] = knn_top1(embedding[tr], labels[tr], embedding[te], labels[te],
                                 k=min(kk, int(tr.sum())), temperature=temperature)
        m["knn_protocol"] = "test split against train split"
    else:
        m["knn_top1"] = knn_top1(embedding, labels, k=kk, temperature=temperature)
        m["knn_protocol"] = "leave-one-out"
    if probe and both:
        m["linear_probe_top1"] = linear_probe(features[split == 0], labels[split == 0],
                                              features[split == 1], labels[split == 1], seed=seed)
    return m
