"""A peer written from PROTOCOL.md alone, on Python's ``http.server`` as it
comes (HTTP/1.0: it closes the connection after every answer), exchanges a
16 MiB file with a project peer through project nodes and the project
tracker (issue 12). It speaks onion-http/1 only, in plain HTTP (``tls``
off in this network); the nodes and the project peer speak /2 beside it
(§10: the project peer's circuit is /2 with the tracker sealed, checked).

Every test gets its own network of real processes on a random
``127.R1.R2.x`` prefix: the tracker (``twistd oniontracker``) at .1, five
nodes at .11 to .15 with their default hop timeout and pool, a project peer
(``twistd onionpeer``) at .101 with its default upload window (8), and
``tests/support/http10_peer.py`` at .102, a process of its own that imports
nothing of the package and reports through a JSON status file.

* ``test_http10_peer_downloads_from_a_project_peer``: the http.server peer
  asks for 64 chunks of 256 KiB. Every chunk reaches it as a backward POST
  from its entry node, each on a connection the peer closes after its
  answer, eight at a time. It has no stall timer and never asks twice, so
  the transfer must go through in one go.
* ``test_project_peer_downloads_from_an_http10_peer``: the other way round;
  the http.server peer streams with a window of 8.
* ``test_project_peer_recovers_when_the_sharer_stops``: the http.server
  sharer's first upload stops silently after 10 chunks (as a sharer whose
  bridge went away does); the project requester notices within its stall
  timeout, asks for what it lacks in the same attempt (its transfer had
  brought chunks), and the sharer sends only that.

Nothing waits by sleeping: every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from twisted.trial import unittest

from onion_twisted.protocol import wire
from tests.support.deferreds import current_reactor as _reactor, inline
from tests.support.processes import PORT, Member, PeerApiMixin, ProcessesMixin, poll_until, sha256_file, tail_files

HTTP10_PEER = Path(__file__).resolve().parent / "support" / "http10_peer.py"
TRACKER_HOST, NODE_HOSTS, PROJECT_HOST, HTTP10_HOST, ADMIN_HOST = 1, (11, 12, 13, 14, 15), 101, 102, 200
NAME = "interop file.bin"
SIZE = 16 * 1024 * 1024
CHUNK = 256 * 1024               # 64 chunks
READY_DEADLINE = 30              # circuits built and the file listed
TRANSFER_DEADLINE = 90           # 16 MiB; a healthy run takes a few seconds
STALL_TIMEOUT = 3                # the project requester's, in the recovery test
STOP_AFTER = 10


def log(text: str) -> None:
    print(f"\n{text}", file=sys.stderr, end="")


class _Interop(ProcessesMixin, PeerApiMixin, unittest.TestCase):
    timeout = 180
    hosts, admin_host = (TRACKER_HOST, *NODE_HOSTS, PROJECT_HOST, HTTP10_HOST, ADMIN_HOST), ADMIN_HOST

    async def start_members(self):
        self.base = Path(self.mktemp()).resolve()
        self.addCleanup(self._remove_file_copies)  # runs once the members have stopped
        self.tracker = self.start_tracker(self.ip(TRACKER_HOST), PORT, self.base / "tracker", heartbeat=1)
        self.tracker_key = (await self.wait_identity(self.tracker, self.admin))["public_key"]
        # Nodes keep their defaults (hop timeout 30 s, pool) but for a small key and a short period.
        self.nodes = self.start_nodes(NODE_HOSTS, self.base, key_bits=1024, register_interval=1)
        await self.wait_listed(self.nodes)

    def _remove_file_copies(self):
        for path in self.base.rglob("*interop file.bin*"):  # logs and status files stay for a look
            if path.is_file():
                path.unlink()

    # --- members ----------------------------------------------------------------------

    def write_file(self, who: str) -> tuple[Path, str]:
        share = self.base / who / "share"
        share.mkdir(parents=True, exist_ok=True)
        path = share / NAME
        with open(path, "wb") as f:
            for _ in range(SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        return path, sha256_file(path)

    def start_project_peer(self, **options) -> Member:
        """The project peer at .101 with its default window; files under ``base/project``."""
        options = {"rescan_interval": 1, "refresh_interval": 1, **options}
        self.project = self.start_peer("project", self.ip(PROJECT_HOST), PORT, self.tracker.address,
                                       self.tracker_key, self.base / "project", **options)
        return self.project

    def start_http10_peer(self, *args: str) -> Member:
        """``http10_peer.py`` at .102, its status in ``base/http10/status.json``."""
        data_dir = (self.base / "http10").resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.http10_status = data_dir / "status.json"
        ip = self.ip(HTTP10_HOST)
        argv = [sys.executable, str(HTTP10_PEER), "--ip", ip, "--port", str(PORT),
                "--tracker", str(self.tracker.address), "--tracker-key", self.tracker_key,
                "--status", str(self.http10_status), *args]
        self.http10 = self._started(Member("http.server peer", wire.Address(ip, PORT), data_dir, argv,
                                           data_dir / "stdio.log"))
        return self.http10

    # --- observing ----------------------------------------------------------------------

    def tails(self) -> str:
        paths = {"project/peer.log": self.base / "project" / "peer.log",
                 "http10/stdio.log": self.base / "http10" / "stdio.log"}
        for i, _ in enumerate(NODE_HOSTS):
            paths[f"node{i}/node.log"] = self.base / f"node{i}" / "node.log"
        return tail_files(paths, 12)

    async def http10_state(self) -> dict:
        if not self.http10.running:
            raise AssertionError(f"the http.server peer exited with {self.http10.proc.returncode}\n"
                                 f"{self.http10.tail()}")
        status = json.loads(self.http10_status.read_text("utf-8"))  # not there yet: polled again
        if status["state"] == "failed":
            raise AssertionError(f"the http.server peer failed: {status.get('error')}\n{self.tails()}")
        return status

    async def wait_http10(self, check, *, timeout: float, what: str) -> dict:
        """Until ``check(status)`` holds for the http.server peer's status; a clear failure past ``timeout``."""
        last = {}

        async def poll():
            last["status"] = status = await self.http10_state()
            return status if check(status) else None

        try:
            return await poll_until(poll, timeout=timeout, what=what, interval=0.1)
        except AssertionError as e:
            raise self.failureException(f"{e}; its last status: {last.get('status')}\n{self.tails()}") from None

    async def project_status(self) -> dict:
        if not self.project.running:
            raise AssertionError(f"the project peer exited with {self.project.proc.returncode}\n"
                                 f"{self.project.tail()}")
        return await self.api_status(self.project.address, self.project.name)

    async def project_lists(self, sha: str) -> bool:
        """The project peer's circuit is connected and its catalogue lists the file with ``sha``."""
        status = await self.project_status()
        return status["circuit"]["state"] == "connected" and any(
            f.get("name") == NAME and f.get("sha256") == sha and f.get("size") == SIZE for f in status["catalogue"])

    async def project_download(self) -> dict | None:
        found = [d for d in (await self.project_status())["downloads"] if d["file"] == NAME]
        if found and found[0]["state"] == "failed":
            raise AssertionError(f"the project peer's download failed: {found[0]['error']}\n{self.tails()}")
        return found[0] if found else None

    async def wait_project_done(self) -> dict:
        last = {}

        async def done():
            last["download"] = d = await self.project_download()
            return d if d is not None and d["state"] == "done" else None

        try:
            return await poll_until(done, timeout=TRANSFER_DEADLINE, what="the project peer's download",
                                    interval=0.1)
        except AssertionError as e:
            raise self.failureException(f"{e}; its last status: {last.get('download')}; the http.server peer's: "
                                        f"{self.http10_status.read_text('utf-8', errors='replace')}\n"
                                        f"{self.tails()}") from None

    async def assertMixed(self):
        """The mixed network of §10: every node speaks /2 (and /1), the project peer's
        circuit is /2 with the tracker sealed, the http.server peer's is /1 by construction."""
        for node in self.nodes:
            identity = await self.wait_identity(node, self.admin)
            self.assertEqual(identity["protocols"], ["onion-http/1", "onion-http/2"], node.name)
        circuit = (await self.project_status())["circuit"]
        self.assertEqual((circuit["protocol"], circuit["sealed"]), ("onion-http/2", True))

    def assertOnlyFile(self, downloads: Path, sha: str):
        """``downloads`` holds exactly the file, whole and with ``sha``, and nothing partial."""
        visible = sorted(p.name for p in downloads.iterdir() if not p.name.startswith("."))
        self.assertEqual(visible, [NAME])
        self.assertEqual((downloads / NAME).stat().st_size, SIZE)
        self.assertEqual(sha256_file(downloads / NAME), sha)
        partial = [p.name for p in downloads.rglob("*.part")]
        self.assertEqual(partial, [], "partial files left")


class Http10InteropTests(_Interop):

    @inline
    async def test_http10_peer_downloads_from_a_project_peer(self):
        _, sha = self.write_file("project")
        self.start_project_peer()  # default window (8): the sharer's normal pace
        await poll_until(lambda: self.project_lists(sha), timeout=READY_DEADLINE,
                         what="the project peer connected and sharing")
        out = self.base / "http10" / "downloads"
        self.start_http10_peer("--download", NAME, "--sha256", sha, "--out", str(out),
                               "--chunk-size", str(CHUNK))
        await self.wait_http10(lambda s: s["state"] in ("requesting", "receiving", "done"),
                               timeout=READY_DEADLINE, what="the http.server peer to ask for the file")
        started = _reactor().seconds()
        done = await self.wait_http10(lambda s: s["state"] == "done", timeout=TRANSFER_DEADLINE,
                                      what="the http.server peer to hold the whole file")
        elapsed = _reactor().seconds() - started

        self.assertEqual((done["download"]["chunks"], done["download"]["count"], done["download"]["size"]),
                         (SIZE // CHUNK, SIZE // CHUNK, SIZE))
        self.assertEqual(done["download"]["ended"]["status"], "ok")
        self.assertEqual(done["sha256"], sha)
        self.assertOnlyFile(out, sha)
        await self.assertMixed()
        log(f"16 MiB to the http.server peer in {elapsed:.2f} s ({SIZE / elapsed / 2**20:.1f} MiB/s)")

    async def project_peer_downloads(self, http10_args=(), **peer_options):
        """The http.server peer shares the file, the project peer downloads it through
        its API: (the download's final status, seconds it took, the file's sha256)."""
        _, sha = self.write_file("http10")
        self.start_http10_peer("--share", str(self.base / "http10" / "share"), *http10_args)
        self.start_project_peer(chunk_size=CHUNK, **peer_options)
        await poll_until(lambda: self.project_lists(sha), timeout=READY_DEADLINE,
                         what="the http.server peer's file in the project peer's catalogue")
        started = _reactor().seconds()
        await self.api_download(self.project.address, self.project.name, NAME, sha)
        done = await self.wait_project_done()
        return done, _reactor().seconds() - started, sha

    @inline
    async def test_project_peer_downloads_from_an_http10_peer(self):
        done, elapsed, sha = await self.project_peer_downloads()

        self.assertEqual((done["bytes"], done["size"], done["sha256"], done["path"]), (SIZE, SIZE, sha, NAME))
        self.assertFalse(done["unverified"])
        self.assertEqual(done["attempts"], 1)
        self.assertOnlyFile(self.base / "project" / "downloads", sha)
        await self.assertMixed()
        uploads = (await self.http10_state())["uploads"]
        self.assertEqual((uploads["started"], uploads["finished"], uploads["stopped"], uploads["chunks_sent"]),
                         (1, 1, 0, SIZE // CHUNK), uploads["errors"])
        log(f"16 MiB from the http.server peer in {elapsed:.2f} s ({SIZE / elapsed / 2**20:.1f} MiB/s)")

    @inline
    async def test_project_peer_recovers_when_the_sharer_stops(self):
        done, elapsed, sha = await self.project_peer_downloads(("--stop-after", str(STOP_AFTER)),
                                                               stall_timeout=STALL_TIMEOUT)

        self.assertEqual((done["bytes"], done["sha256"], done["path"]), (SIZE, sha, NAME))
        self.assertEqual(done["attempts"], 1, "the stalled transfer's attempt did not go on")
        self.assertGreaterEqual(elapsed, STALL_TIMEOUT, "finished before the stall timer could fire")
        self.assertOnlyFile(self.base / "project" / "downloads", sha)
        uploads = (await self.http10_state())["uploads"]
        # The second request asked only for the missing chunks: 64 sent in all, not 74.
        self.assertEqual((uploads["started"], uploads["stopped"], uploads["finished"], uploads["chunks_sent"]),
                         (2, 1, 1, SIZE // CHUNK), uploads["errors"])
        log(f"the sharer stopped after {STOP_AFTER} chunks; the requester asked again and finished "
            f"in {elapsed:.2f} s")

