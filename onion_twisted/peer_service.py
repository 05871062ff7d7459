"""``twistd onionpeer``: the peer's service tree."""

from __future__ import annotations

import os

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger

from .malloc import tune_malloc
from . import config, wire
from .directory_client import DirectoryClient
from .downloads import DownloadStore
from .http_client import HTTPOutbound
from .http_server import QuietSite
from .peer import Peer
from .peer_app import PeerApp
from .sharing import HashCache, ShareDirectory

Options = config.options_for("peer", "a peer: shares and downloads files, serves its page")
log = Logger(namespace="onion_twisted.peer")


class PeerService(service.MultiService):
    def __init__(self, cfg: dict, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.cfg = cfg
        os.makedirs(cfg["data_dir"], mode=0o700, exist_ok=True)
        os.makedirs(cfg["share"], exist_ok=True)
        port = cfg["port"]
        self.address = wire.parse_address(cfg["listen"], port, field="listen")
        tracker = wire.parse_address(cfg["tracker"], port, field="tracker")
        self.outbound = HTTPOutbound(reactor, bind_ip=cfg["listen"], timeout=cfg["hop_timeout"],
                                     max_response=cfg["max_body"] * 2)
        directory = DirectoryClient(reactor, self.outbound, tracker, tracker_key=cfg["tracker_key"] or None,
                                    default_port=port,
                                    pin_path=os.path.join(cfg["data_dir"], "tracker_key.pinned"))
        share = ShareDirectory(cfg["share"], HashCache(cfg["data_dir"]))
        self.peer = Peer(clock=reactor, outbound=self.outbound, directory=directory, tracker=tracker,
                         share=share, store=DownloadStore(cfg["downloads"]), data_dir=cfg["data_dir"],
                         bootstrap=cfg["bootstrap"], hops=cfg["hops"], window=cfg["window"],
                         chunk_size=cfg["chunk_size"], max_attempts=cfg["max_attempts"],
                         stall_timeout=cfg["stall_timeout"], refresh_interval=cfg["refresh_interval"],
                         announce_interval=cfg["announce_interval"], unsafe_logging=cfg["unsafe_logging"],
                         max_uploads=cfg["max_uploads"])
        app = PeerApp(self.peer, ui_allow=cfg["ui_allow"], address=str(self.address))
        site = QuietSite(app.resource(), max_body=cfg["max_body"], reactor=reactor)
        internet.TCPServer(port, site, interface=cfg["listen"], reactor=reactor).setServiceParent(self)
        tick = internet.TimerService(cfg["rescan_interval"], lambda: defer.ensureDeferred(self.peer.tick()))
        tick.clock = reactor
        tick.setServiceParent(self)

    def startService(self):
        super().startService()
        log.info("onion peer listening on port {port}; its page is at http://{address}/",
                 port=self.cfg["port"], address=str(self.address))
        defer.ensureDeferred(self.peer.start()).addErrback(lambda f: log.failure("peer failed to start", f))

    @defer.inlineCallbacks
    def stopService(self):
        yield defer.ensureDeferred(self.peer.stop())
        yield super().stopService()
        yield self.outbound.close()


def makeService(options) -> service.MultiService:
    tune_malloc()
    return PeerService(options.config)
