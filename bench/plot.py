"""The README's picture of ``make bench``: the networks side by side, from ``bench/results.json``.

    python bench/plot.py [results.json] [out.png]   # default: bench/results.json -> docs/bench-protocols.png

Left: bulk MB/s of each network (every run a dot, the median a bar). Right:
CPU milliseconds per MiB moved, stacked by member (median run): where TLS
and onion-http/2 spend their time. ``scripts/bench`` runs it after the bench.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

ROOT = Path(__file__).resolve().parent.parent
ROLES = (("peers", ("alice", "bob")), ("nodes", tuple(f"node{i}" for i in range(1, 7))), ("tracker", ("tracker",)))


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "bench-protocols.png"
    report = json.loads(source.read_text())
    profiles = report["profiles"]
    names = list(profiles)
    labels = [profiles[p]["label"].replace(", ", "\n", 1) for p in names]
    fig, (speed, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))

    medians = [profiles[p]["bulk"]["onion_mb_s_median"] for p in names]
    speed.bar(range(len(names)), medians, color=["#3b6ea5", "#8fb3d9", "#b0b0b0"][:len(names)])
    for i, p in enumerate(names):
        runs = profiles[p]["bulk"]["onion_mb_s"]
        speed.plot([i] * len(runs), runs, "k.", markersize=4)
        speed.text(i, medians[i] + 1, f"{medians[i]:.1f}", ha="center")
    mib = profiles[names[0]]["bulk"]["mib"]
    speed.set_title(f"bulk transfer, {mib} MiB bob → alice (MB/s)")
    speed.set_xticks(range(len(names)), labels, fontsize=8)
    speed.set_ylim(0, max(max(profiles[p]["bulk"]["onion_mb_s"]) for p in names) * 1.2)

    bottom = [0.0] * len(names)
    for (role, members), color in zip(ROLES, ("#d98c3b", "#3b6ea5", "#7a7a7a")):
        values = [sum(v for n, v in profiles[p]["bulk"]["cpu_ms_per_mib"].items() if n in members) for p in names]
        cpu.bar(range(len(names)), values, bottom=bottom, color=color, label=role)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, total in enumerate(bottom):
        cpu.text(i, total + 0.5, f"{total:.0f}", ha="center")
    cpu.set_title("CPU per MiB, all members (ms)")
    cpu.set_xticks(range(len(names)), labels, fontsize=8)
    cpu.legend(fontsize=8)
    fig.suptitle(f"make bench, {report['date']}: 9 processes on {report['machine'].get('cores')} cores", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
