"""The tracker's HTTP face: a thin Klein app over Tracker.

Routes: ``POST /`` (cells from exit nodes), ``POST /nodes`` (registration),
``GET /nodes`` (signed directory), ``GET /identity``, ``GET /`` (the
network's page), ``GET /metrics``.

The page and ``/metrics`` answer only ``metrics_allow`` (default loopback),
like a node's: their counters move with every request bridged, and read
once a second beside the nodes' they would help time a transfer. What the
network needs from the tracker (``/nodes``, ``/identity``, cells) answers
anyone it answered before.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time

from klein import Klein

from onion_twisted import PROTOCOL, PROTOCOL_V1, PROTOCOLS, __version__
from onion_twisted.protocol.identity import identity_json
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.net.http_server import AllowList, CellRoute, respond, write_json
from onion_twisted.tracker.tracker import Tracker


class TrackerApp:
    app = Klein()

    def __init__(self, tracker: Tracker, metrics_allow=("127.0.0.0/8", "::1")):
        self.tracker = tracker
        self.metrics_allow = AllowList(metrics_allow, "metrics_allow")
        self._identity: tuple[bytes, bytes] | None = None  # (onion key, body)

    def resource(self):
        # POST / (cells) bypasses Klein's routing: see http_server.CellRoute.
        return CellRoute(self.app.resource(), self.post_cell)

    @app.route("/", methods=["POST"])
    def post_cell(self, request):
        body = request.content.getvalue()
        return respond(request, self.tracker.handle_cell(request.getClientAddress().host, body))

    @app.route("/nodes", methods=["POST"])
    def post_register_node(self, request):
        body = request.content.getvalue()
        return respond(request, self.tracker.register_node(request.getClientAddress().host, body))

    @app.route("/nodes", methods=["GET"])
    def get_signed_directory(self, request):
        body, signature = self.tracker.registry.signed()
        request.setHeader(SIGNATURE_HEADER, signature)
        return write_json(request, 200, body)

    @property
    def identity(self) -> bytes:
        """The ``/identity`` body, made again when the onion key rotates."""
        ring = self.tracker.onion_keys
        onion_key = ring.current_public if ring is not None else None
        if self._identity is None or self._identity[0] != onion_key:
            t = self.tracker
            body = identity_json("tracker", str(t.own_address), t.public_key_b64,
                                 hashlib.sha256(base64.b64decode(t.public_key_b64)).hexdigest(),
                                 protocols=PROTOCOLS if ring is not None else (PROTOCOL_V1,),
                                 onion_key=onion_key)
            self._identity = (onion_key, body)
        return self._identity[1]

    @app.route("/identity", methods=["GET"])
    def get_identity(self, request):
        return write_json(request, 200, self.identity)

    @app.route("/metrics", methods=["GET"])
    def get_metrics(self, request):
        refused = self.metrics_allow.refusal(request)
        if refused is not None:
            return refused
        t = self.tracker
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return t.metrics.prometheus(nodes=len(t.registry), circuits=len(t.catalogue.circuits),
                                    entries=len(t.catalogue.entries),
                                    transfers=t.catalogue.transfers_under_way()).encode("utf-8")

    @app.route("/", methods=["GET"])
    def get_network_page(self, request):
        refused = self.metrics_allow.refusal(request)
        if refused is not None:
            return refused
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return render_network(self.tracker).encode("utf-8")


def render_network(tracker: Tracker) -> str:
    """Nodes, the catalogue, transfers under way: never a CID nor an exit address."""
    e = html.escape
    now = tracker.clock.seconds()
    nodes = "".join(
        f"<tr><td>{e(str(n.address))}</td><td><code>{e(n.fingerprint[:16])}…</code></td>"
        f"<td>{int(now - n.last_seen)} s ago</td></tr>"
        for n in sorted(tracker.registry.nodes.values(), key=lambda n: str(n.address))
    ) or '<tr><td colspan="3">no node yet</td></tr>'
    listing = tracker.catalogue.listing()
    files = "".join(
        f"<tr><td>{e(r['name'])}</td><td>{'' if r['size'] is None else r['size']}</td>"
        f"<td><code>{e((r['sha256'] or '')[:16])}</code></td><td>{r['sources']}</td></tr>"
        for r in listing[:1000]
    ) or '<tr><td colspan="4">nothing shared yet</td></tr>'
    more = f"<p>{len(listing) - 1000} more entries not shown.</p>" if len(listing) > 1000 else ""
    evicted = tracker.catalogue.evicted
    if evicted:
        more += f"<p>{evicted} entries evicted since start, to make room for exits below their fair share.</p>"
    up = int(tracker.metrics.uptime())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta http-equiv="refresh" content="10"><title>onion_twisted tracker</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;width:100%}}td,th{{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}}
td:nth-child(2){{white-space:nowrap}}</style></head><body>
<h1>onion_twisted tracker</h1>
<p>Key <code>{e(tracker.public_key_b64)}</code> · up {up // 3600} h {up % 3600 // 60} min ·
{len(tracker.catalogue.circuits)} circuits · {tracker.metrics.requests['bridged']} transfers bridged since start ·
generated {time.strftime('%H:%M:%S', time.gmtime(now))} UTC</p>
<p>About {tracker.catalogue.transfers_under_way()} transfers under way: an estimate. The tracker never sees a
transfer end (its chunks and <code>transfer_end</code> cross the bridge between two exits), so each transfer
it bridged counts for its size at 1 MiB/s plus a minute, or until the sharing circuit is gone.</p>
<h2>Nodes ({len(tracker.registry)})</h2>
<table><tr><th>address</th><th>fingerprint</th><th>last seen</th></tr>{nodes}</table>
<h2>Catalogue ({len(tracker.catalogue.entries)} entries)</h2>
<table><tr><th>name</th><th>size</th><th>sha256</th><th>sources</th></tr>{files}</table>{more}
<p><small>onion_twisted {__version__}, {PROTOCOL}</small></p>
</body></html>
"""
