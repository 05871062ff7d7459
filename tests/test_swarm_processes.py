"""Swarming (issue 16) between real processes: one download from several sharers at once.

Every test gets its own ``127.R1.R2.x`` network (``E2ENetwork`` of
``tests/support/e2e_network.py``, ``tls = false``): the real tracker at .1,
five nodes at .11 to .15, and four peers: alice (.101), who downloads in
256 KiB chunks (one piece each, §13) with a 30 s ``stall_timeout``, and the
sharers bob (.102), carol (.103) and dave (.104), each capped at
``max_upload_rate`` 1 MiB/s (four chunks a second), so that a 6 MiB file
(24 chunks) takes seconds even from three of them. Every peer refreshes its
catalogue every second; alice is asked to download only once her catalogue
row lists the three sources (she asks several at once only then).

The sharers run with the launcher of ``tests/support/lying_sharer.py``,
which logs every request a sharer is asked to serve (``lying sharer:
serving transfer T``); an honest sharer's share is simply not prepared to
lie. So each transfer alice lists under ``sources`` is matched to the
sharer that served it, from the sharer's own log.

* ``test_three_capped_sharers_serve_one_download``: alice's download shows
  more than one transfer under way at once, completes verified (sha256 by
  hashlib) in one attempt, every chunk counted once over its sources, and
  each of the three sharers brought chunks.
* ``test_a_lying_sharer_is_dropped_after_its_first_chunk``: dave's file
  differs from the root he announces in every piece (hash cache and leaf
  row pre-written). His one transfer shows ``mismatched`` and ``excluded``
  and brought nothing; bob and carol bring every chunk, in one attempt; dave
  was asked once only (his log).
* ``test_a_sharer_killed_mid_download_leaves_its_chunks_to_the_others``:
  carol is SIGKILLed while one of her uploads waits for her cap (so in the
  middle of a transfer to alice, after she brought chunks). The download
  completes from bob and dave in the same attempt, its bytes never going
  back, well before alice's ``stall_timeout`` after the kill.

Nothing waits by sleeping: every wait polls with a deadline, a bound for
the poll and not a promise of speed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

from twisted.trial import unittest

from tests.support.deferreds import current_reactor, inline
from tests.support.e2e_network import LYING_SHARER, PIECE, E2ENetwork, file_root, log_matches
from tests.support.faults import ADMIN_HOST, FIRST_NODE_HOST, PEER_OPTIONS, TRACKER_HOST
from tests.support.processes import PORT, Member, PeerApiMixin, ProcessesMixin, poll_until

PEERS = {"alice": 101, "bob": 102, "carol": 103, "dave": 104}
SHARERS = ("bob", "carol", "dave")
CAP = 1 << 20           # each sharer's max_upload_rate: four 256 KiB chunks a second
SIZE = 6 << 20          # 24 chunks
CHUNKS = SIZE // PIECE
STALL_TIMEOUT = 30      # alice's: a transfer that stalls ends only after this
DEADLINE = 90           # a bound for the polls, not a promise of speed
POLL = 0.02


def log(text: str) -> None:
    print(f"\n{text}", file=sys.stderr, end="")


def random_file() -> tuple[str, bytes, str]:
    """(a distinctive name, SIZE random bytes, their sha256)."""
    content = os.urandom(SIZE)
    return f"swarm-{os.urandom(8).hex()}.bin", content, hashlib.sha256(content).hexdigest()


class SwarmNetwork(E2ENetwork):
    """``E2ENetwork`` with a fourth peer, dave, and five nodes."""

    node_count = 5

    @property
    def hosts(self):
        return (TRACKER_HOST, *range(FIRST_NODE_HOST, FIRST_NODE_HOST + self.node_count), *PEERS.values(),
                ADMIN_HOST)

    def start_test_peer(self, name: str, **options) -> Member:
        self.peer_options[name] = options
        member = self.start_peer(name, self.ip(PEERS[name]), PORT, self.tracker.address, self.tracker_key,
                                 self.base / name, **{**PEER_OPTIONS, **options})
        self.peers[name] = member
        return member

    def _start_double_peer(self, name: str, launcher: list[str], options: dict) -> Member:
        self.peer_options[name] = options
        member = self.start_peer(name, self.ip(PEERS[name]), PORT, self.tracker.address, self.tracker_key,
                                 self.base / name, launcher=launcher, **{**PEER_OPTIONS, **options})
        self.peers[name] = member
        return member


class _SwarmCase(SwarmNetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    timeout = 180

    # --- starting -------------------------------------------------------------------------

    def start_sharer(self, name: str, file: str, content: bytes) -> Member:
        """An honest sharer of ``content`` as ``file``, capped, whose every upload is logged."""
        self.share_bytes(name, file, content)
        return self._start_double_peer(name, [sys.executable, str(LYING_SHARER), "--"],
                                       {"max_upload_rate": CAP})

    def start_alice(self) -> Member:
        return self.start_test_peer("alice", chunk_size=PIECE, stall_timeout=STALL_TIMEOUT)

    async def wait_ready(self, file: str, content: bytes, sha: str) -> dict:
        """Until every sharer is capped and alice's catalogue row of ``file`` lists the three."""
        for name in SHARERS:
            status = await poll_until(lambda name=name: self.status(name), timeout=30, what=f"{name}'s status")
            self.assertEqual(status["upload_rate"]["cap"], CAP, f"{name} is not capped: {status['upload_rate']}")

        async def listed():
            for row in (await self.status("alice"))["catalogue"]:
                if (row.get("name"), row.get("sha256"), row.get("size")) == (file, sha, len(content)) \
                        and row.get("sources") == len(SHARERS):
                    return row
            return None
        try:
            row = await poll_until(listed, timeout=60, what=f"three sources of {file!r} in alice's catalogue",
                                   interval=0.1)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails(*self.peers, 'tracker')}") from None
        self.assertEqual(row.get("root"), file_root(content), f"alice's catalogue row: {row}")
        return row

    # --- what the members show ----------------------------------------------------------------

    def served(self, name: str) -> list[str]:
        """The transfers sharer ``name`` was asked to serve, in order (its log)."""
        return [t for (t,) in log_matches(self.peers[name], r"lying sharer: serving transfer (\S+)")]

    def sources_by_sharer(self, done: dict) -> dict[str, list[dict]]:
        """Alice's source rows of ``done``, by the sharer that served each (from the sharers' logs)."""
        rows = {s["transfer"]: s for s in done["sources"]}
        self.assertEqual(len(rows), len(done["sources"]), f"a transfer listed twice: {done['sources']}")
        owner = {t: name for name in SHARERS for t in self.served(name)}
        unknown = [t for t in rows if t not in owner]
        self.assertEqual(unknown, [], f"sources no sharer served: {done['sources']}")
        by_sharer = {name: [] for name in SHARERS}
        for transfer, row in rows.items():
            by_sharer[owner[transfer]].append(row)
        return by_sharer

    def assertDone(self, done: dict, file: str, content: bytes, sha: str) -> None:
        """Done, end to end with the file's root, verified; the file on disk is the original."""
        self.assertEqual((done["state"], done["bytes"], done["size"], done["sha256"]),
                         ("done", len(content), len(content), sha), done)
        self.assertIs(done["e2e"], True, f"not an end-to-end download: {done}")
        self.assertEqual(done["root"], file_root(content))
        self.assertFalse(done["unverified"])
        self.assertOnlyFile("alice", file, sha)  # hashed here, with hashlib
        # Each chunk counted once over the sources: endgame duplicates were dropped.
        self.assertEqual(sum(s["chunks"] for s in done["sources"]), CHUNKS, done["sources"])
        self.assertEqual(sum(s["bytes"] for s in done["sources"]), SIZE, done["sources"])


class SwarmWatch:
    """Alice's download of one file, polled every POLL seconds until it is done.

    Remembers the most transfers seen under way at once, the smallest byte
    count seen since ``mark`` (a download that started over would go back),
    and the errors shown.
    """

    def __init__(self, case: _SwarmCase, file: str):
        self.case, self.file = case, file
        self.most_transfers = 0
        self.lowest: int | None = None
        self.errors: list[str] = []
        self.last: dict | None = None

    def mark(self) -> None:
        self.lowest = None

    async def poll(self) -> dict:
        d = await self.case.download("alice", self.file)
        if d is None:
            raise AssertionError(f"alice lost her download of {self.file!r}")
        self.last = d
        self.most_transfers = max(self.most_transfers, d["transfers"])
        self.lowest = d["bytes"] if self.lowest is None else min(self.lowest, d["bytes"])
        if d["error"] and (not self.errors or self.errors[-1] != d["error"]):
            self.errors.append(d["error"])
        if d["state"] == "failed":
            raise AssertionError(f"the download failed: {d['error']}")
        return d

    async def until(self, check, what: str, timeout: float = DEADLINE):
        """Poll until ``check(download)`` is true; its value."""
        case = self.case

        async def step():
            return check(await self.poll())
        try:
            return await poll_until(step, timeout=timeout, what=what, interval=POLL)
        except AssertionError as e:
            raise case.failureException(
                f"{e}; errors {self.errors}; last {self.last}\n{case.tails(*case.peers, 'tracker')}") from None

    async def done(self, timeout: float = DEADLINE) -> dict:
        return await self.until(lambda d: d if d["state"] == "done" else None,
                                f"alice's download of {self.file!r}", timeout)


class ThreeSharersTests(_SwarmCase):
    @inline
    async def test_three_capped_sharers_serve_one_download(self):
        file, content, sha = random_file()
        for name in SHARERS:
            self.start_sharer(name, file, content)
        self.start_alice()
        await self.wait_ready(file, content, sha)

        started = current_reactor().seconds()
        await self.ask("alice", file, sha)
        watch = SwarmWatch(self, file)
        done = await watch.done()
        took = current_reactor().seconds() - started
        log(f"done in {took:.1f} s, {done['attempts']} attempt(s), at most {watch.most_transfers} transfers "
            f"at once; sources {done['sources']}")

        self.assertDone(done, file, content, sha)
        self.assertEqual(done["attempts"], 1, f"errors seen: {watch.errors}")
        self.assertGreater(watch.most_transfers, 1, "never more than one transfer under way at once")
        self.assertGreaterEqual(len([s for s in done["sources"] if s["chunks"] > 0]), len(SHARERS), done["sources"])
        by_sharer = self.sources_by_sharer(done)
        for name, rows in by_sharer.items():
            self.assertGreater(sum(r["chunks"] for r in rows), 0, f"{name} brought no chunk: {by_sharer}")
        for row in done["sources"]:
            self.assertEqual((row["e2e"], row["refused"], row["mismatched"], row["excluded"]),
                             (True, 0, 0, False), row)


class LyingSharerTests(_SwarmCase):
    @inline
    async def test_a_lying_sharer_is_dropped_after_its_first_chunk(self):
        file, content, sha = random_file()
        self.start_sharer("bob", file, content)
        self.start_sharer("carol", file, content)
        # Dave announces the true name, sha256 and root, but every piece of his file is false.
        self.start_lying_sharer("dave", file, content, 0, max_upload_rate=CAP)
        self.assertEqual((self.lie["sha256"], self.lie["root"]), (sha, file_root(content)))
        self.start_alice()
        await self.wait_ready(file, content, sha)

        await self.ask("alice", file, sha)
        watch = SwarmWatch(self, file)
        done = await watch.done()
        log(f"done in {done['attempts']} attempt(s), at most {watch.most_transfers} transfers at once; "
            f"errors {watch.errors}; sources {done['sources']}")

        self.assertDone(done, file, content, sha)
        by_sharer = self.sources_by_sharer(done)
        # Dave was asked once: one upload in his log, one transfer of his at alice, which
        # brought nothing, mismatched and excluded.
        self.assertEqual(len(self.served("dave")), 1, f"dave's uploads: {self.served('dave')}")
        self.assertEqual(len(by_sharer["dave"]), 1, by_sharer)
        liar = by_sharer["dave"][0]
        self.assertGreaterEqual(liar["mismatched"], 1, liar)
        self.assertEqual((liar["excluded"], liar["chunks"], liar["refused"], liar["e2e"]), (True, 0, 0, True), liar)
        # Bob and carol brought every chunk, and were never held against.
        for name in ("bob", "carol"):
            rows = by_sharer[name]
            self.assertGreater(sum(r["chunks"] for r in rows), 0, f"{name} brought no chunk: {by_sharer}")
            self.assertTrue(all((r["mismatched"], r["refused"], r["excluded"]) == (0, 0, False) for r in rows),
                            rows)
        self.assertEqual(done["attempts"], 1, f"errors seen: {watch.errors}")
        self.assertEqual(self.peers["alice"].log_text().count("does not match the file's root"), 1,
                         "alice should have excluded exactly one source")


class KilledSharerTests(_SwarmCase):
    VICTIM = "carol"

    @inline
    async def test_a_sharer_killed_mid_download_leaves_its_chunks_to_the_others(self):
        file, content, sha = random_file()
        for name in SHARERS:
            self.start_sharer(name, file, content)
        self.start_alice()
        await self.wait_ready(file, content, sha)

        await self.ask("alice", file, sha)
        watch = SwarmWatch(self, file)
        victim = self.peers[self.VICTIM]

        # Carol in the middle of a transfer to alice: she brought chunks, and an upload of
        # hers waits for her cap.
        async def mid_transfer():
            d = await watch.poll()
            if d["state"] == "done":
                raise AssertionError(f"the download ended before {self.VICTIM} could be killed: {d}")
            hers = set(self.served(self.VICTIM))
            brought = sum(s["chunks"] for s in d["sources"] if s["transfer"] in hers)
            if not brought:
                return None
            rate = (await self.status(self.VICTIM))["upload_rate"]
            return d if rate["waiting"] >= 1 else None
        try:
            before = await poll_until(mid_transfer, timeout=DEADLINE, what=f"{self.VICTIM} mid-transfer",
                                      interval=POLL)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails(*self.peers, 'tracker')}") from None
        victim.kill(signal.SIGKILL)
        killed_at = current_reactor().seconds()
        await victim.wait_exit(10)
        watch.mark()
        log(f"{self.VICTIM} killed at {before['bytes']} of {SIZE} bytes, {before['transfers']} transfers under way")

        done = await watch.done()
        after = current_reactor().seconds() - killed_at
        log(f"done {after:.1f} s after the kill, {done['attempts']} attempt(s); errors {watch.errors}; "
            f"sources {done['sources']}")

        self.assertDone(done, file, content, sha)
        self.assertEqual(done["attempts"], 1, f"the download started a new attempt; errors seen: {watch.errors}")
        self.assertGreaterEqual(watch.lowest, before["bytes"], "the download went back after the kill")
        self.assertLess(after, STALL_TIMEOUT, "the download waited for the killed sharer's transfer to stall")
        by_sharer = self.sources_by_sharer(done)
        self.assertGreater(sum(r["chunks"] for r in by_sharer[self.VICTIM]), 0, by_sharer)
        others = [name for name in SHARERS if name != self.VICTIM]
        self.assertEqual(sum(r["chunks"] for name in others for r in by_sharer[name]),
                         CHUNKS - sum(r["chunks"] for r in by_sharer[self.VICTIM]), by_sharer)
        for name in others:
            self.assertGreater(sum(r["chunks"] for r in by_sharer[name]), 0, f"{name} brought no chunk: {by_sharer}")
