"""Typed configuration: dataclasses, YAML in and out, and the one place every option is validated.

A run is described by one :class:`Config`. It is built from, in increasing precedence:
the defaults below, a method's preset (``configs/<name>.yaml`` shipped with the package or any
YAML file given with ``--config``), and command-line flags (``--epochs 5`` or ``--set optim.lr=0.1``).
:func:`validate` checks every field's type and range; it is the only place that does. The resolved
configuration (``auto`` values filled in from the data) is written to ``RUN/config.yaml`` and can be
read back with ``--config``.

Method options live here too (one dataclass per method), so that a method file only composes parts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError

SPLITS = ("train", "test", "all")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
CLUSTER_HEADS = ("auto", "kmeans", "spectral")
VIEW_PRESET_NAMES = ("auto", "none", "natural", "digits", "dccm")
BACKBONE_NAMES = ("auto", "mlp", "jule_cnn", "dccm_cnn", "alexnet", "resnet18", "resnet50")


@dataclass
class DataConfig:
    spec: str = "digits"  # digits | npz:PATH[,PATH] | folder:PATH | mnist | fashion-mnist | ...
    split: str = "all"  # images loaded: the clustering papers train and evaluate on all images
    train_on: str = "all"  # all | train: train only on the train split, evaluate on everything
                           # loaded (the AND / Instance protocol: kNN of test against train)
    root: str = "~/.cache/deepclust"  # where torchvision datasets are kept / downloaded
    download: bool = False
    resize: int | None = None  # resize every image to a square side (needed for mixed sizes)


@dataclass
class ViewsConfig:
    preset: str = "auto"  # auto: "digits" for grayscale, "natural" for colour (AND reference code)
    crop_scale: list[float] | None = None  # each None field takes the preset's value
    flip: bool | None = None
    rotation: float | None = None
    shift: float | None = None
    rescale: list[float] | None = None
    color_jitter: float | None = None
    grayscale_p: float | None = None


@dataclass
class NetConfig:
    backbone: str = "auto"  # auto: chosen from image size and channels (nets.default_backbone)
    dim: int = 128  # embedding dimension (all papers: 128)


@dataclass
class MemoryConfig:
    temperature: float = 0.1  # AND / Instance reference code
    eta: float = 0.5  # AND Eq 8 / PAD Eq 6: memory = (1 - eta) * memory + eta * feature
    nce_k: int = 0  # 0: full softmax over the bank (AND); > 0: NCE with this many noise samples


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    batch_size: int = 128  # the global batch, split over devices
    milestones: list[int] = field(default_factory=lambda: [80, 120, 160])  # epochs (per round)
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class TrainConfig:
    epochs: int = 15  # epochs of training; for AND, epochs per round (round 0 included)
    seed: int = 0
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    progress: bool = True
    checkpoint: bool = True


@dataclass
class ClusterConfig:
    n_clusters: int | None = None  # None: the number of classes when labels exist, else 10
    head: str = "auto"  # auto: spectral (see README: best on the CPU datasets)
    features: str = "auto"  # auto: backbone | embedding | a layer name of the network
    n_neighbors: int = 10  # kNN graph of the spectral head


@dataclass
class EvalConfig:
    knn_k: int = 200  # Wu et al. 2018 / AND
    knn_temperature: float | None = None  # None: the memory bank's temperature (AND reference code)
    linear_probe: bool = False


@dataclass
class InstanceOptions:
    """Instance discrimination (Wu et al. 2018): no options beyond the shared ones."""


@dataclass
class AndOptions:
    """AND (Huang et al., ICML 2019)."""

    rounds: int = 4  # R of Eq 6; round 0 (instance discrimination) comes on top
    neighbours: int = 1  # k of Eq 1
    curriculum: str = "linear"  # linear: S = r/R (Eq 6); one-off: S = 1 from round 1 (Table 6)
    round0_epochs: int | None = None  # epochs of round 0; None: the same as every other round


METHOD_OPTIONS: dict[str, type] = {"instance": InstanceOptions, "and": AndOptions}


@dataclass
class Config:
    method: str = "instance"
    out: str = "runs/latest"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    net: NetConfig = field(default_factory=NetConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    options: Any = None  # the method's own options dataclass (METHOD_OPTIONS[method])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["options"] = dataclasses.asdict(self.options) if self.options is not None else {}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# --------------------------------------------------------------------------------------------
# Building and validating


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if len(args) < len(typing.get_args(tp)):
                return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported option type {_type_name(tp)}")


def _build(cls: type, values: dict | None, where: str) -> Any:
    """Make dataclass ``cls`` from a dict, refusing unknown keys and coercing types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown option {prefix}{unknown[0]}; known: {', '.join(sorted(names - {'options'}))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values or f.name == "options":
            continue
        tp = hints[f.name]
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values[f.name], key)
        else:
            kwargs[f.name] = _coerce(values[f.name], tp, key)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_path(name: str) -> Path:
    return Path(__file__).parent / "configs" / f"{name}.yaml"


def read_yaml(path_or_preset: str) -> dict:
    """Read a YAML file, or a preset shipped with the package (``and-mnist`` etc.)."""
    path = Path(path_or_preset).expanduser()
    if not path.exists():
        preset = preset_path(path_or_preset)
        if preset.exists():
            path = preset
        else:
            raise ConfigError(f"config file not found: {path_or_preset}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise ConfigError(f"cannot parse {path}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", "0.1")`` sets ``d["optim"]["lr"]``."""
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a section")
    cur[keys[-1]] = value


def build_config(*layers: dict) -> Config:
    """Merge dicts (later wins), build the typed Config and validate it."""
    merged: dict = {}
    for layer in layers:
        merged = _merge(merged, layer or {})
    options = merged.pop("options", None)
    cfg = _build(Config, merged, "")
    cls = METHOD_OPTIONS.get(cfg.method)
    if cls is None:
        raise ConfigError(f"unknown method '{cfg.method}'; known: {', '.join(METHOD_OPTIONS)}")
    cfg.options = _build(cls, options, "options")
    validate(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _one_of(value: str, allowed: tuple[str, ...], where: str) -> None:
    _check(value in allowed, f"{where}: '{value}' is not one of {', '.join(allowed)}")


def validate(cfg: Config) -> Config:
    """Every range and choice check of every option, in one place."""
    _one_of(cfg.method, tuple(METHOD_OPTIONS), "method")
    _one_of(cfg.data.split, SPLITS, "data.split")
    _one_of(cfg.data.train_on, ("all", "train"), "data.train_on")
    _check(cfg.data.resize is None or cfg.data.resize >= 4, "data.resize: must be >= 4 pixels")
    _one_of(cfg.views.preset, VIEW_PRESET_NAMES, "views.preset")
    for name in ("crop_scale", "rescale"):
        v = getattr(cfg.views, name)
        _check(
            v is None or (len(v) == 2 and 0 < v[0] <= v[1]),
            f"views.{name}: expected two numbers 0 < low <= high",
        )
    _check(cfg.views.crop_scale is None or cfg.views.crop_scale[1] <= 1, "views.crop_scale: high <= 1")
    for name in ("grayscale_p",):
        v = getattr(cfg.views, name)
        _check(v is None or 0 <= v <= 1, f"views.{name}: must be within [0, 1]")
    for name in ("rotation", "shift", "color_jitter"):
        v = getattr(cfg.views, name)
        _check(v is None or v >= 0, f"views.{name}: must be >= 0")
    _check(cfg.net.backbone in BACKBONE_NAMES, f"net.backbone: '{cfg.net.backbone}' is not one of "
           f"{', '.join(BACKBONE_NAMES)}")
    _check(cfg.net.dim >= 2, "net.dim: must be >= 2")
    _check(cfg.memory.temperature > 0, "memory.temperature: must be > 0")
    _check(0 < cfg.memory.eta <= 1, "memory.eta: must be within (0, 1]")
    _check(cfg.memory.nce_k >= 0, "memory.nce_k: must be >= 0")
    _one_of(cfg.optim.optimizer, OPTIMIZERS, "optim.optimizer")
    _check(cfg.optim.lr > 0, "optim.lr: must be > 0")
    _check(cfg.optim.momentum >= 0, "optim.momentum: must be >= 0")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay: must be >= 0")
    _check(cfg.optim.batch_size >= 2, "optim.batch_size: must be >= 2")
    _check(all(m > 0 for m in cfg.optim.milestones), "optim.milestones: must be positive epochs")
    _check(0 < cfg.optim.gamma <= 1, "optim.gamma: must be within (0, 1]")
    _check(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs: must be >= 0")
    _check(cfg.train.epochs >= 0, "train.epochs: must be >= 0")
    _check(cfg.train.seed >= 0, "train.seed: must be >= 0")
    _check(cfg.train.devices >= 1, "train.devices: must be >= 1")
    _check(cfg.train.num_nodes >= 1, "train.num_nodes: must be >= 1")
    _check(
        cfg.optim.batch_size % (cfg.train.devices * cfg.train.num_nodes) == 0,
        "optim.batch_size: the global batch must divide evenly over devices x nodes",
    )
    _one_of(cfg.train.accelerator, ACCELERATORS, "train.accelerator")
    _one_of(cfg.train.precision, PRECISIONS, "train.precision")
    _check(cfg.train.threads >= 0, "train.threads: must be >= 0")
    _check(cfg.cluster.n_clusters is None or cfg.cluster.n_clusters >= 1, "cluster.n_clusters: must be >= 1")
    _one_of(cfg.cluster.head, CLUSTER_HEADS, "cluster.head")
    _check(cfg.cluster.n_neighbors >= 1, "cluster.n_neighbors: must be >= 1")
    _check(cfg.eval.knn_k >= 1, "eval.knn_k: must be >= 1")
    _check(cfg.eval.knn_temperature is None or cfg.eval.knn_temperature > 0, "eval.knn_temperature: must be > 0")
    if isinstance(cfg.options, AndOptions):
        o = cfg.options
        _check(o.rounds >= 1, "options.rounds: must be >= 1")
        _check(o.neighbours >= 1, "options.neighbours: must be >= 1")
        _one_of(o.curriculum, ("linear", "one-off"), "options.curriculum")
        _check(o.round0_epochs is None or o.round0_epochs >= 0, "options.round0_epochs: must be >= 0")
    return cfg


def load_config(path: str | Path) -> Config:
    return build_config(read_yaml(str(path)))
