"""The cryptography of PROTOCOL.md §2, with no I/O.

* RSA-OAEP (SHA-256, MGF1-SHA-256, no label) carries a 16-byte session key.
* One onion layer is AES-128-GCM: ``nonce(12) || ciphertext || tag(16)``,
  with an AAD naming the direction so a layer can never be reflected back.
* The tracker signs with Ed25519 over the exact body bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from onion_twisted.protocol.errors import BadRequest

FORWARD = b"onion-http/1 forward"
BACKWARD = b"onion-http/1 backward"
NONCE_SIZE = 12
TAG_SIZE = 16
SESSION_KEY_SIZE = 16
MIN_RSA_BITS = 1024

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


# --- RSA node identity -------------------------------------------------------

def generate_node_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_pem(data: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def public_key_pem(key) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        key = key.public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key_pem(text: str) -> rsa.RSAPublicKey:
    """Load a node's published key; BadRequest if it is not an acceptable RSA key."""
    if not isinstance(text, str) or len(text) > 20000:
        raise BadRequest("public_key is not a PEM string")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm):
        raise BadRequest("public_key is not a PEM SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadRequest("public_key is not an RSA key")
    if key.key_size < MIN_RSA_BITS or key.public_numbers().e != 65537:
        raise BadRequest("public_key must be RSA with e=65537 and at least 1024 bits")
    return key


def fingerprint(key) -> str:
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo."""
    if isinstance(key, rsa.RSAPrivateKey):
        key = key.public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def seal_session_key(public_key: rsa.RSAPublicKey, session_key: bytes) -> bytes:
    return public_key.encrypt(session_key, _OAEP)


def open_session_key(private_key: rsa.RSAPrivateKey, sealed: bytes) -> bytes:
    try:
        session_key = private_key.decrypt(sealed, _OAEP)
    except ValueError:
        raise BadRequest("CREATE payload does not decrypt with this node's key") from None
    if len(session_key) != SESSION_KEY_SIZE:
        raise BadRequest("session key is not 16 bytes")
    return session_key


def new_session_key() -> bytes:
    return os.urandom(SESSION_KEY_SIZE)


# --- AES-GCM onion layers -------------------------------------------------------

class Layer:
    """One hop's session key: adds and removes that hop's onion layer.

    Only the 16-byte key is kept. An ``AESGCM`` object holds about 2.4 KiB
    of OpenSSL state, which a node would pay for every idle circuit (most of
    them); building one for each use costs about 1.5 µs, nothing next to a
    cell's HTTP exchange (bench/node_memory.py: per-circuit memory).
    """

    __slots__ = ("_key",)

    def __init__(self, session_key: bytes):
        if len(session_key) != SESSION_KEY_SIZE:
            raise ValueError("session key must be 16 bytes")
        self._key = bytes(session_key)

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + AESGCM(self._key).encrypt(nonce, plaintext, aad)

    def peel(self, layer: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """Return (nonce, plaintext); BadRequest if the layer does not authenticate."""
        if len(layer) < NONCE_SIZE + TAG_SIZE:
            raise BadRequest("layer is shorter than nonce and tag")
        nonce = layer[:NONCE_SIZE]
        try:
            return nonce, AESGCM(self._key).decrypt(nonce, memoryview(layer)[NONCE_SIZE:], aad)
        except InvalidTag:
            raise BadRequest("layer does not decrypt with the circuit's key") from None


def wrap_onion(layers: list[Layer], message: bytes) -> bytes:
    """Forward message for hops [X, Y, Z]: E_X(E_Y(E_Z(m)))."""
    for layer in reversed(layers):
        message = layer.wrap(message, FORWARD)
    return message


def peel_onion(layers: list[Layer], message: bytes) -> bytes:
    """Backward message: the peer removes the layers X, Y, Z in order."""
    for layer in layers:
        _, message = layer.peel(message, BACKWARD)
    return message


# --- Ed25519 tracker signatures ---------------------------------------------------

def generate_tracker_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def tracker_public_b64(key) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        key = key.public_key()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def load_tracker_public_b64(text: str) -> ed25519.Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("tracker key is not base64 of 32 raw Ed25519 bytes") from None


def sign_body(key: ed25519.Ed25519PrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body)).decode("ascii")


def verify_body(public_key: ed25519.Ed25519PublicKey, body: bytes, signature_b64) -> bool:
    if not signature_b64:
        return False
    if isinstance(signature_b64, bytes):
        try:
            signature_b64 = signature_b64.decode("ascii")
        except UnicodeDecodeError:
            return False
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        # One spelling only: the unused low bits of the last base64 digit give
        # 16 texts for one 64-byte signature. Anything keyed on the text would
        # take each for a new message.
        if base64.b64encode(signature).decode("ascii") != signature_b64:
            return False
        public_key.verify(signature, body)
        return True
    except (binascii.Error, ValueError, InvalidSignature):
        return False
