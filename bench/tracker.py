"""Tracker benchmark: answer time of ls / list / request as the catalogue grows (issue 3).

    python bench/tracker.py              # full: 5 runs, 100 / 500 / 1000 circuits x 100 files (a few minutes)
    python bench/tracker.py --quick      # smoke run: 1-2 runs, 50 / 100 / 200 circuits (under a minute)
    python bench/tracker.py --modes inproc               # only the in-process part
    python bench/tracker.py --profile-http               # also cProfile the twistd tracker over one HTTP run

Two measurements in one invocation, on the same synthetic workload:

1. **in process** (pure logic, no sockets): ``onion_twisted.tracker.tracker.Tracker`` with
   a ``Catalogue`` and a ``NodeRegistry`` (``--exits`` fake exit nodes registered
   through ``Tracker.register_node``), and a fake outbound that answers every
   POST with ``{}`` at once, so the bridge steps of a ``request`` cost nothing
   but the tracker's own work (Ed25519 signatures of the control messages
   included). Clock: a ``task.Clock`` moved ``--gap-ms`` (10 ms) before each
   message, as if 100 messages a second arrived, so the ``listing_refresh``
   throttle of a large catalogue (the files reply rebuilt at most once a
   second) behaves as in production whatever the speed of this machine.
   Each ``handle_cell`` call is timed with ``perf_counter_ns`` (the fake
   outbound fires synchronously, so the coroutine is done when the call
   returns). Beside the messages, one rebuild of the files reply
   (``Catalogue._build_listing`` + serialisation) is timed alone at each size,
   and generation-2 garbage collections are counted and timed.
2. **over HTTP**: a real ``twistd -n --pidfile= oniontracker`` process on its own
   127.A.B.1 at port 5000, with default settings. This process poses as
   ``--exits`` exit nodes 127.A.B.11, .12, ...: on each address it serves
   ``GET /identity`` (a node identity with its own RSA key) and answers
   ``POST /`` (the tracker's control messages and backward requests) with
   ``{}``; it registers each address with ``POST /nodes`` from a socket
   bound to that address (re-registering every 20 s), then sends cells
   ``{"CID": uuid4, "payload": {...}}`` to the tracker's ``POST /`` from the
   address of the circuit's exit. ``--concurrency`` (8) workers; latency is
   from sending the request to having read the whole answer.

Workload (per run, from a seed): ``--circuits`` (1000) circuits of
``--files`` (100) files each, named objects ``{name, size, sha256}``:

* 60 % drawn from a pool of popular files (3 per circuit, Zipf-like weights):
  the same name and sha256 on many circuits;
* 5 % drawn from names that exist with 3 different contents (same name,
  other sha256 and size);
* 35 % unique to the circuit.

At each size point (100, 500, 1000 circuits) the circuits up to that size
announce (``ls (new)``: the first message of a circuit, timed while the
catalogue grows from the previous size point), then a shuffled mix at that
size is timed: ``ls (re)`` (an announced circuit re-announces with one file
swapped for a new one: its shared set changed), ``list`` and ``request``
(a random announced circuit asks for a random file of another circuit, with
its sha256 half of the time and without it the other half).

Each figure is the median over ``--runs`` runs (5) of that run's
percentile. Writes bench/out/tracker.json and bench/results-tracker.md
(``--quick``: bench/out/tracker-quick.json only), the in-process cProfile of
the last size point to bench/out/tracker-inproc.prof (+ .txt summary), and
with ``--profile-http`` the cProfile of a whole HTTP run of the twistd
tracker (``twistd --profile``) to bench/out/tracker-http.prof (+ .txt).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import math
import os
import pstats
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import common
from common import QuietSite, machine, make_client, median_or_none, wait_ready

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
REPO = BENCH.parent

SHARED_FRACTION = 0.60
CONFLICT_FRACTION = 0.05
CONFLICT_VARIANTS = 3
REQUEST_TIMEOUT = 60.0
EXTS = ("mkv", "iso", "pdf", "flac", "tar.gz", "epub", "mp4", "zip", "jpg", "txt")
WORDS = ("ubuntu", "debian", "lecture", "holiday", "report", "album", "dataset", "backup", "manual",
         "podcast", "thesis", "photos", "archive", "kernel", "firmware", "concert", "recipes", "notes")
MIX_TYPES = ("ls_re", "list", "request")
TYPE_LABELS = {"ls_new": "ls (new circuit)", "ls_re": "ls (re-announce)", "list": "list", "request": "request"}
ALL_TYPES = ("ls_new", "ls_re", "list", "request")


# --- the workload -----------------------------------------------------------------------


def _file(name: str, content: str, rng: random.Random) -> dict:
    return {"name": name, "size": rng.randint(1_000, 4_000_000_000),
            "sha256": hashlib.sha256(content.encode("utf-8")).hexdigest()}


class Workload:
    """Circuits, their files and the message bodies, all from one seed."""

    def __init__(self, seed: int, circuits: int, files: int, exits: list[str]):
        self.rng = rng = random.Random(seed)
        self.exits = exits
        self.files_per_circuit = files
        n_pool = max(50, circuits * 3)
        n_conflict = max(10, circuits * 3 // 10)
        self.pool = [_file(f"{rng.choice(WORDS)}-{i:05d}.{rng.choice(EXTS)}", f"pool/{i}", rng) for i in range(n_pool)]
        self.pool_cum = list(_cumulative(1.0 / (i + 1) ** 0.8 for i in range(n_pool)))
        self.conflicts = []
        for i in range(n_conflict):
            name = f"{rng.choice(WORDS)}-v{i:04d}.{rng.choice(EXTS)}"
            self.conflicts.append([_file(name, f"conflict/{i}/{v}", rng) for v in range(CONFLICT_VARIANTS)])
        n_shared = round(files * SHARED_FRACTION)
        n_conf = round(files * CONFLICT_FRACTION)
        self.cids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(circuits)]
        self.exit_of = [exits[i % len(exits)] for i in range(circuits)]
        self.lists: list[list[dict]] = []
        for c in range(circuits):
            chosen: dict[str, dict] = {}
            while len(chosen) < n_shared:
                f = self.pool[rng.choices(range(n_pool), cum_weights=self.pool_cum)[0]]
                chosen.setdefault(f["name"], f)
            while len(chosen) < n_shared + n_conf:
                f = rng.choice(rng.choice(self.conflicts))
                chosen.setdefault(f["name"], f)
            j = 0
            while len(chosen) < files:
                f = _file(f"c{c:04d}-{rng.choice(WORDS)}-{j:03d}.{rng.choice(EXTS)}", f"own/{c}/{j}", rng)
                chosen.setdefault(f["name"], f)
                j += 1
            files_c = list(chosen.values())
            rng.shuffle(files_c)
            self.lists.append(files_c)
        self._changes = 0

    def ls_body(self, c: int) -> bytes:
        return _cell(self.cids[c], {"type": "ls", "files": self.lists[c]})

    def reannounce(self, c: int) -> bytes:
        """Circuit c's shared set changed: one file swapped for a new one."""
        self._changes += 1
        files = self.lists[c]
        files[self.rng.randrange(len(files))] = _file(f"c{c:04d}-new-{self._changes:05d}.txt",
                                                      f"new/{c}/{self._changes}", self.rng)
        return self.ls_body(c)

    def list_body(self, c: int) -> bytes:
        return _cell(self.cids[c], {"type": "list"})

    def request_body(self, c: int, announced: int) -> bytes:
        source = self.rng.randrange(announced - 1)
        source += source >= c  # another circuit
        f = self.rng.choice(self.lists[source])
        msg = {"type": "request", "file": f["name"]}
        if self.rng.random() < 0.5:
            msg["sha256"] = f["sha256"]
        return _cell(self.cids[c], msg)

    def mix(self, announced: int, per_type: int) -> list[tuple[str, int, bytes]]:
        """(type, circuit, body) in random order, ``per_type`` of each type."""
        kinds = [k for k in MIX_TYPES for _ in range(per_type)]
        self.rng.shuffle(kinds)
        out = []
        for kind in kinds:
            c = self.rng.randrange(announced)
            if kind == "ls_re":
                body = self.reannounce(c)
            elif kind == "list":
                body = self.list_body(c)
            else:
                body = self.request_body(c, announced)
            out.append((kind, c, body))
        return out


def _cumulative(weights):
    total = 0.0
    for w in weights:
        total += w
        yield total


def _cell(cid: str, payload: dict) -> bytes:
    import orjson

    return orjson.dumps({"CID": cid, "payload": payload})


# --- statistics -------------------------------------------------------------------------


def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def stats_ms(samples_ns: list[int]) -> dict:
    v = sorted(x / 1e6 for x in samples_ns)
    return {"n": len(v), "median": pct(v, 0.5), "p95": pct(v, 0.95), "p99": pct(v, 0.99),
            "max": v[-1] if v else float("nan"), "mean": statistics.fmean(v) if v else float("nan")}


def median_of(runs: list[dict], field: str):
    return median_or_none(r.get(field) for r in runs)


class GCWatch:
    """Time spent in generation-2 collections (they show up as the max of a message)."""

    def __init__(self):
        self.count = 0
        self.ns = 0
        self.worst_ns = 0
        self.cpu_ns = 0
        self._t = self._c = 0

    def __call__(self, phase, info):
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t = time.perf_counter_ns()
            self._c = time.thread_time_ns()
        else:
            d = time.perf_counter_ns() - self._t
            self.cpu_ns += time.thread_time_ns() - self._c
            self.count += 1
            self.ns += d
            self.worst_ns = max(self.worst_ns, d)

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)

    def snapshot(self) -> dict:
        return {"gen2_collections": self.count, "gen2_total_ms": self.ns / 1e6, "gen2_worst_ms": self.worst_ns / 1e6,
                "gen2_cpu_ms": self.cpu_ns / 1e6}


# --- part 1: in process ---------------------------------------------------------------------


class FakeOutbound:
    """Every POST answered ``{}`` at once; GET /identity shows the registered key."""

    def __init__(self, identities: dict):
        self.identities = identities
        self.posts = 0

    def post(self, address, body, headers=None, path="/"):
        from twisted.internet import defer

        self.posts += 1
        return defer.succeed(b"{}")

    def get(self, address, path):
        from twisted.internet import defer

        return defer.succeed((200, None, self.identities[address.host]))


def exit_keys(exits: list[str], port: int, bits: int = 1024) -> dict:
    from onion_twisted.protocol import crypto, wire

    keys = {}
    for ip in exits:
        key = crypto.generate_node_key(bits)
        pem = crypto.public_key_pem(key)
        fp = crypto.fingerprint(key)
        identity = wire.dumps({"role": "node", "address": f"{ip}:{port}", "public_key": pem,
                               "fingerprint": fp, "protocol": "onion-http/1"})
        keys[ip] = {"pem": pem, "fingerprint": fp, "identity": identity}
    return keys


def make_inproc_tracker(exits: list[str], keys: dict, port: int):
    from twisted.internet import defer, task

    from onion_twisted.protocol import crypto, wire
    from onion_twisted.tracker.catalogue import Catalogue
    from onion_twisted.net.config import parse
    from onion_twisted.tracker.registry import NodeRegistry
    from onion_twisted.tracker.tracker import Tracker

    cfg = parse("tracker")  # the defaults of `twistd oniontracker`
    reactor = task.Clock()  # advanced by --gap-ms before each message (see _call)
    reactor.advance(time.time())
    signing_key = crypto.generate_tracker_key()
    outbound = FakeOutbound({ip: keys[ip]["identity"] for ip in exits})
    catalogue = Catalogue(reactor, idle_timeout=cfg["circuit_idle_timeout"], max_circuits=cfg["max_circuits"],
                          max_files=cfg["max_files_per_circuit"], max_entries=cfg["max_catalogue_entries"],
                          max_entries_per_exit=cfg["max_entries_per_exit"], max_listing=cfg["max_listing"],
                          listing_refresh=cfg["listing_refresh"])
    registry = NodeRegistry(reactor, signing_key, heartbeat=cfg["heartbeat"], max_nodes=cfg["max_nodes"])
    tracker = Tracker(clock=reactor, signing_key=signing_key, own_address=wire.Address("127.0.0.1", port),
                      catalogue=catalogue, registry=registry, outbound=outbound, max_pending=cfg["max_pending"])
    for ip in exits:
        body = wire.dumps({"address": f"{ip}:{port}", "public_key": keys[ip]["pem"]})
        d = defer.ensureDeferred(tracker.register_node(ip, body))
        result = []
        d.addBoth(result.append)
        assert result and isinstance(result[0], bytes), f"in-process registration failed: {result}"
    return tracker, outbound


def _call(tracker, ip: str, body: bytes, gap: float):
    """(wall ns, thread CPU ns, answer bytes) of one handle_cell, which must finish synchronously.

    The tracker's clock moves ``gap`` seconds before each message: messages
    arrive at 1/gap per second, which decides how often a large catalogue's
    listing is rebuilt (``listing_refresh``).
    """
    from twisted.internet import defer

    tracker.clock.advance(gap)
    result = []
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    d = defer.ensureDeferred(tracker.handle_cell(ip, body))
    d.addBoth(result.append)
    elapsed = time.perf_counter_ns() - t0
    cpu = time.thread_time_ns() - c0
    if not result:
        raise RuntimeError("handle_cell did not finish synchronously with the fake outbound")
    if not isinstance(result[0], bytes):
        result[0].raiseException()
    return elapsed, cpu, result[0]


def _reply_kind(answer: bytes, full: bool) -> str:
    """"files", "transfer", "error:<error>"... (only small answers are parsed)."""
    if answer.startswith(b'{"payload":{"type":"files"'):
        return "files"
    if not full and len(answer) > 4096:
        return "other"
    try:
        payload = json.loads(answer).get("payload") or {}
    except (ValueError, AttributeError):
        return "unparsable"
    kind = str(payload.get("type", "?"))
    return f"{kind}:{payload.get('error')}" if kind == "error" else kind


def inproc_run(seed: int, args, keys: dict, profile_at: int | None = None) -> dict:
    exits = args.exit_ips
    gap = args.gap_ms / 1000
    tracker, outbound = make_inproc_tracker(exits, keys, args.port)
    w = Workload(seed, max(args.sizes), args.files, exits)
    gc.collect()
    points = []
    announced = 0
    profiler = None
    with GCWatch() as gcw:
        for size in args.sizes:
            if profile_at == size:
                profiler = cProfile.Profile()
                profiler.enable()
            gc_before = gcw.snapshot()
            samples = {t: [] for t in ALL_TYPES}
            cpu = {t: [] for t in ALL_TYPES}
            replies: dict[str, dict] = {t: {} for t in ALL_TYPES}
            for c in range(announced, size):
                ns, cpu_ns, answer = _call(tracker, w.exit_of[c], w.ls_body(c), gap)
                samples["ls_new"].append(ns)
                cpu["ls_new"].append(cpu_ns)
                kind = _reply_kind(answer, False)
                replies["ls_new"][kind] = replies["ls_new"].get(kind, 0) + 1
            announced = size
            gc_grown = gcw.snapshot()
            for kind, c, body in w.mix(announced, args.per_type):
                ns, cpu_ns, answer = _call(tracker, w.exit_of[c], body, gap)
                samples[kind].append(ns)
                cpu[kind].append(cpu_ns)
                r = _reply_kind(answer, kind == "request")
                replies[kind][r] = replies[kind].get(r, 0) + 1
            if profiler is not None:
                profiler.disable()
            gc_after = gcw.snapshot()
            rebuild = rebuild_cost(tracker.catalogue)
            points.append({
                "circuits": size, "entries": len(tracker.catalogue.entries),
                "names": len(tracker.catalogue.names), "files_reply_bytes": rebuild["reply_bytes"],
                "stats": {t: stats_ms(samples[t]) | {f"cpu_{k}": v for k, v in stats_ms(cpu[t]).items() if k != "n"}
                          for t in ALL_TYPES} | {"rebuild": rebuild},
                "replies": replies,
                "gc": {"growth": _gc_delta(gc_before, gc_grown), "mix": _gc_delta(gc_grown, gc_after),
                       "tracked_objects": len(gc.get_objects())},
            })
    return {"seed": seed, "points": points, "outbound_posts": outbound.posts, "profiler": profiler}


def _gc_delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in ("gen2_collections", "gen2_total_ms", "gen2_cpu_ms")}


def rebuild_cost(catalogue, reps: int = 5) -> dict:
    """One rebuild of the files reply, timed alone: Catalogue._build_listing and its serialisation."""
    from onion_twisted.protocol import wire

    build, dump, cpu = [], [], []
    for _ in range(reps):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        rows = catalogue._build_listing()
        t1 = time.perf_counter_ns()
        reply = wire.dumps({"type": "files", "files": rows})
        t2 = time.perf_counter_ns()
        cpu.append(time.thread_time_ns() - c0)
        build.append(t1 - t0)
        dump.append(t2 - t1)
    total = [a + b for a, b in zip(build, dump)]
    return stats_ms(total) | {"build_median": statistics.median(build) / 1e6,
                              "dumps_median": statistics.median(dump) / 1e6, "reply_bytes": len(reply),
                              "cpu_median": statistics.median(cpu) / 1e6}


def run_inproc(args, keys: dict) -> dict:
    runs = []
    for r in range(args.runs):
        t0 = time.perf_counter()
        run = inproc_run(args.seed + r, args, keys)
        run.pop("profiler")
        runs.append(run)
        last = run["points"][-1]
        print(f"  in-process run {r + 1}/{args.runs}: {time.perf_counter() - t0:.1f} s; at {last['circuits']} "
              f"circuits {last['entries']} entries, list median {last['stats']['list']['median']:.3f} ms, "
              f"request median {last['stats']['request']['median']:.3f} ms", flush=True)
    summary = summarise_points(runs, ("median", "p95", "p99", "max"))
    profile = None
    if args.profile_size:
        run = inproc_run(args.seed + 1000, args, keys, profile_at=args.profile_size)
        prof = run["profiler"]
        OUT.mkdir(exist_ok=True)
        path = OUT / ("tracker-inproc-quick.prof" if args.quick else "tracker-inproc.prof")
        prof.dump_stats(str(path))
        text = profile_text(pstats.Stats(prof), f"in-process tracker: circuits {args.sizes[-2] if len(args.sizes) > 1 else 0}"
                            f"->{args.profile_size} announcing, then the mix at {args.profile_size}")
        path.with_suffix(".txt").write_text(text)
        profile = {"file": str(path.relative_to(REPO)), "top": profile_top(pstats.Stats(prof))}
        print(f"  profile written to {path.relative_to(REPO)} (+ .txt)")
    return {"runs": runs, "summary": summary, "profile": profile}


def summarise_points(runs: list[dict], fields) -> list[dict]:
    out = []
    for i, point in enumerate(runs[0]["points"]):
        row = {"circuits": point["circuits"],
               "entries": statistics.median(r["points"][i]["entries"] for r in runs),
               "files_reply_bytes": statistics.median(r["points"][i]["files_reply_bytes"] for r in runs),
               "types": {}}
        for t in ALL_TYPES:
            per_run = [r["points"][i]["stats"][t] for r in runs]
            row["types"][t] = {f: median_of(per_run, f) for f in fields} | {"n": sum(s["n"] for s in per_run)}
            if "cpu_median" in per_run[0]:
                row["types"][t] |= {f"cpu_{f}": median_of(per_run, f"cpu_{f}") for f in fields}
        if "rebuild" in point["stats"]:
            per_run = [r["points"][i]["stats"]["rebuild"] for r in runs]
            row["rebuild"] = {f: median_of(per_run, f) for f in ("median", "max", "build_median", "dumps_median",
                                                                 "cpu_median")}
        for extra in ("msgs_per_s", "ls_new_msgs_per_s"):
            if extra in point:
                row[extra] = median_of([r["points"][i] for r in runs], extra)
        if "c1" in point:
            row["c1"] = {}
            for t in MIX_TYPES:
                per_run = [r["points"][i]["c1"][t] for r in runs]
                row["c1"][t] = {f: median_of(per_run, f) for f in ("median", "p95")}
        if "gc" in point:
            row["gc"] = {"tracked_objects": statistics.median(r["points"][i]["gc"]["tracked_objects"] for r in runs)}
            for phase in ("growth", "mix"):
                per_run = [r["points"][i]["gc"][phase] for r in runs]
                row["gc"][phase] = {f: median_of(per_run, f) for f in ("gen2_collections", "gen2_total_ms", "gen2_cpu_ms")}
        if "tracker_cpu_ms_per_msg" in point:
            row["tracker_cpu_ms_per_msg"] = median_of([r["points"][i] for r in runs], "tracker_cpu_ms_per_msg")
        out.append(row)
    return out


def profile_top(stats: pstats.Stats, n: int = 12) -> list[dict]:
    rows = []
    total = stats.total_tt
    for (filename, line, func), (cc, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]:
        short = filename.replace(str(REPO) + "/", "").replace(sys.prefix + "/", "")
        short = short.split("site-packages/")[-1]
        rows.append({"function": f"{short}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct,
                     "tottime_share": tt / total if total else None})
    return rows


def profile_text(stats: pstats.Stats, title: str) -> str:
    buf = io.StringIO()
    stats.stream = buf
    buf.write(f"# {title}\n\n## by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(30)
    buf.write("\n## by cumulative time, onion_twisted only\n")
    stats.sort_stats("cumulative").print_stats("onion_twisted", 30)
    return buf.getvalue()


# --- part 2: over HTTP ---------------------------------------------------------------------------


def pick_network(n_exits: int, port: int) -> tuple[str, list[str]]:
    """127.A.B.1 for the tracker, 127.A.B.11... for the exits, all free at ``port``."""
    ips, _ = common.pick_addresses([1, *range(11, 11 + n_exits)], port)
    return ips[0], ips[1:]


class TrackerProc(common.Proc):
    """``twistd -n oniontracker`` under ``timeout`` (a 30-minute bound), its log in ``workdir/tracker.log``."""

    grace = 30.0
    tail_lines = 20

    def __init__(self, ip: str, port: int, workdir: Path, twistd: str, profile: Path | None = None):
        self.workdir = workdir
        argv = ["timeout", "-s", "TERM", "-k", "10", "1800", twistd, "-n", "--pidfile="]
        if profile is not None:
            argv += [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
        argv += ["oniontracker", "--listen", ip, "--port", str(port), "--data-dir", str(workdir / "data"), "--no-tls"]
        super().__init__("tracker", argv, workdir, cwd=workdir)  # SIGTERM: timeout passes it on to twistd

    def cpu_seconds(self) -> float | None:
        # `timeout` is the direct child: its child is twistd
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            pid = int(children[0]) if children else self.pid
        except (OSError, ValueError):
            return None
        return common.cpu_seconds(pid)


def start_fake_exits(reactor, exits: list[str], port: int, keys: dict) -> tuple[list, dict]:
    """One twisted.web site per exit address: GET /identity, POST / -> {}."""
    from twisted.web import resource

    counts = {"control": 0, "backward": 0, "other": 0}

    class Exit(resource.Resource):
        isLeaf = True

        def __init__(self, identity: bytes):
            super().__init__()
            self.identity = identity

        def render_GET(self, request):
            request.setHeader(b"Content-Type", b"application/json")
            if request.path == b"/identity":
                return self.identity
            request.setResponseCode(404)
            return b'{"error":"not_found"}'

        def render_POST(self, request):
            body = request.content.read()
            if body.startswith(b'{"CID":"control"'):
                counts["control"] += 1
            elif body.startswith(b'{"CID":'):
                counts["backward"] += 1
            else:
                counts["other"] += 1
            request.setHeader(b"Content-Type", b"application/json")
            return b"{}"

    ports = [reactor.listenTCP(port, QuietSite(Exit(keys[ip]["identity"]), in_memory=False), interface=ip)
             for ip in exits]
    return ports, counts


async def http_phase(reactor, clients: dict, url: bytes, items: list[tuple[str, int, bytes]], exit_of: list[str],
                     concurrency: int, tracker: TrackerProc) -> dict:
    """Send ``items`` with ``concurrency`` workers; latencies per type, msgs/s, reply kinds."""
    from twisted.internet import defer

    samples: dict[str, list[int]] = {}
    replies: dict[str, dict] = {}
    errors: list[str] = []
    it = iter(items)

    async def worker():
        for kind, c, body in it:
            t0 = time.perf_counter_ns()
            try:
                code, data = await clients[exit_of[c]].request(b"POST", url, body)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{kind}: {type(e).__name__}: {e}")
                if not tracker.alive():
                    raise RuntimeError(f"the tracker died:\n{tracker.tail()}") from None
                continue
            elapsed = time.perf_counter_ns() - t0
            samples.setdefault(kind, []).append(elapsed)
            r = _reply_kind(data, kind == "request") if code == 200 else f"http {code}"
            replies.setdefault(kind, {})
            replies[kind][r] = replies[kind].get(r, 0) + 1
            if code != 200 and len(errors) < 20:
                errors.append(f"{kind}: {code} {data[:200]!r}")

    cpu0 = tracker.cpu_seconds()
    t0 = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True)
    wall = time.perf_counter() - t0
    cpu1 = tracker.cpu_seconds()
    n = sum(len(v) for v in samples.values())
    return {"samples": samples, "replies": replies, "errors": errors, "n": n, "wall_s": wall,
            "msgs_per_s": n / wall if wall else None,
            "tracker_cpu_ms_per_msg": (cpu1 - cpu0) * 1000 / n if n and cpu0 is not None and cpu1 is not None else None}


async def http_run(reactor, seed: int, args, keys: dict, tracker_ip: str, profile: Path | None = None) -> dict:
    from twisted.internet import defer, task

    from onion_twisted.protocol import wire

    exits = args.exit_ips
    port = args.port
    work = Path(tempfile.mkdtemp(prefix="bench-tracker-"))
    proc = TrackerProc(tracker_ip, port, work, args.twistd, profile)
    clients = {ip: make_client(reactor, ip, max(args.concurrency, 2), REQUEST_TIMEOUT) for ip in exits}
    base = f"http://{tracker_ip}:{port}".encode()
    heartbeat = None
    ok = False
    try:
        await wait_ready(reactor, clients[exits[0]], base + b"/identity", proc, timeout=30)

        async def register():
            for ip in exits:
                body = wire.dumps({"address": f"{ip}:{port}", "public_key": keys[ip]["pem"]})
                code, data = await clients[ip].request(b"POST", base + b"/nodes", body)
                if code != 200:
                    raise RuntimeError(f"registration of {ip} refused: {code} {data!r}")

        await register()
        heartbeat = task.LoopingCall(lambda: defer.ensureDeferred(register()).addErrback(
            lambda f: print(f"  re-register failed: {f.value}")))
        heartbeat.clock = reactor
        heartbeat.start(20.0, now=False)

        w = Workload(seed, max(args.sizes), args.files, exits)
        url = base + b"/"
        points = []
        announced = 0
        for size in args.sizes:
            grow = [("ls_new", c, w.ls_body(c)) for c in range(announced, size)]
            g = await http_phase(reactor, clients, url, grow, w.exit_of, args.concurrency, proc)
            announced = size
            c1 = await http_phase(reactor, clients, url, w.mix(announced, args.per_type_c1), w.exit_of, 1, proc)
            m = await http_phase(reactor, clients, url, w.mix(announced, args.per_type), w.exit_of,
                                 args.concurrency, proc)
            code, listing = await clients[exits[0]].request(b"POST", url, w.list_body(0))
            _, metrics = await clients[exits[0]].request(b"GET", base + b"/metrics")
            entries = next((float(line.split()[-1]) for line in metrics.decode().splitlines()
                            if line.startswith("onion_tracker_catalogue_entries ")), float("nan"))
            stats = {t: stats_ms(m["samples"].get(t, [])) for t in MIX_TYPES}
            stats["ls_new"] = stats_ms(g["samples"].get("ls_new", []))
            replies = {t: m["replies"].get(t, {}) for t in MIX_TYPES} | {"ls_new": g["replies"].get("ls_new", {})}
            errors = g["errors"] + c1["errors"] + m["errors"]
            points.append({
                "circuits": size, "entries": entries, "files_reply_bytes": len(listing) - len(b'{"payload":}'),
                "stats": stats, "replies": replies, "errors": errors[:10], "n_errors": len(errors),
                "msgs_per_s": m["msgs_per_s"], "ls_new_msgs_per_s": g["msgs_per_s"],
                "tracker_cpu_ms_per_msg": m["tracker_cpu_ms_per_msg"],
                "c1": {t: stats_ms(c1["samples"].get(t, [])) for t in MIX_TYPES},
            })
        ok = True
        return {"seed": seed, "points": points}
    finally:
        if heartbeat is not None and heartbeat.running:
            heartbeat.stop()
        for c in clients.values():
            await c.close()
        rc = proc.stop()
        if rc not in (0, None, -signal.SIGTERM, 124, 143):
            print(f"  tracker exit status {rc}:\n{proc.tail()}")
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"  the tracker's log is kept in {work}")


async def run_http(reactor, args, keys: dict, tracker_ip: str) -> dict:
    ports, counts = start_fake_exits(reactor, args.exit_ips, args.port, keys)
    runs = []
    profile = None
    try:
        for r in range(args.http_runs):
            t0 = time.perf_counter()
            run = await http_run(reactor, args.seed + r, args, keys, tracker_ip)
            runs.append(run)
            last = run["points"][-1]
            errs = sum(p["n_errors"] for p in run["points"])
            print(f"  HTTP run {r + 1}/{args.http_runs}: {time.perf_counter() - t0:.1f} s; at {last['circuits']} circuits "
                  f"list median {last['stats']['list']['median']:.2f} ms, {last['msgs_per_s']:.0f} msgs/s"
                  f"{f', {errs} errors!' if errs else ''}", flush=True)
        if args.profile_http:
            OUT.mkdir(exist_ok=True)
            path = OUT / ("tracker-http-quick.prof" if args.quick else "tracker-http.prof")
            await http_run(reactor, args.seed + 2000, args, keys, tracker_ip, profile=path)
            if path.exists():
                stats = pstats.Stats(str(path))
                text = profile_text(stats, "twistd oniontracker over HTTP: a whole run (every size point)")
                path.with_suffix(".txt").write_text(text)
                profile = {"file": str(path.relative_to(REPO)), "top": profile_top(stats)}
                print(f"  profile written to {path.relative_to(REPO)} (+ .txt)")
            else:
                print("  the profiled tracker wrote no profile")
    finally:
        for p in ports:
            await p.stopListening()
    summary = summarise_points(runs, ("median", "p95", "p99", "max"))
    return {"runs": runs, "summary": summary, "exit_posts": counts, "profile": profile}


# --- report -----------------------------------------------------------------------------------


def f3(v) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def render_inproc_table(summary: list[dict]) -> str:
    lines = ["| circuits | entries | files reply | message | n | median ms | p95 ms | p99 ms | max ms | "
             "CPU median | CPU p99 | CPU max |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        for t in ALL_TYPES:
            s = row["types"][t]
            lines.append(f"| {row['circuits']} | {row['entries']:.0f} | {row['files_reply_bytes'] / 1e6:.2f} MB | "
                         f"{TYPE_LABELS[t]} | {s['n']} | {f3(s['median'])} | {f3(s['p95'])} | {f3(s['p99'])} | "
                         f"{f3(s['max'])} | {f3(s.get('cpu_median'))} | {f3(s.get('cpu_p99'))} | "
                         f"{f3(s.get('cpu_max'))} |")
        if "gc" in row:
            g = row["gc"]
            lines.append(f"| {row['circuits']} | | | *GC gen-2 pauses: {g['growth']['gen2_collections']:.0f} while "
                         f"growing ({f3(g['growth']['gen2_total_ms'])} ms, CPU {f3(g['growth']['gen2_cpu_ms'])}), "
                         f"{g['mix']['gen2_collections']:.0f} in the mix ({f3(g['mix']['gen2_total_ms'])} ms, CPU "
                         f"{f3(g['mix']['gen2_cpu_ms'])}); {g['tracked_objects'] / 1e6:.2f} M objects "
                         f"tracked* | | | | | | | | |")
        if "rebuild" in row:
            r = row["rebuild"]
            lines.append(f"| {row['circuits']} | | | *files reply rebuild alone* (build {f3(r['build_median'])} + "
                         f"dumps {f3(r['dumps_median'])}) | 5 | {f3(r['median'])} | | | {f3(r['max'])} | "
                         f"{f3(r['cpu_median'])} | | |")
    return "\n".join(lines)


def render_http_table(summary: list[dict], concurrency: int) -> str:
    lines = [f"| circuits | entries | files reply | message | median ms (c=1) | p95 ms (c=1) | median ms (c={concurrency}) | "
             f"p95 ms (c={concurrency}) | p99 ms (c={concurrency}) | msgs/s (c={concurrency}) |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        for t in ALL_TYPES:
            s = row["types"][t]
            c1 = row.get("c1", {}).get(t, {})
            rate = row.get("ls_new_msgs_per_s") if t == "ls_new" else None
            rate_s = f"{rate:.0f}" if rate else ""
            lines.append(f"| {row['circuits']} | {row['entries']:.0f} | {row['files_reply_bytes'] / 1e6:.2f} MB | {TYPE_LABELS[t]} | "
                         f"{f3(c1.get('median'))} | {f3(c1.get('p95'))} | {f3(s['median'])} | {f3(s['p95'])} | "
                         f"{f3(s['p99'])} | {rate_s} |")
        cpu = row.get("tracker_cpu_ms_per_msg")
        cpu_s = f" (tracker CPU {cpu:.2f} ms/msg)" if cpu is not None else ""
        lines.append(f"| {row['circuits']} | | | **mix (ls re + list + request)**{cpu_s} | | | | | | "
                     f"**{row['msgs_per_s']:.0f}** |")
    return "\n".join(lines)


def render_profile(profile: dict | None, n: int = 10) -> str:
    if not profile:
        return ""
    lines = ["| function | calls | own s | cumulative s | share of own time |", "|---|---:|---:|---:|---:|"]
    for r in profile["top"][:n]:
        share = f"{100 * r['tottime_share']:.1f} %" if r["tottime_share"] is not None else ""
        lines.append(f"| `{r['function']}` | {r['calls']} | {r['tottime_s']:.3f} | {r['cumtime_s']:.3f} | {share} |")
    return "\n".join(lines)


def findings(report: dict) -> list[str]:
    """A few sentences computed from the figures (no judgement the numbers do not carry)."""
    out = []
    if "inproc" in report:
        rows = report["inproc"]["summary"]
        worst_med = max((row["types"][t]["median"], t, row["circuits"]) for row in rows for t in ALL_TYPES)
        worst_p95 = max((row["types"][t]["p95"], t, row["circuits"]) for row in rows for t in ALL_TYPES)
        out.append(f"In process, the median answer stays at or under {worst_med[0]:.2f} ms and the p95 at or under "
                   f"{worst_p95[0]:.2f} ms for every message type at every size (worst: "
                   f"{TYPE_LABELS[worst_p95[1]]} at {worst_p95[2]} circuits).")
        last = rows[-1]
        if "rebuild" in last:
            r = last["rebuild"]
            p99 = max(last["types"][t]["p99"] for t in ("ls_re", "list"))
            out.append(f"At {last['circuits']} circuits the p99 of `ls`/`list` is {p99:.1f} ms; one rebuild of the "
                       f"files reply alone takes {r['median']:.1f} ms (Catalogue._build_listing {r['build_median']:.1f} ms "
                       f"+ serialisation {r['dumps_median']:.1f} ms, over {last['entries']:.0f} entries; "
                       f"{rows[0]['rebuild']['median']:.1f} ms at {rows[0]['circuits']} circuits). While the catalogue "
                       f"changes, the first `ls`/`list` after each `listing_refresh` interval pays it.")
        collections = sum((row["gc"][ph]["gen2_collections"] or 0) for row in rows if "gc" in row
                          for ph in ("growth", "mix"))
        if collections:
            pause = sum((row["gc"][ph]["gen2_total_ms"] or 0) for row in rows for ph in ("growth", "mix"))
            out.append(f"Generation-2 garbage collections (medians over the runs: {collections:.0f} in all, "
                       f"{pause / collections:.0f} ms each on average, {last['gc']['tracked_objects'] / 1e6:.2f} M objects tracked at "
                       f"{last['circuits']} circuits) land inside whichever message triggers them: compare with "
                       f"the max column.")
        req = last["types"]["request"]
        first = rows[0]["types"]["request"]
        out.append(f"`request` (source choice, two signed control messages, the backward request): median "
                   f"{req['median']:.2f} ms, p99 {req['p99']:.2f} ms at {last['circuits']} circuits "
                   f"({first['median']:.2f} / {first['p99']:.2f} ms at {rows[0]['circuits']}).")
    if "http" in report:
        rows = report["http"]["summary"]
        last = rows[-1]
        c1 = last.get("c1", {})
        capped = ", capped at max_listing = 10 000 entries" if last["entries"] > 10_000 else ""
        out.append(f"Over HTTP at {last['circuits']} circuits, one message at a time: median `list` "
                   f"{c1.get('list', {}).get('median', float('nan')):.2f} ms, `ls` "
                   f"{c1.get('ls_re', {}).get('median', float('nan')):.2f} ms (the answer is the whole catalogue: "
                   f"{last['files_reply_bytes'] / 1e6:.2f} MB{capped}), `request` "
                   f"{c1.get('request', {}).get('median', float('nan')):.2f} ms (three POSTs to the exits before "
                   f"the answer). At c={report['config']['concurrency']}: {last['msgs_per_s']:.0f} messages/s, "
                   f"{last.get('tracker_cpu_ms_per_msg') or float('nan'):.2f} ms of tracker CPU per message, "
                   f"median `list` {last['types']['list']['median']:.1f} ms (a message waits behind the others "
                   f"on the tracker's one thread).")
    la0, la1 = report.get("loadavg_start"), report.get("loadavg_end")
    if la0 and la1:
        out.append(f"Load average (1 min) {la0[0]:.2f} at the start, {la1[0]:.2f} at the end: other work on "
                   f"the machine inflates the tails.")
    return out


def _reply_summary(runs: list[dict]) -> str:
    """'ls_re: files 1500; request: transfer 1500' over all the runs."""
    total: dict[str, dict] = {}
    for run in runs:
        for point in run["points"]:
            for kind, replies in point["replies"].items():
                for reply, n in replies.items():
                    total.setdefault(kind, {}).setdefault(reply, 0)
                    total[kind][reply] += n
    return "; ".join(f"{TYPE_LABELS.get(k, k)} → " + ", ".join(f"`{r}` {n}" for r, n in sorted(v.items()))
                     for k, v in sorted(total.items()))


def render_markdown(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    parts = [f"""# Tracker benchmark results

Produced by `{cfg['command']}` on {report['when']} (bench/tracker.py; its
docstring says what is measured). Workload: {cfg['circuits']} circuits
announcing {cfg['files']} files each ({SHARED_FRACTION:.0%} popular files
shared with the same sha256, {CONFLICT_FRACTION:.0%} same name with
{CONFLICT_VARIANTS} different contents, the rest unique), {cfg['exits']} exit
nodes, tracker defaults (max_listing 10 000, listing_refresh 1 s). At each
size point: {cfg['per_type']} each of `ls` (re-announce, one file changed),
`list` and `request`, shuffled. Every figure is the median over the runs of
that run's percentile.

Machine: {m['cores']} cores ({m.get('cpu', '?')}), Python {m['python']},
Twisted {m['twisted']}, klein {m.get('klein', '?')}, orjson {m.get('orjson', '?')}; {m['platform']}.

## Reading the figures

""" + "\n".join(f"* {line}" for line in findings(report)) + "\n"]
    if "inproc" in report:
        parts.append(f"""## 1. In process (Tracker.handle_cell, no sockets; {cfg['runs']} runs)

The tracker's clock (a task.Clock) moves {cfg['gap_ms']:g} ms before each message, as if
{1000 / cfg['gap_ms']:.0f} messages a second arrived; "files reply" is the size of a freshly built reply.

{render_inproc_table(report['inproc']['summary'])}
""")
        if report["inproc"].get("profile"):
            parts.append(f"""cProfile of the tracker at {cfg['profile_size']} circuits (announcing
{cfg['sizes'][-2] if len(cfg['sizes']) > 1 else 0}→{cfg['profile_size']}, then the mix), top own time
(`{report['inproc']['profile']['file']}`, summary in the `.txt` beside it):

{render_profile(report['inproc']['profile'])}
""")
    if "http" in report:
        h = report["http"]
        parts.append(f"""## 2. Over HTTP (`twistd -n oniontracker`, {cfg['http_runs']} runs)

Latency from sending a cell to having read the whole answer (the `files`
reply included), the load client and the fake exits in one process sharing
the {m['cores']} cores with the tracker. c=1: {cfg['per_type_c1']} of each type one at a time;
c={cfg['concurrency']}: {cfg['per_type']} of each type from {cfg['concurrency']} workers (msgs/s on the
`ls (new)` rows: the announcing phase). The fake exits received
{h['exit_posts']['control']} control messages and {h['exit_posts']['backward']} backward requests over
all the runs{' (the profiled one included)' if h.get('profile') else ''}. Answers at c={cfg['concurrency']}: {_reply_summary(h['runs'])};
HTTP errors or timeouts: {sum(p['n_errors'] for r in h['runs'] for p in r['points'])}.

{render_http_table(h['summary'], cfg['concurrency'])}
""")
        if h.get("profile"):
            parts.append(f"""cProfile of the twistd tracker over one whole HTTP run, top own time
(`{h['profile']['file']}`):

{render_profile(h['profile'])}
""")
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------------


def start_logging() -> None:
    """Warnings and errors to stderr, the rest dropped.

    Without an observer, twisted.logger buffers events, and an event keeps
    its ``log_source`` alive: the in-process Tracker of every run (with its
    whole catalogue) would stay in memory and slow the GC of later runs.
    """
    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
                                textFileLogObserver)

    observer = FilteringLogObserver(textFileLogObserver(sys.stderr),
                                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer runs, smaller sizes (under a minute)")
    p.add_argument("--modes", default="inproc,http", help="inproc,http (default: both)")
    p.add_argument("--sizes", default=None, help="circuit counts of the size points (default 100,500,1000)")
    p.add_argument("--files", type=int, default=100, help="files per circuit (100)")
    p.add_argument("--runs", type=int, default=None, help="in-process runs (5)")
    p.add_argument("--http-runs", type=int, default=None, help="HTTP runs (5)")
    p.add_argument("--per-type", type=int, default=None, help="messages of each type at each size point (300)")
    p.add_argument("--per-type-c1", type=int, default=None, help="... at concurrency 1 over HTTP (100)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--exits", type=int, default=4, help="fake exit nodes (4)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--seed", type=int, default=20240)
    p.add_argument("--gap-ms", type=float, default=10.0,
                   help="in process: simulated time between two messages (10 ms: 100 messages/s arrive)")
    p.add_argument("--no-profile", action="store_true", help="skip the in-process cProfile run")
    p.add_argument("--profile-http", action="store_true", help="one more HTTP run under twistd --profile")
    p.add_argument("--twistd", default=str(Path(sys.executable).with_name("twistd")))
    args = p.parse_args(argv)
    q = args.quick
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([50, 100, 200] if q else [100, 500, 1000])
    args.runs = args.runs or (2 if q else 5)
    args.http_runs = args.http_runs or (1 if q else 5)
    args.per_type = args.per_type or (60 if q else 300)
    args.per_type_c1 = args.per_type_c1 or (20 if q else 100)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.profile_size = None if args.no_profile else max(args.sizes)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # readBody's abortConnection notice
    start_logging()
    from twisted.internet import defer, task

    import importlib

    importlib.import_module("onion_twisted.tracker.tracker")  # fail early if the package is missing

    t_start = time.perf_counter()
    if "http" in args.modes:
        tracker_ip, args.exit_ips = pick_network(args.exits, args.port)
    else:
        tracker_ip, args.exit_ips = None, [f"127.66.0.{11 + i}" for i in range(args.exits)]
    keys = exit_keys(args.exit_ips, args.port)
    report = {
        "benchmark": "tracker",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine("klein", "treq", "orjson", "cryptography"),
        "config": {"command": "python bench/tracker.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "quick": args.quick, "sizes": args.sizes, "circuits": max(args.sizes), "files": args.files,
                   "runs": args.runs, "http_runs": args.http_runs, "per_type": args.per_type,
                   "per_type_c1": args.per_type_c1, "concurrency": args.concurrency, "exits": args.exits,
                   "port": args.port, "seed": args.seed, "profile_size": args.profile_size,
                   "gap_ms": args.gap_ms},
        "loadavg_start": os.getloadavg(),
    }

    if "inproc" in args.modes:
        print(f"in process: sizes {args.sizes}, {args.files} files per circuit, {args.runs} runs", flush=True)
        report["inproc"] = run_inproc(args, keys)
        print()
        print(render_inproc_table(report["inproc"]["summary"]))
        if report["inproc"].get("profile"):
            print()
            print(render_profile(report["inproc"]["profile"]))
        print(flush=True)

    if "http" in args.modes:
        print(f"over HTTP: tracker {tracker_ip}:{args.port}, exits {args.exit_ips[0]}.., "
              f"{args.http_runs} runs, concurrency {args.concurrency}", flush=True)

        async def body(reactor):
            report["http"] = await run_http(reactor, args, keys, tracker_ip)

        def go(reactor):
            return defer.ensureDeferred(body(reactor))

        try:
            task.react(go)
        except SystemExit as e:
            if e.code:
                raise
        print()
        print(render_http_table(report["http"]["summary"], args.concurrency))
        if report["http"].get("profile"):
            print()
            print(render_profile(report["http"]["profile"]))

    report["elapsed_s"] = time.perf_counter() - t_start
    report["loadavg_end"] = os.getloadavg()
    OUT.mkdir(exist_ok=True)
    name = "tracker-quick.json" if args.quick else "tracker.json"
    (OUT / name).write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote bench/out/{name} ({report['elapsed_s']:.0f} s)")
    if not args.quick:
        (BENCH / "results-tracker.md").write_text(render_markdown(report))
        print("wrote bench/results-tracker.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
