"""The source check (docs/protocol.md 17.10, choice 64; ``protocol/checks.py``), in memory.

A requester asks the tracker, through its sealed hop, whether the circuit
serving one of its transfers still reaches the sharer; the tracker sends a
sealed ``check`` down that circuit and answers ``reachable``, ``gone`` (the
message failed, and the circuit is forgotten) or ``unknown``. The tracker's
side runs on ``TrackerHarness`` (its posts go to ``TrackerOutbound``), the
requester's on ``Transfer.wait_for_end`` with a ``task.Clock`` and
``Attempt._check`` with a keeper that records what it sends.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from onion_twisted.peer.attempt import SOURCE_GONE, Attempt
from onion_twisted.peer.download_state import DONE, FAILED
from onion_twisted.peer.transfer import CHECK_AFTER, FIRST_SILENCE, MIN_SILENCE, Transfer
from onion_twisted.protocol import cells, checks
from onion_twisted.protocol.errors import NextHopFailed, NextHopTimeout
from onion_twisted.tracker.source_checks import MAX_RECENT, SourceChecks

from tests.support.deferreds import inline
from tests.support.peer_network import ALICE_IP, BOB_IP
from tests.support.peer_network_v2 import V2Network
from tests.support.sealed_client import SealedClient
from tests.support.tracker_fakes import NODE_ADDRESSES, NODE_IPS, SHA_A, TrackerHarness, new_cid

REQUESTER_IP, SHARER_IP = NODE_IPS[0], NODE_IPS[1]
SHARER_EXIT = NODE_ADDRESSES[1]
FILES = [{"name": "a.bin", "size": 1000, "sha256": SHA_A}]
STALL = 60.0


class TrackerCheckTests(unittest.TestCase):
    """What the tracker answers a check, and what it sends the source."""

    def setUp(self):
        self.h = TrackerHarness()
        self.sharer = SealedClient(self.h, SHARER_IP)
        self.requester = SealedClient(self.h, REQUESTER_IP)

    async def transfer(self) -> str:
        """A transfer from the sealed sharer to the sealed requester; its id."""
        await self.sharer.handshake()
        await self.requester.handshake()
        await self.sharer.send({"type": "ls", "files": FILES})
        await self.requester.send({"type": "ls", "files": []})
        reply = await self.requester.send({"type": "request", "file": "a.bin"})
        self.assertEqual(reply["type"], "transfer", reply)
        return reply["transfer"]

    async def check(self, transfer: str) -> str:
        reply = await self.requester.send(checks.check_message(transfer))
        state = checks.checked_state(reply, transfer)
        self.assertIsNotNone(state, reply)
        return state

    def counted(self) -> dict:
        return dict(self.h.tracker.metrics.checks)

    @inline
    async def test_a_live_source_is_sent_a_sealed_check_and_answered_reachable(self):
        transfer = await self.transfer()
        posts = len(self.h.outbound.posts)
        self.assertEqual(await self.check(transfer), checks.REACHABLE)
        (probe,) = self.h.outbound.posts[posts:]
        self.assertEqual((probe.address, probe.kind), (SHARER_EXIT, "sealed"))
        sent = cells.parse_cell(probe.body)
        self.assertEqual(sent.cid, self.sharer.cid)
        self.assertEqual(orjson.loads(self.sharer.open_layer(cells.payload_bytes(sent))),
                         {"type": "check", "transfer": transfer})
        self.assertIn(self.sharer.key, self.h.catalogue.circuits)
        self.assertEqual(self.counted(), {"reachable": 1})

    @inline
    async def test_a_source_the_check_cannot_reach_is_gone_and_forgotten(self):
        transfer = await self.transfer()
        self.h.outbound.failures["sealed"] = NextHopFailed("next hop answered 502 next_hop_failed")
        self.assertEqual(await self.check(transfer), checks.GONE)
        self.assertNotIn(self.sharer.key, self.h.catalogue.circuits)
        self.assertNotIn(self.sharer.key, self.h.tracker.sealed)
        # Not offered again: the requester's next ask finds nobody.
        again = await self.requester.send({"type": "request", "file": "a.bin"})
        self.assertEqual(again["error"], "not_found")
        # And a check after that is answered without a message.
        posts = len(self.h.outbound.posts)
        self.assertEqual(await self.check(transfer), checks.GONE)
        self.assertEqual(len(self.h.outbound.posts), posts)

    @inline
    async def test_a_check_that_times_out_is_unknown_and_keeps_the_source(self):
        transfer = await self.transfer()
        self.h.outbound.failures["sealed"] = NextHopTimeout("next hop did not answer in time")
        self.assertEqual(await self.check(transfer), checks.UNKNOWN)
        self.assertIn(self.sharer.key, self.h.catalogue.circuits)

    @inline
    async def test_a_destroyed_source_is_gone_without_a_message(self):
        transfer = await self.transfer()
        await self.sharer.destroy()
        posts = len(self.h.outbound.posts)
        self.assertEqual(await self.check(transfer), checks.GONE)
        self.assertEqual(len(self.h.outbound.posts), posts)

    @inline
    async def test_an_unknown_transfer_or_an_unsealed_source_is_unknown_and_sent_nothing(self):
        await self.requester.handshake()
        await self.requester.send({"type": "ls", "files": []})
        self.assertEqual(await self.check("no-such-transfer"), checks.UNKNOWN)
        unsealed = new_cid()
        await self.h.ls(SHARER_IP, unsealed, FILES)
        reply = await self.requester.send({"type": "request", "file": "a.bin"})
        posts = len(self.h.outbound.posts)
        self.assertEqual(await self.check(reply["transfer"]), checks.UNKNOWN)
        self.assertEqual(len(self.h.outbound.posts), posts)
        self.assertEqual(self.counted(), {"unknown": 2})

    @inline
    async def test_a_check_naming_no_transfer_is_bad_request_and_changes_nothing(self):
        await self.transfer()
        before = self.h.snapshot()
        for bad in ({"type": "check"}, {"type": "check", "transfer": 7}, {"type": "check", "transfer": "x" * 129}):
            reply = await self.requester.send(bad)
            self.assertEqual((reply["type"], reply["error"]), ("error", "bad_request"), bad)
        self.assertEqual(self.h.snapshot(), before)
        self.assertEqual(self.counted(), {})

    @inline
    async def test_checks_of_one_source_share_its_message_and_a_fresh_answer(self):
        transfer = await self.transfer()
        self.h.outbound.holding = True
        posts = len(self.h.outbound.posts)
        first = defer.ensureDeferred(self.check(transfer))
        second = defer.ensureDeferred(self.check(transfer))
        (probe,) = self.h.outbound.posts[posts:]
        self.assertNoResult(first)
        probe.deferred.callback(b"{}")
        self.assertEqual([self.successResultOf(first), self.successResultOf(second)], [checks.REACHABLE] * 2)
        self.h.outbound.holding = False
        self.assertEqual(await self.check(transfer), checks.REACHABLE)  # within a second: the same answer
        self.assertEqual(len(self.h.outbound.posts), posts + 1)
        self.h.clock.advance(1.5)
        self.assertEqual(await self.check(transfer), checks.REACHABLE)
        self.assertEqual(len(self.h.outbound.posts), posts + 2)


class SourceChecksTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.checks = SourceChecks(self.clock)

    def test_a_failing_probe_fails_every_check_waiting_and_is_not_remembered(self):
        running = defer.Deferred()
        calls = []

        async def probe():
            calls.append(1)
            return await running
        a, b = self.checks.check("k", probe), self.checks.check("k", probe)
        self.assertEqual((len(calls), len(self.checks)), (1, 1))
        running.errback(RuntimeError("boom"))
        self.failureResultOf(a, RuntimeError)
        self.failureResultOf(b, RuntimeError)
        self.assertEqual(len(self.checks), 0)

        async def fine():
            calls.append(2)
            return checks.REACHABLE
        self.assertEqual(self.successResultOf(self.checks.check("k", fine)), checks.REACHABLE)
        self.assertEqual(calls, [1, 2])

    def test_answers_remembered_are_bounded(self):
        async def fine():
            return checks.REACHABLE
        for i in range(MAX_RECENT + 10):
            self.successResultOf(self.checks.check(i, fine))
        self.assertEqual(len(self.checks._recent), MAX_RECENT)
        self.assertNotIn(0, self.checks._recent)


class WaitChecksTests(unittest.SynchronousTestCase):
    """When a silent transfer asks for a check, and what a ``gone`` or ``reachable`` does."""

    def setUp(self):
        self.clock = task.Clock()
        self.t = Transfer(None)
        self.asked: list[float] = []
        self.new_circuit = False
        self.waiting = defer.ensureDeferred(self.t.wait_for_end(
            self.clock, STALL, probe=lambda: None, replaced=lambda: self.new_circuit,
            check=lambda: self.asked.append(self.clock.seconds())))

    def test_a_silence_is_checked_after_a_few_seconds_then_at_every_doubling(self):
        self.t.cipher = object()  # its sharer answered: half the stall timeout (30 s) before it is given up
        for count, at in enumerate((CHECK_AFTER, 2 * CHECK_AFTER, 4 * CHECK_AFTER, 8 * CHECK_AFTER)):
            self.clock.advance(at - 0.01 - self.clock.seconds())
            self.assertEqual(len(self.asked), count, f"checked again before {at} s")
            self.clock.advance(0.02)
            self.assertEqual(len(self.asked), count + 1, f"not checked at {at} s")
        self.assertNoResult(self.waiting)

    def test_a_chunk_starts_the_checks_again_after_two_of_its_gaps(self):
        self.t.heard(self.clock.seconds())
        self.clock.advance(4.0)
        self.t.heard(self.clock.seconds())  # a mean gap of 4 s: the first check after 8 s
        del self.asked[:]
        self.clock.advance(8.0 - 0.01)
        self.assertEqual(self.asked, [])
        self.clock.advance(0.02)
        self.assertEqual(len(self.asked), 1)
        self.assertNoResult(self.waiting)

    def test_a_gone_ends_the_wait_at_once(self):
        self.clock.advance(CHECK_AFTER)
        self.assertEqual(len(self.asked), 1)
        self.t.end("its source's circuit is gone (the tracker's check)", source_failed=True)
        self.assertEqual(self.successResultOf(self.waiting), "its source's circuit is gone (the tracker's check)")
        self.assertTrue(self.t.source_failed)

    def test_a_source_reached_in_this_silence_is_not_given_up_for_a_new_circuit(self):
        for _ in range(10):
            self.clock.advance(0.5)
            self.t.heard(self.clock.seconds())  # chunks 0.5 s apart: the hint at MIN_SILENCE, the stall at 10 s
        self.assertEqual((self.t.recheck_after(), self.t.silence_limit(STALL)), (MIN_SILENCE, 10.0))
        self.new_circuit = True
        self.clock.advance(CHECK_AFTER)
        self.t.reached_at = self.clock.seconds()
        self.clock.advance(MIN_SILENCE - CHECK_AFTER + 0.5)
        self.assertNoResult(self.waiting)
        self.t.heard(self.clock.seconds())  # a new silence, no check reached it yet: the hint counts
        self.clock.advance(MIN_SILENCE + 0.01)
        self.assertIn("a new circuit shares the file", self.successResultOf(self.waiting))


class _Circuit:
    sealed = True


class _Keeper:
    def __init__(self):
        self.sent: list[tuple] = []

    def owns(self, circuit) -> bool:
        return True

    def send_on(self, circuit, message):
        d = defer.Deferred()
        self.sent.append((circuit, message, d))
        return d


class _Downloader:
    def __init__(self, keeper: _Keeper):
        self.clock = task.Clock()
        self.source_checks = True
        self.keeper = keeper
        self.circuits = self  # the peer's pool: the keeper of a circuit

    def owner(self, circuit):
        return self.keeper if self.keeper.owns(circuit) else None


class _Download:
    name, sha256, root = "a.bin", None, None


class AttemptCheckTests(unittest.SynchronousTestCase):
    """``Attempt._check``: what it sends, and what it does with the answer."""

    def setUp(self):
        self.keeper = _Keeper()
        self.downloader = _Downloader(self.keeper)
        self.attempt = Attempt(self.downloader, _Download(), self.keeper, circuit=None, sources=1)
        self.t = Transfer(None)
        self.t.circuit, self.t.transfer = _Circuit(), "t-1"

    def answer(self, reply) -> None:
        (_, message, d), = self.keeper.sent[-1:]
        d.callback(reply)

    def test_gone_gives_the_source_up(self):
        self.attempt._check(self.t)
        self.attempt._check(self.t)  # one at a time
        ((circuit, message, _),) = self.keeper.sent
        self.assertIs(circuit, self.t.circuit)
        self.assertEqual(message, {"type": "check", "transfer": "t-1"})
        self.answer(checks.checked_message("t-1", checks.GONE))
        self.assertEqual(self.t.outcome, "its source's circuit is gone (the tracker's check)")
        self.assertTrue(self.t.source_failed)

    def test_reachable_is_remembered_and_an_answer_for_another_transfer_changes_nothing(self):
        self.downloader.clock.advance(7)
        self.attempt._check(self.t)
        self.answer(checks.checked_message("t-2", checks.GONE))
        self.assertIsNone(self.t.outcome)
        self.attempt._check(self.t)
        self.answer(checks.checked_message("t-1", checks.REACHABLE))
        self.assertEqual((self.t.outcome, self.t.reached_at), (None, 7))

    def test_a_tracker_that_does_not_know_checks_is_not_asked_again(self):
        self.attempt._check(self.t)
        self.answer({"type": "error", "error": "bad_request", "detail": "unknown message type"})
        self.assertFalse(self.downloader.source_checks)
        self.attempt._check(self.t)
        self.assertEqual(len(self.keeper.sent), 1)
        self.assertIsNone(self.t.outcome)

    def test_nothing_is_sent_before_the_transfer_id_or_on_an_unsealed_circuit(self):
        self.t.transfer = None
        self.attempt._check(self.t)
        self.t.transfer, self.t.circuit.sealed = "t-1", False
        self.attempt._check(self.t)
        self.assertEqual(self.keeper.sent, [])

    def test_a_failed_check_is_left_to_the_keeper(self):
        self.attempt._check(self.t)
        self.keeper.sent[0][2].errback(NextHopFailed("next hop refused the connection"))
        self.assertIsNone(self.t.outcome)
        self.assertFalse(self.t.checking)


class CheckInNetworkTests(unittest.TestCase):
    """The check across the in-memory /2 network (``peer_network_v2``: sealed circuits, real
    relays and tracker): a sole sharer dies right after the tracker's request reached him."""

    def setUp(self):
        self.net = V2Network(self.mktemp())

    def tearDown(self):
        self.revive()  # a failed assertion may leave bob dead: his stop would wait for ever
        for peer in list(self.net.peers.values()):
            if not peer._stopped:
                self.net.run(peer.stop())
        self.net.pump()

    def revive(self) -> None:
        bob = self.net.peers[BOB_IP]
        self.net.down.discard(BOB_IP)
        if "post" in vars(bob.outbound):
            del bob.outbound.post
        if "serve" in vars(bob.uploader):
            del bob.uploader.serve

    @inline
    async def test_a_sole_sharer_whose_circuit_died_is_given_up_at_the_check_and_waited_for(self):
        net = self.net
        data = os.urandom(3 * 256 * 1024)
        net.write_share(BOB_IP, "solo.bin", data)
        await net.start()
        alice, bob = net.alice, net.peers[BOB_IP]
        alice.announcer.take_catalogue(await net.run(alice.send({"type": "list"})))
        died = []

        def die(circuit, message):
            # Bob is gone as if killed the moment the request reached him: nothing he sends
            # arrives, and his entry's connections to him are refused.
            died.append(net.clock.seconds())
            net.down.add(BOB_IP)
            bob.outbound.post = lambda *args, **kwargs: defer.Deferred()
        bob.uploader.serve = die
        outcomes = []

        def given_up(event):
            if event.get("log_namespace", "").endswith("Downloader") and "why" in event:
                outcomes.append(event["why"])
        globalLogPublisher.addObserver(given_up)
        self.addCleanup(globalLogPublisher.removeObserver, given_up)
        d = alice.download("solo.bin")
        net.pump(until=lambda: SOURCE_GONE in outcomes or d.state == FAILED)
        self.assertEqual(outcomes, [SOURCE_GONE], d.error)
        self.assertLess(net.clock.seconds() - died[0], FIRST_SILENCE, "the first silence was waited out")
        self.assertEqual(dict(net.tracker.metrics.checks), {"gone": 1})
        # Bob is back 30 s later, on a new circuit: alice waited for him (choice 65).
        net.pump(until=lambda: d.state == FAILED or net.clock.seconds() - died[0] >= 30)
        self.assertNotEqual(d.state, FAILED, d.error)
        self.revive()
        bob.circuit_broken(bob.circuit, "test: a node of it died")
        net.pump(until=lambda: d.state in (DONE, FAILED))
        self.assertEqual(d.state, DONE, d.error)
        with open(os.path.join(net.downloads_dir(ALICE_IP), "solo.bin"), "rb") as f:
            self.assertTrue(f.read() == data)
