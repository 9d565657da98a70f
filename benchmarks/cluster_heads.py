"""Which way of reading clusters off the features works best (issue 11), per method and data set.

    python benchmarks/cluster_heads.py

Every run of benchmarks/accuracy.py scores four heads on its trained network (features extracted
once): k-means and spectral clustering, each on the L2-normalised embedding and on the backbone
layer before the head. This script gathers those per-run scores from benchmarks/results/accuracy-*.json
into benchmarks/results/cluster_heads.json: ACC / NMI / ARI mean and std over seeds, seconds per head,
and the head's time as a fraction of the run's training time.
"""

from __future__ import annotations

import json
from collections import defaultdict

from common import RESULTS, mean_std, save_result


def main() -> None:
    table = []
    for path in sorted(RESULTS.glob("accuracy-*.json")):
        r = json.loads(path.read_text())
        if r.get("quick") or not r["runs"] or "heads" not in r["runs"][0]:
            continue
        by_head = defaultdict(list)
        for run in r["runs"]:
            for h in run["heads"]:
                by_head[(h["head"], h["features"])].append({**h, "train_seconds": run["train_seconds"]})
        for (head, features), rows in sorted(by_head.items()):
            table.append({
                "method": r["method"], "data": r["data"] + (f"-{r['split']}" if r.get("split", "all") != "all" else ""), "source": path.name, "head": head, "features": features,
                "seeds": len(rows),
                **{k: mean_std([x[k] for x in rows]) for k in ("acc", "nmi", "ari", "head_seconds")},
                "head_fraction_of_training": mean_std([x["head_seconds"] / x["train_seconds"] for x in rows]),
                "collapsed_runs": sum(bool(x.get("collapsed")) for x in rows),
                "chosen_on": r.get("chosen_on"),
            })
    best = {}
    for row in table:
        key = (row["method"], row["data"])
        if key not in best or row["acc"]["mean"] > best[key]["acc"]["mean"]:
            best[key] = row
    save_result("cluster_heads", chosen_on="the accuracy results it aggregates (see each row's chosen_on)", result={
        "rows": table,
        "best": [{"method": m, "data": d, "head": b["head"], "features": b["features"], "acc": b["acc"]["mean"],
                  "nmi": b["nmi"]["mean"]} for (m, d), b in sorted(best.items())],
    })


if __name__ == "__main__":
    main()
