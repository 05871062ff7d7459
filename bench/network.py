"""``make bench``: the figures a user weighs, each beside a baseline, in one run.

Side by side, one after the other (``--profiles``): the network as shipped
(onion-http/2, TLS 1.3, padding), the same without TLS (what TLS costs),
and onion-http/1 (nodes with ``speak_v2 = false``, no TLS: the network as it
was). For each, starts the demo's network (``onion_twisted.ops.localnet``:
tracker, six nodes, alice and bob, each a ``twistd`` process on its own
127.A.B.x address at one port, 2048-bit node keys), bob sharing a ``--mib`` MiB random file under
``--runs`` names (hard links: one file on disk, a distinct catalogue entry
per name, so every run is a fresh download), then measures:

1. **bulk transfer**: alice downloads each name in turn through her API
   (bob's circuit, the bridge, alice's circuit); timed from the request to
   the verified file; beside each run, the same file fetched by one plain
   Twisted Web GET from bob's address to alice's (``plain_get.py``, port + 1);
   MB/s, median over the runs, and their ratio. Alongside: CPU seconds per
   MiB of every member, and each peer's peak resident memory (VmRSS sampled
   every 0.1 s, and VmHWM) while the file crosses;
2. **circuit build**: from nothing to connected (CREATE, two EXTENDs, the
   extend to the tracker with an ``ls``), ``--builds`` times, median and
   p95 (``circuit_client.py``, from its own address, as a peer);
3. **round trip**: a ``list`` through a circuit, ``--round-trips`` times;
Then, once for /2 circuits and once for /1 (one node, no TLS):

4. **relay capacity**: ``relay.py`` (small cells per second through one
   node at concurrency 32, beside plain Twisted Web answering the same
   POSTs, and beside a plain proxy chain), five runs of 3 s;
5. **memory per idle circuit**: ``node_memory.py`` (10 000 open circuits;
   /2: keys and both replay windows per direction).

Prints a table, writes ``bench/results.json`` and ``bench/results.md`` (the
table with the machine it ran on). ``--quick``: a small file, fewer runs,
to see that everything works (results to bench/out/ only). ``--perf
PREFIX``: each onion bulk run is also sampled by Linux ``perf`` over the
whole machine (``PREFIX-PROFILE-RUN.data``); ``bench/perf_split.py`` tells
where the cores' time went, by kind of work, and the report keeps that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import perf_split
from common import cpu_seconds, machine, member_options, peer_api as api, percentile, sha256_of, vm
from onion_twisted.ops.localnet import LocalNetwork

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
PY = sys.executable
MIB = 1024 * 1024


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



class RssSampler(threading.Thread):
    """Peak VmRSS of some processes, sampled every ``interval`` s until stopped."""

    def __init__(self, pids: dict, interval: float = 0.1):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak = {name: 0 for name in pids}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], vm(pid, "VmRSS"))
            self._done.wait(self.interval)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        return self.peak


@contextlib.contextmanager
def perf_record(path: str | None):
    """``perf record`` of every core's software clock into ``path`` while in the block (``--perf``)."""
    process = None if not path else subprocess.Popen(
        ["perf", "record", "-a", "-e", "cpu-clock", "-F", "499", "-o", path],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if process is not None:
        time.sleep(0.5)  # perf opens its buffers on every core before the run begins
    try:
        yield
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(60)


def onion_download(net: LocalNetwork, name: str, pids: dict, timeout: float) -> dict:
    alice = net.page_address("alice")
    cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}
    sampler = RssSampler({n: pids[n] for n in ("alice", "bob")})
    sampler.start()
    started = time.perf_counter()
    api(alice, "/api/downloads", {"file": name})
    deadline = started + timeout
    while True:
        state = next((d for d in api(alice, "/api/status")["downloads"] if d["file"] == name), None)
        if state and state["state"] in ("done", "failed"):
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name}: not done after {timeout:.0f} s ({state})")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    cpu = {n: cpu_seconds(p) - cpu_before[n] for n, p in pids.items()}
    if state["state"] != "done":
        raise RuntimeError(f"{name}: {state}")
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss": peak,
            "hwm": {n: vm(pids[n], "VmHWM") for n in ("alice", "bob")}}


def plain_download(bob_ip: str, alice_ip: str, port: int, name: str, out: Path) -> float:
    result = subprocess.run([PY, str(BENCH / "plain_get.py"), "get", "--bind", alice_ip,
                             "--url", f"http://{bob_ip}:{port}/{name}", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def bulk(net: LocalNetwork, args, tmp: Path, profile: str) -> dict:
    pids = {m.name: m.process.pid for m in net.members}
    alice_ip, bob_ip = net.peer_ips["alice"], net.peer_ips["bob"]
    share = net.run_dir / "bob" / "share"
    source = share / f"big-{args.mib}MiB.bin"
    expected = sha256_of(source)
    plain_port = net.port + 1
    server = subprocess.Popen([PY, str(BENCH / "plain_get.py"), "serve", "--listen", bob_ip,
                               "--port", str(plain_port), "--root", str(share)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    onion, plain, perf_files = [], [], []
    try:
        time.sleep(0.5)  # the plain server binds (the first GET below retries once if not)
        for run in range(1, args.runs + 1):
            name = f"bulk-{run}.bin"
            log(f"bulk run {run}/{args.runs}: onion ...")
            perf = f"{args.perf}-{profile}-{run}.data" if args.perf else None
            with perf_record(perf):
                result = onion_download(net, name, pids, timeout=args.timeout)
            if perf:
                perf_files.append(perf)
            got = net.run_dir / "alice" / "downloads" / name
            if sha256_of(got) != expected:
                raise RuntimeError(f"{name}: alice's copy does not match bob's")
            got.unlink()
            onion.append(result)
            log(f"  {args.mib * MIB / result['seconds'] / 1e6:.1f} MB/s; plain GET ...")
            target = tmp / "plain.bin"
            try:
                seconds = plain_download(bob_ip, alice_ip, plain_port, source.name, target)
            except subprocess.CalledProcessError:
                time.sleep(1)
                seconds = plain_download(bob_ip, alice_ip, plain_port, source.name, target)
            if sha256_of(target) != expected:
                raise RuntimeError("the plain GET's copy does not match bob's")
            target.unlink()
            plain.append(seconds)
            log(f"  plain {args.mib * MIB / seconds / 1e6:.1f} MB/s")
    finally:
        server.terminate()
        server.wait(10)
    size = args.mib * MIB
    onion_mbs = [size / r["seconds"] / 1e6 for r in onion]
    plain_mbs = [size / s / 1e6 for s in plain]
    cpu_per_mib = {n: statistics.median(r["cpu_s"][n] for r in onion) * 1e3 / args.mib for n in pids}
    return {
        "mib": args.mib, "runs": args.runs,
        "onion_mb_s": onion_mbs, "plain_mb_s": plain_mbs,
        "onion_mb_s_median": statistics.median(onion_mbs), "plain_mb_s_median": statistics.median(plain_mbs),
        "ratio": statistics.median(onion_mbs) / statistics.median(plain_mbs),
        "cpu_ms_per_mib": {n: round(v, 2) for n, v in cpu_per_mib.items() if v >= 0.05},
        "cpu_ms_per_mib_total": sum(cpu_per_mib.values()),
        "peak_rss_mib": {p: max(r["peak_rss"][p] for r in onion) / MIB for p in ("alice", "bob")},
        "hwm_mib": {p: max(r["hwm"][p] for r in onion) / MIB for p in ("alice", "bob")},
        **({"perf": perf_split.combine([perf_split.split(f) for f in perf_files])} if perf_files else {}),
    }


def circuits(net: LocalNetwork, args, client_ip: str) -> dict:
    result = subprocess.run([PY, str(BENCH / "circuit_client.py"), "--bind", client_ip,
                             "--tracker", net.address(net.tracker_ip), "--builds", str(args.builds),
                             "--round-trips", str(args.round_trips), *(["--tls"] if net.tls else [])],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"circuit_client failed:\n{result.stderr[-2000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    builds = [s * 1e3 for s in data["build_s"]]
    lists = [s * 1e3 for s in data["list_s"]]
    return {"builds": len(builds), "build_ms_median": statistics.median(builds),
            "build_ms_p95": percentile(builds, 0.95), "round_trips": len(lists),
            "list_ms_median": statistics.median(lists), "list_ms_p95": percentile(lists, 0.95)}


# The networks measured side by side, each started afresh: the shipped one, the same without
# TLS (what TLS costs), and onion-http/1 as it was (nodes without onion keys, plain HTTP).
PROFILES = {
    "v2": {"label": "onion-http/2, TLS 1.3 (as shipped)", "tls": True, "extra": {}},
    "v2-no-tls": {"label": "onion-http/2, no TLS", "tls": False, "extra": {}},
    "v1": {"label": "onion-http/1, no TLS", "tls": False, "extra": {"node": {"speak_v2": False}}},
}


def relay_capacity(args, protocol: str) -> dict:
    out = OUT / f"relay-network-{protocol}.json"
    command = [PY, str(BENCH / "relay.py"), "--targets", "direct,proxy,node", "--out", str(out),
               "--protocol", protocol]
    if args.quick:
        command.append("--quick")
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=900, check=True)
    report = json.loads(out.read_text())
    targets = report["summary"]["targets"]
    rate = {name: targets[name]["cells_per_s"] for name in ("direct", "proxy", "node")}
    return {"protocol": protocol, "cells_per_s": rate, "node_vs_plain": rate["node"] / rate["direct"],
            "node_vs_proxy": rate["node"] / rate["proxy"],
            "cpu_us_per_cell": targets["node"].get("cpu_us_per_request")}


def node_memory(args, protocol: str) -> dict:
    result = subprocess.run([PY, str(BENCH / "node_memory.py"), "--circuits", str(args.circuits),
                             "--protocol", protocol], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"node_memory failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def render(report: dict) -> str:
    profiles = [p for p in PROFILES if p in report.get("profiles", {})]
    heads = [PROFILES[p]["label"] for p in profiles]
    lines = ["| measure | " + " | ".join(heads) + " | baseline |", "|---|" + "---:|" * len(heads) + "---|"]

    def row(label, cell, baseline=""):
        values = [cell(report["profiles"][p]) for p in profiles]
        lines.append(f"| {label} | " + " | ".join(values) + f" | {baseline} |")

    first = report["profiles"][profiles[0]]
    b0 = first["bulk"]
    plain = statistics.median(report["profiles"][p]["bulk"]["plain_mb_s_median"] for p in profiles)
    row(f"bulk transfer, {b0['mib']} MiB bob → alice (2 circuits + bridge), median of {b0['runs']}",
        lambda r: f"**{r['bulk']['onion_mb_s_median']:.1f} MB/s**", f"plain Twisted Web GET: {plain:.0f} MB/s")
    row("CPU per MiB, all processes", lambda r: f"{r['bulk']['cpu_ms_per_mib_total']:.0f} ms")
    row(f"circuit build (create, 2 extends, connect), median of {first['circuits']['builds']}",
        lambda r: f"**{r['circuits']['build_ms_median']:.1f} ms** (p95 {r['circuits']['build_ms_p95']:.1f})")
    row(f"round trip: `list` through the circuit, median of {first['circuits']['round_trips']}",
        lambda r: f"**{r['circuits']['list_ms_median']:.2f} ms** (p95 {r['circuits']['list_ms_p95']:.2f})")
    row(f"peak resident memory while {b0['mib']} MiB cross",
        lambda r: f"alice {r['bulk']['peak_rss_mib']['alice']:.0f}, bob {r['bulk']['peak_rss_mib']['bob']:.0f} MiB")
    lines += ["", "| one node, no TLS (bench/relay.py, bench/node_memory.py) | onion-http/2 | onion-http/1 | baseline |",
              "|---|---:|---:|---|"]
    relay = {r["protocol"]: r for r in report.get("relay", [])}
    memory = {m["protocol"]: m for m in report.get("memory", [])}
    if relay:
        any_relay = next(iter(relay.values()))
        lines.append("| relay capacity: small cells/s through one node, c=32 | " + " | ".join(
            f"**{relay[p]['cells_per_s']['node']:.0f} /s** ({relay[p]['node_vs_proxy']:.2f}× proxy chain)"
            if p in relay else "" for p in ("v2", "v1")) +
            f" | plain proxy chain {any_relay['cells_per_s']['proxy']:.0f} /s, plain answering "
            f"{any_relay['cells_per_s']['direct']:.0f} /s |")
    if memory:
        any_memory = next(iter(memory.values()))
        lines.append(f"| node memory per idle circuit ({any_memory['circuits']} open) | " + " | ".join(
            f"**{memory[p]['bytes_per_circuit'] / 1024:.2f} KiB**" if p in memory else "" for p in ("v2", "v1")) +
            f" | idle node {any_memory['idle_bytes'] / MIB:.0f} MiB |")
    mach = report["machine"]
    cpu = "; ".join(f"{PROFILES[p]['label']}: " + ", ".join(
        f"{n} {v:.1f}" for n, v in report["profiles"][p]["bulk"]["cpu_ms_per_mib"].items()) for p in profiles)
    lines += ["", f"Bulk CPU per MiB by process (ms, median run): {cpu}.",
              f"Machine: {mach.get('cores')} cores, {mach.get('cpu', '?')}, Python {mach.get('python')}, "
              f"{mach.get('openssl')}, Twisted {mach.get('twisted')}, cryptography {mach.get('cryptography')}; "
              f"{report['date']}."]
    return "\n".join(lines)


def measure_network(profile: str, args, tmp: Path, only: set) -> dict:
    """Start one network of ``profile``; its circuit and bulk figures; stop it."""
    spec = PROFILES[profile]
    base = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.10"
    extra = {role: dict(options) for role, options in spec["extra"].items()}
    if args.peer_option:
        extra.setdefault("peer", {}).update(member_options(args.peer_option))
    run_dir = tmp / profile
    net = LocalNetwork(run_dir / "run", base=base, big_mib=args.mib if "bulk" in only else 0, key_bits=2048,
                       extra=extra, tls=spec["tls"])
    result = {"label": spec["label"], "tls": spec["tls"]}
    try:
        net.make_samples()
        share = net.run_dir / "bob" / "share"
        for run in range(1, args.runs + 1):
            if "bulk" in only:
                os.link(share / f"big-{args.mib}MiB.bin", share / f"bulk-{run}.bin")
        log(f"[{profile}] starting the network at {base} ...")
        net.start(timeout=120)
        alice = net.page_address("alice")
        if "bulk" in only:
            names = {f"bulk-{run}.bin" for run in range(1, args.runs + 1)}
            deadline = time.monotonic() + 120
            while not names <= {f["name"] for f in api(alice, "/api/status")["catalogue"] if f.get("sha256")}:
                if time.monotonic() > deadline:
                    raise RuntimeError("alice's catalogue never listed bob's files")
                time.sleep(0.2)
        if "circuits" in only:
            log(f"[{profile}] circuit builds and round trips ...")
            client_ip = str(__import__("ipaddress").IPv4Address(base) + 40)
            result["circuits"] = circuits(net, args, client_ip)
        if "bulk" in only:
            result["bulk"] = bulk(net, args, run_dir, profile)
    finally:
        net.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small file, few runs: a smoke run")
    parser.add_argument("--mib", type=int, default=None, help="bulk file size (default 256; quick 16)")
    parser.add_argument("--runs", type=int, default=None, help="bulk runs (default 5; quick 2)")
    parser.add_argument("--builds", type=int, default=None, help="circuit builds (default 50; quick 10)")
    parser.add_argument("--round-trips", type=int, default=None, help="list round trips (default 200; quick 20)")
    parser.add_argument("--circuits", type=int, default=None, help="open circuits (default 10000; quick 1000)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one bulk download")
    parser.add_argument("--peer-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a peer option for both peers, e.g. window=16 (to compare settings)")
    parser.add_argument("--profiles", default=",".join(PROFILES),
                        help=f"networks to measure, side by side ({', '.join(PROFILES)})")
    parser.add_argument("--perf", default=None, metavar="PREFIX",
                        help="sample every onion bulk run with Linux perf into PREFIX-PROFILE-RUN.data")
    parser.add_argument("--only", default="bulk,circuits,relay,memory",
                        help="comma-separated subset of bulk,circuits,relay,memory")
    args = parser.parse_args()
    q = args.quick
    args.mib = args.mib or (16 if q else 256)
    args.runs = args.runs or (2 if q else 5)
    args.builds = args.builds or (10 if q else 50)
    args.round_trips = args.round_trips or (20 if q else 200)
    args.circuits = args.circuits or (1000 if q else 10_000)
    only = set(args.only.split(","))
    if args.perf and shutil.which("perf") is None:
        parser.error("--perf needs Linux perf (Debian: apt-get install linux-perf)")
    profiles = [p for p in args.profiles.split(",") if p]
    unknown = set(profiles) - set(PROFILES)
    if unknown:
        parser.error(f"unknown profiles {sorted(unknown)}: choose from {', '.join(PROFILES)}")

    tmp = Path(tempfile.mkdtemp(prefix="onion-bench-net-"))
    report = {"machine": machine(openssl=True), "date": time.strftime("%Y-%m-%d"), "config": vars(args),
              "profiles": {}}
    try:
        if only & {"bulk", "circuits"}:
            for profile in profiles:
                report["profiles"][profile] = measure_network(profile, args, tmp, only)
        protocols = [p for p in ("v2", "v1") if any(q_.startswith(p) for q_ in profiles)]
        if "relay" in only:
            report["relay"] = []
            for protocol in protocols:
                log(f"relay capacity, {protocol} (bench/relay.py) ...")
                report["relay"].append(relay_capacity(args, protocol))
        if "memory" in only:
            report["memory"] = []
            for protocol in protocols:
                log(f"node memory with {args.circuits} {protocol} circuits (bench/node_memory.py) ...")
                report["memory"].append(node_memory(args, protocol))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    OUT.mkdir(exist_ok=True)
    complete = only >= {"bulk", "circuits", "relay", "memory"} and set(profiles) == set(PROFILES)
    json_path = OUT / "results-quick.json" if q or not complete else BENCH / "results.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if only >= {"bulk", "circuits"}:
        table = render(report)
        print(table)
        if complete and not q:
            (BENCH / "results.md").write_text("# make bench: latest results\n\n" + table + "\n")
    else:
        print(json.dumps(report, indent=2))
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
