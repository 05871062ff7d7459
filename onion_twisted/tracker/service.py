"""``twistd oniontracker``: the tracker's service tree."""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from onion_twisted.net import config, keys
from onion_twisted.protocol import crypto
from onion_twisted.tracker.catalogue import Catalogue
from onion_twisted.net.malloc import tune_malloc
from onion_twisted.net.member_service import MemberService
from onion_twisted.tracker.registry import NodeRegistry
from onion_twisted.tracker.tracker import Tracker
from onion_twisted.tracker.app import TrackerApp

Options = config.options_for("tracker", "the network's tracker and directory")
log = Logger(namespace="onion_twisted.tracker")


class TrackerService(MemberService):
    def __init__(self, cfg: dict, reactor=None):
        super().__init__(cfg, reactor)
        self.key = keys.load_or_create_tracker_key(cfg["data_dir"])
        lifetime = cfg["onion_key_lifetime"]
        self.onion_keys = keys.load_or_create_onion_keys(cfg["data_dir"], self.reactor, lifetime)
        catalogue = Catalogue(self.reactor, idle_timeout=cfg["circuit_idle_timeout"],
                              max_circuits=cfg["max_circuits"], max_files=cfg["max_files_per_circuit"],
                              max_entries=cfg["max_catalogue_entries"],
                              max_entries_per_exit=cfg["max_entries_per_exit"], max_listing=cfg["max_listing"],
                              listing_refresh=cfg["listing_refresh"])
        registry = NodeRegistry(self.reactor, self.key, heartbeat=cfg["heartbeat"], max_nodes=cfg["max_nodes"])
        self.tracker = Tracker(clock=self.reactor, signing_key=self.key, own_address=self.address,
                               catalogue=catalogue, registry=registry, outbound=self.outbound,
                               resolve=self.resolve, max_pending=cfg["max_pending"],
                               onion_keys=self.onion_keys)
        self.outbound.pin_for = lambda address: getattr(registry.nodes.get(address), "fingerprint", None)
        self.listen(TrackerApp(self.tracker, metrics_allow=cfg["metrics_allow"]).resource(), tls_key=self.key)
        self.every(min(10.0, cfg["heartbeat"]), self.tracker.expire)
        # A rotation is due at most every lifetime; checked often enough that the new key,
        # and the end of the old one's grace, come within a minute of their time.
        self.every(min(60.0, lifetime / 4), self._rotate_onion_key)
        if cfg["listing_refresh"] > 0:
            self.every(cfg["listing_refresh"], self._refresh_listing)

    def _rotate_onion_key(self) -> None:
        if self.tracker.rotate_onion_key():
            keys.save_onion_keys(self.cfg["data_dir"], self.onion_keys)
            log.info("the tracker's onion key rotated")

    def _refresh_listing(self) -> None:
        # A large catalogue's files reply is rebuilt here, off the message path.
        if self.tracker.catalogue.dirty:
            self.tracker.catalogue.refresh_listing()

    def startService(self):
        log.info("onion tracker {key} listening on port {port}",
                 key=crypto.tracker_public_b64(self.key), port=self.cfg["port"])
        super().startService()


def makeService(options) -> service.MultiService:
    tune_malloc()
    return TrackerService(options.config)
