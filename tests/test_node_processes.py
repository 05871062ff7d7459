"""Three ``twistd onionnode`` processes and a tracker, over real sockets (issue 2).

Every test gets its own ``127.R1.R2.x`` addresses (random R1, R2), all at
port 5000: the stand-in tracker (``tests/support/fake_tracker.py``) at .1,
the nodes X, Y, Z at .11, .12, .13 (X with ``--max-body 65536``). The test
process itself is the peer: it listens on .101:5000 for backward cells and
sends from .101 through an HTTPOutbound bound there; a stranger sends from
.66, the test's own looking-around (identity, metrics, tracker state) from .200.

Nothing waits by sleeping: every wait polls with a deadline on the reactor clock.
"""

from __future__ import annotations

import re
import signal

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.peer.circuit import Circuit
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.protocol.errors import BadRequest, Conflict, NextHopFailed, NextHopTimeout, ProtocolError
from onion_twisted.net.http_client import HTTPOutbound
from tests.support.deferreds import current_reactor as _reactor, inline
from tests.support.peer_side import PeerSide
from tests.support.processes import (PORT, ProcessesMixin, StatusOutbound, poll_until, raw_exchange,
                                     response_status)

HOP_TIMEOUT = 3.0
TRACKER_HOST, NODE_HOSTS, PEER_HOST, STRANGER_HOST, ADMIN_HOST = 1, (11, 12, 13), 101, 66, 200
ALL_HOSTS = (TRACKER_HOST, *NODE_HOSTS, PEER_HOST, STRANGER_HOST, ADMIN_HOST)
SMALL_MAX_BODY = 65536
LS = {"type": "ls", "files": ["song.ogg", {"name": "notes.txt", "size": 12, "sha256": "ab" * 32}]}
FILES = {"type": "files", "files": [
    {"name": "song.ogg", "size": None, "sha256": None, "sources": 1},
    {"name": "notes.txt", "size": 12, "sha256": "ab" * 32, "sources": 1},
]}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


# --- the test case ---------------------------------------------------------------------------

class NodeNetwork(ProcessesMixin):
    """The stand-in tracker, X, Y and Z, the test as the peer; ``tracker_options`` for the tracker."""

    timeout = 60
    hosts, admin_host = ALL_HOSTS, ADMIN_HOST  # self.ip(host); self.admin sends from ADMIN_HOST
    tracker_options: dict = {}

    async def start_members(self):
        reactor = _reactor()
        self.peer_ip, self.stranger_ip = self.ip(PEER_HOST), self.ip(STRANGER_HOST)
        base = self.mktemp()

        # Cleanups run last-registered first: these close after the processes stopped.
        stranger_http = HTTPOutbound(reactor, bind_ip=self.stranger_ip, timeout=20)
        self.addCleanup(stranger_http.close)
        self.stranger = StatusOutbound(stranger_http)
        self.peer = PeerSide("peer", self.peer_ip, reactor)  # the peer's outbound and its listener
        self.addCleanup(self.peer.close)

        self.tracker = self.start_fake_tracker(self.ip(TRACKER_HOST), PORT, f"{base}/tracker", **self.tracker_options)
        identity = await self.wait_identity(self.tracker, self.admin)
        self.assertEqual(identity["role"], "tracker")
        self.tracker_key = identity["public_key"]
        self.nodes = self.start_nodes(NODE_HOSTS, base, key_bits=1024, hop_timeout=HOP_TIMEOUT, register_interval=1,
                                      per_node={0: {"max_body": SMALL_MAX_BODY}})
        directory = await self.wait_listed(self.nodes)
        self.entries = [directory.nodes[n.address] for n in self.nodes]

    # --- helpers ---------------------------------------------------------------------

    async def tracker_state(self) -> dict:
        status, _, body = await self.admin.get(self.tracker.address, "/test/state")
        self.assertEqual(status, 200)
        return wire.loads_object(body)

    async def tracker_post(self, path: str, obj: dict) -> dict:
        body = await self.admin.post(self.tracker.address, wire.dumps(obj), path=path)
        return wire.loads_object(body)

    async def metric_at(self, member, name: str) -> int:
        status, _, body = await self.admin.get(member.address, "/metrics")
        self.assertEqual(status, 200)
        found = re.search(rb"^" + name.encode() + rb" (\d+)$", body, re.M)
        self.assertIsNotNone(found, f"no {name} in /metrics")
        return int(found.group(1))

    async def circuits_at(self, member) -> int:
        return await self.metric_at(member, "onion_node_circuits")

    def new_circuit(self) -> Circuit:
        return self.peer.add(Circuit(self.peer.outbound, self.entries, self.tracker.address))

    async def built_circuit(self) -> Circuit:
        circuit = self.new_circuit()
        self.assertEqual(await circuit.build(LS), FILES)
        return circuit

    async def assertFailsWith(self, coroutine, *statuses):
        """Await ``coroutine``; it must fail with a member's answer of one of ``statuses``."""
        try:
            await coroutine
        except ProtocolError as e:
            answered = getattr(e, "answered", None)
            self.assertIn(answered, statuses, f"expected an answer {statuses}, got {e!r} ({answered})")
            return e
        self.fail(f"expected a refusal with status {statuses}, it succeeded")

    def assertLogsSafe(self, members, secrets):
        for member in members:
            text = member.log_text()
            self.assertTrue(text, f"{member.name} wrote no log at {member.log_path}")
            for secret in secrets:
                self.assertNotIn(secret, text, f"{member.name}'s log names {secret!r}")
            self.assertIsNone(UUID.search(text), f"{member.name}'s log names a circuit id")

    async def _no_circuit_at(self, node):
        return await self.circuits_at(node) == 0

    async def _tracker_forgot(self):
        return (await self.tracker_state())["circuits"] == []


class NodeProcessesTests(NodeNetwork, unittest.TestCase):
    @inline
    async def test_build_circuit_create_extend_extend_connect(self):
        circuit = self.new_circuit()
        await circuit.create()
        self.assertEqual(circuit.built, 1)
        await circuit.extend()
        self.assertEqual(circuit.built, 2)
        await circuit.extend()
        self.assertEqual(circuit.built, 3)
        # Only X has seen the peer's CID, and every node holds one circuit.
        self.assertEqual([await self.circuits_at(n) for n in self.nodes], [1, 1, 1])
        self.assertEqual((await self.tracker_state())["circuits"], [])

        reply = await circuit.connect(LS)

        self.assertEqual(reply, FILES)
        state = await self.tracker_state()
        self.assertEqual(len(state["circuits"]), 1)
        seen = state["circuits"][0]
        self.assertEqual(seen["messages"], [LS])  # the tracker reads the ls in plaintext
        self.assertEqual(seen["exit"], self.nodes[2].ip)  # ... from the exit Z, not from the peer
        self.assertNotEqual(seen["CID"], circuit.cid)

    @inline
    async def test_messages_both_ways(self):
        circuit = await self.built_circuit()
        for n in range(3):
            hello = {"type": "hello", "n": n, "text": "ünïcode ✓"}
            self.assertEqual(await circuit.send(hello), {"type": "echo", "got": hello})

            pushed = {"type": "request", "file": "song.ogg", "transfer": f"t{n}", "chunk_size": 16384}
            answer = await self.tracker_post("/test/push", {"index": 0, "message": pushed})
            self.assertEqual(answer, {"status": 200, "body": {}})  # Z answers once the peer has it (§3)
            cid, message = await self.peer.next_backward()
            self.assertEqual((cid, message), (circuit.cid, pushed))

        state = await self.tracker_state()
        self.assertEqual(state["circuits"][0]["count"], 4)  # the ls and three hellos
        # The same backward cell a second time is a replay: refused, nothing delivered.
        cid, payload = self.peer.received[-1]
        self.assertRaises(Conflict, circuit.open_backward, payload)
        self.assertRaises(BadRequest, circuit.open_backward, payload[:-8] + "AAAAAAA=")

    @inline
    async def test_stranger_on_the_circuit_id_gets_403(self):
        circuit = await self.built_circuit()
        onion = crypto.wrap_onion(circuit.layers, wire.dumps({"type": "hello", "from": "stranger"}))

        await self.assertFailsWith(self.stranger.post(circuit.entry, cells.encode_cell(circuit.cid, onion)), 403)
        await self.assertFailsWith(self.stranger.post(circuit.entry, cells.encode_destroy(circuit.cid)), 403)

        # Nothing changed: the circuit still works, and the tracker never saw the stranger's message.
        hello = {"type": "hello"}
        self.assertEqual(await circuit.send(hello), {"type": "echo", "got": hello})
        self.assertEqual((await self.tracker_state())["circuits"][0]["messages"], [LS, hello])

    @inline
    async def test_killing_the_middle_node_fails_the_next_message(self):
        circuit = await self.built_circuit()
        middle = self.nodes[1]
        self.kill(middle, signal.SIGKILL)
        await middle.wait_exit(10)

        # X itself answers the failure (502, or 504 past its hop timeout), rather than leaving
        # the peer to its own 20 s timeout, which would end the send without an answer.
        error = await self.assertFailsWith(circuit.send({"type": "hello"}), 502, 504)

        self.assertIsInstance(error, (NextHopFailed, NextHopTimeout))
        # The hello cannot reach the tracker later: its only path goes through the dead node.
        self.assertEqual((await self.tracker_state())["circuits"][0]["messages"], [LS])
        # X's account of the failure names neither the peer nor a circuit.
        self.assertLogsSafe([self.nodes[0]], [self.peer_ip, circuit.cid])

    @inline
    async def test_destroy_reaches_every_hop(self):
        circuit = await self.built_circuit()
        self.assertEqual([await self.circuits_at(n) for n in self.nodes], [1, 1, 1])
        self.assertEqual(len((await self.tracker_state())["circuits"]), 1)

        await circuit.destroy()

        for node in self.nodes:
            await poll_until(lambda node=node: self._no_circuit_at(node), timeout=10,
                             what=f"{node.name} to drop the circuit")
        await poll_until(self._tracker_forgot, timeout=10, what="the tracker to forget the circuit")
        with self.assertRaises(Conflict):
            await circuit.send({"type": "hello"})

    @inline
    async def test_body_over_max_body_is_refused_with_413(self):
        x, y = self.nodes[0].address, self.nodes[1].address
        head = (f"POST / HTTP/1.1\r\nHost: {x}\r\nContent-Type: application/json\r\n").encode()
        # Announced length over X's limit: refused before the body is read.
        raw = await raw_exchange(self.peer_ip, x, head + b"Content-Length: %d\r\n\r\n" % (SMALL_MAX_BODY + 1))
        self.assertEqual(response_status(raw), 413, raw[:200])
        self.assertIn(b'"error":"too_large"', raw)
        # Chunked, no length announced: refused once the body passes the limit.
        chunk = b"x" * (SMALL_MAX_BODY + 1)
        raw = await raw_exchange(self.peer_ip, x, head + b"Transfer-Encoding: chunked\r\n\r\n"
                                 + b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        self.assertEqual(response_status(raw), 413, raw[:200])
        # The same bad body is not too large for Y (default limit): a plain 400 there.
        raw = await raw_exchange(self.peer_ip, y, head + b"Connection: close\r\nContent-Length: %d\r\n\r\n"
                                 % len(chunk) + chunk)
        self.assertEqual(response_status(raw), 400, raw[:200])
        # X neither crashed nor stalled.
        await self.built_circuit()

    @inline
    async def test_control_message_needs_the_tracker_signature(self):
        z = self.nodes[2].address
        drop = {"type": "drop_bridge", "bridge_CID": wire.new_circuit_id()}
        answer = await self.tracker_post("/test/control", {"to": str(z), "payload": drop})
        # Signature accepted; the bridge is unknown.
        self.assertEqual(answer["status"], 404, answer)
        self.assertEqual(answer["body"]["error"], "unknown_circuit")
        forged = wire.dumps({"CID": "control", "payload": {**drop, "issued": int(_reactor().seconds())}})
        forger = crypto.generate_tracker_key()
        await self.assertFailsWith(self.stranger.post(z, forged, {SIGNATURE_HEADER: crypto.sign_body(forger, forged)}),
                                   403)

    @inline
    async def test_logs_name_no_peer_and_no_circuit(self):
        circuit = await self.built_circuit()
        await circuit.send({"type": "hello"})
        await self.tracker_post("/test/push", {"index": 0, "message": {"type": "ping"}})
        await self.peer.next_backward()
        exit_cid = (await self.tracker_state())["circuits"][0]["CID"]
        await self.assertFailsWith(self.stranger.post(circuit.entry, cells.encode_destroy(circuit.cid)), 403)
        await circuit.destroy()
        await poll_until(self._tracker_forgot, timeout=10, what="the tracker to forget the circuit")

        # Stop everyone so the logs are complete (shutdown included).
        codes = await defer.gatherResults([defer.ensureDeferred(m.stop()) for m in [*self.nodes, self.tracker]])
        # twistd ends by re-raising the signal it stopped on; the tracker script returns 0.
        for code in codes:
            self.assertIn(code, (0, -signal.SIGTERM), "a member did not stop cleanly on SIGTERM")
        secrets = [self.peer_ip, self.stranger_ip, circuit.cid, exit_cid]
        self.assertLogsSafe(self.nodes, secrets)
        for node in self.nodes:
            self.assertIn("onion node", node.log_text())  # the log is the node's, and it was written
        # The tracker's clients are the nodes (and, through them, the peers): it names none.
        self.assertLogsSafe([self.tracker], secrets + [n.ip for n in self.nodes])


class NeighbourLeftTests(NodeNetwork, unittest.TestCase):
    """A node that leaves the directory takes its circuits with it (docs choice 70): the
    stand-in tracker forgets a node unseen for 4 s; the nodes register every second."""

    tracker_options = {"node_ttl": 4}

    @inline
    async def test_both_sides_of_a_dead_middle_close_the_circuit_and_the_tracker_forgets_it(self):
        circuit = await self.built_circuit()
        x, y, z = self.nodes
        self.kill(y, signal.SIGKILL)
        await y.wait_exit(10)

        # Nobody sends a cell: only the directory tells X and Z that Y is gone.
        for node in (x, z):
            await poll_until(lambda node=node: self._no_circuit_at(node), timeout=30,
                             what=f"{node.name} to close the circuit through the dead middle")
            self.assertEqual(await self.metric_at(node, "onion_node_neighbour_left_total"), 1)
        # Z passed the destroy on to the tracker, X back to the peer.
        await poll_until(self._tracker_forgot, timeout=10, what="the tracker to forget the circuit")
        await poll_until(lambda: defer.succeed(circuit.cid in self.peer.destroyed), timeout=10,
                         what="the peer to get the entry's destroy")
        self.assertLogsSafe([x, z], [self.peer_ip, circuit.cid])
