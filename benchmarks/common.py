"""Shared helpers of the benchmark scripts: machine description, provenance, result saving, seed
statistics, the machine lock.

Environment:
  DEEPCLUST_RESULTS_DIR  where results are written and read (default benchmarks/results/); smoke runs
                         and tests point it at a temporary directory so the real results stay untouched.
  DEEPCLUST_SHARED_DATA  the folder of mnist_test.npz, usps.npz, cifar10_test.npz (default ../shared/data
                         beside the checkout; a GPU machine gets a copy elsewhere).
  DEEPCLUST_LOCK_DIR     where the machine-activity lock lives (deepclust.locks; default the system's
                         temporary directory).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DEEPCLUST_SHARED_DATA") or ROOT.parent / "shared" / "data")
NOT_TUNED = "n/a (no tuned settings)"
# What the library's own defaults (no preset) were chosen on: benchmarks/dev_choices.py's sweep.
LIBRARY_DEFAULTS = "digits,usps (the library's defaults: benchmarks/results/dev-choices-*.json)"
UNRECORDED = "not recorded (the script gave no chosen_on)"

# Short names for the data sets the benchmarks use (the shared .npz files and Debian's Fashion-MNIST).
DATA_ALIASES = {
    "mnist-test": f"npz:{SHARED_DATA / 'mnist_test.npz'}",
    "usps": f"npz:{SHARED_DATA / 'usps.npz'}",
    "cifar10-test": f"npz:{SHARED_DATA / 'cifar10_test.npz'}",
}

sys.path.insert(0, str(ROOT / "src"))


def memory_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory. VmHWM (Linux) starts afresh
    at exec; ru_maxrss would carry the parent's peak over into a spawned child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def results_dir() -> Path:
    """benchmarks/results/, or $DEEPCLUST_RESULTS_DIR when set."""
    env = os.environ.get("DEEPCLUST_RESULTS_DIR")
    return Path(env).expanduser() if env else ROOT / "benchmarks" / "results"


RESULTS = results_dir()  # as resolved at import (older scripts import the constant)


def data_spec(name: str) -> str:
    return DATA_ALIASES.get(name, name)


def class_count(spec: str, split: str = "all") -> int:
    """K of the clustering papers' protocol: the number of classes of the labelled data, given to
    every benchmark run explicitly (the library never reads K off labels: it estimates it)."""
    from deepclust.data import load_images

    labels = load_images(spec, split=split).labels
    if labels is None:
        fail(f"data '{spec}' has no labels: a benchmark needs them for K and the scores")
    return len(set(labels.tolist()))


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, then exit (2: bad input or a busy machine)."""
    prog = Path(sys.argv[0]).name or "benchmark"
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """The machine to this benchmark alone (deepclust.locks.exclusive_machine). A fit or another
    benchmark already running, or any other one-line deepclust error raised inside, ends the script
    with that line on stderr and exit status 2."""
    from deepclust.errors import DeepclustError
    from deepclust.locks import exclusive_machine

    try:
        with exclusive_machine(f"benchmark {name}"):
            yield
    except DeepclustError as e:
        fail(str(e))


def load_labelled(name: str, split: str = "all", limit: int | None = None):
    """The images named by a short name or spec (deepclust.data.load_images), the first ``limit``
    of them when given."""
    import numpy as np

    from deepclust.data import load_images

    images = load_images(data_spec(name), split=split)
    if limit is not None:
        if limit < 2:
            fail(f"--limit must be at least 2, got {limit}")
        images = images.subset(np.arange(min(limit, len(images))))
    return images


def budget_plan_of(metrics: dict) -> dict:
    """The time budget's plan a fit recorded (metrics.json's ``resolution.budget``); {} when the run
    was given its epochs."""
    return (metrics.get("resolution") or {}).get("budget") or {}


def resolved_config(out: str, cfg) -> dict:
    """A run's own config.yaml (everything resolved from the data), else the config it was given."""
    from deepclust.config import read_yaml

    path = Path(out) / "config.yaml"
    return read_yaml(str(path)) if path.exists() else cfg.to_dict()


def write_npz(images, path: Path) -> str:
    """Save an ImageSet as an npz file deepclust reads back bit for bit; returns its data spec."""
    import numpy as np

    arrays = {"images": images.images}
    if images.labels is not None:
        arrays["labels"] = images.labels
    if images.split is not None:
        arrays["split"] = images.split
    np.savez(path, **arrays)
    return f"npz:{path}"


def machine() -> dict[str, Any]:
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    except OSError:
        pass
    # the widest vector instructions, so that hosts of one name can be told apart: two "AMD EPYC" hosts
    # trained the same MNIST-test fit at 1,400 and 700 images/s; the slower reported AVX2 as its widest
    # (the other's flags were not recorded)
    simd = next((f for f in ("avx512f", "avx2", "avx") if f in flags), None)
    return {
        "cpu": cpu, "simd": simd, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """{"commit": HEAD's hash, "dirty": whether tracked files other than the results and Markdown
    differ from it}; None values when git or the repository is unavailable. benchmarks/results/ and
    *.md are left out: a queue of benchmarks rewrites recorded results and report.py the generated
    tables, which says nothing about the code that ran."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results", ":(exclude)*.md"))
    except (OSError, subprocess.SubprocessError):
        # a copy without .git (a lent GPU machine): the commit its sender named, if any
        return {"commit": os.environ.get("DEEPCLUST_COMMIT"), "dirty": None}
    return {"commit": commit, "dirty": dirty}


def mean_std(values: list[float]) -> dict[str, float]:
    """mean, std (sample), median, min, max and n of the non-None values ({} when there are none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {}
    return {"mean": round(statistics.fmean(vals), 4),
            "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0, "n": len(vals),
            "median": round(statistics.median(vals), 4), "min": round(min(vals), 4),
            "max": round(max(vals), 4)}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def provenance(chosen_on: str) -> dict[str, Any]:
    """What every result records about where it came from (see save_result)."""
    import torch

    return {**git_state(), "torch_threads": torch.get_num_threads(), "chosen_on": chosen_on}


def result_path(name: str) -> Path:
    """Where the result NAME is saved: RESULTS/NAME.json (the name made safe for a file)."""
    return results_dir() / f"{slug(name)}.json"


def save_result(name: str, result: dict[str, Any], chosen_on: str | None = None) -> Path:
    """Write RESULTS/NAME.json and print the result as the last line of output.

    Every result records its provenance at the top level: ``commit`` and ``dirty`` (git), torch's
    ``torch_threads`` and ``chosen_on``, the data the benchmark's settings were chosen on
    (``NOT_TUNED`` for benchmarks that tune nothing). ``chosen_on`` may also come in ``result``.
    """
    chosen = chosen_on or result.pop("chosen_on", None) or UNRECORDED
    path = result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **provenance(chosen),
              "machine": machine(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              **result}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result))
    return path
