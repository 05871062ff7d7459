"""What the churn round costs beyond starting processes: ``bench/scale.py`` runs with and
without ``--fork-starts``, side by side.

    for i in 1 2 3; do
      python bench/scale.py --out bench/out/scale-exec$i.json
      python bench/scale.py --fork-starts --out bench/out/scale-fork$i.json
    done
    python bench/scale_starts.py bench/out/scale-exec*.json bench/out/scale-fork*.json

Per run: the calm and churn rounds' times and their ratio, every member's CPU
seconds in each round, and the share of the churn round's that the members
started in it used (the nodes: their start and whatever they relayed after
it; the restarted peers at the median start cost the run measured). The
cores are full in both rounds (1.9 of 2), so a round's time follows its CPU
seconds.
Writes ``bench/scale-starts.json`` and prints a Markdown table.

Any other comparison of runs, by labels (``--out`` for another file); the memory
columns are the nodes' peaks (VmHWM) and their resident size once a round's downloads
are done:

    python bench/scale_starts.py --out bench/scale-spare.json spare=bench/out/scale-spare1.json \
        nospare=bench/out/scale-nospare1.json ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def figures(path: Path) -> dict:
    report = json.loads(path.read_text())
    calm, churn = report["rounds"][:2]
    calm_cpu, churn_cpu = (sum(r["cpu_s_by_role"].values()) for r in (calm, churn))
    split = churn["node_cpu_split"]
    peer_start = report["startup"]["cpu_to_start_s"]["peer"]["median"]
    starts = split["started"] + churn["churn"]["peers_restarted"] * peer_start
    return {"file": path.name, "fork_starts": bool(report["config"].get("fork_starts")), "date": report["date"],
            "calm_s": round(calm["seconds_to_all_verified"], 1), "churn_s": round(churn["seconds_to_all_verified"], 1),
            "ratio": round(churn["seconds_to_all_verified"] / calm["seconds_to_all_verified"], 2),
            "calm_cpu_s": round(calm_cpu, 1), "churn_cpu_s": round(churn_cpu, 1),
            "cores_calm": round(calm_cpu / calm["round_s"], 2), "cores_churn": round(churn_cpu / churn["round_s"], 2),
            "nodes_started": split["nodes_started"], "started_nodes_cpu_s": split["started"],
            "peers_restarted": churn["churn"]["peers_restarted"],
            "started_members_share": round(starts / churn_cpu, 2),
            "worst_node_mib": max(r["peak_mib"]["nodes"]["max"] for r in (calm, churn)),
            "node_peak_median_mib": [round(r["peak_mib"]["nodes"]["median"], 1) for r in (calm, churn)],
            "node_idle_rss_mib": round(report["idle"]["node"]["rss_mib"], 1),
            # what a node keeps once the round's downloads are done: each round's end, median of the nodes
            "node_rss_end_median_mib": [round(statistics.median(
                v for name, v in r["rss_by_member"].items() if name.startswith("node")), 1) for r in (calm, churn)],
            "lost_or_corrupt": sum(r["lost"] + r["corrupt"] for r in (calm, churn))}


def main(args: list[str]) -> int:
    out = BENCH / "scale-starts.json"
    if args[:1] == ["--out"]:
        out, args = Path(args[1]), args[2:]
    runs = []
    for arg in args:
        label, _, path = arg.rpartition("=")
        run = figures(Path(path))
        run["label"] = label or ("fork" if run["fork_starts"] else "exec")
        runs.append(run)
    summary = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        summary[label] = {
            "runs": len(mine), "ratio_median": statistics.median(r["ratio"] for r in mine),
            "ratio_range": [min(r["ratio"] for r in mine), max(r["ratio"] for r in mine)],
            "started_members_share_median": statistics.median(r["started_members_share"] for r in mine),
            "worst_node_mib": [min(r["worst_node_mib"] for r in mine), max(r["worst_node_mib"] for r in mine)],
            "node_peak_median_mib": statistics.median(v for r in mine for v in r["node_peak_median_mib"]),
            "node_rss_end_median_mib": statistics.median(v for r in mine for v in r["node_rss_end_median_mib"])}
    out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    print("| run | label | calm | churn | churn ÷ calm | CPU s calm / churn |"
          " of the churn round's CPU, members started in it | worst node | a node's peak, median (calm / churn) |"
          " a node at the round's end, median |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['file']} | {r['label']} | {r['calm_s']} s | {r['churn_s']} s | "
              f"{r['ratio']:.2f}× | {r['calm_cpu_s']:.0f} / {r['churn_cpu_s']:.0f} | {r['started_members_share']:.0%} | "
              f"{r['worst_node_mib']:.0f} MiB | {r['node_peak_median_mib'][0]:.0f} / {r['node_peak_median_mib'][1]:.0f} MiB | "
              f"{r['node_rss_end_median_mib'][0]:.0f} / {r['node_rss_end_median_mib'][1]:.0f} MiB |")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
