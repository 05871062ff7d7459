"""The seams between the parts, as zope interfaces.

Each part takes what it talks to through one of these, so tests hand it an
in-memory stand-in (tests/support/fakes.py) that ``verifyObject`` checks
against the same interface as the real one.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IOutbound(Interface):
    """HTTP to other members: ``net.http_client.HTTPOutbound`` in a member."""

    def post(address, body, headers=None, path="/"):
        """POST ``body`` to ``address``; a Deferred of the body of its 200 answer.

        Fails with ``protocol.errors.NextHopFailed`` (or ``NextHopTimeout``)
        when the member cannot be reached or answers other than 200.
        """

    def get(address, path):
        """GET ``path`` at ``address``; a Deferred of ``(status, headers, body)``, any status."""

    def close():
        """Drop pooled connections; a Deferred that fires when they are closed."""


class IDirectorySource(Interface):
    """The tracker's signed directory as a member sees it (``net.directory_client``)."""

    current = Attribute("The last verified ``SignedDirectory``, or None.")

    def tracker_key():
        """A Deferred of the tracker's public key, or of None when it cannot be learned."""

    def fetch():
        """A Deferred of the directory fetched from the tracker and verified."""

    def fetch_from(source):
        """A Deferred of the directory fetched from ``source`` (tracker or mirror)."""

    def knows(address):
        """A Deferred of whether ``address`` is a listed node (refetching, rate-limited)."""

    def register(own_address, public_key_pem, onion_key=None):
        """A Deferred that fires once the tracker has this node's entry (with its onion key, §10)."""

    def pin_for(address):
        """The TLS fingerprint pinned for ``address`` (§14): a listed node's, the tracker's, or None."""

    def save(path):
        """Keep the verified directory on disk."""

    def load(path):
        """Reload a directory saved earlier; True when its signature still verifies."""
