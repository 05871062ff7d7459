"""A mixed network (PROTOCOL.md §10): onion-http/2 peers through a node of onion-http/1, as processes.

Every test gets its own ``127.R1.R2.x`` addresses: the real tracker at .1,
three nodes at .11 to .13, of which .12 runs with ``speak_v2 = false`` (no
onion key: the node as it was before /2), alice at .101 and bob at .102,
all with ``tls`` on (the shipped default). With three nodes and three hops,
each peer's circuit crosses the /1 node.

* ``test_v2_peers_trade_a_file_through_a_v1_node``: the /1 node's
  ``/identity`` lists onion-http/1 only and no onion key, the others both
  versions; each peer's circuit shows that node as /1 and the others as /2,
  the /1 node holds the peers' circuits as /1 ones (its ``/metrics``), and
  bob's file reaches alice verified.

(The other mixed case, a peer of /1 only through /2 nodes, is
``tests/test_http10_interop.py``: a peer written from sections 1-9 alone.)

Nothing waits by sleeping: every wait polls with a deadline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.trial import unittest

from tests.support.deferreds import inline
from tests.support.processes import PORT, PeerApiMixin, ProcessesMixin, poll_until, sha256_file

TRACKER_HOST, NODE_HOSTS, V1_NODE, ALICE_HOST, BOB_HOST, ADMIN_HOST = 1, (11, 12, 13), 1, 101, 102, 200
NAME = "through an older node.bin"
SIZE = 3 << 20
HOP_TIMEOUT = 5
CREATED = re.compile(rb"^onion_node_creates_total (\d+)$", re.M)


class MixedNetworkTests(ProcessesMixin, PeerApiMixin, unittest.TestCase):
    timeout = 120
    hosts, admin_host = (TRACKER_HOST, *NODE_HOSTS, ALICE_HOST, BOB_HOST, ADMIN_HOST), ADMIN_HOST
    tls = True

    async def start_members(self):
        self.base = Path(self.mktemp()).resolve()
        self.tracker = self.start_tracker(self.ip(TRACKER_HOST), PORT, self.base / "tracker", heartbeat=1,
                                          hop_timeout=HOP_TIMEOUT)
        self.tracker_key = (await self.wait_identity(self.tracker, self.admin))["public_key"]
        self.nodes = self.start_nodes(NODE_HOSTS, self.base, key_bits=1024, register_interval=1,
                                      hop_timeout=HOP_TIMEOUT, per_node={V1_NODE: {"speak_v2": False}})
        await self.wait_listed(self.nodes)

    async def node_circuits_created(self, index: int) -> int:
        status, _, body = await self.admin.get(self.nodes[index].address, "/metrics")
        self.assertEqual(status, 200)
        found = CREATED.search(body)
        self.assertIsNotNone(found, "no onion_node_creates_total in the node's /metrics")
        return int(found.group(1))

    @inline
    async def test_v2_peers_trade_a_file_through_a_v1_node(self):
        for i, node in enumerate(self.nodes):
            identity = await self.wait_identity(node, self.admin)
            if i == V1_NODE:
                self.assertEqual((identity["protocol"], identity["protocols"]), ("onion-http/1", ["onion-http/1"]))
                self.assertNotIn("onion_key", identity)
            else:
                self.assertEqual(identity["protocols"], ["onion-http/1", "onion-http/2"])
                self.assertIn("onion_key", identity)
        v1_address = str(self.nodes[V1_NODE].address)

        share = self.base / "bob" / "share"
        share.mkdir(parents=True)
        (share / NAME).write_bytes(os.urandom(SIZE))
        sha = sha256_file(share / NAME)
        options = dict(hop_timeout=HOP_TIMEOUT, rescan_interval=1, refresh_interval=1, stall_timeout=10)
        peers = {name: self.start_peer(name, self.ip(host), PORT, self.tracker.address, self.tracker_key,
                                       self.base / name, **options)
                 for name, host in (("bob", BOB_HOST), ("alice", ALICE_HOST))}

        async def listed():
            for peer in peers.values():
                if not peer.running:
                    raise self.failureException(f"{peer.name} exited:\n{peer.tail()}")
            status = await self.api_status(peers["alice"].address, "alice")
            return any(f.get("name") == NAME for f in status["catalogue"])

        await poll_until(listed, timeout=45, what="bob's file in alice's catalogue", interval=0.1)
        for name, peer in peers.items():
            circuit = (await self.api_status(peer.address, name))["circuit"]
            self.assertEqual(circuit["state"], "connected", name)
            by_node = {n["address"]: n["protocol"] for n in circuit["nodes"]}
            self.assertEqual(len(by_node), 3, name)
            self.assertEqual(by_node.pop(v1_address), "onion-http/1", name)
            self.assertEqual(set(by_node.values()), {"onion-http/2"}, name)
            self.assertEqual(circuit["protocol"], "onion-http/1", f"{name}: a circuit with a /1 hop is not all /2")
        # The /1 node holds both peers' circuits (RSA CREATEs or /1 EXTENDs): at least two.
        self.assertGreaterEqual(await self.node_circuits_created(V1_NODE), 2)

        await self.api_download(peers["alice"].address, "alice", NAME, sha)

        async def done():
            found = [d for d in (await self.api_status(peers["alice"].address, "alice"))["downloads"]
                     if d["file"] == NAME]
            if found and found[0]["state"] == "failed":
                raise AssertionError(f"the download failed: {found[0]['error']}\n{peers['alice'].tail()}")
            return found and found[0]["state"] == "done"

        await poll_until(done, timeout=60, what="alice's download", interval=0.1)
        self.assertEqual(sha256_file(self.base / "alice" / "downloads" / NAME), sha)
