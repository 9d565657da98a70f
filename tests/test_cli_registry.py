"""The command line's help and ``deepclust configs`` come from the registries, so they cannot go
stale: every registered method, head, backbone and preset is named, with the real defaults."""

import re

from conftest import run_cli
from deepclust.cli import CLUSTER_HEADS
from deepclust.config import BACKBONE_NAMES, Config, preset_path
from deepclust.configure import load_config
from deepclust.methods import METHODS


def _flag_help(text: str, flag: str) -> str:
    """The help text of one flag (argparse wraps it over several lines)."""
    m = re.search(rf"^  {re.escape(flag)} \S+\s+(.*?)(?=^  -|\Z)", text, re.S | re.M)
    assert m, f"{flag} not in the help"
    return " ".join(m.group(1).split())


def test_fit_help_names_every_method_and_the_default():
    r = run_cli("fit", "--help")
    assert r.returncode == 0
    method = _flag_help(r.stdout, "--method")
    assert method.replace(" | ", "|").split(" (default")[0].split("|") == list(METHODS)
    assert f"(default: {Config.method})" in method
    heads = _flag_help(r.stdout, "--cluster-head")
    assert all(h in heads for h in CLUSTER_HEADS)
    backbone = _flag_help(r.stdout, "--backbone")
    assert all(b in backbone for b in BACKBONE_NAMES) and "(default: auto)" in backbone
    assert "auto (default)" in _flag_help(r.stdout, "--n-clusters")


def test_configs_lists_every_preset_with_its_method_and_data():
    r = run_cli("configs")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    names = sorted(p.stem for p in preset_path("x").parent.glob("*.yaml"))
    assert len(lines) == len(names) and names
    for name, line in zip(names, lines):
        cfg = load_config(name)
        fields = line.split()
        assert fields[:3] == [name, cfg.method, cfg.data.spec], line
        assert len(" ".join(fields[3:])) > 10  # a summary from the preset's own comment


def test_evaluate_refuses_auto_in_one_line(tmp_path):
    r = run_cli("evaluate", "--run", str(tmp_path), "--n-clusters", "auto")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "takes a number" in r.stderr
