"""Several runs of ``bench/scale.py`` side by side: a table's JSON and the README's picture.

    python bench/scale_steps.py "LABEL=bench/out/scale-x.json" ...   # one argument per run, in order
    python bench/scale_steps.py                                         # redraw from bench/scale-steps.json

Writes ``bench/scale-steps.json`` (per run: calm and churn seconds, the
worst node's peak memory, circuit build p50/p95) and draws
``docs/bench-scale-steps.png``: left, the worst node's peak memory per run
against the 150 MiB target; right, circuit build p50 and p95 under load,
calm and churn, against the 50 ms target. Each run is one ``scale.py``
run at the default sizes (``--out`` and ``--peer-option`` to compare
settings); the runs are compared as they came, one each, so the picture
shows steps, not noise bands (README, "At scale, under churn").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

ROOT = Path(__file__).resolve().parent.parent
STEPS = ROOT / "bench" / "scale-steps.json"
PICTURE = ROOT / "docs" / "bench-scale-steps.png"


def summary(label: str, path: Path) -> dict:
    report = json.loads(path.read_text())
    row = {"label": label, "file": path.name, "date": report.get("date")}
    for r in report["rounds"][:2]:
        build = r.get("circuit_build", {})
        row[r["label"]] = {"seconds": r["seconds_to_all_verified"], "lost": r["lost"], "corrupt": r["corrupt"],
                           "worst_node_mib": r["peak_mib"]["nodes"]["max"],
                           "build_p50_ms": build.get("p50_ms"), "build_p95_ms": build.get("p95_ms")}
    return row


def draw(rows: list[dict], out: Path) -> None:
    fig, (memory, builds) = plt.subplots(1, 2, figsize=(12, 4.6))
    ys = list(range(len(rows)))[::-1]
    labels = [r["label"] for r in rows]
    for offset, (phase, color) in enumerate((("calm", "#3b6ea5"), ("churn", "#d08c2f"))):
        values = [r[phase]["worst_node_mib"] for r in rows]
        memory.barh([y + 0.2 - 0.4 * offset for y in ys], values, height=0.38, color=color, label=phase)
    memory.axvline(150, color="k", linestyle="--", linewidth=1)
    memory.text(148, len(rows) - 0.1, "target 150 MiB", fontsize=8, va="bottom", ha="right")
    memory.set_yticks(ys)
    memory.set_yticklabels(labels, fontsize=8)
    memory.set_xlabel("worst node's peak memory (VmHWM), MiB")
    memory.set_ylim(-0.6, len(rows) + 0.4)  # room above the first run for the legend
    memory.legend(loc="upper right", fontsize=8, ncol=2)
    for offset, (phase, color) in enumerate((("calm", "#3b6ea5"), ("churn", "#d08c2f"))):
        for y, r in zip(ys, rows):
            p50, p95 = r[phase]["build_p50_ms"], r[phase]["build_p95_ms"]
            at = y + 0.15 - 0.3 * offset
            builds.plot([p50, p95], [at, at], color=color, linewidth=2, label=phase if y == ys[0] else None)
            builds.plot([p50], [at], "o", color=color, markersize=4)
    builds.axvline(50, color="k", linestyle="--", linewidth=1)
    builds.text(52, len(rows) - 0.1, "target p95 50 ms", fontsize=8, va="bottom")
    builds.set_xscale("log")
    builds.set_yticks(ys)
    builds.set_yticklabels([])
    builds.set_xlabel("circuit build under load, ms: dot p50, line to p95 (log)")
    builds.set_ylim(-0.6, len(rows) + 0.4)
    builds.legend(loc="upper right", fontsize=8, ncol=2)
    fig.suptitle("60 nodes, 30 peers, 20 downloads of 16 MiB at once (bench/scale.py, one run each)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    if len(sys.argv) > 1:
        rows = []
        for argument in sys.argv[1:]:
            label, _, path = argument.partition("=")
            rows.append(summary(label, Path(path)))
        STEPS.write_text(json.dumps({"bench": "scale-steps", "runs": rows}, indent=1) + "\n")
    else:
        rows = json.loads(STEPS.read_text())["runs"]
    draw(rows, PICTURE)
    print(f"wrote {STEPS.relative_to(ROOT)} and {PICTURE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
