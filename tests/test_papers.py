"""benchmarks/papers.py: each paper's claims against the recorded results. The verdict logic on
crafted results: >= 3 seeds and the claimed direction beyond one standard deviation, else tie, the
reverse, or not measured; figures only from the results given, never invented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import papers  # noqa: E402
from papers import CLAIMS, DEPARTURES, Source, Stats, measure, tables, verdict  # noqa: E402


def accuracy_result(method, data, knn, seeds=3, **extra):
    """An accuracy-METHOD-DATA result whose runs have the kNN top-1 values ``knn`` (mean +- spread)."""
    mean, spread = knn
    values = [mean - spread, mean, mean + spread][:seeds] if seeds <= 3 else [mean] * seeds
    runs = [{"seed": i, "knn_top1": v, "heads": [{"head": "method", "features": "backbone", "acc": v / 2}],
             "config": {"net": {"backbone": "jule_cnn"}, "options": {}}} for i, v in enumerate(values)]
    import statistics

    summary = {"knn_top1": {"mean": statistics.fmean(values), "n": len(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}}
    return {"benchmark": f"accuracy-{method}-{data}", "method": method, "data": data, "split": "all",
            "commit": "abcdef1234", "command": f"accuracy.py --config {method}-cpu", "summary": summary,
            "runs": runs, **extra}


def test_verdict_rule():
    three = lambda m, s: Stats(m, s, 3)  # noqa: E731
    assert verdict(three(0.90, 0.01), three(0.85, 0.02))[0] == "reproduced"  # +0.05 > 0.02
    assert verdict(three(0.90, 0.01), three(0.89, 0.02))[0] == "tie"  # +0.01 within 0.02
    assert verdict(three(0.85, 0.01), three(0.90, 0.02))[0] == "not reproduced"  # reversed beyond 0.02
    assert verdict(three(0.90, 0.03), three(0.88, 0.01))[0] == "tie"  # the larger std counts
    assert verdict(Stats(0.99, 0.0, 2), three(0.5, 0.0)) == ("not measured", "2 seed(s); a verdict needs 3")
    assert verdict(None, three(0.5, 0.0))[0] == "not measured"


def test_measure_reads_summaries_runs_heads_and_ablation_rows():
    results = {"accuracy-pcp-digits": accuracy_result("pcp", "digits", (0.9, 0.01)),
               "ablation-x": {"rows": [{"variant": "on", "summary": {"knn_top1": {"mean": 0.7, "std": 0.1, "n": 3}}},
                                       {"variant": "off", "runs": [{"knn_top1": 0.5}, {"knn_top1": 0.7}]}]}}
    knn = measure(results, Source("accuracy-pcp-digits", "knn_top1"))
    assert (knn.mean, knn.std, knn.n) == (pytest.approx(0.9), pytest.approx(0.01), 3)
    heads = measure(results, Source("accuracy-pcp-digits", "method/backbone:acc"))
    assert heads.mean == pytest.approx(0.45) and heads.n == 3
    assert measure(results, Source("accuracy-pcp-digits", "method/embedding:acc")) is None  # no such head
    assert measure(results, Source("ablation-x", "knn_top1", "on")) == Stats(0.7, 0.1, 3)
    off = measure(results, Source("ablation-x", "knn_top1", "off"))
    assert off.mean == pytest.approx(0.6) and off.n == 2
    assert measure(results, Source("ablation-x", "knn_top1", "missing")) is None
    assert measure(results, Source("accuracy-pcp-usps", "knn_top1")) is None
    results["accuracy-pcp-digits"]["quick"] = True  # a smoke run measures nothing
    assert measure(results, Source("accuracy-pcp-digits", "knn_top1")) is None


def _rows(markdown: str, paper: str, figure: str) -> list[list[str]]:
    section = markdown.split(f"### {paper}")[1].split("### ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and figure in line]


def test_tables_give_each_claim_its_verdict_from_the_results_alone():
    results = {
        "accuracy-pcp-digits": accuracy_result("pcp", "digits", (0.95, 0.005)),  # beyond: reproduced
        "accuracy-and-digits": accuracy_result("and", "digits", (0.90, 0.01)),
        "accuracy-pcp-usps": accuracy_result("pcp", "usps", (0.905, 0.01)),  # within: tie
        "accuracy-and-usps": accuracy_result("and", "usps", (0.90, 0.01)),
        "accuracy-pcp-mnist-test": accuracy_result("pcp", "mnist-test", (0.80, 0.01)),  # reversed
        "accuracy-and-mnist-test": accuracy_result("and", "mnist-test", (0.90, 0.01)),
        "accuracy-pcp-fashion-mnist-test": accuracy_result("pcp", "fashion-mnist-test", (0.99, 0.0), seeds=2),
        "accuracy-and-fashion-mnist-test": accuracy_result("and", "fashion-mnist-test", (0.50, 0.0)),
    }
    md = tables(results)
    assert md.count("### ") == 7 == len(CLAIMS)
    paper = next(p for p in CLAIMS if p.startswith("PCP"))
    rows = _rows(md, paper, "PCP 84.7 vs AND 84.2")
    assert [r[4] for r in rows] == ["reproduced", "tie", "not reproduced", "not measured"]
    assert rows[0][2].startswith("0.950 ± 0.005 vs 0.900 ± 0.010 (n = 3 / 3)")
    assert "kNN leave-one-out" in rows[0][3] and "kNN test vs train" in rows[1][3]  # USPS has both splits
    assert "2 seed(s)" in rows[3][5]
    # PCP vs instance discrimination: no instance result given, so nothing is invented
    for r in _rows(md, paper, "PCP 84.7 vs IR 80.8"):
        assert r[4] == "not measured" and "no result for accuracy-instance-" in r[5]


def test_nothing_recorded_means_nothing_measured():
    md = tables({})
    verdicts = [line.split("|")[5].strip() for line in md.splitlines()
                if line.startswith("| ") and not line.startswith("| paper's figure")]
    departures = sum(len(d) for d in DEPARTURES.values())
    assert len(verdicts) == sum(len(c) for c in CLAIMS.values()) + departures
    assert set(verdicts) - {"departure", "as the paper"} == {"not measured"}
    assert sum(v in ("departure", "as the paper") for v in verdicts) == departures  # fixed lines, not verdicts
    assert "±" not in md


JULE = next(p for p in CLAIMS if p.startswith("JULE"))


def _jule_run(sf: float, rc: float) -> dict:
    return {"heads": [{"head": "method", "features": "embedding", "nmi_geometric": sf, "acc": sf},
                      {"head": "agglomerative", "features": "embedding", "nmi_geometric": rc, "acc": rc}]}


def test_jule_paper_preset_rows_sit_beside_the_cpu_rows_with_their_distance_to_the_paper():
    """The paper presets' results (accuracy.py --tag paper) get their own line after jule-cpu's, both
    sides read from the same result, and the "why" gives our distance to the paper's own figures."""
    results = {"accuracy-jule-mnist-test-paper": {"method": "jule", "data": "mnist-test", "command": "accuracy.py "
                                                  "--config jule-mnist-test --tag paper", "runs": [_jule_run(0.90, 0.93)]}}
    rows = _rows(tables(results), JULE, "JULE-RC 0.915 vs JULE-SF (the recurrence's own clusters) 0.876")
    assert len(rows) == 2  # jule-cpu's, then the paper preset's
    assert rows[0][2] == "-" and "accuracy-jule-mnist-test;" in rows[0][5] + ";"
    cpu, paper = rows
    assert paper[2] == "0.930 ± 0.000 vs 0.900 ± 0.000 (n = 1 / 1)" and paper[4] == "not measured"  # one seed
    assert "jule-mnist-test" in paper[3] and "the paper preset" in paper[5]
    assert "A +0.015 from the paper's 0.915, B +0.024 from the paper's 0.876" in paper[5]
    assert "from the paper's" not in cpu[5]  # nothing measured, no distance


def test_usps_paper_preset_rows_read_the_ablation_row_of_the_presets_own_options():
    """USPS's paper-preset runs are the jule-ip1 ablation's row that sets what jule-usps already sets
    (the same preset, the same seeds): its SF and RC per run, not a second copy of the runs."""
    row = {"variant": "ip1 Linear -> L2 (paper), small_fraction 0.05", "runs": [
        {"seed": s, "own_nmi_geometric": sf, "agglomerative_nmi_geometric": rc} for s, sf, rc in
        ((0, 0.90, 0.92), (1, 0.91, 0.92), (2, 0.90, 0.92))]}
    results = {"ablation-jule-ip1-usps": {"table": "jule-ip1", "data": "usps", "config": "jule-usps",
                                          "command": "ablation.py --table jule-ip1 --config jule-usps", "rows": [row]}}
    rows = _rows(tables(results), JULE, "JULE-RC 0.913 vs JULE-SF (the recurrence's own clusters) 0.858")
    paper = rows[1]
    assert paper[2].startswith("0.920 ± 0.000 vs 0.903 ± 0.006 (n = 3 / 3)") and paper[4] == "reproduced"
    assert "A +0.007 from the paper's 0.913" in paper[5]


def test_every_departure_of_the_jule_presets_is_a_line_of_its_table_with_its_measurements():
    lines = DEPARTURES[JULE]
    said = " ".join(f"{d.where} {d.paper} {d.ours} {d.why}" for d in lines)
    for topic in ("ip1", "small", "inv", "dampen", "batches", "USPS"):  # issue 44's list, and the data
        assert topic in said, topic
    ip1 = next(d for d in lines if "ip1" in d.paper)
    rows = {}
    for data in ("digits", "usps"):
        rows[f"ablation-jule-ip1-{data}"] = {"rows": [
            {"variant": v, "runs": [{"own_nmi_geometric": x, "agglomerative_nmi_geometric": x + 0.01} for x in xs]}
            for v, xs in ((papers.IP1_PAPER, (0.90, 0.91, 0.92)), (papers.IP1_BN, (0.80, 0.80, 0.80)),
                          (papers.SMALL_OFF, (0.70, 0.70, 0.70)))]}
    md = tables(rows)
    line = _rows(md, JULE, ip1.paper)
    assert len(line) == 1
    assert line[0][2].startswith("digits (8x8, dev) SF NMI: 0.910 ± 0.010 vs 0.800 ± 0.000 (n = 3 / 3)")
    assert "USPS RC NMI: 0.920 ± 0.010 vs 0.810 ± 0.000 (n = 3 / 3)" in line[0][2]
    assert line[0][4] == ("departure" if ip1.kept else "as the paper")
    assert len(_rows(tables({}), JULE, "| ")) == len(_rows(md, JULE, "| "))  # the same lines, figures filled in


def test_the_script_prints_the_tables(tmp_path):
    (tmp_path / "accuracy-pcp-digits.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "papers.py"), "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("### ") == 7 and "| paper's figure |" in proc.stdout
    assert papers.tables(papers.load(ROOT / "benchmarks" / "results")).count("### ") == 7  # the recorded results


def test_ablation_claims_name_rows_the_ablation_benchmark_runs():
    import ablation

    for claims in CLAIMS.values():
        for source in (s for c in claims for s in (c.ours, c.than) if s and s.stem.startswith("ablation-")):
            table = source.stem[len("ablation-"):].rsplit("-", 1)[0]
            if table in ablation.TABLES:  # (DCCM has no ablation benchmark: its rows stay not measured)
                assert source.variant in [label for label, _ in ablation.TABLES[table]], source
    first, *pcp = ablation.TABLES["pcp-table1"]  # PCP Table I as printed: DeepCluster itself, then PCP
    assert ablation.OTHER_METHOD[first[0]] == ("deepcluster", "deepcluster-cpu")
    assert all({"options.warmup=false", "options.floor=100"} <= set(sets) for _, sets in pcp)


def test_deepcluster_results_say_which_version_they_measured():
    old = accuracy_result("deepcluster", "digits", (0.9, 0.01))
    new = accuracy_result("deepcluster", "digits", (0.9, 0.01))
    for r in new["runs"]:
        r["config"]["options"] = {"pca_variance": 0.9}
    source = Source("accuracy-deepcluster-digits", "knn_top1")
    assert "before issue 27" in papers.version_note({source.stem: old}, source)
    assert papers.version_note({source.stem: new}, source) == ""
    ablation_row = {"method": "pcp", "rows": [{"variant": "DC", "method": "deepcluster", "config": "deepcluster-cpu",
                                               "runs": [{"knn_top1": 0.5}]}]}
    row_source = Source("ablation-y", "knn_top1", "DC")
    assert "does not record" in papers.version_note({"ablation-y": ablation_row}, row_source)
    assert "deepcluster-cpu" in papers.our_setting({"ablation-y": ablation_row}, row_source)


def test_jule_results_say_which_ip1_they_measured():
    """JULE runs recorded before issue 44 (options without ``ip1``) had Linear -> BN -> ReLU; the note
    says so, and nothing is said of a result that records its ip1 or of another method."""
    source = Source("accuracy-jule-usps", "method:acc")
    old = {"method": "jule", "runs": [{"config": {"options": {"eta": 0.9}}}]}
    new = {"method": "jule", "runs": [{"config": {"options": {"eta": 0.9, "ip1": "linear"}}}]}
    assert "before issue 44" in papers.version_note({source.stem: old}, source)
    assert papers.version_note({source.stem: new}, source) == ""
    assert papers.version_note({source.stem: {**old, "method": "pad"}}, source) == ""
