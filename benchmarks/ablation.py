"""Ablation tables in the style of the papers, on one CPU data set: each row is a method run with
some of its options changed, everything else as in the given preset (same network, views, epochs,
seeds).

    python benchmarks/ablation.py --table pcp-components --data digits --config pcp-cpu --seeds 0 1 2
    python benchmarks/ablation.py --table pcp-table1     --data digits --config pcp-cpu
    python benchmarks/ablation.py --table pcp-floor      --data digits --config pcp-cpu
    python benchmarks/ablation.py --table deepcluster-clusters --data digits --config deepcluster-cpu
    python benchmarks/ablation.py --table pad            --data digits --config pad-cpu
    python benchmarks/ablation.py --table dccm-components --data digits --config dccm-cpu

Tables:
  pcp-components        PCP Table I: DeepCluster-style clusters on the bank (no PC, no CP), + PC,
                        + CP_r, + CP_s (the full method)
  pcp-table1            PCP Table I as printed: N_c = 100, no warm-up, DeepCluster (deepcluster-cpu,
                        K' = 100) as the first row, then PCP + PC, + CP_r, + CP_s
  pcp-loss              PCP's cluster term: the reference code's form (logsum) vs Eq 5 as printed (eq5)
  pcp-floor             PCP Table III: the final cluster count N_t0, with and without the warm-up
  deepcluster-clusters  Table III's DeepCluster row: its k-means cluster count
  pad                   PAD Tables 3-6: diffusion off, cyclic off, scale off / other s, HPE off /
                        cosine, k, lambda
  dccm-components       DCCM Table 3: M1 (pseudo-graph loss alone), M2 + local robustness,
                        M3 + pseudo-labels, M4 + triplet mutual information (DCCM)
  dccm-pairs            DCCM Table 6: the MI pair strategies V1-V4
  and-curriculum        AND Table 6: the curriculum of Eq 6 vs the one-off discovery
  jule-ip1              JULE (issue 44): jule_cnn's ip1 as the paper's Linear -> L2 (Table 9) against
                        Linear -> BN -> ReLU -> L2, both with the small-cluster rule on (0.05); and the
                        paper's ip1 with the rule off (0, the paper's plain cut); SF (own clusters) and
                        RC (the agglomerative head) both recorded

Recorded per row (mean, std, median over seeds): ACC / NMI / ARI of the chosen head, of the method's
own clusters when it has them, kNN top-1, train seconds; per seed also the chosen head's cluster sizes. Result: RESULTS/ablation-TABLE-DATA[-TAG].json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from common import class_count, data_spec, exclusive, fail, mean_std, resolved_config, save_result

TABLES: dict[str, list[tuple[str, list[str]]]] = {
    "pcp-components": [
        ("DC (clusters of the bank, N_t0 fixed)", ["options.progressive=false", "options.gamma=0", "options.voting=false"]),
        ("+ PC", ["options.gamma=0", "options.voting=false"]),
        ("+ PC + CP_r", ["options.voting=false"]),
        ("+ PC + CP_r + CP_s (PCP)", []),
    ],
    # PCP Table I in the paper's configuration (Sec IV-A): N_c = 100, no warm-up, and its DC row is
    # DeepCluster itself (K' = 100, from deepcluster-cpu: see OTHER_METHOD)
    "pcp-table1": [
        ("DC: DeepCluster, K' = 100", ["options.clusters=100"]),
        *[(label, ["options.warmup=false", "options.floor=100", "options.images_per_cluster=null", *sets])
          for label, sets in (("+ PC", ["options.gamma=0", "options.voting=false"]),
                              ("+ PC + CP_r", ["options.voting=false"]), ("+ PC + CP_r + CP_s (PCP)", []))],
    ],
    # PCP's cluster term: the reference code's -log sum over members (our default) beside Eq 5 as printed
    "pcp-loss": [("logsum (reference code)", ["options.loss_form=logsum"]), ("Eq 5 as printed", ["options.loss_form=eq5"])],
    "pcp-floor": [(f"N_t0 = {f}" + (" (no warm-up)" if not w else ""),
                   [f"options.floor={f}", f"options.warmup={str(w).lower()}", "options.images_per_cluster=null"])
                  for w in (True, False) for f in (5, 10, 50, 100, 300)],
    "deepcluster-clusters": [(f"K' = {k}", [f"options.clusters={k}"]) for k in (5, 10, 50, 100, 300)],
    "pad": [
        ("PAD (k 5, s 10, KL HPE, lambda 0.8)", []),
        ("diffusion off (kNN groups, k 10)", ["options.diffusion=false"]),
        ("cyclic constraint off", ["options.cyclic=false"]),
        ("scale constraint off", ["options.max_size=null"]),
        ("s = 5", ["options.max_size=5"]),
        ("s = 20", ["options.max_size=20"]),
        ("HPE off", ["options.hpe=off"]),
        ("HPE as feature cosine", ["options.hpe=cosine"]),
        ("k = 3", ["options.neighbours=3"]),
        ("k = 10", ["options.neighbours=10"]),
        ("lambda = 0.2", ["options.hpe_weight=0.2"]),
        ("lambda = 1.0", ["options.hpe_weight=1.0"]),
    ],
    # DCCM Table 3: M1 the pseudo-graph loss alone, M2 + local robustness (LR), M3 + pseudo-labels
    # (PL), M4 + triplet mutual information (MI) = DCCM
    "dccm-components": [
        ("M1: L_PG only", ["options.local_robustness=false", "options.pseudo_labels=false",
                           "options.mutual_information=false"]),
        ("M2: + LR", ["options.pseudo_labels=false", "options.mutual_information=false"]),
        ("M3: + LR + PL", ["options.mutual_information=false"]),
        ("M4: + LR + PL + MI (DCCM)", []),
    ],
    # AND Table 6: the curriculum (S = r / R, Eq 6) against the one-off discovery (every anchor
    # neighbourhood used from round 1 on), the same rounds and epochs
    "and-curriculum": [("curriculum (S = r / R)", ["options.curriculum=linear"]),
                       ("one-off", ["options.curriculum=one-off"])],
    # DCCM Table 6 (supplement): how the MI positives and negatives are drawn
    "dccm-pairs": [(f"V{i + 1}: {v}", [f"options.pairs={v}"]) for i, v in enumerate(
        ("nearest-random", "nearest-farthest", "random-random", "topn-random"))],
    # JULE's ip1 (Table 9 and the authors' models: Linear -> L2) against Linear -> BN -> ReLU -> L2 at
    # options.small_fraction 0.05 (the small-cluster rule), then the paper's ip1 at 0 (the paper's cut)
    "jule-ip1": [(f"ip1 {label}, small_fraction {f}", [f"options.ip1={ip1}", f"options.small_fraction={f}"])
                 for ip1, label, f in (("linear", "Linear -> L2 (paper)", "0.05"),
                                       ("bn_relu", "Linear -> BN -> ReLU -> L2", "0.05"),
                                       ("linear", "Linear -> L2 (paper)", "0"))],
}
METHOD_OF = {"pcp-components": "pcp", "pcp-table1": "pcp", "pcp-loss": "pcp", "pcp-floor": "pcp",
             "deepcluster-clusters": "deepcluster", "pad": "pad", "dccm-components": "dccm", "dccm-pairs": "dccm", "and-curriculum": "and",
             "jule-ip1": "jule"}
OTHER_METHOD = {"DC: DeepCluster, K' = 100": ("deepcluster", "deepcluster-cpu")}  # row label -> (method, preset)
KEYS = ("acc", "nmi", "ari", "knn_top1", "train_seconds")
# Cluster heads recorded beside the chosen one, (prefix, head, features or None for any): the method's
# own clusters (JULE's SF) and the agglomerative head on the embedding (JULE's RC), NMI both ways
HEAD_KEYS = (("own", "method", None), ("agglomerative", "agglomerative", "embedding"))
HEAD_SCORES = ("acc", "nmi", "nmi_geometric", "ari")


def run_variant(method: str, spec: str, config: str, sets: list[str], seed: int, common: tuple[str, ...] = ()) -> dict:
    """One seed of one row: the preset, then ``common`` (--set, every row), then the row's ``sets``."""
    from deepclust.config import read_yaml, set_dotted
    from deepclust.configure import build_config
    from deepclust.runs import fit_run

    out = tempfile.mkdtemp(prefix="deepclust-ablation-")
    layer: dict = {"method": method, "data": {"spec": spec}, "train": {"seed": seed, "progress": False}, "out": out,
                   "cluster": {"n_clusters": class_count(spec)}}  # the papers' K (--set wins)
    for item in (*common, *sets):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set takes KEY=VALUE, got '{item}'")
        set_dotted(layer, key, None if value == "null" else value)
    cfg = build_config(read_yaml(config), layer)
    try:
        m = fit_run(cfg)
        resolved = resolved_config(out, cfg)  # every option of the row's run (papers.py reads them)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    scores = {}
    for prefix, kind, features in HEAD_KEYS:
        h = next((h for h in m.get("heads", []) if h["head"] == kind and features in (None, h.get("features"))), {})
        scores |= {f"{prefix}_{k}": h.get(k) for k in HEAD_SCORES if h.get(k) is not None}
    return {"seed": seed, **{k: m.get(k) for k in KEYS}, **scores, "cluster_sizes": m.get("cluster_sizes"),
            "config": {"method": resolved.get("method"), "options": resolved.get("options")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, choices=sorted(TABLES))
    p.add_argument("--data", default="digits")
    p.add_argument("--config", required=True, help="the preset every row starts from")
    p.add_argument("--chosen-on", required=True, help="the data the preset's settings were chosen on")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="", help="suffix of the result's name (ablation-TABLE-DATA-TAG.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of every row's run (before the row's own), e.g. train.threads=1")
    args = p.parse_args()
    method, spec = METHOD_OF[args.table], data_spec(args.data)
    name = f"ablation-{args.table}-{args.data}" + (f"-{args.tag}" if args.tag else "")
    rows = []
    with exclusive(name):
        t0 = time.perf_counter()
        for label, sets in TABLES[args.table]:
            row_method, row_config = OTHER_METHOD.get(label, (method, args.config))
            runs = [run_variant(row_method, spec, row_config, sets, seed, tuple(args.set)) for seed in args.seeds]
            heads = [f"{prefix}_{k}" for prefix, _, _ in HEAD_KEYS for k in HEAD_SCORES]
            keys = [k for k in (*KEYS, *heads) if any(r.get(k) is not None for r in runs)]
            other = {"method": row_method, "config": row_config} if label in OTHER_METHOD else {}
            rows.append({"variant": label, "set": sets, **other, "runs": runs,
                         "summary": {k: mean_std([r.get(k) for r in runs]) for k in keys}})
            print(label, {k: rows[-1]["summary"][k].get("mean") for k in keys}, flush=True)
        if not rows:
            fail("nothing to run")
        save_result(name, {"table": args.table, "method": method, "data": args.data, "config": args.config,
                           "seeds": args.seeds, "rows": rows, "wall_seconds": round(time.perf_counter() - t0, 1)},
                    chosen_on=args.chosen_on)


if __name__ == "__main__":
    main()
