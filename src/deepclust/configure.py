"""A run's configuration with its method: the one builder the package, its command line, benchmarks
and tests call.

``config.py`` types and validates the shared sections and knows no method; here the method's name is
looked up in the registry (``methods.method_class``) for its ``Options``, once, while the layers are
built. The resume rules live here too: a resumed run keeps its own configuration, and only
:data:`RESUME_MAY_CHANGE` may be given again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config, config_from_dict, merge_layers, read_yaml
from .errors import ConfigError
from .methods import STAGES, method_class
from .rundir import read_run_config

RESUME_MAY_CHANGE = ("train.progress", "train.threads", "out")  # flags that --resume accepts


def options_class(method: str) -> type:
    """The ``Options`` dataclass of a registered method (ConfigError naming the known ones)."""
    return method_class(method).Options


def build_config(*layers: dict | None) -> Config:
    """Merge configuration layers (later wins), build the typed Config with the method's own options
    and validate every field."""
    return config_from_dict(merge_layers(*layers), options_class,
                            {name: cls.Options for name, cls in STAGES.items()})


def load_config(path: str | Path) -> Config:
    """The Config of a YAML file or a shipped preset's name."""
    return build_config(read_yaml(str(path)))


def run_config(run: Path, *overrides: dict | None) -> Config:
    """A run directory's own configuration (its ``config.yaml``), with ``overrides`` on top."""
    return build_config(read_run_config(run), *overrides)


def resume_request(given: dict, out: str | None = None) -> Config:
    """What a ``--resume`` command asks for before the run's own configuration is read: the run
    directory (``out`` when the flags name none) and the flags a resume may change."""
    out = given.get("out", out)
    if out is None:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    train = {k: v for k, v in given.get("train", {}).items() if f"train.{k}" in RESUME_MAY_CHANGE}
    return build_config({"out": out, "train": train})


def resume_config(out: Path, request: Config, given: dict | None = None) -> Config:
    """The configuration of the run in ``out``, with what ``request`` may change (progress, threads,
    the directory). A flag in ``given`` that contradicts the run is refused in one line."""
    run = read_run_config(out)
    asked = str((given or {}).get("method", run["method"])).strip().lower()
    if asked != run["method"]:  # named before its options are read as the other method's
        raise ConfigError(f"--resume continues the {run['method']} run in {out}, not a {asked} run; "
                          "drop --method or start a new run with another --out")
    run_cfg = build_config(run)
    changed = {k: v for k, v in _flatten(given or {}) if k not in RESUME_MAY_CHANGE}
    if changed:
        saved, wanted = run_cfg.to_dict(), build_config(run, given, {"out": str(out)}).to_dict()
        for key, value in changed.items():
            if _lookup(wanted, key) != _lookup(saved, key):
                raise ConfigError(f"--resume continues the run as it was configured: {key} is "
                                  f"{_lookup(saved, key)!r} there, not {value!r}; drop the flag or start a new run")
    train = dataclasses.replace(run_cfg.train, progress=request.train.progress,
                                threads=request.train.threads or run_cfg.train.threads)
    return dataclasses.replace(run_cfg, out=str(out), train=train)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
