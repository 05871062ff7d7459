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

With ``--until FILE`` (``bench/scale.py``, under load and churn) it builds
instead until FILE exists, ``--pause`` seconds apart, fetching the
directory again before each build (not timed) so that nodes which left
drop out of its picks as they drop out of a peer's; a build that fails
(a node picked had died since the directory was signed) is counted in
``failed`` with its reason, not timed, and does not stop the run.

Every exchange goes through ``onion_twisted.peer.circuit.Circuit`` and
``HTTPOutbound``: the code a peer runs, with a persistent connection pool
bound to ``--bind`` (PROTOCOL.md §1). The first build warms the pool.
"""

from __future__ import annotations

import argparse
import json
import os
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
    directory = None

    async def fetch_directory():
        nonlocal directory
        status, headers, body = await outbound.get(tracker, "/nodes")
        signature = headers.getRawHeaders(SIGNATURE_HEADER, [b""])[0]
        directory = parse_signed_directory(body, signature, tracker_key, tracker.port)

    await fetch_directory()
    # As a peer does: nodes pinned by their directory fingerprint, the tracker by its key.
    tracker_pin = spki_fingerprint(tracker_key)
    outbound.pin_for = lambda a: tracker_pin if a == tracker else getattr(directory.nodes.get(a), "fingerprint", None)
    # As the peer's keeper does: the tracker sealed as the fourth hop when the directory
    # carries its onion key and the exit speaks /2 (§12).
    tracker_id = ntor.member_id(tracker_key) if directory.tracker_onion_key else None
    rng = random.Random(args.seed)
    first = {"type": "ls", "files": []}

    async def build() -> tuple[Circuit, float]:
        circuit = Circuit(outbound, rng.sample(list(directory.nodes.values()), args.hops), tracker,
                          tracker_onion_key=directory.tracker_onion_key, tracker_id=tracker_id)
        started = time.perf_counter()
        await circuit.build(first)
        return circuit, time.perf_counter() - started

    for attempt in range(5):  # warm-up: connections opened, code paths run once
        try:
            circuit, _ = await build()
            break
        except Exception:  # noqa: BLE001 - under churn a node listed may have died: pick again
            if attempt == 4 or not args.until:
                raise
            await fetch_directory()
    await circuit.destroy()
    builds, failed = [], []
    if args.until:
        while not os.path.exists(args.until):
            await fetch_directory()
            try:
                circuit, seconds = await build()
            except Exception as e:  # noqa: BLE001 - a node picked died: counted, not timed
                failed.append(f"{type(e).__name__}: {e}"[:200])
            else:
                builds.append(seconds)
                try:
                    await circuit.destroy()
                except Exception:  # noqa: BLE001 - its entry died since: the build still counts
                    pass
            await task.deferLater(reactor, args.pause, lambda: None)
        await outbound.close()
        return {"nodes": len(directory.nodes), "build_s": builds, "failed": failed, "list_s": []}
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
    return {"nodes": len(directory.nodes), "build_s": builds, "list_s": round_trips, "protocol": circuit.protocol,
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
    parser.add_argument("--until", default=None, help="build until this file exists (then no round trips)")
    parser.add_argument("--pause", type=float, default=0.2, help="with --until: seconds between builds")
    args = parser.parse_args()

    async def run(reactor):
        result = await measure(reactor, args)
        sys.stdout.write(json.dumps(result) + "\n")  # before react() exits the process

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
