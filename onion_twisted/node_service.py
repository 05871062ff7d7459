"""``twistd onionnode``: the node's service tree.

``makeService`` only builds a MultiService: the listening port, the
registration loop and the expiry loop; everything it wires is made here
from the configuration.
"""

from __future__ import annotations

import os

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger

from .malloc import tune_malloc
from . import config, crypto, keys, wire
from .circuits import RelayTable
from .directory_client import DirectoryClient
from .http_client import HTTPOutbound
from .http_server import QuietSite
from .node_app import NodeApp
from .ratelimit import RateLimiter
from .errors import NextHopFailed
from .relay import NodeRelay

Options = config.options_for("node", "an onion relay node")
log = Logger(namespace="onion_twisted.node")


class NodeService(service.MultiService):
    """The node's relay, its HTTP listener, its registration and expiry loops."""

    def __init__(self, cfg: dict, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.cfg = cfg
        os.makedirs(cfg["data_dir"], mode=0o700, exist_ok=True)
        self.key = keys.load_or_create_node_key(cfg["data_dir"], cfg["key_bits"])
        port = cfg["port"]
        self.address = wire.parse_address(cfg["listen"], port, field="listen")
        tracker = wire.parse_address(cfg["tracker"], port, field="tracker")
        self.outbound = HTTPOutbound(reactor, bind_ip=cfg["listen"], timeout=cfg["hop_timeout"],
                                     max_response=cfg["max_body"] * 2)
        self.directory = DirectoryClient(reactor, self.outbound, tracker,
                                         tracker_key=cfg["tracker_key"] or None, default_port=port,
                                         pin_path=os.path.join(cfg["data_dir"], "tracker_key.pinned"))
        self.table = RelayTable(reactor, idle_timeout=cfg["circuit_idle_timeout"],
                                bridge_idle_timeout=cfg["bridge_idle_timeout"],
                                max_circuits=cfg["max_circuits"], max_nonces=cfg["max_nonces"],
                                max_bridges=cfg["max_bridges"])
        self.relay = NodeRelay(
            clock=reactor, private_key=self.key, own_address=self.address, tracker=tracker,
            table=self.table, outbound=self.outbound, directory=self.directory,
            limiter=RateLimiter(reactor, cfg["create_rate"], cfg["create_burst"]),
            resolve=self._resolve, control_max_skew=cfg["control_max_skew"],
            unsafe_logging=cfg["unsafe_logging"])
        self.app = NodeApp(self.relay, self.directory)
        site = QuietSite(self.app.resource(), max_body=cfg["max_body"], reactor=reactor)
        internet.TCPServer(port, site, interface=cfg["listen"], reactor=reactor).setServiceParent(self)
        register = internet.TimerService(cfg["register_interval"], self.register)
        register.clock = reactor
        register.setServiceParent(self)
        expire = internet.TimerService(min(30.0, cfg["circuit_idle_timeout"] / 4), self.expire)
        expire.clock = reactor
        expire.setServiceParent(self)

    async def _resolve(self, address: wire.Address) -> str:
        if address.ip is not None:
            return address.ip
        try:
            return await self.reactor.resolve(address.host, timeout=(1, 3, 11))
        except Exception:
            raise NextHopFailed("next hop's name does not resolve") from None

    def register(self) -> defer.Deferred:
        """Register at the tracker, then refresh the directory (start and every period)."""
        async def go():
            try:
                await self.directory.register(self.address, crypto.public_key_pem(self.key))
            except Exception as e:
                log.warn("registration at the tracker failed: {why}", why=getattr(e, "detail", repr(e)))
            try:
                await self.directory.fetch()
            except Exception as e:
                log.warn("directory fetch failed: {why}", why=getattr(e, "detail", repr(e)))
        return defer.ensureDeferred(go())

    def expire(self) -> None:
        for circuit in self.table.expire():
            self.relay.destroy_both_ways(circuit)

    def startService(self):
        log.info("onion node {fp} listening on port {port}", fp=crypto.fingerprint(self.key),
                 port=self.cfg["port"])
        super().startService()

    @defer.inlineCallbacks
    def stopService(self):
        # Tell neighbours our circuits are gone, then close pooled connections.
        for circuit in list(self.table.by_in.values()):
            self.table.remove(circuit)
            self.relay.destroy_both_ways(circuit)
        yield super().stopService()
        yield self.outbound.close()


def makeService(options) -> service.MultiService:
    tune_malloc()
    return NodeService(options.config)
