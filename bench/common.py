"""What the benchmarks share: machine description, member processes, loopback
addresses, the load client, the quiet Twisted Web site, statistics helpers.

Imported as ``common`` by the scripts of bench/ (each is run as
``python bench/SCRIPT.py``, so bench/ is on ``sys.path``). It imports no
reactor: the scripts choose when the reactor starts.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

from twisted.web import server

from onion_twisted.net.http_client import BytesProducer  # the node's own: written at once, then dropped
from onion_twisted.ops.localnet import _get  # our members' TLS (self-signed: not checked), never via a proxy

JSON = b"application/json"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- machine ----------------------------------------------------------------------------


def machine(*optional: str, openssl: bool = False) -> dict:
    """Cores, Python, Twisted, platform and CPU model of this machine.

    ``openssl``: also OpenSSL's and cryptography's versions (required).
    ``optional``: modules whose version is given when they are installed.
    """
    import twisted

    info = {"cores": os.cpu_count(), "python": platform.python_version()}
    if openssl:
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend

        info["openssl"] = backend.openssl_version_text()
    info["twisted"] = twisted.__version__
    if openssl:
        info["cryptography"] = cryptography.__version__
    info["platform"] = platform.platform()
    for mod in optional:
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def member_metrics(net, ip: str, timeout: float = 10.0) -> dict[str, float]:
    """A member's ``/metrics`` as {sample (its name and labels): value}."""
    samples = {}
    for line in _get(net.url(ip, "/metrics"), timeout).decode("utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def member_options(pairs: list[str]) -> dict:
    """``--peer-option KEY=VALUE`` arguments as LocalNetwork's ``extra``: true/false are switches."""
    switches = {"true": True, "false": False}
    return {key: switches.get(value.lower(), value) for key, value in (pair.split("=", 1) for pair in pairs)}


# --- processes --------------------------------------------------------------------------


def die_with_parent():  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (from /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


ALL_PROCS: list[Proc] = []  # every member process started by this run


class Proc:
    """One member process; its stdout/stderr go to ``logdir/NAME.log``. Dies with this process."""

    grace = 20.0  # seconds between SIGTERM and SIGKILL in stop()
    tail_lines = 15

    def __init__(self, name: str, argv: list[str], logdir: Path, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=str(cwd) if cwd else None, preexec_fn=die_with_parent)
        self.pid = self.popen.pid
        ALL_PROCS.append(self)

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float | None = None) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(self.grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def tail(self, n: int | None = None) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-(n or self.tail_lines):])
        except OSError:
            return ""


def pick_addresses(hosts, port: int = 0) -> tuple[list[str], int]:
    """Addresses 127.A.B.h for each h of ``hosts`` (random A, B) and a port free on all of them.

    With ``port`` 0 the port is the one the system gives the first address.
    """
    for _ in range(50):
        a, b = random.randint(64, 250), random.randint(1, 250)
        ips = [f"127.{a}.{b}.{h}" for h in hosts]
        socks = []
        chosen = port
        try:
            for ip in ips:
                s = socket.socket()
                socks.append(s)
                s.bind((ip, chosen))
                chosen = chosen or s.getsockname()[1]
            return ips, chosen
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port on 127.x.y.z" if not port else f"no free 127.x.y.z addresses at port {port}")


# --- HTTP -------------------------------------------------------------------------------


def machine_busy() -> float | None:
    """CPU seconds the whole machine spent busy since boot (/proc/stat; steal left out)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return (sum(fields[:7]) - fields[3] - fields[4]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status memory field (VmRSS, VmHWM, ...) in bytes; 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def peer_api(address: str, path: str, body: dict | None = None):
    """A peer's user API (GET, or POST of ``body``), from this machine, never via a proxy."""
    import json
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{address}{path}", data=data,
                                     headers={"Content-Type": "application/json", "Host": address})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


def make_client(reactor, bind_ip: str, max_per_host: int, timeout: float):
    """The load client: one Agent, one persistent pool, sockets bound to ``bind_ip``.

    ``request`` and ``post`` fire with ``(code, body)``; a request fails after ``timeout`` s.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    class Bound:
        def endpointForURI(self, uri):
            return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port, timeout=10,
                                      bindAddress=(bind_ip, 0))

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = False
    agent = Agent.usingEndpointFactory(reactor, Bound(), pool=pool)
    headers = Headers({b"Content-Type": [JSON]})

    class Client:
        def request(self, method: bytes, url: bytes, body: bytes | None = None):
            d = agent.request(method, url, headers, BytesProducer(body) if body is not None else None)
            d.addCallback(lambda r: readBody(r).addCallback(lambda data: (r.code, data)))
            d.addTimeout(timeout, reactor)
            return d

        async def post(self, url: bytes, body: bytes):
            return await self.request(b"POST", url, body)

        def close(self):
            return pool.closeCachedConnections()

    return Client()


async def wait_ready(reactor, client, url: bytes, proc: Proc, timeout: float = 30.0):
    """Until ``GET url`` answers 200; fails if ``proc`` exits or after ``timeout`` s."""
    from twisted.internet import task

    deadline = time.perf_counter() + timeout
    last = None
    while time.perf_counter() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        try:
            code, data = await client.request(b"GET", url)
            if code == 200:
                return
            last = f"{code} {data[:100]!r}"
        except Exception as e:  # noqa: BLE001 - not listening yet
            last = type(e).__name__
        await task.deferLater(reactor, 0.1, lambda: None)
    raise RuntimeError(f"{proc.name} not ready after {timeout:.0f} s ({last}):\n{proc.tail()}")


class InMemoryRequest(server.Request):
    """The body read into a BytesIO whatever its size, as a node does (not spooled to a file)."""

    def gotLength(self, length):
        self.content = io.BytesIO()


class QuietSite(server.Site):
    """No access log; with ``in_memory``, bodies are read as a node reads them (InMemoryRequest)."""

    noisy = False

    def __init__(self, root, in_memory: bool = True):
        super().__init__(root)
        if in_memory:
            self.requestFactory = InMemoryRequest

    def log(self, request):
        pass


def member_parser(description: str) -> argparse.ArgumentParser:
    """The options every member server takes: ``--listen ADDRESS --port PORT``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--port", type=int, required=True)
    return ap


def serve(make_root, listen: str, port: int) -> int:
    """Serve ``make_root(reactor)`` on a QuietSite at listen:port until SIGTERM / SIGINT."""
    from twisted.internet import reactor

    reactor.listenTCP(port, QuietSite(make_root(reactor)), interface=listen)
    reactor.run()
    return 0


# --- statistics -------------------------------------------------------------------------


def percentile(values, q: float) -> float:
    """The value at fraction ``q`` of the sorted values (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median_or_none(values):
    """Median of the values that are neither None nor NaN; None if there are none."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file the bench downloaded, by the bench's own code, a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
