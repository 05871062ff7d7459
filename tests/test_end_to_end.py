"""The whole network end to end, started by the demo's own code (issue 5).

``onion_twisted.ops.localnet.LocalNetwork`` (what ``./scripts/demo`` runs)
starts the real tracker, six nodes, alice and bob as ``twistd`` processes on
a random ``127.R1.R2.x`` base of their own (tracker .10, nodes .11 to .16,
alice .21, bob .22, all at port 5000), with small files: bob's 8 MiB random
binary and alice's own 8 MiB one besides the text samples. Alice downloads
bob's binary while bob downloads alice's, each asked for through its peer's
user API from .200; both copies are checked by SHA-256.

"At once" is shown, not assumed: the sharers keep one chunk in flight (a
window of 1) and the transfers are end to end (§13), so each file is 32
chunks of 256 KiB, each a round trip through both circuits; the test polls alice's
and bob's downloads one after the other until both are done. Download
progress only grows and "done" is final, so a download seen under way (some
bytes, not all) at two polls was under way at every poll between them; the
test requires a poll of one download under way between two polls of the
other under way: a moment when both were.

Then the network is stopped gracefully (SIGTERM, so every log is flushed)
and the logs are searched, as Tor's SafeLogging promises:

* the tracker's log, its page and its ``/metrics`` (fetched while it ran)
  never name alice's or bob's IP: the tracker only ever talks to exits;
* no node's log names a peer's IP or a shared file's name (the
  ``unsafe_logging`` debug switch, off here, is what may say more).

Each search is first shown able to find what it looks for: the peers' IPs
are in the peers' own logs and the file names on the tracker's page, so an
empty result means "not there", not "searched the wrong text".

Nothing waits by sleeping: ``LocalNetwork.start``/``stop`` block, so they run
in a thread; everything else polls on the reactor clock with a deadline.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial import unittest

from onion_twisted.protocol import wire
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.ops.localnet import SAMPLES, LocalNetwork
from tests.support.deferreds import current_reactor as _reactor, inline
from tests.support.processes import PORT, PeerApiMixin, allocate_prefix, poll_until, sha256_file, tail_files

TRACKER_HOST, FIRST_NODE_HOST, ALICE_HOST, BOB_HOST, ADMIN_HOST = 10, 11, 21, 22, 200
NODES = 6
ALL_HOSTS = (TRACKER_HOST, *range(FIRST_NODE_HOST, FIRST_NODE_HOST + NODES), ALICE_HOST, BOB_HOST, ADMIN_HOST)
BIG_MIB = 8                      # bob's binary; the demo's default is 50
BOB_NAME = f"big-{BIG_MIB}MiB.bin"
ALICE_NAME = "alice holiday.bin"  # a space in it too
ALICE_SIZE = 8 << 20
CHUNK = 262144                   # the smallest end-to-end chunk (§13): 32 per file
WINDOW = 1                       # one chunk in flight: a round trip per chunk, so the two overlap
START_TIMEOUT = 45               # seconds for the whole network to come up
TRANSFER_DEADLINE = 40           # seconds for both downloads


def mentions(text: str, needle: str) -> bool:
    """Whether ``text`` holds ``needle`` as a whole word: an IP not inside a longer one
    (``127.1.2.21`` is not in ``127.1.2.210``), a name not inside a longer name."""
    return re.search(r"(?<![\w.])" + re.escape(needle) + r"(?!\w)", text) is not None


class EndToEndTests(PeerApiMixin, unittest.TestCase):
    timeout = 120  # trial's per-test limit; the test's own deadlines are shorter

    def setUp(self):
        self.prefix = allocate_prefix(ALL_HOSTS, PORT)
        self.run_dir = Path(self.mktemp()).resolve()
        self.net = LocalNetwork(self.run_dir, base=self.ip(TRACKER_HOST), port=PORT, nodes=NODES,
                                big_mib=BIG_MIB, key_bits=1024, extra={"peer": {"chunk_size": CHUNK, "window": WINDOW}})
        self.assertEqual((self.net.peer_ips["alice"], self.net.peer_ips["bob"]),
                         (self.ip(ALICE_HOST), self.ip(BOB_HOST)), "LocalNetwork's address layout changed")
        self.admin = HTTPOutbound(_reactor(), bind_ip=self.ip(ADMIN_HOST), timeout=10, tls=self.net.tls)
        self.addCleanup(self.admin.close)
        self.addCleanup(self._remove_copies)
        self.addCleanup(self._stop)  # runs first: members stop before anything else goes
        self.stopped = False

        # Alice's own file, in her share before she starts: her first ls announces it.
        share = self.run_dir / "alice" / "share"
        share.mkdir(parents=True)
        self.alice_file = share / ALICE_NAME
        self.alice_file.write_bytes(os.urandom(ALICE_SIZE))

    def ip(self, host: int) -> str:
        return f"{self.prefix}.{host}"

    def _stop(self):
        if self.stopped:
            return None
        self.stopped = True
        return threads.deferToThread(self.net.stop)

    def _remove_copies(self):
        """The binaries go; logs and state stay in the temp dir for a look."""
        for peer in ("alice", "bob"):
            for sub in ("share", "downloads"):
                shutil.rmtree(self.run_dir / peer / sub, ignore_errors=True)

    # --- helpers -------------------------------------------------------------------------

    def member(self, name: str):
        return next(m for m in self.net.members if m.name == name)

    def tails(self, *names: str, lines: int = 25) -> str:
        return tail_files({f"{name}/{file}": self.run_dir / name / file
                           for name in names for file in (f"{name}.log", "stderr.log")}, lines)

    def peer_address(self, name: str) -> wire.Address:
        return wire.Address(self.net.peer_ips[name], PORT)

    async def status(self, name: str) -> dict:
        return await self.api_status(self.peer_address(name), name)

    async def fetch(self, ip: str, path: str) -> bytes:
        status, _, body = await self.admin.get(wire.Address(ip, PORT), path)
        self.assertEqual(status, 200, f"{ip} answered {status} for {path}")
        return body

    async def ask(self, name: str, file: str, sha: str) -> dict:
        return await self.api_download(self.peer_address(name), name, file, sha)

    async def wait_listed(self, name: str, file: str, sha: str, size: int) -> None:
        """Until ``name``'s catalogue lists ``file`` with its size and hash (the other peer announced it)."""
        async def listed():
            if self.member(name).process.poll() is not None:
                raise AssertionError(f"{name} exited\n{self.tails(name)}")
            catalogue = (await self.status(name))["catalogue"]
            return any(f.get("name") == file and f.get("sha256") == sha and f.get("size") == size
                       for f in catalogue)
        try:
            await poll_until(listed, timeout=20, what=f"{file!r} in {name}'s catalogue", interval=0.1)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails('alice', 'bob', 'tracker')}") from None

    async def watch_both(self, wants: dict) -> tuple[dict, list]:
        """Poll each peer's download (``wants``: peer -> file), one after the other, until all
        are done; the final statuses by peer, and every poll as (peer, bytes, size, state) in
        the order taken."""
        polls, final = [], {}

        async def all_done():
            for name, file in wants.items():
                if self.member(name).process.poll() is not None:
                    raise AssertionError(f"{name} exited\n{self.tails(name)}")
                found = [d for d in (await self.status(name))["downloads"] if d["file"] == file]
                if found and found[0]["state"] == "failed":
                    raise AssertionError(f"{name}'s download of {file!r} failed: {found[0]['error']}\n"
                                         f"{self.tails('alice', 'bob')}")
                d = found[0] if found else {"bytes": 0, "size": None, "state": None}
                polls.append((name, d["bytes"], d["size"], d["state"]))
                if d["state"] == "done":
                    final[name] = d
            return len(final) == len(wants)
        try:
            await poll_until(all_done, timeout=TRANSFER_DEADLINE, what="both downloads", interval=0.01)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails('alice', 'bob')}") from None
        return final, polls

    def log_text(self, name: str) -> str:
        path = self.run_dir / name / f"{name}.log"
        self.assertTrue(path.is_file(), f"no log at {path}")
        text = path.read_text("utf-8", errors="replace")
        self.assertTrue(text.strip(), f"{path} is empty: the search below would prove nothing")
        return text

    def assertNotMentioned(self, text: str, needles, where: str):
        found = sorted(n for n in needles if mentions(text, n))
        if found:
            lines = [line for line in text.splitlines() if any(mentions(line, n) for n in found)][:5]
            self.fail(f"{where} names {found}:\n" + "\n".join(lines))

    # --- the test ------------------------------------------------------------------------

    @inline
    async def test_both_ways_at_once_and_logs_are_safe(self):
        reactor = _reactor()
        started = reactor.seconds()
        try:
            await threads.deferToThread(self.net.start, START_TIMEOUT)
        except RuntimeError as e:
            raise self.failureException(f"the network did not start: {e}\n"
                                        f"{self.tails('tracker', 'node1', 'alice', 'bob')}") from None
        up = reactor.seconds() - started
        bob_file = self.run_dir / "bob" / "share" / BOB_NAME
        self.assertEqual(bob_file.stat().st_size, BIG_MIB << 20)
        alice_sha, bob_sha = sha256_file(self.alice_file), sha256_file(bob_file)

        # Each sees the other's file, then both downloads are asked for at once.
        await defer.gatherResults([
            defer.ensureDeferred(self.wait_listed("alice", BOB_NAME, bob_sha, BIG_MIB << 20)),
            defer.ensureDeferred(self.wait_listed("bob", ALICE_NAME, alice_sha, ALICE_SIZE)),
        ], consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        asked = reactor.seconds()
        a, b = await defer.gatherResults([
            defer.ensureDeferred(self.ask("alice", BOB_NAME, bob_sha)),
            defer.ensureDeferred(self.ask("bob", ALICE_NAME, alice_sha)),
        ], consumeErrors=True).addErrback(lambda f: f.value.subFailure)
        self.assertEqual((a["file"], b["file"]), (BOB_NAME, ALICE_NAME))
        final, polls = await self.watch_both({"alice": BOB_NAME, "bob": ALICE_NAME})
        done_a, done_b = final["alice"], final["bob"]
        transfer = reactor.seconds() - asked

        # Both under way at one moment: a poll of one download under way lies between two
        # polls of the other under way (see the module docstring).
        under_way = {name: [i for i, (who, got, size, state) in enumerate(polls)
                            if who == name and size and 0 < got < size and state != "done"]
                     for name in ("alice", "bob")}
        spans = {name: (seen[0], seen[-1]) for name, seen in under_way.items() if seen}
        self.assertEqual(sorted(spans), ["alice", "bob"], f"a download was never seen under way: {polls}")
        both = max(spans["alice"][0], spans["bob"][0]), min(spans["alice"][1], spans["bob"][1])
        self.assertLessEqual(both[0], both[1], f"the downloads never overlapped: {polls}")
        overlap = sum(1 for i in range(both[0], both[1] + 1) if i in under_way[polls[i][0]])  # for the log

        self.assertEqual((done_a["size"], done_a["sha256"], done_a["unverified"]), (BIG_MIB << 20, bob_sha, False))
        self.assertEqual((done_b["size"], done_b["sha256"], done_b["unverified"]), (ALICE_SIZE, alice_sha, False))
        got_a = self.run_dir / "alice" / "downloads" / done_a["path"]
        got_b = self.run_dir / "bob" / "downloads" / done_b["path"]
        self.assertEqual(sha256_file(got_a), bob_sha, "alice's copy of bob's file differs")
        self.assertEqual(sha256_file(got_b), alice_sha, "bob's copy of alice's file differs")

        # The tracker's public faces, while it runs.
        page = (await self.fetch(self.net.tracker_ip, "/")).decode("utf-8", "replace")
        metrics = (await self.fetch(self.net.tracker_ip, "/metrics")).decode("utf-8", "replace")

        # A graceful stop: every member flushes its log.
        self.stopped = True
        await threads.deferToThread(self.net.stop)
        print(f"\nnetwork up in {up:.1f} s; both downloads ({BIG_MIB} MiB and {ALICE_SIZE >> 20} MiB, "
              f"{CHUNK >> 10} KiB chunks) in {transfer:.1f} s, both under way in {overlap} of {len(polls)} polls",
              file=sys.stderr)

        peer_ips = [self.net.peer_ips["alice"], self.net.peer_ips["bob"]]
        names = sorted({BOB_NAME, ALICE_NAME, *(n for files in SAMPLES.values() for n in files)})
        # The searches can find what they look for: in the peers' own logs, their own IPs
        # (each logs its page's address); on the tracker's page, the shared names.
        self.assertTrue(mentions(self.log_text("alice"), peer_ips[0]), "alice's log does not name her IP")
        self.assertTrue(mentions(self.log_text("bob"), peer_ips[1]), "bob's log does not name his IP")
        for name in (BOB_NAME, ALICE_NAME):
            self.assertTrue(mentions(page, name), f"the tracker's page does not list {name!r}")
        self.assertTrue(any(mentions(page, ip) for ip in self.net.node_ips), "the tracker's page lists no node")

        tracker_log = self.log_text("tracker")
        self.assertNotMentioned(tracker_log, peer_ips, "the tracker's log")
        self.assertNotMentioned(page, peer_ips, "the tracker's page")
        self.assertNotMentioned(metrics, peer_ips, "the tracker's /metrics")
        for i in range(1, NODES + 1):
            node_log = self.log_text(f"node{i}")
            self.assertNotMentioned(node_log, peer_ips, f"node{i}'s log")
            self.assertNotMentioned(node_log, names, f"node{i}'s log")


class MentionsTests(unittest.TestCase):
    """The search the log checks rely on finds whole IPs and names, and only those."""

    def test_whole_words_only(self):
        self.assertTrue(mentions("created circuit from 127.1.2.21", "127.1.2.21"))
        self.assertTrue(mentions("to 127.1.2.21:5000.", "127.1.2.21"))
        self.assertTrue(mentions('{"file": "poem.txt"}', "poem.txt"))
        self.assertTrue(mentions(".partial/poem.txt.part", "poem.txt"))
        self.assertFalse(mentions("127.1.2.210:5000", "127.1.2.21"))
        self.assertFalse(mentions("127.1.2.2", "127.1.2.21"))
        self.assertFalse(mentions("mypoem.txt", "poem.txt"))
