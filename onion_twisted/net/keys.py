"""Identity keys on disk: made on first start, mode 0600, reused after a restart."""

from __future__ import annotations

import os
from pathlib import Path

from onion_twisted.protocol import crypto
from onion_twisted.net.files import atomic_write


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # atomic_write's temporary file is 0600 before a byte of the key is in it.
    atomic_write(path, data, mode=0o600)


def load_or_create_node_key(data_dir, bits: int = 2048):
    path = Path(data_dir) / "node_key.pem"
    if path.exists():
        os.chmod(path, 0o600)
        return crypto.load_private_key_pem(path.read_bytes())
    key = crypto.generate_node_key(bits)
    _write_private(path, crypto.private_key_pem(key))
    return key


def load_or_create_tracker_key(data_dir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(data_dir) / "tracker_key"
    if path.exists():
        os.chmod(path, 0o600)
        return ed25519.Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    key = crypto.generate_tracker_key()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    _write_private(path, raw)
    return key


ONION_KEYS_FILE = "onion_keys.json"


def load_or_create_onion_keys(data_dir, clock, lifetime: float):
    """The member's X25519 onion keys (§11), rotated if due; saved at once, mode 0600.

    An unreadable state file is replaced by a fresh ring: clients holding the
    old key then fail their handshake and fetch the directory again.
    """
    from onion_twisted.protocol.onion_keys import OnionKeyRing

    path = Path(data_dir) / ONION_KEYS_FILE
    ring = None
    if path.exists():
        os.chmod(path, 0o600)
        try:
            ring = OnionKeyRing.from_json(clock, path.read_bytes(), lifetime)
        except ValueError:
            ring = None
    if ring is None:
        ring = OnionKeyRing(clock, lifetime)
    save_onion_keys(data_dir, ring)
    return ring


def save_onion_keys(data_dir, ring) -> None:
    """Write the ring after a rotation (the retired key must not outlive its grace on disk)."""
    _write_private(Path(data_dir) / ONION_KEYS_FILE, ring.to_json())
