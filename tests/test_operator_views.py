"""The operator's views of a node and of the tracker, in memory (issue 12).

* A node's status page and ``/metrics`` count the cells and bytes crossing
  it; read once a second they follow a transfer hop by hop, so they answer
  only ``metrics_allow`` (default loopback): 403 to anyone else. What the
  network needs from a node (cells, ``/identity``, ``/nodes``) still
  answers anyone. The tracker's page and ``/metrics`` follow the same rule.
* The tracker counts the messages it refuses, by reason, in ``/metrics``.
* The tracker's page says its "transfers under way" is an estimate, and what
  it counts; and how many transfers it bridged, which it knows.

Each request goes through the member's real Klein app and ``QuietSite``
from a chosen client address (``tests/support/memory_http.py``).
"""

from __future__ import annotations

import orjson
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted.net.http_server import QuietSite
from onion_twisted.node.app import NodeApp
from onion_twisted.tracker.app import TrackerApp
from tests.support.deferreds import inline
from tests.support.memory_http import memory_client
from .test_node_app import NodeAppCase, PEER_IP, onion_cell
from tests.support.tracker_fakes import NODE_IPS, PORT, SHA_A, TRACKER_IP, TrackerHarness, cell, new_cid

OUTSIDE_IP = "192.0.2.7"     # not loopback: a stranger on the network
OPERATOR_IP = "127.0.0.1"


class NodeViewsTests(NodeAppCase):
    def use_allow(self, metrics_allow) -> None:
        self.app = NodeApp(self.relay, self.directory, metrics_allow=metrics_allow)
        self.site = QuietSite(self.app.resource(), max_body=65536, reactor=MemoryReactorClock())
        self._clients = {}

    def assertForbidden(self, answer) -> None:
        self.assertEqual(answer.code, 403)
        self.assertEqual(answer.json["error"], "forbidden")
        self.assertIn("metrics_allow", answer.json["detail"])
        self.assertNotIn(b"onion_node_bytes_total", answer.raw)

    def test_page_and_metrics_answer_loopback_by_default(self):
        for ip in (OPERATOR_IP, PEER_IP):  # PEER_IP is 127.0.0.101: loopback too
            self.assertEqual(self.get("/metrics", ip=ip).code, 200)
            self.assertEqual(self.get("/", ip=ip).code, 200)

    def test_page_and_metrics_are_refused_to_a_stranger(self):
        self.assertForbidden(self.get("/metrics", ip=OUTSIDE_IP))
        self.assertForbidden(self.get("/", ip=OUTSIDE_IP))

    def test_what_the_network_needs_still_answers_a_stranger(self):
        self.assertEqual(self.get("/identity", ip=OUTSIDE_IP).code, 200)
        self.assertEqual(self.get("/nodes", ip=OUTSIDE_IP).code, 200)
        cid, layers, _ = self.extend_to_next()
        self.assertEqual(self.post(onion_cell(cid, layers, b'{"type":"ping"}')).code, 200)

    def test_metrics_allow_is_the_operators_choice(self):
        self.use_allow(["192.0.2.0/24"])
        self.assertEqual(self.get("/metrics", ip=OUTSIDE_IP).code, 200)
        self.assertEqual(self.get("/", ip=OUTSIDE_IP).code, 200)
        self.assertForbidden(self.get("/metrics", ip=OPERATOR_IP))
        self.use_allow([])
        self.assertForbidden(self.get("/metrics", ip=OPERATOR_IP))

    def test_a_bad_entry_is_refused_when_the_app_is_made(self):
        e = self.assertRaises(ValueError, NodeApp, self.relay, self.directory, metrics_allow=["10.0.0.0/33"])
        self.assertIn("metrics_allow", str(e))


class TrackerViewsTests(unittest.TestCase):
    def setUp(self):
        self.h = TrackerHarness()
        self.use_allow(("127.0.0.0/8", "::1"))

    def use_allow(self, metrics_allow) -> None:
        self.site = QuietSite(TrackerApp(self.h.tracker, metrics_allow=metrics_allow).resource(),
                              reactor=MemoryReactorClock())

    async def fetch(self, method, path, client_ip=OPERATOR_IP, data=None):
        client = memory_client(self.site, client_ip)
        kwargs = {} if data is None else {"data": data}
        response = await client.request(method, f"http://{TRACKER_IP}:{PORT}{path}", **kwargs)
        return response.code, await client.content(response)

    async def metrics(self) -> dict:
        code, body = await self.fetch("GET", "/metrics")
        self.assertEqual(code, 200)
        samples = {}
        for line in body.decode("utf-8").splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    @inline
    async def test_page_and_metrics_are_refused_to_a_stranger(self):
        for path in ("/", "/metrics"):
            code, body = await self.fetch("GET", path, client_ip=OUTSIDE_IP)
            self.assertEqual(code, 403, path)
            self.assertEqual(orjson.loads(body)["error"], "forbidden")
            code, _ = await self.fetch("GET", path)
            self.assertEqual(code, 200, path)
        for path in ("/identity", "/nodes"):
            code, _ = await self.fetch("GET", path, client_ip=OUTSIDE_IP)
            self.assertEqual(code, 200, path)
        self.use_allow(["0.0.0.0/0"])
        code, _ = await self.fetch("GET", "/metrics", client_ip=OUTSIDE_IP)
        self.assertEqual(code, 200)

    @inline
    async def test_refused_requests_are_counted_by_reason(self):
        requester, sharer, lonely = new_cid(), new_cid(), new_cid()
        await self.h.ls(NODE_IPS[0], requester, [])
        await self.h.ls(NODE_IPS[1], sharer, [{"name": "f", "size": 10, "sha256": SHA_A}])
        await self.h.ls(NODE_IPS[2], lonely, ["only-mine"])
        answers = [
            await self.h.send(NODE_IPS[0], requester, {"type": "request", "file": "nobody-has-it"}),
            await self.h.send(NODE_IPS[0], requester, {"type": "request", "file": "nobody-either"}),
            await self.h.send(NODE_IPS[2], lonely, {"type": "request", "file": "only-mine"}),
            await self.h.send(NODE_IPS[0], requester, {"type": "request", "file": "a/b"}),
            await self.h.send(NODE_IPS[0], requester, {"type": "file_chunk"}),
            await self.h.send(NODE_IPS[0], requester, {"type": "request", "file": "f"}),
        ]
        self.assertEqual([a.get("error") for a in answers],
                         ["not_found", "not_found", "no_source", "bad_request", "no_bridge", None])
        samples = await self.metrics()
        expected = {"not_found": 2, "no_source": 1, "bad_request": 1, "no_bridge": 1, "busy": 0,
                    "source_failed": 0, "too_many_files": 0, "other": 0}
        for reason, count in expected.items():
            self.assertEqual(samples[f'onion_tracker_refused_total{{reason="{reason}"}}'], count, reason)
        self.assertEqual(samples['onion_tracker_requests_total{outcome="bridged"}'], 1)

    @inline
    async def test_busy_is_counted(self):
        self.h = TrackerHarness(max_pending=1)
        self.use_allow(("127.0.0.0/8",))
        requester, sharer = new_cid(), new_cid()
        await self.h.ls(NODE_IPS[0], requester, [])
        await self.h.ls(NODE_IPS[1], sharer, ["f"])
        self.h.outbound.holding = True
        held = self.h.handle(NODE_IPS[0], cell(requester, {"type": "request", "file": "f"}))
        self.assertEqual((await self.h.send(NODE_IPS[0], requester, {"type": "request", "file": "f"}))["error"],
                         "busy")
        self.assertEqual((await self.metrics())['onion_tracker_refused_total{reason="busy"}'], 1)
        self.h.outbound.holding = False
        self.h.outbound.posts[0].deferred.callback(b"{}")
        self.successResultOf(held)

    @inline
    async def test_the_page_says_transfers_under_way_is_an_estimate(self):
        requester, sharer = new_cid(), new_cid()
        await self.h.ls(NODE_IPS[0], requester, [])
        await self.h.ls(NODE_IPS[1], sharer, [{"name": "f", "size": 10, "sha256": SHA_A}])
        self.assertEqual((await self.h.send(NODE_IPS[0], requester, {"type": "request", "file": "f"}))["type"],
                         "transfer")
        code, body = await self.fetch("GET", "/")
        self.assertEqual(code, 200)
        page = " ".join(body.decode("utf-8").split())
        self.assertIn("1 transfers bridged since start", page)
        self.assertIn("About 1 transfers under way: an estimate.", page)
        self.assertIn("never sees a transfer end", page)
        self.assertNotIn(" 1 transfers under way ·", page)  # the old, unqualified claim
        # The estimate runs out (60 s plus 10 bytes at 1 MiB/s); what was bridged stays bridged.
        self.h.clock.advance(61)
        code, body = await self.fetch("GET", "/")
        page = " ".join(body.decode("utf-8").split())
        self.assertIn("About 0 transfers under way", page)
        self.assertIn("1 transfers bridged since start", page)
