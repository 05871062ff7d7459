"""``twistd onionnode``: the node's service tree.

``makeService`` only builds a MultiService: the listening port, the
registration loop, the expiry loop and the onion key's rotation (§11);
everything it wires is made here from the configuration.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from onion_twisted.net import config, keys
from onion_twisted.protocol import crypto, wire
from onion_twisted.node.circuits import RelayTable
from onion_twisted.protocol.directory import DepartureWatch
from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.net.malloc import tune_malloc
from onion_twisted.net.member_service import MemberService
from onion_twisted.node.app import NodeApp
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.relay import NodeRelay

Options = config.options_for("node", "an onion relay node")
# Seconds after start at which a node fetches the directory again, within its first period: a
# network started all at once (the README's) would otherwise leave the first nodes mirroring a
# directory that lists only the nodes registered before them, and peers asking them would see
# too few nodes for a circuit until the next period.
STARTUP_FETCHES = (1.0, 2.0, 4.0, 8.0, 16.0)
ROTATION_CHECK = 300.0  # seconds between checks of the onion key's age
log = Logger(namespace="onion_twisted.node")


class NodeService(MemberService):
    """The node's relay, its HTTP listener, its registration and expiry loops."""

    def __init__(self, cfg: dict, reactor=None):
        super().__init__(cfg, reactor)
        self.key = keys.load_or_create_node_key(cfg["data_dir"], cfg["key_bits"])
        lifetime = cfg["onion_key_lifetime"]
        self.onion_keys = (keys.load_or_create_onion_keys(cfg["data_dir"], self.reactor, lifetime)
                           if cfg["speak_v2"] else None)
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
            unsafe_logging=cfg["unsafe_logging"], onion_keys=self.onion_keys,
            accept_v1=cfg["accept_v1"], speak_v2=cfg["speak_v2"])
        self.app = NodeApp(self.relay, self.directory, metrics_allow=cfg["metrics_allow"])
        self.outbound.pin_for = self.directory.pin_for  # TLS: nodes and the tracker pinned (§14)
        self.listen(self.app.resource(), tls_key=self.key)
        self._retry = None          # the registration retry, while one is due
        self._retry_delay = 1.0
        self._startup_fetches = []
        self.departures = DepartureWatch(grace=cfg["register_interval"])
        self.every(cfg["register_interval"], self.register)
        self.every(min(30.0, cfg["circuit_idle_timeout"] / 4), self.expire)
        # Often enough that a key is replaced within minutes of its due time and a
        # retired one leaves the disk within minutes of its grace's end.
        if self.onion_keys is not None:
            self.every(min(ROTATION_CHECK, lifetime / 4), self.rotate_onion_key)

    def register(self) -> defer.Deferred:
        """Register at the tracker, then refresh the directory (start and every period).

        A failed registration is tried again after 1 s, 2 s, 4 s ... up to the
        period: a node started beside its tracker (the README's network, a
        reboot) would otherwise wait a whole ``register_interval`` to join.
        """
        async def go():
            try:
                await self.directory.register(self.address, crypto.public_key_pem(self.key),
                                              onion_key=self.onion_keys.current_public if self.onion_keys else None)
                self._retry_delay = 1.0
            except Exception as e:
                log.warn("registration at the tracker failed: {why}", why=getattr(e, "detail", repr(e)))
                self._register_again()
            await self.fetch_directory()
        return defer.ensureDeferred(go())

    def fetch_directory(self) -> defer.Deferred:
        async def go():
            try:
                await self.directory.fetch()
            except Exception as e:
                log.warn("directory fetch failed: {why}", why=getattr(e, "detail", repr(e)))
                return
            self.close_circuits_through(self.departures.update(self.directory.current))
        return defer.ensureDeferred(go())

    def close_circuits_through(self, departed) -> None:
        """Close the circuits through nodes that left the directory (docs choice 70).

        Their other side would otherwise keep them until ``circuit_idle_timeout``: an
        exit whose middle died still holds its circuit, and the tracker still lists the
        circuit's files as a source nobody can reach. As at a link-level close (§14),
        the destroy goes to the neighbour still there; it passes it on (§9).
        """
        if not departed:
            return
        closed = self.table.drop_through(departed)
        for circuit in closed:
            self.relay.destroy_both_ways(circuit, departed)
        if closed:
            self.relay.metrics.neighbour_left(len(closed))
            log.info("{n} circuits closed: a neighbouring node left the directory", n=len(closed))

    def _register_again(self) -> None:
        if not self.running or (self._retry is not None and self._retry.active()):
            return
        delay = min(self._retry_delay, self.cfg["register_interval"])
        self._retry_delay = delay * 2
        self._retry = self.reactor.callLater(delay, self.register)

    def rotate_onion_key(self):
        """Rotate the onion key when due (§11): saved at once, then registered again so the
        directory lists the new key; a previous key past its grace is dropped from disk too."""
        ring = self.onion_keys
        before = (ring.current_public, ring.retired)
        rotated = ring.rotate_if_due()
        if (ring.current_public, ring.retired) != before:
            keys.save_onion_keys(self.cfg["data_dir"], ring)
        if rotated:
            log.info("onion key rotated; registering the new one")
            return self.register()
        return None

    def expire(self) -> None:
        for circuit in self.table.expire():
            self.relay.destroy_both_ways(circuit)

    def startService(self):
        log.info("onion node {fp} listening on port {port}", fp=crypto.fingerprint(self.key),
                 port=self.cfg["port"])
        super().startService()
        self._startup_fetches = [self.reactor.callLater(delay, self.fetch_directory)
                                 for delay in STARTUP_FETCHES if delay < self.cfg["register_interval"]]

    def stopService(self):
        for call in [self._retry, *self._startup_fetches]:
            if call is not None and call.active():
                call.cancel()
        # Tell neighbours our circuits are gone; the base class then closes pooled connections.
        for circuit in list(self.table.by_in.values()):
            self.table.remove(circuit)
            self.relay.destroy_both_ways(circuit)
        return super().stopService()


def makeService(options) -> service.MultiService:
    tune_malloc()
    return NodeService(options.config)
