"""The heap a TLS link keeps once it carried a cell and went idle, per connection end.

    python bench/tls_memory.py [--connections 60] [--body-kib 1400] [--runs 3]

A node holds 75-124 TLS connections under load (README, "At size"), and
what each keeps between cells is part of its peak. Here, in one process and
over real TCP on loopback, ``--connections`` clients (the project's
``BulkTLSEndpoint`` and ``PinningPolicy``) each send one body of
``--body-kib`` KiB (a relayed 1 MiB chunk is about 1.4 MiB) to a server
listening as members do (``BulkTLSFactory``, ``server_options``), which
answers one byte; then every connection stays open and idle. glibc's heap
in use (``HeapTrimmer.used_bytes``: mallinfo2's allocated and mmapped
bytes) is read before the connections, after the handshakes and after the
bodies; divided by twice the connection count, it is what one connection
end keeps (both ends live in this process). Then ``--bulk-bodies`` more
bodies cross one connection: the process's CPU per MiB, both ends.

Each variant runs in a fresh child process (so one's heap does not hide in
the other's), ``--runs`` times, alternating: the links as shipped; with
their memory BIOs kept for good (``bios_kept``: a quiet link's BIOs are not
renewed, as before docs choice 68); and with OpenSSL's
``SSL_MODE_RELEASE_BUFFERS`` cleared as well (``release_off``: as before
choice 67; with it, a connection frees its record buffers while they are
empty, as Tor's links do). The idle figure is read once the links have
been quiet for longer than ``BIO_RELEASE_IDLE``.
Prints and writes (``--out``, ``bench/tls-memory.json``) JSON: per variant, the KiB per connection
end after the handshakes and after the bodies, median of the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VARIANTS = ("shipped", "bios_kept", "release_off")


def child(variant: str, connections: int, body: int, bulk_bodies: int) -> dict:
    from cryptography.hazmat.primitives.asymmetric import ec
    from OpenSSL import SSL
    from twisted.internet import defer, protocol, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from onion_twisted.net import tls_transport
    from onion_twisted.net.malloc import HeapTrimmer, tune_malloc
    from onion_twisted.net.tls import PinningPolicy, server_options
    from onion_twisted.net.tls_transport import BulkTLSEndpoint, BulkTLSFactory

    tune_malloc()  # as a node starts (node/service.py)
    heap = HeapTrimmer()
    server, policy = server_options(ec.generate_private_key(ec.SECP256R1())), PinningPolicy()
    if variant in ("bios_kept", "release_off"):
        tls_transport.BIO_RELEASE_SIZE = float("inf")
    if variant == "release_off":
        for context in (server.getContext(), policy.context):
            context.clear_mode(SSL.MODE_RELEASE_BUFFERS)

    class Sink(protocol.Protocol):
        def connectionMade(self):
            self.got = 0

        def dataReceived(self, data):
            self.got += len(data)
            if self.got >= body:
                self.got -= body
                self.transport.write(b"k")

    class Sender(protocol.Protocol):
        def connectionMade(self):
            self.answered = defer.Deferred()
            self.factory.made.callback(self)

        def dataReceived(self, data):
            if not self.answered.called:
                self.answered.callback(None)

    port = reactor.listenTCP(0, BulkTLSFactory(server, False, protocol.Factory.forProtocol(Sink)),
                             interface="127.0.0.1")
    creator = policy.creatorForNetloc(b"127.0.0.1", port.getHost().port)
    result = {}

    async def run():
        heap()  # a trim first: the heap's free pages do not count, its used bytes do
        before = heap.used_bytes()
        senders = []
        for _ in range(connections):
            factory = protocol.Factory.forProtocol(Sender)
            factory.made = defer.Deferred()
            await BulkTLSEndpoint(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)).connect(
                factory)
            sender = await factory.made
            sender.transport.write(b"h")  # the handshake completes both ways before the body
            senders.append(sender)
        await task.deferLater(reactor, 0.2, lambda: None)
        handshaken = heap.used_bytes()
        payload = b"\x00" * body
        for sender in senders:
            sender.transport.write(payload)
            await sender.answered
        del payload
        await task.deferLater(reactor, 2 * tls_transport.BIO_RELEASE_IDLE + 0.5, lambda: None)
        carried = heap.used_bytes()
        ends = 2 * connections
        result.update(handshake_kib=(handshaken - before) / ends / 1024, idle_kib=(carried - before) / ends / 1024)
        # The CPU a body costs both ends (freeing and taking back record buffers is not free).
        started = time.process_time()
        for _ in range(bulk_bodies):
            sender = senders[0]
            sender.answered = defer.Deferred()
            sender.transport.write(b"\x01" * body)
            await sender.answered
        result["cpu_ms_per_mib"] = (time.process_time() - started) * 1e3 / (bulk_bodies * body / 2 ** 20)
        for sender in senders:
            sender.transport.loseConnection()

    def done(outcome):
        reactor.stop()
        return outcome

    reactor.callWhenRunning(lambda: defer.ensureDeferred(run()).addBoth(done))
    reactor.run()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=60)
    parser.add_argument("--body-kib", type=int, default=1400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bulk-bodies", type=int, default=40, help="bodies sent over one connection for the CPU figure")
    parser.add_argument("--out", default=str(BENCH / "tls-memory.json"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.connections, args.body_kib * 1024, args.bulk_bodies)))
        return 0
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.runs):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--connections",
                                  str(args.connections), "--body-kib", str(args.body_kib),
                                  "--bulk-bodies", str(args.bulk_bodies)],
                                 check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    report = {"config": {k: v for k, v in vars(args).items() if k != "child"}, "variants": {
        v: {"handshake_kib": statistics.median(r["handshake_kib"] for r in rs),
            "idle_kib": statistics.median(r["idle_kib"] for r in rs),
            "cpu_ms_per_mib": statistics.median(r["cpu_ms_per_mib"] for r in rs), "runs": rs} for v, rs in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for variant, figures in report["variants"].items():
        print(f"{variant:12s} KiB per connection end: after the handshake {figures['handshake_kib']:7.1f}, "
              f"idle after a {args.body_kib} KiB body {figures['idle_kib']:7.1f}; "
              f"CPU {figures['cpu_ms_per_mib']:.2f} ms per MiB (both ends)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
