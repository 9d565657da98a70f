"""The benchmark infrastructure (benchmarks/*.py): provenance, seed statistics, the machine lock,
required arguments, the README checks and generated prose. No training: fits are faked or refused.

``test_readme_prose_matches_results`` checks the real README.md against benchmarks/results/.
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
# report.py: tables, generated sentences, the prose check


def acc_result(method: str, data: str, accs: list[float], nmis: list[float], secs: list[float]) -> dict:
    runs = [{"seed": i, "acc": a, "nmi": n, "ari": 0.5, "train_seconds": s, "epochs": 40,
             "cluster_head": "spectral", "cluster_features": "backbone"}
            for i, (a, n, s) in enumerate(zip(accs, nmis, secs))]
    summary = {k: common.mean_std([r[k] for r in runs]) for k in ("acc", "nmi", "ari", "train_seconds")}
    return {"benchmark": f"accuracy-{method}-{data}", "method": method, "data": data, "split": "all",
            "seeds": list(range(len(runs))), "quick": False, "chosen_on": "digits,usps", "summary": summary,
            "runs": runs}


@pytest.fixture
def fake_results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    files = {
        # usps: ACC clearly ahead (0.960 vs 0.900, std 0.002 / 0.010); NMI a tie (0.900 vs 0.889, std 0.04)
        "accuracy-and-usps.json": acc_result("and", "usps", [0.9596, 0.9580, 0.9620], [0.86, 0.90, 0.94],
                                             [382.0, 232.0, 138.0]),
        "accuracy-instance-usps.json": acc_result("instance", "usps", [0.89, 0.90, 0.91], [0.859, 0.889, 0.919],
                                                  [120.0, 130.0, 145.0]),
        "accuracy-and-digits.json": acc_result("and", "digits", [0.70, 0.71, 0.72], [0.60, 0.61, 0.62],
                                               [5.0, 6.0, 7.0]),
    }
    for name, r in files.items():
        (d / name).write_text(json.dumps(r))
    heads = {"benchmark": "cluster_heads", "rows": [
        {"method": m, "data": data, "head": "kmeans", "features": "embedding", "acc": {"mean": a, "std": 0.01, "n": 3},
         "nmi": {"mean": 0.3, "std": 0.01, "n": 3}, "ari": {"mean": 0.2, "std": 0.01, "n": 3},
         "head_seconds": {"mean": 0.1, "std": 0.0, "n": 3}, "head_fraction_of_training": {"mean": f, "std": 0.0, "n": 3}}
        for m, data, a, f in (("and", "usps", 0.581, 0.002), ("instance", "usps", 0.6246, 0.003),
                              ("and", "digits", 0.340, 0.033))]}
    (d / "cluster_heads.json").write_text(json.dumps(heads))
    return d


README = """# project

Intro with 3.14 seconds that is not in the Results section.

## Results

Measured on 2 cores with k = 200 in 2026, torch 2.14.1, T = 0.07 (not measurements).

```bash
python benchmarks/accuracy.py --seeds 0 1 2   # 9.99 s inside a code block
```

{prose}

<!-- results:start (generated by benchmarks/report.py) -->
| 7.777 | 123 s |
<!-- results:end -->

## Layout

Not checked: 0.123.
"""


def problems(fake_results, prose: str) -> list[str]:
    return report.check_prose(README.replace("{prose}", prose), fake_results)


def test_prose_check_passes_figures_found_at_their_printed_precision(fake_results):
    ok = ("- On USPS AND reaches ACC 0.960 (also 0.96) and NMI 0.900 in 232 s (median; 138-382 s), "
          "`0.111` in code. On digits k-means on the embedding gives ACC 0.34 and costs 3.3% of training.")
    assert problems(fake_results, ok) == []


def test_prose_check_flags_figures_missing_from_the_results(fake_results):
    found = problems(fake_results, "- On USPS AND reaches ACC 0.961 in about 140 s, 2.5 minutes, 10x faster.")
    assert len(found) == 4, found
    assert any("'0.961'" in p for p in found) and any("'140 s'" in p for p in found)
    assert any("'2.5 minutes'" in p for p in found) and any("'10x'" in p for p in found)


def test_prose_check_reads_only_the_results_section_outside_code_and_generated_blocks(fake_results):
    assert problems(fake_results, "") == []  # 3.14, 9.99, 7.777, 123 s and 0.123 are all skipped


def test_prose_check_numbers_of_a_named_data_set_come_from_its_results(fake_results):
    assert problems(fake_results, "- On digits AND reaches ACC 0.71.") == []
    found = problems(fake_results, "- On digits AND reaches ACC 0.960.")  # a USPS figure
    assert len(found) == 1 and "results on digits" in found[0]


def test_prose_check_ranges_must_be_the_extremes_of_one_measure(fake_results):
    assert problems(fake_results, "- k-means on the embedding: ACC 0.34-0.62 everywhere.") == []
    assert problems(fake_results, "- On USPS k-means on the embedding gives ACC 0.58-0.62.") == []
    assert problems(fake_results, "- The head costs 0.2-3.3% of training time.") == []
    found = problems(fake_results, "- k-means on the embedding is the worst everywhere (ACC 0.34-0.43).")
    assert len(found) == 1 and "range '0.34-0.43'" in found[0]


def test_prose_check_a_difference_within_noise_must_be_called_a_tie(fake_results):
    found = problems(fake_results, "- AND is ahead on USPS (ACC 0.960 vs 0.900, NMI 0.900 vs 0.889).")
    assert len(found) == 1 and "'0.900 vs 0.889'" in found[0] and "tie" in found[0]
    assert problems(fake_results, "- On USPS: ACC 0.960 vs 0.900; NMI 0.900 vs 0.889 (a tie).") == []


def test_report_generates_tables_with_medians_and_sentences_with_ties(fake_results, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCLUST_RESULTS_DIR", str(fake_results))
    readme = tmp_path / "README.md"
    readme.write_text(README.replace("{prose}", "Hand-written prose."))
    report.main(["--readme", str(readme)])
    text = readme.read_text()
    assert text.index(report.PROSE_START) < text.index(report.START) < text.index("## Layout")
    assert "| usps | AND | digits,usps | 3 | 40 | spectral (backbone) | 0.960 ± 0.002 | 0.960 (0.958-0.962) |" in text
    assert "232.0 (138.0-382.0)" in text  # training seconds: median (min-max)
    prose = text[text.index(report.PROSE_START):text.index(report.PROSE_END)]
    assert "AND vs instance discrimination on usps (3 seeds): ACC 0.960 vs 0.900 (ahead), NMI 0.900 vs 0.889 (tie)" in prose
    assert "training 232 s vs 130 s (medians)" in prose
    assert "k-means on the embedding layer: ACC 0.340-0.625 over 3 (data, method) pairs" in prose
    report.main(["--readme", str(readme)])  # idempotent: the blocks are replaced, not added again
    assert readme.read_text() == text
    # every generated figure passes the check, as if it had been typed outside the block
    typed = text.replace(report.PROSE_START, "").replace(report.PROSE_END, "")
    assert report.check_prose(typed, fake_results) == []


def test_report_counts_the_papers_claims_against_and_and_the_mnist_goals():
    def loaded(r, data_name):
        return dict(r, tag="", data_name=data_name)

    results = [  # PAD ahead on digits, a tie on usps (within one std), mnist-test: ahead, ACC goal missed
        loaded(acc_result("pad", "digits", [0.90, 0.91, 0.92], [0.9] * 3, [10.0] * 3), "digits"),
        loaded(acc_result("and", "digits", [0.80, 0.81, 0.82], [0.8] * 3, [5.0] * 3), "digits"),
        loaded(acc_result("pad", "usps", [0.90, 0.95, 1.00], [0.9] * 3, [10.0] * 3), "usps"),
        loaded(acc_result("and", "usps", [0.89, 0.90, 0.91], [0.8] * 3, [5.0] * 3), "usps"),
        loaded(acc_result("pad", "mnist-test", [0.96, 0.965, 0.97], [0.95] * 3, [600.0, 700.0, 800.0]), "mnist-test"),
        loaded(acc_result("and", "mnist-test", [0.90, 0.90, 0.90], [0.9] * 3, [300.0] * 3), "mnist-test"),
    ]
    lines = report.goal_sentences(results)
    assert lines[0] == ("- PAD above AND (ACC, beyond one std) on 2 of the 3 data sets measured (digits, mnist-test); "
                        "the goal is three of four; not yet measured: fashion-mnist-test.")
    assert lines[1].startswith("- PAD on mnist-test: ACC 0.965, NMI 0.950, at most 800 s of training a seed (3 seeds)")
    assert lines[1].endswith("missed.") and len(lines) == 2  # no PCP result, no PCP sentence
    results[4] = loaded(acc_result("pad", "mnist-test", [0.98] * 3, [0.95] * 3, [600.0, 700.0, 901.0]), "mnist-test")
    assert report.goal_sentences(results)[1].endswith("missed.")  # one seed over 15 minutes
    results[4]["runs"][2]["train_seconds"] = 899.0
    results[4]["summary"]["train_seconds"] = common.mean_std([600.0, 700.0, 899.0])
    assert report.goal_sentences(results)[1].endswith("met.")
    typed = report.results_section("## Results\n\n" + "\n".join(report.goal_sentences(results)))
    problems = report.paragraph_problems(typed, [], [])  # no results at all: every measured figure is flagged
    assert any("0.980" in p for _, p in problems)
    assert not [p for _, p in problems if "0.97'" in p or "900" in p]  # but not the goals' thresholds


def test_report_judges_the_defaults_against_the_60_minute_goals():
    def budget(data, acc, nmi, train, head):
        r = dict(acc_result("pad", data, [acc], [nmi], [train]), tag="defaults-60m", data_name=data)
        r["runs"][0].update(head_seconds=head, knn_top1=0.8, n_images=70000, config={"net": {"backbone": "jule_cnn"}})
        r["summary"].update(head_seconds=common.mean_std([head]), knn_top1=common.mean_std([0.8]))
        return r

    pixels = dict(acc_result("kmeans-pixels", "fashion-mnist", [0.47, 0.48], [0.51, 0.51], [1.0, 1.0]),
                  tag="", data_name="fashion-mnist")
    results = [budget("fashion-mnist", 0.71, 0.69, 3000.0, 100.0), pixels]
    (line,) = report.budget_goal_sentences(results)
    assert line.startswith("- PAD from the defaults with a 60-minute budget on fashion-mnist (70000 images, 1 seed, "
                           "40 epochs of jule_cnn): ACC 0.710, NMI 0.690, kNN top-1 0.800; 3000 s of training")
    assert "goal ACC >= 0.7, NMI >= 0.7 within 3600 s: missed" in line  # NMI short of 0.70
    assert line.endswith("k-means on pixels on the same images: ACC 0.475, NMI 0.510.")
    results[0] = budget("fashion-mnist", 0.71, 0.71, 3550.0, 100.0)  # over the hour with its head
    assert "missed" in report.budget_goal_sentences(results)[0]
    results[0] = budget("cifar10-test", 0.52, 0.40, 3000.0, 100.0)
    assert "goal ACC >= 0.5 within 3600 s: met" in report.budget_goal_sentences(results)[0]
    results[0]["tag"] = ""  # an ordinary run is not judged against the budget goals
    assert report.budget_goal_sentences(results) == []


def test_readme_prose_matches_results():
    """Every figure in the README's hand-written Results prose is in benchmarks/results/."""
    found = report.check_prose((ROOT / "README.md").read_text(), BENCH / "results")
    assert not found, "README prose figures not in benchmarks/results/ (regenerate with " \
                      "`python benchmarks/report.py`, or fix the sentence):\n" + "\n".join(found)


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
