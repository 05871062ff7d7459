"""A network of real processes for the fault tests (issue 7), and what they observe.

``FaultNetwork`` (for a trial TestCase, with ``ProcessesMixin`` and
``PeerApiMixin``) starts, on the test's own random ``127.R1.R2`` prefix, the
real tracker (``twistd oniontracker``, .1), ``node_count`` nodes (.11 …)
and peers by name (``PEER_HOSTS``: alice .101, bob .102, carol .103), every
one with short timers (``HOP_TIMEOUT``, a one-second heartbeat, rescan and
refresh) so that faults are noticed in seconds. A peer's files are under
``base/NAME`` (``share``, ``downloads``, ``state``); starting it again with
the same name reuses them. ``start_lying_peer`` starts the test double of
``lying_peer.py`` instead.

What a test observes, all from outside the package's own word where it can:

* a peer's circuit (``circuit``: the node addresses of ``GET /api/status``,
  entry first), its downloads and its catalogue;
* ``forward_bytes``: payload bytes the given nodes peeled forward (their
  ``/metrics``), a bound on the file bytes a sharer sent (see
  ``sent_bound``);
* ``DownloadWatch``: a download polled until it is done, remembering the
  smallest byte count seen after a fault (a download that started over
  would fall back to 0).

Every wait polls with a deadline (``poll_until``); nothing sleeps.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from onion_twisted.protocol import onion2, wire
from tests.support.deferreds import current_reactor as _reactor
from tests.support.processes import PORT, Member, poll_until, sha256_file, tail_files

LYING_PEER = Path(__file__).resolve().with_name("lying_peer.py")
TRACKER_HOST, FIRST_NODE_HOST, ADMIN_HOST = 1, 11, 200
PEER_HOSTS = {"alice": 101, "bob": 102, "carol": 103}
HOP_TIMEOUT = 5
STALL_TIMEOUT = 5          # the requester asks again after 5 to 10 s without a chunk
PEER_OPTIONS = dict(hop_timeout=HOP_TIMEOUT, rescan_interval=1, refresh_interval=1, stall_timeout=STALL_TIMEOUT)
FORWARD_BYTES = re.compile(rb'^onion_node_bytes_total\{direction="forward"\} (\d+)$', re.M)
TRACKER_MESSAGES = re.compile(rb'^onion_tracker_messages_total\{type="(\w+)"\} (\d+)$', re.M)
TRACKER_CHECKS = re.compile(rb'^onion_tracker_checks_total\{source="(\w+)"\} (\d+)$', re.M)


def all_hosts(node_count: int, peer_hosts: dict = PEER_HOSTS) -> tuple:
    return (TRACKER_HOST, *range(FIRST_NODE_HOST, FIRST_NODE_HOST + node_count), *peer_hosts.values(), ADMIN_HOST)


class FaultNetwork:
    """Mixed into a TestCase after ``ProcessesMixin`` and ``PeerApiMixin``."""

    node_count = 6
    admin_host = ADMIN_HOST
    peer_hosts = PEER_HOSTS  # peer name -> its host number

    @property
    def hosts(self):
        return all_hosts(self.node_count, self.peer_hosts)

    # --- starting ----------------------------------------------------------------------

    async def start_members(self):
        self.base = Path(self.mktemp()).resolve()
        self.addCleanup(self._remove_file_copies)  # runs after the members stopped
        self.peers: dict[str, Member] = {}
        self.peer_options: dict[str, dict] = {}
        self.tracker = self.start_test_tracker()
        identity = await self.wait_identity(self.tracker, self.admin)
        self.tracker_key = identity["public_key"]
        self.nodes = self.start_test_nodes()
        await self.wait_listed(self.nodes)  # a peer needs every node in its first directory

    def start_test_nodes(self) -> list[Member]:
        """``node_count`` nodes from ``FIRST_NODE_HOST`` on, their state in ``base/nodeN``."""
        return self.start_nodes(range(FIRST_NODE_HOST, FIRST_NODE_HOST + self.node_count), self.base,
                                key_bits=1024, hop_timeout=HOP_TIMEOUT, register_interval=1)

    def start_test_tracker(self) -> Member:
        """The tracker, with its key and state in ``base/tracker`` (the same again after a restart)."""
        return self.start_tracker(self.ip(TRACKER_HOST), PORT, self.base / "tracker", heartbeat=1,
                                  hop_timeout=HOP_TIMEOUT)

    def _remove_file_copies(self):
        """The big files go; logs, records and state stay in the temp dir for a look."""
        for pattern in ("*/share/*", "*/downloads/*", "*/downloads/.partial/*.part"):
            for path in self.base.glob(pattern):
                if path.is_file():
                    path.unlink()

    def write_share(self, peer: str, name: str, size: int) -> tuple[Path, str]:
        """``size`` random bytes as ``base/peer/share/name``; the path and its sha256."""
        share = self.base / peer / "share"
        share.mkdir(parents=True, exist_ok=True)
        path = share / name
        with open(path, "wb") as f:
            left = size
            while left:
                f.write(os.urandom(min(left, 1 << 20)))
                left -= min(left, 1 << 20)
        return path, sha256_file(path)

    def copy_into_share(self, source: Path, peer: str) -> Path:
        share = self.base / peer / "share"
        share.mkdir(parents=True, exist_ok=True)
        target = share / source.name
        tmp = share / ("." + source.name + ".tmp")  # hidden while it is written: never announced half-done
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target

    def start_test_peer(self, name: str, launcher: list[str] | None = None, **options) -> Member:
        """Peer ``name`` at its host, with ``PEER_OPTIONS`` and ``options`` (through ``launcher``, a
        test double's wrapper, when given); the options are remembered for ``restart_peer``."""
        self.peer_options[name] = options
        merged = {**PEER_OPTIONS, **options}
        member = self.start_peer(name, self.ip(self.peer_hosts[name]), PORT, self.tracker.address, self.tracker_key,
                                 self.base / name, launcher=launcher, **merged)
        self.peers[name] = member
        return member

    def start_lying_peer(self, name: str, **options) -> Member:
        """Like ``start_test_peer``, but the ``lying_peer.py`` double: every chunk it sends is wrong."""
        self.peer_options[name] = options
        data_dir = (self.base / name).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        ip = self.ip(self.peer_hosts[name])
        log_path = data_dir / "peer.log"
        argv = [sys.executable, str(LYING_PEER), "-n", "--pidfile=", f"--logfile={log_path}", "onionpeer",
                "--listen", ip, "--port", str(PORT), "--data-dir", str(data_dir / "state"),
                "--tracker", str(self.tracker.address), "--tracker-key", self.tracker_key,
                "--share", str(data_dir / "share"), "--downloads", str(data_dir / "downloads"),
                *([] if self.tls else ["--no-tls"])]
        for key, value in {**PEER_OPTIONS, **options}.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        member = self._started(Member(f"peer {name} (lying)", wire.Address(ip, PORT), data_dir, argv, log_path))
        self.peers[name] = member
        return member

    async def restart_peer(self, name: str) -> Member:
        """Stop peer ``name`` gracefully and start it again with the same options and directories."""
        await self.peers[name].stop()
        member = self.start_test_peer(name, **self.peer_options[name])
        await self.wait_connected(name)
        return member

    # --- what a peer shows ------------------------------------------------------------------

    def tails(self, *names: str, lines: int = 25) -> str:
        paths = {}
        for name in names:
            member = self.peers.get(name) or (self.tracker if name == "tracker" else None)
            if member is not None:
                paths[f"{name}/{member.log_path.name}"] = member.log_path
                paths[f"{name}/{member.stdio_path.name}"] = member.stdio_path
        return tail_files(paths, lines)

    async def status(self, name: str) -> dict:
        member = self.peers[name]
        if not member.running:
            raise AssertionError(f"{member.name} exited with {member.proc.returncode}\n{member.tail()}")
        return await self.api_status(member.address, member.name)

    async def circuit(self, name: str) -> list[str] | None:
        """The node addresses of ``name``'s connected circuit, entry first; None while it has none."""
        circuit = (await self.status(name))["circuit"]
        if circuit["state"] != "connected" or not circuit["nodes"]:
            return None
        return [n["address"] for n in circuit["nodes"]]

    async def all_circuits(self, name: str) -> set[str]:
        """The node addresses of every circuit ``name`` keeps now (announcing and downloads)."""
        rows = (await self.status(name)).get("circuits") or []
        return {n["address"] for row in rows for n in row.get("nodes") or []}

    async def wait_connected(self, name: str, timeout: float = 30) -> list[str]:
        try:
            return await poll_until(lambda: self.circuit(name), timeout=timeout, what=f"{name}'s circuit",
                                    interval=0.1)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails(name)}") from None

    async def wait_listed_file(self, name: str, file: str, sha: str, size: int, timeout: float = 30) -> dict:
        """Until ``name``'s circuit is connected and its catalogue lists ``file`` (``sha``, ``size``)."""
        async def listed():
            if await self.circuit(name) is None:
                return None
            for entry in (await self.status(name))["catalogue"]:
                if (entry.get("name"), entry.get("sha256"), entry.get("size")) == (file, sha, size):
                    return entry
            return None
        try:
            return await poll_until(listed, timeout=timeout, what=f"{file!r} in {name}'s catalogue", interval=0.1)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails(*self.peers)}") from None

    async def download(self, name: str, file: str) -> dict | None:
        found = [d for d in (await self.status(name))["downloads"] if d["file"] == file]
        self.assertLessEqual(len(found), 1)
        return found[0] if found else None

    async def ask(self, name: str, file: str, sha: str) -> dict:
        member = self.peers[name]
        return await self.api_download(member.address, member.name, file, sha)

    def node(self, address: str) -> Member:
        return next(n for n in self.nodes if str(n.address) == address)

    # --- what the nodes and the tracker count -----------------------------------------------------

    async def forward_bytes(self, nodes) -> int:
        """Forward payload bytes peeled so far by ``nodes`` (their ``/metrics``), summed."""
        total = 0
        for node in nodes:
            status, _, body = await self.admin.get(node.address, "/metrics")
            self.assertEqual(status, 200, f"{node.name} answered {status} for /metrics")
            found = FORWARD_BYTES.search(body)
            self.assertIsNotNone(found, f"no forward onion_node_bytes_total in {node.name}'s /metrics")
            total += int(found.group(1))
        return total

    @staticmethod
    def sent_bound(forward_bytes: int, chunk_size: int) -> int:
        """An upper bound of the file bytes a sharer sent while ``forward_bytes`` were peeled.

        Every chunk crosses the three hops of the sharer's circuit as a forward
        layer holding at least its padded message, ``chunk_class(chunk_size)``
        bytes (onion-http/2 pads every file_chunk of a transfer to one class,
        §14; in /1 its base64 alone is 4/3 of the chunk, and the class is
        larger than that), and each hop counts the layer it peels. Lists,
        announcements and requests only make the bound larger.
        """
        return forward_bytes * chunk_size // (3 * onion2.chunk_class(chunk_size))

    async def tracker_messages(self) -> dict:
        """The tracker's ``onion_tracker_messages_total`` by type (counted since it started)."""
        status, _, body = await self.admin.get(self.tracker.address, "/metrics")
        self.assertEqual(status, 200)
        return {kind.decode(): int(n) for kind, n in TRACKER_MESSAGES.findall(body)}

    async def tracker_checks(self) -> dict:
        """The tracker's ``onion_tracker_checks_total`` by answer (reachable, gone, unknown)."""
        status, _, body = await self.admin.get(self.tracker.address, "/metrics")
        self.assertEqual(status, 200)
        return {state.decode(): int(n) for state, n in TRACKER_CHECKS.findall(body)}

    async def tracker_gauge(self, name: str) -> int:
        """One unlabelled gauge of the tracker's ``/metrics`` (``onion_tracker_catalogue_entries`` …)."""
        status, _, body = await self.admin.get(self.tracker.address, "/metrics")
        self.assertEqual(status, 200)
        found = re.search(rb"^" + re.escape(name.encode()) + rb" (\d+)$", body, re.M)
        self.assertIsNotNone(found, f"no {name} in the tracker's /metrics")
        return int(found.group(1))

    # --- downloads ---------------------------------------------------------------------------------

    async def wait_bytes(self, name: str, file: str, at_least: int, timeout: float = 60) -> dict:
        """Until ``name``'s download of ``file`` holds ``at_least`` bytes (and is not done); its status."""
        async def enough():
            d = await self.download(name, file)
            if d is not None and d["state"] == "failed":
                raise AssertionError(f"the download failed: {d['error']}\n{self.tails(*self.peers)}")
            return d if d is not None and d["bytes"] >= at_least else None
        return await poll_until(enough, timeout=timeout, what=f"{at_least} bytes of {file!r} at {name}",
                                interval=0.02)

    def assertOnlyFile(self, name: str, file: str, sha: str):
        """``name``'s downloads hold exactly ``file``, with ``sha``, and nothing partial."""
        downloads = self.base / name / "downloads"
        self.assertEqual(sorted(p.name for p in downloads.iterdir() if p.name != ".partial"), [file])
        self.assertEqual(sha256_file(downloads / file), sha, f"{name}'s copy of {file!r} differs")
        partial = downloads / ".partial"
        left = sorted(p.name for p in partial.iterdir()) if partial.exists() else []
        self.assertEqual(left, [], f"files left in {name}'s .partial")


class DownloadWatch:
    """Polls one download until it is done, keeping the smallest byte count it saw.

    ``lowest`` is the least ``bytes`` shown since the watch started: a
    download that resumed never shows fewer bytes than it held when the fault
    struck; one that started over would show 0 (its chunk map is dropped).
    """

    def __init__(self, case: FaultNetwork, name: str, file: str):
        self.case, self.name, self.file = case, name, file
        self.lowest: int | None = None
        self.states: list[str] = []
        self.errors: list[str] = []

    async def done(self, timeout: float) -> dict:
        case = self.case

        async def check():
            d = await case.download(self.name, self.file)
            if d is None:
                raise AssertionError(f"{self.name} lost its download of {self.file!r}")
            self.lowest = d["bytes"] if self.lowest is None else min(self.lowest, d["bytes"])
            if not self.states or self.states[-1] != d["state"]:
                self.states.append(d["state"])
            if d["error"] and (not self.errors or self.errors[-1] != d["error"]):
                self.errors.append(d["error"])
            if d["state"] == "failed":
                raise AssertionError(f"the download failed: {d['error']}")
            return d if d["state"] == "done" else None

        started = _reactor().seconds()
        try:
            return await poll_until(check, timeout=timeout, what=f"{self.name}'s download of {self.file!r}",
                                    interval=0.1)
        except AssertionError as e:
            try:
                last = await case.download(self.name, self.file)
            except Exception as why:  # noqa: BLE001 - only for the message
                last = repr(why)
            raise case.failureException(
                f"{e} (after {_reactor().seconds() - started:.1f} s); states {self.states}; errors {self.errors}; "
                f"last {last}\n{case.tails(*case.peers, 'tracker')}") from None
