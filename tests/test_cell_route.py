"""http_server.CellRoute: POST / straight to the cell handler, the rest to the other resource."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from onion_twisted.net.http_server import CellRoute, respond


class Other(resource.Resource):
    isLeaf = True

    def render(self, request):
        return b"other"


def request(method: bytes, path: bytes) -> DummyRequest:
    r = DummyRequest(path.lstrip(b"/").split(b"/") if path != b"/" else [b""])
    r.method = method
    r.path = path
    r._disconnected = False
    return r


class CellRouteTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.calls = []
        self.cancelled = []
        self.answer = defer.Deferred(canceller=lambda d: self.cancelled.append(True))

        def post_cell(req):
            self.calls.append(req)
            return self.answer

        self.route = CellRoute(Other(), post_cell)

    def test_post_root_goes_to_the_cell_handler(self):
        r = request(b"POST", b"/")
        self.assertEqual(self.route.render(r), server.NOT_DONE_YET)
        self.assertEqual(self.calls, [r])
        self.answer.callback(b"{}")
        self.assertEqual(b"".join(r.written), b"{}")
        self.assertEqual(r.finished, 1)

    def test_other_methods_and_paths_go_to_the_other_resource(self):
        for method, path in ((b"GET", b"/"), (b"POST", b"/nodes"), (b"PUT", b"/"), (b"POST", b"/api/downloads")):
            with self.subTest(method=method, path=path):
                self.assertEqual(self.route.render(request(method, path)), b"other")
        self.assertEqual(self.calls, [])

    def test_a_client_that_goes_away_cancels_the_answer(self):
        r = request(b"POST", b"/")
        self.route.render(r)
        for d in r._finishedDeferreds:  # what a lost connection fires
            d.errback(ConnectionError("gone"))
        r._finishedDeferreds = []
        self.assertEqual(self.cancelled, [True])
        self.assertEqual(r.written, [])
        self.assertEqual(self.flushLoggedErrors(), [])  # a cancel is not an error

    def test_an_unexpected_failure_is_a_json_500_and_logged(self):
        r = request(b"POST", b"/")
        self.route.render(r)
        self.answer.errback(RuntimeError("bug"))
        self.assertEqual(r.responseCode, 500)
        self.assertIn(b'"error":"internal"', b"".join(r.written))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RespondCancelTests(unittest.SynchronousTestCase):
    def test_a_cancelled_answer_is_neither_logged_nor_written(self):
        # A node's queued cell whose previous hop went away: the handler's answer is
        # cancelled; that is no internal error (the soak logged it as one).
        waiting = defer.Deferred()

        async def handler():
            return await waiting

        route = CellRoute(Other(), lambda req: respond(req, handler()))
        r = request(b"POST", b"/")
        route.render(r)
        for d in r._finishedDeferreds:
            d.errback(ConnectionError("gone"))
        r._finishedDeferreds = []
        self.assertEqual(r.written, [])
        self.assertEqual(self.flushLoggedErrors(), [])
