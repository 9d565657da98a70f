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
 - ``alexnet`` on images > 64 px (the 11x11/4 stem) whose conv5 map is 6x6 (e.g. 224 px):
   torchvision's ``alexnet`` names and shapes, each BatchNorm folded into the conv / linear before it
   (torchvision's AlexNet has none), so the loaded model computes the same features in eval mode;
   ``strict=False`` misses only ``classifier.6`` (the ImageNet classifier);
 - every other backbone (``mlp``, ``jule_cnn``, ``dccm_cnn``, the small-image ``alexnet`` of 3x3
   convs) has no torchvision model of the same layout: the file holds the project's own backbone
   state dict (``deepclust.nets``' ``build_backbone(name, channels, size)`` loads it) and its
   metadata says so.

The run is read through :class:`runfiles.RunFiles`: a missing or damaged file is one line naming it.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from safetensors.torch import save

from .errors import DataError
from .inference import fitted_images
from .io import check_target, save_bytes, save_text
from .rundir import check_output
from .runfiles import RunFiles, damaged
from .structure.knn import topk_cosine

VOTE_K = 10
FORMATS = ("csv", "parquet")
TORCHVISION = ("resnet18", "resnet50")
BN_EPS = 1e-5  # torch's BatchNorm default, which every backbone of nets.py uses


def knn_confidence(embedding: np.ndarray, clusters: np.ndarray, k: int = VOTE_K) -> np.ndarray:
    """Share of each image's k nearest other images (cosine) that are in its cluster."""
    n = len(embedding)
    if n < 2:
        return np.ones(n, np.float32)
    _, idx = topk_cosine(embedding.astype(np.float32), embedding.astype(np.float32), min(k, n - 1),
                         exclude_self=True)
    return (clusters[idx] == clusters[:, None]).mean(1).astype(np.float32)


def _names(files: RunFiles, n: int) -> list[str] | None:
    """File names when the run's data is a folder (None otherwise: rows are named by index)."""
    cfg = files.config()
    if not cfg.data.spec.startswith("folder:"):
        return None
    images = fitted_images(files.path, cfg, n, "export")
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
    check_target(out, f"clusters.{fmt}")
    check_output(out, run)  # never one of the run's own files or its data
    files = RunFiles(run)
    clusters, embedding = files.outputs()
    names = _names(files, len(clusters))
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


def _inner(state: dict) -> dict:
    """The backbone's tensors of ``model.safetensors`` (keys under ``backbone.``), prefix removed."""
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def resnet_keys(inner: dict) -> dict:
    """A resnet backbone's tensors under torchvision's names (``stem.0`` -> ``conv1``, ``stem.1`` ->
    ``bn1``; ``layerN`` are torchvision's own modules)."""
    rename = {"stem.0.": "conv1.", "stem.1.": "bn1."}
    out = {}
    for key, value in inner.items():
        prefix = next((p for p in rename if key.startswith(p)), None)
        out[rename[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def _fold(weight, bias, inner: dict, bn: str) -> tuple:
    """A conv / linear followed by BatchNorm ``bn`` (eval-mode statistics) as one conv / linear:
    w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    scale = inner[f"{bn}.weight"] / (inner[f"{bn}.running_var"] + BN_EPS).sqrt()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * scale.reshape(shape), (bias - inner[f"{bn}.running_mean"]) * scale + inner[f"{bn}.bias"]


def alexnet_folded(inner: dict) -> dict | None:
    """Our ImageNet-size AlexNet (11x11/4 stem; > 64 px, 3 channels, conv5 map 6x6) as torchvision's
    ``alexnet`` without its last classifier layer: the layers have torchvision's shapes, and each
    BatchNorm is folded into the conv / linear before it, so in eval mode the loaded network computes
    the same function (torchvision has no BatchNorm; its adaptive 6x6 pool is then the identity).
    None for the small-image variant (3x3 convs) or other input sizes."""
    if tuple(inner["conv1.0.weight"].shape) != (64, 3, 11, 11) or inner["fc1.1.weight"].shape[1] != 256 * 6 * 6:
        return None
    out = {}
    for i, j in enumerate((0, 3, 6, 8, 10)):
        w, b = _fold(inner[f"conv{i + 1}.0.weight"], inner[f"conv{i + 1}.0.bias"], inner, f"conv{i + 1}.1")
        out[f"features.{j}.weight"], out[f"features.{j}.bias"] = w, b
    for i, j in ((1, 1), (2, 4)):
        w, b = _fold(inner[f"fc{i}.1.weight"], inner[f"fc{i}.1.bias"], inner, f"fc{i}.2")
        out[f"classifier.{j}.weight"], out[f"classifier.{j}.bias"] = w, b
    return out


def backbone_weights(name: str, input_shape, sobel: bool, state: dict) -> tuple[dict, dict[str, str]]:
    """The tensors and metadata ``--weights`` writes for a backbone ``name`` trained on
    ``input_shape`` (C, H, W) images, from ``model.safetensors``' ``state``."""
    c, h, w = input_shape
    inner = _inner(state)
    channels = 2 if sobel else c  # DeepCluster's Sobel filter feeds the backbone 2 channels
    meta = {"backbone": name, "input_shape": f"{c}x{h}x{w}", "backbone_in_channels": str(channels)}
    folded = alexnet_folded(inner) if name == "alexnet" else None
    if name in TORCHVISION:
        stem = []
        if max(h, w) <= 64:
            stem.append(f"model.conv1 = nn.Conv2d({channels}, 64, 3, 1, 1, bias=False); "
                        "model.maxpool = nn.Identity()")
        elif channels != 3:
            stem.append(f"model.conv1 = nn.Conv2d({channels}, 64, 7, 2, 3, bias=False)")
        note = (f"torchvision.models.{name}(weights=None)" + "".join(f"; then {s}" for s in stem)
                + "; load_state_dict(strict=False): fc.weight / fc.bias (the ImageNet classifier) "
                  "are not in a clustering backbone")
        return resnet_keys(inner), meta | {"format": "torchvision", "note": note}
    if folded is not None:
        note = ("torchvision.models.alexnet(weights=None).load_state_dict(strict=False): BatchNorm folded into "
                "the layers (the same function in eval mode); classifier.6 (the ImageNet classifier) is not "
                "in a clustering backbone")
        return folded, meta | {"format": "torchvision", "note": note}
    # jule_cnn's ip1 without its BatchNorm (ip1.2) is JULE's Linear (options.ip1 linear)
    ip1 = ", ip1='linear'" if name == "jule_cnn" and "ip1.2.weight" not in inner else ""
    note = (f"no torchvision model has this layout: deepclust.nets.build_backbone('{name}', "
            f"{channels}, ({h}, {w}){ip1})[0].load_state_dict(...) loads it")
    return inner, meta | {"format": "deepclust", "note": note}


def export_weights(run: str | Path, out: str | Path) -> tuple[Path, dict[str, str]]:
    """Write the run's backbone to ``out`` (safetensors); returns the path and the metadata written
    (``format``: ``torchvision`` or ``deepclust``, ``backbone``, ``note``)."""
    out = Path(out)
    check_target(out, "backbone.safetensors")
    check_output(out, run, flag="--weights")  # never one of the run's own files or its data
    files = RunFiles(run)
    cfg = files.config()
    if cfg.net.input_shape is None:
        raise damaged(files.path / "config.yaml", "net.input_shape is missing: it does not say what images "
                                                  "the network was trained on")
    state = files.state()
    tensors, meta = backbone_weights(cfg.net.backbone, cfg.net.input_shape, cfg.net.sobel, state)
    save_bytes(out, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return out, meta
