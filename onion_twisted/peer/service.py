"""``twistd onionpeer``: the peer's service tree."""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from onion_twisted.net import config
from onion_twisted.protocol import wire
from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.net.malloc import tune_malloc
from onion_twisted.net.member_service import MemberService
from onion_twisted.peer.peer import Peer
from onion_twisted.peer.app import PeerApp
from onion_twisted.peer.sharing import HashCache, ShareDirectory

Options = config.options_for("peer", "a peer: shares and downloads files, serves its page")
log = Logger(namespace="onion_twisted.peer")


class PeerService(MemberService):
    def __init__(self, cfg: dict, reactor=None):
        super().__init__(cfg, reactor)
        os.makedirs(cfg["share"], exist_ok=True)
        tracker = wire.parse_address(cfg["tracker"], cfg["port"], field="tracker")
        directory = DirectoryClient(self.reactor, self.outbound, tracker, tracker_key=cfg["tracker_key"] or None,
                                    default_port=cfg["port"],
                                    pin_path=os.path.join(cfg["data_dir"], "tracker_key.pinned"))
        share = ShareDirectory(cfg["share"], HashCache(cfg["data_dir"]))
        self.peer = Peer(clock=self.reactor, outbound=self.outbound, directory=directory, tracker=tracker,
                         share=share, store=DownloadStore(cfg["downloads"]), data_dir=cfg["data_dir"],
                         bootstrap=cfg["bootstrap"], hops=cfg["hops"], window=cfg["window"],
                         window_by_delay=cfg["window_by_delay"],
                         chunk_size=cfg["chunk_size"], max_attempts=cfg["max_attempts"],
                         stall_timeout=cfg["stall_timeout"], refresh_interval=cfg["refresh_interval"],
                         announce_interval=cfg["announce_interval"], unsafe_logging=cfg["unsafe_logging"],
                         max_uploads=cfg["max_uploads"], max_sources=cfg["max_sources"],
                         max_upload_rate=cfg["max_upload_rate"], seed_downloads=cfg["seed_downloads"],
                         max_circuits=cfg["max_circuits"], circuit_lifetime=cfg["circuit_lifetime"])
        self.outbound.pin_for = directory.pin_for
        page = PeerApp(self.peer, ui_allow=cfg["ui_allow"], address=str(self.address), name=cfg["name"]).resource()
        self.listen(page)
        self.listen_page(page)  # with tls: the page in plain HTTP at ui_listen too
        self.every(cfg["rescan_interval"], lambda: defer.ensureDeferred(self.peer.tick()))

    def startService(self):
        super().startService()
        log.info("onion peer listening on port {port}; its page is at http://{address}/",
                 port=self.cfg["port"], address=str(self.page_address))
        defer.ensureDeferred(self.peer.start()).addErrback(lambda f: log.failure("peer failed to start", f))

    @defer.inlineCallbacks
    def stopService(self):
        yield defer.ensureDeferred(self.peer.stop())
        yield super().stopService()


def makeService(options) -> service.MultiService:
    tune_malloc()
    return PeerService(options.config)
