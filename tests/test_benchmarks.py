"""The benchmark infrastructure (benchmarks/*.py): provenance, seed statistics, the machine lock,
required arguments, and report.py's tables. No training: fits are faked or refused.

``test_the_generated_files_are_current`` checks the real README.md and docs/results.md against
benchmarks/results/ (``report.py --check``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402


@pytest.fixture
def private_dirs(tmp_path, monkeypatch):
    """Results and the machine lock in temporary directories (never the real ones)."""
    results, locks = tmp_path / "results", tmp_path / "locks"
    monkeypatch.setenv("DEEPCLUST_RESULTS_DIR", str(results))
    monkeypatch.setenv("DEEPCLUST_LOCK_DIR", str(locks))
    return results, locks


def run_script(script: str, *args: str, env_dirs=None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ)
    if env_dirs:
        env["DEEPCLUST_RESULTS_DIR"], env["DEEPCLUST_LOCK_DIR"] = map(str, env_dirs)
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


# ------------------------------------------------------------------------------------------------
# common.py


def test_mean_std_reports_median_and_range_beside_mean():
    s = common.mean_std([382.0, 232.0, 138.0, None])
    assert s["n"] == 3 and s["median"] == 232.0 and s["min"] == 138.0 and s["max"] == 382.0
    assert s["mean"] == pytest.approx(250.6667, abs=1e-4) and s["std"] == pytest.approx(123.1, abs=0.1)
    assert common.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "median": 0.5, "min": 0.5, "max": 0.5}
    assert common.mean_std([None]) == {}


def test_save_result_records_provenance_in_the_private_results_dir(private_dirs):
    results, _ = private_dirs
    path = common.save_result("unit-test", {"x": 1}, chosen_on="digits,usps")
    assert path.parent == results
    r = json.loads(path.read_text())
    assert r["chosen_on"] == "digits,usps" and r["x"] == 1
    assert isinstance(r["torch_threads"], int) and r["torch_threads"] >= 1
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert r["commit"] == (head.stdout.strip() or None)
    assert r["dirty"] in (True, False) if r["commit"] else r["dirty"] is None
    assert not (BENCH / "results" / "unit-test.json").exists()


def test_save_result_without_chosen_on_says_it_is_unrecorded(private_dirs):
    r = json.loads(common.save_result("unit-test-2", {}).read_text())
    assert r["chosen_on"] == common.UNRECORDED


# ------------------------------------------------------------------------------------------------
# accuracy.py: required --chosen-on, the lock, every seed's config


def test_accuracy_refuses_a_trained_method_without_chosen_on(tmp_path):
    p = run_script("accuracy.py", "--method", "and", "--data", "digits",
                   env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "--chosen-on" in p.stderr
    assert not (tmp_path / "r").exists()


def test_benchmark_refuses_to_start_while_a_fit_holds_the_machine(tmp_path, monkeypatch):
    from deepclust.locks import machine_activity

    monkeypatch.setenv("DEEPCLUST_LOCK_DIR", str(tmp_path / "l"))
    with machine_activity():  # what every fit holds, shared
        p = run_script("accuracy.py", "--method", "kmeans-pixels", "--data", "digits",
                       env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "refusing to start" in p.stderr
    assert not (tmp_path / "r").exists()


def test_accuracy_records_each_seeds_config_and_heads(private_dirs, monkeypatch):
    import accuracy
    import deepclust.inference as inference
    import deepclust.runs as runs

    def fake_fit(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text(cfg.to_yaml())
        seed = cfg.train.seed
        m = {"acc": 0.9 + seed / 100, "nmi": 0.8, "ari": 0.7, "train_seconds": 10.0 + seed, "epochs": 2}
        if seed == 0:  # a run that wrote its heads; the other seeds fall back to compare_heads
            m["heads"] = [{"head": "spectral", "features": "backbone", "acc": 0.9, "nmi": 0.8, "ari": 0.7,
                           "head_seconds": 0.1}]
        return m

    compared = []
    monkeypatch.setattr(runs, "fit_run", fake_fit)
    monkeypatch.setattr(inference, "compare_heads", lambda out: compared.append(out) or [{"head": "kmeans"}])
    accuracy.main(["--method", "instance", "--data", "digits", "--seeds", "0", "1", "2", "--epochs", "2",
                   "--chosen-on", "digits"])
    r = json.loads((private_dirs[0] / "accuracy-instance-digits.json").read_text())
    assert r["chosen_on"] == "digits" and "commit" in r and "torch_threads" in r
    assert [run["config"]["train"]["seed"] for run in r["runs"]] == [0, 1, 2]
    assert all(run["config"]["train"]["epochs"] == 2 for run in r["runs"])
    assert r["runs"][0]["heads"][0]["head"] == "spectral" and r["runs"][1]["heads"] == [{"head": "kmeans"}]
    assert len(compared) == 2
    assert r["summary"]["acc"]["median"] == pytest.approx(0.91) and r["summary"]["train_seconds"]["max"] == 12.0


def test_accuracy_k_auto_records_the_estimate_and_the_scores_at_the_classes_k(private_dirs, monkeypatch):
    """--k-auto: the run is not given K; each seed records the K it settled on (with its evidence and
    its distance from the 10 classes) and the same run re-scored at 10 (``evaluate_run``'s override)."""
    import accuracy
    import deepclust.inference as inference
    import deepclust.runs as runs

    given, evaluated = [], []

    def fake_fit(cfg):
        given.append(cfg.cluster.n_clusters)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text(cfg.to_yaml())
        k = 12 + cfg.train.seed
        return {"acc": 0.8, "n_clusters": k, "heads": [{"head": "graph"}], "resolution": {"n_clusters": {
            "k": k, "criterion": "modularity", "scores": {str(k): 0.7}, "runner_up": {"k": 10, "score": 0.69}}}}

    def fake_evaluate(out, overrides, write):
        evaluated.append(overrides)
        return {"acc": 0.9, "nmi": 0.85, "cluster_sizes": [100] * 9 + [200]}

    monkeypatch.setattr(runs, "fit_run", fake_fit)
    monkeypatch.setattr(inference, "evaluate_run", fake_evaluate)
    accuracy.main(["--method", "pad", "--data", "digits", "--seeds", "0", "1", "--k-auto", "--chosen-on", "digits"])
    r = json.loads((private_dirs[0] / "accuracy-pad-digits.json").read_text())
    assert given == [None, None] and evaluated == [{"cluster": {"n_clusters": 10}}] * 2
    assert [run["k_relative_error"] for run in r["runs"]] == [0.2, 0.3]
    assert r["summary"]["k_found"] == [12, 13] and r["summary"]["k_within_20pct"] == 1
    assert r["runs"][0]["at_classes"]["largest_over_share"] == pytest.approx(1.82)
    assert r["summary"]["acc_at_classes"]["mean"] == pytest.approx(0.9)


def test_accuracy_add_seeds_merges_runs_of_the_same_settings_and_refuses_the_rest(private_dirs, monkeypatch):
    """--add-seeds: the new seeds join the recorded ones (summary over all, each run its commit);
    a seed already there, or other settings, is refused and the recorded result stays as it was."""
    import accuracy
    import deepclust.runs as runs

    def fake_fit(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text(cfg.to_yaml())
        return {"acc": 0.5 + cfg.train.seed / 10, "nmi": 0.5, "epochs": cfg.train.epochs}

    monkeypatch.setattr(runs, "fit_run", fake_fit)
    base = ["--method", "instance", "--data", "digits", "--epochs", "2", "--chosen-on", "digits", "--no-heads"]
    accuracy.main([*base, "--seeds", "0"])
    path = private_dirs[0] / "accuracy-instance-digits.json"
    first = json.loads(path.read_text())
    accuracy.main([*base, "--seeds", "2", "1", "--add-seeds"])
    r = json.loads(path.read_text())
    assert r["seeds"] == [0, 1, 2] and [run["seed"] for run in r["runs"]] == [0, 1, 2]
    assert r["summary"]["acc"]["n"] == 3 and r["summary"]["acc"]["mean"] == pytest.approx(0.6)
    assert all(run["commit"] == first["commit"] for run in r["runs"])
    assert r["earlier_commands"] == [first["command"]]
    kept = path.read_text()
    with pytest.raises(SystemExit) as again:
        accuracy.main([*base, "--seeds", "1", "3", "--add-seeds"])
    assert again.value.code == 2 and path.read_text() == kept
    with pytest.raises(SystemExit) as other:
        accuracy.main([*base[:4], "--epochs", "3", *base[6:], "--seeds", "3", "--add-seeds"])
    assert other.value.code == 2 and path.read_text() == kept
    unmerged = json.loads((private_dirs[0] / "accuracy-instance-digits-unmerged.json").read_text())
    assert [run["seed"] for run in unmerged["runs"]] == [3]
    with pytest.raises(SystemExit):
        accuracy.main([*base[:2], "--data", "usps", *base[4:], "--seeds", "0", "--add-seeds"])


def test_dccm_schedules_add_seeds_merges_both_results_and_refuses_the_rest(private_dirs, monkeypatch):
    """dccm_schedules.py --add-seeds: each seed's block run and its per-mini-batch run at the block run's
    seconds join both results; a seed already there, or other settings, writes nothing."""
    import dccm_schedules

    asked = []

    def fake_run(spec, seed, settings, epochs, split):
        asked.append((seed, [s for s in settings if s.startswith("train.budget")]))
        budget = next((s.split("=")[1] for s in settings if s.startswith("train.budget")), None)
        block = [s for s in settings if s.startswith("options.block_size")]
        config = {"out": f"/tmp/run-{seed}", "train": {"seed": seed, "epochs": epochs, "budget": budget},
                  "options": {"block": block}}
        return {"seed": seed, "acc": 0.5 + seed / 10, "nmi": 0.5, "fit_seconds": 10.0 + seed, "config": config}, 10.0 + seed

    monkeypatch.setattr(dccm_schedules, "one_run", fake_run)
    base = ["--data", "digits", "--block-epochs", "1"]
    dccm_schedules.main([*base, "--seeds", "0"])
    paths = [private_dirs[0] / f"accuracy-dccm-digits-{s}-e1.json" for s in ("block", "minibatch-at-block")]
    first = [json.loads(p.read_text()) for p in paths]
    dccm_schedules.main([*base, "--seeds", "2", "1", "--add-seeds"])
    for path, before in zip(paths, first):
        r = json.loads(path.read_text())
        assert r["seeds"] == [0, 1, 2] and r["summary"]["acc"]["mean"] == pytest.approx(0.6)
        assert r["runs"][0]["commit"] == before["commit"] and r["earlier_commands"] == [before["command"]]
    assert asked[-2:] == [(1, []), (1, ["train.budget=11s"])]  # each seed's budget: its own block run's
    kept = [p.read_text() for p in paths]
    with pytest.raises(SystemExit) as again:
        dccm_schedules.main([*base, "--seeds", "1", "3", "--add-seeds"])
    assert again.value.code == 2
    monkeypatch.setattr(dccm_schedules, "BLOCK", [*dccm_schedules.BLOCK, "options.block_size=500"])
    with pytest.raises(SystemExit) as other:
        dccm_schedules.main([*base, "--seeds", "3", "--add-seeds"])
    assert other.value.code == 2 and [p.read_text() for p in paths] == kept
    with pytest.raises(SystemExit):
        dccm_schedules.main(["--data", "usps", "--block-epochs", "1", "--seeds", "0", "--add-seeds"])


def test_accuracy_scores_each_probe_asked_for_under_its_own_name(private_dirs, monkeypatch, tmp_path):
    import accuracy
    import deepclust.inference as inference
    import deepclust.runs as runs

    assert accuracy.probe_specs(None) == [] and accuracy.probe_specs([]) == [("linear", "embedding")]
    assert accuracy.probe_specs(["mlp:conv4", "mlp"]) == [("mlp", "conv4"), ("mlp", "embedding")]
    p = run_script("accuracy.py", "--method", "dccm", "--chosen-on", "digits", "--probe", "svm:fc",
                   env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--probe" in p.stderr, p.stderr

    def fake_fit(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text(cfg.to_yaml())
        return {"acc": 0.9, "nmi": 0.8, "train_seconds": 1.0, "heads": [{"head": "method"}]}

    asked = []
    monkeypatch.setattr(runs, "fit_run", fake_fit)
    monkeypatch.setattr(inference, "probe_run", lambda out, protocol, features, write: asked.append(
        (protocol, features, write)) or {"top1": {"conv4": 0.7, "fc": 0.6}[features]})
    accuracy.main(["--method", "dccm", "--data", "digits", "--seeds", "0", "1", "--epochs", "2", "--chosen-on", "digits",
                   "--tag", "probe", "--probe", "mlp:conv4", "mlp:fc"])
    r = json.loads((private_dirs[0] / "accuracy-dccm-digits-probe.json").read_text())
    assert asked == [("mlp", "conv4", False), ("mlp", "fc", False)] * 2
    assert [(x["mlp_top1_conv4"], x["mlp_top1_fc"]) for x in r["runs"]] == [(0.7, 0.6)] * 2
    assert r["summary"]["mlp_top1_conv4"]["mean"] == 0.7 and "linear_top1" not in r["summary"]


# ------------------------------------------------------------------------------------------------
# peers.py and throughput.py: argument checks (no training)


def test_peers_without_clustpy_says_so_in_one_line(monkeypatch, capsys):
    import peers

    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setitem(sys.modules, "clustpy", None)
    monkeypatch.setitem(sys.modules, "clustpy.deep", None)
    with pytest.raises(SystemExit) as e:
        peers.main(["--data", "usps"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ClustPy is not installed" in err[0]


def test_peers_needs_chosen_on_for_tuned_deepclust_settings(capsys):
    import peers

    with pytest.raises(SystemExit) as e:
        peers.parse_args(["--data", "usps", "--deepclust-config", "and-cpu"])
    assert e.value.code == 2 and "--chosen-on" in capsys.readouterr().err
    args = peers.parse_args(["--data", "usps"])
    assert args.chosen_on == common.LIBRARY_DEFAULTS and args.peers == ["n2d", "dec"]
    assert peers.N2D_MANIFOLD == {"n_components": 2}


def test_throughput_iterates_over_the_method_registry(capsys):
    import throughput
    from deepclust.methods import METHODS

    assert throughput.parse_args([]).methods == list(METHODS)
    with pytest.raises(SystemExit) as e:
        throughput.parse_args(["--methods", "no-such-method"])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_dccm_profile_prices_the_discriminators_products_at_the_steps_size(capsys):
    """dccm_profile.py's bound: the three products of T's second layer at pairs x positions rows (the
    batch's own pairs, at most 4 a row: own, nearest, two negatives), replacing T's measured parts."""
    import dccm_profile

    dccm_profile.main(["--data", "digits", "--batch-size", "16", "--steps", "1", "--clock", "wall",
                       "--set", "options.discriminator_width=32"])
    r = json.loads(capsys.readouterr().out)
    bound, med = r["discriminator_products"], r["median_ms"]
    positions = 16  # digits 8x8: jule_cnn's one conv, 4x4
    assert bound["width"] == 32 and bound["rows"] % positions == 0
    assert 16 * positions <= bound["rows"] <= 4 * 16 * positions
    assert bound["gflop"] == round(6 * bound["rows"] * 32 * 32 / 1e9, 1)
    expected = med["dccm_step"] - med["discriminator"] - med["discriminator_backward"] + bound["ms"]
    assert bound["step_ms_if_only_products"] == pytest.approx(expected, abs=0.11)


@pytest.mark.parametrize("preset,channels", [("digits", 1), ("natural", 3), ("dccm", 3)])
def test_plain_loop_views_are_torchvision_per_image_transforms(preset, channels):
    from PIL import Image
    from torchvision.transforms import v2

    import throughput
    from deepclust.views import VIEW_PRESETS

    spec = VIEW_PRESETS[preset]
    t = throughput.torchvision_views(spec, channels, (28, 28))
    kinds = {type(s) for s in t.transforms}
    assert (v2.RandomResizedCrop in kinds) == spec.crop
    assert (v2.RandomAffine in kinds) == (spec.rotation > 0 or spec.shift > 0)
    assert (v2.ColorJitter in kinds) == (spec.color_jitter > 0)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (28, 28) if channels == 1 else (28, 28, 3), dtype=np.uint8))
    data = throughput.PlainImages(np.asarray(img)[None], t, n_views=2)
    *views, idx = data[0]
    assert idx == 0 and len(views) == 2
    assert views[0].shape == (channels, 28, 28) and views[0].dtype.is_floating_point
    assert views[0].min() >= -1.0 - 1e-6 and views[0].max() <= 1.0 + 1e-6


def test_run_all_gives_every_trained_accuracy_run_its_chosen_on():
    text = (BENCH / "run_all.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BENCH / "run_all.sh")]).returncode == 0
    commands = text.replace("\\\n", " ").splitlines()  # one command per line, continuations joined
    calls = [line for line in commands if "accuracy.py" in line and not line.lstrip().startswith("#")]
    trained = [line for line in calls if "pixels" not in line and "--method $base" not in line]
    assert trained and all("--chosen-on" in line for line in trained)
    for script in ("throughput.py", "peers.py --data usps", "peers.py --data mnist-test",
                   "peers.py --data fashion-mnist", "report.py"):
        assert script in text


# ------------------------------------------------------------------------------------------------
# report.py: the README's headline table and docs/results.md, rendered from the results files


def acc_result(method: str, data: str, accs: list[float], nmis: list[float], secs: list[float],
               tag: str = "") -> dict:
    runs = [{"seed": i, "acc": a, "nmi": n, "ari": 0.5, "train_seconds": s, "epochs": 40, "n_images": 9298,
             "cluster_head": "spectral", "cluster_features": "backbone"}
            for i, (a, n, s) in enumerate(zip(accs, nmis, secs))]
    summary = {k: common.mean_std([r[k] for r in runs]) for k in ("acc", "nmi", "ari", "train_seconds")}
    return {"benchmark": f"accuracy-{method}-{data}" + (f"-{tag}" if tag else ""), "method": method, "data": data,
            "split": "all", "seeds": list(range(len(runs))), "quick": False, "chosen_on": "digits,usps",
            "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None, "torch": "2.x"}, "torch_threads": 2,
            "summary": summary, "runs": runs}


def peers_result(data: str) -> dict:
    def system(acc, secs, ratio=None):
        s = {"acc": common.mean_std([acc]), "nmi": common.mean_std([0.5]), "ari": common.mean_std([0.4]),
             "seconds": common.mean_std([secs])}
        return s | ({"seconds_ratio_to_deepclust": common.mean_std([ratio])} if ratio else {})

    return {"benchmark": f"peers-{data}", "data": data, "data_name": data, "n_images": 9298, "quick": False,
            "command": f"peers.py --data {data}", "clustpy": "0.0.3", "peer_settings": {"dec": {"epochs": 1}},
            "systems": {"deepclust (pad)": system(0.98, 446.0), "ClustPy DEC": system(0.68, 398.0, 0.89)}}


@pytest.fixture
def fake_results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    files = {
        "accuracy-and-usps": acc_result("and", "usps", [0.9596, 0.9580, 0.9620], [0.86, 0.90, 0.94],
                                        [382.0, 232.0, 138.0]),
        "accuracy-instance-usps": acc_result("instance", "usps", [0.89, 0.90, 0.91], [0.859, 0.889, 0.919],
                                             [120.0, 130.0, 145.0]),
        "accuracy-and-digits": acc_result("and", "digits", [0.70, 0.71, 0.72], [0.60, 0.61, 0.62], [5.0, 6.0, 7.0]),
        "accuracy-kmeans-pixels-usps": acc_result("kmeans-pixels", "usps", [0.66], [0.62], [0.7]),
        "accuracy-pad-usps-reproduce": acc_result("pad", "usps", [0.5], [0.5], [9.0], tag="reproduce"),
        "accuracy-pcp-usps": dict(acc_result("pcp", "usps", [0.1], [0.1], [1.0]), quick=True),  # a smoke run
        "peers-usps": peers_result("usps"),
    }
    for name, r in files.items():
        (d / f"{name}.json").write_text(json.dumps(r))
    return d


README = f"""# project

```bash
first command
```

## Results

{report.HEADLINE_START}
stale text
{report.HEADLINE_END}

## More
"""


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text``, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_headline_has_a_row_per_method_baseline_and_peer_and_no_bold(fake_results):
    results = report.load_results(fake_results)
    assert "accuracy-pcp-usps" not in results  # smoke runs are left out
    text = report.headline(results)
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["instance discrimination", "AND", "k-means on pixels", "deepclust (pad) ‡",
                                    "ClustPy DEC ‡"]  # PAD's only result is tagged (reproduce): not a headline
    assert text.splitlines()[0] == "| method | digits | usps | seeds |"
    assert rows[1] == ["AND", "0.710 / 0.610 (6.0 s)", "0.960 / 0.900 (232 s)", "3"]
    assert rows[2] == ["k-means on pixels", "-", "0.660 / 0.620 (0.70 s)", "1"]
    assert rows[4] == ["ClustPy DEC ‡", "-", "0.680 / 0.500 (398 s)", "1"]
    assert "Machine: Test CPU, 2 cores, no GPU, torch 2.x on 2 threads." in text
    assert "**" not in text


def test_results_md_lists_every_result_with_its_spread(fake_results):
    md = report.results_markdown(report.load_results(fake_results))
    assert md.count("\n## ") == len([t for t, _ in report.SECTIONS if f"## {t}\n" in md]) \
        and "## Summary" in md and "## Beside other libraries" in md
    assert "## Ablations" not in md  # a section with nothing to show is left out
    usps = md[md.index("### usps"):]
    row = next(r for r in table_rows(usps) if r[0] == "AND")
    assert row[4:7] == ["0.960 ± 0.002", "0.900 ± 0.040", "0.500 ± 0.000"]  # ACC, NMI, ARI: mean ± std
    assert row[9] == "232 (138-382)" and row[-1] == "`accuracy-and-usps`"  # train s median (min-max), the file
    assert any(r[0] == "PAD (reproduce)" for r in table_rows(usps))
    assert "**" not in md


def test_results_md_includes_the_papers_section_only_when_papers_py_imports(fake_results, monkeypatch):
    import types

    results = report.load_results(fake_results)
    monkeypatch.setitem(sys.modules, "papers", None)  # not importable
    assert "The papers' tables" not in report.results_markdown(results)
    seen = {}
    fake = types.ModuleType("papers")
    fake.tables = lambda r: seen.setdefault("stems", sorted(r)) and "| paper | ACC |\n|---|---|\n| X | 0.1 |"
    monkeypatch.setitem(sys.modules, "papers", fake)
    md = report.results_markdown(results)
    assert "## The papers' tables\n\n| paper | ACC |" in md and "[The papers' tables](#the-papers-tables)" in md
    assert seen["stems"] == sorted(results) and "accuracy-and-usps" in seen["stems"]  # file stem -> JSON


def test_report_writes_both_files_and_check_fails_once_a_result_changes(fake_results, tmp_path):
    readme, md = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    readme.write_text(README)
    md.parent.mkdir()
    args = ("--readme", str(readme), "--results-md", str(md))
    dirs = (fake_results, tmp_path / "locks")
    check = run_script("report.py", "--check", *args, env_dirs=dirs)
    assert check.returncode == 1 and len(check.stderr.strip().splitlines()) == 1 and "not current" in check.stderr
    assert run_script("report.py", *args, env_dirs=dirs).returncode == 0
    text = readme.read_text()
    assert "stale text" not in text and text.startswith("# project\n") and text.endswith("## More\n")
    assert "| AND | 0.710 / 0.610 (6.0 s) |" in text and md.read_text().startswith("# Results")
    assert "(docs/results.md#the-papers-tables)" in text  # issue 27: the README links the papers' tables
    assert run_script("report.py", *args, env_dirs=dirs).returncode == 0 and readme.read_text() == text  # idempotent
    assert run_script("report.py", "--check", *args, env_dirs=dirs).returncode == 0
    r = json.loads((fake_results / "accuracy-and-digits.json").read_text())
    r["summary"]["acc"]["mean"] = 0.75
    (fake_results / "accuracy-and-digits.json").write_text(json.dumps(r))
    check = run_script("report.py", "--check", *args, env_dirs=dirs)
    assert check.returncode == 1 and check.stderr.count("\n") == 1, check.stderr
    assert str(readme) in check.stderr and str(md) in check.stderr and "Traceback" not in check.stderr


def test_report_refuses_a_readme_without_its_markers_in_one_line(fake_results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nno markers\n")
    proc = run_script("report.py", "--readme", str(readme), "--results-md", str(tmp_path / "r.md"),
                      env_dirs=(fake_results, tmp_path / "locks"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "marker" in proc.stderr
    assert readme.read_text() == "# project\n\nno markers\n" and not (tmp_path / "r.md").exists()


# ------------------------------------------------------------------------------------------------
# The real README and docs/results.md


def test_the_generated_files_are_current(tmp_path):
    """README.md's headline table and docs/results.md are what report.py renders from benchmarks/results/."""
    proc = run_script("report.py", "--check", env_dirs=(BENCH / "results", tmp_path / "locks"))
    assert proc.returncode == 0, proc.stderr


def test_readme_is_a_short_guide_with_a_headline_row_per_method():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    commands = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    ci_test_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert commands == ["python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/deepclust fit "
                        "--method pad --data digits --budget 2m", ci_test_command]
    block = text[text.index(report.HEADLINE_START):text.index(report.HEADLINE_END)]
    labels = {r[0] for r in table_rows(block)}
    methods = {r["method"] for r in report.accuracy_runs(report.load_results(BENCH / "results")) if not r["tag"]}
    assert labels >= {report.show(m) for m in methods} and len(methods) >= 7
    assert "docs/results.md" in block and "docs/report-mnist-test.png" in text


def test_ablation_tables_set_real_options():
    """Every row of ablation.py's tables sets options its method declares (a renamed option would
    otherwise fail only hours into a benchmark)."""
    import dataclasses

    import ablation

    from deepclust.methods import method_class

    for table, rows in ablation.TABLES.items():
        for label, sets in rows:
            method = ablation.OTHER_METHOD.get(label, (ablation.METHOD_OF[table],))[0]
            fields = {f.name for f in dataclasses.fields(method_class(method).Options)}
            for item in sets:
                key = item.partition("=")[0]
                assert key.startswith("options.") and key.split(".", 1)[1] in fields, (table, item)


def test_heads_summary_averages_each_head_over_seeds():
    import accuracy

    runs = [{"heads": [{"head": "agglomerative", "features": "embedding", "acc": a, "nmi": n, "nmi_geometric": n}]}
            for a, n in ((0.9, 0.8), (0.7, 0.6))] + [{"heads": None}]
    out = accuracy.heads_summary(runs)
    assert list(out) == ["agglomerative/embedding"]
    assert out["agglomerative/embedding"]["acc"]["mean"] == pytest.approx(0.8)
    assert out["agglomerative/embedding"]["nmi_geometric"]["n"] == 2


# ------------------------------------------------------------------------------------------------
# budget_plan.py: arguments and the comparison (no training)


def test_budget_plan_refuses_a_bad_budget_in_one_line(tmp_path):
    p = run_script("budget_plan.py", "--data", "digits", "--budget", "soon", env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--budget" in p.stderr, p.stderr
    p = run_script("budget_plan.py", "--budget", "2m", env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2 and "--data" in p.stderr
    assert not (tmp_path / "r").exists()


def test_budget_plan_compares_the_plan_with_the_run():
    import budget_plan

    args = budget_plan.parse_args(["--data", "digits", "--budget", "2m", "--set", "method=and"])
    assert args.budget_seconds == 120 and budget_plan.fit_config(args, "/tmp/x").train.epochs is None
    plan = {"backbone": "jule_cnn", "epochs": 30, "total_epochs": 30, "before_seconds": 5.0, "calibration_seconds": 10.0,
            "estimated_seconds": 90.0, "finish_seconds": 4.0, "estimated_total_seconds": 109.0,
            "candidates": [{"backbone": "alexnet", "images_per_second": 10.0},
                           {"backbone": "jule_cnn", "images_per_second": 900.0, "steady_images_per_second": 800.0,
                            "first_discovery_seconds": 1.0, "discovery_seconds": 0.2, "estimated_seconds": 90.0}]}
    log = [{"epoch": 0, "images_per_second": 1000.0, "seconds": 2.0},
           {"epoch": 1, "images_per_second": 700.0, "seconds": 3.0, "discovery_seconds": 0.9},
           {"epoch": 2, "images_per_second": 900.0, "seconds": 2.5, "discovery_seconds": 0.3},
           {"epoch": 3, "images_per_second": 800.0, "seconds": 2.5, "discovery_seconds": 0.1}]
    r = budget_plan.compare(plan, {"train_seconds": 81.0, "epochs": 30}, log, wall=110.0, budget_seconds=120)
    assert r["planned"]["costs"] == {"images_per_second": 900.0, "steady_images_per_second": 800.0,
                                     "first_discovery_seconds": 1.0, "discovery_seconds": 0.2}
    costs = r["actual"]["costs"]
    assert (costs["images_per_second"], costs["steady_images_per_second"]) == (1000.0, 800.0)
    assert (costs["first_discovery_seconds"], costs["discovery_seconds"], costs["discoveries"]) == (0.9, 0.2, 3)
    assert costs["epoch_records_seconds"] == 10.0 and costs["checkpoint_and_log_seconds"] == 71.0
    assert r["actual"]["finish_seconds"] == 14.0  # 110 - 5 - 10 - 81
    assert r["ratios"] == {"training_actual_over_planned": 0.9, "wall_over_budget": 0.917}
    assert r["within_15pct"] == {"training": True, "wall": True}
    short = budget_plan.compare(plan, {"train_seconds": 28.0, "epochs": 30}, log, wall=60.0, budget_seconds=120)
    assert short["within_15pct"] == {"training": False, "wall": False}


def test_a_budgeted_accuracy_run_records_its_plan_and_the_report_sets_it_against_the_training():
    import accuracy

    assert accuracy.run_plan({"resolution": {"budget": {"ignored": "epochs given"}}}) is None
    assert accuracy.run_plan({}) is None
    plan = {"budget_seconds": 900.0, "backbone": "dccm_cnn", "total_epochs": 3, "estimated_seconds": 660.0,
            "candidates": [{"backbone": "dccm_cnn"}]}
    assert accuracy.run_plan({"resolution": {"budget": plan}}) == {
        "budget_seconds": 900.0, "backbone": "dccm_cnn", "total_epochs": 3, "estimated_seconds": 660.0}
    r = acc_result("dccm", "usps", [0.5, 0.6], [0.4, 0.5], [600.0, 700.0], tag="budget-15m")
    r["runs"][1]["planned"] = accuracy.run_plan({"resolution": {"budget": plan}})
    md = report.budget_section({"accuracy-dccm-usps-budget-15m": r})
    rows = table_rows(md[md.index("each seed's plan"):])
    assert rows == [["usps", "DCCM (budget-15m)", "1", "15.0m", "dccm_cnn", "3", "660", "700", "1.06", "0.78",
                     "`accuracy-dccm-usps-budget-15m`"]]  # seed 0 had no plan: no row
    assert report.budget_section({"accuracy-dccm-usps": acc_result("dccm", "usps", [0.5], [0.4], [9.0])}) == ""


def test_backbone_budget_arguments_and_verdict(tmp_path):
    import backbone_budget

    p = run_script("backbone_budget.py", "--budgets", "2m", "a while", env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--budgets" in p.stderr, p.stderr
    p = run_script("backbone_budget.py", "--data", "mnist", env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert p.returncode == 2 and "--data" in p.stderr  # development data only
    assert not (tmp_path / "r").exists()

    def row(budget, asked, chosen, nmi, seed):
        return {"budget": budget, "asked": asked, "backbone": chosen, "seed": seed, "nmi": nmi, "acc": nmi,
                "ari": nmi, "knn_top1": 0.9, "epochs": 20, "train_seconds": 100.0, "wall_seconds": 119.0}

    rows = [row("2m", "auto", "alexnet", 0.69, s) for s in (0, 1)] + \
        [row("2m", "alexnet", "alexnet", v, s) for s, v in ((0, 0.70), (1, 0.68))] + \
        [row("2m", "jule_cnn", "jule_cnn", v, s) for s, v in ((0, 0.88), (1, 0.86))]
    s = backbone_budget.summarise(rows)
    assert s["verdict"]["2m"] == {"best_by_nmi": "jule_cnn", "best_nmi": pytest.approx(0.87),
                                  "rule_chose": ["alexnet"], "rule_nmi": pytest.approx(0.69)}
    assert [t["backbone"] for t in s["table"]] == ["alexnet", "auto", "jule_cnn"]


def test_cluster_stage_subset_has_the_asked_ratio_and_keeps_order():
    import cluster_stage

    labels = np.repeat(np.arange(10), 180)[np.random.default_rng(1).permutation(1800)]
    keep = cluster_stage.imbalanced_indices(labels, 10.0)
    _, counts = np.unique(labels[keep], return_counts=True)
    assert counts[0] == 180 and counts[-1] == 18 and np.all(np.diff(counts) <= 0)
    assert np.all(np.diff(keep) > 0)
    assert len(cluster_stage.imbalanced_indices(labels, 1.0)) == 1800


def test_cluster_stage_summary_counts_empty_clusters_and_compares_with_spectral():
    import cluster_stage

    spectral = [{"head": "spectral", "features": "embedding", "acc": 0.8},
                {"head": "spectral", "features": "backbone", "acc": 0.7}]
    runs = {"agglomerative": [{"acc": 0.9, "nmi": 0.9, "ari": 0.8, "cluster_sizes": [5, 5, 3], "heads": spectral}],
            "scan": [{"acc": 0.6, "nmi": 0.5, "ari": 0.4, "cluster_sizes": [10, 3, 0],
                      "heads": [{"head": "spectral", "features": "embedding", "acc": 0.1}]}]}
    rows = cluster_stage.head_rows(runs, 3)
    assert rows["agglomerative"]["runs_with_empty_cluster"] == 0 and rows["agglomerative"]["smallest_cluster"] == 3
    assert rows["scan"]["runs_with_empty_cluster"] == 1 and rows["scan"]["smallest_cluster"] == 0
    assert rows["scan"]["acc_minus_spectral_embedding"] == pytest.approx(-0.2)  # the reference: runs without a stage
    assert rows["agglomerative"]["acc_minus_spectral_backbone"] == pytest.approx(0.2)


def test_cluster_stage_fits_each_head_through_accuracy_and_saves_the_summary(private_dirs, monkeypatch):
    import cluster_stage
    import deepclust.runs as runs

    heads = []

    def fake_fit(cfg):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "config.yaml").write_text(cfg.to_yaml())
        heads.append(cfg.cluster.head)
        return {"acc": 0.8, "nmi": 0.7, "ari": 0.6, "train_seconds": 1.0, "epochs": 1,
                "cluster_sizes": [3] * 10, "heads": [{"head": "spectral", "features": "embedding", "acc": 0.7}]}

    monkeypatch.setattr(runs, "fit_run", fake_fit)
    cluster_stage.main(["--data", "digits", "--ratio", "10", "--heads", "graph", "scan", "--seeds", "0", "--epochs", "1"])
    r = json.loads((private_dirs[0] / "cluster-stage-digits-r10.json").read_text())
    assert heads == ["graph", "scan"] and set(r["summary"]) == {"graph", "scan"}
    assert r["summary"]["graph"]["acc_minus_spectral_embedding"] == pytest.approx(0.1)


def test_cluster_stage_refuses_a_ratio_below_one(tmp_path):
    r = run_script("cluster_stage.py", "--ratio", "0.5", env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--ratio" in r.stderr


def test_weak_features_rows_score_each_head_and_both_guards():
    import weak_features

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 100)
    centres = rng.normal(0, 1, (4, 16))
    from deepclust.evaluate import cluster_acc
    from deepclust.heads import fit_head, graph_labels

    cases = [centres[y] + noise * rng.normal(0, 1, (400, 16)) for noise in (0.3, 2.5)]
    rows = [weak_features.case_row(x, y, 4) for x in cases]
    for x, r in zip(cases, rows):
        assert set(r) >= {"knn_top1", *weak_features.HEADS}
        assert r["agglomerative"]["acc"] == round(cluster_acc(y, fit_head(x, "agglomerative", 4).labels_), 4)
        gap = r["spectral"]["modularity"] - r["agglomerative_before"]["modularity"]
        assert r["graph_before"]["kept"] == ("spectral" if gap > 0.06 else "agglomerative_before")
        labels, note = graph_labels(x, 4, n_components=4)  # the row's choice is the library head's
        assert note["kept"] == r["graph"]["kept"] and note["silhouette"][note["kept"]] == r[note["kept"]]["silhouette"]
        assert r["graph"]["acc"] == round(cluster_acc(y, labels), 4)
    assert rows[0]["graph"]["acc"] == 1.0 and rows[0]["knn_top1"] > rows[1]["knn_top1"]
    assert rows[0]["kmeans"]["empty"] == 0 and rows[0]["spectral"]["largest_over_share"] == 1.0
    s = weak_features.summary(rows)
    better = sum(r["graph"]["acc"] == max(r["agglomerative"]["acc"], r["spectral"]["acc"]) for r in rows)
    assert s["rows"] == 2 and s["graph"]["acc"]["n"] == 2 and s["graph"]["kept_the_better_of_two"] == better >= 1
    sweep = weak_features.margin_sweep([{"agglomerative": {"acc": 0.9, "silhouette": 0.2},
                                         "spectral": {"acc": 0.5, "silhouette": 0.21}},
                                        {"agglomerative": {"acc": 0.2, "silhouette": 0.1},
                                         "spectral": {"acc": 0.6, "silhouette": 0.15}}])
    assert sweep["at_0"] == 1 and sweep["best_count"] == 2
    assert sweep["best_from"] == pytest.approx(0.01) and sweep["best_to"] == pytest.approx(0.0475)


def test_report_shows_each_weak_feature_case_before_and_after():
    def head(acc, share, empty=0, **more):
        return {"acc": acc, "nmi": acc, "largest_over_share": share, "empty": empty, **more}

    row = {"data": "usps", "features": "pixels+noise 1", "ratio": 10.0, "knn_top1": 0.6,
           "agglomerative_before": head(0.15, 9.3, modularity=0.06, silhouette=-0.1),
           "agglomerative": head(0.44, 2.6, modularity=0.4, silhouette=0.01),
           "spectral": head(0.52, 1.3, 1, modularity=0.54, silhouette=0.02), "kmeans": head(0.5, 1.2),
           "graph_before": {"kept": "spectral", **head(0.52, 1.3, 1)},
           "graph": {"kept": "spectral", "margin": 0.0, **head(0.52, 1.3, 1)}}
    summary = {h: {"acc": common.mean_std([row[h]["acc"]]), "largest_over_share_max": row[h]["largest_over_share"],
                   "kept_the_better_of_two": 1} for h in ("agglomerative_before", "agglomerative", "spectral",
                                                          "graph_before", "graph")}
    r = {"benchmark": "weak-features", "command": "weak_features.py", "rows": [row],
         "summary": {"rows": 1, **summary,
                     "silhouette_margins": {"at_0": 1, "best_count": 1, "of": 1, "best_from": 0.0, "best_to": 0.0075}}}
    text = report.weak_section({"weak-features": r})
    assert "| usps | pixels+noise 1 | 10:1 | 0.600 | 0.150 (9.3x) | 0.440 (2.6x) | 0.520 (1.3x, 1 empty) | 0.500 |" in text
    assert "| 0.010 / 0.020 | 0.520 | spectral 0.520 |" in text and "from 0 to 0.0075 would keep it in 1 of 1" in text


def test_weak_features_refuses_negative_noise(tmp_path):
    r = run_script("weak_features.py", "--noise", "-1", env_dirs=(tmp_path / "r", tmp_path / "l"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--noise" in r.stderr


def test_git_state_is_dirty_for_code_but_not_for_rewritten_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("tables\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert common.git_state(tmp_path)["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"acc": 1}')  # a queue rewrote a result
    (tmp_path / "README.md").write_text("regenerated tables\n")
    assert common.git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert common.git_state(tmp_path)["dirty"] is True


def test_report_k_auto_shows_the_largest_seed_and_each_seeds_distance_from_knn():
    """The K-auto table: the K of each seed, the mean and the worst seed's largest cluster over its
    share, and how far ACC at the classes' K falls below kNN top-1 (mean, and the worst seed)."""
    runs = [{"seed": s, "knn_top1": knn, "k_estimate": {"criterion": "modularity", "scores": {"11": 0.8},
                                                        "runner_up": {"k": 10, "score": 0.79}},
             "k_classes": 10, "at_classes": {"acc": acc}} for s, knn, acc in ((0, 0.9, 0.8), (1, 0.8, 0.75))]
    r = {"benchmark": "accuracy-pad-usps-k-auto-2m", "method": "pad", "data": "usps", "seeds": [0, 1], "runs": runs,
         "summary": {"k_found": [11, 9], "k_within_20pct": 2, "knn_top1": common.mean_std([0.9, 0.8]),
                     "acc_at_classes": common.mean_std([0.8, 0.75]),
                     "largest_over_share_at_classes": common.mean_std([1.5, 2.7])}}
    row = report.k_auto_section({"accuracy-pad-usps-k-auto-2m": r}).splitlines()[-1]
    assert "| 11, 9 | 10 | 2 of 2 |" in row and "| 2.10 (2.70) |" in row and "| 0.075 (0.100) |" in row
