"""deepclust report: one self-contained HTML page, checked in a real browser (headless Chromium)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from deepclust import report
from deepclust.runfiles import RunFiles
from deepclust.structure.hierarchy import cut

FAST = ["--backbone", "mlp", "--no-progress", "--batch-size", "64", "--seed", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_npz):
    out = tmp_path_factory.mktemp("report") / "run"
    proc = run_cli("fit", "--method", "instance", "--data", f"npz:{small_npz}", "--epochs", "2", "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def page(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    proc = run_cli("report", "--run", str(run_dir), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"report": str(out)}
    return out


def test_report_is_one_self_contained_file_with_every_part(page, run_dir):
    text = page.read_text()
    # nothing is fetched: no script, stylesheet link, font or URL other than inlined data
    assert "<script" not in text and "<link" not in text and "@font-face" not in text
    assert re.findall(r'(?:src|href)="(?!data:)', text) == []
    for ident in ("summary", "sizes", "map", "curves", "confusion", "galleries", "hierarchy"):
        assert f'id="{ident}"' in text, ident
    clusters = np.load(run_dir / "labels.npy")
    sizes = np.bincount(clusters)
    for c in np.flatnonzero(sizes):  # every non-empty cluster has its gallery: min(size, 16) typical images
        block = text.split(f'id="cluster-{c}"')[1].split("</section>")[0].split('<div class="cluster"')[0]
        typical = block.split('class="row atypical"')[0]
        assert typical.count('class="thumb"') == min(sizes[c], report.TYPICAL)
        assert f"{sizes[c]} images" in block


def test_typical_images_are_ordered_by_similarity_to_the_cluster_mean():
    angles = np.array([0.0, 0.1, -0.3, 0.6, -0.9, 3.0, 3.2, 2.5])  # cluster 0: first five, cluster 1: last three
    emb = np.c_[np.cos(angles), np.sin(angles)].astype(np.float32)
    clusters = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    typical, atypical = report.typical_images(emb, clusters, 3)
    mean0 = emb[:5].sum(0) / np.linalg.norm(emb[:5].sum(0))
    expected0 = np.argsort(-(emb[:5] @ mean0), kind="stable")
    assert typical[0].tolist() == expected0.tolist()
    assert typical[1].tolist()[0] == 5 and set(typical[1].tolist()) == {5, 6, 7}
    assert typical[2].size == 0 and atypical[0].size == 0  # an empty cluster; no repeats when few members
    many = np.repeat([0], 30)
    emb30 = np.c_[np.cos(np.linspace(-1, 1, 30)), np.sin(np.linspace(-1, 1, 30))].astype(np.float32)
    t, a = report.typical_images(emb30, many, 1)
    assert len(t[0]) == report.TYPICAL and len(a[0]) == report.ATYPICAL
    assert set(t[0]).isdisjoint(a[0]) and {0, 29} <= set(a[0].tolist())  # the two ends are least typical


def test_confusion_and_purity():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([1, 1, 0, 2, 2, 0])
    assert report.confusion(clusters, labels, 3).tolist() == [[1, 2, 0], [0, 0, 2], [1, 0, 0]]
    html = report.labels_html(clusters, labels, 3, ["a", "b", "c"])
    assert "Overall purity 0.833" in html and "<td>b</td><td>0.67</td>" in html


def test_curves_hold_the_loss_and_every_numeric_diagnostic():
    log = [{"epoch": 0, "loss": 3.0, "seconds": 1.0, "images_per_second": 9.0, "phase": "a"},
           {"epoch": 1, "loss": 2.0, "scs_count": 5, "hist": [1, 2], "discovery_seconds": 0.2, "flag": True},
           {"epoch": 2, "loss": float("nan"), "scs_count": 4}]
    series = report.curve_series(log)
    assert list(series) == ["loss", "scs_count"]
    assert series["loss"][0].tolist() == [0, 1] and series["loss"][1].tolist() == [3.0, 2.0]
    assert series["scs_count"][0].tolist() == [1, 2]


def test_hierarchy_levels_and_a_run_without_a_tree():
    assert report.levels(10, 100) == {"coarse": 5, "fine": 20}
    assert report.levels(10, 14) == {"coarse": 5, "fine": 14}  # no finer level than the leaves
    assert report.levels(1, 1) == {} and report.levels(2, 2) == {"coarse": 1}
    view = report.RunView(None, None, np.zeros((3, 2), np.float32), np.zeros(3, np.int64), None, [], {})
    assert "no hierarchy.npz" in report.hierarchy_html(view, 1)  # a run fitted before runs kept their tree


def test_bad_input_is_one_line_and_loses_nothing(tmp_path, run_dir):
    kept = tmp_path / "kept.html"
    kept.write_text("old")
    assert_one_line_error(run_cli("report", "--run", str(tmp_path / "nope"), "--out", str(kept)), "no such run")
    assert kept.read_text() == "old"
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    (partial / "labels.npy").unlink()
    assert_one_line_error(run_cli("report", "--run", str(partial), "--out", str(kept)), "labels.npy")
    assert kept.read_text() == "old"
    assert_one_line_error(run_cli("report", "--run", str(run_dir), "--out", str(tmp_path / "no" / "r.html")),
                          "no such directory")
    assert_one_line_error(run_cli("report", "--run", str(run_dir), "--out", str(tmp_path)), "is a directory")


# --- in a real browser --------------------------------------------------------------------------

# A test-only copy of the page gets this probe: a Content-Security-Policy that blocks anything not
# inlined (so a fetch would be an error), and a script that records errors and, once loaded, every
# image's naturalWidth into the DOM that --dump-dom returns.
PROBE = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<script>
var errors = [];
window.addEventListener('error', function (e) {
  errors.push('error: ' + (e.message || (e.target && e.target.outerHTML || '').slice(0, 80))); }, true);
document.addEventListener('securitypolicyviolation', function (e) { errors.push('csp: ' + e.blockedURI); });
var consoleError = console.error;
console.error = function () { errors.push('console: ' + Array.from(arguments).join(' '));
                              consoleError.apply(console, arguments); };
window.addEventListener('load', function () {
  var images = Array.from(document.images).map(function (i) {
    var s = i.closest('section'), l = i.closest('.level');
    return [i.className, i.complete, i.naturalWidth, s ? s.id : '', l ? l.id : '']; });
  var pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({images: images, errors: errors}); document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (Debian package 'chromium'; .ci/run installs it where it can)")


def load_in_browser(html_path, tmp_path, extra: str = "") -> tuple[dict, str]:
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace('<meta charset="utf-8">', '<meta charset="utf-8">' + PROBE + extra, 1))
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    result = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result, "\n".join(console)


def test_report_renders_in_chromium(page, tmp_path, run_dir):
    result, console = load_in_browser(page, tmp_path)
    images = result["images"]
    thumbs = [i for i in images if i[0] == "thumb"]
    assert len(thumbs) >= 10 and all(section in ("galleries", "hierarchy") for *_, section, _ in thumbs)
    assert all(complete and width > 0 for _, complete, width, *_ in images), [i for i in images if not i[2]]
    figures = {section: width for cls, _, width, section, _ in images if cls == "figure"}
    assert figures.keys() == {"sizes", "map", "curves", "hierarchy"} and min(figures.values()) > 100
    # the hierarchy: a coarser and a finer level, each cluster with its prototypes, shown and loaded
    labels = np.load(run_dir / "labels.npy")
    k = len(np.unique(labels))
    tree = RunFiles(run_dir).hierarchy()
    for name, level in report.levels(k, tree.n_leaves).items():
        sizes = np.bincount(cut(tree, level))
        shown = [i for i in thumbs if i[4] == f"level-{name}"]
        assert len(shown) == np.minimum(sizes, report.PROTOTYPES).sum(), name
    assert set(report.levels(k, tree.n_leaves)) == {"coarse", "fine"}
    assert result["errors"] == [] and console == "", (result["errors"], console)
    # the probe itself sees a broken image and a fetch from outside (so the checks above can fail)
    bad = '<img class="thumb" src="data:image/png;base64,AAAA"><img src="https://example.invalid/x.png">'
    broken, console = load_in_browser(page, tmp_path, extra=bad)
    assert [i for i in broken["images"] if i[2] == 0] and len(broken["errors"]) >= 2 and console
