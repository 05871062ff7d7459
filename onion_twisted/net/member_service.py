"""What every member's service tree shares: its data directory, its address,
its outbound HTTP bound to that address, its listener (TLS 1.3 when ``tls``
is on, PROTOCOL.md §14), its timers."""

from __future__ import annotations

import os
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit, setrlimit

from twisted.application import internet, service

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import NextHopFailed
from onion_twisted.net import tls
from onion_twisted.net.tls_transport import BulkTLSFactory
from onion_twisted.net.config import UI_PORT
from onion_twisted.net.http_client import HTTPOutbound
from onion_twisted.net.http_server import QuietSite
from onion_twisted.net.malloc import CAP_INTERVAL, TRIM_INTERVAL, HeapTrimmer


class MemberService(service.MultiService):
    def __init__(self, cfg: dict, reactor=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.cfg = cfg
        os.makedirs(cfg["data_dir"], mode=0o700, exist_ok=True)
        raise_fd_limit()
        self.address = wire.parse_address(cfg["listen"], cfg["port"], field="listen")
        self.tls = cfg["tls"]
        self.outbound = HTTPOutbound(reactor, bind_ip=cfg["listen"], timeout=cfg["hop_timeout"],
                                     max_response=cfg["max_body"] * 2, tls=self.tls)
        self.heap = HeapTrimmer()  # free heap back to the system (malloc.py)
        self.every(TRIM_INTERVAL, self.heap)
        self.every(CAP_INTERVAL, self.heap.cap)

    def _site(self, resource) -> QuietSite:
        return QuietSite(resource, max_body=self.cfg["max_body"], reactor=self.reactor,
                         request_timeout=self.cfg["request_timeout"])

    def listen(self, resource, tls_key=None) -> None:
        """Serve ``resource`` on the member's own IP at the network's port.

        With ``tls`` on, in TLS 1.3 with a certificate of ``tls_key`` (a node's
        RSA key, the tracker's Ed25519 key), or by default of the member's own
        P-256 key in ``data_dir/tls_key.pem`` (a peer's, never pinned).
        """
        site = self._site(resource)
        if self.tls:
            key = tls_key if tls_key is not None else tls.load_or_create_peer_key(self.cfg["data_dir"])
            internet.TCPServer(self.cfg["port"], BulkTLSFactory(tls.server_options(key), False, site, self.reactor),
                               interface=self.cfg["listen"], reactor=self.reactor).setServiceParent(self)
        else:
            internet.TCPServer(self.cfg["port"], site, interface=self.cfg["listen"],
                               reactor=self.reactor).setServiceParent(self)

    @property
    def page_address(self) -> wire.Address:
        """Where the member's page is: ``ui_listen`` (default own IP:8080) with tls, else the network port."""
        if not self.tls:
            return self.address
        if self.cfg.get("ui_listen"):
            return wire.parse_address(self.cfg["ui_listen"], UI_PORT, field="ui_listen")
        return wire.Address(self.address.host, UI_PORT)

    def listen_page(self, resource) -> None:
        """With tls on, also serve ``resource`` (the peer's page) in plain HTTP at ``page_address``."""
        if not self.tls:
            return
        address = self.page_address
        internet.TCPServer(address.port, self._site(resource), interface=address.host,
                           reactor=self.reactor).setServiceParent(self)

    def every(self, seconds: float, call) -> None:
        """Run ``call`` now and every ``seconds`` while the service runs."""
        timer = internet.TimerService(seconds, call)
        timer.clock = self.reactor
        timer.setServiceParent(self)

    async def resolve(self, address: wire.Address) -> str:
        """The IP of an address: itself for a literal, else looked up (502 when it fails)."""
        if address.ip is not None:
            return address.ip
        try:
            return await self.reactor.resolve(address.host, timeout=(1, 3, 11))
        except Exception:
            raise NextHopFailed("that name does not resolve") from None

    def stopService(self):
        d = super().stopService()
        d.addBoth(lambda _: self.outbound.close())
        return d


def raise_fd_limit(ceiling: int = 1 << 20) -> int:
    """Raise the soft limit of open files to the hard one (as Go's runtime does at start).

    Every connection is a descriptor: at a common default of 1 024, a thousand
    idle connections from anyone would leave a member no descriptor to
    accept, or to reach its next hop with. The soft limit after.
    """
    soft, hard = getrlimit(RLIMIT_NOFILE)
    target = ceiling if hard == RLIM_INFINITY else min(hard, ceiling)
    if soft != RLIM_INFINITY and soft < target:
        try:
            setrlimit(RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
