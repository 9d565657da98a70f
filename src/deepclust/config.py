"""Typed configuration: dataclasses, YAML in and out, and the one place every option is validated.

A run is described by one :class:`Config`. It is built from, in increasing precedence:
the defaults below, a method's preset (``configs/<name>.yaml`` shipped with the package or any
YAML file given with ``--config``), and command-line flags (``--epochs 5`` or ``--set optim.lr=0.1``).
The resolved configuration (``auto`` values filled in from the data) is written to
``RUN/config.yaml`` and can be read back with ``--config``.

Validation, in one place (:func:`validate`): every field is declared with :func:`option`, which
states its range or choices; the validator checks every field of every section, and of the method's
own ``Options`` dataclass (declared in the method's file, named in the registry of
``deepclust.methods``), the same way. Numbers must be finite. Rules across fields are a section's ``check()`` method.
Types are checked layer by layer as well (:func:`merge_layers`): a section or value of the wrong type in
a ``--config`` file is refused even where a flag sets the same keys.

Config knows nothing of the methods: :func:`config_from_dict` is handed the way from a method's name
to its ``Options`` class (``deepclust.configure.build_config`` hands it the registry of
``deepclust.methods``). Every section is frozen: a changed configuration is a new object
(``dataclasses.replace``), built and validated once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import yaml

from .durations import parse_budget
from .errors import ConfigError

SPLITS = ("train", "test", "all")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
SCHEDULES = ("step", "cosine", "inv")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
# The cluster heads fitted on the features (heads.py) and "method", the configured method's own clusters;
# a registered stage (``methods.STAGES``, e.g. scan) is a head too: the run trains it (Config.check).
POST_HOC_HEADS = ("auto", "kmeans", "spectral", "agglomerative", "graph", "ward", "method")
VIEW_PRESET_NAMES = ("auto", "none", "natural", "digits", "dccm")
# The backbones nets.build_backbone makes (nets.BACKBONES is this tuple): kept here, where the validator's
# choices are, since the configuration imports no torch (tests/test_house.py) and nets is above it.
BACKBONES = ("mlp", "jule_cnn", "dccm_cnn", "alexnet", "resnet18", "resnet50")
BACKBONE_NAMES = ("auto", *BACKBONES)
# The largest train.seed: torch, numpy and faiss take it (faiss a signed 32-bit int); seeds derived from it
# for faiss (seed * 1000 + epoch, DeepCluster's and PCP's k-means) are reduced modulo 2**31 there.
MAX_SEED = 2**31 - 1

def option(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
           auto: bool = False, flag: str | None = None) -> Any:
    """A configuration field with its rule: numbers within [low, high] (``low_open`` / ``high_open``
    make a bound strict), or one of ``choices``. Lists are checked item by item; None (for Optional
    fields) always passes. ``auto``: the text "auto" is read as None (chosen from the data). A list
    default is copied per instance. ``flag`` (a method's ``Options`` field): the field is also the
    command-line flag ``--NAME`` and ``Clusterer``'s parameter NAME, with this help text
    (``methods.option_flags``)."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices,
            "auto": auto, "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _number_text(x: float) -> str:
    """An integer in full (a seed of 2147483648 is not 2.14748e+09), a float in %g."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(m: dict) -> str:
    lo = "" if m["low"] is None else f"{'>' if m['low_open'] else '>='} {_number_text(m['low'])}"
    hi = "" if m["high"] is None else f"{'<' if m['high_open'] else '<='} {_number_text(m['high'])}"
    return " and ".join(p for p in (lo, hi) if p)


def _check_value(value: Any, m: dict, where: str) -> None:
    if value is None:
        return
    if isinstance(value, list):
        for v in value:
            _check_value(v, m, where)
        return
    if m.get("choices") is not None:
        _check(value in m["choices"], f"{where}: '{value}' is not one of {', '.join(map(str, m['choices']))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    _check(isinstance(value, int) or math.isfinite(value), f"{where}: must be a finite number, got {value}")
    lo, hi = m.get("low"), m.get("high")
    ok = (lo is None or (value > lo if m["low_open"] else value >= lo)) and \
         (hi is None or (value < hi if m["high_open"] else value <= hi))
    _check(ok, f"{where}: must be {_range_text(m)}, got {_number_text(value)}")


def check_fields(obj: Any, where: str) -> None:
    """Every field's rule (``option`` metadata), recursively, then each section's ``check()``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
        elif isinstance(value, dict) and all(dataclasses.is_dataclass(v) for v in value.values()):
            for name, section in value.items():  # Config.stages: each under its YAML name
                check_fields(section, name)
        elif f.metadata and not f.metadata.get("not_an_option"):
            _check_value(value, dict(f.metadata), key)
    check = getattr(obj, "check", None)
    if callable(check):
        check()


def _pair(v: list[float] | None, where: str, high: float | None = None) -> None:
    _check(v is None or (len(v) == 2 and 0 < v[0] <= v[1] and (high is None or v[1] <= high)),
           f"{where}: expected two numbers 0 < low <= high" + (f" <= {high:g}" if high is not None else ""))


@dataclass(frozen=True)
class DataConfig:
    spec: str = "digits"  # digits | npz:PATH[,PATH] | folder:PATH | mnist | fashion-mnist | ...
    split: str = option("all", choices=SPLITS)  # images loaded: the clustering papers use all images
    train_on: str = option("all", choices=("all", "train"))  # train: train only on the train split,
                           # evaluate on everything loaded (the AND / Instance protocol: kNN test vs train)
    root: str = "~/.cache/deepclust"  # where torchvision datasets are kept / downloaded
    download: bool = False
    resize: int | None = option(None, low=4)  # resize every image to a square side (mixed sizes)
    store: str | None = None  # where the image store lives when the images are streamed from disk (they do
                              # not fit the memory a run may use: datapath.py); None: under root/stores/


@dataclass(frozen=True)
class ViewsConfig:
    preset: str = option("auto", choices=VIEW_PRESET_NAMES)  # auto: chosen from the pixels (view_rules.py)
    crop_scale: list[float] | None = option(None, low=0, high=1, low_open=True)  # None: the preset's
    flip: bool | None = None
    rotation: float | None = option(None, low=0, high=180)
    shift: float | None = option(None, low=0, high=1)
    rescale: list[float] | None = option(None, low=0, high=10, low_open=True)
    color_jitter: float | None = option(None, low=0, high=1)
    grayscale_p: float | None = option(None, low=0, high=1)

    def check(self) -> None:
        _pair(self.crop_scale, "views.crop_scale", 1.0)
        _pair(self.rescale, "views.rescale")


# The augmentation's own fields (a views section less its preset; each one the preset's unless given):
# what resolution.py fills in and hands to views.ViewSpec, declared once, above.
VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(ViewsConfig) if f.name != "preset")


@dataclass(frozen=True)
class NetConfig:
    backbone: str = option("auto", choices=BACKBONE_NAMES)  # auto: from image size and channels
    dim: int = option(128, low=2)  # embedding dimension (all papers: 128)
    # DeepCluster: a fixed Sobel filter (colour to grey, then gradients) before the backbone;
    # auto (None): on for colour input, off for grey (DeepCluster filters every colour image it trains on)
    sobel: bool | None = option(False, auto=True)
    input_shape: list[int] | None = option(None, low=1)  # (C, H, W) the network was built for (auto)


@dataclass(frozen=True)
class MemoryConfig:
    temperature: float = option(0.1, low=0, high=10, low_open=True)  # AND / Instance reference code
    eta: float = option(0.5, low=0, high=1, low_open=True)  # AND Eq 8 / PAD Eq 6: (1-eta) m + eta x
    nce_k: int = option(0, low=0)  # 0: full softmax over the bank (AND); > 0: NCE noise samples


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = option("sgd", choices=OPTIMIZERS)
    lr: float = option(0.03, low=0, high=10, low_open=True)
    momentum: float = option(0.9, low=0, high=1, high_open=True)
    nesterov: bool = True
    weight_decay: float = option(5e-4, low=0, high=1)
    batch_size: int = option(128, low=2)  # the global batch, split over devices
    schedule: str = option("step", choices=SCHEDULES)  # step: x gamma at each milestone; cosine: half a
                                # cosine from lr to 0 over the run (per round), set per epoch; inv: Caffe's
                                # lr * (1 + inv_gamma * iteration) ** -inv_power, per step (JULE)
    milestones: list[int] | None = option(None, low=1)  # fixed epochs (per round), the papers' presets
                                # (80, 120, 160 for 200 epochs); given, they win over milestones_frac
    milestones_frac: list[float] | None = option([0.5, 0.75], low=0, high=1, low_open=True, high_open=True)
                                # milestones as fractions of the run's length (per round), so a run of
                                # any length -- a budget's, a CPU preset's -- decays at the same points
    gamma: float = option(0.1, low=0, high=1, low_open=True)
    warmup_epochs: int = option(0, low=0)
    inv_gamma: float = option(1e-4, low=0, high=1)  # JULE (Caffe "inv"): gamma 1e-4, power 0.75
    inv_power: float = option(0.75, low=0, high=10)

    def milestone_epochs(self, length: int) -> list[int]:
        """The ``step`` schedule's milestones as epochs of a run (or round) of ``length`` epochs: the
        fixed ``milestones`` when given, else the first epoch at or past each fraction of ``length``
        (0.5 and 0.75 of 40 epochs: 20 and 30; of 37: 19 and 28); none when neither is set."""
        if self.milestones is not None:
            return list(self.milestones)
        return [math.ceil(f * length - 1e-9) for f in self.milestones_frac or ()]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = option(None, low=0)  # epochs of training; for AND / PCP, epochs per round (AND:
                                               # round 0 included); None: chosen to fit train.budget
    budget: str | None = None  # time budget when epochs is None: "10m", "90s", "1h30m" (None: budget.DEFAULT_BUDGET)
    seed: int = option(0, low=0, high=MAX_SEED)
    devices: int = option(1, low=1)
    num_nodes: int = option(1, low=1)
    accelerator: str = option("auto", choices=ACCELERATORS)
    precision: str = option("auto", choices=PRECISIONS)  # auto: bf16-mixed on GPU, 32-true on CPU
    threads: int = option(0, low=0)  # torch intra-op threads on CPU; 0 keeps torch's default
    sync_batchnorm: bool = True  # several processes: BatchNorm statistics over the global batch
    progress: bool = True
    checkpoint: bool = True

    def check(self) -> None:
        if self.budget is not None:
            parse_budget(self.budget)  # ConfigError in one line on anything but a duration


@dataclass(frozen=True)
class ClusterConfig:
    n_clusters: int | None = option(None, low=1, auto=True)  # None / auto: estimated from the images
                                                          # (structure/n_clusters.py), never the labels
    head: str = "auto"  # auto: the method's choice (Method.cluster_head); one of POST_HOC_HEADS or a stage's name
    features: str = "auto"  # auto: backbone | embedding | a layer name of the network
    n_neighbors: int = option(10, low=1)  # kNN graph of the spectral head
    eigenvectors: int | None = option(None, low=1)  # spectral head: eigenvectors per cluster (None: the
                                                    # method's choice, 2 unless it says otherwise)


@dataclass(frozen=True)
class EvalConfig:
    knn_k: int = option(200, low=1)  # Wu et al. 2018 / AND
    knn_temperature: float | None = option(None, low=0, high=10, low_open=True)  # None: the bank's T
    linear_probe: bool = False


@dataclass(frozen=True)
class Config:
    method: str = "pad"  # the best method on the development data (dev-choices-*.json)
    out: str = "runs/latest"
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    net: NetConfig = field(default_factory=NetConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    options: Any = None  # the method's own options dataclass (its ``Options``)
    # Each registered stage's own options (its ``Options``), under its name: a section of that name in
    # YAML (``scan:``), read by the stage when ``cluster.head`` names it (``methods.STAGES``).
    stages: dict = field(default_factory=dict, metadata={"not_an_option": True})
    # What the data decided (``resolution.resolve``: views chosen from the pixels, the budget plan),
    # with its evidence, for the run's metrics. Not an option: never read from, or written to, YAML.
    resolution: dict = field(default_factory=dict, compare=False, metadata={"not_an_option": True})

    def check(self) -> None:
        heads = (*POST_HOC_HEADS, *self.stages)
        _check(self.cluster.head in heads, f"cluster.head: '{self.cluster.head}' is not one of {', '.join(heads)}")
        world = self.train.devices * self.train.num_nodes
        _check(self.optim.batch_size % world == 0,
               "optim.batch_size: the global batch must divide evenly over devices x nodes")

    def to_dict(self) -> dict:
        """The options as plain values (what ``config.yaml`` holds); the resolution is left out."""
        skip = ("options", "stages", "resolution")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        d = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        d.update({name: dataclasses.asdict(o) for name, o in self.stages.items()})
        d["options"] = dataclasses.asdict(self.options) if self.options is not None else {}
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


# The options a user names in short, declared once: each name is the command line's flag
# (``--batch-size``, ``cli.FIT_FLAGS``) and ``Clusterer``'s keyword parameter (``batch_size``,
# ``api.PARAMETERS``), and sets the field its dotted key names (tests/test_options.py checks that each
# names a declared field). A method's own flags are the fields of its Options declared with
# ``option(flag=HELP)`` (``methods.option_flags``); any other option is set by its dotted name (the
# command line's ``--set KEY=VALUE``, ``Clusterer(settings={KEY: VALUE})``).
SHORT_OPTIONS: dict[str, str] = {
    "method": "method", "n_clusters": "cluster.n_clusters",
    "data": "data.spec", "split": "data.split", "resize": "data.resize", "root": "data.root",
    "download": "data.download", "store": "data.store",
    "epochs": "train.epochs", "budget": "train.budget", "seed": "train.seed", "devices": "train.devices",
    "num_nodes": "train.num_nodes", "accelerator": "train.accelerator", "precision": "train.precision",
    "threads": "train.threads", "progress": "train.progress",
    "backbone": "net.backbone", "dim": "net.dim", "batch_size": "optim.batch_size", "lr": "optim.lr",
    "temperature": "memory.temperature", "nce_k": "memory.nce_k", "views": "views.preset",
    "cluster_head": "cluster.head", "cluster_features": "cluster.features",
    "out": "out",
}
SWITCH_OPTIONS = ("download", "progress")  # on the command line the switches --download and --no-progress
FLAG_ONLY_OPTIONS = ("out",)  # Clusterer fits in a temporary directory (save(path) writes a run)


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
    if tp in _SCALARS:
        return _SCALARS[tp](value, where)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported option type {_type_name(tp)}")


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _to_number(value: Any, where: str, tp: type) -> Any:
    """int or float from a number or a string; a bool is not a number, a float is an int only when whole."""
    what = "an integer" if tp is int else "a number"
    if not isinstance(value, bool):  # numbers.Integral / Real: numpy's scalars too (np.int64 from a grid)
        if isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real)
                                                   and (tp is float or float(value).is_integer())):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value.strip())
            except ValueError:
                pass
    raise ConfigError(f"{where}: expected {what}, got {value!r}")


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{where}: expected a string, got {value!r}")


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    bool: _to_bool, str: _to_str,
    int: lambda v, where: _to_number(v, where, int), float: lambda v, where: _to_number(v, where, float)}


def _build(cls: type, values: dict | None, where: str) -> Any:
    """Make dataclass ``cls`` from a dict, refusing unknown keys and coercing types."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("not_an_option")}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown option {prefix}{unknown[0]}; known: {', '.join(sorted(names - {'options'}))}"
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values or f.name in ("options", "stages", "resolution"):
            continue
        tp = hints[f.name]
        key = f"{where}.{f.name}" if where else f.name
        value = values[f.name]
        if f.metadata.get("auto") and isinstance(value, str) and value.strip().lower() == "auto":
            value = None
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, key)
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def merge_layers(*layers: dict | None) -> dict:
    """Configuration layers (nested dicts) merged key by key, later layers winning. Each layer is
    type-checked on its own first (:func:`check_layer`), so that a section or value of the wrong type
    is refused even where a later layer sets the same keys."""
    merged: dict = {}
    for layer in layers:
        check_layer(layer)
        merged = _merge(merged, layer or {})
    return merged


def check_layer(layer: dict | None) -> None:
    """ConfigError in one line for a layer that is not a mapping, a section that is not one
    (``train: 5``), an unknown key or a value that is not of its option's type. Ranges, the method's
    own options and the stages' sections (whose names and types the registry knows: a top-level
    mapping that is no section here) are checked once the layers are merged."""
    if layer is None:
        return
    if not isinstance(layer, dict):
        raise ConfigError(f"config: expected a mapping, got {layer!r}")
    options = layer.get("options")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"options: expected a mapping, got {options!r}")
    own = {f.name for f in dataclasses.fields(Config)}
    _build(Config, {k: v for k, v in layer.items() if k != "options" and (k in own or not isinstance(v, dict))}, "")


def preset_path(name: str) -> Path:
    return Path(__file__).parent / "configs" / f"{name}.yaml"


def read_yaml(path_or_preset: str) -> dict:
    """Read a YAML file, or a preset shipped with the package (``and-mnist`` etc.), as a mapping (an
    empty file is ``{}``). Anything else -- a missing path, a directory or other non-regular file, an
    unreadable, oversized (> 16 MiB), binary or non-UTF-8 file, a YAML syntax error, a top level that
    is not a mapping -- raises :class:`ConfigError` with one line."""
    path = Path(path_or_preset).expanduser()
    try:
        if not path.exists():
            preset = preset_path(path_or_preset)
            if preset.exists():
                path = preset
            else:
                raise ConfigError(f"config file not found: {path_or_preset}")
        if path.is_dir():
            raise ConfigError(f"config {path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config {path} is not a regular file")
        if path.stat().st_size > 16 << 20:
            raise ConfigError(f"config {path} is {path.stat().st_size} bytes, too large for a YAML config")
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}); "
                          "expected a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise ConfigError(f"cannot parse {path}: {first}") from None
    except RecursionError:
        raise ConfigError(f"cannot parse {path}: nested too deeply") from None
    data = {} if data is None else data
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


def config_from_dict(raw: dict, options_class: Callable[[str], type],
                     stage_options: dict[str, type] | None = None) -> Config:
    """The typed, validated Config of one merged layer (:func:`merge_layers`); ``options_class(name)``
    gives the method's ``Options`` dataclass (ConfigError for an unknown method), ``stage_options``
    each registered stage's ``Options`` by name (its YAML section)."""
    raw = dict(raw)
    options = raw.pop("options", None)
    sections = {name: raw.pop(name, None) for name in stage_options or {}}
    cfg = _build(Config, raw, "")
    stages = {name: _build(cls, sections[name], name) for name, cls in (stage_options or {}).items()}
    return validate(dataclasses.replace(cfg, options=_build(options_class(cfg.method), options, "options"),
                                        stages=stages))


def validate(cfg: Config) -> Config:
    """Every range and choice of every option, the method's included, in one place."""
    check_fields(cfg, "")
    return cfg
