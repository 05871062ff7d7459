"""Circuit build time and round trip through a running network, as a peer sees them.

Run by ``bench/network.py`` against the demo's network; prints one JSON
object on stdout. From its own address (``--bind``), like a peer:

* fetches the signed directory from the tracker (verified with its key);
* ``--builds`` times: picks three distinct nodes at random and builds a
  circuit from nothing to connected (CREATE at the first node, two EXTENDs,
  then the extend to the tracker carrying an empty ``ls``), timing that
  whole sequence; then destroys the circuit (not timed);
* on one more circuit, sends ``--round-trips`` ``list`` messages one after
  the other and times each (the tracker's ``files`` reply comes back through
  the three layers).

Every exchange goes through ``onion_twisted.peer.circuit.Circuit`` and
``HTTPOutbound``: the code a peer runs, with a persistent connection pool
bound to ``--bind`` (PROTOCOL.md §1). The first build warms the pool.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from twisted.internet import defer, task

from onion_twisted.protocol import crypto, ntor, wire
from onion_twisted.peer.circuit import Circuit
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.net.directory_client import SIGNATURE_HEADER
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.net.tls import spki_fingerprint


async def measure(reactor, args) -> dict:
    outbound = HTTPOutbound(reactor, bind_ip=args.bind, timeout=30, tls=args.tls)
    tracker = wire.parse_address(args.tracker)
    status, headers, body = await outbound.get(tracker, "/identity")
    tracker_key = crypto.load_tracker_public_b64(wire.loads_object(body)["public_key"])
    status, headers, body = await outbound.get(tracker, "/nodes")
    signature = headers.getRawHeaders(SIGNATURE_HEADER, [b""])[0]
    directory = parse_signed_directory(body, signature, tracker_key, tracker.port)
    # As a peer does: nodes pinned by their directory fingerprint, the tracker by its key.
    tracker_pin = spki_fingerprint(tracker_key)
    outbound.pin_for = lambda a: tracker_pin if a == tracker else getattr(directory.nodes.get(a), "fingerprint", None)
    nodes = list(directory.nodes.values())
    # As the peer's keeper does: the tracker sealed as the fourth hop when the directory
    # carries its onion key and the exit speaks /2 (§12).
    tracker_onion_key = directory.tracker_onion_key
    tracker_id = ntor.member_id(tracker_key) if tracker_onion_key else None
    rng = random.Random(args.seed)
    first = {"type": "ls", "files": []}

    async def build() -> tuple[Circuit, float]:
        circuit = Circuit(outbound, rng.sample(nodes, args.hops), tracker, tracker_onion_key=tracker_onion_key,
                          tracker_id=tracker_id)
        started = time.perf_counter()
        await circuit.build(first)
        return circuit, time.perf_counter() - started

    circuit, _ = await build()  # warm-up: connections opened, code paths run once
    await circuit.destroy()
    builds = []
    for _ in range(args.builds):
        circuit, seconds = await build()
        builds.append(seconds)
        await circuit.destroy()
    circuit, _ = await build()
    round_trips = []
    for _ in range(args.round_trips):
        started = time.perf_counter()
        reply = await circuit.send({"type": "list"})
        round_trips.append(time.perf_counter() - started)
        if not isinstance(reply, dict) or reply.get("type") != "files":
            raise RuntimeError(f"list answered {reply!r}")
    await circuit.destroy()
    await outbound.close()
    return {"nodes": len(nodes), "build_s": builds, "list_s": round_trips, "protocol": circuit.protocol,
            "sealed": tracker_id is not None and circuit.hops[-1].speaks_v2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bind", required=True, help="this client's IP (a loopback address no member uses)")
    parser.add_argument("--tracker", required=True, help="HOST:PORT")
    parser.add_argument("--builds", type=int, default=50)
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tls", action="store_true", help="the network speaks TLS (its default)")
    args = parser.parse_args()

    async def run(reactor):
        result = await measure(reactor, args)
        sys.stdout.write(json.dumps(result) + "\n")  # before react() exits the process

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
