"""``deepclust export``: a finished run's clusters as a table, and its backbone as weights.

Table (``csv`` or ``parquet``), one row per image in the run's order:
 - ``name``: the file name (path relative to the folder) when the data is a folder, else ``index``
   (the image's position in the run's data);
 - ``cluster``: the run's cluster (``labels.npy``);
 - ``confidence``: the kNN-vote share: of the image's ``VOTE_K`` nearest other images (cosine
   similarity of the run's embeddings), the share in the image's own cluster. 1.0 = its whole
   neighbourhood agrees; near 1/K = it sits between clusters. No labels are read;
 - the embedding: columns ``e0 .. e{D-1}`` in CSV, one list column ``embedding`` in parquet.

Weights (``--weights FILE``): the backbone as a safetensors state dict.
 - ``resnet18`` / ``resnet50``: keys renamed to torchvision's (``stem.0`` -> ``conv1``, ``stem.1``
   -> ``bn1``, ``layerN`` as is), so ``torchvision.models.resnetXX(weights=None)`` loads them with
   ``strict=False``; the only keys it misses are ``fc.weight`` / ``fc.bias``: torchvision's
   ImageNet classifier, which a clustering backbone does not have (the projection head is not a
   classifier and is left out). A run on images <= 64 px or on other than 3 channels has the CIFAR
   stem (3x3 stride-1 conv, no max-pool) or another input width: replace ``model.conv1`` (and
   ``model.maxpool`` by ``nn.Identity()``) as the file's metadata says before loading;
 - every other backbone (``mlp``, ``jule_cnn``, ``dccm_cnn``, ``alexnet``: ours is the BatchNorm
   variant of the instance-discrimination papers, not torchvision's) has no torchvision model of the
   same layout: the file holds the project's own backbone state dict (``deepclust.nets``'
   ``build_backbone(name, channels, size)`` loads it) and its metadata says so.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.torch import save

from .configure import run_config
from .errors import DataError
from .io import save_bytes, save_text
from .resolution import load_data
from .structure.knn import topk_cosine

VOTE_K = 10
FORMATS = ("csv", "parquet")
TORCHVISION = ("resnet18", "resnet50")


def knn_confidence(embedding: np.ndarray, clusters: np.ndarray, k: int = VOTE_K) -> np.ndarray:
    """Share of each image's k nearest other images (cosine) that are in its cluster."""
    n = len(embedding)
    if n < 2:
        return np.ones(n, np.float32)
    _, idx = topk_cosine(embedding.astype(np.float32), embedding.astype(np.float32), min(k, n - 1),
                         exclude_self=True)
    return (clusters[idx] == clusters[:, None]).mean(1).astype(np.float32)


def _run_arrays(run: Path) -> tuple[np.ndarray, np.ndarray]:
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    for name in ("labels.npy", "embeddings.npy"):
        if not (run / name).exists():
            raise DataError(f"run {run} has no {name} (did training finish?)")
    clusters = np.load(run / "labels.npy", allow_pickle=False).astype(np.int64)
    embedding = np.load(run / "embeddings.npy", allow_pickle=False).astype(np.float32)
    if clusters.ndim != 1 or embedding.ndim != 2 or len(clusters) != len(embedding):
        raise DataError(f"run {run}: labels.npy {clusters.shape} and embeddings.npy {embedding.shape} do not match")
    return clusters, embedding


def _names(run: Path, n: int) -> list[str] | None:
    """File names when the run's data is a folder (None otherwise: rows are named by index)."""
    cfg = run_config(run)
    if not cfg.data.spec.startswith("folder:"):
        return None
    images = load_data(cfg.data)
    if images.names is None or len(images.names) != n:
        raise DataError(f"run {run} clustered {n} images but its folder '{cfg.data.spec}' now has "
                        f"{len(images)}; export needs the images the run was fitted on")
    # names that are not valid UTF-8 (surrogate-escaped by Python) get \xNN escapes, as predict's CSV
    return [s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for s in images.names]


def default_table(run: str | Path, fmt: str) -> Path:
    return Path(run) / f"clusters.{fmt}"


def export_table(run: str | Path, fmt: str = "csv", out: str | Path | None = None) -> Path:
    """Write the run's per-image table (see the module docstring) to ``out``."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    run = Path(run)
    out = Path(out) if out is not None else default_table(run, fmt)
    _check_out(out)
    clusters, embedding = _run_arrays(run)
    names = _names(run, len(clusters))
    ids = names if names is not None else [str(i) for i in range(len(clusters))]
    confidence = knn_confidence(embedding, clusters)
    if fmt == "csv":
        buf = io.StringIO(newline="")
        writer = csv.writer(buf)
        first = "name" if names is not None else "index"
        writer.writerow([first, "cluster", "confidence", *(f"e{j}" for j in range(embedding.shape[1]))])
        for name, c, p, e in zip(ids, clusters.tolist(), confidence.tolist(), embedding.tolist()):
            writer.writerow([name, c, f"{p:.4g}", *(f"{v:.7g}" for v in e)])
        save_text(out, buf.getvalue())
    else:
        save_bytes(out, _parquet(ids if names is not None else None, clusters, confidence, embedding))
    return out


def _parquet(names: list[str] | None, clusters, confidence, embedding) -> bytes:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("--format parquet needs pyarrow (pip install pyarrow); or use --format csv") from None
    first = pa.array(names, pa.string()) if names is not None else pa.array(np.arange(len(clusters)))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(embedding.ravel()), embedding.shape[1])
    table = pa.table({"name" if names is not None else "index": first, "cluster": pa.array(clusters),
                      "confidence": pa.array(confidence), "embedding": emb})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise DataError(f"--out {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise DataError(f"no such directory: {out.parent}")


def torchvision_keys(backbone: str, state: dict) -> dict:
    """The backbone's tensors (keys of ``model.safetensors`` under ``backbone.``) with torchvision's
    names for ``resnet18`` / ``resnet50``, the project's own names for every other backbone."""
    inner = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if backbone not in TORCHVISION:
        return inner
    rename = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    out = {}
    for key, value in inner.items():
        prefix = next((p for p in rename if key.startswith(p)), None)
        out[rename[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def export_weights(run: str | Path, out: str | Path) -> tuple[Path, dict[str, str]]:
    """Write the run's backbone to ``out`` (safetensors); returns the path and the metadata written
    (``format``: ``torchvision`` or ``deepclust``, ``backbone``, ``note``)."""
    import torch

    run, out = Path(run), Path(out)
    _check_out(out)
    if not run.is_dir():
        raise DataError(f"no such run directory: {run}")
    cfg = run_config(run)
    path = run / "model.safetensors"
    if not path.exists():
        raise DataError(f"run {run} has no model.safetensors (did training finish?)")
    name, (c, h, w) = cfg.net.backbone, cfg.net.input_shape
    state = {k: torch.from_numpy(v) for k, v in load_file(str(path)).items()}
    tensors = {k: v.contiguous() for k, v in torchvision_keys(name, state).items()}
    channels = 2 if cfg.net.sobel else c  # DeepCluster's Sobel filter feeds the backbone 2 channels
    meta = {"backbone": name, "input_shape": f"{c}x{h}x{w}", "backbone_in_channels": str(channels)}
    if name in TORCHVISION:
        meta["format"] = "torchvision"
        stem = []
        if max(h, w) <= 64:
            stem.append(f"model.conv1 = nn.Conv2d({channels}, 64, 3, 1, 1, bias=False); "
                        "model.maxpool = nn.Identity()")
        elif channels != 3:
            stem.append(f"model.conv1 = nn.Conv2d({channels}, 64, 7, 2, 3, bias=False)")
        meta["note"] = (f"torchvision.models.{name}(weights=None)" + "".join(f"; then {s}" for s in stem)
                        + "; load_state_dict(strict=False): fc.weight / fc.bias (the ImageNet classifier) "
                          "are not in a clustering backbone")
    else:
        meta["format"] = "deepclust"
        meta["note"] = (f"no torchvision model has this layout: deepclust.nets.build_backbone('{name}', "
                        f"{channels}, ({h}, {w}))[0].load_state_dict(...) loads it")
    save_bytes(out, save(tensors, metadata=meta))
    return out, meta
