"""The Markdown table of ``bench/scale.py``'s JSON: one column per round (calm, churn), the
soak's rounds summed in one more; then what one idle member costs and the machine."""

from __future__ import annotations

import statistics


def _f(value, fmt: str = ".1f", none: str = "—") -> str:
    return none if value is None else format(value, fmt)


def _split_sum(splits: list[dict]) -> dict | None:
    if not splits:
        return None
    total = {k: sum(s[k] for s in splits) for k in ("through", "killed", "started", "nodes_started")}
    total["per_started_node_s"] = total["started"] / total["nodes_started"] if total["nodes_started"] else None
    return total


def _soak(rounds: list[dict]) -> dict:
    """The soak rounds as one column: counts summed, times as median (range), memory at its worst."""
    times = [r["seconds_last_verified"] for r in rounds if r["seconds_last_verified"] is not None]
    builds = [r["circuit_build"] for r in rounds if r["circuit_build"].get("p50_ms") is not None]
    return {"label": f"soak ({len(rounds)} rounds)", "downloads": sum(r["downloads"] for r in rounds),
            "verified": sum(r["verified"] for r in rounds), "lost": sum(r["lost"] for r in rounds),
            "corrupt": sum(r["corrupt"] for r in rounds), "went_back": sum(r.get("went_back", 0) for r in rounds),
            "time": f"median {_f(statistics.median(times))} s ({_f(min(times))}–{_f(max(times))})" if times else "—",
            "mb_s": statistics.median(r["mb_s"] for r in rounds if r["mb_s"]) if times else None,
            "build": (statistics.median(b["p50_ms"] for b in builds), max(b["p95_ms"] for b in builds),
                      sum(b["builds"] for b in builds), sum(b["failed"] for b in builds)) if builds else None,
            "tracker_cpu": sum(r["tracker"]["cpu_s"] for r in rounds),
            "tracker_rss": f"{rounds[0]['tracker']['rss_mib']:.0f} → {rounds[-1]['tracker']['rss_mib']:.0f}",
            "peak": {role: max(r["peak_mib"][role]["max"] for r in rounds if role in r["peak_mib"])
                     for role in ("tracker", "nodes", "peers")},
            "growth": rounds[-1].get("rss_growth_mib", {}),
            "queue": max((r["node_queue_peak_mib"]["max"] for r in rounds if r.get("node_queue_peak_mib")),
                         default=None),
            "relayed": statistics.median([r["nodes_relayed_per_verified"] for r in rounds
                                          if r.get("nodes_relayed_per_verified")] or [None]),
            "churn": {k: sum(r["churn"][k] for r in rounds) for k in ("nodes_killed", "peers_restarted")},
            "split": _split_sum([r["node_cpu_split"] for r in rounds if r.get("node_cpu_split")]),
            "converged": sum(1 for r in rounds if r["directory"]["converged"]),
            "convergence_s": max((r["directory"]["seconds"] or 0) for r in rounds)}


def _column(r: dict) -> dict:
    b = r["circuit_build"]
    return {"label": r["label"] + (f" (a node killed every {r['churn_interval_s']:g} s)" if r["churn_interval_s"]
                                   else ""),
            "downloads": r["downloads"], "verified": r["verified"], "lost": r["lost"], "corrupt": r["corrupt"],
            "went_back": r.get("went_back"),
            "time": f"**{_f(r['seconds_to_all_verified'])} s**" if r["seconds_to_all_verified"] is not None
            else f"last verified at {_f(r['seconds_last_verified'])} s",
            "mb_s": r["mb_s"],
            "build": (b["p50_ms"], b["p95_ms"], b["builds"], b["failed"]) if b.get("p50_ms") is not None else None,
            "tracker_cpu": r["tracker"]["cpu_s"], "tracker_rss": f"{r['tracker']['rss_mib']:.0f}",
            "peak": {role: r["peak_mib"][role]["max"] for role in ("tracker", "nodes", "peers") if role in r["peak_mib"]},
            "growth": r.get("rss_growth_mib", {}), "cores": r.get("cores_by_role", {}),
            "queue": (r.get("node_queue_peak_mib") or {}).get("max"),
            "relayed": r.get("nodes_relayed_per_verified"),
            "others": r.get("other_processes_cores"),
            "churn": r.get("churn"), "directory": r.get("directory"), "split": r.get("node_cpu_split")}


def render(report: dict) -> str:
    rounds = report["rounds"]
    soak = [r for r in rounds if r["label"].startswith("soak")]
    columns = [_column(r) for r in rounds if not r["label"].startswith("soak")] + ([_soak(soak)] if soak else [])
    cfg = report["config"]
    lines = [f"| {cfg['nodes']} nodes, {cfg['peers']} peers, {cfg['downloads']} downloads of {cfg['mib']} MiB at once | "
             + " | ".join(c["label"] for c in columns) + " |", "|---|" + "---:|" * len(columns)]

    def row(label: str, cell) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(c) for c in columns) + " |")

    row("verified / lost / corrupt", lambda c: f"{c['verified']} / {c['lost']} / {c['corrupt']}")
    row("downloads whose byte count went back", lambda c: f"{c.get('went_back', '—')}")
    row("time until every download was verified", lambda c: c["time"])
    row("aggregate MB/s", lambda c: f"{_f(c['mb_s'])}")
    row("circuit build under that load, p50 / p95 (builds; failed)",
        lambda c: f"{c['build'][0]:.1f} / {c['build'][1]:.1f} ms ({c['build'][2]}; {c['build'][3]})"
        if c["build"] else "—")
    row("tracker: CPU seconds; RSS MiB at the end", lambda c: f"{c['tracker_cpu']:.1f} s; {c['tracker_rss']}")
    row("peak memory (VmHWM), MiB: tracker / worst node / worst peer",
        lambda c: " / ".join(_f(c["peak"].get(role), ".0f") for role in ("tracker", "nodes", "peers")))
    row("most chunk bytes waiting in one node's queue (its /metrics), MiB",
        lambda c: _f(c.get("queue"), ".1f"))
    row("bytes the nodes relayed per byte verified (six hops; padding, base64, chunks asked twice)",
        lambda c: _f(c.get("relayed"), ".2f"))
    row("RSS growth over the round, MiB: worst node / worst peer",
        lambda c: " / ".join(_f(c["growth"].get(role, {}).get("max"), "+.1f") for role in ("nodes", "peers")))
    if any(c.get("cores") for c in columns):
        row("cores kept busy: tracker / nodes / downloading peers / other peers / others on the machine",
            lambda c: " / ".join(_f(c.get("cores", {}).get(k), ".2f") for k in
                                 ("tracker", "nodes", "downloading peers", "other peers")) +
            f" / {_f(c.get('others'), '.2f')}" if c.get("cores") else "—")
    if any(c.get("split") for c in columns):
        row("nodes' CPU seconds: there all through / killed in the round / started in it (each)",
            lambda c: f"{c['split']['through']:.0f} / {c['split']['killed']:.0f} / {c['split']['started']:.0f}"
            + (f" ({c['split']['per_started_node_s']:.2f})" if c["split"]["per_started_node_s"] else "")
            if c.get("split") else "—")
    if any(c.get("churn") for c in columns):
        row("nodes killed (and started); peers restarted",
            lambda c: f"{c['churn']['nodes_killed']}; {c['churn']['peers_restarted']}" if c.get("churn") else "—")
        row("directory converged after churn stopped",
            lambda c: "—" if not c.get("directory") and "converged" not in c else
            (f"in {c['directory']['seconds']:.1f} s ({c['directory']['views']} views, "
             f"{c['directory']['live_nodes']} live nodes)" if c.get("directory") and c["directory"]["converged"]
             else f"**no** ({c['directory']})" if c.get("directory")
             else f"{c['converged']} of the rounds, slowest {c['convergence_s']:.1f} s"))
    idle = report.get("idle", {})
    if idle:
        lines += ["", "Idle, network up, nothing to do (median per role): " + "; ".join(
            f"{role} {v['rss_mib']:.0f} MiB RSS, {v['pss_mib']:.0f} MiB PSS" for role, v in idle.items()
            if role != "all") + f"; all {idle['all']['members']} members {idle['all']['rss_mib'] / 1024:.1f} GiB "
            f"RSS, {idle['all']['pss_mib'] / 1024:.1f} GiB PSS. Cores kept busy doing nothing: " + ", ".join(
                f"{role}s {v['cores']:.2f}" for role, v in idle.items() if "cores" in v) + "."]
    mach = report["machine"]
    start = report.get("startup", {})
    if start.get("cpu_to_start_s"):
        lines += ["", "CPU seconds one member used until it was up (a node answering, a peer connected; "
                  f"{start.get('batch')} starting at once), median (most): " + "; ".join(
                      f"{role} {v['median']:.2f} ({v['max']:.2f})" for role, v in start["cpu_to_start_s"].items())
                  + "."]
    lines += ["", f"Machine: {mach.get('cores')} cores, {mach.get('cpu', '?')}, Python {mach.get('python')}, "
              f"{mach.get('openssl')}, Twisted {mach.get('twisted')}; load average before "
              f"{report['loadavg_before'][0]:.2f}; {report['date']}; network up in {_f(start.get('total_s'), '.0f')} s "
              f"({start.get('batch')} members at a time), {report['seconds']:.0f} s for the whole bench."]
    return "\n".join(lines)
