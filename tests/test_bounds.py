"""Every table that grows with input has a bound (issue 7; docs/protocol.md section 16).

Each test fills one table past its bound through the member's own entry
point (the node's and the tracker's HTTP apps in memory, the peer's cell and
API handlers) and checks the documented behaviour at the bound: a refusal
with its status, or the oldest entry making room. Bounds tested directly on
their table elsewhere: the relay table's circuits, bridges and nonce set
(test_circuits), the per-IP CREATE buckets (test_ratelimit), the tracker's
circuits, files per ``ls``, catalogue entries, listing and requests being
bridged (test_tracker, test_catalogue), the directory (test_registry).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import orjson
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted.tracker import transfers as tracker_transfers
from onion_twisted.protocol import cells, control, chunks as transfers, wire
from onion_twisted.peer import downloader as downloader_module
from onion_twisted.peer import circuit as circuit_module
from onion_twisted.node.circuits import RelayTable
from onion_twisted.protocol.crypto import FORWARD
from onion_twisted.peer.download_state import FAILED, BadChunk
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.peer.downloads import Download
from onion_twisted.peer.transfer import SEEN_TRANSFERS
from onion_twisted.net.http_server import QuietSite
from onion_twisted.node.app import NodeApp
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.relay import NodeRelay
from tests.support.fakes import FakeDirectory, FakeOutbound
from tests.support.fuzz import LoggedErrors, b64, exchange, post_json
from tests.test_fuzz_node import fired
from tests.test_fuzz_peer import CHUNK, ENTRY_IP, HOST as PEER_HOST, SERVER as PEER_SERVER, USER_IP, PeerWorld
from tests.test_node_app import (NEXT_ADDR, NEXT_KEY, NODE_ADDR, NODE_IP, NODE_KEY, NOW, PEER_ADDR, PEER_IP, PORT,
                                 SHARER_EXIT_IP, SIGNED_DIRECTORY, TRACKER_ADDR, TRACKER_IP, TRACKER_KEY,
                                 FakeNextNode, FakeTracker, Recorder, create_cell, extend_message)
from tests.support.tracker_fakes import NODE_IPS, SHA_A, TrackerHarness, new_cid

HOST = f"{NODE_IP}:{PORT}".encode("ascii")


# --- the node -------------------------------------------------------------------------------


class NodeBoundsTests(unittest.TestCase):
    def node(self, *, limiter=None, **table_options):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.table = RelayTable(self.clock, **table_options)
        self.tracker = FakeTracker()
        self.outbound = FakeOutbound({NEXT_ADDR: FakeNextNode(NEXT_KEY), TRACKER_ADDR: self.tracker,
                                        PEER_ADDR: Recorder()})
        self.relay = NodeRelay(clock=self.clock, private_key=NODE_KEY, own_address=NODE_ADDR, tracker=TRACKER_ADDR,
                               table=self.table, outbound=self.outbound,
                               directory=FakeDirectory(SIGNED_DIRECTORY, TRACKER_KEY.public_key()),
                               limiter=(limiter or (lambda clock: RateLimiter(clock, rate=1000.0, burst=1000)))(
                                   self.clock))
        self.site = QuietSite(NodeApp(self.relay, self.relay.directory).resource(), max_body=65536,
                              reactor=MemoryReactorClock())

    def post(self, body, ip=PEER_IP, headers=()):
        with LoggedErrors() as errors:
            response = exchange(self.site, ip, post_json(body, headers, host=HOST), server=(NODE_IP, PORT))
        self.assertEqual(errors.events, [], errors.text())
        return response.status, orjson.loads(response.body)

    def create(self, ip=PEER_IP):
        cid = wire.new_circuit_id()
        body, layer = create_cell(cid, NODE_KEY.public_key())
        status, answer = self.post(body, ip)
        return status, answer, cid, layer

    def signed_control(self, payload):
        """A control message signed now by the tracker: (body, headers), to be posted (and replayed)."""
        body, signature = control.sign_control(TRACKER_KEY, {"issued": int(self.clock.seconds()), **payload})
        return body, [(b"X-Onion-Signature", signature.encode("ascii"))]

    def control(self, payload):
        body, headers = self.signed_control(payload)
        return self.post(body, TRACKER_IP, headers)

    def exit_circuit(self):
        _, _, cid, layer = self.create()
        body = cells.encode_cell(cid, layer.wrap(extend_message(TRACKER_ADDR, {"type": "ls", "files": []}), FORWARD))
        self.assertEqual(self.post(body)[0], 200)
        return cid, layer, self.table.by_in[cid].out_cid

    def test_circuits_past_max_circuits_are_429_until_one_goes(self):
        self.node(max_circuits=3)
        made = [self.create() for _ in range(3)]
        self.assertEqual([m[0] for m in made], [200] * 3)
        status, answer, _, _ = self.create(ip="127.0.0.102")  # another peer: not its own budget, the node's
        self.assertEqual((status, answer["error"]), (429, "rate_limited"))
        self.assertEqual(len(self.table), 3)
        self.assertEqual(self.post(cells.encode_destroy(made[0][2]))[0], 200)
        self.assertEqual(self.create()[0], 200)
        self.assertEqual(len(self.table), 3)

    def test_a_create_on_a_full_table_is_refused_before_its_key_work(self):
        # An RSA decryption (or an X25519 handshake) costs far more than the refusal.
        from onion_twisted.node import relay as relay_module
        self.node(max_circuits=1)
        self.assertEqual(self.create()[0], 200)
        opened = []
        honest = relay_module.open_session_key
        self.patch(relay_module, "open_session_key", lambda *a: (opened.append(1), honest(*a))[1])
        status, answer, _, _ = self.create()
        self.assertEqual((status, answer["error"]), (429, "rate_limited"))
        self.assertEqual(opened, [], "the full node decrypted the CREATE's session key")

    def test_forward_layers_past_max_nonces_are_409_and_not_relayed(self):
        self.node(max_nonces=3)
        cid, layer, _ = self.exit_circuit()  # the extend was the first layer
        for n in range(2):
            self.assertEqual(self.post(cells.encode_cell(cid, layer.wrap(b'{"type":"list"}', FORWARD)))[0], 200)
        relayed = len(self.tracker.received)
        status, answer = self.post(cells.encode_cell(cid, layer.wrap(b'{"type":"list"}', FORWARD)))
        self.assertEqual((status, answer["error"]), (409, "conflict"))
        self.assertIn("nonce budget", answer["detail"])
        self.assertEqual(len(self.tracker.received), relayed)
        self.assertEqual(len(self.table.by_in[cid].nonces), 3)

    def test_bridge_ends_past_max_bridges_are_429(self):
        self.node(max_bridges=2)
        _, _, out_cid = self.exit_circuit()
        peer = f"{SHARER_EXIT_IP}:{PORT}"
        self.assertEqual(self.control({"type": "make_bridge", "CID": out_cid, "transfer": "t1", "to": peer,
                                       "bridge_CID": new_cid()})[0], 200)
        self.assertEqual(self.control({"type": "receive_bridge", "CID": out_cid, "from": peer,
                                       "bridge_CID": new_cid()})[0], 200)
        for payload in ({"type": "make_bridge", "CID": out_cid, "transfer": "t2", "to": peer, "bridge_CID": new_cid()},
                        {"type": "receive_bridge", "CID": out_cid, "from": peer, "bridge_CID": new_cid()}):
            status, answer = self.control(payload)
            self.assertEqual((status, answer["error"]), (429, "rate_limited"))
        self.assertEqual(self.table.bridge_count, 2)

    def test_create_buckets_past_their_table_refuse_newcomers(self):
        self.node(limiter=lambda clock: RateLimiter(clock, rate=1.0, burst=1, max_keys=3))
        limiter = self.relay.limiter
        for i in range(3):
            self.assertEqual(self.create(ip=f"127.0.1.{i}")[0], 200)
        status, answer, _, _ = self.create(ip="127.0.1.9")  # every bucket is empty: the table does not grow
        self.assertEqual((status, answer["error"]), (429, "rate_limited"))
        self.assertEqual(len(limiter), 3)
        self.clock.advance(1)  # the buckets refilled: forgotten to make room
        self.assertEqual(self.create(ip="127.0.1.9")[0], 200)
        self.assertLessEqual(len(limiter), 3)

    def test_remembered_controls_past_1024_keep_only_those_within_the_skew_window(self):
        # The replay guard remembers every control message for the skew window (each could be
        # replayed until then). Once it holds more than 1 024, those issued outside the window
        # go, and only those: the ones within it are still refused as replays.
        self.node()
        seen = self.relay._controls_seen
        skew = self.relay.control_max_skew
        sent = {"older": [], "newer": []}
        for batch, count in (("older", 600), ("newer", 500)):
            for _ in range(count):  # each a drop_bridge for no bridge: 404, and remembered
                body, headers = self.signed_control({"type": "drop_bridge", "bridge_CID": new_cid()})
                self.assertEqual(self.post(body, TRACKER_IP, headers)[0], 404)
                sent[batch].append((body, headers))
            self.clock.advance(skew / 2)
        self.assertEqual(len(seen), 1100)  # all within the window so far: none may be forgotten
        self.clock.advance(1)  # the older 600 are now outside the window, the newer 500 within
        self.assertEqual(self.control({"type": "drop_bridge", "bridge_CID": new_cid()})[0], 404)
        self.assertEqual(len(seen), 500 + 1)  # the newer ones and this one
        body, headers = sent["newer"][0]
        self.assertEqual(self.post(body, TRACKER_IP, headers)[0], 409)  # still remembered: a replay
        body, headers = sent["older"][0]
        self.assertEqual(self.post(body, TRACKER_IP, headers)[0], 403)  # forgotten, and stale anyway
        self.assertEqual(len(seen), 501)


# --- the tracker -----------------------------------------------------------------------------


class TrackerBoundsTests(unittest.TestCase):
    def test_transfers_counted_per_source_circuit_stop_at_max_transfers(self):
        h = TrackerHarness(idle_timeout=10_000.0)
        sharer, requester = new_cid(), new_cid()
        for ip, cid, files in ((NODE_IPS[1], sharer, [{"name": "f", "size": 10, "sha256": SHA_A}]),
                               (NODE_IPS[0], requester, [])):
            fired(defer.ensureDeferred(h.ls(ip, cid, files)))
        source = h.catalogue.circuits[(NODE_IPS[1], sharer)]
        for n in range(tracker_transfers.MAX_TRANSFERS + 50):
            h.clock.advance(0.01)
            reply = fired(defer.ensureDeferred(h.send(NODE_IPS[0], requester, {"type": "request", "file": "f"})))
            self.assertEqual(reply["type"], "transfer")
            h.outbound.posts.clear()
        self.assertEqual(len(source.transfers), tracker_transfers.MAX_TRANSFERS)
        self.assertIn(reply["transfer"], source.transfers)  # the newest is counted, the oldest made room
        self.assertEqual(h.catalogue.transfers_under_way(), tracker_transfers.MAX_TRANSFERS)
        h.clock.advance(61)
        self.assertEqual(h.catalogue.transfers_under_way(), 0)  # and they end with their estimate


# --- the peer --------------------------------------------------------------------------------


class PeerBoundsCase(unittest.TestCase):
    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="bounds-peer-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.world = PeerWorld(os.path.join(self.root, "w"))
        self.addCleanup(self.world.close)
        self.peer = self.world.peer

    def backward(self, message: dict):
        """A backward cell from the entry node carrying ``message``; (status, answer)."""
        body = wire.dumps({"CID": self.world.circuit.cid, "payload": b64(self.world.backward(wire.dumps(message)))})
        with LoggedErrors() as errors:
            response = exchange(self.world.site, ENTRY_IP, post_json(body, host=PEER_HOST), server=PEER_SERVER)
        self.assertEqual(errors.events, [], errors.text())
        return response.status, orjson.loads(response.body)

    def api_download(self, name):
        body = wire.dumps({"file": name})
        with LoggedErrors() as errors:
            response = exchange(self.world.site, USER_IP, post_json(body, path=b"/api/downloads", host=PEER_HOST),
                                server=PEER_SERVER)
        self.assertEqual(errors.events, [], errors.text())
        return response.status, orjson.loads(response.body)


class PeerBoundsTests(PeerBoundsCase):
    def test_a_chunk_announcing_a_huge_file_is_dropped_before_any_map_is_made(self):
        d = self.world.named  # announced by name only: its first chunk would set its size
        for size, chunk_size in ((2 ** 40, 1), (2 ** 53, 16384), ((transfers.MAX_CHUNKS + 1) * 16384, 16384)):
            chunk = {"type": "file_chunk", "transfer": "T-named.bin", "file": "named.bin", "chunk_idx": 0,
                     "chunk_size": chunk_size, "size": size, "data": b64(b"x")}
            self.assertEqual(self.backward(chunk), (200, {}))
            self.assertIsNone(d.chunks)
        self.assertRaises(BadChunk, d.write_chunk, dict(chunk, size=2 ** 40, chunk_size=1), 0)
        # The largest map allowed is made (and costs a byte a chunk).
        chunk = dict(chunk, size=transfers.MAX_CHUNKS * 16384, data=b64(b"x" * 16384))
        self.assertEqual(self.backward(chunk), (200, {}))
        self.assertEqual(d.chunks.count, transfers.MAX_CHUNKS)
        self.assertEqual(d.chunks.have, 1)

    def test_a_transfer_of_more_than_max_chunks_fails_the_download_with_a_reason(self):
        d = Download(self.peer.store, "huge.bin", None, CHUNK)
        self.assertRaises(ValueError, d.expect, (transfers.MAX_CHUNKS + 1) * CHUNK, CHUNK, None)
        self.assertIsNone(d.chunks)
        self.patch(self.world.outbound, "post", _answering({"type": "transfer", "transfer": "T-huge", "file": "huge",
                                                            "size": 2 ** 53, "sha256": None, "chunk_size": CHUNK},
                                                           self.world))
        d = self.peer.download("huge.bin")
        self.assertEqual(d.state, FAILED)
        self.assertIn("more than", d.error)
        self.assertIsNone(d.chunks)

    def test_a_chunk_of_another_size_is_dropped_and_the_partial_data_kept(self):
        d = self.world.wanted
        good = {"type": "file_chunk", "transfer": "T-wanted.bin", "file": "wanted.bin", "chunk_idx": 1,
                "chunk_size": CHUNK, "size": d.size, "data": b64(os.urandom(CHUNK))}
        self.assertEqual(self.backward(good), (200, {}))
        self.assertEqual(d.chunks.have, 1)
        size = d.size
        for other in (size + 1, 5 * CHUNK, 1):
            lie = dict(good, size=other, chunk_idx=0, data=b64(os.urandom(min(other, CHUNK))))
            self.assertEqual(self.backward(lie), (200, {}))
            self.assertEqual((d.size, d.chunks.size, d.chunks.have), (size, size, 1))
        self.assertTrue(d.part_path.exists())

    def test_transfer_ids_seen_before_the_reply_are_bounded(self):
        t = self.world.named.transfers[0]
        t.transfer = None  # as before the tracker's reply: chunks of any transfer are taken by name
        for n in range(100):
            self.backward({"type": "file_chunk", "transfer": f"t{n}", "file": "named.bin", "chunk_idx": "x"})
        self.assertEqual(len(t.seen), SEEN_TRANSFERS)

    def test_early_transfer_ends_are_bounded(self):
        for n in range(1100):
            self.assertEqual(self.backward({"type": "transfer_end", "transfer": f"t{n}", "status": "ok"}), (200, {}))
        self.assertEqual(len(self.peer._orphan_ends), 1000)

    def test_backward_cells_past_the_nonce_budget_are_409(self):
        used = len(self.world.circuit._nonces[0])  # the replies to the downloads' requests
        self.patch(circuit_module, "MAX_NONCES", used + 3)
        for n in range(3):
            self.assertEqual(self.backward({"type": "ping", "n": n}), (200, {}))
        status, answer = self.backward({"type": "ping", "n": 3})
        self.assertEqual((status, answer["error"]), (409, "conflict"))
        self.assertEqual([len(s) for s in self.world.circuit._nonces], [used + 3] * 3)

    def test_uploads_past_max_uploads_are_answered_busy(self):
        held = []  # the network never acknowledges a chunk: both uploads stay under way
        self.patch(self.world.outbound, "post", lambda address, body, *a, **kw: held.append(body) or defer.Deferred())
        for n in range(3):
            self.assertEqual(self.backward({"type": "request", "file": "a.txt", "transfer": f"u{n}",
                                            "chunk_size": CHUNK}), (200, {}))
        self.assertEqual(sorted(self.peer.uploads), ["u0", "u1"])  # max_uploads = 2
        sent = [orjson.loads(self.world.peel_forward(body)) for body in held]
        [refusal] = [m for m in sent if m.get("transfer") == "u2"]
        self.assertEqual((refusal["type"], refusal["status"]), ("transfer_end", "error"))
        self.assertIn("busy", refusal["detail"])

    def test_downloads_past_max_downloads_make_room_or_are_429(self):
        self.patch(downloader_module, "MAX_DOWNLOADS", 3)  # wanted.bin and named.bin are under way
        self.assertEqual(self.api_download("third.bin")[0], 202)
        status, answer = self.api_download("fourth.bin")
        self.assertEqual((status, answer["error"]), (429, "rate_limited"))
        self.assertEqual(sorted(self.peer.downloads), ["named.bin", "third.bin", "wanted.bin"])
        self.peer.downloads["named.bin"].fail("it ended")  # one ends: the oldest ended makes room
        self.assertEqual(self.api_download("fourth.bin")[0], 202)
        self.assertEqual(sorted(self.peer.downloads), ["fourth.bin", "third.bin", "wanted.bin"])


class LongNameTests(unittest.TestCase):
    """A name may have 255 bytes; its partial files (NAME.part, NAME.json.tmp) would not fit."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="long-names-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.store = DownloadStore(os.path.join(self.root, "downloads"))

    def test_the_longest_names_download_resume_and_land_under_their_name(self):
        for name in ("a" * 251 + ".bin", "é" * 127, "x" * 246, "y" * 247):
            data = os.urandom(CHUNK + 10)
            d = Download(self.store, name, hashlib.sha256(data).hexdigest(), CHUNK)
            d.expect(len(data), CHUNK, None)
            d.write_chunk({"chunk_idx": 0, "chunk_size": CHUNK, "size": len(data), "data": b64(data[:CHUNK])}, 0)
            d.save_record()
            d.close()
            [record] = [r for r in self.store.resumable() if r["file"] == name]
            again = self.store.restore(record, CHUNK)
            self.assertEqual(again.chunks.have, 1)
            again.write_chunk({"chunk_idx": 1, "chunk_size": CHUNK, "size": len(data), "data": b64(data[CHUNK:])}, 0)
            self.assertTrue(fired(again.finish(_synchronous)))
            with open(os.path.join(self.store.downloads_dir, name), "rb") as f:
                self.assertEqual(f.read(), data)
        self.assertEqual(self.store.resumable(), [])


def _synchronous(f, *args):
    return defer.maybeDeferred(f, *args)


def _answering(reply: dict, world):
    def post(address, body, headers=None, path="/"):
        return defer.succeed(wire.dumps({"payload": b64(world.backward(wire.dumps(reply)))}))
    return post
