"""A finished run's files read back for ``report``, ``predict``, ``evaluate`` and ``export``, each
checked on its own and against the others before anything uses it.

A missing file, or one that is damaged, is refused with a :class:`DataError` of one line naming the
file and what is wrong:
 - ``config.yaml``: YAML that the one validator (``configure.build_config``) accepts;
 - ``metrics.json``: a JSON object whose counts are integers (``n_clusters`` equal to the
   configuration's K, ``n_images`` to the rows of the outputs), ``cluster_sizes`` a list of counts and
   the scores and times numbers; a run without it (stopped before its last write) reads as ``{}``;
 - ``embeddings.npy``: a finite float matrix (N, D), D the width of the embedding the network of
   ``config.yaml`` makes (read through a memory map in blocks: checking it holds no second copy);
 - ``labels.npy``: N integers in [0, K), K the run's cluster count (:meth:`RunFiles.n_clusters`);
 - ``head.npz``: :meth:`heads.ClusterHead.load`'s checks;
 - ``hierarchy.npz``: the merge tree of the run's clusters (``structure/hierarchy.py``): ``leaves`` one
   leaf per row of ``labels.npy``, ``groups`` one cluster per leaf, ``linkage`` a scipy linkage array
   over the leaves, and its cut at the run's cluster count the clusters of ``labels.npy``;
 - ``model.safetensors``: a readable safetensors file of finite tensors with the keys and shapes of
   the network ``config.yaml`` describes (compared on the meta device: nothing is allocated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config
from .configure import build_config
from .errors import DataError, DeepclustError
from .heads import ClusterHead
from .structure.hierarchy import Hierarchy, cut
from .nets import EmbeddingNet
from .methods import build_network
from .rundir import read_run_config

BLOCK_ROWS = 65_536  # rows of embeddings.npy checked at a time
COUNTS = ("n_clusters", "n_images")  # metrics.json's integer counts
NUMBERS = ("acc", "nmi", "ari", "train_seconds", "images_per_second")  # numbers (or null) when present


def run_dir(run: str | Path) -> Path:
    """``run`` as a path, DataError in one line if it is not a directory."""
    run = Path(run)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    return run


def damaged(path: Path, what: str) -> DataError:
    return DataError(f"damaged run file {path}: {what}")


def _reason(e: BaseException) -> str:
    """The first line of an exception raised by a reader (its type when it says nothing)."""
    return ((str(e).splitlines() or [""])[0] or type(e).__name__)[:200]


class RunFiles:
    """The files of the run in ``run``, each read and checked when first asked for."""

    def __init__(self, run: str | Path):
        self.path = run_dir(run)
        self._raw: dict | None = None
        self._config: Config | None = None
        self._metrics: dict | None = None
        self._network: EmbeddingNet | None = None

    def file(self, name: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise DataError(f"run {self.path} has no {name} (did training finish?)")
        return path

    def config(self, *overrides: dict | None) -> Config:
        """The run's configuration (``config.yaml``), with ``overrides`` (the user's flags) on top."""
        if self._config is None:
            self._raw = read_run_config(self.path)
            try:
                self._config = build_config(self._raw)
            except DeepclustError as e:
                raise damaged(self.path / "config.yaml", str(e)) from None
        return build_config(self._raw, *overrides) if any(overrides) else self._config

    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` (``{}`` when the run has none)."""
        if self._metrics is None:
            path = self.path / "metrics.json"
            self._metrics = _read_metrics(path, self.config()) if path.exists() else {}
        return self._metrics

    def n_clusters(self) -> int:
        """The run's cluster count: its K, or more where its head kept more (a method's own
        clusters: ``metrics.json``'s ``cluster_sizes``); 0 when neither file says."""
        metrics = self.metrics()
        return max(self.config().cluster.n_clusters or 0, metrics.get("n_clusters", 0),
                   len(metrics.get("cluster_sizes", [])))

    def network(self) -> EmbeddingNet | None:
        """The network ``config.yaml`` describes, on the meta device (shapes only, nothing
        allocated); None when the configuration does not say what images it was trained on."""
        shape = self.config().net.input_shape
        if shape is not None and self._network is None:
            try:
                with torch.device("meta"):
                    self._network = build_network(self.config(), shape)
            except (DeepclustError, RuntimeError, ValueError) as e:  # a network fit could not have built
                raise damaged(self.path / "config.yaml", f"its network cannot be built: {_reason(e)}") from None
        return self._network

    def outputs(self, *, keep: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(``labels.npy`` as int64 (N,), ``embeddings.npy`` as float32 (N, D)), checked against each
        other, the configuration and ``metrics.json``; ``keep=False`` checks the embeddings without
        holding them (None in their place)."""
        emb_path, labels_path = self.file("embeddings.npy"), self.file("labels.npy")
        net = self.network()
        embedding, rows = _read_embeddings(emb_path, net.dim if net is not None else None, keep)
        labels = _read_labels(labels_path, self.n_clusters() or rows)  # K <= N: fit refuses more
        if len(labels) != rows:
            raise damaged(labels_path, f"has {len(labels)} labels for the {rows} rows of embeddings.npy")
        counted = self.metrics().get("n_images")
        if counted is not None and counted != rows:
            raise damaged(self.path / "metrics.json", f"n_images is {counted} but labels.npy and embeddings.npy "
                                                       f"hold {rows} images")
        return labels, embedding

    def head(self) -> ClusterHead:
        return ClusterHead.load(self.file("head.npz"))

    def hierarchy(self) -> Hierarchy:
        """``hierarchy.npz``, checked against ``labels.npy`` (whose clusters are its cut)."""
        path = self.file("hierarchy.npz")
        labels, _ = self.outputs(keep=False)
        return read_hierarchy(path, labels)

    def state(self) -> dict[str, torch.Tensor]:
        """``model.safetensors``: finite tensors with the keys and shapes of the run's network."""
        from safetensors.torch import load_file

        path = self.file("model.safetensors")
        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors' own error type, OSError, a crafted header
            raise damaged(path, f"cannot be read: {_reason(e)}") from None
        net = self.network()
        if net is not None:
            _check_state(path, state, {k: tuple(v.shape) for k, v in net.state_dict().items()}, self.config())
        for key, value in state.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise damaged(path, f"tensor {key} holds NaN or infinite values")
        return state


def _check_state(path: Path, state: dict, expected: dict[str, tuple], cfg: Config) -> None:
    net = f"the {cfg.net.backbone} network config.yaml describes ({'x'.join(map(str, cfg.net.input_shape))})"
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        names = (f"lacks {missing[0]}" if missing else f"has {extra[0]}")
        count = len(missing) + len(extra)
        raise damaged(path, f"{names}{f' and {count - 1} other key differences' if count > 1 else ''}; "
                            f"it does not hold {net}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise damaged(path, f"{key} has shape {tuple(state[key].shape)} where {net} has {shape}")


def _read_metrics(path: Path, cfg: Config) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise damaged(path, f"not JSON: {_reason(e)}") from None
    if not isinstance(metrics, dict):
        raise damaged(path, f"must hold a JSON object, not {type(metrics).__name__}")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    for key in COUNTS:
        if key in metrics and not count(metrics[key]):
            raise damaged(path, f"{key} must be a count, got {metrics[key]!r:.40}")
    sizes = metrics.get("cluster_sizes", [])
    if not isinstance(sizes, list) or not all(count(s) for s in sizes):
        raise damaged(path, "cluster_sizes must be a list of counts")
    for key in NUMBERS:
        v = metrics.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise damaged(path, f"{key} must be a number, got {v!r:.40}")
    k = cfg.cluster.n_clusters
    if "n_clusters" in metrics and k is not None and metrics["n_clusters"] != k:
        raise damaged(path, f"n_clusters is {metrics['n_clusters']} but config.yaml's K is {k}")
    return metrics


def read_hierarchy(path: Path, labels: np.ndarray) -> Hierarchy:
    """The merge tree in ``path`` of the partition ``labels``; a damaged file is one DataError line."""
    from scipy.cluster.hierarchy import is_valid_linkage

    try:
        with np.load(path, allow_pickle=False) as z:
            tree = {key: z[key] for key in ("leaves", "linkage", "groups")}
    except Exception as e:  # noqa: BLE001 - not an npz, a missing key, a damaged zip, pickled objects
        raise damaged(path, f"cannot be read: {_reason(e)}") from None
    leaves, linkage, groups = tree["leaves"], tree["linkage"], tree["groups"]
    if groups.ndim != 1 or groups.dtype.kind not in "iu" or not groups.size or groups.min() < 0:
        raise damaged(path, "groups must be one cluster number (>= 0) per leaf")
    n_leaves = len(groups)
    if leaves.shape != labels.shape or leaves.dtype.kind not in "iu" or leaves.min() < 0 or leaves.max() >= n_leaves:
        raise damaged(path, f"leaves must be one leaf in [0, {n_leaves}) for each of the run's {len(labels)} images")
    if linkage.shape != (n_leaves - 1, 4) or linkage.dtype.kind != "f" or not np.isfinite(linkage).all():
        raise damaged(path, f"linkage must be a finite ({n_leaves - 1}, 4) float array for {n_leaves} leaves")
    try:
        is_valid_linkage(linkage.astype(np.float64), throw=True)
    except (ValueError, TypeError) as e:
        raise damaged(path, f"linkage is not a merge tree: {_reason(e)}") from None
    hier = Hierarchy(leaves.astype(np.int64), linkage.astype(np.float64), groups.astype(np.int64))
    if not np.array_equal(hier.groups[hier.leaves], labels) or np.bincount(hier.leaves, minlength=n_leaves).min() == 0:
        raise damaged(path, "its leaves are not parts of the clusters of labels.npy")
    if not np.array_equal(cut(hier, hier.n_clusters), np.unique(labels, return_inverse=True)[1].ravel()):
        raise damaged(path, f"its cut into {hier.n_clusters} clusters is not the partition of labels.npy")
    return hier


def _read_labels(path: Path, k: int) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - whatever a damaged or crafted file makes numpy raise
        raise damaged(path, f"cannot be read: {_reason(e)}") from None
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "iu":
        what = f"{labels.dtype} of shape {labels.shape}" if isinstance(labels, np.ndarray) else "an npz archive"
        raise damaged(path, f"must hold one integer cluster per image, got {what}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise damaged(path, f"holds clusters from {labels.min()} to {labels.max()}; the run has {k} "
                            f"(0 to {k - 1})")
    return labels.astype(np.int64)


def _read_embeddings(path: Path, width: int | None, keep: bool) -> tuple[np.ndarray | None, int]:
    """(the matrix as float32, or None unless ``keep``; its rows), every block checked finite."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - whatever a damaged or crafted file makes numpy raise
        raise damaged(path, f"cannot be read: {_reason(e)}") from None
    if not isinstance(mapped, np.ndarray) or mapped.ndim != 2 or mapped.dtype.kind != "f":
        what = f"{mapped.dtype} of shape {mapped.shape}" if isinstance(mapped, np.ndarray) else "an npz archive"
        raise damaged(path, f"must hold a float matrix (images x dimensions), got {what}")
    n, d = mapped.shape
    if width is not None and d != width:
        raise damaged(path, f"is {n} x {d}; the run's network makes {width}-d embeddings")
    if n == 0 or d == 0:
        raise damaged(path, f"is {n} x {d}: empty")
    out = np.empty((n, d) if keep else (min(n, BLOCK_ROWS), d), np.float32)
    for start in range(0, n, BLOCK_ROWS):
        block = out[start:start + BLOCK_ROWS] if keep else out[:min(BLOCK_ROWS, n - start)]
        with np.errstate(over="ignore"):  # a float64 beyond float32's range: infinite, refused below
            block[:] = mapped[start:start + BLOCK_ROWS]
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise damaged(path, f"row {start + int(bad.argmax())} holds NaN or infinite values")
    return (out if keep else None), n
