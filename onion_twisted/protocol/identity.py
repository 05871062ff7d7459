"""The body of ``GET /identity`` (PROTOCOL.md §6, §10): who a member is, for every role."""

from __future__ import annotations

import base64

from onion_twisted import PROTOCOL, PROTOCOLS
from onion_twisted.protocol import wire


def identity_json(role: str, address: str, public_key: str | None = None, fingerprint: str | None = None, *,
                  protocols=PROTOCOLS, onion_key: bytes | None = None) -> bytes:
    """``{"role", "address", "public_key", "fingerprint", "protocol", "protocols"}``: a node
    shows its RSA key (PEM), the tracker its Ed25519 key (base64), a peer neither (null).
    ``protocol`` is the highest version spoken (§10); a node or tracker of /2 adds its
    X25519 ``onion_key`` (base64 of 32 bytes)."""
    body = {"role": role, "address": address, "public_key": public_key, "fingerprint": fingerprint,
            "protocol": max(protocols) if protocols else PROTOCOL, "protocols": list(protocols)}
    if onion_key is not None:
        body["onion_key"] = base64.b64encode(onion_key).decode("ascii")
    return wire.dumps(body)
