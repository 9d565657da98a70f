"""``deepclust report``: one self-contained HTML file to look at a finished run's clusters.

Everything is inlined (thumbnails and figures as base64 PNG data URIs, CSS in the page, no script,
no font, no external resource), so the file can be mailed or opened offline. It holds:
 - a summary (method, data, K, the scores from ``metrics.json`` when labels exist);
 - cluster sizes (a bar chart);
 - a 2-D map of the embeddings, coloured by cluster: UMAP when ``umap-learn`` is installed, else
   t-SNE for N <= 10,000, else PCA (matplotlib, inlined PNG), of the embeddings scaled to unit
   length; a map whose coordinates are not all finite is replaced by PCA's, and embeddings that are
   all one point get a sentence saying so instead of a map;
 - training curves: the loss and every numeric diagnostic of ``log.jsonl`` per epoch;
 - per cluster, a gallery of the most typical images and a row of the least typical ones.
   Typicality = cosine similarity of an image's embedding to its cluster's mean direction (the
   embeddings are L2-normalised; the same mean direction the heads use as a centroid);
 - when the data has labels: the confusion matrix (clusters x classes) and each cluster's purity
   (share of its largest class);
 - the clusters' hierarchy (the run's ``hierarchy.npz``, ``structure/hierarchy.py``): the dendrogram of
   how the run's clusters join, and the clusters at a coarser level (K // 2: which of the run's
   clusters each joins) and at a finer one (2 K: which cluster each is part of), each with its
   prototypes (the images nearest its mean direction). A run without the file (fitted before runs
   kept their tree) gets a sentence saying so.

The run directory is only read, through :class:`runfiles.RunFiles` (a missing or damaged file is
one line naming it): the report is written to ``--out`` (default ``RUN/report.html``) through the
atomic writer of ``io.py``.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .data import ImageSet
from .inference import fitted_images
from .io import check_target, save_text
from .rundir import check_output
from .runfiles import RunFiles
from .structure.hierarchy import Hierarchy, cut

TYPICAL, ATYPICAL = 16, 8  # thumbnails per cluster: most typical first, then a row of the least typical
THUMB = 64  # thumbnail side in pixels (small images are enlarged with nearest-neighbour sampling)
TSNE_MAX = 10_000  # above this (without UMAP) the map is PCA
MAP_POINTS = 50_000  # points drawn on the map (a seeded sample above this)
TIMING_KEYS = ("epoch", "seconds", "images_per_second")
PROTOTYPES = 8  # thumbnails per cluster of a level of the hierarchy


@dataclass
class RunView:
    """What the report reads from a run directory."""

    run: Path
    config: Any
    embedding: np.ndarray  # (N, D) float32, L2-normalised
    clusters: np.ndarray  # (N,) int64
    images: ImageSet | None
    log: list[dict]
    metrics: dict
    tree: Hierarchy | None = None  # hierarchy.npz; None where the run has none


def read_run(run: str | Path) -> RunView:
    """The run's files and images; any missing or inconsistent piece is a one-line DataError."""
    return load_images_of(read_run_files(run))


def read_run_files(run: str | Path) -> RunView:
    """The run's own files (no images yet): quick, so every check on them comes before any progress
    bar."""
    files = RunFiles(run)
    cfg = files.config()
    clusters, embedding = files.outputs()
    metrics = files.metrics()
    tree = files.hierarchy() if (files.path / "hierarchy.npz").exists() else None
    return RunView(files.path, cfg, embedding, clusters, None, _read_jsonl(files.path / "log.jsonl"), metrics, tree)


def load_images_of(view: RunView) -> RunView:
    """``view`` with the images the run was fitted on (through its data spec)."""
    return dataclasses.replace(view, images=fitted_images(view.run, view.config, len(view.clusters), "the report"))


def _read_jsonl(path: Path) -> list[dict]:
    """The log's records: lines that are not a JSON object (a line cut by a kill, damage) are left
    out, the records around them still count."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def default_out(run: str | Path) -> Path:
    return Path(run) / "report.html"


def write_report(run: str | Path, out: str | Path | None = None, *, progress: bool = True) -> Path:
    """Build the report of ``run`` and write it to ``out`` (default ``RUN/report.html``)."""
    out = Path(out) if out is not None else default_out(run)
    check_target(out, "report.html")
    check_output(out, run)  # never one of the run's own files or its data
    view = read_run_files(run)  # every check on the run before the first progress line
    steps = ("images", "typical images", "map", "curves", "thumbnails", "write")
    with tqdm(total=len(steps), desc="report", file=sys.stderr, disable=not progress, leave=False) as bar:
        bar.set_postfix_str(steps[0])
        view = load_images_of(view)
        bar.update()
        page = build_page(view, bar, steps, progress)
        bar.set_postfix_str(steps[-1])
        save_text(out, page)
        bar.update()
    return out


def build_page(view: RunView, bar, steps, progress: bool) -> str:
    """The HTML of the report (``bar``: the per-step progress bar)."""
    k = int(max(view.clusters.max() + 1, view.metrics.get("n_clusters", 0)))
    bar.set_postfix_str(steps[1])
    typical, atypical = typical_images(view.embedding, view.clusters, k)
    bar.update()
    bar.set_postfix_str(steps[2])
    xy, how = map_2d(view.embedding, seed=view.config.train.seed)
    map_section = (_figure("map", f"Map of the embeddings ({how})", plot_map(xy, view.clusters, k, how))
                   if xy is not None else f'<section id="map"><h2>Map of the embeddings</h2><p>No map: '
                                          f'{html.escape(how)}.</p></section>')
    bar.update()
    bar.set_postfix_str(steps[3])
    curves_png = plot_curves(view.log)
    sizes_png = plot_sizes(np.bincount(view.clusters, minlength=k))
    bar.update()
    bar.set_postfix_str(steps[4])
    galleries = gallery_html(view, typical, atypical, k, progress)
    bar.update()
    # the first screen: what ran, the sizes and the map side by side; then the clusters themselves
    top = ('<div class="top"><div>' + summary_html(view, k) + _figure("sizes", "Cluster sizes", sizes_png)
           + "</div>" + map_section + "</div>")
    sections = [top, galleries, hierarchy_html(view, k),
                _figure("curves", "Training curves", curves_png) if curves_png else
                '<section id="curves"><h2>Training curves</h2><p>log.jsonl has no records.</p></section>']
    if view.images.labels is not None:
        sections.append(labels_html(view.clusters, view.images.labels, k, view.images.classes))
    title = html.escape(f"deepclust report: {view.config.method} on {view.config.data.spec}")
    return PAGE.format(title=title, body="\n".join(sections))


def typical_images(embedding: np.ndarray, clusters: np.ndarray, k: int) -> tuple[list, list]:
    """Per cluster, the indices of its most typical images (most similar to the cluster's mean
    direction first) and of its least typical ones (least similar last), without repeats."""
    x = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(sums, clusters, x)
    centre = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    sim = np.einsum("nd,nd->n", x, centre[clusters])
    order = np.lexsort((-sim, clusters))  # by cluster, then most typical first
    starts = np.searchsorted(clusters[order], np.arange(k + 1))
    typical, atypical = [], []
    for c in range(k):  # a loop over clusters, not samples
        members = order[starts[c]:starts[c + 1]]
        typical.append(members[:TYPICAL])
        rest = members[TYPICAL:]
        atypical.append(rest[-ATYPICAL:] if len(rest) else rest)
    return typical, atypical


MAP_SPREAD = 1e-6  # embeddings (scaled to unit length) all closer than this are one point: no map


def map_2d(embedding: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray | None, str]:
    """2-D coordinates of the embeddings, finite and one row per embedding, and the name of the
    projection: UMAP if installed, else t-SNE (N <= TSNE_MAX), else PCA, of the rows scaled to unit
    length (a zero row stays at the origin). A projection that gives non-finite coordinates is
    replaced by PCA's. (None, the reason) when the embeddings are not finite or are all one point:
    t-SNE's start divides by their spread."""
    n = len(embedding)
    if n < 4:
        return np.c_[np.arange(n), np.zeros(n)].astype(np.float32), "index"
    x = np.array(embedding, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0 or not np.isfinite(x).all():
        return None, "the embeddings are not a finite matrix"
    x /= np.maximum(np.abs(x).max(axis=1, keepdims=True), np.finfo(np.float32).tiny)  # the norm cannot overflow
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if np.ptp(x, axis=0).max() < MAP_SPREAD:
        return None, f"all {n} embeddings are the same point"
    from sklearn.decomposition import PCA

    pcs = PCA(min(2, x.shape[1]), random_state=seed).fit_transform(x)
    pcs = np.c_[pcs, np.zeros((n, 2 - pcs.shape[1]))]  # a 1-d embedding: its line
    try:
        import umap  # optional: umap-learn

        xy, how = umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
    except ImportError:
        xy, how = pcs, "PCA"
        if n <= TSNE_MAX:
            from sklearn.manifold import TSNE

            start = (pcs / pcs[:, 0].std() * 1e-4).astype(np.float32)  # sklearn's "pca" start; its spread is > 0 here
            perplexity = float(min(30, (n - 1) / 3))
            xy, how = TSNE(2, perplexity=perplexity, init=start, random_state=seed).fit_transform(x), "t-SNE"
    return (xy, how) if np.isfinite(xy).all() else (pcs, "PCA")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colours(k: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    return cmap(np.arange(k) % 20 if k <= 20 else np.linspace(0, 1, k))


def plot_map(xy: np.ndarray, clusters: np.ndarray, k: int, how: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colours, n = _colours(k), len(xy)
    shown = np.random.default_rng(0).choice(n, MAP_POINTS, replace=False) if n > MAP_POINTS else np.arange(n)
    ax.scatter(xy[shown, 0], xy[shown, 1], c=colours[clusters[shown]], s=max(1.0, min(12.0, 4000 / len(shown))),
               linewidths=0)
    if k <= 40:  # the cluster number at each cluster's median point
        for c in np.unique(clusters):
            mx, my = np.median(xy[clusters == c], axis=0)
            ax.text(mx, my, str(c), fontsize=11, weight="bold", ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.7, "lw": 0})
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"{how} of {n} embeddings" + (f" ({len(shown)} shown)" if len(shown) < n else "")
                 + ", coloured by cluster")
    return _png(fig)


def plot_sizes(sizes: np.ndarray) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(12, 2 + 0.3 * len(sizes)), 2.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(np.arange(len(sizes)), sizes, color=_colours(len(sizes)))
    ax.set_xlabel("cluster"), ax.set_ylabel("images")
    if len(sizes) <= 40:
        ax.set_xticks(np.arange(len(sizes)))
    return _png(fig)


def _number(value) -> float | None:
    """``value`` as a finite float; None for text, booleans, NaN, infinity or an int beyond float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _epoch(record: dict, i: int) -> float:
    epoch = _number(record.get("epoch"))
    return float(i) if epoch is None else epoch


def curve_series(log: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every numeric value of the log per epoch (the loss first), timing keys left out; a record's
    position stands in for an epoch that is not a number."""
    keys: dict[str, None] = {"loss": None}
    for record in log:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in TIMING_KEYS \
                    and not key.endswith("_seconds"):
                keys.setdefault(key, None)
    series = {}
    for key in keys:
        points = [(_epoch(r, i), y) for i, r in enumerate(log) if (y := _number(r.get(key))) is not None]
        if points:
            series[key] = tuple(np.asarray(p, dtype=float) for p in zip(*points))
    return series


def plot_curves(log: list[dict]) -> str | None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    series = curve_series(log)
    if not series:
        return None
    cols = min(4, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), dpi=100, layout="constrained")
    for i, (key, (x, y)) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, ms=3, color="C0" if key == "loss" else "C1")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
    return _png(fig)


def thumbnail(image: np.ndarray) -> str:
    """A base64 PNG of one uint8 image (H, W) or (H, W, 3), its longer side scaled to THUMB."""
    from PIL import Image

    im = Image.fromarray(image)
    scale = THUMB / max(im.size)
    size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
    im = im.resize(size, Image.NEAREST if max(image.shape[:2]) <= 32 else Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def gallery_html(view: RunView, typical: list, atypical: list, k: int, progress: bool) -> str:
    """Per cluster (largest first): its size, its most typical and its least typical images."""
    sizes = np.bincount(view.clusters, minlength=k)
    picked = np.unique(np.concatenate([*typical, *atypical]).astype(np.int64))
    thumbs = {int(i): thumbnail(view.images.images[i])
              for i in tqdm(picked, desc="thumbnails", file=sys.stderr, disable=not progress, leave=False)}
    names = view.images.names
    from matplotlib.colors import to_hex

    swatch = [to_hex(c) for c in _colours(k)]  # the cluster's colour on the map and the size chart

    def img(i: int) -> str:
        label = names[i] if names else f"image {i}"
        return f'<img class="thumb" src="data:image/png;base64,{thumbs[int(i)]}" alt="" title="{html.escape(label)}">'

    parts = ['<section id="galleries"><h2>Clusters</h2><p>Most typical images first (nearest the '
             "cluster's mean embedding); below them, the least typical.</p>"]
    for c in np.argsort(-sizes, kind="stable"):
        if sizes[c] == 0:
            continue
        parts.append(f'<div class="cluster" id="cluster-{c}"><h3><i style="background:{swatch[c]}"></i>Cluster {c} '
                     f'<span>{sizes[c]} images</span></h3>')
        parts.append('<div class="row">' + "".join(img(i) for i in typical[c]) + "</div>")
        if len(atypical[c]):
            parts.append('<div class="row atypical"><span>least typical</span>'
                         + "".join(img(i) for i in atypical[c]) + "</div>")
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def levels(k: int, n_leaves: int) -> dict[str, int]:
    """The hierarchy's levels the report shows: coarser (K // 2) and finer (2 K, at most the leaves),
    each only where it differs from K."""
    out = {"coarse": max(1, k // 2), "fine": min(n_leaves, 2 * k)}
    return {name: level for name, level in out.items() if level != k}


def hierarchy_html(view: RunView, k: int) -> str:
    """The section of the clusters' hierarchy: the dendrogram of the run's clusters, then each level
    of :func:`levels` with its clusters' prototypes and their relation to the run's clusters."""
    head = '<section id="hierarchy"><h2>Hierarchy of the clusters</h2>'
    if view.tree is None:
        return head + "<p>This run has no hierarchy.npz (fitted before runs kept their cluster tree).</p></section>"
    parts = [head, "<p>How the run's clusters join, and the clusters one level coarser and one finer "
                   "(<code>deepclust recut</code> writes any level), each with its prototypes: the images "
                   "nearest its mean embedding.</p>",
             f'<img class="figure" src="data:image/png;base64,{plot_dendrogram(view.tree)}" '
             'alt="dendrogram of the clusters">']
    for name, level in levels(k, view.tree.n_leaves).items():
        parts.append(level_html(view, name, cut(view.tree, level), level))
    return "\n".join(parts + ["</section>"])


def level_html(view: RunView, name: str, labels: np.ndarray, level: int) -> str:
    """One level: per cluster (largest first), its size, the run's clusters it joins or is part of,
    and its prototypes."""
    sizes = np.bincount(labels, minlength=level)
    typical, _ = typical_images(view.embedding, labels, level)
    word = "coarser" if name == "coarse" else "finer"
    parts = [f'<div class="level" id="level-{name}"><h3>{level} clusters ({word})</h3>']
    for c in np.argsort(-sizes, kind="stable"):
        if sizes[c] == 0:
            continue
        runs = np.unique(view.clusters[labels == c]).tolist()
        what = ("joins clusters " + ", ".join(map(str, runs)) if len(runs) > 1 else f"part of cluster {runs[0]}"
                if name == "fine" else f"cluster {runs[0]}")
        thumbs = "".join(f'<img class="thumb" src="data:image/png;base64,{thumbnail(view.images.images[i])}" '
                         f'alt="" title="image {int(i)}">' for i in typical[c][:PROTOTYPES])
        parts.append(f'<div class="node" id="{name}-{c}"><h4>{name} {c} <span>{sizes[c]} images, '
                     f'{html.escape(what)}</span></h4><div class="row">{thumbs}</div></div>')
    return "\n".join(parts + ["</div>"])


def plot_dendrogram(tree: Hierarchy) -> str:
    """The dendrogram of how the run's clusters join (the tree above them; leaves named by the
    run's cluster numbers)."""
    from matplotlib.figure import Figure
    from scipy.cluster.hierarchy import dendrogram

    k, n_leaves = tree.n_clusters, tree.n_leaves
    z = tree.linkage

    def leaf_of(node: int) -> int:
        while node >= n_leaves:
            node = int(z[node - n_leaves, 0])
        return node

    fig = Figure(figsize=(min(12, 2 + 0.35 * k), 2.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if k > 1:
        dendrogram(z, truncate_mode="lastp", p=k, ax=ax, color_threshold=0, above_threshold_color="C0",
                   leaf_label_func=lambda node: str(tree.groups[leaf_of(int(node))]), leaf_rotation=0)
    ax.set_xlabel("cluster"), ax.set_ylabel("Ward merge cost")
    return _png(fig)


def summary_html(view: RunView, k: int) -> str:
    m, cfg = view.metrics, view.config
    rows = [("method", cfg.method), ("data", cfg.data.spec), ("images", len(view.clusters)), ("clusters", k),
            ("cluster head", f"{m.get('cluster_head', cfg.cluster.head)} on {m.get('cluster_features', cfg.cluster.features)}"),
            ("backbone", cfg.net.backbone), ("epochs", m.get("epochs", len(view.log)))]
    rows += [(name.upper(), f"{m[name]:.4f}") for name in ("acc", "nmi", "ari") if isinstance(m.get(name), float)]
    if "train_seconds" in m:
        rows.append(("training time", f"{m['train_seconds']:.1f} s"))
    cells = "".join(f"<tr><th>{html.escape(str(a))}</th><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    return f'<section id="summary"><table class="summary">{cells}</table></section>'


def confusion(clusters: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, C) counts of each class in each cluster."""
    c = int(labels.max()) + 1
    return np.bincount(clusters * c + labels, minlength=k * c).reshape(k, c)


def labels_html(clusters: np.ndarray, labels: np.ndarray, k: int, classes: list[str] | None) -> str:
    """The confusion matrix (rows: clusters, columns: classes, shaded by row share) with each
    cluster's size, majority class and purity."""
    counts = confusion(clusters, labels.astype(np.int64), k)
    names = classes if classes and len(classes) >= counts.shape[1] else [str(j) for j in range(counts.shape[1])]
    head = "".join(f"<th>{html.escape(str(n))}</th>" for n in names[:counts.shape[1]])
    rows = []
    for c in range(k):
        size = counts[c].sum()
        if size == 0:
            continue
        share = counts[c] / size
        cells = "".join(f'<td style="background:rgba(31,119,180,{s:.2f}){";color:#fff" if s > 0.5 else ""}">{n}</td>'
                        for n, s in zip(counts[c], share))
        major = int(counts[c].argmax())
        rows.append(f"<tr><th>{c}</th>{cells}<td>{size}</td><td>{html.escape(str(names[major]))}</td>"
                    f"<td>{share[major]:.2f}</td></tr>")
    purity = counts.max(1).sum() / max(1, counts.sum())
    return (f'<section id="confusion"><h2>Clusters against the labels</h2><p>Overall purity {purity:.3f} '
            "(labels are used only here, never by the clustering).</p>"
            f'<table class="confusion"><tr><th>cluster</th>{head}<th>size</th><th>majority</th><th>purity</th></tr>'
            + "".join(rows) + "</table></section>")


def _figure(ident: str, title: str, png: str) -> str:
    return (f'<section id="{ident}"><h2>{html.escape(title)}</h2>'
            f'<img class="figure" src="data:image/png;base64,{png}" alt="{html.escape(title)}"></section>')


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1em auto; padding: 0 1.5em; max-width: 1280px; color: #222; }}
.top {{ display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }}
h1 {{ font-size: 1.4em; }} h2 {{ font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
h3 {{ font-size: 1em; margin: 0.8em 0 0.3em; }} h3 span {{ font-weight: normal; color: #666; }}
h3 i {{ display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; border-radius: 2px; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ddd; padding: 2px 6px; text-align: right; }}
table.summary th {{ text-align: left; background: #f4f4f4; }} table.summary td {{ text-align: left; }}
img.figure {{ max-width: 100%; }}
.row {{ display: flex; flex-wrap: wrap; gap: 2px; align-items: center; }}
.row.atypical {{ margin-top: 3px; opacity: 0.85; }}
.row.atypical span {{ font-size: 0.8em; color: #666; width: 7em; }}
.node h4 {{ font-size: 0.9em; margin: 0.5em 0 0.2em; }} .node h4 span {{ font-weight: normal; color: #666; }}
img.thumb {{ width: 64px; height: 64px; object-fit: contain; image-rendering: pixelated; background: #000; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
