"""The bulk baseline: one file fetched by a plain Twisted Web GET.

``serve``: ``twisted.web.static.File`` over a directory at ``--listen:--port``.
``get``: one ``GET`` with ``twisted.web.client.Agent``, the socket bound to
``--bind``, the body streamed into ``--out`` as it arrives (written to disk,
as a peer writes a download); prints ``{"seconds": …, "bytes": …}``, timed
from the request to the last byte written.

Used by ``bench/network.py`` between bob's and alice's addresses, beside the
same file crossing the onion network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from twisted.internet import defer, protocol, task


def serve(args) -> int:
    from twisted.internet import reactor
    from twisted.web import server, static

    site = server.Site(static.File(args.root))
    site.log = lambda request: None
    reactor.listenTCP(args.port, site, interface=args.listen)
    reactor.run()
    return 0


class _ToFile(protocol.Protocol):
    def __init__(self, path: str, done: defer.Deferred):
        self.file = open(path, "wb")
        self.done = done
        self.bytes = 0

    def dataReceived(self, data: bytes) -> None:
        self.file.write(data)
        self.bytes += len(data)

    def connectionLost(self, reason) -> None:
        self.file.close()
        self.done.callback(self.bytes)


async def get(reactor, args) -> None:
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.web.client import Agent

    class Bound:
        def endpointForURI(self, uri):
            return TCP4ClientEndpoint(reactor, uri.host.decode("ascii"), uri.port, bindAddress=(args.bind, 0))

    agent = Agent.usingEndpointFactory(reactor, Bound())
    started = time.perf_counter()
    response = await agent.request(b"GET", args.url.encode("ascii"))
    if response.code != 200:
        raise RuntimeError(f"GET answered {response.code}")
    done = defer.Deferred()
    response.deliverBody(_ToFile(args.out, done))
    size = await done
    sys.stdout.write(json.dumps({"seconds": time.perf_counter() - started, "bytes": size}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--root", required=True)
    g = sub.add_parser("get")
    g.add_argument("--bind", required=True)
    g.add_argument("--url", required=True)
    g.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "serve":
        return serve(args)
    task.react(lambda reactor: defer.ensureDeferred(get(reactor, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
