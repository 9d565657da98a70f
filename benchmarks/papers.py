"""Each paper's claims in its own metric and protocol, against the measurements in benchmarks/results/.

    python benchmarks/papers.py              # print the tables (markdown, one per paper)
    python benchmarks/papers.py --results D  # read another results directory

``tables(results)`` takes {file stem: loaded JSON} of RESULTS/*.json and returns the markdown:
one table per paper (JULE, DCCM, AND, PAD, PCP, instance discrimination, DeepCluster) with the
paper's figure, its setting, ours, our setting, a verdict and why.

A claim is comparative: the paper reports A above B (the figures are the paper's, cited by table).
Ours is the same comparison in the same metric and protocol (weighted kNN top-1, k-means ACC on the
embedding, a method's own clusters, NMI with its convention) on our CPU-scale data, read from the
result files, never typed in. The verdict:
  - not measured: no result for one side, or fewer than 3 seeds on either side (the figure found is
    still shown);
  - reproduced: A - B > max(std A, std B) (sample standard deviations over seeds);
  - not reproduced: B - A > max(std A, std B) (the reverse beyond one standard deviation);
  - tie: the difference within one standard deviation of either side.
A measurement ("source") names a result file stem, optionally an ablation row (``variant``), and a
metric: a summary key (``knn_top1``, ``kmeans_embedding_acc``), a per-run key (``nmi_geometric`` of
the pixel baselines), or ``HEAD[/FEATURES]:KEY`` for one cluster head of each run's ``heads``.
Smoke results (``quick``) are left out, as report.py does. Where a claim gives the paper's own
figures (``paper``), the "why" also gives our distance to them (ours minus the paper's).

Below a paper's claims, one line per departure of the presets named after it (``DEPARTURES``):
where the paper says it, what the presets do instead, and why; verdict ``departure``, or
``as the paper`` for a departure removed. A line may name measurements (the presets' choice
against the paper's, e.g. two rows of an ablation), shown in the "ours" column.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import results_dir

MIN_SEEDS = 3
OUR_DATA = ("digits", "usps", "mnist-test", "fashion-mnist-test")  # the CPU data sets with results
DATA_NAMES = {"digits": "digits (8x8, dev)", "usps": "USPS", "mnist-test": "MNIST-test",
              "fashion-mnist-test": "Fashion-MNIST-test", "cifar10-test": "CIFAR-10-test"}
KNN = "weighted kNN top-1 (k 200, T 0.1)"


@dataclass(frozen=True)
class Source:
    """One measurement in the results: file stem, ablation row (or None), metric."""

    stem: str
    metric: str
    variant: str | None = None


@dataclass(frozen=True)
class Claim:
    """A paper's claim that A is above B, in the paper's metric and protocol."""

    table: str  # where the paper prints it, e.g. "Table 1"
    figure: str  # the paper's figures, e.g. "AND 74.8 vs instance 60.3"
    setting: str  # the paper's data, network and protocol
    metric: str  # the metric and protocol, in words
    ours: Source | None  # A here (None: nothing of ours can measure it)
    than: Source | None  # B here
    note: str = ""  # why our setting differs, where it does
    paper: tuple[float | None, float | None] = (None, None)  # the paper's A and B: our distance to them


@dataclass(frozen=True)
class Departure:
    """One place where the presets named after a paper differ from the paper's setting (``kept``),
    or a difference removed (not ``kept``), with the measurements that decided it, if any."""

    where: str  # the paper's table / section, e.g. "Table 9"
    paper: str  # what the paper (or its authors' code) does
    ours: str  # what the presets do
    why: str  # the reason, or the measurement's reading
    kept: bool = True  # False: the presets now do as the paper
    measured: tuple[tuple[str, Source, Source], ...] = ()  # (label, the presets' choice, the other)


# DCCM's recorded runs: digits on this CPU, the report data on a lent GPU (same preset, 40 epochs)
DCCM_RUNS = (("digits", ""), ("mnist-test", "-gpu"), ("cifar10-test", "-gpu"))
DCCM_GPU = "DCCM trained on a lent H200 GPU (dccm-cpu, 40 epochs; device_check.py --dccm), the other side on this CPU"


def accuracy(method: str, data: str, metric: str) -> Source:
    return Source(f"accuracy-{method}-{data}", metric)


PROBE_NOTE = "ours: a linear probe on the embedding (not conv5) of digits, stratified 5-fold (accuracy.py --probe)"


def probe(method: str) -> Source:
    """A linear-probe figure: digits runs recorded with ``accuracy.py --probe --tag probe``."""
    return Source(f"accuracy-{method}-digits-probe", "linear_top1")


def per_data(table, figure, setting, metric, a, b, key, note="", data=OUR_DATA) -> list[Claim]:
    """The claim once per data set: method ``a`` against method ``b`` by ``key`` on each."""
    return [Claim(table, figure, setting, metric, accuracy(a, d, key), accuracy(b, d, key), note) for d in data]


JULE_PAPER = "-paper"  # tag of the paper presets' results (jule-usps, jule-mnist-test): accuracy.py --tag paper
JULE_PAPER_NOTE = "the paper preset (its departures: the lines below)"
# USPS's paper-preset runs are the jule-ip1 ablation's row of the preset's own options (ablation.py --table
# jule-ip1 --config jule-usps: the preset with options.ip1=linear, options.small_fraction=0.05, as it is);
# the ablation records the method's own clusters (SF) and the agglomerative head (RC) per run
JULE_USPS_PAPER = ("ablation-jule-ip1-usps", "ip1 Linear -> L2 (paper), small_fraction 0.05")
ABLATION_KEYS = {"method:acc": "own_acc", "method:nmi_geometric": "own_nmi_geometric",
                 "agglomerative/embedding:acc": "agglomerative_acc",
                 "agglomerative/embedding:nmi_geometric": "agglomerative_nmi_geometric"}


def jule_paper(method: str, data: str, key: str) -> Source:
    """The paper preset's result of ``method`` on ``data`` by ``key``: USPS's JULE rows from the
    jule-ip1 ablation (the same preset and seeds), else accuracy.py's ``--tag paper`` file."""
    if method == "jule" and data == "usps" and key in ABLATION_KEYS:
        return Source(JULE_USPS_PAPER[0], ABLATION_KEYS[key], JULE_USPS_PAPER[1])
    return accuracy(method, data + JULE_PAPER if method == "jule" else data, key)


def jule(table, a_name, b_name, metric, a_key, b_method, b_key, figures, distance=False) -> list[Claim]:
    """A JULE claim on the paper's USPS and MNIST-test, then on our development digits (not in the paper):
    on each, the jule-cpu result, then (USPS, MNIST-test) the paper preset's beside it. ``distance``:
    the "why" gives our distance to the paper's figures."""
    rows = []
    for d in ("usps", "mnist-test", "digits"):
        fig = figures.get(d)
        text = f"{a_name} {fig[0]} vs {b_name} {fig[1]}" if fig else f"(no digits in the paper) {a_name} vs {b_name}"
        setting = f"{DATA_NAMES[d] if fig else 'USPS / MNIST-test'}, JULE's CNN (Tables 1, 9), L2-normalised pixels"
        paper = (float(fig[0]), float(fig[1])) if fig and distance else (None, None)
        rows.append(Claim(table, text, setting, metric, accuracy("jule", d, a_key), accuracy(b_method, d, b_key),
                          paper=paper))
        if fig:  # the paper preset beside jule-cpu; the baseline is the same
            rows.append(Claim(table, text, setting, metric, jule_paper("jule", d, a_key),
                              jule_paper(b_method, d, b_key), JULE_PAPER_NOTE, paper=paper))
    return rows


def ablation(stem: str, key: str, a: str, b: str) -> tuple[Source, Source]:
    return Source(stem, key, a), Source(stem, key, b)


PAD_ABL = "ablation-pad-digits"
PAD_FULL = "PAD (k 5, s 10, KL HPE, lambda 0.8)"
PCP_ABL, PCP_FLOOR = "ablation-pcp-components-digits", "ablation-pcp-floor-digits"
PCP_TABLE1, PCP_T1_DC = "ablation-pcp-table1-digits", "DC: DeepCluster, K' = 100"  # ablation.py --table pcp-table1
DC_ABL = "ablation-deepcluster-clusters-digits"
PCP_T1_NOTE = ("our rows keep the IS warm-up and N_t0 = N / 50, and the first row is PCP with PC and CP off "
               "(k-means of the bank), not DeepCluster; the paper's Table I: no warm-up, N_c = 100, real DC")
SPLIT_DATA = ("usps",)  # our data with both a train and a test split (shared/data/README.md): kNN test vs train

CLAIMS: dict[str, list[Claim]] = {
    "JULE (Yang, Parikh & Batra, CVPR 2016)": [
        *jule("Table 3", "JULE-RC", "k-means on pixels", "NMI (geometric mean, JULE's code)",
              "agglomerative/embedding:nmi_geometric", "kmeans-pixels", "nmi_geometric",
              {"usps": ("0.913", "0.447"), "mnist-test": ("0.915", "0.528")}),
        *jule("Table 10", "JULE-RC", "k-means on pixels", "clustering ACC", "agglomerative/embedding:acc",
              "kmeans-pixels", "acc", {"usps": ("0.950", "0.467"), "mnist-test": ("0.961", "0.560")}),
        *jule("Table 3", "JULE-RC", "JULE-SF (the recurrence's own clusters)", "NMI (geometric mean)",
              "agglomerative/embedding:nmi_geometric", "jule", "method:nmi_geometric",
              {"usps": ("0.913", "0.858"), "mnist-test": ("0.915", "0.876")}, distance=True),
        *jule("Table 10", "JULE-RC", "JULE-SF (the recurrence's own clusters)", "clustering ACC",
              "agglomerative/embedding:acc", "jule", "method:acc",
              {"usps": ("0.950", "0.922"), "mnist-test": ("0.961", "0.940")}, distance=True),
        *jule("Tables 3-4", "k-means on JULE's representation", "k-means on pixels", "NMI (geometric mean)",
              "kmeans/embedding:nmi_geometric", "kmeans-pixels", "nmi_geometric",
              {"usps": ("0.758", "0.447"), "mnist-test": ("0.908", "0.528")}),
    ],
    "DCCM (Wu et al., ICCV 2019)": [
        *[Claim("Table 2", f"DCCM {a} vs k-means {b}", "CIFAR-10 (all 60k), DCCM's shallow AlexNet, the argmax "
                f"of its head vs k-means of pixels", name, accuracy("dccm", d + tag, f"method:{key}"),
                accuracy("kmeans-pixels", d, key), DCCM_GPU if tag else "")
          for d, tag in DCCM_RUNS for name, key, a, b in (("clustering ACC", "acc", "0.623", "0.229"),
                                                          ("ARI", "ari", "0.408", "0.049"))],
        *[Claim("Table 2", "DCCM 0.623 vs JULE 0.272", "CIFAR-10: each method's own clusters", "clustering ACC",
                accuracy("dccm", d + tag, "method:acc"), accuracy("jule", d, "method:acc"), DCCM_GPU if tag else "")
          for d, tag in DCCM_RUNS if d != "cifar10-test"],
        Claim("Table 3", "M4 (all terms) 0.623 vs M1 (L_PG alone) 0.405", "CIFAR-10 ablation", "clustering ACC",
              Source("ablation-dccm-components-digits", "own_acc", "M4: + LR + PL + MI (DCCM)"),
              Source("ablation-dccm-components-digits", "own_acc", "M1: L_PG only"),
              "M1-M4 on digits (development data), ablation.py --table dccm-components"),
        *[Claim("Table 6 (supplement)", f"V1 (nearest pos + random neg) 0.744 vs {label} {fig}", "CIFAR-10, a model "
                "trained with L_MI alone on the fixed graph of an L_PG + L_PL model (its figure: classification ACC)",
                "clustering ACC of the head", Source("ablation-dccm-pairs-digits", "own_acc", "V1: nearest-random"),
                Source("ablation-dccm-pairs-digits", "own_acc", row),
                "ours: the whole of DCCM trained with each strategy on digits (development data), its own "
                "head's ACC; ablation.py --table dccm-pairs")
          for label, fig, row in (("V2 (farthest neg)", "0.713", "V2: nearest-farthest"),
                                  ("V3 (random pos)", "0.731", "V3: random-random"),
                                  ("V4 (top-n pos)", "0.698", "V4: topn-random"))],
        *[Claim("Fig 4", f"DCCM > DIM by more than 8 points ({where})", "CIFAR-10, MLP probe (200 hidden units) "
                f"on the {where} features", "non-linear probe top-1",
                Source("accuracy-dccm-digits-probe", f"mlp_top1_{layer}"), None,
                "DIM is not implemented here, so only DCCM's side is measured: digits (development data), "
                f"the MLP probe on dccm_cnn's {layer}, stratified 5-fold (accuracy.py --probe mlp:conv4 mlp:fc)")
          for where, layer in (("last conv", "conv4"), ("Y(64) fc", "fc"))],
    ],
    "AND (Huang et al., ICML 2019)": [
        *per_data("Table 1", "AND 74.8 vs instance 60.3", "CIFAR-10, AlexNet, FC features, test vs train", KNN,
                  "and", "instance", "knn_top1", "the paper's text says T 0.07, its code 0.1 (ours)"),
        *per_data("Table 1", "AND 74.8 vs DeepCluster 62.3", "CIFAR-10, AlexNet, FC features", KNN,
                  "and", "deepcluster", "knn_top1"),
        Claim("Table 1", "AND 77.6 vs instance 70.1", "CIFAR-10, AlexNet, conv5 features",
              "linear classifier top-1", probe("and"), probe("instance"), PROBE_NOTE),
        Claim("Table 6", "curriculum 86.3 vs one-off 84.2", "CIFAR-10, ResNet18, every neighbourhood from the "
              "first round vs the curriculum of Eq 6", KNN,
              Source("ablation-and-curriculum-digits", "knn_top1", "curriculum (S = r / R)"),
              Source("ablation-and-curriculum-digits", "knn_top1", "one-off"),
              "digits (development data), and-cpu: 4 rounds of 8 epochs after round 0; ablation.py --table and-curriculum"),
    ],
    "PAD (Zhang et al., AAAI 2020)": [
        *per_data("Table 1", "PAD 81.5 vs AND 74.8", "CIFAR-10, AlexNet, FC features", KNN, "pad", "and", "knn_top1"),
        *per_data("Table 2", "PAD 98.2 vs DeepCluster 65.6 (MNIST; CIFAR-10 62.6 vs 37.4)", "MNIST / CIFAR-10, "
                  "k-means of the learned features", "clustering ACC of k-means on the embedding", "pad",
                  "deepcluster", "kmeans_embedding_acc"),
        *[Claim(t, f"{PAD_FULL.split(' (')[0]} 81.5 vs {label} {fig}", "CIFAR-10, AlexNet", KNN,
                *ablation(PAD_ABL, "knn_top1", PAD_FULL, variant))
          for t, label, fig, variant in (
              ("Table 3", "no diffusion", "77.5", "diffusion off (kNN groups, k 10)"),
              ("Table 4", "no cyclic constraint", "73.3", "cyclic constraint off"),
              ("Table 4", "no scale constraint", "20.2", "scale constraint off"),
              ("Table 5", "no HPE", "69.8", "HPE off"),
              ("Table 5", "HPE as feature cosine", "72.7", "HPE as feature cosine"),
              ("Table 6", "k = 3", "79.3", "k = 3"), ("Table 6", "k = 10", "79.7", "k = 10"),
              ("Table 6", "s = 5", "80.2", "s = 5"),
              ("Table 6", "lambda = 0.2", "78.4", "lambda = 0.2"), ("Table 6", "lambda = 1.0", "78.9", "lambda = 1.0"))],
        Claim("Table 1", "PAD 84.7 vs AND 77.6", "CIFAR-10, AlexNet, conv5", "linear classifier top-1",
              probe("pad"), probe("and"), PROBE_NOTE),
    ],
    "PCP (Zhang et al., ICPR 2020)": [
        *per_data("Table V", "PCP 84.7 vs AND 84.2", "CIFAR-10, ResNet18, one round, test vs train", KNN,
                  "pcp", "and", "knn_top1"),
        *per_data("Table V", "PCP 84.7 vs DC 80.6", "CIFAR-10, ResNet18, DC with 1000 clusters", KNN,
                  "pcp", "deepcluster", "knn_top1"),
        *per_data("Table V", "PCP 84.7 vs IR 80.8", "CIFAR-10, ResNet18", KNN, "pcp", "instance", "knn_top1"),
        *[Claim("Table I", fig, "CIFAR-10, ResNet18, N_c = 100, no warm-up", KNN,
                *ablation(PCP_TABLE1, "knn_top1", a, b))
          for fig, a, b in (("+PC 76.9 vs DC 73.6", "+ PC", PCP_T1_DC), ("+CP_r 78.9 vs +PC 76.9", "+ PC + CP_r", "+ PC"),
                            ("+CP_s 81.6 vs +CP_r 78.9", "+ PC + CP_r + CP_s (PCP)", "+ PC + CP_r"),
                            ("PCP 81.6 vs DC 73.6", "+ PC + CP_r + CP_s (PCP)", PCP_T1_DC))],
        *[Claim("Table I", fig, "CIFAR-10, ResNet18, N_c = 100, no warm-up", KNN,
                *ablation(PCP_ABL, "knn_top1", a, b), PCP_T1_NOTE)
          for fig, a, b in (("+PC 76.9 vs DC 73.6", "+ PC", "DC (clusters of the bank, N_t0 fixed)"),
                            ("+CP_r 78.9 vs +PC 76.9", "+ PC + CP_r", "+ PC"),
                            ("+CP_s 81.6 vs +CP_r 78.9", "+ PC + CP_r + CP_s (PCP)", "+ PC + CP_r"))],
        *[Claim("Table III", f"PCP* {a} vs PCP {b} at N_c = {n}", "CIFAR-10, ResNet18: the IS warm-up on vs off",
                KNN, *ablation(PCP_FLOOR, "knn_top1", f"N_t0 = {n}", f"N_t0 = {n} (no warm-up)"))
          for n, a, b in ((100, "83.9", "81.6"), (10, "83.1", "82.0"), (5, "83.2", "81.8"))],
        Claim("Table III", "PCP 82.0 vs DC 62.0 at N_c = 10", "CIFAR-10, ResNet18", KNN,
              Source(PCP_FLOOR, "knn_top1", "N_t0 = 10 (no warm-up)"), Source(DC_ABL, "knn_top1", "K' = 10")),
        Claim("Table VI", "PCP 79.9 vs AND 79.2", "CIFAR-10, AlexNet, conv5", "linear classifier top-1",
              probe("pcp"), probe("and"), PROBE_NOTE),
    ],
    "Instance discrimination (Wu et al., CVPR 2018; as reported by AND and PCP)": [
        *per_data("AND Table 1", "instance 32.7 vs DeepCluster 22.7 (CIFAR-100; PCP Table VI 39.6 vs 27.4)",
                  "CIFAR-100, AlexNet, FC features", KNN, "instance", "deepcluster", "knn_top1",
                  "the paper itself is not in shared/papers"),
    ],
    "DeepCluster (Caron et al., ECCV 2018; as reported by AND and PCP)": [
        *per_data("AND Table 1", "DeepCluster 62.3 vs instance 60.3 (CIFAR-10; PCP Table VI 70.3 vs 68.1)",
                  "CIFAR-10, AlexNet, FC features", KNN, "deepcluster", "instance", "knn_top1"),
        Claim("PCP Table III", "DC 80.6 at N_c = 1k vs 62.0 at 10", "CIFAR-10, ResNet18: over-clustering", KNN,
              *ablation(DC_ABL, "knn_top1", "K' = 100", "K' = 10"), "our K' = 100 of 1,797 images"),
        Claim("PCP Table III", "DC 62.0 at N_c = 10 vs 56.9 at 5", "CIFAR-10, ResNet18", KNN,
              *ablation(DC_ABL, "knn_top1", "K' = 10", "K' = 5")),
        Claim("AND Table 1", "DeepCluster 77.9 vs instance 70.1", "CIFAR-10, AlexNet, conv5",
              "linear classifier top-1", probe("deepcluster"), probe("instance"), PROBE_NOTE),
    ],
}


JULE_IP1 = "ablation-jule-ip1-"  # ablation.py --table jule-ip1 --config jule-usps, per development data set
IP1_PAPER, IP1_BN = "ip1 Linear -> L2 (paper), small_fraction 0.05", "ip1 Linear -> BN -> ReLU -> L2, small_fraction 0.05"
SMALL_OFF = "ip1 Linear -> L2 (paper), small_fraction 0"


SF_RC_NMI = (("SF NMI", "own_nmi_geometric"), ("RC NMI", "agglomerative_nmi_geometric"))
SF_ACC_NMI = (("SF ACC", "own_acc"), ("SF NMI", "own_nmi_geometric"))


def jule_rows(a: str, b: str, keys=SF_RC_NMI) -> tuple[tuple[str, Source, Source], ...]:
    """Two rows of the jule-ip1 ablation by ``keys`` ((label, summary key): SF and RC NMI, geometric, by
    default), on digits and USPS."""
    return tuple((f"{DATA_NAMES[d]} {name}", Source(JULE_IP1 + d, key, a), Source(JULE_IP1 + d, key, b))
                 for d in ("digits", "usps") for name, key in keys)


# Where the presets named after a paper (jule-usps, jule-mnist-test, jule-mnist; dccm-cifar10, -cifar100-20,
# -stl10) differ from it; one line each
DEPARTURES: dict[str, list[Departure]] = {
    "JULE (Yang, Parikh & Batra, CVPR 2016)": [
        Departure("Table 9, Sec 4.1.2", "ip1 -> l2-norm (the authors' Torch models_def/*.lua and Caffe prototxt: "
                  "Linear, then Normalize)", "ip1 Linear -> L2 (options.ip1 linear); before issue 44 Linear -> BN "
                  "-> ReLU -> L2", "removed by measurement: A the paper's Linear, B Linear -> BN -> ReLU "
                  "(the paper's other settings, small_fraction 0.05; ablation.py --table jule-ip1)", kept=False,
                  measured=jule_rows(IP1_PAPER, IP1_BN)),
        Departure("Sec 3.6", "each period merges ceil(eta n_c) clusters by Eq 7, cut there",
                  "the small-cluster rule (options.small_fraction 0.05, ours): every period's cut sets aside "
                  "clusters under 5% of the mean size, Eq 7 merging on until that many large clusters remain",
                  "measured: A the rule on, B the paper's plain cut (ip1 Linear; ablation.py --table jule-ip1); "
                  "without the rule every USPS seed and 2 of 3 digits seeds end with a cluster of a few images "
                  "and two classes merged (the runs' cluster sizes)", measured=jule_rows(IP1_PAPER, SMALL_OFF, SF_ACC_NMI)),
        Departure("Sec 4.1.2", "base rate 0.01 \"for each partially unrolled period\", inv decay (gamma 1e-4, "
                  "power 0.75)", "the inv decay over the run's optimiser steps, not restarted per period",
                  "as both of the authors' codes count (Caffe solver.cpp: UpdateModels continues iter_; Torch "
                  "train.lua: iter = epoch x batches + t); not measured against a restart per period"),
        Departure("Sec 4.1.2", "SGD, momentum 0.9, in Caffe (its SGDSolver: history = rate x gradient + momentum "
                  "x history, no dampening)", "PyTorch SGD, momentum 0.9, no dampening, no Nesterov",
                  "as the paper's Caffe; the authors' Torch port (train.lua, optim.sgd) dampens momentum by "
                  "default (dampening = momentum): its steps are a tenth of these", kept=False),
        Departure("Sec 3.5.2, A.3", "batches for SGD (the authors' code: uniform batches of 100)",
                  "batches by cluster: chunks of 4 same-cluster images (options.per_cluster), shuffled",
                  "the paper does not say how batches are drawn; uniform batches of 100 rarely hold two images of "
                  "a ~4-image cluster, so Eq 35 would have few positives in the first periods"),
        Departure("Table 1", "USPS: 11,000 images (Roweis's copy)", "USPS: 9,298 images (7,291 + 2,007, "
                  "../shared/data/usps.npz)", "the data available here"),
    ],
    "DCCM (Wu et al., ICCV 2019)": [
        Departure("Algorithm 1, Sec 4", "per mini-batch: the graph and labels of each mini-batch's originals; "
                  "200 epochs", "the authors' schedule (options.schedule block; main.py train, cfgs/cifar10.yaml): "
                  "blocks of 1,000 images predicted once, 10 passes of 31 mini-batches of 32, two draws each "
                  "(620 steps a block, 7.44M in 200 epochs of 60,000 images)",
                  "the paper's length is its code's: 200 epochs per mini-batch of 256 are 47k steps, about "
                  "1/160 of the authors'; not measured at the paper's length. Measured on development data at "
                  "equal CPU time (dccm_schedules.py --data digits --block-epochs 5, --data usps --block-epochs 1; "
                  "dccm-cpu's other settings): A the block schedule, B the per-mini-batch loop given the block "
                  "run's seconds as its budget; the CPU preset (dccm-cpu) keeps the per-mini-batch loop",
                  measured=tuple((f"{DATA_NAMES[d]} {name} at equal time",
                                  Source(f"accuracy-dccm-{d}-block-e{e}", key),
                                  Source(f"accuracy-dccm-{d}-minibatch-at-block-e{e}", key))
                                 for d, e in (("digits", 5), ("usps", 1)) for name, key in (("ACC", "acc"), ("NMI", "nmi")))),
        Departure("Sec 4 (the authors' main.py)", "RMSprop lr 1e-4, no decay", "RMSprop lr 1e-4, constant "
                  "(before issue 44: a step decay at epochs 80/120/160)", "as the authors' main.py", kept=False),
        Departure("Sec 6.4, cfgs/cifar10.yaml layers [7, 19]", "S: the output after the second conv layer "
                  "(the authors' module 7: conv2's max-pool, 14x14 at 32 px)", "S after conv2's max-pool "
                  "(before issue 44: before it, 28x28, four times the discriminator's work)", "as the authors' code",
                  kept=False),
        Departure("Sec 6.4", "D: the first fc layer (the authors' code: module 19, the K-way Linear's output)",
                  "D: the first fc layer, after its ReLU, as the paper", "the paper's words; the authors' code "
                  "gives the discriminator a K-dim D", kept=False),
        Departure("Eq 9", "the pseudo-label loss, a cross-entropy (the authors' WeightedBCE: a binary "
                  "cross-entropy averaged over the K outputs, about CE / K)", "a cross-entropy with alpha 5",
                  "the paper's Eq 9; the pseudo-label term weighs about K times the authors' code's", kept=False),
        Departure("Eq 12, 15", "local robustness on the transformed views, the total over the originals and "
                  "the views (the authors' code trains the transformed view only)", "both, as Eq 15 "
                  "(options.original_terms true)", "the paper's equation; original_terms false gives the "
                  "authors' code", kept=False),
        Departure("the authors' models/cifar_C4_L2.py", "BatchNorm without running statistics; kaiming-normal "
                  "convolutions, every Linear an identity at start", "the block's prediction normalises the "
                  "backbone's BatchNorm by running statistics (the head's by the block's own); PyTorch's default "
                  "initialisation but the head's identity Linear", "the network is the project's shared "
                  "dccm_cnn (eval-mode discovery pass); not measured"),
    ],
}


# ------------------------------------------------------------------------------------------------
# Measurements and verdicts


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float
    n: int


def _summary(values: list[float]) -> Stats | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return Stats(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


def head_value(run: dict, spec: str) -> float | None:
    """``HEAD[/FEATURES]:KEY`` of one run's ``heads`` list (None when that head was not scored)."""
    head, key = spec.split(":", 1)
    kind, _, features = head.partition("/")
    for h in run.get("heads") or []:
        if h.get("head") == kind and (not features or h.get("features") == features):
            return h.get(key)
    return None


def measure(results: dict, source: Source | None) -> Stats | None:
    """Mean, sample std and seed count of ``source`` in ``results`` (None when it is not there)."""
    if source is None or source.stem not in results or results[source.stem].get("quick"):
        return None  # a smoke run (``quick``) measures nothing
    block = entry_of(results[source.stem], source)
    runs = block.get("runs") or []
    if ":" in source.metric:
        return _summary([head_value(r, source.metric) for r in runs])
    summary = (block.get("summary") or {}).get(source.metric)
    if isinstance(summary, dict) and summary.get("n"):
        return Stats(float(summary["mean"]), float(summary.get("std") or 0.0), int(summary["n"]))
    return _summary([r.get(source.metric) for r in runs])


def verdict(a: Stats | None, b: Stats | None) -> tuple[str, str]:
    """(verdict, why) for the claim "A above B" given our measurements of both sides."""
    if a is None or b is None:
        return "not measured", "no matching result"
    if min(a.n, b.n) < MIN_SEEDS:
        return "not measured", f"{min(a.n, b.n)} seed(s); a verdict needs {MIN_SEEDS}"
    diff, noise = a.mean - b.mean, max(a.std, b.std)
    if diff > noise:
        return "reproduced", f"A - B = {diff:+.3f}, beyond one std ({noise:.3f})"
    if -diff > noise:
        return "not reproduced", f"reversed: A - B = {diff:+.3f}, beyond one std ({noise:.3f})"
    return "tie", f"A - B = {diff:+.3f}, within one std ({noise:.3f})"


# ------------------------------------------------------------------------------------------------
# Rendering


def our_setting(results: dict, source: Source | None) -> str:
    """Data, preset, backbone, seeds and commit of the result a source reads."""
    if source is None:
        return "-"
    block = results.get(source.stem)
    if block is None:
        return f"no result {source.stem}.json"
    data = DATA_NAMES.get(block.get("data", ""), block.get("data", "?"))
    if block.get("split") == "test":
        data = DATA_NAMES.get(f"{block.get('data')}-test", data)
    entry = entry_of(block, source)
    config = entry.get("config") or block.get("config") or _flag(block.get("command", ""), "--config") or "no preset"
    runs = entry.get("runs") or []
    net = ((runs[0].get("config") or {}).get("net") or {}).get("backbone") if runs else None
    knn = None
    if source.metric == "knn_top1":
        both = block.get("data") in SPLIT_DATA and block.get("split", "all") == "all"
        knn = "kNN test vs train" if both else "kNN leave-one-out"
    parts = [data, f"{config}" + (f" ({net})" if net else ""), knn,
             f"row '{source.variant}'" if source.variant else None,
             f"commit {str(block.get('commit', '?'))[:7]}"]
    return ", ".join(p for p in parts if p)


def version_note(results: dict, source: Source | None) -> str:
    """Why a recorded DeepCluster or JULE is not today's: DeepCluster runs from before issue 27 (their
    options lack ``pca_variance``) clustered the features after the ReLU and whitened all their
    dimensions; JULE runs from before issue 44 (their options lack ``ip1``) had ip1 Linear -> BN ->
    ReLU (the option's ``bn_relu``)."""
    block = results.get(source.stem) if source else None
    entry = entry_of(block, source) if block else {}
    method = entry.get("method") or (block or {}).get("method")
    runs = entry.get("runs") or []
    if method == "jule":
        options = [(r.get("config") or {}).get("options") for r in runs]
        if runs and all(o is not None and "ip1" not in o for o in options):
            return "JULE recorded before issue 44 (ip1 Linear -> BN -> ReLU, options.ip1 bn_relu)"
        return ""
    if method != "deepcluster":
        return ""
    if not runs or "config" not in runs[0]:
        return "this result does not record DeepCluster's options (issue 27 changed its features and PCA)"
    if "pca_variance" not in (runs[0]["config"].get("options") or {}):
        return "DeepCluster recorded before issue 27 (features after the ReLU, every dimension whitened)"
    return ""


def entry_of(block: dict, source: Source) -> dict:
    """The part of a result a source reads: its ablation row, or the whole result ({} if absent)."""
    if source.variant is None:
        return block
    return next((r for r in block.get("rows") or [] if r.get("variant") == source.variant), {})


def _flag(command: str, flag: str) -> str | None:
    words = command.split()
    return words[words.index(flag) + 1] if flag in words[:-1] else None


def _figure(s: Stats | None) -> str:
    return "-" if s is None else f"{s.mean:.3f} ± {s.std:.3f}"


def row(results: dict, claim: Claim) -> list[str]:
    a, b = measure(results, claim.ours), measure(results, claim.than)
    result, why = verdict(a, b)
    missing = {f"{s.stem}" + (f" row '{s.variant}'" if s.variant else "")
               for s, x in ((claim.ours, a), (claim.than, b)) if s is not None and x is None}
    if claim.ours is None:
        why = "nothing here measures it"
    elif missing:
        why = "no result for " + ", ".join(sorted(missing))
    seeds = " / ".join(str(x.n) for x in (a, b) if x)
    ours = "-" if a is None and b is None else f"{_figure(a)} vs {_figure(b)} (n = {seeds})"
    setting = our_setting(results, claim.ours)
    if claim.than is not None and claim.ours is not None and claim.than.stem != claim.ours.stem:
        setting += f"; vs {our_setting(results, claim.than)}"
    notes = {version_note(results, claim.ours), version_note(results, claim.than)}
    why = "; ".join(w for w in (why, claim.note, distance(claim, a, b), *sorted(notes)) if w)
    return [f"{claim.table}: {claim.figure}", f"{claim.setting}; {claim.metric}", ours, setting, result, why]


def distance(claim: Claim, a: Stats | None, b: Stats | None) -> str:
    """Our means minus the paper's figures (``claim.paper``), where both exist."""
    parts = [f"{name} {s.mean - p:+.3f} from the paper's {p:.3f}"
             for name, s, p in (("A", a, claim.paper[0]), ("B", b, claim.paper[1])) if s is not None and p is not None]
    return "ours minus the paper's: " + ", ".join(parts) if parts else ""


def departure_row(results: dict, d: Departure) -> list[str]:
    """A departure's line (see the module docstring): the measurements, if any, as "label: A vs B"."""
    shown = []
    for label, a_source, b_source in d.measured:
        a, b = measure(results, a_source), measure(results, b_source)
        seeds = " / ".join(str(x.n) for x in (a, b) if x)
        shown.append(f"{label}: {_figure(a)} vs {_figure(b)}" + (f" (n = {seeds})" if seeds else ""))
    return [f"{d.where}: {d.paper}", "the presets named after the paper", "; ".join(shown) or "-", d.ours,
            "departure" if d.kept else "as the paper", d.why]


def tables(results: dict) -> str:
    """Markdown: one table per paper, each claim a row, then each departure (see the module docstring)."""
    out = []
    head = ["paper's figure", "its setting", "ours (A vs B)", "our setting", "verdict", "why"]
    for paper, claims in CLAIMS.items():
        out += [f"### {paper}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines = [row(results, claim) for claim in claims] + [departure_row(results, d) for d in DEPARTURES.get(paper, [])]
        for line in lines:
            out.append("| " + " | ".join(cell.replace("|", "/") for cell in line) + " |")
        out.append("")
    return "\n".join(out)


def load(directory: Path) -> dict:
    """{file stem: loaded JSON} of directory/*.json."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", help="results directory (default benchmarks/results or $DEEPCLUST_RESULTS_DIR)")
    args = p.parse_args()
    print(tables(load(Path(args.results) if args.results else results_dir())))


if __name__ == "__main__":
    main()
