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

import sys

from twisted.web import resource, server

from common import JSON, BytesProducer, member_parser, serve


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
    ap = member_parser("plain Twisted Web answerer / proxy (bench baseline)")
    ap.add_argument("--forward-to", default=None, help="HOST:PORT of the answerer: act as a plain proxy")
    args = ap.parse_args(argv)
    return serve(lambda reactor: Proxy(reactor, args.listen, args.forward_to) if args.forward_to else Answerer(),
                 args.listen, args.port)


if __name__ == "__main__":
    sys.exit(main())
