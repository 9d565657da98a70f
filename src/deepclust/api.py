"""``deepclust.Clusterer``: the library in the scikit-learn manner, on arrays, tensors, image files or a
data spec.

    from deepclust import Clusterer
    c = Clusterer(method="pad", epochs=5).fit(images)   # K auto; images (N,H,W), (N,H,W,C), (N,C,H,W)
    c.labels_, c.embedding_, c.predict(new_images), c.score(new_images, y), c.save("runs/mine")

One way through the library: ``fit`` builds its configuration with ``configure.build_config`` (the one
validator) and trains with ``runs.fit_run`` -- the command line's path -- in a temporary run directory
that is read into memory and removed before ``fit`` returns, so nothing stays on disk unless
``save(path)`` is called. ``predict`` / ``transform`` go through ``inference.network_from_state``, the
saved head and ``train.extract_features``, as ``deepclust predict`` does.

Input conversion (:func:`as_image_set`): uint8 is kept; floats in [0, 1] are scaled by 255 and rounded,
floats in [0, 255] rounded (``data.sources.to_uint8``; other ranges are refused); (N,C,H,W) is taken
for channels-first when the last axis is not 1, 3 or 4 but the second is.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load as load_safetensors
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.exceptions import NotFittedError

from .config import read_yaml, set_dotted
from .configure import build_config, run_config
from .data import ImageSet
from .data.sources import check_labels, finalise, normalise_layout, read_image, resize_all, to_uint8
from .errors import ConfigError, DataError
from .evaluate import clustering_scores
from .heads import ClusterHead
from .inference import network_from_state
from .io import ensure_dir, save_bytes
from .resolution import load_data
from .rundir import check_replaceable, swap_in, unique_dir
from .runs import fit_run
from .train import extract_features

# short option names -> dotted configuration keys (the command line's flags of the same name)
OPTION_KEYS = {
    "data": "data.spec", "split": "data.split", "resize": "data.resize", "root": "data.root",
    "download": "data.download", "epochs": "train.epochs", "budget": "train.budget", "seed": "train.seed",
    "devices": "train.devices", "num_nodes": "train.num_nodes", "accelerator": "train.accelerator",
    "precision": "train.precision", "threads": "train.threads", "progress": "train.progress",
    "backbone": "net.backbone", "dim": "net.dim", "batch_size": "optim.batch_size", "lr": "optim.lr",
    "temperature": "memory.temperature", "nce_k": "memory.nce_k", "views": "views.preset",
    "cluster_head": "cluster.head", "cluster_features": "cluster.features",
}
ARRAY_SPEC = "array"  # data.spec of images given in memory (a saved run's data cannot be re-read)


def as_image_set(X: Any, resize: int | None = None) -> ImageSet:
    """An ImageSet of ``X``: a numpy array or torch tensor (N,H,W) / (N,H,W,C) / (N,C,H,W), uint8 or
    float, or a list of image file paths. Every mistake is one DataError line."""
    if isinstance(X, (list, tuple)) and X and all(isinstance(p, (str, Path)) for p in X):
        return _from_files([str(p) for p in X], resize)
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor
        X = X.detach().cpu().numpy()
    if not isinstance(X, np.ndarray):
        raise DataError(f"X must be an image array, a torch tensor, a list of image paths or a data spec, "
                        f"got {type(X).__name__}")
    if X.ndim == 4 and X.shape[-1] not in (1, 3, 4) and X.shape[1] in (1, 3, 4):
        X = np.moveaxis(X, 1, -1)  # (N,C,H,W) -> (N,H,W,C)
    where = f"images of shape {tuple(X.shape)}"
    images = normalise_layout(to_uint8(X, where), where)
    if resize:
        images = resize_all(list(images), resize)
    return finalise(ImageSet(images, spec=ARRAY_SPEC))


def _from_files(paths: list[str], resize: int | None) -> ImageSet:
    images = []
    for path in paths:  # file I/O, one image at a time
        try:
            images.append(read_image(path))
        except Exception as e:  # noqa: BLE001 - whatever Pillow raises: one line naming the file
            raise DataError(f"cannot read image {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if any(im.ndim == 3 for im in images):
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    if resize:
        stacked = resize_all(images, resize)
    elif len({im.shape for im in images}) > 1:
        raise DataError("the image files have mixed sizes; pass resize=SIDE to resize them all")
    else:
        stacked = np.stack(images)
    return finalise(ImageSet(stacked, names=paths, spec=ARRAY_SPEC))


def options_layers(method: str | None, n_clusters: Any, options: dict[str, Any]) -> tuple[dict, dict]:
    """(base, layer): ``config=`` a preset name or YAML file as the base layer, and on top the layer
    of ``Clusterer``'s parameters: short names (:data:`OPTION_KEYS`), ``section__field`` for any
    other option, and any other name for the method's own options (``options.NAME``)."""
    options = dict(options)
    preset = options.pop("config", None)
    base = read_yaml(str(preset)) if preset is not None else {}
    layer: dict = {}
    if method is not None:
        layer["method"] = method
    if n_clusters is not None:
        set_dotted(layer, "cluster.n_clusters", n_clusters)
    for name, value in options.items():
        key = OPTION_KEYS.get(name) or (name.replace("__", ".") if "__" in name else f"options.{name}")
        set_dotted(layer, key, value)
    return base, layer


def _config_of(params: dict[str, Any], X: Any = None):
    """The validated Config of a Clusterer's parameters (``method``, ``n_clusters`` and options), with
    ``X``'s data spec: what ``__init__``, ``set_params``, ``configuration`` and ``fit`` check."""
    options = {k: v for k, v in params.items() if k not in ("method", "n_clusters")}
    clash = sorted(name for name in options if hasattr(Clusterer, name))
    if clash:
        raise ConfigError(f"'{clash[0]}' is a Clusterer method, not an option")
    base, layer = options_layers(params.get("method"), params.get("n_clusters"), options)
    if isinstance(X, str):
        set_dotted(layer, "data.spec", X)
    elif X is not None:
        set_dotted(layer, "data.spec", ARRAY_SPEC)
    return build_config(base, layer)


class Clusterer(ClusterMixin, TransformerMixin, BaseEstimator):
    """Unsupervised deep image clustering, scikit-learn style.

    ``method``: a registered method (None: the configuration's default, or the ``config=`` preset's);
    ``n_clusters``: K, or "auto" (estimated from the images without labels, ``structure/n_clusters.py``);
    None: the ``config=`` preset's K, else auto;
    ``**options``: any configuration option (:func:`options_layers`), checked by the one validator
    when given: ``Clusterer(...)`` and :meth:`set_params` refuse an unknown name or a wrong value
    (ConfigError) as ``fit`` would, so no invalid estimator exists to be cloned or fitted.

    Fitted attributes: ``labels_`` (cluster per image), ``embedding_`` (L2-normalised embeddings),
    ``n_clusters_``, ``metrics_`` (metrics.json's content), ``config_`` (the resolved Config).
    """

    def __init__(self, method: str | None = None, n_clusters: int | str | None = None, **options: Any):
        _config_of({"method": method, "n_clusters": n_clusters, **options})
        self.method = method
        self.n_clusters = n_clusters
        for name, value in options.items():  # each option a parameter, as scikit-learn expects
            setattr(self, name, value)

    # -- parameters: the options are parameters too ------------------------------------------------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """``method``, ``n_clusters`` and every option given (fitted attributes end in ``_``)."""
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    def set_params(self, **params: Any) -> "Clusterer":
        """Set parameters once all of them, with the others, pass the validator ``fit`` uses; on a
        ConfigError nothing is changed."""
        _config_of({**self.get_params(), **params})
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def configuration(self, X: Any = None):
        """The Config ``fit(X)`` would start from (validated; nothing resolved from data yet)."""
        return _config_of(self.get_params(), X)

    # -- fitting ---------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None) -> "Clusterer":
        """Train on ``X`` and cluster it. ``y``: optional true labels, only for the scores in
        ``metrics_`` (as a data set's labels: they never reach training, K or the clusters)."""
        cfg = self.configuration(X)
        images = None if isinstance(X, str) else as_image_set(X, cfg.data.resize)
        if y is not None:
            if images is None:
                raise DataError("y is given with a data spec; the spec's own labels are used")
            images.labels = check_labels(y, "y")
            images = finalise(images)  # one line if y does not match X
        with tempfile.TemporaryDirectory(prefix="deepclust-") as tmp:
            out = Path(tmp) / "run"
            fit_run(dataclasses.replace(cfg, out=str(out)), images=images)
            self._take(out)
        return self

    def fit_predict(self, X: Any, y: Any = None, **kwargs: Any) -> np.ndarray:
        return self.fit(X, y).labels_

    def _take(self, run: Path) -> None:
        """Hold the run directory's files in memory and read the fitted attributes from them."""
        self.run_files_ = {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
                           if p.is_file() and not p.name.endswith(".lock")}  # the checkpoint too: resumable
        for needed in ("config.yaml", "model.safetensors", "head.npz", "labels.npy", "metrics.json"):
            if needed not in self.run_files_:
                raise DataError(f"{run} is not a finished run: it has no {needed}")
        self.config_ = run_config(run)
        self.metrics_ = json.loads(self.run_files_["metrics.json"])
        self.labels_ = self._array("labels.npy")
        self.embedding_ = self._array("embeddings.npy") if "embeddings.npy" in self.run_files_ else None
        self.n_clusters_ = int(self.config_.cluster.n_clusters)
        self.head_ = ClusterHead.load(io.BytesIO(self.run_files_["head.npz"]))

    def _array(self, name: str) -> np.ndarray:
        return np.load(io.BytesIO(self.run_files_[name]), allow_pickle=False)

    # -- using the fitted model --------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "run_files_"):
            raise NotFittedError("this Clusterer is not fitted yet; call fit(X) or Clusterer.load(path)")

    def _features(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        cfg = self.config_
        images = load_data(cfg.data, X) if isinstance(X, str) else as_image_set(X, cfg.data.resize)
        state = load_safetensors(self.run_files_["model.safetensors"])
        net, views = network_from_state(cfg, images, state, "in memory")
        return extract_features(net, views, images.images, layer=cfg.cluster.features)

    def transform(self, X: Any) -> np.ndarray:
        """The L2-normalised embeddings of ``X``."""
        return self._features(X)[1]

    def predict(self, X: Any) -> np.ndarray:
        """The cluster of each image of ``X``, by the run's saved head (``head.npz``)."""
        features = self._features(X)[0]  # NotFittedError first
        return self.head_.predict(features)

    def scores(self, X: Any, y: Any) -> dict[str, float]:
        """ACC (Hungarian-matched), NMI and ARI of ``predict(X)`` against the labels ``y`` (one per
        image of ``X``; DataError otherwise)."""
        labels = check_labels(y, "y")
        predicted = self.predict(X)
        if len(labels) != len(predicted):
            raise DataError(f"y has {len(labels)} labels for {len(predicted)} images of X")
        return clustering_scores(labels, predicted)

    def score(self, X: Any, y: Any = None) -> float:
        """The Hungarian-matched accuracy of ``predict(X)`` against ``y`` (scikit-learn's one number;
        :meth:`scores` gives ACC, NMI and ARI)."""
        if y is None:
            raise DataError("score(X, y) needs the true labels y")
        return self.scores(X, y)["acc"]

    # -- run directories ---------------------------------------------------------------------------

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fitted run as a run directory (``deepclust evaluate / predict --run`` read it)."""
        self._check_fitted()
        out = Path(path)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise DataError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        check_replaceable(out)  # overwrite replaces a run only, never a folder of the user's
        work = unique_dir(out, "partial")  # a fresh name: never a folder of the user's
        try:
            for name, data in self.run_files_.items():
                ensure_dir((work / name).parent)
                save_bytes(work / name, data)
            swap_in(work, out)  # an existing run is replaced only once the new one is complete
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Clusterer":
        """A fitted Clusterer from a run directory written by ``save`` or ``deepclust fit``."""
        run = Path(path)
        cfg = run_config(run)
        est = cls(method=cfg.method, n_clusters=cfg.cluster.n_clusters)
        est._take(run)
        return est
