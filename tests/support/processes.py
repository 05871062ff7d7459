"""Members of the network as real processes, for trial tests.

* ``allocate_prefix`` picks a random ``127.R1.R2`` prefix whose addresses are
  free, so two tests (or two parallel runs) never share an address.
* ``ProcessesMixin`` (for a ``trial`` TestCase) gives the test its own
  prefix (``self.ip``) and admin outbound (``self.admin``) in ``setUp``, then
  runs the test case's ``start_members``. It starts ``twistd onionnode``,
  ``oniontracker``, ``onionpeer`` and the stand-in tracker
  (``fake_tracker.py``) with ``subprocess.Popen``, and registers one cleanup
  that stops every started member (SIGTERM, then SIGKILL past a deadline)
  and waits for its exit.
* ``poll_until`` is the only way tests wait: a check retried on the reactor
  clock until it holds or a deadline passes (no sleeps as synchronisation).
* ``ProcessesMixin.directory`` and ``wait_listed`` read the signed directory
  of a member and wait until the tracker and every node list all the nodes.
* ``sha256_file`` hashes a file the test's own way (hashlib), independent of
  the package, to check what the members wrote.
* ``PeerApiMixin`` asks a peer's user API (status, downloads) from ``self.admin``.
* ``StatusOutbound`` is ``HTTPOutbound.post`` for a test peer: a refusal
  raises the ``errors`` class of the status the member answered, with
  ``answered`` set to that status, so a test can assert 403, 502 or 504.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.http_headers import Headers
from zope.interface import implementer

from onion_twisted.protocol import crypto, errors, wire
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.net.http_client import BytesProducer, HTTPOutbound
from onion_twisted.protocol.interfaces import IOutbound
from tests.support.deferreds import current_reactor as _reactor

REPO = Path(__file__).resolve().parents[2]
FAKE_TRACKER = Path(__file__).resolve().with_name("fake_tracker.py")
PORT = 5000
# ``python -m twisted`` is ``twist`` (other options, no ``-n``); twistd has no ``__main__``.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# --- addresses -------------------------------------------------------------------------

def allocate_prefix(hosts, port: int = PORT) -> str:
    """A random ``127.R1.R2`` prefix where ``127.R1.R2.H:port`` is free for every H in ``hosts``."""
    rng = random.SystemRandom()
    for _ in range(100):
        prefix = f"127.{rng.randint(1, 254)}.{rng.randint(0, 254)}"
        if all(_bindable(f"{prefix}.{host}", port) for host in hosts):
            return prefix
    raise RuntimeError("no free 127.x.y prefix found")


def _bindable(ip: str, port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# --- waiting -----------------------------------------------------------------------------

async def poll_until(check, *, timeout: float, what: str, interval: float = 0.05):
    """Call ``await check()`` until it returns something true; that value.

    An exception from ``check`` counts as "not yet" (the member may not be up),
    except an AssertionError, which is raised at once; past ``timeout`` seconds
    an AssertionError names ``what`` and the last error.
    """
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    last_error = None
    while True:
        try:
            result = await check()
            if result:
                return result
        except AssertionError:
            raise  # a check that fails an assertion fails at once
        except Exception as e:  # noqa: BLE001 - any other failure means "not yet"
            last_error = e
        if reactor.seconds() >= deadline:
            why = f"; last error: {last_error!r}" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{why}")
        await task.deferLater(reactor, interval, lambda: None)


# --- processes ---------------------------------------------------------------------------

def _die_with_parent():  # pragma: no cover - runs in the child
    """Linux: the member gets SIGKILL if the test process dies, so none is left behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Member:
    """One member running as its own process."""

    def __init__(self, name: str, address: wire.Address, data_dir: Path, argv: list[str], log_path: Path,
                 cwd: Path | None = None):
        """``argv`` runs in ``cwd`` (default ``data_dir``); its stdout and stderr go to ``data_dir/stdio.log``."""
        self.name = name
        self.address = address
        self.data_dir = data_dir
        self.log_path = log_path
        self.stdio_path = data_dir / "stdio.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.pop("PYTHONSTARTUP", None)
        with open(self.stdio_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=cwd or data_dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    @property
    def ip(self) -> str:
        return self.address.host

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running:
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        await poll_until(lambda: defer.succeed(not self.running), timeout=timeout,
                         what=f"{self.name} to exit", interval=0.02)
        return self.proc.returncode

    async def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout`` seconds; the exit code."""
        self.kill(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except AssertionError:
            self.kill(signal.SIGKILL)
            return await self.wait_exit(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return tail_files({path.name: path for path in (self.stdio_path, self.log_path)}, lines)


# Switches that are on by default: False is given as ``--no-NAME``.
_DEFAULT_ON = {"tls", "accept_v1", "speak_v2"}


def _options(extra_options: dict) -> list[str]:
    argv = []
    for name, value in extra_options.items():
        option = "--" + name.replace("_", "-")
        if value is True:
            argv.append(option)
        elif value is False and name in _DEFAULT_ON:
            argv.append("--no-" + name.replace("_", "-"))
        elif value is not False and value is not None:
            argv += [option, str(value)]
    return argv


class ProcessesMixin:
    """For a ``twisted.trial.unittest.TestCase``: members as processes, stopped at cleanup."""

    hosts: tuple = ()       # the host parts of every address the test uses (``self.ip(host)``)
    admin_host: int = 200   # the one ``self.admin`` sends from
    # Members run with this ``tls`` unless a test gives its own, and ``self.admin``
    # speaks it (TLS without pinning). Off by default: the tests of /1 behaviour
    # write raw HTTP and run plain-HTTP stand-ins; tests/test_tls_processes.py is TLS's.
    tls: bool = False

    def setUp(self):
        """``use_addresses``, then ``start_members`` (an ``async def`` of the test case)."""
        self.use_addresses(self.hosts, self.admin_host)
        return defer.ensureDeferred(self.start_members())

    async def start_members(self) -> None:
        """The test case's members and peers, once they all answer."""

    def use_addresses(self, hosts, admin_host: int) -> None:
        """A free ``127.R1.R2`` prefix for ``hosts`` at PORT: ``self.ip(host)`` is ``127.R1.R2.host``.

        ``self.admin`` is the test's own outbound (identity, directories,
        metrics), bound to ``self.ip(admin_host)``; registered before any
        member starts, it closes after they all stopped (cleanups run
        last-registered first).
        """
        prefix = allocate_prefix(hosts, PORT)
        self.ip = lambda host: f"{prefix}.{host}"
        self.admin = HTTPOutbound(_reactor(), bind_ip=self.ip(admin_host), timeout=5, tls=self.tls)
        self.addCleanup(self.admin.close)

    def _started(self, member: Member) -> Member:
        members = getattr(self, "_members", None)
        if members is None:
            members = self._members = []
            self.addCleanup(self._stop_members)
        members.append(member)
        return member

    def _stop_members(self):
        """Stop every member at once and wait for all of them."""
        return defer.gatherResults(
            [defer.ensureDeferred(m.stop()) for m in self._members], consumeErrors=True)

    def _start_twistd(self, role: str, plugin: str, ip: str, port: int, data_dir, *args: str,
                      name: str | None = None, options: dict, launcher: list[str] | None = None) -> Member:
        """``twistd -n PLUGIN`` on ``ip:port``, run in ``data_dir``, its state in ``data_dir/state``.

        Its log is ``data_dir/ROLE.log``; ``args`` and ``options`` follow on its command line.
        ``launcher`` replaces ``TWISTD`` (a test double that patches, then runs twistd).
        """
        data_dir = Path(data_dir).resolve()  # the member runs in data_dir: no relative paths
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / f"{role}.log"
        argv = [*(launcher or TWISTD), "-n", "--pidfile=", f"--logfile={log_path}",
                plugin, "--listen", ip, "--port", str(port), "--data-dir", str(data_dir / "state"),
                *args, *_options({"tls": self.tls, **options})]
        return self._started(Member(name or f"{role} {ip}", wire.Address(ip, port), data_dir, argv, log_path))

    def start_node(self, ip: str, port: int, tracker, tracker_key: str, data_dir, *,
                   launcher: list[str] | None = None, **extra_options) -> Member:
        """``twistd -n onionnode`` on ``ip:port``; its log is ``data_dir/node.log``."""
        return self._start_twistd("node", "onionnode", ip, port, data_dir,
                                  "--tracker", str(tracker), "--tracker-key", tracker_key, options=extra_options,
                                  launcher=launcher)

    def start_nodes(self, hosts, base, *, per_node: dict | None = None, **options) -> list[Member]:
        """``start_node`` at ``self.ip(host)`` for each of ``hosts``, the i-th with data in ``base/node{i}``.

        Each registers with ``self.tracker`` (key ``self.tracker_key``); every
        node gets ``options``, the i-th also ``per_node[i]``.
        """
        return [self.start_node(self.ip(host), PORT, self.tracker.address, self.tracker_key, Path(base) / f"node{i}",
                                **{**options, **(per_node or {}).get(i, {})})
                for i, host in enumerate(hosts)]

    def start_fake_tracker(self, ip: str, port: int, data_dir, **extra_options) -> Member:
        """The stand-in tracker (``fake_tracker.py``); its log is ``data_dir/tracker.log``."""
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(FAKE_TRACKER), "--listen", ip, "--port", str(port),
                "--data-dir", str(data_dir), *_options(extra_options)]
        return self._started(Member(f"tracker {ip}", wire.Address(ip, port), data_dir, argv,
                                    data_dir / "tracker.log"))

    def start_tracker(self, ip: str, port: int, data_dir, **extra_options) -> Member:
        """The real tracker, ``twistd -n oniontracker`` on ``ip:port``.

        Its log is ``data_dir/tracker.log``, its key in ``data_dir/state``.
        """
        return self._start_twistd("tracker", "oniontracker", ip, port, data_dir, options=extra_options)

    def start_peer(self, name: str, ip: str, port: int, tracker, tracker_key: str, data_dir, *,
                   launcher: list[str] | None = None, **extra_options) -> Member:
        """``twistd -n onionpeer`` on ``ip:port``, sharing ``data_dir/share``, downloading to ``data_dir/downloads``.

        Its log is ``data_dir/peer.log``; started again with the same
        ``data_dir``, it finds the same data, share and downloads.
        """
        data_dir = Path(data_dir).resolve()
        return self._start_twistd("peer", "onionpeer", ip, port, data_dir,
                                  "--tracker", str(tracker), "--tracker-key", tracker_key,
                                  "--share", str(data_dir / "share"), "--downloads", str(data_dir / "downloads"),
                                  name=f"peer {name}", options=extra_options, launcher=launcher)

    async def wait_identity(self, member: Member, outbound, timeout: float = 30.0) -> dict:
        """Poll ``GET /identity`` until the member answers it; the identity object."""
        async def check():
            if not member.running:
                raise self.failureException(f"{member.name} exited with {member.proc.returncode}")
            status, _, body = await outbound.get(member.address, "/identity")
            return wire.loads_object(body) if status == 200 else None

        try:
            return await poll_until(check, timeout=timeout, what=f"{member.name} /identity", interval=0.05)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{member.tail()}") from None

    def kill(self, member: Member, sig: int = signal.SIGKILL) -> None:
        member.kill(sig)

    # The two below ask with ``self.admin`` and check against ``self.tracker_key``
    # (set by the test case once its tracker answered /identity).

    async def directory(self, member: Member):
        """``member``'s signed directory (``GET /nodes``), checked with the tracker's key."""
        status, headers, body = await self.admin.get(member.address, "/nodes")
        if status != 200:  # 503 while a node has no directory yet: polled again
            raise errors.Unavailable(f"{member.name} answered {status} for /nodes")
        signature = (headers.getRawHeaders(SIGNATURE_HEADER) or [None])[0]
        return parse_signed_directory(body, signature, crypto.load_tracker_public_b64(self.tracker_key), PORT)

    async def wait_listed(self, nodes: list[Member], timeout: float = 20.0):
        """Until every node answers /identity and ``self.tracker`` lists them all; its directory.

        Each node checks extend targets against its own copy, so this also
        waits until every node's copy lists all of them.
        """
        for node in nodes:  # started together, so waited for one after the other
            await self.wait_identity(node, self.admin)
        addresses = {n.address for n in nodes}

        async def listed(member):
            directory = await self.directory(member)
            return directory if addresses <= set(directory.nodes) else None

        try:
            directory = await poll_until(lambda: listed(self.tracker), timeout=timeout,
                                         what=f"the tracker to list the {len(nodes)} nodes")
            for node in nodes:
                await poll_until(functools.partial(listed, node), timeout=timeout, what=f"{node.name}'s directory")
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tracker.tail()}") from None
        return directory


# --- files -----------------------------------------------------------------------------------

def tail_files(paths: dict, lines: int = 30) -> str:
    """The last ``lines`` lines of each file in ``{label: path}`` that exists, each under ``--- label``."""
    parts = []
    for label, path in paths.items():
        try:
            text = Path(path).read_text("utf-8", errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            continue
        parts.append(f"--- {label}\n" + "\n".join(text))
    return "\n".join(parts)


def sha256_file(path) -> str:
    """The hex SHA-256 of a file, computed here rather than by the package under test."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            digest.update(data)
    return digest.hexdigest()


# --- a peer's user API ---------------------------------------------------------------------

class PeerApiMixin:
    """For a TestCase with ``self.admin``: a peer's user API, asked from the admin address.

    The request names the peer's own address in ``Host``, as its page wants.
    """

    async def api_status(self, address: wire.Address, name: str) -> dict:
        """``GET /api/status`` of the peer at ``address``, which must answer 200."""
        status, _, body = await self.admin.get(address, "/api/status")
        self.assertEqual(status, 200, f"{name} answered {status} for /api/status: {body[:200]!r}")
        return wire.loads_object(body)

    async def api_download(self, address: wire.Address, name: str, file: str, sha256: str) -> dict:
        """``POST /api/downloads`` of ``file`` (``sha256``) to the peer at ``address``, which must answer 202."""
        code, body = await post_status(self.admin, address, wire.dumps({"file": file, "sha256": sha256}),
                                       path="/api/downloads")
        self.assertEqual(code, 202, f"{name} answered {code}: {body[:300]!r}")
        return wire.loads_object(body)


# --- HTTP with the status ------------------------------------------------------------------

ERRORS_BY_STATUS = {cls.status: cls for cls in (
    errors.BadRequest, errors.Forbidden, errors.UnknownCircuit, errors.Conflict, errors.TooLarge,
    errors.RateLimited, errors.NextHopFailed, errors.NextHopTimeout, errors.Unavailable)}


async def post_status(outbound, address: wire.Address, body: bytes, headers: dict | None = None,
                      path: str = "/", timeout: float | None = None) -> tuple[int, bytes]:
    """POST through ``outbound``'s bound connection pool; (status, body) whatever the status."""
    h = Headers({b"Content-Type": [b"application/json"]})
    for name, value in (headers or {}).items():
        h.setRawHeaders(name, [value])
    url = outbound.url(address, path) if hasattr(outbound, "url") else address.url(path)
    d = outbound.http.request("POST", url, data=BytesProducer(body), headers=h, unbuffered=True)
    d.addTimeout(timeout or outbound.timeout, outbound.reactor)
    response = await d
    content = response.content()
    content.addTimeout(timeout or outbound.timeout, outbound.reactor)
    return response.code, await content


@implementer(IOutbound)
class StatusOutbound:
    """``post`` like HTTPOutbound, but a non-200 answer raises the errors class of its status.

    The exception's ``answered`` is the status the member answered (absent
    when no answer came: refused connection, the peer's own timeout).
    """

    def __init__(self, outbound):
        self.outbound = outbound

    def post(self, address: wire.Address, body: bytes, headers: dict | None = None, path: str = "/"):
        async def go():
            status, data = await post_status(self.outbound, address, body, headers, path)
            if status != 200:
                try:
                    detail = wire.loads_object(data).get("detail", "")
                except errors.ProtocolError:
                    detail = data[:200].decode("utf-8", "replace")
                cls = ERRORS_BY_STATUS.get(status, errors.ProtocolError)
                error = cls(f"answered {status}: {detail}")
                error.answered = status
                raise error
            return data
        return defer.ensureDeferred(go())

    def get(self, address, path):
        return self.outbound.get(address, path)

    def close(self):
        return self.outbound.close()


# --- raw HTTP ------------------------------------------------------------------------------

class _Collect(protocol.Protocol):
    def __init__(self, data: bytes):
        self.data = data
        self.received = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.received))


async def raw_exchange(bind_ip: str, address: wire.Address, data: bytes, timeout: float = 10.0) -> bytes:
    """Write ``data`` on a fresh connection from ``bind_ip``; everything read until the member closes."""
    reactor = _reactor()
    endpoint = TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout, bindAddress=(bind_ip, 0))
    collector = _Collect(data)
    await endpoint.connect(protocol.Factory.forProtocol(lambda: collector))
    timer = reactor.callLater(timeout, lambda: collector.transport.abortConnection())
    try:
        return await collector.done
    finally:
        if timer.active():
            timer.cancel()


def response_status(raw: bytes) -> int:
    """The status code of a raw HTTP/1.1 response."""
    line = raw.split(b"\r\n", 1)[0].split()
    if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
        raise AssertionError(f"not an HTTP response: {raw[:100]!r}")
    return int(line[1])
