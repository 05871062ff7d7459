"""``twistd onionnode``: the node's service tree.

``makeService`` only builds a MultiService: the listening port, the
registration loop and the expiry loop; everything it wires is made here
from the configuration.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from . import config, crypto, keys, wire
from .circuits import RelayTable
from .directory_client import DirectoryClient
from .malloc import tune_malloc
from .member_service import MemberService
from .node_app import NodeApp
from .ratelimit import RateLimiter
from .relay import NodeRelay

Options = config.options_for("node", "an onion relay node")
log = Logger(namespace="onion_twisted.node")


class NodeService(MemberService):
    """The node's relay, its HTTP listener, its registration and expiry loops."""

    def __init__(self, cfg: dict, reactor=None):
        super().__init__(cfg, reactor)
        self.key = keys.load_or_create_node_key(cfg["data_dir"], cfg["key_bits"])
        tracker = wire.parse_address(cfg["tracker"], cfg["port"], field="tracker")
        self.directory = DirectoryClient(self.reactor, self.outbound, tracker,
                                         tracker_key=cfg["tracker_key"] or None, default_port=cfg["port"],
                                         pin_path=os.path.join(cfg["data_dir"], "tracker_key.pinned"))
        self.table = RelayTable(self.reactor, idle_timeout=cfg["circuit_idle_timeout"],
                                bridge_idle_timeout=cfg["bridge_idle_timeout"],
                                max_circuits=cfg["max_circuits"], max_nonces=cfg["max_nonces"],
                                max_bridges=cfg["max_bridges"])
        self.relay = NodeRelay(
            clock=self.reactor, private_key=self.key, own_address=self.address, tracker=tracker,
            table=self.table, outbound=self.outbound, directory=self.directory,
            limiter=RateLimiter(self.reactor, cfg["create_rate"], cfg["create_burst"]),
            node_limiter=RateLimiter(self.reactor, cfg["node_create_rate"], cfg["node_create_burst"]),
            work_limiter=RateLimiter(self.reactor, cfg["create_work_rate"], cfg["create_work_burst"], max_keys=1),
            resolve=self.resolve, control_max_skew=cfg["control_max_skew"],
            unsafe_logging=cfg["unsafe_logging"])
        self.app = NodeApp(self.relay, self.directory)
        self.listen(self.app.resource())
        self.every(cfg["register_interval"], self.register)
        self.every(min(30.0, cfg["circuit_idle_timeout"] / 4), self.expire)

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

    def stopService(self):
        # Tell neighbours our circuits are gone; the base class then closes pooled connections.
        for circuit in list(self.table.by_in.values()):
            self.table.remove(circuit)
            self.relay.destroy_both_ways(circuit)
        return super().stopService()


def makeService(options) -> service.MultiService:
    tune_malloc()
    return NodeService(options.config)
