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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load as load_safetensors
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.exceptions import NotFittedError

from .config import FLAG_ONLY_OPTIONS, SHORT_OPTIONS, read_yaml, set_dotted
from .configure import build_config, run_config
from .data import ImageSet
from .data.sources import check_labels, finalise, normalise_layout, read_image, resize_all, to_uint8
from .datapath import inference_images
from .errors import ConfigError, DataError
from .evaluate import clustering_scores
from .heads import ClusterHead
from .inference import network_from_state
from .io import ensure_dir, save_bytes
from .methods import option_flags
from .rundir import check_replaceable, swap_in, unique_dir
from .runfiles import RunFiles
from .runs import fit_run
from .structure.hierarchy import cut
from .train import extract_features

# Clusterer's parameters that set one option each -> its dotted configuration key: the command line's
# flags of the same name (config.SHORT_OPTIONS, less --out; the methods' own, methods.option_flags)
OPTION_KEYS: dict[str, str] = {
    **{name: key for name, key in SHORT_OPTIONS.items() if name not in FLAG_ONLY_OPTIONS},
    **{name: key for name, (key, _) in option_flags().items()}}
# Clusterer's parameters, in the order of its signature (tests/test_options.py checks the two agree):
# the options above, ``config`` (the command line's --config) and ``settings`` (its --set)
PARAMETERS = (*OPTION_KEYS, "config", "settings")
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


def options_layers(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(base, layer) of ``Clusterer``'s parameters: ``config`` (a preset name or YAML file) as the base
    layer, and on top each option given (:data:`OPTION_KEYS`; None: not given, the base's or the
    default), then ``settings``, any option by its dotted name (``{"optim.weight_decay": 1e-4}``)."""
    preset, settings = params.get("config"), params.get("settings")
    base = read_yaml(str(preset)) if preset is not None else {}
    layer: dict = {}
    for name, key in OPTION_KEYS.items():
        if params.get(name) is not None:
            set_dotted(layer, key, params[name])
    if settings is not None:
        if not isinstance(settings, Mapping) or not all(isinstance(k, str) for k in settings):
            raise ConfigError(f"settings: expected a mapping of dotted option names to values "
                              f"({{'optim.weight_decay': 1e-4}}), got {settings!r}")
        for key, value in settings.items():
            set_dotted(layer, key, value)
    return base, layer


def _config_of(params: Mapping[str, Any], X: Any = None):
    """The validated Config of a Clusterer's parameters, with ``X``'s data spec: what ``__init__``,
    ``set_params``, ``configuration`` and ``fit`` check."""
    base, layer = options_layers(params)
    if isinstance(X, str):
        set_dotted(layer, "data.spec", X)
    elif X is not None:
        set_dotted(layer, "data.spec", ARRAY_SPEC)
    return build_config(base, layer)


class Clusterer(ClusterMixin, TransformerMixin, BaseEstimator):
    """Unsupervised deep image clustering, scikit-learn style.

    ``method``: a registered method (None: the configuration's default, or the ``config=`` preset's);
    ``n_clusters``: K, or "auto" (estimated from the images without labels, ``structure/n_clusters.py``);
    None: the ``config=`` preset's K, else auto.
    The keyword parameters are the command line's flags of the same name (``epochs`` is ``--epochs``,
    ``batch_size`` ``--batch-size``; :data:`OPTION_KEYS`), each None when not given (then the
    ``config=`` preset's value, else the default); ``rounds``, ``neighbours`` and ``curriculum`` are
    the method's own (AND's; PCP's ``rounds`` and PAD's ``neighbours`` too); ``store``: the directory of
    the image store a fit streams from when the images do not fit in memory (``--store``; written
    once, reused while they are unchanged). ``config``: a preset name
    or YAML file under them; ``settings``: any other option by its dotted name, as the command line's
    ``--set`` (``{"optim.weight_decay": 1e-4, "options.gamma": 0.3}``), over them.
    Every parameter is checked by the one validator when given: ``Clusterer(...)`` and
    :meth:`set_params` refuse a wrong value (ConfigError) as ``fit`` would, so no invalid estimator
    exists to be cloned or fitted.

    Fitted attributes: ``labels_`` (cluster per image), ``embedding_`` (L2-normalised embeddings),
    ``n_clusters_``, ``metrics_`` (metrics.json's content), ``config_`` (the resolved Config),
    ``hierarchy_`` (the clusters' merge tree, ``structure.hierarchy.Hierarchy``; None for a run saved
    before runs kept one). :meth:`recut` reads the clusters at another K off that tree without
    training; it changes nothing of the fitted estimator (``set_params(n_clusters=...)`` followed by
    ``fit`` trains again, as scikit-learn's estimators do).
    """

    def __init__(self, method: str | None = None, n_clusters: int | str | None = None, *,
                 data: str | None = None, split: str | None = None, resize: int | None = None,
                 root: str | None = None, download: bool | None = None, store: str | None = None,
                 epochs: int | None = None, budget: str | None = None, seed: int | None = None,
                 devices: int | None = None, num_nodes: int | None = None, accelerator: str | None = None,
                 precision: str | None = None, threads: int | None = None, progress: bool | None = None,
                 backbone: str | None = None, dim: int | None = None, batch_size: int | None = None,
                 lr: float | None = None, temperature: float | None = None, nce_k: int | None = None,
                 views: str | None = None, cluster_head: str | None = None, cluster_features: str | None = None,
                 rounds: int | None = None, neighbours: int | None = None, curriculum: str | None = None,
                 config: str | None = None, settings: Mapping[str, Any] | None = None):
        given = locals()
        params = {name: given[name] for name in PARAMETERS}
        _config_of(params)  # the one validator, before anything is stored
        for name, value in params.items():  # each parameter stored as given, under its own name
            setattr(self, name, value)

    # -- parameters: get_params is scikit-learn's, from the signature ---------------------------------

    def set_params(self, **params: Any) -> "Clusterer":
        """Set parameters once all of them, with the others, pass the validator ``fit`` uses; on a
        ConfigError (an unknown name included) nothing is changed."""
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise ConfigError(f"unknown parameter '{unknown[0]}' of Clusterer; any other option by its dotted "
                              f"name: settings={{'section.field': value}}; parameters: {', '.join(PARAMETERS)}")
        _config_of({**self.get_params(deep=False), **params})
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def configuration(self, X: Any = None):
        """The Config ``fit(X)`` would start from (validated; nothing resolved from data yet)."""
        return _config_of(self.get_params(deep=False), X)

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
        self.hierarchy_ = RunFiles(run).hierarchy() if "hierarchy.npz" in self.run_files_ else None

    def _array(self, name: str) -> np.ndarray:
        return np.load(io.BytesIO(self.run_files_[name]), allow_pickle=False)

    # -- using the fitted model --------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "run_files_"):
            raise NotFittedError("this Clusterer is not fitted yet; call fit(X) or Clusterer.load(path)")

    def _features(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        cfg = self.config_
        images = inference_images(cfg, X) if isinstance(X, str) else as_image_set(X, cfg.data.resize)
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

    def recut(self, n_clusters: int) -> np.ndarray:
        """The fitted images' clusters at ``n_clusters`` (1 to the tree's leaves), cut from the tree of
        the fitted clusters (``hierarchy_``, ``structure.hierarchy.cut``): at ``n_clusters_`` they are
        ``labels_``, below it unions of those clusters, above it their parts. No training, no network;
        the estimator is not changed."""
        self._check_fitted()
        if self.hierarchy_ is None:
            raise DataError("this run has no cluster tree (saved before runs kept one); fit it again to re-cut it")
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
            raise ConfigError(f"n_clusters must be a whole number, got {n_clusters!r}")
        return cut(self.hierarchy_, int(n_clusters))

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
