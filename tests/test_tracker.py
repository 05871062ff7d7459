"""The tracker in memory (PROTOCOL.md §3, §6, §7, §8, §9).

``Tracker`` talks to nodes only through ``TrackerOutbound``, which records every
POST with its address, body and headers; time is a ``task.Clock`` and the
catalogue's randomness a seeded ``random.Random``. The last tests go through
the Klein app over a real ``QuietSite`` with the in-memory HTTP client of
``tests/support/memory_http.py`` (chosen client IP, no sockets).
"""

from __future__ import annotations

import base64
import hashlib
import os

import orjson
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted import PROTOCOL
from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.protocol.control import verify_control
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.protocol.errors import (BadRequest, Conflict, Forbidden, NextHopFailed, NextHopTimeout, RateLimited,
                                  UnknownCircuit)
from onion_twisted.net.http_server import QuietSite
from onion_twisted.tracker.app import TrackerApp, render_network

from tests.support.deferreds import inline
from tests.support.fake_tracker import FakeTracker
from tests.support.memory_http import memory_client
from tests.support.tracker_fakes import (NODE_ADDRESSES, NODE_IPS, NODE_KEYS, NOW, OTHER_TRACKER_KEY, PORT, SHA_A,
                                         SHA_B, STRANGER_IP, STRANGER_KEY, TRACKER_IP, TRACKER_KEY, TrackerHarness,
                                         cell, dumps, identity_body, new_cid, pem)

REQUESTER_IP, SHARER_IP, OTHER_IP = NODE_IPS[0], NODE_IPS[1], NODE_IPS[2]
REQUESTER_EXIT, SHARER_EXIT = NODE_ADDRESSES[0], NODE_ADDRESSES[1]
SIZE = 1000
STEPS = (control.RECEIVE_BRIDGE, control.MAKE_BRIDGE, "request")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def verify(harness, post, body=None):
    """A control cell checked exactly as a node checks it (relay → control.verify_control)."""
    body = post.body if body is None else body
    return verify_control(body, post.signature, cells.parse_cell(body).payload, TRACKER_KEY.public_key(),
                          harness.clock.seconds(), 60.0, PORT)


def flip_one_byte(body: bytes) -> bytes:
    """The body with one hex digit of its bridge_CID changed: still valid JSON."""
    i = body.index(b'"bridge_CID":"') + len(b'"bridge_CID":"')
    flipped = b"0" if body[i:i + 1] != b"0" else b"1"
    return body[:i] + flipped + body[i + 1:]


class TrackerCase(unittest.TestCase):
    def setUp(self):
        self.h = TrackerHarness()
        self.outbound = self.h.outbound
        self.requester = new_cid()
        self.sharer = new_cid()

    async def share(self, exit_ip=SHARER_IP, cid=None, files=None):
        cid = cid or self.sharer
        files = files if files is not None else [{"name": "f", "size": SIZE, "sha256": SHA_A}]
        reply = await self.h.ls(exit_ip, cid, files)
        self.assertEqual(reply["type"], "files")
        return reply

    async def ask(self, exit_ip=REQUESTER_IP, cid=None, **fields):
        message = {"type": "request", "file": "f", **fields}
        return await self.h.send(exit_ip, cid or self.requester, message)

    async def setup_pair(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        await self.share()

    def assertError(self, reply, error):
        self.assertEqual(reply["type"], "error", reply)
        self.assertEqual(reply["error"], error, reply)
        self.assertIsInstance(reply["detail"], str)


class BridgeSequenceTests(TrackerCase):
    @inline
    async def test_steps_in_order_then_the_transfer_reply(self):
        await self.setup_pair()
        reply = await self.ask(chunk_size=65536, chunks=[[2, 5], [7, 8]])
        receive, make, ask = self.outbound.posts
        self.assertEqual(self.outbound.kinds(), [control.RECEIVE_BRIDGE, control.MAKE_BRIDGE, "request"])
        self.assertEqual((receive.address, make.address, ask.address), (REQUESTER_EXIT, SHARER_EXIT, SHARER_EXIT))

        bridge_cid = receive.payload["bridge_CID"]
        self.assertTrue(wire.is_circuit_id(bridge_cid))
        self.assertNotIn(bridge_cid, (self.requester, self.sharer))
        self.assertEqual(receive.payload, {"type": "receive_bridge", "CID": self.requester, "bridge_CID": bridge_cid,
                                           "from": str(SHARER_EXIT), "issued": NOW})
        transfer = reply["transfer"]
        self.assertEqual(make.payload, {"type": "make_bridge", "CID": self.sharer, "transfer": transfer,
                                        "to": str(REQUESTER_EXIT), "bridge_CID": bridge_cid, "issued": NOW})
        self.assertEqual(ask.cell.cid, self.sharer)
        self.assertFalse(ask.is_control)
        self.assertEqual(ask.payload, {"type": "request", "file": "f", "transfer": transfer, "chunk_size": 65536,
                                       "chunks": [[2, 5], [7, 8]], "sha256": SHA_A})
        self.assertEqual(reply, {"type": "transfer", "transfer": transfer, "file": "f", "size": SIZE,
                                 "sha256": SHA_A, "chunk_size": 65536})
        self.assertEqual(self.h.catalogue.transfers_under_way(), 1)
        self.assertEqual(self.h.tracker.metrics.requests["bridged"], 1)

    @inline
    async def test_each_step_awaited_before_the_next(self):
        await self.setup_pair()
        self.outbound.holding = True
        d = self.h.handle(REQUESTER_IP, cell(self.requester, {"type": "request", "file": "f"}))
        for step, kind in enumerate(STEPS):
            self.assertEqual(self.outbound.kinds(), list(STEPS[:step + 1]))
            self.assertNoResult(d)
            self.outbound.posts[-1].deferred.callback(b"{}")
        reply = orjson.loads(self.successResultOf(d))["payload"]
        self.assertEqual(reply["type"], "transfer")
        self.assertEqual(len(self.outbound.posts), 3)

    @inline
    async def test_default_chunk_size_and_no_chunks(self):
        await self.setup_pair()
        reply = await self.ask()
        ask = self.outbound.posts[2]
        self.assertNotIn("chunks", ask.payload)
        self.assertEqual(ask.payload["chunk_size"], 262144)
        self.assertEqual(reply["chunk_size"], 262144)

    @inline
    async def test_each_failing_step_cleans_up(self):
        for failing, kind in enumerate(STEPS):
            for error in (NextHopFailed("next hop refused the connection"),
                          NextHopTimeout("next hop did not answer in time")):
                self.setUp()
                await self.setup_pair()
                self.outbound.failures[kind] = error
                reply = await self.ask()
                self.assertError(reply, "source_failed")
                sent = self.outbound.posts
                self.assertEqual([p.kind for p in sent[:failing + 1]], list(STEPS[:failing + 1]))
                drops = sent[failing + 1:]
                # Only drop_bridge after the failed step, one for each piece already made.
                self.assertTrue(all(p.kind == control.DROP_BRIDGE for p in drops), [p.kind for p in drops])
                made = {0: set(), 1: {REQUESTER_EXIT}, 2: {REQUESTER_EXIT, SHARER_EXIT}}[failing]
                self.assertEqual({p.address for p in drops}, made)
                self.assertEqual(len(drops), len(made))
                bridge_cid = sent[0].payload["bridge_CID"]
                for drop in drops:
                    message = verify(self.h, drop)
                    self.assertEqual((message.type, message.bridge_cid), (control.DROP_BRIDGE, bridge_cid))
                self.assertEqual(self.h.catalogue.transfers_under_way(), 0)
                self.assertEqual(self.h.tracker.metrics.requests["failed"], 1)
                self.assertEqual(self.h.tracker.pending, 0)
                # A source whose exit failed its step is not offered again; a requester's
                # exit that failed leaves the source listed.
                sharers = [k for k in self.h.catalogue.circuits if k[0] == SHARER_EXIT.ip]
                self.assertEqual(len(sharers), 0 if failing else 1, (failing, kind))

    @inline
    async def test_same_exit_for_both_circuits(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        await self.share(exit_ip=REQUESTER_IP)
        reply = await self.ask()
        self.assertEqual(reply["type"], "transfer")
        receive, make, ask = self.outbound.posts
        self.assertEqual({receive.address, make.address, ask.address}, {REQUESTER_EXIT})
        self.assertEqual(receive.payload["from"], str(REQUESTER_EXIT))
        self.assertEqual(make.payload["to"], str(REQUESTER_EXIT))

    @inline
    async def test_same_exit_failure_sends_one_drop_bridge(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        await self.share(exit_ip=REQUESTER_IP)
        self.outbound.failures["request"] = NextHopFailed("next hop answered 404 unknown_circuit")
        self.assertError(await self.ask(), "source_failed")
        self.assertEqual(self.outbound.kinds(), [*STEPS, control.DROP_BRIDGE])
        self.assertEqual(self.outbound.posts[3].address, REQUESTER_EXIT)  # that node drops both ends (§7)

    @inline
    async def test_failed_drop_bridge_is_harmless(self):
        await self.setup_pair()
        self.outbound.failures["request"] = NextHopFailed("down")
        self.outbound.failures[control.DROP_BRIDGE] = NextHopTimeout("slow")
        self.assertError(await self.ask(), "source_failed")
        self.assertEqual(self.outbound.kinds(), [*STEPS, control.DROP_BRIDGE, control.DROP_BRIDGE])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @inline
    async def test_many_requests_do_not_block_each_other(self):
        await self.setup_pair()
        other = new_cid()
        await self.h.ls(OTHER_IP, other, [])
        self.outbound.holding = True
        first = self.h.handle(REQUESTER_IP, cell(self.requester, {"type": "request", "file": "f"}))
        self.assertEqual(len(self.outbound.posts), 1)
        held = self.outbound.posts[0]
        self.outbound.holding = False
        second = await self.ask(exit_ip=OTHER_IP, cid=other)
        self.assertEqual(second["type"], "transfer")
        self.assertNoResult(first)
        self.assertEqual(self.outbound.kinds(), [control.RECEIVE_BRIDGE, *STEPS])
        self.assertEqual(self.h.tracker.pending, 1)
        held.deferred.callback(b"{}")
        reply = orjson.loads(self.successResultOf(first))["payload"]
        self.assertEqual(reply["type"], "transfer")
        self.assertNotEqual(reply["transfer"], second["transfer"])
        self.assertEqual(self.h.tracker.pending, 0)

    @inline
    async def test_requests_set_up_at_the_same_time_go_to_different_sources(self):
        # A download asking several sources at once: each request counts as a transfer
        # under way from the moment its source is chosen, before its bridge is made.
        # Eight fresh trackers: without that count, each pair would part by chance, one in two.
        for _ in range(8):
            self.setUp()
            await self.h.ls(REQUESTER_IP, self.requester, [])
            await self.share(exit_ip=SHARER_IP)
            await self.share(exit_ip=OTHER_IP, cid=new_cid())
            self.outbound.holding = True
            asked = [self.h.handle(REQUESTER_IP, cell(self.requester, {"type": "request", "file": "f"}))
                     for _ in range(2)]
            self.assertEqual(self.outbound.kinds(), [control.RECEIVE_BRIDGE] * 2)
            self.assertEqual({p.payload["from"] for p in self.outbound.posts},
                             {str(wire.Address(SHARER_IP, PORT)), str(wire.Address(OTHER_IP, PORT))})
            self.outbound.holding = False
            for post in list(self.outbound.posts):
                post.deferred.callback(b"{}")
            for d in asked:
                self.assertEqual(orjson.loads(self.successResultOf(d))["payload"]["type"], "transfer")

    @inline
    async def test_a_block_counts_as_under_way_for_its_own_size_not_the_files(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        await self.share(files=[{"name": "big", "size": 600 << 20, "sha256": SHA_A}])
        whole = await self.ask(file="big", chunk_size=1 << 20)
        block = await self.ask(file="big", chunk_size=1 << 20, chunks=[[0, 16]])
        until = {t: self.h.catalogue.transfers._under_way[t][1] for t in (whole["transfer"], block["transfer"])}
        now = self.h.clock.seconds()
        # 60 s plus the bytes at 1 MiB/s: 600 MiB (capped at the idle timeout) against 16 MiB.
        self.assertEqual(until[block["transfer"]] - now, 60.0 + 16)
        self.assertGreater(until[whole["transfer"]] - now, 60.0 + 16)

    @inline
    async def test_busy_when_max_pending_requests(self):
        self.h = TrackerHarness(max_pending=1)
        self.outbound = self.h.outbound
        await self.setup_pair()
        other = new_cid()
        await self.h.ls(OTHER_IP, other, [])
        self.outbound.holding = True
        first = self.h.handle(REQUESTER_IP, cell(self.requester, {"type": "request", "file": "f"}))
        self.assertError(await self.ask(exit_ip=OTHER_IP, cid=other), "busy")
        self.assertEqual(len(self.outbound.posts), 1)
        self.outbound.holding = False
        self.outbound.posts[0].deferred.callback(b"{}")
        self.successResultOf(first)
        self.assertEqual((await self.ask(exit_ip=OTHER_IP, cid=other))["type"], "transfer")

    @inline
    async def test_fewest_transfers_under_way_chooses_the_source(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        second = new_cid()
        await self.share(exit_ip=SHARER_IP)
        await self.share(exit_ip=OTHER_IP, cid=second)
        sources = []
        for _ in range(4):
            await self.ask()
            sources.append(self.outbound.posts[-1].cell.cid)
        self.assertEqual(sorted(sources), sorted([self.sharer, second] * 2))


ROOT = "d" * 64
KEY = bytes(range(1, 33))  # a requester's X25519 public key (§13)


class RootAndExcludeTests(TrackerCase):
    """§13 on /1 (object) circuits: roots and exclusions work; nothing is end to end."""

    ROOT_FILE = {"name": "f", "size": SIZE, "sha256": SHA_A, "root": ROOT}

    @inline
    async def test_a_root_entry_is_listed_and_asked_for_by_root(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        reply = await self.share(files=[self.ROOT_FILE])
        self.assertEqual(reply["files"], [{"name": "f", "size": SIZE, "sha256": SHA_A, "sources": 1, "root": ROOT}])
        await self.share(exit_ip=OTHER_IP, cid=new_cid(), files=[{"name": "f", "size": SIZE, "sha256": SHA_A}])
        reply = await self.ask(root=ROOT, key=b64(KEY), chunk_size=262144)
        self.assertEqual((reply["type"], reply["root"]), ("transfer", ROOT), reply)
        self.assertNotIn("e2e", reply)  # the requester's circuit is not sealed
        ask = self.outbound.posts[-1]
        self.assertEqual((ask.cell.cid, ask.payload["root"]), (self.sharer, ROOT))
        self.assertNotIn("key", ask.payload)
        self.assertError(await self.ask(root="e" * 64), "not_found")

    @inline
    async def test_excluded_sources_are_not_asked_again(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        await self.share(files=[self.ROOT_FILE])
        second = new_cid()
        await self.share(exit_ip=OTHER_IP, cid=second, files=[self.ROOT_FILE])
        first = await self.ask(root=ROOT)
        other_source = second if self.outbound.posts[-1].cell.cid == self.sharer else self.sharer
        for _ in range(3):  # the other source every time, however busy it gets
            other = await self.ask(root=ROOT, exclude=[first["transfer"]])
            self.assertEqual(self.outbound.posts[-1].cell.cid, other_source)
        before = len(self.outbound.posts)
        reply = await self.ask(root=ROOT, exclude=[first["transfer"], other["transfer"]])
        self.assertError(reply, "no_source")
        self.assertEqual(reply["detail"], "every other source of that file was excluded")
        self.assertEqual(len(self.outbound.posts), before)  # no bridge was made

    @inline
    async def test_bad_e2e_fields_are_bad_requests(self):
        await self.setup_pair()
        for fields in ({"key": b64(KEY), "chunk_size": 65536}, {"key": b64(KEY[:31])}, {"root": ROOT.upper()},
                       {"exclude": [f"t{i}" for i in range(65)]}, {"exclude": "t1"}):
            before = self.h.snapshot()
            self.assertError(await self.ask(**fields), "bad_request")
            self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(self.outbound.posts, [])


class SwarmTests(TrackerCase):
    """Issue 16 at the tracker: more sources for one download, fair ranking, quotas per exit."""

    FOURTH_IP = NODE_IPS[3]

    @inline
    async def test_avoid_gives_each_request_another_source_until_there_is_none(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        sharers = {self.sharer: SHARER_IP, new_cid(): OTHER_IP, new_cid(): self.FOURTH_IP}
        for cid, exit_ip in sharers.items():
            await self.share(exit_ip=exit_ip, cid=cid)
        serving, asked = [], []
        for _ in range(3):
            reply = await self.ask(avoid=serving)
            self.assertEqual(reply["type"], "transfer", reply)
            serving.append(reply["transfer"])
            asked.append(self.outbound.posts[-1].cell.cid)
            self.assertNotIn("avoid", self.outbound.posts[-1].payload)  # none of the sharer's business
        self.assertEqual(sorted(asked), sorted(sharers))  # three requests, three sources
        before = (len(self.outbound.posts), self.h.catalogue.transfers_under_way())
        reply = await self.ask(avoid=serving)
        self.assertError(reply, "no_source")
        self.assertEqual(reply["detail"], "every other source of that file is already serving this download")
        self.assertEqual((len(self.outbound.posts), self.h.catalogue.transfers_under_way()), before)
        reply = await self.ask(avoid=serving[1:], exclude=serving[:1])
        self.assertEqual(reply["detail"], "every other source of that file is already serving this download")
        reply = await self.ask(exclude=serving)
        self.assertEqual(reply["detail"], "every other source of that file was excluded")
        self.assertError(await self.ask(avoid=[f"t{i}" for i in range(65)]), "bad_request")

    @inline
    async def test_a_sharer_with_many_circuits_through_one_exit_does_not_win_the_name(self):
        await self.h.ls(REQUESTER_IP, self.requester, [])
        for _ in range(8):
            await self.share(exit_ip=SHARER_IP, cid=new_cid(), files=[{"name": "f", "size": 1, "sha256": SHA_B}])
        honest = {new_cid(): OTHER_IP, new_cid(): self.FOURTH_IP}
        for cid, exit_ip in honest.items():
            await self.share(exit_ip=exit_ip, cid=cid)
        for _ in range(6):
            reply = await self.ask()
            self.assertEqual(reply["sha256"], SHA_A)
            self.assertIn(self.outbound.posts[-1].cell.cid, honest)
        # Load spreads over the honest sharers' exits: three transfers each.
        self.assertEqual({ip: self.h.catalogue.transfers.of_exit(ip) for ip in honest.values()},
                         {OTHER_IP: 3, self.FOURTH_IP: 3})

    @inline
    async def test_an_exit_past_its_quota_is_busy_and_nothing_changes(self):
        self.h = TrackerHarness(max_entries_per_exit=2)
        await self.share(files=["a", "b"])
        before = self.h.snapshot()
        reply = await self.h.ls(SHARER_IP, new_cid(), ["c"])
        self.assertError(reply, "busy")
        self.assertEqual(reply["detail"], "the circuits through this exit hold as many catalogue entries as one exit may")
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(len((await self.h.ls(OTHER_IP, new_cid(), ["c", "d"]))["files"]), 4)

    @inline
    async def test_a_full_catalogue_makes_room_for_an_exit_below_its_share(self):
        self.h = TrackerHarness(max_entries=4, max_entries_per_exit=4)
        await self.share(files=["a0", "a1", "a2", "a3"])
        reply = await self.h.ls(OTHER_IP, new_cid(), ["o0", "o1"])
        self.assertEqual([f["name"] for f in reply["files"]], ["a2", "a3", "o0", "o1"])
        self.assertEqual(self.h.catalogue.evicted, 2)
        self.assertIn("2 entries evicted since start", render_network(self.h.tracker))
        self.assertError(await self.h.ls(SHARER_IP, self.sharer, ["a0", "a1", "a2", "a3"]), "busy")


def row_order(row):
    return (row["name"], row["sha256"] or "", row.get("root") or "")


class FakeTrackerRowsTests(TrackerCase):
    """tests/support/fake_tracker.py answers ls as the real tracker does, root rows included."""

    @inline
    async def test_the_fake_trackers_rows_are_the_real_ones(self):
        data_dir = self.mktemp()
        os.makedirs(data_dir)
        fake = FakeTracker(MemoryReactorClock(), "127.0.0.1", PORT, data_dir, node_ttl=90.0, hop_timeout=10.0)
        for address in NODE_ADDRESSES:
            fake.nodes[address] = {"seen": 0}
        announced = (
            (SHARER_IP, [{"name": "f", "size": SIZE, "sha256": SHA_A, "root": ROOT},
                         {"name": "f", "size": SIZE, "sha256": SHA_A}, "g", "g"]),
            (OTHER_IP, [{"name": "f", "size": SIZE, "sha256": SHA_A, "root": ROOT}, {"name": "f", "sha256": SHA_B}]),
        )
        for exit_ip, files in announced:
            cid = new_cid()
            real = await self.h.ls(exit_ip, cid, files)
            faked = wire.loads(fake._cell(exit_ip, cell(cid, {"type": "ls", "files": files})))["payload"]
            self.assertEqual(sorted(faked["files"], key=row_order), real["files"])  # the fake keeps ls order
        self.assertEqual([r.get("root") for r in real["files"]], [None, ROOT, None, None])


class ControlSignatureTests(TrackerCase):
    @inline
    async def test_node_verifier_accepts_what_the_tracker_sends(self):
        await self.setup_pair()
        reply = await self.ask()
        receive, make, _ = self.outbound.posts
        message = verify(self.h, receive)
        self.assertEqual((message.type, message.cid, message.peer), (control.RECEIVE_BRIDGE, self.requester, SHARER_EXIT))
        message = verify(self.h, make)
        self.assertEqual((message.type, message.cid, message.peer, message.transfer),
                         (control.MAKE_BRIDGE, self.sharer, REQUESTER_EXIT, reply["transfer"]))

    @inline
    async def test_one_flipped_byte_is_forbidden(self):
        await self.setup_pair()
        await self.ask()
        for post in self.outbound.posts[:2]:
            tampered = flip_one_byte(post.body)
            self.assertEqual(len(tampered), len(post.body))
            self.assertNotEqual(tampered, post.body)
            self.assertRaises(Forbidden, verify, self.h, post, tampered)

    @inline
    async def test_other_key_or_stale_clock_is_forbidden(self):
        await self.setup_pair()
        await self.ask()
        receive = self.outbound.posts[0]
        self.assertRaises(Forbidden, verify_control, receive.body, receive.signature, receive.payload,
                          OTHER_TRACKER_KEY.public_key(), self.h.clock.seconds(), 60.0, PORT)
        self.h.clock.advance(61)
        self.assertRaises(Forbidden, verify, self.h, receive)

    @inline
    async def test_backward_request_cell_is_not_signed_as_control(self):
        await self.setup_pair()
        await self.ask()
        ask = self.outbound.posts[2]
        self.assertEqual(ask.cell.cid, self.sharer)
        self.assertIsNone(ask.signature)


class MessageTests(TrackerCase):
    @inline
    async def test_ls_and_list_answer_the_catalogue(self):
        reply = await self.share()
        self.assertEqual(reply, {"type": "files", "files": [
            {"name": "f", "size": SIZE, "sha256": SHA_A, "sources": 1}]})
        self.assertEqual(await self.h.send(REQUESTER_IP, self.requester, {"type": "list"}), reply)
        self.assertEqual(self.outbound.posts, [])

    @inline
    async def test_bad_ls_changes_nothing(self):
        await self.share()
        bad_lists = [["a/b"], [".."], ["."], ["a\x00b"], ["x" * 256], [{"name": "a", "sha256": "ABC"}],
                     [{"name": "a", "size": -1}], ["ok", 5], "not a list", None]
        for circuit in (self.sharer, self.requester):  # a known circuit, then a new one
            before = self.h.snapshot()
            for files in bad_lists:
                self.assertError(await self.h.ls(SHARER_IP, circuit, files), "bad_request")
                self.assertEqual(self.h.snapshot(), before, files)
            self.assertError(await self.h.ls(SHARER_IP, circuit, [f"f{i}" for i in range(10_001)]),
                             "too_many_files")
            self.assertEqual(self.h.snapshot(), before)
        self.assertNotIn((SHARER_IP, self.requester), self.h.catalogue.circuits)

    @inline
    async def test_bad_request_message(self):
        await self.setup_pair()
        newcomer = new_cid()
        for fields in ({"chunk_size": 16 * 1024 - 1}, {"chunk_size": 4 * 1024 * 1024 + 1}, {"chunk_size": "big"},
                       {"chunks": [[3, 3]]}, {"chunks": [[-1, 2]]}, {"chunks": [[5, 2]]}, {"chunks": "all"},
                       {"file": "../etc/passwd"}, {"file": None}, {"sha256": "nope"}):
            before = self.h.snapshot()
            self.assertError(await self.ask(**fields), "bad_request")
            self.assertError(await self.ask(cid=newcomer, **fields), "bad_request")
            self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(self.outbound.posts, [])
        reply = await self.ask(chunk_size=16 * 1024, chunks=[[0, 1]])
        self.assertEqual(reply["chunk_size"], 16 * 1024)

    @inline
    async def test_not_found_and_no_source(self):
        await self.setup_pair()
        self.assertError(await self.ask(file="missing"), "not_found")
        self.assertError(await self.ask(sha256=SHA_B), "not_found")
        self.assertError(await self.ask(exit_ip=SHARER_IP, cid=self.sharer), "no_source")
        self.assertEqual(self.outbound.posts, [])

    @inline
    async def test_file_chunk_reaching_the_tracker(self):
        await self.setup_pair()
        before = self.h.snapshot()
        chunk = {"type": "file_chunk", "transfer": "t", "file": "f", "chunk_idx": 0, "chunk_size": 16384,
                 "size": 3, "data": "YWJj"}
        self.assertError(await self.h.send(SHARER_IP, self.sharer, chunk), "no_bridge")
        self.assertError(await self.h.send(SHARER_IP, new_cid(), chunk), "no_bridge")
        end = {"type": "transfer_end", "transfer": "t", "status": "ok"}
        self.assertError(await self.h.send(SHARER_IP, self.sharer, end), "no_bridge")
        start = {"type": "transfer_start", "transfer": "t", "chunk_size": 262144, "key": b64(bytes(32)),
                 "leaves": "YWJj"}  # §13: bridged like a chunk, never the tracker's
        self.assertError(await self.h.send(SHARER_IP, self.sharer, start), "no_bridge")
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(self.outbound.posts, [])

    @inline
    async def test_unknown_type(self):
        await self.setup_pair()
        before = self.h.snapshot()
        for message in ({"type": "hello"}, {}, {"type": 5}, {"type": ["ls"]}):
            self.assertError(await self.h.send(SHARER_IP, new_cid(), message), "bad_request")
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(self.h.tracker.metrics.messages["other"], 4)

    @inline
    async def test_stranger_source_ip_is_forbidden(self):
        for body in (cell(new_cid(), {"type": "list"}), dumps({"CID": new_cid(), "destroy": True})):
            e = await self.assertFailure(self.h.handle(STRANGER_IP, body), Forbidden)
            self.assertEqual(e.status, 403)
        self.assertEqual(self.h.catalogue.circuits, {})
        self.assertEqual(self.h.tracker.metrics.errors[403], 2)

    @inline
    async def test_control_cid_is_a_bad_request(self):
        body = dumps({"CID": "control", "payload": {"type": "drop_bridge", "bridge_CID": new_cid()}})
        e = await self.assertFailure(self.h.handle(REQUESTER_IP, body), BadRequest)
        self.assertEqual(e.status, 400)

    @inline
    async def test_malformed_cells_are_bad_requests(self):
        for body in (b"not json", b"[]", dumps({"CID": "short", "payload": {}}), dumps({"CID": new_cid()}),
                     dumps({"CID": new_cid(), "payload": "YWJj"})):
            await self.assertFailure(self.h.handle(REQUESTER_IP, body), BadRequest)
        self.assertEqual(self.h.catalogue.circuits, {})

    @inline
    async def test_destroy_unknown_circuit(self):
        e = await self.assertFailure(self.h.handle(REQUESTER_IP, dumps({"CID": new_cid(), "destroy": True})),
                                     UnknownCircuit)
        self.assertEqual(e.status, 404)

    @inline
    async def test_destroy_forgets_the_circuits_files(self):
        await self.setup_pair()
        # The same CID from another exit is another circuit: not destroyed.
        await self.assertFailure(self.h.handle(OTHER_IP, dumps({"CID": self.sharer, "destroy": True})),
                                 UnknownCircuit)
        self.assertEqual(len(self.h.catalogue.listing()), 1)
        answer = await self.h.handle(SHARER_IP, dumps({"CID": self.sharer, "destroy": True}))
        self.assertEqual(answer, b"{}")
        self.assertNotIn((SHARER_IP, self.sharer), self.h.catalogue.circuits)
        self.assertEqual((await self.h.send(REQUESTER_IP, self.requester, {"type": "list"}))["files"], [])
        self.assertError(await self.ask(), "not_found")
        await self.assertFailure(self.h.handle(SHARER_IP, dumps({"CID": self.sharer, "destroy": True})),
                                 UnknownCircuit)


class BoundsTests(TrackerCase):
    @inline
    async def test_max_circuits(self):
        self.h = TrackerHarness(max_circuits=2)
        await self.setup_pair()
        before = self.h.snapshot()
        self.assertError(await self.h.ls(OTHER_IP, new_cid(), ["x"]), "busy")
        self.assertError(await self.h.send(OTHER_IP, new_cid(), {"type": "list"}), "busy")
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual((await self.ask())["type"], "transfer")  # known circuits still served

    @inline
    async def test_max_files(self):
        self.h = TrackerHarness(max_files=2)
        await self.share(files=["a"])
        before = self.h.snapshot()
        self.assertError(await self.h.ls(SHARER_IP, self.sharer, ["a", "b", "c"]), "too_many_files")
        self.assertError(await self.h.ls(OTHER_IP, new_cid(), ["a", "b", "c"]), "too_many_files")
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(len((await self.h.ls(SHARER_IP, self.sharer, ["a", "b"]))["files"]), 2)

    @inline
    async def test_max_catalogue_entries(self):
        self.h = TrackerHarness(max_entries=2, max_entries_per_exit=2)
        await self.share(files=["a", "b"])
        before = self.h.snapshot()
        self.assertError(await self.h.ls(SHARER_IP, self.sharer, ["a", "b", "c"]), "busy")
        self.assertError(await self.h.ls(SHARER_IP, new_cid(), ["c"]), "busy")  # the same exit: over its share
        self.assertEqual(self.h.snapshot(), before)
        reply = await self.h.ls(OTHER_IP, new_cid(), ["a"])  # no new entry: accepted
        self.assertEqual([(f["name"], f["sources"]) for f in reply["files"]], [("a", 2), ("b", 1)])


class ExpiryTests(TrackerCase):
    @inline
    async def test_silent_circuits_forgotten(self):
        self.h = TrackerHarness(idle_timeout=600.0, heartbeat=1000.0)
        await self.setup_pair()
        self.h.clock.advance(400)
        await self.h.send(REQUESTER_IP, self.requester, {"type": "list"})
        self.h.clock.advance(201)
        self.h.tracker.expire()
        self.assertEqual(set(self.h.catalogue.circuits), {(REQUESTER_IP, self.requester)})
        self.assertError(await self.ask(), "not_found")

    @inline
    async def test_nodes_unseen_three_heartbeats_dropped(self):
        self.h = TrackerHarness(heartbeat=30.0, idle_timeout=10_000.0)
        key = NODE_KEYS[0]
        self.h.outbound.pages[REQUESTER_EXIT] = (200, identity_body(key))
        registration = dumps({"address": str(REQUESTER_EXIT), "public_key": pem(key)})
        before, signature = self.h.registry.signed()
        for _ in range(4):
            self.h.clock.advance(30)
            await self.h.tracker.register_node(REQUESTER_IP, registration)
        self.h.tracker.expire()
        body, signature = self.h.registry.signed()
        self.assertNotEqual(body, before)
        directory = parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT)
        self.assertEqual(set(directory.nodes), {REQUESTER_EXIT})
        self.assertEqual(directory.issued, NOW + 120)
        self.assertEqual(len(self.h.outbound.gets), 0)  # listed from the start: key already checked
        await self.assertFailure(self.h.handle(SHARER_IP, cell(new_cid(), {"type": "list"})), Forbidden)
        self.assertEqual((await self.h.send(REQUESTER_IP, new_cid(), {"type": "list"}))["type"], "files")

    @inline
    async def test_circuits_through_a_node_that_left_the_directory_are_forgotten(self):
        self.h = TrackerHarness(heartbeat=30.0, idle_timeout=10_000.0)
        await self.setup_pair()
        other_sharer = new_cid()
        await self.share(exit_ip=OTHER_IP, cid=other_sharer, files=[{"name": "g", "size": SIZE, "sha256": SHA_B}])
        registrations = {ip: dumps({"address": str(address), "public_key": pem(key)})
                         for ip, address, key in zip(NODE_IPS, NODE_ADDRESSES, NODE_KEYS) if ip != SHARER_IP}
        for _ in range(4):  # every node but the sharer's exit keeps registering
            self.h.clock.advance(30)
            for ip, body in registrations.items():
                await self.h.tracker.register_node(ip, body)
        self.h.tracker.expire()
        self.assertEqual(set(self.h.catalogue.circuits), {(REQUESTER_IP, self.requester), (OTHER_IP, other_sharer)})
        self.assertError(await self.ask(), "not_found")  # its only source went with the exit
        self.assertEqual([f["name"] for f in (await self.h.send(REQUESTER_IP, self.requester,
                                                                {"type": "list"}))["files"]], ["g"])


class RegistrationTests(unittest.TestCase):
    def setUp(self):
        self.h = TrackerHarness(nodes=[])
        self.key = NODE_KEYS[0]
        self.address = NODE_ADDRESSES[0]
        self.body = dumps({"address": str(self.address), "public_key": pem(self.key)})

    def register(self, source_ip=None, body=None):
        return defer.ensureDeferred(self.h.tracker.register_node(source_ip or self.address.ip, body or self.body))

    def listed(self):
        body, signature = self.h.registry.signed()
        return parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT).nodes

    @inline
    async def test_accepted_and_listed(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        answer = orjson.loads(await self.register())
        self.assertEqual(answer, {"registered": True, "heartbeat": 30.0})
        self.assertEqual(self.h.outbound.gets, [(self.address, "/identity")])
        self.assertEqual(self.listed()[self.address].fingerprint, crypto.fingerprint(self.key))
        self.assertTrue(self.h.registry.is_node_ip(self.address.ip))

    @inline
    async def test_heartbeat_with_the_same_key_does_not_fetch_identity_again(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        await self.register()
        del self.h.outbound.pages[self.address]  # a fetch now would fail
        for _ in range(5):
            self.h.clock.advance(30)
            await self.register()
        self.h.tracker.expire()
        self.assertEqual(len(self.h.outbound.gets), 1)
        self.assertIn(self.address, self.listed())

    @inline
    async def test_heartbeat_with_a_new_key_fetches_identity_again(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        await self.register()
        other = NODE_KEYS[1]
        body = dumps({"address": str(self.address), "public_key": pem(other)})
        await self.assertFailure(self.register(body=body), Forbidden)  # /identity still shows the old key
        self.assertEqual(len(self.h.outbound.gets), 2)
        self.assertEqual(self.listed()[self.address].fingerprint, crypto.fingerprint(self.key))
        self.h.outbound.pages[self.address] = (200, identity_body(other))
        await self.register(body=body)
        self.assertEqual(self.listed()[self.address].fingerprint, crypto.fingerprint(other))

    @inline
    async def test_source_ip_differs_from_the_address_host(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        e = await self.assertFailure(self.register(source_ip=STRANGER_IP), Forbidden)
        self.assertEqual(e.status, 403)
        self.assertEqual((self.h.outbound.gets, self.listed()), ([], {}))

    @inline
    async def test_identity_shows_another_key(self):
        self.h.outbound.pages[self.address] = (200, identity_body(STRANGER_KEY))
        e = await self.assertFailure(self.register(), Forbidden)
        self.assertEqual(e.status, 403)
        self.assertEqual(self.listed(), {})

    @inline
    async def test_identity_shows_no_valid_key(self):
        for body in (b"{}", b"garbage", dumps({"public_key": "-----BEGIN nothing"})):
            self.h.outbound.pages[self.address] = (200, body)
            await self.assertFailure(self.register(), Forbidden)
        self.assertEqual(self.listed(), {})

    @inline
    async def test_identity_unreachable(self):
        e = await self.assertFailure(self.register(), NextHopFailed)
        self.assertEqual(e.status, 502)
        self.h.outbound.pages[self.address] = (404, b"{}")
        e = await self.assertFailure(self.register(), NextHopFailed)
        self.assertEqual(e.status, 502)
        self.h.outbound.pages[self.address] = NextHopTimeout("next hop did not answer in time")
        e = await self.assertFailure(self.register(), NextHopTimeout)
        self.assertEqual(e.status, 504)
        self.assertEqual(self.listed(), {})
        self.assertEqual(self.h.tracker.metrics.errors[502], 2)

    @inline
    async def test_malformed_registration(self):
        for body in (b"nope", dumps({"address": "a b", "public_key": pem(self.key)}),
                     dumps({"address": str(self.address), "public_key": "not a key"}),
                     dumps({"address": str(self.address)})):
            await self.assertFailure(self.register(body=body), BadRequest)
        self.assertEqual(self.h.outbound.gets, [])

    @inline
    async def test_directory_full(self):
        self.h.registry.max_nodes = 0
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        e = await self.assertFailure(self.register(), RateLimited)
        self.assertEqual(e.status, 429)

    @inline
    async def test_one_node_per_ip_on_the_network_port(self):
        # One host with many ports (or many names) must not fill the directory (§15).
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        await self.register()
        for port in (PORT + 1, PORT + 2):
            other = wire.Address(self.address.host, port)
            self.h.outbound.pages[other] = (200, identity_body(NODE_KEYS[1]))
            e = await self.assertFailure(
                self.register(body=dumps({"address": str(other), "public_key": pem(NODE_KEYS[1])})), Forbidden)
            self.assertIn("network's port", e.detail)
        self.assertEqual(list(self.listed()), [self.address])
        self.assertEqual(len(self.h.outbound.gets), 1)  # refused before any /identity fetch

    @inline
    async def test_a_second_node_at_the_same_ip_is_409_until_the_first_goes(self):
        names = {"relay-a.test": "127.0.0.21", "relay-b.test": "127.0.0.21"}

        async def resolve(address):
            return names[address.host]

        self.h = TrackerHarness(nodes=[], resolve=resolve)
        first, second = wire.Address("relay-a.test", PORT), wire.Address("relay-b.test", PORT)
        self.h.outbound.pages[first] = (200, identity_body(NODE_KEYS[0]))
        self.h.outbound.pages[second] = (200, identity_body(NODE_KEYS[1]))
        body_a = dumps({"address": "relay-a.test", "public_key": pem(NODE_KEYS[0])})
        body_b = dumps({"address": "relay-b.test", "public_key": pem(NODE_KEYS[1])})
        await self.h.tracker.register_node("127.0.0.21", body_a)
        e = await self.assertFailure(defer.ensureDeferred(self.h.tracker.register_node("127.0.0.21", body_b)),
                                     Conflict)
        self.assertEqual(e.status, 409)
        self.assertEqual(list(self.listed()), [first])
        self.h.clock.advance(3 * 30 + 1)  # the first goes unseen for three heartbeats
        self.h.tracker.expire()
        await self.h.tracker.register_node("127.0.0.21", body_b)
        self.assertEqual(list(self.listed()), [second])

    @inline
    async def test_dns_named_node_relays_from_its_resolved_ip(self):
        names = {"relay-a.test": "127.0.0.21"}

        async def resolve(address):
            return names[address.host]

        self.h = TrackerHarness(nodes=[], resolve=resolve)
        address = wire.Address("relay-a.test", PORT)
        self.h.outbound.pages[address] = (200, identity_body(self.key))
        body = dumps({"address": "relay-a.test", "public_key": pem(self.key)})
        await self.assertFailure(defer.ensureDeferred(self.h.tracker.register_node("127.0.0.22", body)), Forbidden)
        await self.h.tracker.register_node("127.0.0.21", body)
        self.assertIn(address, self.listed())
        reply = await self.h.send("127.0.0.21", new_cid(), {"type": "list"})
        self.assertEqual(reply["type"], "files")

    @inline
    async def test_dns_name_without_a_resolver(self):
        # wire.literal_ip, the node's and the tracker's one default resolver: 502, as
        # the member service's resolver answers for a name that does not resolve.
        body = dumps({"address": "relay-a.test", "public_key": pem(self.key)})
        await self.assertFailure(self.register(body=body), NextHopFailed)


class AppTests(unittest.TestCase):
    """The Klein app over a real QuietSite, reached in memory from a chosen client IP."""

    def setUp(self):
        self.h = TrackerHarness()
        self.site = QuietSite(TrackerApp(self.h.tracker).resource(), reactor=MemoryReactorClock())

    async def fetch(self, method, path, client_ip="127.0.0.200", data=None):
        client = memory_client(self.site, client_ip)
        kwargs = {} if data is None else {"data": data}
        response = await client.request(method, f"http://{TRACKER_IP}:{PORT}{path}", **kwargs)
        return response, await client.content(response)

    @inline
    async def test_identity(self):
        response, body = await self.fetch("GET", "/identity")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["application/json"])
        identity = orjson.loads(body)
        raw = base64.b64decode(identity["public_key"], validate=True)
        self.assertEqual(len(raw), 32)
        self.assertEqual(identity, {"role": "tracker", "address": f"{TRACKER_IP}:{PORT}",
                                    "public_key": crypto.tracker_public_b64(TRACKER_KEY),
                                    "fingerprint": hashlib.sha256(raw).hexdigest(), "protocol": PROTOCOL,
                                    "protocols": ["onion-http/1", "onion-http/2"],
                                    "onion_key": b64(self.h.tracker.onion_keys.current_public)})
        crypto.load_tracker_public_b64(identity["public_key"]).verify(
            base64.b64decode(crypto.sign_body(TRACKER_KEY, b"x")), b"x")

    @inline
    async def test_signed_nodes(self):
        response, body = await self.fetch("GET", "/nodes")
        self.assertEqual(response.code, 200)
        [signature] = response.headers.getRawHeaders("X-Onion-Signature")
        directory = parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT)
        self.assertEqual(set(directory.nodes), set(NODE_ADDRESSES))
        self.assertEqual(body, self.h.registry.signed()[0])
        self.assertRaises(Forbidden, parse_signed_directory, body, signature, OTHER_TRACKER_KEY.public_key(), PORT)

    @inline
    async def test_network_page_shows_no_cid_nor_exit_address(self):
        key = NODE_KEYS[0]
        self.h = TrackerHarness(nodes=[])
        self.site = QuietSite(TrackerApp(self.h.tracker).resource(), reactor=MemoryReactorClock())
        self.h.registry.register(wire.Address("relay-a.test", PORT), pem(key), crypto.fingerprint(key),
                                 "127.0.0.21")
        sharer, requester = new_cid(), new_cid()
        await self.h.ls("127.0.0.21", sharer, [{"name": "holiday.jpg", "size": 5, "sha256": SHA_A}, "<b>.txt"])
        await self.h.ls("127.0.0.21", requester, [])
        reply = await self.h.send("127.0.0.21", requester, {"type": "request", "file": "holiday.jpg"})
        bridge_cid = self.h.outbound.posts[0].payload["bridge_CID"]
        response, body = await self.fetch("GET", "/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("Content-Type"), ["text/html; charset=utf-8"])
        page = body.decode("utf-8")
        self.assertIn("relay-a.test:5000", page)
        self.assertIn("holiday.jpg", page)
        self.assertIn("&lt;b&gt;.txt", page)
        self.assertNotIn("<b>.txt", page)
        for secret in (sharer, requester, bridge_cid, reply["transfer"], "127.0.0.21"):
            self.assertNotIn(secret, page)

    @inline
    async def test_metrics(self):
        await self.h.ls(SHARER_IP, new_cid(), ["a", "b"])
        requester = new_cid()
        await self.h.ls(REQUESTER_IP, requester, [])
        await self.h.send(REQUESTER_IP, requester, {"type": "request", "file": "a"})
        response, body = await self.fetch("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain"))
        lines = body.decode("utf-8").splitlines()
        for line in (f"onion_tracker_nodes {len(NODE_ADDRESSES)}", "onion_tracker_circuits 2",
                     "onion_tracker_catalogue_entries 2", "onion_tracker_transfers 1",
                     'onion_tracker_messages_total{type="ls"} 2', 'onion_tracker_requests_total{outcome="bridged"} 1'):
            self.assertIn(line, lines)

    @inline
    async def test_post_cell_uses_the_connections_source_ip(self):
        body = cell(new_cid(), {"type": "ls", "files": ["a"]})
        response, answer = await self.fetch("POST", "/", client_ip=REQUESTER_IP, data=body)
        self.assertEqual(response.code, 200)
        self.assertEqual(orjson.loads(answer)["payload"]["files"][0]["name"], "a")
        response, answer = await self.fetch("POST", "/", client_ip=STRANGER_IP, data=cell(new_cid(), {"type": "list"}))
        self.assertEqual(response.code, 403)
        self.assertEqual(orjson.loads(answer)["error"], "forbidden")
        self.assertEqual(len(self.h.catalogue.circuits), 1)

    @inline
    async def test_post_errors_have_their_status(self):
        response, answer = await self.fetch("POST", "/", client_ip=REQUESTER_IP, data=b"{")
        self.assertEqual((response.code, orjson.loads(answer)["error"]), (400, "bad_request"))
        response, answer = await self.fetch("POST", "/", client_ip=REQUESTER_IP,
                                            data=dumps({"CID": new_cid(), "destroy": True}))
        self.assertEqual((response.code, orjson.loads(answer)["error"]), (404, "unknown_circuit"))

    @inline
    async def test_registration_through_the_app(self):
        h = TrackerHarness(nodes=[])
        self.site = QuietSite(TrackerApp(h.tracker).resource(), reactor=MemoryReactorClock())
        key, address = NODE_KEYS[2], NODE_ADDRESSES[2]
        h.outbound.pages[address] = (200, identity_body(key))
        body = dumps({"address": str(address), "public_key": pem(key)})
        response, answer = await self.fetch("POST", "/nodes", client_ip=STRANGER_IP, data=body)
        self.assertEqual((response.code, orjson.loads(answer)["error"]), (403, "forbidden"))
        response, answer = await self.fetch("POST", "/nodes", client_ip=address.ip, data=body)
        self.assertEqual(response.code, 200)
        self.assertTrue(orjson.loads(answer)["registered"])
        self.assertIn(address, h.registry.nodes)
