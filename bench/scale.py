"""A network at size, calm and under churn (issue 17): ``make bench-scale``.

Starts, through ``onion_twisted.ops.localnet`` (``bench/scale_net.py``:
``ScaleNetwork``, started in batches), a tracker, ``--nodes`` nodes (60)
and ``--peers`` peers (30), each its own ``twistd`` process on its own
127.A.B.x address at port 5000, TLS 1.3 and onion-http/2 as shipped,
peers with ``seed_downloads = false``. ``--downloads`` random files of
``--mib`` MiB (20 of 16) are shared so that three in four have several
sources (2, 3, 1, 4 sources in turn; ``scale_round.Layout``); peer k
downloads file k, all at once, through its API.

Rounds, one after the other in the same network (``scale_round.run_round``):

1. **calm**: the downloads with nothing else going on;
2. **churn** (``--churn SECONDS``, 2; 0: no churn round): the same sizes
   under other names, while every interval a random node is SIGKILLed and a
   new one started at a new address, and every ``--peer-every`` intervals
   (5) a random idle peer (one that downloads nothing) is SIGKILLed and
   started again; then the directory must converge within
   ``--converge-timeout``;
3. ``--soak MINUTES``: churn rounds one after the other until MINUTES
   passed (the 30-minute soak of the issue; not in CI).

Per round: seconds until every download was verified (the bench's own
sha256 of each copy), aggregate MB/s, lost downloads (failed, or not done
within ``--deadline``) and corrupt ones (sha256 differs), circuit build p50
and p95 while the downloads run (``circuit_client.py --until``), CPU
seconds by role, the tracker's CPU and memory, every member's peak memory
(VmHWM) and RSS growth; before the first round, what one idle member
costs (RSS and PSS). Writes ``bench/scale.json`` (other sizes or a soak:
``bench/out/``) and prints a Markdown table (``scale_report.py``).

    python bench/scale.py [--nodes 60] [--peers 30] [--downloads 20] [--mib 16] [--churn 2] [--soak 30]

About six minutes on two cores at the default sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_seconds, machine, member_options, sha256_of, vm
from scale_net import ScaleNetwork, pss
from scale_report import render
from scale_round import MIB, Layout, log, run_round

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
DEFAULTS = {"nodes": 60, "peers": 30, "downloads": 20, "mib": 16}


def idle_costs(net: ScaleNetwork, window: float = 10.0) -> dict:
    """Each role's RSS and PSS (MiB) with the network up and nothing to do, median per role, and
    the cores each role keeps busy doing nothing (registrations, directory fetches, announcements)
    over ``window`` seconds: what the network's size costs before any byte moves."""
    pids = {m.process.pid: m.role for m in net.members if m.process.poll() is None}
    cpu0 = {pid: cpu_seconds(pid) or 0.0 for pid in pids}
    time.sleep(window)  # a measuring window, not a wait for something to happen
    idle_cores: dict[str, float] = {}
    for pid, role in pids.items():
        idle_cores[role] = idle_cores.get(role, 0.0) + ((cpu_seconds(pid) or 0.0) - cpu0[pid]) / window
    figures: dict[str, dict[str, list]] = {}
    for m in net.members:
        if m.process.poll() is None:
            role = figures.setdefault(m.role, {"rss": [], "pss": []})
            role["rss"].append(vm(m.process.pid, "VmRSS") / MIB)
            role["pss"].append(pss(m.process.pid) / MIB)
    costs = {role: {"rss_mib": statistics.median(v["rss"]), "pss_mib": statistics.median(v["pss"]),
                    "members": len(v["rss"]), "cores": round(idle_cores.get(role, 0.0), 3)}
             for role, v in figures.items()}
    costs["all"] = {"rss_mib": sum(sum(v["rss"]) for v in figures.values()),
                    "pss_mib": sum(sum(v["pss"]) for v in figures.values()),
                    "members": sum(len(v["rss"]) for v in figures.values())}
    return costs


def make_files(tmp: Path, count: int, mib: int) -> tuple[list[Path], list[str]]:
    files, shas = [], []
    for k in range(count):
        path = tmp / f"file-{k + 1:02d}.bin"
        with open(path, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(MIB))
        files.append(path)
        shas.append(sha256_of(path))
    return files, shas


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=DEFAULTS["nodes"])
    parser.add_argument("--peers", type=int, default=DEFAULTS["peers"])
    parser.add_argument("--downloads", type=int, default=DEFAULTS["downloads"], help="at once, one peer each")
    parser.add_argument("--mib", type=int, default=DEFAULTS["mib"], help="size of each file")
    parser.add_argument("--churn", type=float, default=2.0, help="seconds between node kills (0: no churn round)")
    parser.add_argument("--peer-every", type=int, default=5, help="an idle peer restarted every N kills (0: never)")
    parser.add_argument("--soak", type=float, default=0.0, help="minutes of churn rounds after the first two")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds after which a download is lost")
    parser.add_argument("--converge-timeout", type=float, default=90.0,
                        help="seconds the directory has to converge after churn stops")
    parser.add_argument("--key-bits", type=int, default=2048, help="the nodes' RSA keys")
    parser.add_argument("--batch", type=int, default=10, help="members started at once")
    parser.add_argument("--seed", type=int, default=None, help="for the layout and the victims")
    parser.add_argument("--keep", action="store_true", help="keep the members' directories and logs")
    parser.add_argument("--fork-starts", action="store_true",
                        help="fork the churn's new members from a process that imported them once "
                             "(bench/forkserver.py): their imports off the shared cores")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--peer-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a peer option for every peer, e.g. window_by_delay=false (to compare settings)")
    parser.add_argument("--node-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a node option for every node, e.g. unsafe_logging=true (with --keep, to trace a stall)")
    args = parser.parse_args()
    default_sizes = all(getattr(args, k) == v for k, v in DEFAULTS.items())
    out = args.out or (BENCH / "scale.json" if default_sizes and not args.soak and not args.fork_starts
                       else OUT / ("scale-soak.json" if args.soak else "scale.json"))
    if args.soak and not args.churn:
        parser.error("--soak needs --churn")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops every member
    rng = random.Random(args.seed)
    began = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="onion-bench-scale-"))
    net = ScaleNetwork(tmp / "run", nodes=args.nodes, peers=args.peers, key_bits=args.key_bits, batch=args.batch,
                       rng=rng, tls=True, fork_starts=args.fork_starts,
                       extra={"peer": {"seed_downloads": False, **member_options(args.peer_option)},
                              "node": member_options(args.node_option)})
    layout = Layout(list(net.peer_ips), args.downloads, rng)
    report = {"bench": "scale", "machine": machine(openssl=True), "date": time.strftime("%Y-%m-%d %H:%M"),
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "layout": layout.summary(), "loadavg_before": os.getloadavg(), "rounds": []}
    try:
        log(f"{args.downloads} random files of {args.mib} MiB ...")
        files, shas = make_files(tmp, args.downloads, args.mib)
        log(f"starting a tracker, {args.nodes} nodes and {args.peers} peers at {net.prefix}/16, "
            f"{args.batch} at a time ...")
        report["startup"] = net.start()
        log(f"network up in {report['startup']['total_s']:.0f} s")
        report["idle"] = idle_costs(net)
        report["rounds"].append(run_round(net, layout, files, shas, "calm", deadline=args.deadline, tmp=tmp))
        plan = ["churn"] if args.churn else []
        soak_until = time.perf_counter() + args.soak * 60 if args.soak else None
        n = 0
        while plan or (soak_until and time.perf_counter() < soak_until):
            n += 1
            label = plan.pop(0) if plan else f"soak{n}"
            report["rounds"].append(run_round(net, layout, files, shas, label, churn=args.churn,
                                              peer_every=args.peer_every, deadline=args.deadline,
                                              converge_timeout=args.converge_timeout, tmp=tmp))
            write(report, out, began)  # a long soak keeps what it measured so far
    finally:
        net.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    write(report, out, began)
    print(render(report))
    log(f"wrote {out} ({report['seconds']:.0f} s)")
    lost = sum(r["lost"] + r["corrupt"] for r in report["rounds"])
    return 1 if lost else 0


def write(report: dict, out: Path, began: float) -> None:
    report["seconds"] = time.perf_counter() - began
    report["loadavg_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
