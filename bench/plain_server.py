"""The baseline of bench/relay.py: plain Twisted Web, no relay work.

    python bench/plain_server.py --listen 127.66.0.2 --port 5000
    python bench/plain_server.py --listen 127.66.0.3 --port 5000 --forward-to 127.66.0.2:5000

Without ``--forward-to`` it is the *answerer*: ``POST /`` reads the body
and answers ``{}``. With it, it is a *plain proxy*: ``POST /`` forwards the
body it read, unchanged, to the answerer with treq (a persistent connection
pool, sockets bound to ``--listen``, like a node), waits for the answer and
answers with its body. ``GET /`` answers ``ok`` (readiness probe).

Same body-in-memory treatment as a node (bodies are read into a BytesIO, not
spooled to a file) and no access log, so the only difference from a node is
the relay work itself: JSON, base64, AES-GCM, the relay table, Klein routing.
Runs until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import io
import sys

from twisted.internet import defer
from twisted.web import resource, server
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

JSON = b"application/json"


class InMemoryRequest(server.Request):
    def gotLength(self, length):
        self.content = io.BytesIO()


class QuietSite(server.Site):
    noisy = False

    def __init__(self, root):
        super().__init__(root)
        self.requestFactory = InMemoryRequest

    def log(self, request):
        pass


@implementer(IBodyProducer)
class BytesProducer:
    """A body already in memory, written in one go (as the node's http_client does)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class Answerer(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"ok"

    def render_POST(self, request):
        request.content.read()
        request.setHeader(b"Content-Type", JSON)
        return b"{}"


class Proxy(resource.Resource):
    isLeaf = True

    def __init__(self, reactor, listen: str, upstream: str):
        super().__init__()
        import treq
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = f"http://{upstream}/".encode("ascii")
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        pool.retryAutomatically = False

        class Bound:
            def endpointForURI(self, uri):
                return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port, timeout=30,
                                          bindAddress=(listen, 0))

        self.http = treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, Bound(), pool=pool))
        self.headers = {b"Content-Type": [JSON]}

    def render_GET(self, request):
        return b"ok"

    def render_POST(self, request):
        body = request.content.getvalue()
        d = self.http.request("POST", self.url, data=BytesProducer(body), headers=self.headers, unbuffered=True)

        def answered(response):
            return response.content().addCallback(lambda data: (response.code, data))

        def reply(result):
            code, data = result
            request.setResponseCode(200 if code == 200 else 502)
            request.setHeader(b"Content-Type", JSON)
            request.write(data if code == 200 else b'{"error":"next_hop_failed"}')
            request.finish()

        def failed(failure):
            if not request.finished and not request._disconnected:
                request.setResponseCode(502)
                request.write(b'{"error":"next_hop_failed"}')
                request.finish()

        d.addCallback(answered).addCallbacks(reply, failed)
        return server.NOT_DONE_YET


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="plain Twisted Web answerer / proxy (bench baseline)")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--forward-to", default=None, help="HOST:PORT of the answerer: act as a plain proxy")
    args = ap.parse_args(argv)
    from twisted.internet import reactor

    root = Proxy(reactor, args.listen, args.forward_to) if args.forward_to else Answerer()
    reactor.listenTCP(args.port, QuietSite(root), interface=args.listen)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
