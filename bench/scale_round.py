"""One round of ``bench/scale.py``: parallel downloads, each by its own peer, with or without churn.

``Layout`` says who downloads what and who shares it; ``run_round``
links the round's files into the sharers' share directories (hard links
under names of the round: every round is a fresh download), waits until
every downloader's catalogue lists its file with all its sources, asks
all downloads at once through the peers' APIs, polls them until each is
verified (sha256 of the downloaded copy, by the bench) or failed or past
the deadline, and measures meanwhile: circuit builds
(``circuit_client.py --until``), CPU seconds by role, memory, and with
``churn`` a node SIGKILLed and a new one started every ``interval``, and
an idle peer restarted every ``peer_every`` intervals. After a churn round
it polls until the directory converged (``ScaleNetwork.converged``).
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_seconds, machine_busy, member_metrics, peer_api as api, percentile, sha256_of, vm
from scale_net import ScaleNetwork

BENCH = Path(__file__).resolve().parent
MIB = 1024 * 1024
# Sources of file k: SOURCES[k % 4]. Three files in four have several sources.
SOURCES = (2, 3, 1, 4)
POLL = 0.25  # seconds between looks at the downloads still under way


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Layout:
    """Peer k downloads file k (k < downloads); the file's sharers are other peers, as many
    as ``SOURCES`` says. A file with one source gets a downloading peer as its sharer: only
    idle peers are restarted under churn, so no download loses its only source for good."""

    def __init__(self, peers: list[str], downloads: int, rng: random.Random):
        if downloads > len(peers):
            raise ValueError(f"{downloads} downloads need as many peers (there are {len(peers)})")
        self.downloaders = peers[:downloads]
        self.idle = peers[downloads:]  # the peers restarted under churn
        self.sharers: list[list[str]] = []
        for k in range(downloads):
            others = [p for p in peers if p != peers[k]]
            wanted = min(SOURCES[k % len(SOURCES)], len(others))
            if wanted == 1 and downloads > 1:
                self.sharers.append([peers[(k + 1) % downloads]])
            else:
                self.sharers.append(rng.sample(others, wanted))

    def summary(self) -> dict:
        counts = [len(s) for s in self.sharers]
        return {"files": len(counts), "sources_per_file": counts,
                "files_with_several_sources": sum(1 for c in counts if c > 1)}


class Churn:
    """Every ``interval`` s a random live node SIGKILLed and a new one started at a new address;
    every ``peer_every`` intervals a random idle peer SIGKILLed and started again."""

    def __init__(self, net: ScaleNetwork, interval: float, peer_every: int, idle_peers: list[str], began: float):
        self.net, self.interval, self.peer_every, self.idle_peers = net, interval, peer_every, idle_peers
        self.next_at = began + interval
        self.ticks = 0
        self.killed: list[str] = []
        self.started: list[str] = []
        self.restarted: list[str] = []

    def tick(self, now: float) -> None:
        if now < self.next_at:
            return
        self.ticks += 1
        self.killed.append(self.net.kill_node().name)
        self.started.append(self.net.add_node().name)
        if self.peer_every and self.idle_peers and self.ticks % self.peer_every == 0:
            name = self.net.rng.choice(self.idle_peers)
            self.net.restart_peer(name)
            self.restarted.append(name)
        self.next_at = max(self.next_at + self.interval, now + self.interval / 2)  # no burst after a stall

    def summary(self) -> dict:
        return {"interval_s": self.interval, "nodes_killed": len(self.killed), "nodes_started": len(self.started),
                "peers_restarted": len(self.restarted), "killed": self.killed, "restarted": self.restarted}


def link_files(net: ScaleNetwork, layout: Layout, files: list[Path], label: str) -> list[str]:
    names = [f"{label}-{k + 1:02d}.bin" for k in range(len(layout.downloaders))]
    for k, name in enumerate(names):
        for sharer in layout.sharers[k]:
            os.link(files[k], net.run_dir / sharer / "share" / name)
    return names


def unlink_files(net: ScaleNetwork, layout: Layout, names: list[str]) -> None:
    for k, name in enumerate(names):
        for peer in (*layout.sharers[k], layout.downloaders[k]):
            for where in ("share", "downloads"):
                (net.run_dir / peer / where / name).unlink(missing_ok=True)


def wait_listed(net: ScaleNetwork, layout: Layout, names: list[str], timeout: float) -> float:
    """Until each downloader's catalogue lists its file with all its sharers; seconds waited."""
    began = time.monotonic()
    waiting = set(range(len(names)))
    while waiting:
        for k in sorted(waiting):
            rows = api(net.page_address(layout.downloaders[k]), "/api/status")["catalogue"]
            if any(r.get("name") == names[k] and r.get("root") and (r.get("sources") or 0) >= len(layout.sharers[k])
                   for r in rows):
                waiting.discard(k)
        if waiting and time.monotonic() - began > timeout:
            raise RuntimeError(f"not listed with all their sources after {timeout:.0f} s: "
                               f"{[names[k] for k in sorted(waiting)]}")
        time.sleep(0.5)
    return time.monotonic() - began


def start_circuit_client(net: ScaleNetwork, stop_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH / "circuit_client.py"), "--bind", net.client_ip,
                             "--tracker", net.address(net.tracker_ip), "--until", str(stop_file),
                             *(["--tls"] if net.tls else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def circuit_builds(client: subprocess.Popen, stop_file: Path) -> dict:
    stop_file.touch()
    try:
        out, err = client.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        client.kill()
        out, err = client.communicate()
    if client.returncode != 0:
        return {"error": err[-1000:]}
    data = json.loads(out.strip().splitlines()[-1])
    builds = [s * 1e3 for s in data["build_s"]]
    return {"builds": len(builds), "failed": len(data["failed"]), "failed_examples": data["failed"][:3],
            "p50_ms": statistics.median(builds) if builds else None,
            "p95_ms": percentile(builds, 0.95) if builds else None}


def own_cpu() -> float:
    """CPU seconds of this process and its finished children (the circuit client)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def roles(net: ScaleNetwork, layout: Layout) -> dict[int, tuple[str, str]]:
    """pid -> (name, role) of every process the network ever started; peers split by what they do."""
    downloading = set(layout.downloaders)
    return {m.process.pid: (m.name, "downloading peers" if m.name in downloading else "other peers")
            if m.role == "peer" else (m.name, {"node": "nodes"}.get(m.role, m.role)) for m in net.members}


def process_figures(net: ScaleNetwork) -> dict[int, dict]:
    """pid -> CPU seconds, RSS and peak RSS (VmHWM) now, or as read before its SIGKILL."""
    figures = {}
    for m in net.members:
        pid = m.process.pid
        if m.process.poll() is None:
            figures[pid] = {"cpu_s": cpu_seconds(pid), "rss": vm(pid, "VmRSS"), "hwm": vm(pid, "VmHWM")}
        elif pid in net.ended:
            figures[pid] = net.ended[pid]
    return figures


def memory_and_cpu(net: ScaleNetwork, layout: Layout, before: dict, after: dict, seconds: float) -> dict:
    who = roles(net, layout)
    cpu: dict[str, float] = {}
    for pid, end in after.items():
        cpu[who[pid][1]] = cpu.get(who[pid][1], 0.0) + (end["cpu_s"] or 0.0) - (before.get(pid, {}).get("cpu_s") or 0.0)
    by_role: dict[str, list] = {}
    growth: dict[str, list] = {}
    for pid, end in after.items():
        role = "peers" if who[pid][1].endswith("peers") else who[pid][1]
        by_role.setdefault(role, []).append(end["hwm"] / MIB)
        if pid in before and net_alive(net, pid):
            growth.setdefault(role, []).append((end["rss"] - before[pid]["rss"]) / MIB)
    tracker = next(pid for pid, (name, _) in who.items() if name == "tracker")
    return {"cpu_s_by_role": {k: round(v, 2) for k, v in cpu.items()},
            "node_cpu_split": node_cpu_split(net, who, before, after),
            "cores_by_role": {k: round(v / seconds, 3) for k, v in cpu.items()},
            "tracker": {"cpu_s": round(cpu.get("tracker", 0.0), 2), "rss_mib": after[tracker]["rss"] / MIB,
                        "hwm_mib": after[tracker]["hwm"] / MIB},
            "peak_mib": {role: {"max": max(v), "median": statistics.median(v)} for role, v in by_role.items()},
            "rss_growth_mib": {role: {"max": max(v), "median": statistics.median(v)} for role, v in growth.items()},
            "hwm_by_member": {who[pid][0] + ("" if net_alive(net, pid) else f" (killed, pid {pid})"):
                              round(f["hwm"] / MIB, 1)
                              for pid, f in after.items()},
            # At the round's end: whether a member's memory keeps growing over a soak (peaks only rise).
            "rss_by_member": {who[pid][0]: round(f["rss"] / MIB, 1) for pid, f in after.items()
                              if net_alive(net, pid)}}


def node_cpu_split(net: ScaleNetwork, who: dict, before: dict, after: dict) -> dict:
    """The nodes' CPU seconds in the round by where it went: nodes there all through it, nodes
    killed in it (up to the kill), nodes started in it (their start included: imports, keys,
    registration; each started node counted once, killed again or not): what churn costs
    the cores beyond the relaying, on a machine where every new member starts on the same cores."""
    split = {"through": 0.0, "killed": 0.0, "started": 0.0}
    started = 0
    for pid, end in after.items():
        if who[pid][1] != "nodes":
            continue
        used = (end["cpu_s"] or 0.0) - (before.get(pid, {}).get("cpu_s") or 0.0)
        if pid not in before:
            split["started"] += used
            started += 1
        else:
            split["through" if net_alive(net, pid) else "killed"] += used
    figures = {k: round(v, 2) for k, v in split.items()}
    figures["nodes_started"] = started
    figures["per_started_node_s"] = round(split["started"] / started, 2) if started else None
    return figures


def node_metrics(net: ScaleNetwork) -> dict[str, dict]:
    """name -> what each live node's ``/metrics`` says of its cell queue and the bytes it relayed."""
    found = {}
    for m in net.role_members("node"):
        try:
            samples = member_metrics(net, m.ip, timeout=5)
        except OSError:
            continue  # killed meanwhile
        found[m.name] = {"queue_peak": samples.get("onion_node_queued_bytes_peak", 0.0),
                         "relayed": sum(v for k, v in samples.items() if k.startswith("onion_node_bytes_total{"))}
    return found


def tracker_state(net: ScaleNetwork) -> dict:
    """What the tracker holds at a round's end, by its ``/metrics`` gauges (nodes, circuits,
    catalogue entries, transfers): in a soak, whether its state grows or only its heap."""
    try:
        samples = member_metrics(net, net.tracker_ip, timeout=5)
    except OSError:
        return {}
    return {name[len("onion_tracker_"):]: int(value) for name, value in samples.items()
            if name in ("onion_tracker_nodes", "onion_tracker_circuits", "onion_tracker_catalogue_entries",
                        "onion_tracker_transfers")}


def node_figures(before: dict, after: dict, verified_bytes: int) -> dict:
    """The most bytes that ever waited in one node's queue (whether a node's peak memory is held
    there; over each node's life so far), and the payload bytes the nodes relayed in the round
    (nodes alive at its start and end) per byte verified: six hops, padding and base64, and
    whatever a download asked twice."""
    peaks = [f["queue_peak"] / MIB for f in after.values()]
    relayed = sum(f["relayed"] - before[name]["relayed"] for name, f in after.items() if name in before)
    return {"node_queue_peak_mib": {"max": round(max(peaks), 1), "median": round(statistics.median(peaks), 1),
                                    "nodes": len(peaks)} if peaks else None,
            "nodes_relayed_mib": round(relayed / MIB, 1),
            "nodes_relayed_per_verified": round(relayed / verified_bytes, 2) if verified_bytes else None}


def net_alive(net: ScaleNetwork, pid: int) -> bool:
    return any(m.process.pid == pid and m.process.poll() is None for m in net.members)


def run_round(net: ScaleNetwork, layout: Layout, files: list[Path], shas: list[str], label: str, *,
              churn: float = 0.0, peer_every: int = 5, deadline: float = 600.0, converge_timeout: float = 90.0,
              tmp: Path) -> dict:
    names = link_files(net, layout, files, label)
    listed_s = wait_listed(net, layout, names, timeout=300)
    log(f"[{label}] {len(names)} files listed in {listed_s:.1f} s; downloading" +
        (f" with a node killed every {churn:g} s" if churn else ""))
    stop_file = tmp / f"stop-{label}"
    client = start_circuit_client(net, stop_file)
    ended_before = set(net.ended)  # processes of earlier rounds count to those rounds only
    before = {p: f for p, f in process_figures(net).items() if p not in ended_before}
    nodes_before = node_metrics(net)
    busy0, own0 = machine_busy(), own_cpu()
    began = time.perf_counter()
    for k, name in enumerate(names):
        api(net.page_address(layout.downloaders[k]), "/api/downloads", {"file": name})
    churner = Churn(net, churn, peer_every, layout.idle, began) if churn else None
    pending, results = set(range(len(names))), {}
    most: dict[int, int] = {}        # file k -> the most bytes its download showed
    went_back: dict[int, list] = {}  # file k -> [(bytes before, bytes after)]: a download that lost chunks
    progress_at = began + 10
    while pending and time.perf_counter() - began < deadline:
        if churner:
            churner.tick(time.perf_counter())
        under_way = []
        for k in sorted(pending):
            peer = layout.downloaders[k]
            state = next((d for d in api(net.page_address(peer), "/api/status")["downloads"]
                          if d["file"] == names[k]), None)
            if state is not None and state["bytes"] < most.get(k, 0):
                went_back.setdefault(k, []).append((most[k], state["bytes"]))
            if state is not None:
                most[k] = max(most.get(k, 0), state["bytes"])
            if state is None or state["state"] not in ("done", "failed"):
                under_way.append(state)
                continue
            pending.discard(k)
            row = {"peer": peer, "file": names[k], "sources": len(layout.sharers[k]), "state": state["state"],
                   "attempts": state.get("attempts"), "error": state.get("error"), "size": state.get("size")}
            if state["state"] == "done":
                row["sha256_ok"] = sha256_of(net.run_dir / peer / "downloads" / names[k]) == shas[k]
            row["seconds"] = time.perf_counter() - began
            row["went_back"] = went_back.get(k, [])
            results[k] = row
        if time.perf_counter() > progress_at and under_way:
            progress_at += 10
            log(f"[{label}] {time.perf_counter() - began:.0f} s: {len(results)} finished; under way: " + ", ".join(
                f"{s['bytes'] * 100 // max(1, s['size'] or 1)} % (attempt {s.get('attempts')})" if s else "not listed"
                for s in under_way) + (f"; {churner.ticks} nodes killed" if churner else ""))
        time.sleep(POLL)
    seconds = time.perf_counter() - began
    after = {p: f for p, f in process_figures(net).items() if p not in ended_before}
    busy1 = machine_busy()
    builds = circuit_builds(client, stop_file)
    others = None
    if busy0 is not None and busy1 is not None:
        ours = sum((after[p]["cpu_s"] or 0) - (before.get(p, {}).get("cpu_s") or 0) for p in after)
        others = max(0.0, (busy1 - busy0) - ours - (own_cpu() - own0)) / seconds
    for k in pending:  # past the deadline: lost
        results[k] = {"peer": layout.downloaders[k], "file": names[k], "sources": len(layout.sharers[k]),
                      "state": "not done by the deadline", "seconds": None}
    rows = [results[k] for k in sorted(results)]
    verified = [r for r in rows if r.get("sha256_ok")]
    lost = [r for r in rows if r["state"] != "done"]
    corrupt = [r for r in rows if r["state"] == "done" and not r["sha256_ok"]]
    last = max((r["seconds"] for r in verified), default=None)
    report = {"label": label, "churn_interval_s": churn or None, "downloads": len(rows), "verified": len(verified),
              "lost": len(lost), "corrupt": len(corrupt), "listed_s": listed_s,
              "went_back": sum(1 for k in went_back),
              "seconds_to_all_verified": last if not lost and not corrupt else None,
              "seconds_last_verified": last, "round_s": seconds,
              "mb_s": sum(r["size"] for r in verified) / last / 1e6 if verified else None,
              "per_download": rows, "circuit_build": builds, "other_processes_cores": others,
              "loadavg": os.getloadavg()}
    report.update(memory_and_cpu(net, layout, before, after, seconds))
    report.update(node_figures(nodes_before, node_metrics(net), sum(r["size"] for r in verified)))
    report["tracker_state"] = tracker_state(net)
    if churner:
        report["churn"] = churner.summary()
        log(f"[{label}] churn stopped: {report['churn']['nodes_killed']} nodes killed, "
            f"{report['churn']['peers_restarted']} peers restarted; waiting for the directory to converge ...")
        report["directory"] = net.converged(converge_timeout)
    log(f"[{label}] {len(verified)}/{len(rows)} verified, {len(lost)} lost, {len(corrupt)} corrupt; "
        f"last at {last if last is not None else float('nan'):.1f} s; circuit build p50/p95 "
        f"{builds.get('p50_ms') or float('nan'):.1f}/{builds.get('p95_ms') or float('nan'):.1f} ms")
    unlink_files(net, layout, names)
    return report
