"""The node's HTTP face: a thin Klein app over NodeRelay.

Routes: ``POST /`` (cells), ``GET /`` (status page), ``GET /identity``,
``GET /nodes`` (the tracker's signed directory, byte for byte),
``GET /metrics`` (Prometheus text).

The status page and ``/metrics`` answer only ``metrics_allow`` (default
loopback): their byte and cell counters, read once a second, show when a
transfer crosses this node and how big it is, enough to follow it hop by
hop. Every other client gets 403, as strangers do at the peer's API.
"""

from __future__ import annotations

import html

from klein import Klein

from onion_twisted import PROTOCOL, PROTOCOL_V1, PROTOCOL_V2, PROTOCOLS, __version__
from onion_twisted.protocol import crypto
from onion_twisted.protocol.errors import Unavailable
from onion_twisted.protocol.identity import identity_json
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.net.cell_scheduler import CellScheduler
from onion_twisted.net.http_server import AllowList, CellRoute, EMPTY_CONTENT, respond, write_error, write_json
from onion_twisted.node.relay import NodeRelay


class NodeApp:
    app = Klein()

    def __init__(self, relay: NodeRelay, directory, metrics_allow=("127.0.0.0/8", "::1")):
        self.relay = relay
        self.directory = directory
        self.metrics_allow = AllowList(metrics_allow, "metrics_allow")
        self.cells = CellScheduler(relay.clock)  # circuit work before chunks (cell_scheduler.py)
        key = relay.private_key.public_key()
        self.fingerprint = crypto.fingerprint(key)
        self._public_key_pem = crypto.public_key_pem(key)

    @property
    def identity(self) -> bytes:
        """§6, §10: made per request, since the onion key rotates (§11)."""
        relay = self.relay
        return identity_json("node", str(relay.own_address), self._public_key_pem, self.fingerprint,
                             protocols=(PROTOCOL_V1,) if relay.onion_keys is None
                             else PROTOCOLS if relay.accept_v1 else (PROTOCOL_V2,),
                             onion_key=relay.onion_keys.current_public if relay.onion_keys is not None else None)

    def resource(self):
        # POST / (cells) bypasses Klein's routing: see http_server.CellRoute.
        return CellRoute(self.app.resource(), self.post_cell)

    @app.route("/", methods=["POST"])
    def post_cell(self, request):
        body = request.content.getvalue()
        request.content = EMPTY_CONTENT  # the relay drops the body once peeled; so does the request
        signature = request.getHeader(SIGNATURE_HEADER)
        source = request.getClientAddress().host
        relay = self.relay

        def start():
            nonlocal body  # handed over: the relay drops it once peeled, and so must this closure
            cell, body = body, None
            return relay.handle(source, cell, signature)

        return respond(request, self.cells.submit(body, start))

    @app.route("/identity", methods=["GET"])
    def get_identity(self, request):
        return write_json(request, 200, self.identity)

    @app.route("/nodes", methods=["GET"])
    def get_nodes_mirror(self, request):
        current = self.directory.current
        if current is None:
            return write_error(request, Unavailable("this node has no directory yet"))
        request.setHeader(SIGNATURE_HEADER, current.signature.encode("ascii"))
        return write_json(request, 200, current.body)

    @app.route("/metrics", methods=["GET"])
    def get_metrics(self, request):
        refused = self.metrics_allow.refusal(request)
        if refused is not None:
            return refused
        table = self.relay.table
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.relay.metrics.prometheus(len(table), table.bridge_count, self.cells).encode("utf-8")

    @app.route("/", methods=["GET"])
    def get_status_page(self, request):
        refused = self.metrics_allow.refusal(request)
        if refused is not None:
            return refused
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return render_status(self).encode("utf-8")


def render_status(node: NodeApp) -> str:
    """Fingerprint, uptime, circuits, bytes each way, errors by status.

    Never a circuit id, a peer address or a file name.
    """
    m = node.relay.metrics
    table = node.relay.table
    errors = "".join(f"<tr><td>{s}</td><td>{n}</td></tr>" for s, n in sorted(m.errors.items())) \
        or '<tr><td colspan="2">none</td></tr>'
    directory = node.directory.current
    known = len(directory.nodes) if directory else 0
    up = int(m.uptime())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta http-equiv="refresh" content="10"><title>onion node {html.escape(node.fingerprint[:16])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td,th{{padding:.2rem .8rem;border-bottom:1px solid #ddd;text-align:left}}
code{{word-break:break-all}}</style></head><body>
<h1>onion_twisted relay node</h1>
<p>Fingerprint <code>{html.escape(node.fingerprint)}</code></p>
<table>
<tr><th>Uptime</th><td>{up // 3600} h {up % 3600 // 60} min {up % 60} s</td></tr>
<tr><th>Open circuits</th><td>{len(table)}</td></tr>
<tr><th>Open bridge ends</th><td>{table.bridge_count}</td></tr>
<tr><th>Relayed forward</th><td>{m.cells['forward']} cells, {m.bytes['forward']} bytes</td></tr>
<tr><th>Relayed backward</th><td>{m.cells['backward']} cells, {m.bytes['backward']} bytes</td></tr>
<tr><th>Circuits created per second</th><td>{m.creates.per_second():.2f}</td></tr>
<tr><th>Nodes in the directory</th><td>{known}</td></tr>
</table>
<h2>Errors by status</h2><table><tr><th>status</th><th>count</th></tr>{errors}</table>
<p><small>onion_twisted {__version__}, {PROTOCOL}</small></p>
</body></html>
"""
