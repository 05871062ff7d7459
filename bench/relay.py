"""Relay benchmark: small forward cells through one real node, beside plain Twisted Web.

    python bench/relay.py            # 5 runs of 3 s per figure (about 3 minutes)
    python bench/relay.py --quick    # smoke run: 1 run of 1 s per figure (under 30 s)
    python bench/relay.py --runs 7 --duration 5 --concurrency 32
    python bench/relay.py --targets node --profile bench/out/node.prof   # cProfile the node
    python bench/relay.py --targets node --py-spy bench/out/node.svg     # py-spy the node
    python bench/relay.py --targets proxy --py-spy bench/out/proxy.txt --spy-on proxy

Everything runs on loopback in one invocation, each member a real process on
its own 127.x.y.z address, all at one port (PROTOCOL.md §1):

    .1  this process: the load client (twisted.web.client.Agent, one persistent
        HTTPConnectionPool, sockets bound to .1)
    .2  bench/plain_server.py              plain answerer: POST / -> {}
    .3  bench/plain_server.py --forward-to plain proxy: forwards each POST to .2 with treq
    .4  bench/stub_tracker.py              stand-in tracker: POST / -> {"payload": {"type": "files", ...}}
    .5  twistd -n onionnode                the real node (--key-bits 1024, creates unthrottled)

Paths measured (the same ~200-byte POST body shape on each: a cell whose payload
is a ~100-byte message under one AES-GCM layer, made afresh for every request):

    plain direct        client -> answerer
    plain proxy chain   client -> proxy -> answerer        (a plain hop)
    tracker direct      client -> stub tracker             (sanity: the far end of the node path)
    onion node          client -> node -> stub tracker     (an onion hop: one circuit per worker,
                                                             CREATE + EXTEND to the tracker first)

A node answers only once the tracker has answered (store-and-forward, §3), so
the fair baseline of the node is the plain proxy chain: both are three
processes and two HTTP exchanges per cell.

Throughput: ``--concurrency`` workers (32) each send one request after another
for ``--duration`` seconds; requests completed inside the window / duration.
Latency: one request at a time (concurrency 1) for ``--duration`` seconds;
median and p95. Each figure is the median over ``--runs`` runs (5); runs of
the different paths are interleaved so drift hits them alike. Alongside, the
CPU time each process spent per request (from /proc/PID/stat).

Writes bench/out/relay.json and bench/results-relay.md (``--quick``:
bench/out/relay-quick.json only; ``--profile``/``--py-spy``: the profile, and
relay-profiled.json, since a profiled node is slower).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from common import ALL_PROCS, CLK_TCK, Proc, die_with_parent, machine, make_client, median_or_none, \
    pick_addresses, wait_ready

# readBody over a pooled connection warns about abortConnection; harmless here.
warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
PY = sys.executable

FORWARD = b"onion-http/1 forward"
BACKWARD = b"onion-http/1 backward"
MESSAGE_SIZE = 100
REQUEST_TIMEOUT = 15.0

TARGET_ORDER = ("direct", "proxy", "tracker", "node")
ROLES = ("client", "direct", "proxy", "tracker", "node")  # the addresses 127.A.B.1-5
LABELS = {
    "direct": "plain direct",
    "proxy": "plain proxy chain",
    "tracker": "tracker direct",
    "node": "onion node",
}
PATHS = {
    "direct": "client -> answerer",
    "proxy": "client -> proxy -> answerer",
    "tracker": "client -> stub tracker",
    "node": "client -> node -> stub tracker",
}


def message(size: int = MESSAGE_SIZE) -> bytes:
    """A ``list`` message for the tracker padded to exactly ``size`` bytes of JSON."""
    base = b'{"type":"list","pad":""}'
    return base[:-2] + b"x" * max(0, size - len(base)) + b'"}'


# --- processes ------------------------------------------------------------------------


def pick_network() -> tuple[dict, int]:
    """Five addresses 127.A.B.1-5 (random A, B), one per role, and a port free on all of them."""
    ips, port = pick_addresses(range(1, len(ROLES) + 1))
    return dict(zip(ROLES, ips)), port


# --- cells and paths --------------------------------------------------------------------


class Layer:
    """The peer's side of one hop (PROTOCOL.md §2), written here, not taken from the package."""

    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead = AESGCM(key)

    def wrap(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.aead.encrypt(nonce, plaintext, FORWARD)

    def peel(self, layer: bytes) -> bytes:
        return self.aead.decrypt(layer[:12], layer[12:], BACKWARD)


def cell(cid: str, layer_bytes: bytes) -> bytes:
    return b'{"CID":"%s","payload":"%s"}' % (cid.encode("ascii"), base64.b64encode(layer_bytes))


class PlainTarget:
    """A plain path: the same cell shape, a fresh layer per request, answer {} expected."""

    def __init__(self, name: str, url: bytes, procs: list[Proc], expect: bytes):
        self.name = name
        self.url = url
        self.procs = procs
        self.expect = expect
        self.layer = Layer(os.urandom(16))
        self.cids: list[str] = []

    def prepare(self, n: int):
        self.cids = [str(uuid.uuid4()) for _ in range(n)]

    def body(self, worker: int, msg: bytes) -> bytes:
        return cell(self.cids[worker], self.layer.wrap(msg))

    def check(self, code: int, data: bytes) -> str | None:
        if code != 200 or data != self.expect:
            return f"{code} {data[:200]!r}"
        return None


class NodeTarget:
    """The onion node: one circuit per worker, each extended to the stub tracker as its exit.

    onion-http/1 circuits (RSA CREATE, one AES layer); ``NodeTargetV2`` changes only the
    per-circuit crypto (the ``_`` methods), not how circuits are built or measured."""

    def __init__(self, url: bytes, procs: list[Proc], client, tracker_addr: str):
        self.name = "node"
        self.url = url
        self.procs = procs
        self.client = client
        self.tracker_addr = tracker_addr
        self.circuits: list[tuple[str, object]] = []

    # --- the circuit's crypto, /1 -------------------------------------------------------

    def _setup(self, identity: dict) -> None:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        self._public_key = serialization.load_pem_public_key(identity["public_key"].encode("ascii"))
        self._oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(),
                                  label=None)

    def _handshake(self):
        """(pending state, what the CREATE carries)."""
        key = os.urandom(16)
        return Layer(key), self._public_key.encrypt(key, self._oaep)

    def _finish(self, layer, reply: bytes):
        if layer.peel(reply) != b'{"type":"created"}':
            raise RuntimeError("CREATE answered something other than created")
        return layer

    def _seal_extend(self, layer, extend: bytes) -> bytes:
        return layer.wrap(extend)

    def _open_extend_reply(self, layer, data: bytes) -> bytes:
        return layer.peel(data)

    def _seal(self, layer, msg: bytes) -> bytes:
        return layer.wrap(msg)

    def _open(self, layer, data: bytes) -> bytes:
        return layer.peel(data)

    # --- building and measuring ---------------------------------------------------------

    async def prepare(self, n: int, identity_url: bytes) -> dict:
        from twisted.internet import defer

        code, data = await self.client.request(b"GET", identity_url)
        self._setup(json.loads(data))
        extend = json.dumps({"to": self.tracker_addr, "relay": {"type": "ls", "files": []}}).encode()

        async def build(i: int):
            cid = str(uuid.uuid4())
            pending, create = self._handshake()
            t0 = time.perf_counter()
            code, data = await self.client.post(self.url, cell(cid, create))
            t1 = time.perf_counter()
            if code != 200:
                raise RuntimeError(f"CREATE failed: {code} {data[:200]!r}")
            state = self._finish(pending, base64.b64decode(json.loads(data)["payload"]))
            code, data = await self.client.post(self.url, cell(cid, self._seal_extend(state, extend)))
            t2 = time.perf_counter()
            if code != 200:
                raise RuntimeError(f"EXTEND failed: {code} {data[:200]!r}")
            reply = json.loads(self._open_extend_reply(state, base64.b64decode(json.loads(data)["payload"])))
            if reply.get("type") != "files":
                raise RuntimeError(f"EXTEND: unexpected reply {reply!r}")
            return cid, state, t1 - t0, t2 - t1

        t0 = time.perf_counter()
        built = await defer.gatherResults([defer.ensureDeferred(build(i)) for i in range(n)], consumeErrors=True)
        elapsed = time.perf_counter() - t0
        self.circuits = [(cid, state) for cid, state, _, _ in built]
        return {
            "circuits": n, "seconds": elapsed,
            "create_ms_median": statistics.median(b[2] for b in built) * 1e3,
            "extend_ms_median": statistics.median(b[3] for b in built) * 1e3,
        }

    def body(self, worker: int, msg: bytes) -> bytes:
        cid, state = self.circuits[worker]
        return cell(cid, self._seal(state, msg))

    def check(self, code: int, data: bytes, worker: int = 0) -> str | None:
        if code != 200:
            return f"{code} {data[:200]!r}"
        try:
            reply = self._open(self.circuits[worker][1], base64.b64decode(json.loads(data)["payload"]))
        except Exception as e:  # noqa: BLE001 - any failure is a wrong answer
            return f"bad reply ({type(e).__name__}): {data[:200]!r}"
        if reply != b'{"type":"files","files":[]}':
            return f"unexpected reply {reply[:200]!r}"
        return None


class NodeTargetV2(NodeTarget):
    """The onion node on onion-http/2 circuits (§11, §14): ntor CREATE, a padded EXTEND to the
    stub tracker, then each cell a padded OBJECT frame under one counted layer."""

    def _setup(self, identity: dict) -> None:
        self._member = bytes.fromhex(identity["fingerprint"])
        self._onion_key = base64.b64decode(identity["onion_key"])

    def _handshake(self):
        from onion_twisted.protocol import ntor

        return ntor.client_start(self._member, self._onion_key)

    def _finish(self, pending, reply: bytes):
        return pending.finish(reply)  # checks AUTH

    def _seal_extend(self, keys, extend: bytes) -> bytes:
        from onion_twisted.peer import hops

        return keys.seal_forward(hops.padded(extend))

    def _open_extend_reply(self, keys, data: bytes) -> bytes:
        return keys.open_backward(data)

    def _seal(self, keys, msg: bytes) -> bytes:
        from onion_twisted.peer import hops
        from onion_twisted.protocol import onion2

        return keys.seal_forward(hops.padded(msg, kind=onion2.FRAME_OBJECT))

    def _open(self, keys, data: bytes) -> bytes:
        from onion_twisted.peer import hops

        return bytes(hops.read_frame(keys.open_backward(data))[1])


def _check(target, code, data, worker):
    if isinstance(target, NodeTarget):
        return target.check(code, data, worker)
    return target.check(code, data)


def _cpu(procs: list[Proc]) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {"client": usage.ru_utime + usage.ru_stime}
    for p in procs:
        cpu[p.name] = p.cpu_seconds()
    return cpu


def _system_snapshot() -> tuple[float, float | None, float]:
    """(wall clock, CPU seconds the whole machine was busy, CPU seconds of this run's processes)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq (steal: the hypervisor's, not this machine's)
        busy = (sum(fields[:7]) - fields[3] - fields[4]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ours = usage.ru_utime + usage.ru_stime + sum(p.cpu_seconds() or 0.0 for p in ALL_PROCS)
    return time.perf_counter(), busy, ours


def _foreign_cores(before, after) -> float | None:
    """Cores kept busy by processes outside this benchmark between two snapshots."""
    wall = after[0] - before[0]
    if before[1] is None or after[1] is None or wall <= 0:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)


def _cpu_per_request(before: dict, after: dict, n: int) -> dict:
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if a is not None and b is not None and n:
            out[name] = (a - b) / n * 1e6  # microseconds
    return out


async def throughput(reactor, client, target, duration: float, concurrency: int, msg: bytes) -> dict:
    from twisted.internet import defer

    done_in_window = 0
    total = 0
    errors: list[str] = []
    cpu0 = _cpu(target.procs)
    sys0 = _system_snapshot()
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker(i: int):
        nonlocal done_in_window, total
        while time.perf_counter() < deadline:
            body = target.body(i, msg)
            try:
                code, data = await client.post(target.url, body)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
                continue
            now = time.perf_counter()
            total += 1
            problem = _check(target, code, data, i)
            if problem:
                errors.append(problem)
            elif now <= deadline:
                done_in_window += 1

    await defer.gatherResults([defer.ensureDeferred(worker(i)) for i in range(concurrency)], consumeErrors=True)
    cpu1 = _cpu(target.procs)
    return {
        "foreign_cores": _foreign_cores(sys0, _system_snapshot()),
        "cells_per_s": done_in_window / duration,
        "completed": total,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cpu_us_per_request": _cpu_per_request(cpu0, cpu1, total),
    }


async def latency(client, target, duration: float, msg: bytes) -> dict:
    samples = []
    errors: list[str] = []
    cpu0 = _cpu(target.procs)
    sys0 = _system_snapshot()
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        body = target.body(0, msg)
        t0 = time.perf_counter()
        try:
            code, data = await client.post(target.url, body)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")
            continue
        dt = time.perf_counter() - t0
        problem = _check(target, code, data, 0)
        if problem:
            errors.append(problem)
        else:
            samples.append(dt)
    cpu1 = _cpu(target.procs)
    samples.sort()
    return {
        "foreign_cores": _foreign_cores(sys0, _system_snapshot()),
        "n": len(samples),
        "median_ms": statistics.median(samples) * 1e3 if samples else None,
        "p95_ms": samples[min(len(samples) - 1, int(0.95 * len(samples)))] * 1e3 if samples else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cpu_us_per_request": _cpu_per_request(cpu0, cpu1, len(samples)),
    }


_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; sys.exit(run())"


def twistd_command(profile: Path | None) -> list[str]:
    """``twistd`` run by this interpreter.

    ``python -m twisted`` is the ``twist`` runner, which has neither ``-n`` nor
    ``--pidfile``, so twistd is started as ``python -c "...twistd.run()"``.
    Under ``--profile``, bench/profiled_twistd.py runs it in cProfile (plain
    ``python -m cProfile`` loses the stats: twistd re-raises SIGTERM on exit).
    """
    if profile is not None:
        return [PY, str(BENCH / "profiled_twistd.py"), str(profile)]
    return [PY, "-c", _TWISTD]


def summarise(results: dict, targets: list[str]) -> dict:
    summary = {}
    for name in targets:
        tp = results["throughput"][name]
        lat = results["latency"][name]
        cpu_names = sorted({k for r in tp for k in r["cpu_us_per_request"]})
        summary[name] = {
            "cells_per_s": median_or_none(r["cells_per_s"] for r in tp),
            "cells_per_s_min": min(r["cells_per_s"] for r in tp),
            "cells_per_s_max": max(r["cells_per_s"] for r in tp),
            "errors": sum(r["errors"] for r in tp) + sum(r["errors"] for r in lat),
            "cpu_us_per_request": {k: median_or_none(r["cpu_us_per_request"].get(k) for r in tp) for k in cpu_names},
            "latency_median_ms": median_or_none(r["median_ms"] for r in lat),
            "latency_p95_ms": median_or_none(r["p95_ms"] for r in lat),
            "latency_samples": sum(r["n"] for r in lat),
        }
    derived = {}
    s = summary

    def diff(a, b, field):
        if a in s and b in s and s[a][field] is not None and s[b][field] is not None:
            return s[a][field] - s[b][field]
        return None

    if "node" in s and "proxy" in s:
        derived["node_over_proxy_throughput"] = s["node"]["cells_per_s"] / s["proxy"]["cells_per_s"]
    if "node" in s and "direct" in s:
        derived["node_over_direct_throughput"] = s["node"]["cells_per_s"] / s["direct"]["cells_per_s"]
    for field in ("latency_median_ms", "latency_p95_ms"):
        tag = "median" if "median" in field else "p95"
        derived[f"plain_hop_adds_{tag}_ms"] = diff("proxy", "direct", field)
        derived[f"onion_hop_adds_{tag}_ms"] = diff("node", "tracker", field)
        derived[f"node_minus_proxy_{tag}_ms"] = diff("node", "proxy", field)
    loads = [r["foreign_cores"] for kind in ("throughput", "latency") for name in targets
             for r in results[kind][name] if r.get("foreign_cores") is not None]
    background = {"median_cores": median_or_none(loads), "max_cores": max(loads) if loads else None}
    return {"targets": summary, "derived": derived, "background": background}


def fmt(v, spec=".0f", none="-"):
    return none if v is None else format(v, spec)


def render_table(report: dict) -> str:
    s = report["summary"]["targets"]
    d = report["summary"]["derived"]
    cfg = report["config"]
    lines = [
        f"| path | hops | cells/s (c={cfg['concurrency']}) | min-max | CPU µs per cell, by process | "
        f"latency p50 ms (c=1) | p95 ms |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for name in report["config"]["targets"]:
        t = s[name]
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in sorted(t["cpu_us_per_request"].items(), key=lambda kv: kv[0] != "client")
                        if v is not None)
        err = f" ({t['errors']} errors!)" if t["errors"] else ""
        lines.append(
            f"| {LABELS[name]}{err} | {PATHS[name]} | {fmt(t['cells_per_s'])} | "
            f"{fmt(t['cells_per_s_min'])}-{fmt(t['cells_per_s_max'])} | {cpu} | "
            f"{fmt(t['latency_median_ms'], '.3f')} | {fmt(t['latency_p95_ms'], '.3f')} |")
    out = ["\n".join(lines), ""]
    if "node_over_proxy_throughput" in d:
        out.append(f"* relay overhead, throughput: onion node / plain proxy chain = "
                   f"**{d['node_over_proxy_throughput']:.2f}**"
                   + (f" (node / plain direct = {d['node_over_direct_throughput']:.2f})"
                      if "node_over_direct_throughput" in d else ""))
    if d.get("onion_hop_adds_median_ms") is not None:
        out.append(f"* an onion hop adds (node path − tracker direct): median "
                   f"**{d['onion_hop_adds_median_ms']:.3f} ms**, p95 {fmt(d['onion_hop_adds_p95_ms'], '.3f')} ms")
    if d.get("plain_hop_adds_median_ms") is not None:
        out.append(f"* a plain hop adds (proxy chain − plain direct): median "
                   f"**{d['plain_hop_adds_median_ms']:.3f} ms**, p95 {fmt(d['plain_hop_adds_p95_ms'], '.3f')} ms")
    if d.get("node_minus_proxy_median_ms") is not None:
        out.append(f"* onion node path − plain proxy chain: median "
                   f"**{d['node_minus_proxy_median_ms']:.3f} ms**, p95 {fmt(d['node_minus_proxy_p95_ms'], '.3f')} ms")
    bg = report["summary"].get("background") or {}
    if bg.get("median_cores") is not None:
        if bg["max_cores"] < 0.2:
            verdict = "a quiet machine"
        elif bg["median_cores"] < 0.1:
            verdict = "mostly quiet, but some runs shared the machine (see min-max)"
        else:
            verdict = "the machine was shared: figures are noisier than on a quiet machine"
        out.append(f"* other processes on the machine kept {bg['median_cores']:.2f} cores busy during a run "
                   f"(median over runs; max {bg['max_cores']:.2f}): {verdict}")
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    m = report["machine"]
    cfg = report["config"]
    setup = report.get("node_setup") or {}
    return "\n".join([
        "# Relay benchmark results",
        "",
        f"Produced by `{cfg['command']}` on {report['when']}; bench/README.md says what each "
        f"figure means. Each figure is the median of {cfg['runs']} runs of {cfg['duration']:g} s. "
        f"A cell is a {cfg['message_bytes']}-byte message under one AES-GCM layer: "
        f"{cfg['body_bytes']} bytes of POST body.",
        "",
        f"Machine: {m['cores']} cores ({m.get('cpu', '?')}); Python {m['python']}; {m['openssl']}; "
        f"Twisted {m['twisted']}; cryptography {m['cryptography']}; treq {m.get('treq', '?')}; "
        f"klein {m.get('klein', '?')}; orjson {m.get('orjson', '?')}; pybase64 {m.get('pybase64', '?')}; "
        f"{m['platform']}.",
        "",
        render_table(report),
        "",
        f"All the processes (the load client included) share the {m['cores']} cores, so cells/s is "
        "what the whole chain sustains on this machine; the CPU column says where the time goes.",
        "",
        f"Circuit setup before the runs: {setup.get('circuits', '-')} circuits, CREATE then EXTEND to "
        f"the tracker, all at once, in {fmt(setup.get('seconds'), '.2f')} s (median CREATE "
        f"{fmt(setup.get('create_ms_median'), '.1f')} ms, EXTEND {fmt(setup.get('extend_ms_median'), '.1f')} ms).",
        "",
    ])


async def run(reactor, args) -> dict:
    from twisted.internet import task

    targets = [t for t in TARGET_ORDER if t in args.targets]
    ips, port = pick_network()
    tmp = Path(tempfile.mkdtemp(prefix="onion-bench-"))
    logdir = tmp / "logs"
    logdir.mkdir()
    procs: dict[str, Proc] = {}
    spy = None
    client = make_client(reactor, ips["client"], args.concurrency + 8, REQUEST_TIMEOUT)
    msg = message(args.message_bytes)
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        tracker_key = ed25519.Ed25519PrivateKey.generate()
        (tmp / "tracker_key").write_bytes(tracker_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))
        tracker_pub = base64.b64encode(tracker_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode("ascii")

        def url(role, path="/"):
            return f"http://{ips[role]}:{port}{path}".encode("ascii")

        need = set(targets)
        if need & {"direct", "proxy"}:
            procs["answerer"] = Proc("answerer", [PY, str(BENCH / "plain_server.py"), "--listen", ips["direct"],
                                                  "--port", str(port)], logdir)
        if "proxy" in need:
            procs["proxy"] = Proc("proxy", [PY, str(BENCH / "plain_server.py"), "--listen", ips["proxy"],
                                            "--port", str(port), "--forward-to", f"{ips['direct']}:{port}"], logdir)
        if need & {"tracker", "node"}:
            procs["tracker"] = Proc("tracker", [PY, str(BENCH / "stub_tracker.py"), "--listen", ips["tracker"],
                                                "--port", str(port), "--key-file", str(tmp / "tracker_key")], logdir)
        for name in ("answerer", "proxy", "tracker"):
            if name in procs:
                role = {"answerer": "direct", "proxy": "proxy", "tracker": "tracker"}[name]
                await wait_ready(reactor, client, url(role, "/identity" if name == "tracker" else "/"), procs[name])
        if "node" in need:
            launcher = [PY, str(Path(args.node_launcher).resolve())] if args.node_launcher else None
            node_argv = (launcher or twistd_command(Path(args.profile).resolve() if args.profile else None)) + [
                "-n", "--pidfile=", "onionnode",
                "--listen", ips["node"], "--port", str(port), "--tracker", f"{ips['tracker']}:{port}",
                "--tracker-key", tracker_pub, "--key-bits", "1024", "--data-dir", str(tmp / "node"),
                "--create-burst", "100000", "--create-rate", "100000",
                "--create-work-burst", "100000", "--create-work-rate", "100000",
                "--no-tls",  # the load client and stand-ins speak plain HTTP: this measures the relay itself
            ]
            procs["node"] = Proc("node", node_argv, logdir, cwd=tmp)
            await wait_ready(reactor, client, url("node", "/identity"), procs["node"], timeout=60)
            # The node registers at start; wait until the tracker lists it (not needed to exit, but quiet).
            for _ in range(50):
                code, data = await client.request(b"GET", url("tracker", "/nodes"))
                if ips["node"] in data.decode("utf-8", "replace"):
                    break
                await task.deferLater(reactor, 0.1, lambda: None)
            else:
                print("warning: the node did not register at the stub tracker", file=sys.stderr)

        print(f"network 127.{ips['client'].split('.')[1]}.{ips['client'].split('.')[2]}.0/24 port {port}; "
              f"pids: " + ", ".join(f"{p.name} {p.pid}" for p in procs.values()), file=sys.stderr)

        objs = {}
        if "direct" in need:
            objs["direct"] = PlainTarget("direct", url("direct"), [procs["answerer"]], b"{}")
        if "proxy" in need:
            objs["proxy"] = PlainTarget("proxy", url("proxy"), [procs["proxy"], procs["answerer"]], b"{}")
        if "tracker" in need:
            objs["tracker"] = PlainTarget("tracker", url("tracker"), [procs["tracker"]],
                                          b'{"payload":{"type":"files","files":[]}}')
        node_setup = None
        if "node" in need:
            target_class = NodeTargetV2 if args.protocol == "v2" else NodeTarget
            objs["node"] = target_class(url("node"), [procs["node"], procs["tracker"]], client,
                                        f"{ips['tracker']}:{port}")
            node_setup = await objs["node"].prepare(args.concurrency, url("node", "/identity"))
            print(f"node: {args.concurrency} circuits built in {node_setup['seconds']:.2f} s", file=sys.stderr)
        for name, t in objs.items():
            if isinstance(t, PlainTarget):
                t.prepare(args.concurrency)

        # Warm-up: fill every connection pool (client, proxy, node) and the code paths.
        for name in targets:
            await throughput(reactor, client, objs[name], args.warmup, args.concurrency, msg)
            await latency(client, objs[name], args.warmup / 2, msg)

        if args.py_spy:
            spy_bin = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
            out = Path(args.py_spy).resolve()
            fmt_ = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
            if args.spy_on not in procs:
                raise RuntimeError(f"--spy-on {args.spy_on}: no such process in this run ({', '.join(procs)})")
            spy = subprocess.Popen([spy_bin, "record", "--pid", str(procs[args.spy_on].pid), "-o", str(out),
                                    "-f", fmt_, "-r", "250", "--nonblocking"],
                                   stdout=open(logdir / "py-spy.log", "wb"), stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)
            await task.deferLater(reactor, 1.0, lambda: None)

        results = {"throughput": {t: [] for t in targets}, "latency": {t: [] for t in targets}}
        for r in range(args.runs):
            for name in targets:
                res = await throughput(reactor, client, objs[name], args.duration, args.concurrency, msg)
                results["throughput"][name].append(res)
                print(f"run {r + 1}/{args.runs} throughput {LABELS[name]:18} {res['cells_per_s']:8.0f} cells/s"
                      f"  (other load {fmt(res['foreign_cores'], '.2f')} cores)"
                      + (f"  {res['errors']} errors, first: {res['first_error']}" if res["errors"] else ""),
                      file=sys.stderr)
        for r in range(args.runs):
            for name in targets:
                res = await latency(client, objs[name], args.duration, msg)
                results["latency"][name].append(res)
                print(f"run {r + 1}/{args.runs} latency    {LABELS[name]:18} p50 {fmt(res['median_ms'], '.3f')} ms "
                      f"p95 {fmt(res['p95_ms'], '.3f')} ms (n={res['n']}, other load {fmt(res['foreign_cores'], '.2f')} cores)"
                      + (f"  {res['errors']} errors, first: {res['first_error']}" if res["errors"] else ""),
                      file=sys.stderr)

        for p in procs.values():
            if not p.alive():
                raise RuntimeError(f"{p.name} died during the run:\n{p.tail()}")
        body_bytes = len(objs[targets[0]].body(0, msg))
        return {
            "benchmark": "relay",
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine("treq", "klein", "orjson", "pybase64", openssl=True),
            "config": {
                "command": "python bench/relay.py" + ("" if len(sys.argv) < 2 else " " + " ".join(sys.argv[1:])),
                "runs": args.runs, "duration": args.duration, "warmup": args.warmup,
                "concurrency": args.concurrency, "message_bytes": len(msg), "body_bytes": body_bytes,
                "targets": targets, "quick": args.quick, "profiled": bool(args.profile or args.py_spy),
                "node_launcher": args.node_launcher,
                "network": {"addresses": ips, "port": port},
            },
            "node_setup": node_setup,
            "results": results,
            "summary": summarise(results, targets),
        }
    finally:
        try:
            await client.close()
        except Exception:  # noqa: BLE001
            pass
        if spy is not None and spy.poll() is None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(5)
        for p in reversed(list(procs.values())):
            code = p.stop()
            if code not in (0, -signal.SIGTERM, None):
                print(f"{p.name} exited with {code}; log: {p.log_path}\n{p.tail()}", file=sys.stderr)
        if args.keep_logs:
            print(f"logs kept in {logdir}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="relay benchmark: cells/s and hop latency, node vs plain Twisted Web")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 run of 1 s per figure")
    ap.add_argument("--runs", type=int, default=None, help="runs per figure (default 5; quick 1)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per run (default 3; quick 1)")
    ap.add_argument("--warmup", type=float, default=None, help="warm-up seconds per path (default 1; quick 0.3)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--protocol", choices=("v1", "v2"), default="v1",
                    help="the node's circuits: onion-http/1 (RSA, one AES layer) or /2 (ntor, counted, padded)")
    ap.add_argument("--message-bytes", type=int, default=MESSAGE_SIZE)
    ap.add_argument("--targets", default=",".join(TARGET_ORDER),
                    help=f"comma-separated subset of {','.join(TARGET_ORDER)}")
    ap.add_argument("--profile", default=None, help="run the node under cProfile, stats to this file")
    ap.add_argument("--py-spy", default=None, help="record the node with py-spy to this file (.svg, .json or raw)")
    ap.add_argument("--spy-on", default="node", choices=("node", "proxy", "answerer", "tracker"),
                    help="the process --py-spy records (default node)")
    ap.add_argument("--node-launcher", default=None,
                    help="run the node as `python SCRIPT <twistd args>` (to try a patch); not with --profile")
    ap.add_argument("--keep-logs", action="store_true", help="keep the member processes' logs")
    ap.add_argument("--out", default=None, help="JSON output (default bench/out/relay.json)")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 5)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGET_ORDER)
    if unknown or not args.targets:
        ap.error(f"unknown targets {sorted(unknown)}")
    if args.profile and "node" not in args.targets:
        ap.error("--profile needs the node target")
    if args.profile and args.node_launcher:
        ap.error("--profile and --node-launcher do not combine")
    if "node" in args.targets and "tracker" not in args.targets:
        pass  # the tracker process runs anyway; "tracker direct" is only not measured

    from twisted.internet import defer, task

    report = {}

    def go(reactor):
        async def body():
            report.update(await run(reactor, args))
        return defer.ensureDeferred(body())

    try:
        task.react(go)
    except SystemExit as e:
        if e.code:
            return e.code
    if not report:
        return 1

    print()
    print(render_table(report))
    print()
    profiled = report["config"]["profiled"]
    name = ("relay-profiled.json" if profiled else "relay-patched.json" if args.node_launcher
            else "relay-quick.json" if args.quick else "relay.json")
    out = Path(args.out) if args.out else OUT / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.quick and not profiled and not args.out and not args.node_launcher:
        md = BENCH / "results-relay.md"
        md.write_text(render_markdown(report))
        print(f"wrote {md}")
    if args.profile:
        import pstats

        stats = pstats.Stats(args.profile)
        stats.sort_stats("tottime").print_stats(30)
        print(f"cProfile stats of the node in {args.profile} (python -m pstats {args.profile})")
    errors = sum(t["errors"] for t in report["summary"]["targets"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
