"""The real tracker, four nodes and two peers, over real sockets (issue 3).

Every test gets its own ``127.R1.R2.x`` addresses (random R1, R2), all at
port 5000: the real tracker (``twistd oniontracker``) at .1, the nodes
``twistd onionnode`` at .11 to .14. The test process plays two peers, each
on its own address with its own listener for backward cells, its own
outbound connections bound there and its own circuit through three distinct
nodes: the sharer at .101, the requester at .102. The test's own looking
around (identity, directories, metrics, the tracker's page) comes from .200.

A file crosses the network as §8 says: both peers announce, the requester
asks, the tracker bridges the two exits and forwards the ``request`` to the
sharer, whose chunks cross the bridge to the requester; ``transfer_end``
removes the bridge at both exits. The tracker's page, metrics, directory,
files and log never name either peer.

Nothing waits by sleeping: every wait polls with a deadline on the reactor clock.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.protocol import wire
from onion_twisted.peer.circuit import Circuit
from tests.support.deferreds import current_reactor as _reactor, inline
from tests.support.peer_side import PeerSide
from tests.support.processes import PORT, ProcessesMixin, poll_until

TRACKER_HOST, NODE_HOSTS, SHARER_HOST, REQUESTER_HOST, ADMIN_HOST = 1, (11, 12, 13, 14), 101, 102, 200
ALL_HOSTS = (TRACKER_HOST, *NODE_HOSTS, SHARER_HOST, REQUESTER_HOST, ADMIN_HOST)
HOP_TIMEOUT = 5
CHUNK_SIZE = 65536
FILE_SIZE = 1024 * 1024 + 12345  # about 1 MiB, the last chunk a partial one
WINDOW = 4                       # file chunks in flight at once
NAME = "song.ogg"


# --- the test case ---------------------------------------------------------------------------

class TrackerProcessesTests(ProcessesMixin, unittest.TestCase):
    timeout = 60
    hosts, admin_host = ALL_HOSTS, ADMIN_HOST  # self.ip(host); self.admin sends from ADMIN_HOST

    async def start_members(self):
        reactor = _reactor()
        base = self.mktemp()

        # Each peer the test plays: its listener for backward cells, its outbound, one circuit.
        # Cleanups run last-registered first: these close after the processes stopped.
        self.sharer = PeerSide("sharer", self.ip(SHARER_HOST), reactor)
        self.addCleanup(self.sharer.close)
        self.requester = PeerSide("requester", self.ip(REQUESTER_HOST), reactor)
        self.addCleanup(self.requester.close)
        self.helpers = (self.sharer, self.requester)

        self.tracker = self.start_tracker(self.ip(TRACKER_HOST), PORT, f"{base}/tracker",
                                          heartbeat=1, hop_timeout=HOP_TIMEOUT)
        identity = await self.wait_identity(self.tracker, self.admin)
        self.assertEqual(identity["role"], "tracker")
        self.tracker_key = identity["public_key"]
        self.nodes = self.start_nodes(NODE_HOSTS, base, key_bits=1024, hop_timeout=HOP_TIMEOUT, register_interval=1)
        directory = await self.wait_listed(self.nodes)
        self.entries = [directory.nodes[n.address] for n in self.nodes]

    # --- helpers ---------------------------------------------------------------------

    async def get_text(self, member, path: str) -> str:
        status, _, body = await self.admin.get(member.address, path)
        self.assertEqual(status, 200, f"{member.name} answered {status} for GET {path}")
        return body.decode("utf-8")

    async def bridges_at(self, node) -> int:
        found = re.search(r"^onion_node_bridges (\d+)$", await self.get_text(node, "/metrics"), re.M)
        self.assertIsNotNone(found, f"no onion_node_bridges in {node.name}'s /metrics")
        return int(found.group(1))

    async def tracker_metric(self, line: str) -> int:
        found = re.search(r"^" + re.escape(line) + r" (\d+)$", await self.get_text(self.tracker, "/metrics"), re.M)
        self.assertIsNotNone(found, f"no {line} in the tracker's /metrics")
        return int(found.group(1))

    async def build(self, helper: PeerSide, hops: list[int], files: list) -> dict:
        """The helper's circuit through the nodes ``hops`` (indices), announced with ``files``."""
        self.assertEqual(len(set(hops)), 3, "a circuit goes through three distinct nodes")
        helper.circuit = Circuit(helper.outbound, [self.entries[i] for i in hops], self.tracker.address)
        reply = await helper.circuit.build({"type": "ls", "files": files})
        self.assertEqual(reply["type"], "files", reply)
        return reply

    async def share_and_see(self, sharer_hops, requester_hops) -> tuple[bytes, str]:
        """The sharer announces a ~1 MiB file; the requester (nothing shared) sees it with one source."""
        data = os.urandom(FILE_SIZE)
        sha = hashlib.sha256(data).hexdigest()
        listing = [{"name": NAME, "size": FILE_SIZE, "sha256": sha, "sources": 1}]
        reply = await self.build(self.sharer, sharer_hops, [{"name": NAME, "size": FILE_SIZE, "sha256": sha}])
        self.assertEqual(reply["files"], listing)
        reply = await self.build(self.requester, requester_hops, [])
        self.assertEqual(reply["files"], listing)
        self.assertEqual(await self.requester.circuit.send({"type": "list"}), {"type": "files", "files": listing})
        return data, sha

    async def transfer(self, sharer_hops, requester_hops):
        """The whole §8 exchange between the two helpers; checks each step."""
        data, sha = await self.share_and_see(sharer_hops, requester_hops)
        sharer_exit, requester_exit = self.nodes[sharer_hops[-1]], self.nodes[requester_hops[-1]]
        self.assertEqual([await self.bridges_at(n) for n in self.nodes], [0, 0, 0, 0])

        reply = await self.requester.circuit.send({"type": "request", "file": NAME, "chunk_size": CHUNK_SIZE})

        self.assertEqual(reply["type"], "transfer", reply)
        transfer = reply["transfer"]
        self.assertEqual({k: reply.get(k) for k in ("file", "size", "sha256", "chunk_size")},
                         {"file": NAME, "size": FILE_SIZE, "sha256": sha, "chunk_size": CHUNK_SIZE})
        self.assertTrue(wire.is_circuit_id(transfer), transfer)
        # §8: the tracker asks the sharer (step 3) before it answers the requester (step 4).
        self.assertTrue(self.sharer.queue.pending, "the transfer reply came before the sharer was asked")
        ask = await self.sharer.next_message()
        self.assertEqual({k: ask.get(k) for k in ("type", "file", "transfer", "chunk_size")},
                         {"type": "request", "file": NAME, "transfer": transfer, "chunk_size": CHUNK_SIZE})
        self.assertIn(ask.get("sha256"), (None, sha))
        self.assertIsNone(ask.get("chunks"))  # a whole file, not a resume
        # Both ends of the bridge are in place, at the exits only.
        expected = [0, 0, 0, 0]
        expected[sharer_hops[-1]] += 1
        expected[requester_hops[-1]] += 1
        self.assertEqual([await self.bridges_at(n) for n in self.nodes], expected)

        # The sharer streams the chunks with a window; each is acknowledged by the far end ({} -> None).
        count = -(-FILE_SIZE // CHUNK_SIZE)
        in_flight = {"now": 0, "most": 0}

        async def send_chunk(index):
            piece = data[index * CHUNK_SIZE:(index + 1) * CHUNK_SIZE]
            in_flight["now"] += 1
            in_flight["most"] = max(in_flight["most"], in_flight["now"])
            try:
                answer = await self.sharer.circuit.send({
                    "type": "file_chunk", "transfer": transfer, "file": NAME, "chunk_idx": index,
                    "chunk_size": CHUNK_SIZE, "size": FILE_SIZE, "data": base64.b64encode(piece).decode("ascii")})
            finally:
                in_flight["now"] -= 1
            self.assertIsNone(answer, f"chunk {index} was answered {answer!r}")

        window = defer.DeferredSemaphore(WINDOW)
        try:
            await defer.gatherResults(
                [window.run(lambda i=i: defer.ensureDeferred(send_chunk(i))) for i in range(count)],
                consumeErrors=True)
        except defer.FirstError as e:
            e.subFailure.raiseException()
        self.assertGreater(in_flight["most"], 1, "the chunks went one round trip at a time")
        self.assertIsNone(await self.sharer.circuit.send({"type": "transfer_end", "transfer": transfer,
                                                          "status": "ok"}))

        # Every chunk and the transfer_end reached the requester, backward on its circuit.
        received = {}
        for _ in range(count):
            chunk = await self.requester.next_message()
            self.assertEqual(chunk.get("type"), "file_chunk", chunk)
            self.assertEqual((chunk["transfer"], chunk["file"], chunk["chunk_size"], chunk["size"]),
                             (transfer, NAME, CHUNK_SIZE, FILE_SIZE))
            self.assertNotIn(chunk["chunk_idx"], received, "a chunk arrived twice")
            received[chunk["chunk_idx"]] = wire.b64decode(chunk["data"], "data")  # bytes: decoded on arrival
        self.assertEqual(sorted(received), list(range(count)))
        end = await self.requester.next_message()
        self.assertEqual(end, {"type": "transfer_end", "transfer": transfer, "status": "ok"})
        whole = b"".join(received[i] for i in range(count))
        self.assertEqual(len(whole), FILE_SIZE)
        self.assertEqual(hashlib.sha256(whole).hexdigest(), sha)

        # transfer_end removed the bridge at both exits.
        for node in {sharer_exit.name: sharer_exit, requester_exit.name: requester_exit}.values():
            await poll_until(lambda node=node: self._no_bridge_at(node), timeout=10,
                             what=f"{node.name} to remove its bridge end")
        self.assertEqual([await self.bridges_at(n) for n in self.nodes], [0, 0, 0, 0])
        self.assertEqual(await self.tracker_metric('onion_tracker_requests_total{outcome="bridged"}'), 1)
        # Nothing more arrived than was sent: no chunk twice, no stray request, however late.
        await self.assertNothingElseArrived()

    async def _no_bridge_at(self, node) -> bool:
        return await self.bridges_at(node) == 0

    async def assertNothingElseArrived(self):
        """Nothing reached either helper that the test has not taken, even late: a sentinel.

        Looking at the queues at once would miss a stray message still on its way. Instead
        a later known exchange goes through the same paths: the requester asks for the file
        again, so the tracker sends the sharer a ``request`` backward on its circuit (the path
        of every request to a sharer), and the sharer answers with a ``transfer_end`` that
        crosses the new bridge to the requester (the path of every chunk). Each must be the
        very next message its helper gets: anything sent earlier would arrive before it. The
        bridge goes with the transfer_end, at both exits, and nothing else is left bridged.
        """
        bridged = await self.tracker_metric('onion_tracker_requests_total{outcome="bridged"}')
        reply = await self.requester.circuit.send({"type": "request", "file": NAME, "chunk_size": CHUNK_SIZE})
        self.assertEqual(reply["type"], "transfer", reply)
        ask = await self.sharer.next_message()
        self.assertEqual((ask.get("type"), ask.get("transfer")), ("request", reply["transfer"]),
                         f"the sharer got {ask!r} before the sentinel request")
        end = {"type": "transfer_end", "transfer": reply["transfer"], "status": "ok"}
        self.assertIsNone(await self.sharer.circuit.send(end))
        got = await self.requester.next_message()
        self.assertEqual(got, end, "the requester got something before the sentinel transfer_end")
        for node in self.nodes:
            await poll_until(lambda node=node: self._no_bridge_at(node), timeout=10,
                             what=f"{node.name} to hold no bridge end")
        self.assertEqual(await self.tracker_metric('onion_tracker_requests_total{outcome="bridged"}'), bridged + 1)
        for helper in self.helpers:
            self.assertEqual(helper.refused, [], f"the {helper.name} refused backward cells")

    def secrets(self) -> list[str]:
        """What the tracker must never show: the peers' addresses."""
        return [h.ip for h in self.helpers]

    def assertNamesNoPeer(self, text: str, where: str):
        for secret in self.secrets():
            self.assertNotIn(secret, text, f"{where} names the peer address {secret}")

    async def assertTrackerNamesNoPeer(self):
        """The tracker's page, metrics, directory, files and log (after a graceful stop) name no peer."""
        page = await self.get_text(self.tracker, "/")
        self.assertIn(NAME, page)  # the real page, with the catalogue on it
        self.assertNamesNoPeer(page, "the tracker's page")
        self.assertNamesNoPeer(await self.get_text(self.tracker, "/metrics"), "the tracker's /metrics")
        nodes = await self.get_text(self.tracker, "/nodes")
        self.assertIn(self.nodes[0].ip, nodes)
        self.assertNamesNoPeer(nodes, "the tracker's /nodes")
        log = self.tracker.log_text()
        self.assertIn("onion tracker", log)  # the tracker's own log, written
        self.assertNamesNoPeer(log, "the tracker's log")

        code = await self.tracker.stop()
        self.assertIn(code, (0, -signal.SIGTERM), "the tracker did not stop cleanly on SIGTERM")
        log = self.tracker.log_text()
        self.assertIn("Main loop terminated", log)  # complete: shutdown included
        self.assertNamesNoPeer(log, "the tracker's log after it stopped")
        for path in sorted(self.tracker.data_dir.rglob("*")):
            if path.is_file():
                self.assertNamesNoPeer(path.read_text("utf-8", errors="replace"), f"the tracker's {path.name}")

    # --- tests -------------------------------------------------------------------------

    @inline
    async def test_file_crosses_a_bridge_between_two_exits(self):
        # Sharer A B C (exit C), requester D C B (exit B): two different exits.
        await self.transfer([0, 1, 2], [3, 2, 1])
        await self.assertTrackerNamesNoPeer()

    @inline
    async def test_file_crosses_a_bridge_within_one_exit(self):
        # Sharer A B C, requester D A C: both exits are C (§7), both bridge ends there.
        await self.transfer([0, 1, 2], [3, 0, 2])
        await self.assertTrackerNamesNoPeer()

    @inline
    async def test_unknown_file_is_not_found_and_own_file_has_no_source(self):
        await self.share_and_see([0, 1, 2], [3, 0, 1])

        reply = await self.requester.circuit.send({"type": "request", "file": "nobody.ogg", "chunk_size": CHUNK_SIZE})
        self.assertEqual((reply.get("type"), reply.get("error")), ("error", "not_found"), reply)
        reply = await self.sharer.circuit.send({"type": "request", "file": NAME, "chunk_size": CHUNK_SIZE})
        self.assertEqual((reply.get("type"), reply.get("error")), ("error", "no_source"), reply)

        # Neither request set anything up: nothing bridged, no bridge end at any node, and no
        # request (nor anything else) reached either helper, even late.
        self.assertEqual(await self.tracker_metric('onion_tracker_requests_total{outcome="bridged"}'), 0)
        self.assertEqual([await self.bridges_at(n) for n in self.nodes], [0, 0, 0, 0])
        await self.assertNothingElseArrived()
        await self.assertTrackerNamesNoPeer()

    @inline
    async def test_destroying_the_sharers_circuit_forgets_its_files(self):
        await self.share_and_see([0, 1, 2], [3, 2, 1])
        self.assertEqual(await self.tracker_metric("onion_tracker_circuits"), 2)

        await self.sharer.circuit.destroy()

        async def forgotten():
            reply = await self.requester.circuit.send({"type": "list"})
            self.assertEqual(reply["type"], "files", reply)
            return all(f["name"] != NAME for f in reply["files"])

        await poll_until(forgotten, timeout=10, what="the tracker to forget the sharer's file")
        self.assertEqual(await self.tracker_metric("onion_tracker_circuits"), 1)
        self.assertEqual(await self.tracker_metric("onion_tracker_catalogue_entries"), 0)
        reply = await self.requester.circuit.send({"type": "request", "file": NAME, "chunk_size": CHUNK_SIZE})
        self.assertEqual((reply.get("type"), reply.get("error")), ("error", "not_found"), reply)
