"""Worker processes for the contract tests (``tests/test_contract.py``), run as

    python tests/_workers.py ddp  SPEC_JSON     # under RANK / WORLD_SIZE / MASTER_* set by the test
    python tests/_workers.py kill SPEC_JSON     # dies by SIGKILL in the middle of a run

SPEC_JSON: {"layers": {method: config layer}, "kill_epoch": e}. The ``kill`` worker is SIGKILLed
after epoch e's log record is appended and before epoch e's checkpoint is written: the window in
which a naive resume would duplicate log records.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def ddp(spec: dict) -> None:
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    for layer in spec["layers"].values():
        fit_run(build_config(layer))


def kill(spec: dict) -> None:
    from deepclust import train
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    original = train.Trainer._save_checkpoint

    def save_or_die(self, epoch, history):
        if epoch == spec["kill_epoch"]:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, epoch, history)

    train.Trainer._save_checkpoint = save_or_die
    for layer in spec["layers"].values():
        fit_run(build_config(layer))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    {"ddp": ddp, "kill": kill}[sys.argv[1]](json.loads(sys.argv[2]))
