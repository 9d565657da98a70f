"""``deepclust`` command line.

    deepclust fit --method M --data SPEC [--epochs N] [--n-clusters K] [--backbone B]
                  [--batch-size B] [--config FILE] [--seed S] [--devices D] [--out DIR] ...
    deepclust evaluate --run DIR [--data SPEC] [--cluster-head H] [--cluster-features F] [--protocol P]
    deepclust predict --run DIR --data SPEC --out FILE.csv|FILE.npy
    deepclust report --run DIR [--out FILE.html]
    deepclust export --run DIR [--format csv|parquet] [--out FILE] [--weights FILE.safetensors]
    deepclust configs

Every option is parsed as text and converted and checked by ``deepclust.config`` (the one place
options are validated). User mistakes print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import export, inference, report
from .config import (BACKBONE_NAMES, POST_HOC_HEADS, SHORT_OPTIONS, SWITCH_OPTIONS, VIEW_PRESET_NAMES, Config,
                     merge_layers, preset_path, read_yaml, set_dotted)
from .configure import build_config, load_config, resume_request
from .data import DATASET_NAMES, SPLITS
from .durations import entry_started
from .errors import ConfigError, DataError, DeepclustError
from .io import save_array, save_text
from .methods import METHODS, STAGES, option_flags
from .rundir import check_output
from .runs import fit_run, resume_run

CLUSTER_HEADS = (*POST_HOC_HEADS, *STAGES)  # --cluster-head: a head fitted on the features, or a stage

OUT_ENV = "DEEPCLUST_RUN_OUT"  # lets DDP child processes (re-launched by Fabric) share the run dir

# flag (its dest) -> dotted config key: the shared short names (config.SHORT_OPTIONS; download and
# progress are the switches --download and --no-progress) and the methods' own (methods.option_flags)
FIT_FLAGS = {**{name: key for name, key in SHORT_OPTIONS.items() if name not in SWITCH_OPTIONS},
             **{name: key for name, (key, _) in option_flags().items()}}
EVAL_FLAGS = {name: SHORT_OPTIONS[name] for name in ("n_clusters", "cluster_head", "resize", "cluster_features",
                                                     "split")}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (no usage dump) and exits 2, and records its
    option strings (``flags``) and those that take a value (``value_flags``, for :func:`dash_values`)."""

    def __init__(self, *args, **kwargs):
        self.flags: set[str] = set()
        self.value_flags: set[str] = set()
        self.commands = None  # the subparsers action, once added
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags.update(action.option_strings)
        if action.option_strings and action.nargs is None:
            self.value_flags.update(action.option_strings)
        return action

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def all_flags(self) -> tuple[set[str], set[str]]:
        """(flags, value_flags) of this parser and of every command's."""
        parsers = [self, *(self.commands.choices.values() if self.commands is not None else ())]
        return set().union(*(p.flags for p in parsers)), set().union(*(p.value_flags for p in parsers))

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"deepclust: error: {message}\n")


def dash_values(argv: list[str], flags: set[str], value_flags: set[str]) -> list[str]:
    """``--flag -x`` as ``--flag=-x`` for the options that take a value (an unambiguous abbreviation
    too), so that a value starting with '-' (``--budget -5m``, ``--seed -1``) reaches the one validator
    instead of argparse's "expected one argument". A next word that is an option itself
    (``--out --overwrite``, ``--out -h``) is left to argparse."""
    out, i = [], 0
    while i < len(argv):
        word, value = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if word == "--":
            return out + argv[i:]
        named = [f for f in flags if f.startswith(word)] if word.startswith("--") and "=" not in word else []
        option = word if word in flags else named[0] if len(named) == 1 else None
        if (option in value_flags and value is not None and value.startswith("-") and not value.startswith("--")
                and value not in flags):
            out.append(f"{word}={value}")
            i += 2
        else:
            out.append(word)
            i += 1
    return out


def _choices(names, default: str | None = None) -> str:
    """``a | b | c (default: a)`` from a registry, so that the help cannot go stale."""
    return " | ".join(names) + (f" (default: {default})" if default is not None else "")


def _parser() -> _Parser:
    p = _Parser(prog="deepclust", description="Unsupervised deep image clustering.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    f = sub.add_parser("fit", help="train a method on images, cluster them, write a run directory")
    f.add_argument("--method", help=f"{' | '.join(METHODS)} (default: {Config.method})")
    f.add_argument("--data", help=_choices(DATASET_NAMES, Config().data.spec) + " | a folder or .npz path")
    f.add_argument("--split", help=_choices(SPLITS, Config().data.split) + ", as in the clustering papers")
    f.add_argument("--download", action="store_true", help="download torchvision datasets (needs internet)")
    f.add_argument("--resize", help="resize every image to SIDE x SIDE (for folders of mixed sizes)")
    f.add_argument("--root", help="dataset cache directory (default ~/.cache/deepclust)")
    f.add_argument("--store", help="directory of the image store a run streams from when its images do not fit "
                                   "in memory (written once, reused while the data is unchanged; "
                                   "default ROOT/stores/NAME)")
    f.add_argument("--epochs", help="training epochs (AND: epochs per round; default: fitted to --budget)")
    f.add_argument("--budget", help="time budget when --epochs is not given, e.g. 10m, 90s, 1h30m (default 10m): "
                                    "epochs and an auto backbone are chosen by measuring this machine")
    for name, (_, text) in option_flags().items():  # a method's own (its Options fields declared as flags)
        f.add_argument(f"--{name.replace('_', '-')}", help=text)
    f.add_argument("--n-clusters", help="number of clusters K, or auto (default): estimated from the images "
                                        "without labels, the run says which K and why")
    f.add_argument("--cluster-head", help=_choices(CLUSTER_HEADS, Config().cluster.head))
    f.add_argument("--cluster-features", help="auto | backbone | embedding | LAYER")
    f.add_argument("--backbone", help=_choices(BACKBONE_NAMES, Config().net.backbone))
    f.add_argument("--dim", help="embedding dimension (default 128)")
    f.add_argument("--views", help="augmentation preset: " + _choices(VIEW_PRESET_NAMES, Config().views.preset))
    f.add_argument("--batch-size", help="global batch size (default 128)")
    f.add_argument("--lr", help="learning rate")
    f.add_argument("--temperature", help="softmax temperature of the memory bank (default 0.1)")
    f.add_argument("--nce-k", help="NCE noise samples (0: full softmax)")
    f.add_argument("--config", help="YAML file (e.g. a run's config.yaml) or a shipped preset name "
                                    "(deepclust configs lists them)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any option by its dotted name, e.g. --set optim.weight_decay=1e-4")
    f.add_argument("--seed", help="random seed (a CPU run is repeatable for a seed)")
    f.add_argument("--devices", help="number of devices (processes) to train on")
    f.add_argument("--num-nodes", help="number of nodes")
    f.add_argument("--accelerator", help="auto | cpu | cuda | gpu | mps")
    f.add_argument("--precision", help="auto | 32-true | bf16-mixed | 16-mixed")
    f.add_argument("--threads", help="CPU threads for torch (0: default)")
    f.add_argument("--out", help="run directory (default runs/METHOD-DATA-TIME)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    f.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="recompute the metrics of a finished run")
    e.add_argument("--run", required=True, help="run directory written by fit")
    e.add_argument("--data", help="evaluate on other data (default: the run's)")
    e.add_argument("--split", help=_choices(SPLITS))
    e.add_argument("--resize", help="resize every image to SIDE x SIDE (to the run's image size)")
    e.add_argument("--n-clusters", help="number of clusters K (default: the run's)")
    e.add_argument("--cluster-head", help=_choices(CLUSTER_HEADS))
    e.add_argument("--cluster-features", help="auto | backbone | embedding | LAYER")
    e.add_argument("--protocol", default="clusters",
                   help="clusters (re-cluster and score, default) | knn | linear | mlp: a representation "
                        "protocol on the run's saved embeddings (linear / mlp: the data's train/test split, "
                        "else stratified 5-fold; mlp: one hidden layer of 200 units, DCCM's)")
    e.add_argument("--features", help="what --protocol knn|linear|mlp reads: embedding (the saved embeddings, "
                                      "default) or a layer of the network, e.g. conv5 (AND / PAD / PCP's probe)")
    pr = sub.add_parser("predict", help="assign new images to the clusters of a finished run")
    pr.add_argument("--run", required=True, help="run directory written by fit")
    pr.add_argument("--data", required=True, help="the images to assign (same size and channels as the run's; "
                                                  "see --resize)")
    pr.add_argument("--split", default="all", help=_choices(SPLITS, "all"))
    pr.add_argument("--resize", help="resize every image to SIDE x SIDE (to the run's image size)")
    pr.add_argument("--out", required=True, help="output file: .csv (name,cluster) or .npy (int64 clusters)")
    rc = sub.add_parser("recut", help="a finished run's clusters at another K, cut from the cluster tree it kept "
                                      "(no training, no network: seconds)")
    rc.add_argument("--run", required=True, help="run directory written by fit")
    rc.add_argument("--n-clusters", required=True, help="K: from 1 to the tree's leaves (below the run's K its "
                                                        "clusters joined, above it their parts)")
    rc.add_argument("--out", required=True, help="output file: .csv (index,cluster; rows in the run's order) "
                                                 "or .npy (int64 clusters)")
    _report_export_parsers(sub)
    sub.add_parser("configs", help="list the shipped presets (for --config), a line each")
    return p


def _report_export_parsers(sub) -> None:
    r = sub.add_parser("report", help="one self-contained HTML page to look at a run's clusters")
    r.add_argument("--run", required=True, help="run directory written by fit")
    r.add_argument("--out", help="HTML file to write (default RUN/report.html)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    x = sub.add_parser("export", help="a run's clusters as a table, and its backbone as weights")
    x.add_argument("--run", required=True, help="run directory written by fit")
    x.add_argument("--format", default="csv", help="csv | parquet: one row per image (name or index, cluster, "
                                                    "confidence = kNN-vote share, embedding) (default csv)")
    x.add_argument("--out", help="table file to write (default RUN/clusters.FORMAT)")
    x.add_argument("--weights", help="also write the backbone as a safetensors state dict (torchvision's "
                                     "names for resnet18 / resnet50 and the ImageNet-size alexnet)")


def _layer_from_flags(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    layer: dict = {}
    for name, key in flags.items():
        value = getattr(args, name, None)
        if value is not None:
            set_dotted(layer, key, value)
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        set_dotted(layer, key.strip(), value.strip())
    return layer


def _default_out(method: str, data: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data.split(":", 1)[-1].split(",")[0]).stem or data)
    return str(Path("runs") / f"{method}-{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_fit(args: argparse.Namespace) -> int:
    layer = _layer_from_flags(args, FIT_FLAGS)
    if args.download:  # the switches of SWITCH_OPTIONS
        set_dotted(layer, SHORT_OPTIONS["download"], True)
    if args.no_progress:
        set_dotted(layer, SHORT_OPTIONS["progress"], False)
    given = merge_layers(read_yaml(args.config) if args.config else None, layer)
    if args.resume:  # the run's own configuration wins; fit_run refuses flags that contradict it
        cfg = resume_request(given, out=os.environ.get(OUT_ENV))
    else:
        cfg = build_config(given)
        if args.out is None:
            cfg = dataclasses.replace(cfg, out=os.environ.get(OUT_ENV) or _default_out(cfg.method, cfg.data.spec))
    os.environ[OUT_ENV] = cfg.out
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    metrics = (resume_run(cfg, given=given, started=args.started) if args.resume
               else fit_run(cfg, overwrite=args.overwrite, started=args.started))
    if metrics:
        print(json.dumps(metrics | {"out": cfg.out}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    overrides = _layer_from_flags(args, EVAL_FLAGS)
    if args.protocol != "clusters":
        if overrides or args.data:
            raise ConfigError(f"--protocol {args.protocol} reads the run's own images; --data, --split, "
                              "--resize and the cluster flags belong to --protocol clusters")
        metrics = inference.probe_run(args.run, args.protocol, features=args.features or "embedding")
        print(json.dumps(metrics, indent=2))
        return 0
    if args.features:
        raise ConfigError("--features belongs to --protocol knn|linear|mlp; use --cluster-features to cluster a layer")
    if str(args.n_clusters).strip().lower() == "auto":
        raise ConfigError("evaluate --n-clusters takes a number; K = auto is estimated when a run is fitted")
    metrics = inference.evaluate_run(args.run, data=args.data, overrides=overrides)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    out = _clusters_out(args.out, args.run, data=args.data)
    clusters, images = inference.predict_run(args.run, args.data, split=args.split, resize=args.resize)
    _write_clusters(out, clusters, images.names or [str(i) for i in range(len(images))], "name")
    sizes = np.bincount(clusters).tolist()
    print(json.dumps({"n_images": len(clusters), "cluster_sizes": sizes, "out": str(out)}))
    return 0


def cmd_recut(args: argparse.Namespace) -> int:
    out = _clusters_out(args.out, args.run)
    try:
        k = int(str(args.n_clusters).strip())
    except ValueError:
        raise ConfigError(f"--n-clusters takes a whole number, got '{args.n_clusters}'") from None
    clusters, summary = inference.recut_run(args.run, k)
    _write_clusters(out, clusters, [str(i) for i in range(len(clusters))], "index")
    print(json.dumps({**summary, "out": str(out)}))
    return 0


def _clusters_out(out: str, run: str, data: str | None = None) -> Path:
    """The table of clusters ``--out`` names, checked: .csv or .npy, in a directory that exists, and
    none of the run's own files nor its data (``rundir.check_output``)."""
    path = Path(out)
    if path.suffix not in (".csv", ".npy"):
        raise DataError(f"--out must end in .csv or .npy, got {path}")
    if not path.parent.exists():
        raise DataError(f"no such directory: {path.parent}")
    check_output(path, run, data=data)
    return path


def _write_clusters(out: Path, clusters: np.ndarray, names: list[str], column: str) -> None:
    """``clusters`` as .npy (int64) or as CSV rows (``column``, cluster) named by ``names``."""
    if out.suffix == ".npy":
        save_array(out, clusters.astype(np.int64))
        return
    # RFC 4180 (CRLF rows, so fields holding \r or \n are quoted too): any name reads back intact;
    # file names that are not valid UTF-8 (surrogate-escaped by Python) get \xNN escapes
    names = [n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in names]
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow([column, "cluster"])
    writer.writerows(zip(names, clusters.tolist()))
    save_text(out, buf.getvalue())


def cmd_report(args: argparse.Namespace) -> int:
    out = report.write_report(args.run, args.out, progress=not args.no_progress)
    print(json.dumps({"report": str(out)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.weights:  # refused before the table is written
        check_output(args.weights, args.run, flag="--weights")
    done: dict = {"table": str(export.export_table(args.run, args.format, args.out))}
    if args.weights:
        path, meta = export.export_weights(args.run, args.weights)
        done["weights"] = str(path)
        print(f"deepclust: {meta['note']}", file=sys.stderr)
    print(json.dumps(done))
    return 0


def preset_summary(name: str) -> tuple[str, str, str]:
    """(method, data, summary) of a shipped preset: the method and data it runs (its configuration
    built as ``--config NAME`` would) and the first sentence of its leading comment."""
    cfg = load_config(name)
    comment = []
    for line in preset_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    end = text.find(". ")
    sentence = text if end < 0 else text[:end + 1]
    return cfg.method, cfg.data.spec, sentence if len(sentence) <= 100 else sentence[:97] + "..."


def cmd_configs(args: argparse.Namespace) -> int:
    names = sorted(p.stem for p in preset_path("x").parent.glob("*.yaml"))
    rows = [(name, *preset_summary(name)) for name in names]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[3])
    return 0


def main(argv: list[str] | None = None) -> int:
    # a command's budget counts from deepclust's first line; a call with argv (in-process) from now
    started = entry_started() if argv is None else time.perf_counter()
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(dash_values(argv, *parser.all_flags()))
    if args.command is None:
        parser.print_help()
        return 2
    args.started = started
    warnings.filterwarnings("ignore", module="lightning")
    try:
        commands = {"fit": cmd_fit, "evaluate": cmd_evaluate, "predict": cmd_predict, "recut": cmd_recut,
                    "report": cmd_report, "export": cmd_export, "configs": cmd_configs}
        return commands[args.command](args)
    except DeepclustError as e:
        print(f"deepclust: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"deepclust: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deepclust: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
