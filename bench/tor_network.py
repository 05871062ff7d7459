"""``make bench``, beside Tor: a private Tor network on loopback, measured as the project is.

Installs Debian's ``tor`` if it is missing (``apt-get install -y tor``, as
root); if Tor cannot be had or started, writes ``{"tor": "unavailable",
"why": ...}`` and exits 0, so that the rest of ``make bench`` still reports.

In a temporary directory, on addresses 127.A.B.x (one per process, every
port bound to it), with ``TestingTorNetwork 1`` (fast voting, flags given
without uptime; ``tor_testnet.py``), it starts ``--authorities`` directory authorities that are
relays too (keys by ``tor-gencert``, fingerprints by ``tor
--list-fingerprint``), ``--relays`` more relays, an onion service (v3)
whose port 80 is a plain Twisted Web server (``plain_get.py serve``) holding
a ``--mib`` MiB random file, and a client tor with a SocksPort. Then:

1. **bootstrap**: from the first tor started to the client at 100 % with
   every relay in its consensus, and the service's descriptor stored on the
   HSDirs it was sent to (its ``HS_DESC`` events);
2. **first fetch**: a 6-byte file through the onion service by curl over
   SOCKS (``--socks5-hostname``): descriptor fetch, introduction, rendezvous
   and the stream, from nothing;
3. **circuit build**: first a two-hop circuit over every ordered pair of
   relays (the warm-up: every TLS channel opened, as the project's builds
   find their pools warm; timed apart), then ``--builds`` three-hop
   circuits over random relays, one after the other, each timed from
   ``EXTENDCIRCUIT`` on the client's control port to its ``CIRC BUILT``
   event (``tor_control.py``);
4. **bulk**: the big file through the onion service, ``--runs`` times (curl,
   written to disk, sha256 checked); MB/s and their median, and the CPU every
   process spent per MiB (all tors, the HTTP server, curl).

Prints a Markdown table beside the project's figures (``--project``:
``network.py``'s JSON of the same ``make bench`` run) and ``project bulk ÷
Tor onion service = N×``; writes ``bench/tor.json`` (``--quick``: 32 MiB,
2 runs, 20 builds, ``bench/out/tor-quick.json``). ``--compare-only``:
prints the comparison of the two JSONs already written. Every process and
the temporary directory are removed on exit, error and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import random
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import ALL_PROCS, machine, machine_busy, percentile, sha256_of
from tor_control import DescriptorUploads, time_circuit_builds
from tor_testnet import TorNetwork, ensure_tor, wait_until

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
MIB = 1024 * 1024
HELLO = b"hello\n"  # the first fetch's file


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def curl(socks: str, url: str, out: Path, timeout: float) -> dict:
    """One GET through Tor's SOCKS port: curl's own timings and the bytes it wrote."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(["curl", "-sS", "--fail", "--max-time", str(timeout), "--socks5-hostname", socks,
                           "-o", str(out), "-w", "%{time_connect} %{time_total} %{size_download}", url],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url}: {done.returncode} {done.stderr.strip()}")
    connect, total, size = done.stdout.split()
    return {"connect_s": float(connect), "seconds": float(total), "bytes": int(size)}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the curls this process waited for
    return usage.ru_utime + usage.ru_stime


def measure(args, root: Path) -> dict:
    files = root / "files"
    files.mkdir()
    (files / "hello.txt").write_bytes(HELLO)
    big = files / f"big-{args.mib}MiB.bin"
    with open(big, "wb") as f:
        for _ in range(args.mib):
            f.write(os.urandom(MIB))
    expected = sha256_of(big)
    net = TorNetwork(root, args.authorities, args.relays, files, args.tor_option)
    result = {"network": {"authorities": args.authorities, "relays": args.authorities + args.relays,
                          "onion_service": 1, "clients": 1, "addresses": f"{net.ip['auth0']} ...",
                          "version": "Tor " + subprocess.run(["tor", "--version"], capture_output=True,
                                                             text=True).stdout.split()[2].rstrip(".")}}
    started = time.monotonic()
    try:
        log(f"[tor] starting {len(net.relay_names)} relays ({args.authorities} of them authorities), "
            f"an onion service and a client on {net.ip['auth0']}... ...")
        net.start()
        client, service = net.control("client"), net.control("service")
        uploads = DescriptorUploads(service)  # from the start: no upload event is missed
        onion = net.onion_address()
        everyone = set()

        def client_ready():
            if client.bootstrap_progress() < 100:
                return False
            relays = client.relays()
            everyone.update(relays)
            return len(relays) == len(net.relay_names) and all("HSDir" in f for f in relays.values())
        wait_until("the client's bootstrap with every relay in its consensus", client_ready, args.boot_timeout)
        result["bootstrap_s"] = time.monotonic() - started
        log(f"[tor] client bootstrapped in {result['bootstrap_s']:.1f} s; waiting for the onion descriptor ...")
        settled_since = [None]

        def descriptor_stored():
            # Stored, nothing under way, the service at 100 % with the whole consensus, for 2 s
            # on end (a new consensus may move the hash ring and start uploads again).
            uploads.poll(0.5)
            if uploads.settled() and service.bootstrap_progress() == 100 and \
                    len(service.relays()) == len(net.relay_names):
                settled_since[0] = settled_since[0] or time.monotonic()
                return time.monotonic() - settled_since[0] >= 2
            settled_since[0] = None
            return False
        wait_until("the onion service's descriptor on the HSDirs", descriptor_stored, args.boot_timeout, 0)
        result["descriptor_s"] = time.monotonic() - started
        result["hsdirs_stored"] = len(uploads.stored)
        socks = f"{net.ip['client']}:{net.socks_port}"

        log(f"[tor] first fetch of http://{onion}/hello.txt ...")
        first = curl(socks, f"http://{onion}/hello.txt", root / "hello.out", 120)
        if (root / "hello.out").read_bytes() != HELLO:
            raise RuntimeError("the first fetch brought other bytes")
        result["first_fetch"] = first

        # Warm-up: a two-hop circuit over every ordered pair of relays, so that the client
        # and every relay hold their TLS channels, as the project's measured builds find
        # their connection pools warm; timed too ("cold": most open a channel).
        fingerprints = sorted(client.relays())
        pairs = [[a, b] for a in fingerprints for b in fingerprints if a != b]
        log(f"[tor] {len(pairs)} warm-up circuits, then {args.builds} timed circuit builds ...")
        cold, cold_failures = time_circuit_builds(client, pairs)
        paths = [random.sample(fingerprints, 3) for _ in range(args.builds)]
        builds, failures = time_circuit_builds(client, paths)
        if not builds:
            raise RuntimeError(f"no circuit built: {failures[:3]}")
        result["circuits"] = {"builds": len(builds), "failed": len(failures), "failures": failures[:5],
                              "build_ms": builds, "build_ms_median": statistics.median(builds),
                              "build_ms_p95": percentile(builds, 0.95), "warmup_two_hop": len(cold),
                              "warmup_failed": len(cold_failures),
                              "warmup_two_hop_ms_median": statistics.median(cold) if cold else None}

        # What the network burns doing nothing (votes every 10 s, consensus fetches), measured
        # over a quiet window: the bulk's CPU per MiB is also given net of it.
        idle_before, idle_started = net.cpu_seconds(), time.monotonic()
        time.sleep(args.idle_window)  # a measurement window, not a wait for anything
        idle_cores = {k: (v - idle_before[k]) / (time.monotonic() - idle_started)
                      for k, v in net.cpu_seconds().items()}
        runs = []
        for run in range(1, args.runs + 1):
            out = root / f"download-{run}.bin"
            cpu_before, curl_before, busy_before = net.cpu_seconds(), children_cpu(), machine_busy()
            got = curl(socks, f"http://{onion}/{big.name}", out, args.timeout)
            cpu = {k: v - cpu_before[k] for k, v in net.cpu_seconds().items()}
            cpu["curl"] = children_cpu() - curl_before
            busy = (machine_busy() or 0.0) - (busy_before or 0.0)
            ok = got["bytes"] == args.mib * MIB and sha256_of(out) == expected
            out.unlink()
            if not ok:
                raise RuntimeError(f"run {run}: {got['bytes']} bytes, sha256 differs from the file's")
            mb_s = got["bytes"] / got["seconds"] / 1e6
            idle_ms_per_mib = sum(idle_cores.values()) * got["seconds"] * 1000 / args.mib
            runs.append({"seconds": got["seconds"], "mb_s": mb_s, "idle_ms_per_mib": idle_ms_per_mib,
                         "cpu_ms_per_mib": {k: round(v * 1000 / args.mib, 2) for k, v in cpu.items()},
                         "other_cores_busy": max(0.0, (busy - sum(cpu.values())) / got["seconds"])})
            log(f"[tor] run {run}: {mb_s:.1f} MB/s, sha256 ok")
        median_run = sorted(runs, key=lambda r: r["mb_s"])[len(runs) // 2]
        result["bulk"] = {"mib": args.mib, "runs": len(runs), "mb_s": [r["mb_s"] for r in runs],
                          "mb_s_median": statistics.median(r["mb_s"] for r in runs), "sha256_ok": True,
                          "cpu_ms_per_mib": median_run["cpu_ms_per_mib"],
                          "cpu_ms_per_mib_total": round(sum(median_run["cpu_ms_per_mib"].values()), 2),
                          "idle_cores": {k: round(v, 3) for k, v in idle_cores.items()},
                          "cpu_ms_per_mib_total_net_of_idle": round(sum(median_run["cpu_ms_per_mib"].values())
                                                                    - median_run["idle_ms_per_mib"], 2),
                          "other_cores_busy": [round(r["other_cores_busy"], 2) for r in runs]}
        client.close()
        service.close()
    finally:
        net.stop()
    return result


# --- the comparison ---------------------------------------------------------------------


def project_figures(path: Path) -> dict | None:
    """The project's /2 TLS bulk MB/s and circuit build of network.py's JSON, if it has them."""
    try:
        report = json.loads(path.read_text())
        v2 = report["profiles"]["v2"]
        return {"source": str(path.relative_to(BENCH.parent)) if path.is_relative_to(BENCH.parent) else str(path),
                "date": report.get("date"), "written": time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime)),
                "label": v2.get("label"), "mib": v2["bulk"]["mib"],
                "bulk_mb_s_median": v2["bulk"]["onion_mb_s_median"],
                "cpu_ms_per_mib_total": v2["bulk"].get("cpu_ms_per_mib_total"),
                "build_ms_median": v2["circuits"]["build_ms_median"], "build_ms_p95": v2["circuits"]["build_ms_p95"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ratios(project: dict | None, tor: dict) -> dict | None:
    if not project or "bulk" not in tor:
        return None
    return {"bulk_project_over_tor": project["bulk_mb_s_median"] / tor["bulk"]["mb_s_median"],
            "build_tor_over_project": tor["circuits"]["build_ms_median"] / project["build_ms_median"]}


def build_ratio(tor_over_project: float) -> str:
    if tor_over_project >= 1:
        return f"Tor's takes {tor_over_project:.2f}×"
    return f"the project's takes {1 / tor_over_project:.2f}×"


def render(report: dict) -> str:
    tor, project, ratio = report, report.get("project"), report.get("ratio")
    if "bulk" not in tor:
        return f"Tor: unavailable ({tor.get('why', '?')})"
    p = project or {}

    def cell(key, fmt):
        return fmt.format(p[key]) if p.get(key) is not None else "—"
    b, c = tor["bulk"], tor["circuits"]
    rows = [
        "| measure | onion_twisted, /2 with TLS | " + tor["network"]["version"] + ", onion service | project ÷ Tor |",
        "|---|---:|---:|---:|",
        f"| bulk, {b['mib']} MiB, median of {b['runs']} | {cell('bulk_mb_s_median', '**{:.1f} MB/s**')} | "
        f"**{b['mb_s_median']:.1f} MB/s** ({min(b['mb_s']):.1f}–{max(b['mb_s']):.1f}) | "
        + (f"**{ratio['bulk_project_over_tor']:.2f}×**" if ratio else "—") + " |",
        f"| circuit build, median (p95) | {cell('build_ms_median', '{:.1f} ms')} ({cell('build_ms_p95', '{:.1f}')}) | "
        f"{c['build_ms_median']:.1f} ms ({c['build_ms_p95']:.1f}), {c['builds']} builds, {c['failed']} failed | "
        + (build_ratio(ratio['build_tor_over_project']) if ratio else "—") + " |",
        f"| circuit build opening TLS channels (the warm-up's {c['warmup_two_hop']} two-hop circuits), median | — | "
        f"{c['warmup_two_hop_ms_median']:.1f} ms | |",
        f"| CPU per MiB, all processes | {cell('cpu_ms_per_mib_total', '{:.0f} ms')} | "
        f"{b['cpu_ms_per_mib_total']:.0f} ms ({b['cpu_ms_per_mib_total_net_of_idle']:.0f} without the idle network's) | |",
        f"| first fetch of the onion service (descriptor, rendezvous, stream) | — | "
        f"{tor['first_fetch']['seconds'] * 1000:.0f} ms | |",
        f"| network up: client bootstrapped; descriptor stored | — | "
        f"{tor['bootstrap_s']:.0f} s; {tor['descriptor_s']:.0f} s | |",
    ]
    if ratio:
        rows.append(f"\nproject bulk ÷ Tor onion service = {ratio['bulk_project_over_tor']:.2f}× "
                    f"(target ≥ 10×; project figures from {p['source']}, written {p['written']})")
    return "\n".join(rows)


def interrupted(signum, frame):
    """SIGTERM (make killed, a CI timeout) unwinds like Ctrl-C: members stopped, directory removed."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 2 runs, 20 builds: a smoke run")
    parser.add_argument("--mib", type=int, default=None, help="file size (default 256; quick 32)")
    parser.add_argument("--runs", type=int, default=None, help="downloads (default 3; quick 2)")
    parser.add_argument("--builds", type=int, default=None, help="circuit builds (default 50; quick 20)")
    parser.add_argument("--authorities", type=int, default=3, help="directory authorities, relays too (3)")
    parser.add_argument("--relays", type=int, default=5, help="relays besides the authorities (5)")
    parser.add_argument("--tor-option", action="append", default=[], metavar="'KEY VALUE'",
                        help="a torrc line for every tor of the network (to compare settings)")
    parser.add_argument("--idle-window", type=float, default=5.0, help="seconds the idle network's CPU is measured")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for one download")
    parser.add_argument("--boot-timeout", type=float, default=180, help="seconds for the network to come up")
    parser.add_argument("--project", type=Path, default=None,
                        help="network.py's JSON to compare with (bench/results.json; quick: bench/out/results-quick.json)")
    parser.add_argument("--compare-only", action="store_true", help="print the comparison of the JSONs already written")
    args = parser.parse_args()
    q = args.quick
    args.mib, args.runs = args.mib or (32 if q else 256), args.runs or (2 if q else 3)
    args.builds = args.builds or (20 if q else 50)
    args.project = args.project or (OUT / "results-quick.json" if q else BENCH / "results.json")
    json_path = OUT / "tor-quick.json" if q else BENCH / "tor.json"
    if args.compare_only:
        report = json.loads(json_path.read_text())
        report["project"] = project_figures(args.project)
        report["ratio"] = ratios(report["project"], report)
        print(render(report))
        return 0

    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "config": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}
    why = ensure_tor()
    root = Path(tempfile.mkdtemp(prefix="onion-bench-tor-"))
    signal.signal(signal.SIGTERM, interrupted)
    try:
        if why is None:
            report.update(measure(args, root))
    except Exception as e:  # noqa: BLE001 - Tor failing must not stop the rest of make bench
        traceback.print_exc()
        why = f"{type(e).__name__}: {e}"
    finally:
        for proc in ALL_PROCS:
            proc.stop(grace=5)
        shutil.rmtree(root, ignore_errors=True)
    report["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    if why is not None:
        report.update({"tor": "unavailable", "why": why[:4000]})
        log(f"Tor: unavailable: {why}")
    else:
        report["tor"] = "measured"
        report["project"] = project_figures(args.project)
        report["ratio"] = ratios(report["project"], report)
    OUT.mkdir(exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
