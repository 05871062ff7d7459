"""Several sources per download (issue 16), in memory: the /2 network of
``peer_network_v2`` (sealed circuits, end-to-end transfers of 256 KiB
chunks) with a third peer, carol, who shares what bob shares.

* Both sources serve one download at once, each its own transfer and
  bridge; the chunks are split between them and every chunk is written once.
* A source that goes silent mid-download (as if killed: nothing it sends
  arrives, and nothing says so) leaves its chunks to the other: the download completes long before the
  stall timeout, without a new attempt (the other's slot, out of chunks to claim, looks again
  until the silent one's chunks are worth copies).
* One source only: a single transfer asks for every chunk, as before.

Time is the network's ``task.Clock``; nothing sleeps.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.peer.download_state import DONE
from tests.support.deferreds import inline
from tests.support.peer_network import ALICE_IP, BOB_IP
from tests.support.peer_network_v2 import V2Network

CAROL_IP = "127.0.0.103"
PIECE = 256 * 1024


class SwarmCase(unittest.TestCase):
    def setUp(self):
        self.net = V2Network(self.mktemp())
        self.carol = self.net.make_peer(CAROL_IP, "carol")
        self.served = {BOB_IP: [], CAROL_IP: []}  # the transfers each sharer was asked to serve
        for ip in self.served:
            peer = self.net.peers[ip]
            serve = peer.uploader.serve
            peer.uploader.serve = lambda circuit, message, serve=serve, ip=ip: (
                self.served[ip].append(message.get("transfer")), serve(circuit, message))[-1]

    def tearDown(self):
        for peer in list(self.net.peers.values()):
            if not peer._stopped:
                self.net.run(peer.stop())
        self.net.pump()

    async def share_everywhere(self, name: str, size: int, ips=(BOB_IP, CAROL_IP)) -> bytes:
        data = os.urandom(size)
        for ip in ips:
            self.net.write_share(ip, name, data)
        await self.net.start()
        alice = self.net.alice
        # Alice's catalogue as it stands after bob's and carol's ls.
        alice.announcer.take_catalogue(await self.net.run(alice.send({"type": "list"})))
        self.net.pump(until=lambda: any(r.get("name") == name and r.get("sources") == len(ips)
                                        for r in alice.catalogue))
        return data

    def downloaded(self, name: str) -> bytes:
        with open(os.path.join(self.net.downloads_dir(ALICE_IP), name), "rb") as f:
            return f.read()


class TwoSourcesTests(SwarmCase):
    @inline
    async def test_both_sources_serve_one_download_and_every_chunk_is_written_once(self):
        data = await self.share_everywhere("shared.bin", 64 * PIECE + 100)
        d = self.net.alice.download("shared.bin")
        self.net.pump(until=lambda: d.state is DONE or d.error is not None)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(self.downloaded("shared.bin") == data)
        self.assertEqual(d.attempts, 1)
        self.assertTrue(self.served[BOB_IP] and self.served[CAROL_IP], self.served)
        sources = d.status(self.net.clock.seconds())["sources"]
        self.assertEqual(sum(s["chunks"] for s in sources), d.chunks.count)  # none twice
        served = {t for ts in self.served.values() for t in ts}
        self.assertEqual({s["transfer"] for s in sources if s["chunks"]} - served, set())
        self.assertTrue(all(s["e2e"] and not s["refused"] and not s["mismatched"] for s in sources), sources)

    @inline
    async def test_a_source_that_goes_silent_leaves_its_chunks_to_the_other(self):
        data = await self.share_everywhere("shared.bin", 64 * PIECE)
        net = self.net
        d = net.alice.download("shared.bin")
        net.pump(until=lambda: d.chunks is not None and d.chunks.have >= 2 and self.served[CAROL_IP])
        started = net.clock.seconds()
        # Carol is gone as if killed: nothing she sends arrives, and nobody tells alice.
        self.carol.outbound.post = lambda *args, **kwargs: defer.Deferred()
        try:
            net.pump(until=lambda: d.state is DONE or d.error is not None)
        finally:
            del self.carol.outbound.post  # her class's again: tearDown stops her
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(self.downloaded("shared.bin") == data)
        self.assertEqual(d.attempts, 1, "the download waited for a new attempt")
        self.assertLess(net.clock.seconds() - started, net.alice.stall_timeout / 2,
                        "the download waited for the silent source to time out")


class OneSourceTests(SwarmCase):
    @inline
    async def test_one_source_gets_one_transfer_for_every_chunk(self):
        data = await self.share_everywhere("solo.bin", 6 * PIECE, ips=(BOB_IP,))
        d = self.net.alice.download("solo.bin")
        self.net.pump(until=lambda: d.state is DONE or d.error is not None)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(self.downloaded("solo.bin") == data)
        self.assertEqual(len(self.served[BOB_IP]), 1)
        requests = [m for _, _, m in self.net.tracker_messages if m.get("type") == "request"]
        self.assertEqual([m.get("chunks") for m in requests], [None])
