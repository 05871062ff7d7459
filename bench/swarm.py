"""Swarming (issue 16): one download from three sources against the same from one, in one run.

Starts one network (``onion_twisted.ops.localnet``: tracker, six nodes with
2048-bit keys, TLS 1.3 as shipped, each a ``twistd`` process on its own
127.A.B.x address at one port) with seven peers: alice, who downloads;
bob, carol and dave, who share with ``max_upload_rate = --cap`` (4 MB/s);
erin, frank and grace, who share uncapped. Every peer runs with
``seed_downloads = false`` (alice must not hash and announce each file she
fetched while the next is timed) and ``max_sources`` at its default (4).

Two files of random bytes, hard-linked under a name per run into the
share directories (one inode; a catalogue entry is a name, so every run
is a fresh download and nothing is cached by the peers):

* ``cap-all-K.bin`` (``--capped-mib``) shared by bob, carol and dave;
  ``cap-one-K.bin`` (the same bytes) by one of them only, in turn (run 1
  bob, run 2 carol, ...): **the single-source baseline is the same download
  when only one of the three shares it** (alice's catalogue lists one
  source, so she asks one transfer for every chunk, as before swarming);
* ``free-all-K.bin`` / ``free-one-K.bin`` (``--mib``): the same with erin,
  frank and grace, uncapped.

For each pair, alice downloads both names through her API, single and
multi alternately first, ``--runs`` times; a run is timed from the request
to the verified file (her state ``done``), and her copy is checked against
the file's sha256. Figures (medians over the runs, each beside its
baseline in the same process tree):

* MB/s single and multi, and multi ÷ single (targets: ≥ 2.5 capped,
  ≥ 1.0 uncapped);
* during each run, the transfers it took (the tracker's ``/metrics``:
  requests bridged) and the most under way at once (alice's
  ``/api/status``: ``transfers``); the file bytes each sharer read for it
  (its ``upload_rate.bytes_sent``; above the file's size: endgame copies);
  the bytes every node relayed, both directions, ÷ the file's size (the
  nodes' ``/metrics``: chunks, and each transfer's ``transfer_start`` and
  ``transfer_end``, padded to a chunk's size on /2, section 17.4). After
  each download the bench waits until nothing moves, so what its sources
  still send once it is whole is counted to it, not to the next run;
* every member's CPU seconds per MiB (all processes share the machine's
  cores: at 2 cores an uncapped transfer is CPU-bound), and during every
  run the cores kept busy by processes outside this benchmark
  (``/proc/stat``): other work on the machine makes MB/s noisier; CPU
  per MiB and bytes relayed hold up better.

Writes ``bench/swarm.json`` (``--quick``: ``bench/out/swarm-quick.json``)
and prints a Markdown table.

    python bench/swarm.py [--quick] [--runs 5] [--mib 256] [--capped-mib 128] [--cap 4000000]

About seven minutes on two cores (``--quick``: 32 MiB each, two runs, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_seconds, machine, machine_busy, member_metrics, peer_api as api, sha256_of
from onion_twisted.ops.localnet import LocalNetwork

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
MIB = 1024 * 1024

DOWNLOADER = "alice"
CAPPED = ("bob", "carol", "dave")
UNCAPPED = ("erin", "frank", "grace")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



class SwarmNetwork(LocalNetwork):
    """``LocalNetwork`` with options for some members by name (the sharers' cap)."""

    def __init__(self, *args, member_options: dict[str, list[str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.member_options = member_options

    def _spawn(self, name, role, ip, options):
        return super()._spawn(name, role, ip, [*options, *self.member_options.get(name, [])])


COUNTERS = {"onion_node_bytes_total": "node_bytes", "onion_node_cells_total": "node_cells",
            'onion_tracker_requests_total{outcome="bridged"}': "transfers"}


def counters(net: LocalNetwork) -> dict:
    """The nodes' relayed bytes and cells (both directions, all nodes) and the transfers the
    tracker bridged, from their ``/metrics``."""
    totals = dict.fromkeys(COUNTERS.values(), 0.0)
    for member in net.members:
        if member.role not in ("node", "tracker"):
            continue
        for name, value in member_metrics(net, member.ip).items():
            for prefix, key in COUNTERS.items():
                if name == prefix or (name.startswith(prefix + "{") and "{" not in prefix):
                    totals[key] += value
    return totals


def ours(pids: dict) -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + sum(cpu_seconds(p) or 0.0 for p in pids.values())


class Scenario:
    """One pair of downloads measured side by side: from one sharer, from all three."""

    def __init__(self, key: str, label: str, sharers: tuple, mib: int, runs: int):
        self.key, self.label, self.sharers, self.mib, self.runs = key, label, sharers, mib, runs

    def one(self, run: int) -> str:
        return f"{self.key}-one-{run}.bin"

    def all(self, run: int) -> str:
        return f"{self.key}-all-{run}.bin"

    def single_sharer(self, run: int) -> str:
        return self.sharers[(run - 1) % len(self.sharers)]

    def share(self, net: LocalNetwork, source: Path) -> dict[str, int]:
        """Hard links of ``source`` into the sharers' share directories; name -> expected sources."""
        expected = {}
        for run in range(1, self.runs + 1):
            for sharer in self.sharers:
                os.link(source, net.run_dir / sharer / "share" / self.all(run))
            os.link(source, net.run_dir / self.single_sharer(run) / "share" / self.one(run))
            expected[self.all(run)] = len(self.sharers)
            expected[self.one(run)] = 1
        return expected


def settle(net: LocalNetwork, sharers: tuple, quiet: float = 0.5, timeout: float = 30.0) -> float:
    """Until nothing moves (the sharers read no file bytes, the nodes relay nothing) for ``quiet``
    seconds: what a download's sources still send after it is whole (endgame copies in flight)
    is counted to it, and does not eat the next run's cap or cores. Seconds waited."""
    started = time.perf_counter()

    def snapshot():
        return (sum(api(net.page_address(s), "/api/status")["upload_rate"]["bytes_sent"] for s in sharers),
                counters(net)["node_bytes"])
    last = snapshot()
    while time.perf_counter() - started < timeout:
        time.sleep(quiet)
        now = snapshot()
        if now == last:
            break
        last = now
    return time.perf_counter() - started


def download(net: LocalNetwork, name: str, pids: dict, sharers: tuple, expected_sha: str,
             timeout: float) -> dict:
    """Alice downloads ``name``: seconds from the request to the verified file, and what went on."""
    alice = net.page_address(DOWNLOADER)
    sent_before = {s: api(net.page_address(s), "/api/status")["upload_rate"]["bytes_sent"] for s in sharers}
    counted_before = counters(net)
    cpu_before = {n: cpu_seconds(p) for n, p in pids.items()}
    busy_before, ours_before = machine_busy(), ours(pids)
    started = time.perf_counter()
    api(alice, "/api/downloads", {"file": name})
    deadline = started + timeout
    most_transfers = 0
    while True:
        state = next((d for d in api(alice, "/api/status")["downloads"] if d["file"] == name), None)
        if state:
            most_transfers = max(most_transfers, state.get("transfers") or 0)
            if state["state"] in ("done", "failed"):
                break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{name}: not done after {timeout:.0f} s ({state})")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    busy_after, ours_after = machine_busy(), ours(pids)
    if state["state"] != "done":
        raise RuntimeError(f"{name}: {state['state']}: {state.get('error')}")
    got = net.run_dir / DOWNLOADER / "downloads" / name
    if sha256_of(got) != expected_sha:
        raise RuntimeError(f"{name}: alice's copy does not match the file shared")
    got.unlink()
    settled = settle(net, sharers)
    cpu = {n: cpu_seconds(p) - cpu_before[n] for n, p in pids.items()}  # with what came after it was whole
    sent = {s: api(net.page_address(s), "/api/status")["upload_rate"]["bytes_sent"] - sent_before[s]
            for s in sharers}
    others = None
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before) - (ours_after - ours_before)) / seconds
    counted = {k: v - counted_before[k] for k, v in counters(net).items()}
    sources = state.get("sources") or []
    return {"seconds": seconds, "mb_s": state["size"] / seconds / 1e6, "attempts": state.get("attempts"),
            "most_transfers": most_transfers, "transfers_with_chunks": sum(1 for s in sources if s["chunks"]),
            "sent_by_sharer": sent, "sent_over_size": sum(sent.values()) / state["size"],
            "transfers": int(counted["transfers"]), "node_bytes_over_size": counted["node_bytes"] / state["size"],
            "node_cells_per_mib": counted["node_cells"] / (state["size"] / MIB),
            "settle_s": settled, "e2e": state.get("e2e"), "cpu_s": cpu, "cpu_s_total": sum(cpu.values()),
            "other_processes_cores": others}


def measure(net: LocalNetwork, scenario: Scenario, pids: dict, expected_sha: str, timeout: float) -> dict:
    single, multi = [], []
    settle(net, scenario.sharers)
    for run in range(1, scenario.runs + 1):
        order = [("single", scenario.one(run)), ("multi", scenario.all(run))]
        if run % 2 == 0:
            order.reverse()  # alternately first: drift and warm-up fall on both alike
        for kind, name in order:
            who = scenario.single_sharer(run) if kind == "single" else "+".join(scenario.sharers)
            result = download(net, name, pids, scenario.sharers, expected_sha, timeout)
            result["from"] = who
            (single if kind == "single" else multi).append(result)
            log(f"  [{scenario.key} {run}/{scenario.runs}] {kind:6} from {who}: {result['mb_s']:.1f} MB/s "
                f"({result['seconds']:.1f} s; {result['transfers']} transfers, {result['most_transfers']} at once "
                f"at most; the sharers read {result['sent_over_size']:.3f}× the file, the nodes relayed "
                f"{result['node_bytes_over_size']:.2f}×; others kept "
                f"{result['other_processes_cores'] or 0:.2f} cores busy)")
    single_mbs = statistics.median(r["mb_s"] for r in single)
    multi_mbs = statistics.median(r["mb_s"] for r in multi)
    size_mib = scenario.mib

    def cpu_per_mib(results):
        return {n: round(statistics.median(r["cpu_s"][n] for r in results) * 1e3 / size_mib, 2) for n in pids}

    return {
        "label": scenario.label, "mib": scenario.mib, "runs": scenario.runs, "sharers": list(scenario.sharers),
        "single": single, "multi": multi,
        "single_mb_s_median": single_mbs, "multi_mb_s_median": multi_mbs, "ratio": multi_mbs / single_mbs,
        "single_mb_s_range": [min(r["mb_s"] for r in single), max(r["mb_s"] for r in single)],
        "multi_mb_s_range": [min(r["mb_s"] for r in multi), max(r["mb_s"] for r in multi)],
        "multi_most_transfers_median": statistics.median(r["most_transfers"] for r in multi),
        "multi_transfers_median": statistics.median(r["transfers"] for r in multi),
        "single_node_bytes_over_size_median": statistics.median(r["node_bytes_over_size"] for r in single),
        "multi_node_bytes_over_size_median": statistics.median(r["node_bytes_over_size"] for r in multi),
        "multi_sent_over_size_median": statistics.median(r["sent_over_size"] for r in multi),
        "multi_sharer_share_median": {s: statistics.median(r["sent_by_sharer"][s] / sum(r["sent_by_sharer"].values())
                                                           for r in multi) for s in scenario.sharers},
        "single_cpu_ms_per_mib": cpu_per_mib(single), "multi_cpu_ms_per_mib": cpu_per_mib(multi),
        "single_cpu_ms_per_mib_total": statistics.median(r["cpu_s_total"] for r in single) * 1e3 / size_mib,
        "multi_cpu_ms_per_mib_total": statistics.median(r["cpu_s_total"] for r in multi) * 1e3 / size_mib,
        "other_processes_cores_max": max((r["other_processes_cores"] or 0) for r in single + multi),
    }


def render(report: dict) -> str:
    cap, free = report["capped"], report["uncapped"]
    cap_mb = report["config"]["cap"] / 1e6
    lines = ["| download (alice, through her API; median of runs) | from one sharer | from three at once | "
             "three ÷ one | target |", "|---|---:|---:|---:|---|"]
    for result, what, target in ((cap, f"{cap['mib']} MiB, each sharer capped at {cap_mb:g} MB/s", "≥ 2.5"),
                                 (free, f"{free['mib']} MiB, uncapped", "≥ 1.0")):
        ok = result["ratio"] >= (2.5 if result is cap else 1.0)
        lines.append(f"| {what}, {result['runs']} runs each | {result['single_mb_s_median']:.1f} MB/s "
                     f"({result['single_mb_s_range'][0]:.1f}–{result['single_mb_s_range'][1]:.1f}) | "
                     f"**{result['multi_mb_s_median']:.1f} MB/s** "
                     f"({result['multi_mb_s_range'][0]:.1f}–{result['multi_mb_s_range'][1]:.1f}) | "
                     f"**{result['ratio']:.2f}×** | {target} {'met' if ok else '**not met**'} |")
    lines += ["", "| multi-source runs, median | capped | uncapped |", "|---|---:|---:|",
              f"| transfers (tracker's bridged requests) per download; most under way at once | "
              f"{cap['multi_transfers_median']:g}; {cap['multi_most_transfers_median']:g} | "
              f"{free['multi_transfers_median']:g}; {free['multi_most_transfers_median']:g} |",
              f"| file bytes the sharers read ÷ file size (endgame copies) | "
              f"{cap['multi_sent_over_size_median']:.3f} | {free['multi_sent_over_size_median']:.3f} |",
              f"| bytes the nodes relayed ÷ file size (single → multi) | "
              f"{cap['single_node_bytes_over_size_median']:.2f} → {cap['multi_node_bytes_over_size_median']:.2f} | "
              f"{free['single_node_bytes_over_size_median']:.2f} → {free['multi_node_bytes_over_size_median']:.2f} |",
              "| each sharer's part of the bytes | " + " | ".join(
                  ", ".join(f"{s} {v * 100:.0f} %" for s, v in r["multi_sharer_share_median"].items())
                  for r in (cap, free)) + " |",
              f"| CPU per MiB, all processes (single → multi) | {cap['single_cpu_ms_per_mib_total']:.0f} → "
              f"{cap['multi_cpu_ms_per_mib_total']:.0f} ms | {free['single_cpu_ms_per_mib_total']:.0f} → "
              f"{free['multi_cpu_ms_per_mib_total']:.0f} ms |",
              f"| other processes on the machine, cores busy, worst run | {cap['other_processes_cores_max']:.2f} | "
              f"{free['other_processes_cores_max']:.2f} |"]
    mach = report["machine"]
    lines += ["", f"Machine: {mach.get('cores')} cores shared by all {report['processes']} processes "
              f"(tracker, {report['nodes']} nodes, {report['peers']} peers), {mach.get('cpu', '?')}, "
              f"Python {mach.get('python')}, {mach.get('openssl')}, Twisted {mach.get('twisted')}; "
              f"{report['date']}; {report['seconds']:.0f} s for the whole bench."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files, two runs: a smoke run (~2 min)")
    parser.add_argument("--runs", type=int, default=None, help="runs of each download (default 5; quick 2)")
    parser.add_argument("--mib", type=int, default=None, help="the uncapped file (default 256; quick 32)")
    parser.add_argument("--capped-mib", type=int, default=None, help="the capped file (default 128; quick 32)")
    parser.add_argument("--cap", type=int, default=4_000_000, help="the capped sharers' max_upload_rate, bytes/s")
    parser.add_argument("--key-bits", type=int, default=2048, help="the nodes' RSA keys")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one download")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default bench/swarm.json; quick "
                                                               "bench/out/swarm-quick.json)")
    args = parser.parse_args()
    q = args.quick
    args.runs = args.runs or (2 if q else 5)
    args.mib = args.mib or (32 if q else 256)
    args.capped_mib = args.capped_mib or (32 if q else 128)
    out = args.out or (OUT / "swarm-quick.json" if q else BENCH / "swarm.json")

    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="onion-bench-swarm-"))
    peers = (DOWNLOADER, *CAPPED, *UNCAPPED)
    base = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.10"
    net = SwarmNetwork(tmp / "run", base=base, peers=peers, big_mib=0, key_bits=args.key_bits, tls=True,
                       extra={"peer": {"seed_downloads": False}},
                       member_options={name: ["--max-upload-rate", str(args.cap)] for name in CAPPED})
    scenarios = {"capped": Scenario("cap", f"each sharer capped at {args.cap} B/s", CAPPED, args.capped_mib, args.runs),
                 "uncapped": Scenario("free", "uncapped", UNCAPPED, args.mib, args.runs)}
    report = {"bench": "swarm", "machine": machine(openssl=True), "date": time.strftime("%Y-%m-%d"),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "single_source": "the same file under another name, shared by one of the three sharers only "
                               "(in turn); alice at max_sources 4 asks the one source the catalogue lists",
              "nodes": len(net.node_ips), "peers": len(peers), "processes": 1 + len(net.node_ips) + len(peers)}
    try:
        files, shas, expected = {}, {}, {}
        for key, scenario in scenarios.items():
            log(f"{scenario.mib} MiB of random bytes for the {key} downloads ...")
            files[key] = tmp / f"{key}.bin"
            with open(files[key], "wb") as f:
                for _ in range(scenario.mib):
                    f.write(os.urandom(MIB))
            shas[key] = sha256_of(files[key])
        for peer in peers:
            (net.run_dir / peer / "share").mkdir(parents=True, exist_ok=True)
        for key, scenario in scenarios.items():
            expected.update(scenario.share(net, files[key]))
        log(f"starting tracker, {len(net.node_ips)} nodes and {len(peers)} peers at {base} ...")
        net.start(timeout=180)
        pids = {m.name: m.process.pid for m in net.members}
        alice = net.page_address(DOWNLOADER)
        deadline = time.monotonic() + 180
        while True:  # the sharers hashed their files, announced them, and alice's catalogue says so
            listed = {r["name"]: r.get("sources") for r in api(alice, "/api/status")["catalogue"] if r.get("root")}
            if all(listed.get(name) == n for name, n in expected.items()):
                break
            if time.monotonic() > deadline:
                missing = {n: listed.get(n) for n, want in expected.items() if listed.get(n) != want}
                raise RuntimeError(f"alice's catalogue never listed every file with its sources: {missing}")
            time.sleep(0.5)
        log(f"network up, {len(expected)} files listed, in {time.perf_counter() - began:.0f} s")
        names = {m.ip: m.name for m in net.members}
        report["circuits"] = {p: [names.get(h["address"].rsplit(":", 1)[0], h["address"])
                                  for h in api(net.page_address(p), "/api/status")["circuit"]["nodes"]]
                              for p in peers}
        for key, scenario in scenarios.items():
            log(f"{key}: {scenario.mib} MiB, {scenario.runs} runs of single and multi ...")
            report[key] = measure(net, scenario, pids, shas[key], args.timeout)
            r = report[key]
            log(f"{key}: single {r['single_mb_s_median']:.1f} MB/s, multi {r['multi_mb_s_median']:.1f} MB/s, "
                f"{r['ratio']:.2f}×")
    finally:
        net.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = time.perf_counter() - began
    report["targets"] = {"capped_ratio_at_least_2_5": report["capped"]["ratio"] >= 2.5,
                         "uncapped_multi_not_slower": report["uncapped"]["ratio"] >= 1.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    log(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
