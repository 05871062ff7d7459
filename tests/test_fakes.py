"""The tests' fakes and the real classes provide the same seams (onion_twisted.protocol.interfaces).

``verifyObject`` checks that an object declares the interface and has every
method with a compatible signature and every attribute; run on the fake and
on the real class alike, a seam that changes on one side only fails here.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.exceptions import BrokenImplementation, BrokenMethodImplementation, DoesNotImplement
from zope.interface.verify import verifyObject

from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import Forbidden, NextHopFailed
from onion_twisted.protocol.interfaces import IDirectorySource, IOutbound
from tests.support.fakes import FakeDirectory, FakeOutbound, Sent, listing
from tests.support.in_memory import MemberOutbound
from tests.support.peer_network import NodeDirectory
from tests.support.processes import StatusOutbound
from tests.support.tracker_fakes import NODE_KEYS, TrackerHarness, TrackerOutbound, cell, new_cid

TRACKER = wire.Address("127.0.0.1", 5000)
NODE = wire.Address("127.0.0.11", 5000)


def result_of(d):
    results = []
    defer.ensureDeferred(d).addBoth(results.append)
    return results[0]


class InterfaceTests(unittest.TestCase):
    def test_the_fake_outbound_provides_IOutbound(self):
        self.assertTrue(verifyObject(IOutbound, FakeOutbound()))

    def test_a_member_outbound_of_an_in_memory_network_provides_IOutbound(self):
        self.assertTrue(verifyObject(IOutbound, MemberOutbound(network=None, ip="127.0.0.11")))

    def test_the_tracker_tests_outbound_provides_IOutbound(self):
        self.assertTrue(verifyObject(IOutbound, TrackerOutbound()))

    def test_the_real_outbound_provides_IOutbound(self):
        outbound = HTTPOutbound(MemoryReactorClock(), bind_ip="127.0.0.1")
        self.addCleanup(outbound.close)
        self.assertTrue(verifyObject(IOutbound, outbound))

    def test_the_status_outbound_of_the_process_tests_provides_IOutbound(self):
        outbound = HTTPOutbound(MemoryReactorClock(), bind_ip="127.0.0.1")
        self.addCleanup(outbound.close)
        self.assertTrue(verifyObject(IOutbound, StatusOutbound(outbound)))

    def test_the_fake_directory_provides_IDirectorySource(self):
        self.assertTrue(verifyObject(IDirectorySource, FakeDirectory()))

    def test_the_node_directory_of_the_peer_network_provides_IDirectorySource(self):
        self.assertTrue(verifyObject(IDirectorySource, NodeDirectory(TrackerHarness().tracker)))

    def test_the_real_directory_client_provides_IDirectorySource(self):
        client = DirectoryClient(task.Clock(), FakeOutbound(), TRACKER)
        self.assertTrue(verifyObject(IDirectorySource, client))


class VerifierCanFailTests(unittest.TestCase):
    """The checks above would catch a fake that drifted from its interface."""

    def test_an_object_that_does_not_declare_the_interface_fails(self):
        class Undeclared:
            def post(self, address, body, headers=None, path="/"): ...
            def get(self, address, path): ...
            def close(self): ...

        self.assertRaises(DoesNotImplement, verifyObject, IOutbound, Undeclared())

    def test_a_missing_method_fails(self):
        @implementer(IOutbound)
        class NoClose:
            def post(self, address, body, headers=None, path="/"): ...
            def get(self, address, path): ...

        self.assertRaises(BrokenImplementation, verifyObject, IOutbound, NoClose())

    def test_a_method_with_another_signature_fails(self):
        @implementer(IOutbound)
        class NoPath:
            def post(self, address, body): ...
            def get(self, address, path): ...
            def close(self): ...

        self.assertRaises(BrokenMethodImplementation, verifyObject, IOutbound, NoPath())

    def test_a_missing_attribute_fails(self):
        @implementer(IDirectorySource)
        class NoCurrent(FakeDirectory):
            def __init__(self):
                pass

        self.assertRaises(BrokenImplementation, verifyObject, IDirectorySource, NoCurrent())


class FakeOutboundTests(unittest.TestCase):
    def test_post_records_and_answers_from_the_route(self):
        outbound = FakeOutbound({NODE: lambda body: b"answer to " + body})
        self.assertEqual(result_of(outbound.post(NODE, b"x", {"H": "v"}, "/nodes")), b"answer to x")
        self.assertEqual(outbound.sent, [Sent(NODE, b"x", {"H": "v"}, "/nodes")])
        self.assertEqual(outbound.to(NODE), outbound.sent)
        self.assertEqual(outbound.to(TRACKER), [])

    def test_an_address_without_a_route_refuses(self):
        failure = result_of(FakeOutbound().post(NODE, b"x"))
        self.assertIsInstance(failure.value, NextHopFailed)
        self.assertIsNone(failure.value.answered)

    def test_a_route_refusal_arrives_as_HTTPOutbound_reports_a_non_200(self):
        def refuse(body):
            raise Forbidden("no")

        failure = result_of(FakeOutbound({NODE: refuse}).post(NODE, b"x"))
        self.assertIsInstance(failure.value, NextHopFailed)
        self.assertEqual(failure.value.answered, 403)
        failure = result_of(FakeOutbound({NODE: refuse}, as_http=False).post(NODE, b"x"))
        self.assertIsInstance(failure.value, Forbidden)

    def test_get_answers_pages_with_status_and_body(self):
        outbound = FakeOutbound(pages={NODE: (404, b"{}"), TRACKER: NextHopFailed("down")})
        self.assertEqual(result_of(outbound.get(NODE, "/identity")), (404, {}, b"{}"))
        self.assertIsInstance(result_of(outbound.get(TRACKER, "/identity")).value, NextHopFailed)
        self.assertEqual(outbound.gets, [(NODE, "/identity"), (TRACKER, "/identity")])

    def test_without_record_nothing_is_kept(self):
        outbound = FakeOutbound(default=lambda body: b"{}", record=False)
        result_of(outbound.post(NODE, b"x"))
        self.assertEqual(outbound.sent, [])


class FakeDirectoryTests(unittest.TestCase):
    def test_knows_the_listed_addresses_and_records_the_question(self):
        directory = FakeDirectory(listing([NODE]), key="k")
        self.assertEqual((result_of(directory.knows(NODE)), result_of(directory.knows(TRACKER))), (True, False))
        self.assertEqual(directory.asked, [NODE, TRACKER])
        self.assertEqual(result_of(directory.tracker_key()), "k")
        self.assertEqual(directory.current.node_ips, frozenset({"127.0.0.11"}))

    def test_without_a_directory_nothing_is_known_and_fetch_fails(self):
        directory = FakeDirectory()
        self.assertFalse(result_of(directory.knows(NODE)))
        self.assertIsInstance(result_of(directory.fetch_from(TRACKER)).value, NextHopFailed)
        self.assertFalse(directory.load("anywhere"))


class NodeDirectoryTests(unittest.TestCase):
    def test_knows_what_the_tracker_registry_lists_and_records_the_question(self):
        harness = TrackerHarness(nodes=[(NODE, NODE_KEYS[0])])
        directory = NodeDirectory(harness.tracker)
        self.assertEqual((result_of(directory.knows(NODE)), result_of(directory.knows(TRACKER))), (True, False))
        self.assertEqual(directory.asked, [NODE, TRACKER])
        self.assertIsNone(directory.current)  # so no CREATE is exempt from the rate limit


class TrackerOutboundTests(unittest.TestCase):
    def test_fails_a_kind_holds_or_answers_empty_and_gets_pages(self):
        outbound = TrackerOutbound()
        outbound.failures["ping"] = NextHopFailed("down")
        ping = cell(new_cid(), {"type": "ping"})
        pong = cell(new_cid(), {"type": "pong"})
        self.assertIsInstance(result_of(outbound.post(NODE, ping)).value, NextHopFailed)
        self.assertEqual(result_of(outbound.post(NODE, pong, {"H": "v"})), b"{}")
        outbound.holding = True
        held = outbound.post(NODE, pong)
        self.assertFalse(held.called)
        outbound.posts[-1].deferred.callback(b"late")
        self.assertEqual(result_of(held), b"late")
        self.assertEqual(outbound.kinds(), ["ping", "pong", "pong"])
        self.assertEqual(outbound.posts[1].headers, {"H": "v"})
        outbound.pages[NODE] = (200, b"{}")
        self.assertEqual(result_of(outbound.get(NODE, "/identity")), (200, {}, b"{}"))
        self.assertEqual(str(result_of(outbound.get(TRACKER, "/identity")).value), "next hop is unreachable")
