"""A small stand-in for the tracker, run as its own process by the tests.

    python tests/support/fake_tracker.py --listen IP --port P --data-dir D

It speaks the tracker's side of PROTOCOL.md that relay tests need:

* ``GET /identity``: role tracker, Ed25519 public key (base64 of the 32 raw bytes).
* ``POST /nodes``: registers a node; only from the registering HOST, and only
  if ``GET http://ADDRESS/identity`` shows the same key (§6).
* ``GET /nodes``: ``{"issued", "nodes": [...]}`` signed in ``X-Onion-Signature``.
* ``POST /`` from exit nodes: circuits by (exit IP, CID) with the messages they
  sent; ``ls``/``list`` get a ``files`` reply, anything else
  ``{"type": "echo", "got": message}``; a destroy forgets the circuit.

Test-only routes, under ``/test/``:

* ``GET /test/state``: the circuits known, with their messages and counts.
* ``POST /test/push {"index": n, "message": obj}``: a backward cell
  ``{"CID": cid, "payload": obj}`` to the exit of the n-th circuit; answers the
  exit's status and body.
* ``POST /test/control {"to": address, "payload": {...}}``: a signed control
  message (``issued`` filled in if absent); answers the node's status and body.

Its log (``D/tracker.log``) names no client address and no circuit.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import time
from pathlib import Path

try:
    import onion_twisted  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.http_headers import Headers

from onion_twisted import PROTOCOL
from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.net import keys
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.protocol.errors import BadRequest, Forbidden, NextHopFailed, ProtocolError, UnknownCircuit
from onion_twisted.net.http_client import BytesProducer, HTTPOutbound
from onion_twisted.net.http_server import QuietSite, write_error, write_json

log = Logger(namespace="fake_tracker")


class FakeTracker:
    app = Klein()

    def __init__(self, reactor, listen: str, port: int, data_dir: str, *, node_ttl: float, hop_timeout: float):
        self.reactor = reactor
        self.port = port
        self.address = wire.Address(listen, port)
        self.key = keys.load_or_create_tracker_key(data_dir)
        public = crypto.tracker_public_b64(self.key)
        self.identity = wire.dumps({
            "role": "tracker",
            "address": str(self.address),
            "public_key": public,
            "fingerprint": hashlib.sha256(base64.b64decode(public)).hexdigest(),
            "protocol": PROTOCOL,
        })
        self.node_ttl = node_ttl
        self.outbound = HTTPOutbound(reactor, bind_ip=listen, timeout=hop_timeout)
        self.nodes: dict[wire.Address, dict] = {}     # address -> entry and "seen"
        self.circuits: dict[tuple[str, str], dict] = {}  # (exit IP, CID) -> circuit

    def resource(self):
        return self.app.resource()

    # --- helpers -------------------------------------------------------------------

    def _live_nodes(self) -> list[dict]:
        now = self.reactor.seconds()
        for address in [a for a, n in self.nodes.items() if now - n["seen"] > self.node_ttl]:
            del self.nodes[address]
        return [{k: n[k] for k in ("address", "public_key", "fingerprint")} for n in self.nodes.values()]

    def _catalogue(self) -> list[dict]:
        """The ``files`` rows as the real catalogue writes them: one per (name, sha256, root),
        each circuit counted once, ``root`` only in a row whose entry has one (§8, §13)."""
        entries: dict[tuple, dict] = {}
        for circuit in self.circuits.values():
            announced: dict[tuple, int | None] = {}  # (name, sha256, root) -> size
            for f in circuit["files"]:
                if isinstance(f, str):
                    announced[(f, None, None)] = None
                elif isinstance(f, dict) and isinstance(f.get("name"), str):
                    announced[(f["name"], f.get("sha256"), f.get("root"))] = f.get("size")
            for (name, sha, root), size in announced.items():
                entry = entries.get((name, sha, root))
                if entry is None:
                    entry = entries[(name, sha, root)] = {"name": name, "size": size, "sha256": sha, "sources": 0}
                    if root is not None:
                        entry["root"] = root
                entry["sources"] += 1
        return list(entries.values())  # in the order announced (the real tracker sorts; tests read this order)

    async def _answer(self, request, work):
        try:
            return write_json(request, 200, await work())
        except ProtocolError as e:
            return write_error(request, e)

    async def _post_status(self, address: wire.Address, body: bytes, headers: dict | None = None):
        h = Headers({b"Content-Type": [b"application/json"]})
        for name, value in (headers or {}).items():
            h.setRawHeaders(name, [value])
        d = self.outbound.http.request("POST", address.url("/"), data=BytesProducer(body), headers=h, unbuffered=True)
        d.addTimeout(self.outbound.timeout, self.reactor)
        try:
            response = await d
            data = await response.content()
        except Exception as e:  # noqa: BLE001 - reported to the test, not raised
            return {"status": None, "error": type(e).__name__}
        try:
            answer = wire.loads(data)
        except BadRequest:
            answer = data.decode("utf-8", "replace")
        return {"status": response.code, "body": answer}

    # --- the tracker's routes -----------------------------------------------------

    @app.route("/identity", methods=["GET"])
    def get_identity(self, request):
        return write_json(request, 200, self.identity)

    @app.route("/nodes", methods=["POST"])
    def post_nodes(self, request):
        return defer.ensureDeferred(self._answer(request, lambda: self._register(request)))

    async def _register(self, request) -> bytes:
        obj = wire.loads_object(request.content.getvalue())
        address = wire.parse_address(obj.get("address"), self.port)
        key = crypto.load_public_key_pem(obj.get("public_key"))
        if address.ip is None or address.ip != request.getClientAddress().host:
            raise Forbidden("a node registers only its own address")
        status, _, body = await self.outbound.get(address, "/identity")
        if status != 200:
            raise NextHopFailed(f"the node answered {status} for its identity")
        identity = wire.loads_object(body, "identity")
        if identity.get("role") != "node":
            raise Forbidden("that address is not a node")
        shown = crypto.load_public_key_pem(identity.get("public_key"))
        if crypto.fingerprint(shown) != crypto.fingerprint(key):
            raise Forbidden("the node at that address shows another key")
        self.nodes[address] = {"address": str(address), "public_key": crypto.public_key_pem(key),
                               "fingerprint": crypto.fingerprint(key), "seen": self.reactor.seconds()}
        return b"{}"

    @app.route("/nodes", methods=["GET"])
    def get_nodes(self, request):
        body = wire.dumps({"issued": int(time.time()), "nodes": self._live_nodes()})
        request.setHeader(SIGNATURE_HEADER, crypto.sign_body(self.key, body).encode("ascii"))
        return write_json(request, 200, body)

    @app.route("/", methods=["POST"])
    def post_cell(self, request):
        try:
            return write_json(request, 200, self._cell(request.getClientAddress().host, request.content.getvalue()))
        except ProtocolError as e:
            return write_error(request, e)

    def _cell(self, source_ip: str, body: bytes) -> bytes:
        cell = cells.parse_cell(body)
        if cell.is_control:
            raise BadRequest("the tracker takes no control messages")
        if not any(address.ip == source_ip for address in self.nodes):
            raise Forbidden("only the network's nodes exit to the tracker")
        key = (source_ip, cell.cid)
        if cell.destroy:
            if self.circuits.pop(key, None) is None:
                raise UnknownCircuit("destroy for a circuit the tracker does not know")
            return b"{}"
        message = cells.payload_object(cell)
        circuit = self.circuits.get(key)
        if circuit is None:
            circuit = self.circuits[key] = {"exit": source_ip, "CID": cell.cid, "messages": [], "files": []}
        circuit["messages"].append(message)
        kind = message.get("type")
        if kind == "ls":
            files = message.get("files")
            circuit["files"] = files if isinstance(files, list) else []
        if kind in ("ls", "list"):
            reply = {"type": "files", "files": self._catalogue()}
        else:
            reply = {"type": "echo", "got": message}
        return wire.dumps({"payload": reply})

    # --- test-only routes -------------------------------------------------------

    @app.route("/test/state", methods=["GET"])
    def get_state(self, request):
        circuits = [{"exit": c["exit"], "CID": c["CID"], "count": len(c["messages"]), "messages": c["messages"]}
                    for c in self.circuits.values()]
        return write_json(request, 200, wire.dumps({
            "circuits": circuits, "nodes": [n["address"] for n in self.nodes.values()]}))

    @app.route("/test/push", methods=["POST"])
    def post_push(self, request):
        return defer.ensureDeferred(self._answer(request, lambda: self._push(request)))

    async def _push(self, request) -> bytes:
        obj = wire.loads_object(request.content.getvalue())
        index, message = obj.get("index"), obj.get("message")
        circuits = list(self.circuits.values())
        if not isinstance(index, int) or not 0 <= index < len(circuits):
            raise UnknownCircuit("no circuit with that index")
        if not isinstance(message, dict):
            raise BadRequest("message is not a JSON object")
        circuit = circuits[index]
        exit_address = wire.Address(circuit["exit"], self.port)
        return wire.dumps(await self._post_status(exit_address, cells.encode_cell(circuit["CID"], message)))

    @app.route("/test/control", methods=["POST"])
    def post_control(self, request):
        return defer.ensureDeferred(self._answer(request, lambda: self._control(request)))

    async def _control(self, request) -> bytes:
        obj = wire.loads_object(request.content.getvalue())
        to = wire.parse_address(obj.get("to"), self.port, field="to")
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            raise BadRequest("payload is not a JSON object")
        payload.setdefault("issued", int(time.time()))
        body, signature = control.sign_control(self.key, payload)
        return wire.dumps(await self._post_status(to, body, {SIGNATURE_HEADER: signature.encode("ascii")}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="stand-in tracker for onion_twisted tests")
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=wire.DEFAULT_PORT)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--node-ttl", type=float, default=90.0, help="forget a node unseen this long")
    parser.add_argument("--hop-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(data_dir / "tracker.log", "a", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    tracker = FakeTracker(reactor, args.listen, args.port, str(data_dir), node_ttl=args.node_ttl,
                          hop_timeout=args.hop_timeout)
    reactor.listenTCP(args.port, QuietSite(tracker.resource(), reactor=reactor), interface=args.listen)
    log.info("fake tracker listening on port {port}", port=args.port)
    reactor.run()


if __name__ == "__main__":
    main()
