"""A member's X25519 onion keys and their rotation (PROTOCOL.md §11, §12), with no I/O.

The current key is published (``/identity``, the directory); after
``lifetime`` seconds a new one replaces it, and the old one is still
accepted for ``grace`` seconds, so a client holding an older directory can
still build through this member. A key older than that is forgotten: what
it authenticated can no longer be answered by anyone holding this state.
The state is saved as JSON (``to_json``; the caller writes it with mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import json

from cryptography.hazmat.primitives.asymmetric import x25519

from onion_twisted.protocol.ntor import raw_public

DEFAULT_LIFETIME = 7 * 24 * 3600.0
ONION_KEY_GRACE = 24 * 3600.0


def _private_raw(key: x25519.X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


class OnionKeyRing:
    def __init__(self, clock, lifetime: float = DEFAULT_LIFETIME, grace: float = ONION_KEY_GRACE, *,
                 current=None, created: float | None = None, previous=None, retired: float | None = None):
        if lifetime <= 0:
            raise ValueError("onion_key_lifetime must be positive")
        self.clock = clock
        self.lifetime = lifetime
        self.grace = grace
        now = clock.seconds()
        self._current = current or x25519.X25519PrivateKey.generate()
        self.created = now if created is None else created
        self._previous = previous
        self.retired = retired  # when the previous key stopped being current
        self._current_public = raw_public(self._current)
        self._previous_public = raw_public(previous) if previous is not None else None

    @property
    def current_public(self) -> bytes:
        return self._current_public

    @property
    def next_rotation(self) -> float:
        return self.created + self.lifetime

    def private_for(self, public: bytes):
        """The private key whose public half is ``public``: current, or previous in its grace; else None."""
        if public == self._current_public:
            return self._current
        if (self._previous_public is not None and public == self._previous_public
                and self.clock.seconds() - self.retired <= self.grace):
            return self._previous
        return None

    def rotate_if_due(self) -> bool:
        """Rotate when the current key has lived its lifetime; drop a previous key past its grace."""
        now = self.clock.seconds()
        rotated = False
        if now >= self.next_rotation:
            self._previous, self._previous_public, self.retired = self._current, self._current_public, now
            self._current = x25519.X25519PrivateKey.generate()
            self._current_public = raw_public(self._current)
            self.created = now
            rotated = True
        if self._previous is not None and now - self.retired > self.grace:
            self._previous = self._previous_public = self.retired = None
        return rotated

    def to_json(self) -> bytes:
        def entry(key, at):
            return {"private": base64.b64encode(_private_raw(key)).decode("ascii"), "created": at}
        state = {"current": entry(self._current, self.created),
                 "previous": entry(self._previous, self.retired) if self._previous is not None else None}
        return json.dumps(state, sort_keys=True).encode("ascii")

    @classmethod
    def from_json(cls, clock, data: bytes, lifetime: float = DEFAULT_LIFETIME,
                  grace: float = ONION_KEY_GRACE) -> "OnionKeyRing":
        """A ring from saved state; ValueError if it is not one (the caller then makes a new ring)."""
        try:
            state = json.loads(data)
            current = _load(state["current"]["private"])
            created = float(state["current"]["created"])
            previous = retired = None
            if state.get("previous"):
                previous = _load(state["previous"]["private"])
                retired = float(state["previous"]["created"])
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ValueError(f"onion key state is unreadable: {e}") from None
        ring = cls(clock, lifetime, grace, current=current, created=created, previous=previous, retired=retired)
        ring.rotate_if_due()
        return ring


def _load(text: str) -> x25519.X25519PrivateKey:
    raw = base64.b64decode(text, validate=True)
    return x25519.X25519PrivateKey.from_private_bytes(raw)


def parse_onion_key(value, field: str = "onion_key") -> bytes:
    """The 32 raw bytes of a published onion key (base64); ValueError otherwise."""
    if not isinstance(value, str) or len(value) != 44:
        raise ValueError(f"{field} is not base64 of 32 bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{field} is not base64 of 32 bytes") from None
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != value:
        raise ValueError(f"{field} is not base64 of 32 bytes")
    return raw
