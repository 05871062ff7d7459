"""The tests' stand-ins for the seams of ``onion_twisted.protocol.interfaces``, written once.

* ``FakeOutbound`` (``IOutbound``): records every POST and GET and answers
  from scripted routes; a route's refusal reaches the caller as
  ``HTTPOutbound`` reports a non-200 answer. A test that needs other answers
  subclasses it and overrides ``answer`` (one POST) or ``get``.
* ``FakeDirectory`` (``IDirectorySource``): a directory already fetched and
  verified (``current``), the tracker's key, and a record of what was asked.

tests/test_fakes.py checks both, and the real classes, with ``verifyObject``
against the same interface, so a seam that changes breaks the fakes' test
rather than passing silently in every test that uses a fake.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet import defer
from zope.interface import implementer

from onion_twisted.protocol import cells, wire
from onion_twisted.protocol.directory import SignedDirectory
from onion_twisted.protocol.errors import NextHopFailed, ProtocolError
from onion_twisted.protocol.interfaces import IDirectorySource, IOutbound


class Sent(NamedTuple):
    """One POST the fake was given."""

    address: wire.Address
    body: bytes
    headers: dict | None
    path: str

    @property
    def cell(self) -> cells.Cell:
        return cells.parse_cell(self.body)


@implementer(IOutbound)
class FakeOutbound:
    """``post`` records a ``Sent`` and answers from ``routes[address](body)``.

    A route returns the 200 body (bytes) or a Deferred of it, or raises a
    ``ProtocolError``: with ``as_http`` (the default) the caller then gets
    what ``HTTPOutbound`` gives for a non-200, ``NextHopFailed`` with the
    status in ``.answered``; without, the route's own error. An address with
    no route (and no ``default`` route) refuses the connection.

    ``get`` answers ``pages[address]``: ``(status, body)``, or an exception
    to fail with; an address without a page is unreachable.
    """

    unreachable = "next hop refused the connection"

    def __init__(self, routes=None, *, default=None, pages=None, as_http: bool = True, record: bool = True):
        self.routes: dict = dict(routes or {})
        self.default = default
        self.pages: dict = dict(pages or {})
        self.as_http = as_http
        # A member of a long in-memory transfer keeps nothing: every chunk would stay in ``sent``.
        self.record = record
        self.sent: list[Sent] = []
        self.gets: list[tuple[wire.Address, str]] = []
        self.closed = False

    def post(self, address, body, headers=None, path="/") -> defer.Deferred:
        sent = Sent(address, bytes(body), headers, path)
        if self.record:
            self.sent.append(sent)
        return self.answer(sent)

    def answer(self, sent: Sent) -> defer.Deferred:
        """The answer to one POST; subclasses that stand for more than routes override it."""
        route = self.routes.get(sent.address, self.default)
        if route is None:
            return defer.fail(NextHopFailed(self.unreachable))
        try:
            answer = route(sent.body)
        except ProtocolError as e:
            if not self.as_http:
                return defer.fail()
            error = NextHopFailed(f"next hop answered {e.status} {e.error}")
            error.answered = e.status
            return defer.fail(error)
        return answer if isinstance(answer, defer.Deferred) else defer.succeed(answer)

    def get(self, address, path) -> defer.Deferred:
        if self.record:
            self.gets.append((address, path))
        page = self.pages.get(address)
        if page is None:
            return defer.fail(NextHopFailed(self.unreachable))
        if isinstance(page, Exception):
            return defer.fail(page)
        status, body = page
        return defer.succeed((status, {}, body))

    def close(self) -> defer.Deferred:
        self.closed = True
        return defer.succeed(None)

    def to(self, address) -> list[Sent]:
        return [s for s in self.sent if s.address == address]


def listing(addresses) -> SignedDirectory:
    """A directory that lists ``addresses`` (no keys, no signature: for ``in`` and ``node_ips``)."""
    nodes = {address: None for address in addresses}
    return SignedDirectory(b"{}", "", 0, nodes, frozenset(address.ip for address in nodes if address.ip))


@implementer(IDirectorySource)
class FakeDirectory:
    """A directory source that already holds ``current`` (a ``SignedDirectory`` or None).

    ``knows`` answers from ``current`` and records each address asked;
    ``tracker_key`` answers ``key``; ``fetch`` and ``fetch_from`` answer
    ``current``, or fail as an unreachable tracker when it is None.
    """

    def __init__(self, current: SignedDirectory | None = None, key=None):
        self.current = current
        self.key = key
        self.asked: list[wire.Address] = []
        self.registered: list[tuple[wire.Address, str]] = []
        self.onion_keys_registered: list[bytes | None] = []
        self.saved: list = []

    async def tracker_key(self):
        return self.key

    def fetch(self) -> defer.Deferred:
        if self.current is None:
            return defer.fail(NextHopFailed("no directory in this test"))
        return defer.succeed(self.current)

    def fetch_from(self, source) -> defer.Deferred:
        return self.fetch()

    async def knows(self, address) -> bool:
        self.asked.append(address)
        return self.current is not None and address in self.current

    async def register(self, own_address, public_key_pem, onion_key=None) -> None:
        self.registered.append((own_address, public_key_pem))
        self.onion_keys_registered.append(onion_key)

    def pin_for(self, address):
        return None

    def save(self, path) -> None:
        self.saved.append(path)

    def load(self, path) -> bool:
        return False
