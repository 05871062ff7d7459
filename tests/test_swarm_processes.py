"""Swarming (issue 16) between real processes: one download from several sharers at once.

Every test gets its own ``127.R1.R2.x`` network (``E2ENetwork`` of
``tests/support/e2e_network.py``, ``tls = false``): the real tracker at .1,
five nodes at .11 to .15, and four peers: alice (.101), who downloads in
256 KiB chunks (one piece each, §13) with a 30 s ``stall_timeout``, and the
sharers bob (.102), carol (.103) and dave (.104), each capped at
``max_upload_rate`` 1 MiB/s (four chunks a second), so that a 24 MiB file
(96 chunks) takes seconds even from three of them. Every peer refreshes its
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
  row pre-written). His transfer shows ``mismatched`` and ``excluded`` and
  brought nothing; bob and carol bring every chunk, in one attempt; dave
  was asked once only (his log).
* ``test_a_slow_sharers_last_chunks_come_from_the_faster_ones``: bob is
  capped at 64 KiB/s (a chunk every four seconds), carol and dave at 1 MiB/s.
  Bob's first block is 16 chunks, which would take him a minute; the
  download completes verified in one attempt with bob having brought fewer
  than 16 chunks: once carol and dave ran out of unclaimed chunks, they
  were asked for copies of his (the endgame), and each chunk counted once.
* ``test_a_sharer_killed_mid_download_leaves_its_chunks_to_the_others``:
  carol, capped at 128 KiB/s (a chunk every two seconds: her transfers last), is
  SIGKILLed while one of her uploads waits for her cap (so in the middle of
  a transfer to alice, after she brought chunks). The download
  completes from bob and dave in the same attempt, its bytes never going
  back, well before alice's ``stall_timeout`` after the kill.

A failure message (and the log line each test writes) shows alice's
download over time (chunks, transfers under way, attempt), when each
sharer was asked for which transfer, and the tracker's request outcomes.

Nothing waits by sleeping: every wait polls with a deadline, a bound for
the poll and not a promise of speed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys

from twisted.trial import unittest

from onion_twisted.protocol.chunks import MIN_BLOCK_CHUNKS
from tests.support.deferreds import current_reactor, inline
from tests.support.e2e_network import LYING_SHARER, PIECE, E2ENetwork, file_root, log_matches
from tests.support.processes import Member, PeerApiMixin, ProcessesMixin, poll_until

PEERS = {"alice": 101, "bob": 102, "carol": 103, "dave": 104}
SHARERS = ("bob", "carol", "dave")
CAP = 1 << 20           # each sharer's max_upload_rate: four 256 KiB chunks a second
SLOW_CAP = 128 << 10    # the killed sharer's: a chunk every two seconds, so that it is caught mid-transfer
SLOWEST_CAP = 64 << 10  # the slow sharer's: a chunk every four seconds, his first block a minute
SIZE = 24 << 20         # 96 chunks: blocks of 16 (MIN_BLOCK_CHUNKS) for all three
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
    peer_hosts = PEERS


class _SwarmCase(SwarmNetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    timeout = 180

    # --- starting -------------------------------------------------------------------------

    def start_sharer(self, name: str, file: str, content: bytes, cap: int = CAP) -> Member:
        """An honest sharer of ``content`` as ``file``, capped at ``cap``, whose every upload is logged."""
        self.share_bytes(name, file, content)
        return self.start_test_peer(name, launcher=[sys.executable, str(LYING_SHARER), "--"], max_upload_rate=cap)

    def start_alice(self) -> Member:
        return self.start_test_peer("alice", chunk_size=PIECE, stall_timeout=STALL_TIMEOUT)

    async def start_download(self, slow: str | None = None, slow_cap: int = CAP):
        """The three sharers of a new file (``slow`` capped at ``slow_cap``, the others at
        CAP) and alice, who asks for it once it is listed: (file, content, sha, watch)."""
        file, content, sha = random_file()
        for name in SHARERS:
            self.start_sharer(name, file, content, slow_cap if name == slow else CAP)
        self.start_alice()
        await self.wait_ready(file, content, sha)
        await self.ask("alice", file, sha)
        return file, content, sha, SwarmWatch(self, file)

    async def wait_ready(self, file: str, content: bytes, sha: str) -> dict:
        """Until every sharer is capped and alice's catalogue row of ``file`` lists the three."""
        for name in SHARERS:
            status = await poll_until(lambda name=name: self.status(name), timeout=30, what=f"{name}'s status")
            self.assertEqual(status["upload_rate"]["cap"], self.peer_options[name]["max_upload_rate"],
                             f"{name} is not capped: {status['upload_rate']}")

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

    def served_times(self) -> str:
        """When each sharer was asked to serve which transfer (its log's timestamps)."""
        return "; ".join(f"{name}: " + ", ".join(f"{t[:8]} at {when[11:19]}" for when, t in log_matches(
            self.peers[name], r"^(\S+) .*lying sharer: serving transfer (\S+)")) for name in SHARERS)

    async def tracker_requests(self) -> str:
        """The tracker's request outcomes and refusals (its /metrics), those that are not 0."""
        status, _, body = await self.admin.get(self.tracker.address, "/metrics")
        lines = [line for line in body.decode("utf-8", "replace").splitlines()
                 if line.startswith(("onion_tracker_requests_total", "onion_tracker_refused_total"))
                 and not line.endswith(" 0")]
        return ", ".join(lines) if status == 200 else f"/metrics answered {status}"

    async def finished(self, watch, since: float) -> tuple[dict, float, str]:
        """The download once done, the seconds from ``since`` to then, and what went on (for messages)."""
        done = await watch.done()
        return done, current_reactor().seconds() - since, await self.diagnosis(watch)

    async def diagnosis(self, watch: "SwarmWatch") -> str:
        """Alice's download over time, the sharers' uploads and the tracker's answers: for the messages."""
        return (f"\nalice's download: {watch.timeline()}\nuploads: {self.served_times()}"
                f"\ntracker: {await self.tracker_requests()}")

    def summary(self, done: dict) -> str:
        """Per sharer: its transfers at alice and the chunks they brought (one line for the log)."""
        owner = {t: name for name in SHARERS for t in self.served(name)}
        parts = []
        for name in (*SHARERS, None):
            rows = [s for s in done["sources"] if owner.get(s["transfer"]) == name]
            if rows:
                parts.append(f"{name or 'unknown'}: {len(rows)} transfers, {sum(s['chunks'] for s in rows)} chunks"
                             + (f", {sum(s['mismatched'] for s in rows)} mismatched" if name == "dave" else ""))
        return "; ".join(parts)

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
    the errors shown, and its timeline (``timeline``).
    """

    def __init__(self, case: _SwarmCase, file: str):
        self.case, self.file = case, file
        self.most_transfers = 0
        self.lowest: int | None = None
        self.errors: list[str] = []
        self.last: dict | None = None
        # (seconds since the watch began, state, chunks, transfers, attempt) each time one changes
        self.history: list[tuple] = []
        self.began = current_reactor().seconds()

    def mark(self) -> None:
        self.lowest = None

    async def poll(self) -> dict:
        d = await self.case.download("alice", self.file)
        if d is None:
            raise AssertionError(f"alice lost her download of {self.file!r}")
        self.last = d
        seen = (d["state"], d["bytes"] // PIECE, d["transfers"], d["attempts"])
        if not self.history or self.history[-1][1:] != seen:
            self.history.append((round(current_reactor().seconds() - self.began, 2), *seen))
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

    def timeline(self) -> str:
        return "; ".join(f"{at:g} s: {state} {chunks} chunks, {transfers} transfers, attempt {attempts}"
                         for at, state, chunks, transfers, attempts in self.history)


class ThreeSharersTests(_SwarmCase):
    @inline
    async def test_three_capped_sharers_serve_one_download(self):
        file, content, sha, watch = await self.start_download()
        done, took, why = await self.finished(watch, watch.began)
        log(f"done in {took:.1f} s, {done['attempts']} attempt(s), at most {watch.most_transfers} transfers "
            f"at once; {self.summary(done)}{why}")

        self.assertDone(done, file, content, sha)
        self.assertEqual(done["attempts"], 1, f"errors seen: {watch.errors}{why}")
        self.assertGreater(watch.most_transfers, 1, f"never more than one transfer under way at once{why}")
        self.assertGreaterEqual(len([s for s in done["sources"] if s["chunks"] > 0]), len(SHARERS), done["sources"])
        by_sharer = self.sources_by_sharer(done)
        for name, rows in by_sharer.items():
            self.assertGreater(sum(r["chunks"] for r in rows), 0, f"{name} brought no chunk: {by_sharer}{why}")
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
        done, _, why = await self.finished(watch, current_reactor().seconds())
        log(f"done in {done['attempts']} attempt(s), at most {watch.most_transfers} transfers at once; "
            f"errors {watch.errors}; {self.summary(done)}{why}")

        self.assertDone(done, file, content, sha)
        by_sharer = self.sources_by_sharer(done)
        # Each transfer of dave's was cut at its first chunk: mismatched, excluded, nothing taken.
        self.assertTrue(by_sharer["dave"], f"dave was never asked: the test saw no lie{why}")
        for liar in by_sharer["dave"]:
            self.assertGreaterEqual(liar["mismatched"], 1, liar)
            self.assertEqual((liar["excluded"], liar["chunks"], liar["refused"], liar["e2e"]), (True, 0, 0, True),
                             liar)
        # Bob and carol brought every chunk, and were never held against.
        for name in ("bob", "carol"):
            rows = by_sharer[name]
            self.assertGreater(sum(r["chunks"] for r in rows), 0, f"{name} brought no chunk: {by_sharer}{why}")
            self.assertTrue(all((r["mismatched"], r["refused"], r["excluded"]) == (0, 0, False) for r in rows),
                            rows)
        # Dave was asked once: one upload in his log (each of his transfers is listed at alice).
        self.assertEqual(len(self.served("dave")), 1,
                         f"dave was asked {len(self.served('dave'))} times; his transfers at alice: "
                         f"{by_sharer['dave']}{why}")
        self.assertEqual(done["attempts"], 1, f"errors seen: {watch.errors}{why}")


class SlowSharerTests(_SwarmCase):
    SLOW = "bob"

    @inline
    async def test_a_slow_sharers_last_chunks_come_from_the_faster_ones(self):
        file, content, sha, watch = await self.start_download(self.SLOW, SLOWEST_CAP)
        done, took, why = await self.finished(watch, watch.began)
        log(f"done in {took:.1f} s, {done['attempts']} attempt(s); {self.summary(done)}{why}")

        self.assertDone(done, file, content, sha)
        self.assertEqual(done["attempts"], 1, f"errors seen: {watch.errors}{why}")
        by_sharer = self.sources_by_sharer(done)
        slow = sum(r["chunks"] for r in by_sharer[self.SLOW])
        # Every first block is MIN_BLOCK_CHUNKS (16) of the 96: bob, at a chunk every four
        # seconds, brought less than his, so the others brought some of it (endgame copies).
        self.assertLess(slow, MIN_BLOCK_CHUNKS, f"the download waited for {self.SLOW}'s whole block: "
                                                f"{by_sharer}{why}")
        for name in SHARERS:
            if name != self.SLOW:
                self.assertGreater(sum(r["chunks"] for r in by_sharer[name]), 0, f"{name} brought no chunk")


class KilledSharerTests(_SwarmCase):
    VICTIM = "carol"

    @inline
    async def test_a_sharer_killed_mid_download_leaves_its_chunks_to_the_others(self):
        file, content, sha, watch = await self.start_download(self.VICTIM, SLOW_CAP)
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

        done, after, why = await self.finished(watch, killed_at)
        log(f"done {after:.1f} s after the kill, {done['attempts']} attempt(s); errors {watch.errors}; "
            f"{self.summary(done)}{why}")

        self.assertDone(done, file, content, sha)
        self.assertEqual(done["attempts"], 1,
                         f"the download started a new attempt; errors seen: {watch.errors}{why}")
        self.assertGreaterEqual(watch.lowest, before["bytes"], f"the download went back after the kill{why}")
        self.assertLess(after, STALL_TIMEOUT, f"the download waited for the killed sharer's transfer to stall{why}")
        by_sharer = self.sources_by_sharer(done)
        self.assertGreater(sum(r["chunks"] for r in by_sharer[self.VICTIM]), 0, by_sharer)
        others = [name for name in SHARERS if name != self.VICTIM]
        self.assertEqual(sum(r["chunks"] for name in others for r in by_sharer[name]),
                         CHUNKS - sum(r["chunks"] for r in by_sharer[self.VICTIM]), by_sharer)
        for name in others:
            self.assertGreater(sum(r["chunks"] for r in by_sharer[name]), 0, f"{name} brought no chunk: {by_sharer}")
