"""The body of ``GET /identity`` (PROTOCOL.md §6): who a member is, for every role."""

from __future__ import annotations

from onion_twisted import PROTOCOL
from onion_twisted.protocol import wire


def identity_json(role: str, address: str, public_key: str | None = None, fingerprint: str | None = None) -> bytes:
    """``{"role", "address", "public_key", "fingerprint", "protocol"}``: a node shows its
    RSA key (PEM), the tracker its Ed25519 key (base64), a peer neither (null)."""
    return wire.dumps({"role": role, "address": address, "public_key": public_key, "fingerprint": fingerprint,
                       "protocol": PROTOCOL})
