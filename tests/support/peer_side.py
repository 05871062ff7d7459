"""The test process as a peer of members that run as processes.

``PeerSide`` is one peer on its own ``127.x.y.z`` address: an outbound
(``HTTPOutbound`` bound to that address, wrapped in ``StatusOutbound`` so a
refusal carries the status the member answered) and a listener on
``ip:5000`` for the backward cells of its circuits. A cell is accepted only
for a circuit of this peer and only from that circuit's first hop; it is
opened and its ``(CID, message)`` queued. Refusals are kept in ``refused`` so
a test can assert there were none. ``close`` stops listening, aborts the
connections the (stopped) members left, and closes the outbound.
"""

from __future__ import annotations

from klein import Klein
from twisted.internet import defer

from onion_twisted.protocol import cells
from onion_twisted.peer.circuit import Circuit
from onion_twisted.protocol.errors import Forbidden, ProtocolError, UnknownCircuit
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.net.http_server import QuietSite, write_error, write_json
from tests.support.deferreds import current_reactor
from tests.support.processes import PORT, StatusOutbound, poll_until


class TrackingSite(QuietSite):
    """QuietSite that remembers its connections, so a test can close them all."""

    def __init__(self, resource, **kw):
        super().__init__(resource, **kw)
        self.connections = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol

    def open_connections(self):
        """The transports of the connections still open."""
        transports = [getattr(getattr(p, "_channel", p), "transport", None) for p in self.connections]
        return [t for t in transports if t is not None and not t.disconnected]


class PeerSide:
    """One peer played by the test process: outbound from ``ip``, backward cells on ``ip:port``."""

    app = Klein()

    def __init__(self, name: str, ip: str, reactor, *, timeout: float = 20, port: int = PORT):
        self.name = name
        self.ip = ip
        self.http = HTTPOutbound(reactor, bind_ip=ip, timeout=timeout)
        self.outbound = StatusOutbound(self.http)
        self.circuits: dict[str, Circuit] = {}
        self.queue = defer.DeferredQueue()            # (CID, message) of every accepted cell
        self.received: list[tuple[str, str]] = []      # (CID, payload) of every accepted cell
        self.refused: list[str] = []
        self.destroyed: list[str] = []
        self.site = TrackingSite(self.app.resource(), reactor=reactor)
        self.port = reactor.listenTCP(port, self.site, interface=ip)

    def add(self, circuit: Circuit) -> Circuit:
        """One more circuit of this peer."""
        self.circuits[circuit.cid] = circuit
        return circuit

    @property
    def circuit(self) -> Circuit | None:
        """The peer's one circuit, for a peer that has only one."""
        return next(iter(self.circuits.values()), None)

    @circuit.setter
    def circuit(self, circuit: Circuit) -> None:
        self.circuits = {circuit.cid: circuit}

    @app.route("/", methods=["POST"])
    def post_cell(self, request):
        try:
            cell = cells.parse_cell(request.content.getvalue())
            circuit = self.circuits.get(cell.cid)
            if circuit is None:
                raise UnknownCircuit("not a circuit of this peer")
            if request.getClientAddress().host != circuit.entry.host:
                raise Forbidden("not this circuit's first hop")
            if cell.destroy:
                self.destroyed.append(cell.cid)
                return write_json(request, 200, b"{}")
            message = circuit.open_backward(cell.payload)
        except ProtocolError as e:
            self.refused.append(repr(e))
            return write_error(request, e)
        self.received.append((cell.cid, cell.payload))
        self.queue.put((cell.cid, message))
        return write_json(request, 200, b"{}")

    async def next_backward(self, timeout: float = 10.0) -> tuple[str, dict]:
        """The next accepted backward cell: (CID, message)."""
        d = self.queue.get()
        d.addTimeout(timeout, current_reactor())
        return await d

    async def next_message(self, timeout: float = 10.0) -> dict:
        """The message of the next accepted backward cell."""
        _, message = await self.next_backward(timeout)
        return message

    async def close(self):
        await self.port.stopListening()
        # The members are gone by now, so their connections close; abort any left.
        for transport in self.site.open_connections():
            transport.abortConnection()
        await poll_until(lambda: defer.succeed(not self.site.open_connections()), timeout=5,
                         what=f"the {self.name}'s connections to close")
        await self.http.close()
