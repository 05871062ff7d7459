"""A node's resident memory per open circuit.

Starts, on its own 127.A.B.x addresses, the stand-in tracker
(``stub_tracker.py``) and one real node (``twistd onionnode``, 2048-bit key,
create budgets lifted), then, from this process:

1. builds ``--warmup`` circuits (CREATE, then EXTEND to the tracker as exit:
   full circuits with both directions set), so code paths, connection pools
   and caches exist, and reads the node's VmRSS: the idle figure;
2. builds ``--circuits`` more (concurrency ``--concurrency``), all left open
   (a node drops idle circuits only after 10 minutes), and reads VmRSS again.

Prints ``{"idle_bytes", "loaded_bytes", "circuits", "bytes_per_circuit",
"circuits_reported"}`` as JSON (the last from the node's /metrics, to show
the circuits are really held). The figure includes the node's share of
allocator slack (glibc keeps up to 16 MiB of freed heap, onion_twisted/net/malloc.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import tempfile
from pathlib import Path

from common import Proc, make_client, pick_addresses, vm, wait_ready
from relay import NodeTarget, NodeTargetV2, twistd_command

BENCH = Path(__file__).resolve().parent
PY = sys.executable


async def run(reactor, args) -> dict:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    (client_ip, tracker_ip, node_ip), port = pick_addresses((1, 4, 5))
    tmp = Path(tempfile.mkdtemp(prefix="onion-nodemem-"))
    logdir = tmp / "logs"
    logdir.mkdir()
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp / "tracker_key").write_bytes(key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))
    tracker_pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode("ascii")
    client = make_client(reactor, client_ip, args.concurrency + 8, 30)
    procs = []
    try:
        tracker = Proc("tracker", [PY, str(BENCH / "stub_tracker.py"), "--listen", tracker_ip, "--port", str(port),
                                   "--key-file", str(tmp / "tracker_key")], logdir)
        procs.append(tracker)
        await wait_ready(reactor, client, f"http://{tracker_ip}:{port}/identity".encode(), tracker)
        node = Proc("node", twistd_command(None) + [
            "-n", "--pidfile=", "onionnode", "--listen", node_ip, "--port", str(port),
            "--tracker", f"{tracker_ip}:{port}", "--tracker-key", tracker_pub, "--key-bits", str(args.key_bits),
            "--data-dir", str(tmp / "node"), "--create-burst", "1000000", "--create-rate", "1000000",
            "--create-work-burst", "1000000", "--create-work-rate", "1000000", "--no-tls"], logdir, cwd=tmp)
        procs.append(node)
        node_url = f"http://{node_ip}:{port}".encode()
        await wait_ready(reactor, client, node_url + b"/identity", node, timeout=60)
        target_class = NodeTargetV2 if args.protocol == "v2" else NodeTarget
        target = target_class(node_url + b"/", [node, tracker], client, f"{tracker_ip}:{port}")

        async def build(count: int) -> None:
            left = count
            while left:
                batch = min(args.concurrency, left)
                await target.prepare(batch, node_url + b"/identity")
                left -= batch

        await build(args.warmup)
        idle = vm(node.pid, "VmRSS")
        await build(args.circuits)
        loaded = vm(node.pid, "VmRSS")
        code, metrics = await client.request(b"GET", node_url + b"/metrics")
        match = re.search(rb"^onion_node_circuits\s+(\d+)", metrics, re.M)
        return {"protocol": args.protocol, "idle_bytes": idle, "loaded_bytes": loaded, "circuits": args.circuits,
                "bytes_per_circuit": (loaded - idle) / args.circuits,
                "circuits_reported": int(match.group(1)) if match else None}
    finally:
        await client.close()
        for proc in reversed(procs):
            proc.stop(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--circuits", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--protocol", choices=("v1", "v2"), default="v1",
                        help="circuits of onion-http/1 (RSA) or /2 (ntor: keys and replay windows per direction)")
    args = parser.parse_args()
    from twisted.internet import defer, task

    def go(reactor):
        async def body():
            sys.stdout.write(json.dumps(await run(reactor, args)) + "\n")
        return defer.ensureDeferred(body())

    task.react(go)
    return 0


if __name__ == "__main__":
    sys.exit(main())
