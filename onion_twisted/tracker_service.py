"""``twistd oniontracker``: the tracker's service tree."""

from __future__ import annotations

import os

from twisted.application import internet, service
from twisted.logger import Logger

from .malloc import tune_malloc
from . import config, crypto, keys, wire
from .catalogue import Catalogue
from .http_client import HTTPOutbound
from .http_server import QuietSite
from .errors import NextHopFailed
from .registry import NodeRegistry
from .tracker import Tracker
from .tracker_app import TrackerApp

Options = config.options_for("tracker", "the network's tracker and directory")
log = Logger(namespace="onion_twisted.tracker")


class TrackerService(service.MultiService):
    def __init__(self, cfg: dict, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.cfg = cfg
        os.makedirs(cfg["data_dir"], mode=0o700, exist_ok=True)
        self.key = keys.load_or_create_tracker_key(cfg["data_dir"])
        address = wire.parse_address(cfg["listen"], cfg["port"], field="listen")
        self.outbound = HTTPOutbound(reactor, bind_ip=cfg["listen"], timeout=cfg["hop_timeout"],
                                     max_response=cfg["max_body"] * 2)
        catalogue = Catalogue(reactor, idle_timeout=cfg["circuit_idle_timeout"], max_circuits=cfg["max_circuits"],
                              max_files=cfg["max_files_per_circuit"], max_entries=cfg["max_catalogue_entries"],
                              max_listing=cfg["max_listing"], listing_refresh=cfg["listing_refresh"])
        registry = NodeRegistry(reactor, self.key, heartbeat=cfg["heartbeat"], max_nodes=cfg["max_nodes"])
        self.tracker = Tracker(clock=reactor, signing_key=self.key, own_address=address, catalogue=catalogue,
                               registry=registry, outbound=self.outbound, resolve=self._resolve,
                               max_pending=cfg["max_pending"])
        site = QuietSite(TrackerApp(self.tracker).resource(), max_body=cfg["max_body"], reactor=reactor)
        internet.TCPServer(cfg["port"], site, interface=cfg["listen"], reactor=reactor).setServiceParent(self)
        expire = internet.TimerService(min(10.0, cfg["heartbeat"]), self.tracker.expire)
        expire.clock = reactor
        expire.setServiceParent(self)
        if cfg["listing_refresh"] > 0:
            refresh = internet.TimerService(cfg["listing_refresh"], self._refresh_listing)
            refresh.clock = reactor
            refresh.setServiceParent(self)

    def _refresh_listing(self) -> None:
        if self.tracker.catalogue.dirty:
            self.tracker.catalogue.refresh_listing()

    async def _resolve(self, address: wire.Address) -> str:
        if address.ip is not None:
            return address.ip
        try:
            return await self.reactor.resolve(address.host, timeout=(1, 3, 11))
        except Exception:
            raise NextHopFailed("that name does not resolve") from None

    def startService(self):
        log.info("onion tracker {key} listening on port {port}",
                 key=crypto.tracker_public_b64(self.key), port=self.cfg["port"])
        super().startService()

    def stopService(self):
        d = super().stopService()
        d.addBoth(lambda _: self.outbound.close())
        return d


def makeService(options) -> service.MultiService:
    tune_malloc()
    return TrackerService(options.config)
