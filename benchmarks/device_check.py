"""The accelerator path, checked where a GPU is lent (this project's CI and development machine have
none): every method fits and is scored on CUDA through Lightning Fabric (bf16-mixed, the library's
default there), and DCCM -- too slow on this 2-core CPU for the report data -- gets its report-data
rows measured on the GPU (their seconds are GPU seconds, not the CPU time the issue's goals name).

    python benchmarks/device_check.py --smoke                 # every method, 2 epochs, digits, CUDA
    python benchmarks/device_check.py --dccm mnist-test fashion-mnist cifar10-test   # Fashion: its test split

--smoke writes RESULTS/device-smoke.json: per method whether the fit finished on the GPU, its
seconds, ACC / NMI (2 epochs: a smoke test, not a result) and the error line when it failed.
--dccm runs benchmarks/accuracy.py for DCCM on each data set (dccm-cpu, 3 seeds, train.accelerator
cuda, tag gpu); the accuracy JSONs say they were measured on the GPU (their ``machine.gpu``).
Environment as every benchmark (DEEPCLUST_RESULTS_DIR, DEEPCLUST_SHARED_DATA for the .npz files,
DEEPCLUST_FASHION_MNIST_DIR for Fashion-MNIST's idx files). Without a GPU: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import NOT_TUNED, fail, results_dir, save_result

HERE = Path(__file__).resolve().parent
METHODS = ("instance", "and", "pad", "pcp", "deepcluster", "jule", "dccm")
DCCM_CHOSEN_ON = "digits (dccm-cpu: configs/dccm-cpu.yaml)"


def accuracy(argv: list[str], results: Path) -> tuple[int, str]:
    """benchmarks/accuracy.py in a child process (its own CUDA context), results under ``results``."""
    env = {**os.environ, "DEEPCLUST_RESULTS_DIR": str(results)}
    proc = subprocess.run([sys.executable, str(HERE / "accuracy.py"), *argv], env=env, capture_output=True,
                          text=True)
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode, (tail[-1] if tail else "")


def smoke() -> None:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="deepclust-smoke-"))  # the per-method JSONs stay out of RESULTS
    for method in METHODS:
        t0 = time.perf_counter()
        rc, last = accuracy(["--method", method, "--data", "digits", "--config", f"{method}-cpu", "--quick",
                             "--no-heads", "--chosen-on", "n/a (smoke)", "--set", "train.accelerator=cuda"], tmp)
        row = {"method": method, "ok": rc == 0, "seconds": round(time.perf_counter() - t0, 1)}
        path = tmp / f"accuracy-{method}-digits-quick.json"
        if rc == 0 and path.exists():
            run = json.loads(path.read_text())["runs"][0]
            row.update({k: run.get(k) for k in ("acc", "nmi", "train_seconds", "epochs")})
        else:
            row["error"] = last
        rows.append(row)
        print(json.dumps(row), flush=True)
    save_result("device-smoke", {"runs": rows, "passed": sum(r["ok"] for r in rows), "of": len(rows)},
                chosen_on=NOT_TUNED)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--dccm", nargs="*", default=[], metavar="DATA")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        fail("device_check.py needs a CUDA GPU; none is visible")
    results = results_dir()
    if args.smoke:
        smoke()
    for data in args.dccm:
        rc, last = accuracy(["--method", "dccm", "--data", data, "--split", "test" if data == "fashion-mnist" else "all",
                             "--config", "dccm-cpu", "--tag", "gpu", "--chosen-on", DCCM_CHOSEN_ON,
                             "--seeds", *map(str, args.seeds), "--set", "train.accelerator=cuda",
                             "--set", "train.progress=false"], results)
        print(json.dumps({"dccm": data, "rc": rc, "last": last[:300]}), flush=True)


if __name__ == "__main__":
    main()
