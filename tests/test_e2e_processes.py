"""End-to-end transfers (PROTOCOL.md §13) between real processes: what exits see, and exits and sharers that lie.

Every test gets its own ``127.R1.R2.x`` network (``tests/support/e2e_network.py``):
the real tracker at .1, three nodes at .11 to .13, peers alice (.101, who
downloads in 256 KiB chunks: one piece each), bob (.102) and carol (.103),
all with ``tls = false`` so that a link carries exactly what the protocol
shows, and short timers (hop timeout 5 s, one-second rescan and refresh,
stall timeout 5 s). With three nodes and three hops, every circuit crosses
every node; only which node is the exit differs. Files are random bytes
under a random name, 2 or 3 MiB (8 or 12 chunks).

* ``ObservedExitsTests``: every node runs with ``--capture``
  (``tampering_node.py``, ``wire_capture.py``): every byte of every TCP
  connection of every node, both ways, as sent and received. During bob's
  file's transfer to alice, the exit links (node ↔ tracker, and the bridge:
  node ↔ node connections carrying ``file_chunk`` objects) hold neither the
  file's name (raw or base64) nor any 48-byte slice of its content, raw or
  base64 at any alignment; nor does anything else a node sent or received.
  That the capture did see the transfer is checked too: the bridge carried
  the transfer's id, its ``transfer_start`` and at least one ``file_chunk``
  per chunk, at least the file's size in base64; the tracker link carried
  the ``make_bridge`` control; and the detector finds a planted slice.
* ``FlippingExitTests``, ``ForgingExitTests``: every node runs as a
  ``TamperingRelay`` (``tampering_node.py --flip 3`` / ``--forge 3``): as
  the sharer's exit it flips bytes in the ciphertext of the first three
  sealed chunks it bridges, or sends a forged chunk of its own before each
  of them. Alice's download still completes with the right sha256; her
  ``/api/status`` counts one refused chunk per tampering, on the transfer
  it happened in; bob is never counted against (nothing mismatched,
  nothing excluded); she rebuilds her circuit after a transfer with refused
  chunks; and she never wrote a bad chunk: alice runs as
  ``recording_peer.py``, which records every ``os.pwrite``, and every write
  to her partial file is the original's bytes at that offset, one per chunk.
* ``LyingSharerTests``: carol (``lying_sharer.py``) announces bob's file's
  name, size, sha256 and root, with its hash cache and leaf row pre-written,
  while her file's bytes differ from piece 3 on. She is alone at first: alice
  takes her first chunks (true, so verified), the first false one ends the
  transfer and her source shows ``mismatched`` and ``excluded``. Then bob
  shares the true file; the download completes from him, and carol was asked
  once only (her log shows one upload; alice's sources one transfer of hers).

Nothing waits by sleeping: every wait polls with a deadline, a bound for
the poll and not a promise of speed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from collections import Counter

from twisted.trial import unittest

from tests.support.deferreds import inline
from tests.support.e2e_network import PIECE, E2ENetwork, file_root, log_matches
from tests.support.faults import DownloadWatch
from tests.support.processes import PeerApiMixin, ProcessesMixin, poll_until
from tests.support.wire_capture import SENT, Leaks, read_streams, text_leaks

CHUNK = PIECE
TRANSFER_DEADLINE = 60  # a bound for the poll, not a promise of speed
TAMPERED = 3            # chunks each tampering node alters or forges
FILE_CHUNK = b'"file_chunk"'


def log(text: str) -> None:
    print(f"\n{text}", file=sys.stderr, end="")


def random_file(kind: str, size: int) -> tuple[str, bytes, str]:
    """(a distinctive name, ``size`` random bytes, their sha256)."""
    content = os.urandom(size)
    return f"e2e-{kind}-{os.urandom(8).hex()}.bin", content, hashlib.sha256(content).hexdigest()


def chunk_count(size: int) -> int:
    return -(-size // CHUNK)


class _E2ECase(E2ENetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    timeout = 120

    async def share_and_list(self, sharer: str, name: str, content: bytes, sha: str) -> dict:
        """``sharer`` shares ``content`` as ``name``; until alice's catalogue lists it with its root."""
        self.share_bytes(sharer, name, content)
        return await self.wait_listed_root("alice", name, content, sha)

    async def wait_listed_root(self, peer: str, name: str, content: bytes, sha: str) -> dict:
        entry = await self.wait_listed_file(peer, name, sha, len(content))
        self.assertEqual(entry.get("root"), file_root(content), f"{peer}'s catalogue row: {entry}")
        return entry

    async def download_done(self, peer: str, name: str) -> dict:
        watch = DownloadWatch(self, peer, name)
        done = await watch.done(TRANSFER_DEADLINE)
        log(f"{name}: done in {done['attempts']} attempts; errors seen {watch.errors}; sources {done['sources']}")
        return done

    def assertEndToEnd(self, done: dict, content: bytes, sha: str) -> dict:
        """The download is done, end to end, with the file's root; its sources by transfer id."""
        self.assertEqual((done["state"], done["bytes"], done["size"], done["sha256"]),
                         ("done", len(content), len(content), sha))
        self.assertIs(done["e2e"], True, f"not an end-to-end transfer: {done}")
        self.assertEqual(done["root"], file_root(content))
        self.assertFalse(done["unverified"])
        sources = {s["transfer"]: s for s in done["sources"]}
        self.assertEqual(len(sources), len(done["sources"]), "a transfer listed twice")
        self.assertTrue(all(s["e2e"] for s in sources.values()), f"a source that was not end to end: {sources}")
        # Each chunk taken once: none written twice, none of a refused or lying source kept.
        self.assertEqual(sum(s["chunks"] for s in sources.values()), chunk_count(len(content)), sources)
        return sources

    def assertWroteOnlyTrueChunks(self, peer: str, content: bytes) -> None:
        """Every ``os.pwrite`` to ``peer``'s partial file was the original's bytes, one per chunk."""
        writes = self.check_writes(peer, content)
        offsets = sorted(w["offset"] for w in writes)
        self.assertEqual(offsets, [i * CHUNK for i in range(chunk_count(len(content)))],
                         f"{peer} did not write each chunk exactly once")


# --- what the exits see -------------------------------------------------------------------------

class ObservedExitsTests(_E2ECase):
    SIZE = 3 << 20

    def node_double(self, index, data_dir):
        return ["--capture", str(data_dir / "capture.bin")]

    def streams(self) -> dict:
        """Each node's captured streams, by node IP."""
        return {node.ip: read_streams(node.data_dir / "capture.bin") for node in self.nodes}

    @inline
    async def test_the_exits_see_neither_the_name_nor_the_bytes_of_a_file(self):
        name, content, sha = random_file("capture", self.SIZE)
        # One circuit each (max_circuits = 1): the transfer crosses the circuits the status shows
        # as "circuit", so their exits are the bridge's two ends.
        self.start_test_peer("bob", max_circuits=1)
        self.start_test_peer("alice", chunk_size=CHUNK, max_circuits=1)
        await self.share_and_list("bob", name, content, sha)
        await self.ask("alice", name, sha)
        done = await self.download_done("alice", name)
        # The exits of the transfer's two circuits, as the peers show them (entry first).
        sharer_exit, requester_exit = [(await self.circuit(peer))[-1].split(":")[0] for peer in ("bob", "alice")]
        self.assertOnlyFile("alice", name, sha)
        sources = self.assertEndToEnd(done, content, sha)
        transfers = [t for t, s in sources.items() if s["chunks"]]

        node_ips = {node.ip for node in self.nodes}
        tracker_ip = self.tracker.ip
        everything, tracker_links, bridges = [], [], []
        for streams in self.streams().values():
            for stream in streams:
                everything.append(stream)
                if stream.remote[0] == tracker_ip:
                    tracker_links.append(stream)
                elif stream.remote[0] in node_ips and FILE_CHUNK in stream.data:
                    bridges.append(stream)
        exit_links = tracker_links + bridges
        log(f"captured {sum(map(len, everything))} bytes in {len(everything)} streams; exit links: "
            f"{len(tracker_links)} to or from the tracker ({sum(map(len, tracker_links))} B), "
            f"{len(bridges)} bridge streams ({sum(map(len, bridges))} B)")

        # The capture saw the transfer cross the bridge, from bob's exit to alice's, and the exits
        # talk to the tracker.
        self.assertTrue([s for s in bridges if s.direction == SENT and (s.local[0], s.remote[0])
                         == (sharer_exit, requester_exit)], f"no bridge from {sharer_exit} to {requester_exit}")
        bridge_sent = b"\n".join(s.data for s in bridges if s.direction == SENT)
        self.assertGreaterEqual(bridge_sent.count(FILE_CHUNK), chunk_count(self.SIZE), "chunks on the bridge")
        self.assertGreaterEqual(len(bridge_sent), self.SIZE * 4 // 3, "fewer bridge bytes than the file in base64")
        self.assertIn(b'"transfer_start"', bridge_sent)
        for transfer in transfers:
            self.assertIn(transfer.encode(), bridge_sent, "the transfer's id on the bridge")
        self.assertIn(b'"make_bridge"', b"\n".join(s.data for s in tracker_links))

        # Neither the name nor any 48-byte slice of the file, raw or base64, on the exit links ...
        leaks = Leaks(content, 48)
        exit_data = b"\n".join(s.data for s in exit_links)
        self.assertEqual(text_leaks(exit_data, name.encode()), [], "the file's name on an exit link")
        self.assertEqual(leaks(exit_data), [], "the file's bytes on an exit link")
        # ... nor anywhere else on a node's links (each link once: what its nodes sent, and what
        # they received from members that are not captured nodes).
        on_exit_links = {id(s) for s in exit_links}
        rest = b"\n".join(s.data for s in everything if id(s) not in on_exit_links
                          and (s.direction == SENT or s.remote[0] not in node_ips))
        self.assertEqual(text_leaks(rest, name.encode()), [], "the file's name on a node's link")
        self.assertEqual(leaks(rest), [], "the file's bytes on a node's link")

        # The detector does find a slice where there is one, raw or in base64 at any alignment.
        noise = exit_data[:1 << 20]
        for skip in range(3):
            planted = base64.b64encode(os.urandom(skip) + content[100_003:100_003 + 48] + os.urandom(2))
            self.assertEqual(len(leaks(noise + b'"data":"' + planted + b'"' + noise)), 1, f"base64 after {skip}")
        self.assertEqual(len(leaks(noise + content[2_000_001:2_000_049] + noise)), 1, "raw")
        self.assertNotEqual(text_leaks(noise + base64.b64encode(b"{" + name.encode()) + noise, name.encode()), [])


# --- exits that tamper ------------------------------------------------------------------------------

class _TamperingExitTests(_E2ECase):
    SIZE = 2 << 20
    option = verb = None

    def node_double(self, index, data_dir):
        return [self.option, str(TAMPERED)]

    def tamperings(self) -> list[tuple[int, str]]:
        """(chunk index, transfer) of each tampering the nodes logged that reached the other exit."""
        found = []
        for node in self.nodes:
            for index, transfer, rest in log_matches(
                    node, rf"tampering node: {self.verb} (?:4 bytes of )?file_chunk (\d+) of transfer (\S+?)(:.*)?$"):
                if not rest or "refused" not in rest:
                    found.append((int(index), transfer))
        return found

    async def run_tampered_transfer(self):
        name, content, sha = random_file(self.verb, self.SIZE)
        self.start_test_peer("bob")
        self.start_recording_peer("alice", chunk_size=CHUNK, max_attempts=10)
        await self.share_and_list("bob", name, content, sha)
        await self.ask("alice", name, sha)
        done = await self.download_done("alice", name)
        self.assertOnlyFile("alice", name, sha)
        sources = self.assertEndToEnd(done, content, sha)

        tampered = self.tamperings()
        log(f"tampered: {tampered}")
        self.assertGreaterEqual(len(tampered), 1, "no node tampered with a chunk: the test saw nothing")
        self.assertLessEqual(len(tampered), TAMPERED * self.node_count)
        # Each tampering is one refused chunk of the transfer it happened in, and nothing else is.
        for transfer, count in Counter(t for _, t in tampered).items():
            self.assertIn(transfer, sources, f"a tampered transfer alice does not list: {done['sources']}")
            self.assertEqual(sources[transfer]["refused"], count, sources[transfer])
        self.assertEqual(sum(s["refused"] for s in sources.values()), len(tampered))
        # The exit's doing, not the sharer's: bob is not counted against.
        for source in sources.values():
            self.assertEqual((source["mismatched"], source["excluded"]), (0, False), source)
        self.assertWroteOnlyTrueChunks("alice", content)
        self.assertIn("did not authenticate); building another", self.peers["alice"].log_text(),
                      "alice did not rebuild her circuit after refused chunks")
        return done


class FlippingExitTests(_TamperingExitTests):
    option, verb = "--flip", "flipped"

    @inline
    async def test_chunks_altered_by_an_exit_are_refused_and_fetched_again(self):
        done = await self.run_tampered_transfer()
        self.assertGreaterEqual(done["attempts"], 2, "the refused chunks were never asked for again")


class ForgingExitTests(_TamperingExitTests):
    option, verb = "--forge", "forged"

    @inline
    async def test_chunks_forged_by_an_exit_are_refused(self):
        await self.run_tampered_transfer()


# --- a sharer that lies ------------------------------------------------------------------------------

class LyingSharerTests(_E2ECase):
    SIZE = 2 << 20
    FIRST_LIE = 3  # carol's pieces 0..2 are true, 3.. are not

    def serving(self) -> list[str]:
        return [t for (t,) in log_matches(self.peers["carol"], r"lying sharer: serving transfer (\S+)")]

    @inline
    async def test_a_sharer_whose_bytes_do_not_match_its_root_is_excluded(self):
        name, content, sha = random_file("lie", self.SIZE)
        # Carol, in order (window 1), so that her true chunks come before her first false one.
        self.start_lying_sharer("carol", name, content, self.FIRST_LIE, window=1)
        self.assertEqual((self.lie["sha256"], self.lie["root"]), (sha, file_root(content)))
        self.start_test_peer("bob")  # shares nothing yet
        self.start_recording_peer("alice", chunk_size=CHUNK, max_attempts=20)
        await self.wait_connected("bob")
        await self.wait_listed_root("alice", name, content, sha)
        await self.ask("alice", name, sha)

        async def excluded():
            d = await self.download("alice", name)
            if d is None or d["state"] in ("done", "failed"):
                raise AssertionError(f"the download ended before carol was excluded: {d}")
            lied = [s for s in d["sources"] if s["mismatched"]]
            return (d, lied[0]) if lied and lied[0]["excluded"] else None
        first, liar = await poll_until(excluded, timeout=TRANSFER_DEADLINE, what="alice to exclude carol",
                                       interval=0.05)
        self.assertEqual(self.serving(), [liar["transfer"]], "carol's uploads")
        self.assertEqual((liar["mismatched"], liar["refused"], liar["e2e"]), (1, 0, True), liar)
        # Carol's true chunks came one at a time before her first false one: alice kept those only.
        self.assertEqual(liar["chunks"], self.FIRST_LIE, liar)
        self.assertEqual(sorted(w["offset"] for w in self.check_writes("alice", content)),
                         [i * CHUNK for i in range(self.FIRST_LIE)])

        # Bob shares the true file: the same entry (name, sha256, root); the download goes on by itself.
        self.share_bytes("bob", name, content)
        done = await self.download_done("alice", name)
        self.assertOnlyFile("alice", name, sha)
        sources = self.assertEndToEnd(done, content, sha)
        self.assertWroteOnlyTrueChunks("alice", content)
        # Carol was asked once: one upload in her log, one transfer of hers at alice, excluded.
        self.assertEqual(self.serving(), [liar["transfer"]], "carol was asked again")
        lying = [s for s in sources.values() if s["mismatched"]]
        self.assertEqual([s["transfer"] for s in lying], [liar["transfer"]])
        self.assertEqual((lying[0]["mismatched"], lying[0]["excluded"]), (1, True))
        honest = [s for s in sources.values() if not s["mismatched"]]
        self.assertTrue(honest and all(not s["excluded"] and s["refused"] == 0 for s in honest), sources)
        self.assertEqual(sum(s["chunks"] for s in honest), chunk_count(self.SIZE) - liar["chunks"])
        log(f"carol excluded after {first['sources']}")
