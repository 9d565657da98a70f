"""Shared helpers of the benchmark scripts: machine description, result saving, seed statistics."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Short names for the data sets the benchmarks use (the shared .npz files and Debian's Fashion-MNIST).
DATA_ALIASES = {
    "mnist-test": f"npz:{SHARED_DATA / 'mnist_test.npz'}",
    "usps": f"npz:{SHARED_DATA / 'usps.npz'}",
    "cifar10-test": f"npz:{SHARED_DATA / 'cifar10_test.npz'}",
}

sys.path.insert(0, str(ROOT / "src"))


def data_spec(name: str) -> str:
    return DATA_ALIASES.get(name, name)


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def mean_std(values: list[float]) -> dict[str, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {}
    return {"mean": round(statistics.fmean(vals), 4),
            "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0, "n": len(vals)}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def save_result(name: str, result: dict[str, Any]) -> Path:
    """Write benchmarks/results/NAME.json and print the result as the last line of output."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **result}
    path = RESULTS / f"{slug(name)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return path
