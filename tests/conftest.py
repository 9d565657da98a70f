import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_cli(*args: str, cwd=None, timeout: int = 300, env=None) -> subprocess.CompletedProcess:
    """Run `python -m deepclust ...` in a fresh process, as a user would."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "deepclust", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=e)


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> Path:
    """300 of scikit-learn's 8x8 digits, with labels and a train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d.target))[:300]
    images = np.round(d.images[idx] * 255 / 16).astype(np.uint8)
    split = (np.arange(300) >= 240).astype(np.int8)
    path = tmp_path_factory.mktemp("data") / "digits300.npz"
    np.savez(path, images=images, labels=d.target[idx].astype(np.int64), split=split)
    return path
