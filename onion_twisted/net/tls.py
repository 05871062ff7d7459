"""TLS 1.3 on every link (PROTOCOL.md §14), over pyOpenSSL through Twisted.

* Certificates are self-signed, made at start from the member's own key: a
  node's is its RSA identity key (so the directory's ``fingerprint`` is the
  pin), the tracker's its Ed25519 key, a peer's a P-256 key of its own kept
  in ``data_dir/tls_key.pem`` (0600), never pinned. Names and dates in the
  certificate carry no meaning: only its key is checked.
* ``server_options(key)``: what a member listens with, TLS 1.3 only.
* ``PinningPolicy(pin_for)``: the client side for an Agent's endpoints, TLS
  1.3 only; when ``pin_for(address)`` knows a pin (hex SHA-256 of the SPKI
  DER) the handshake fails unless the server's key has it; when it knows
  none the key is not checked (a peer's: the circuit's layers authenticate
  what it sends).
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL import crypto as ossl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from onion_twisted.net.files import atomic_write
from onion_twisted.protocol import wire

PIN_MISMATCH = "TLS key does not match the pinned fingerprint"
PEER_KEY_FILE = "tls_key.pem"
_VALIDITY = datetime.timedelta(days=3650)
# OpenSSL's SSL_MODE_ENABLE_PARTIAL_WRITE, which pyOpenSSL turns on: off, one SSL_write of a
# large buffer makes all its records at once (net/tls_transport.py writes 256 KiB at a time
# into a memory BIO, which never refuses bytes).
_PARTIAL_WRITE = 0x1


def spki_fingerprint(public_key) -> str:
    """Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo (a private key: of its public half).

    For an RSA key this is ``protocol.crypto.fingerprint``, the directory's ``fingerprint``.
    """
    if hasattr(public_key, "public_key"):
        public_key = public_key.public_key()
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def self_signed_certificate(private_key) -> x509.Certificate:
    """A certificate of ``private_key``'s public key, signed by itself."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "onion_twisted member")])
    # Backdated a day: a peer whose clock is a little behind still accepts it (no
    # member checks dates, but other TLS clients, e.g. a browser or curl -k, may).
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + _VALIDITY))
    edwards = isinstance(private_key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))
    return builder.sign(private_key, None if edwards else hashes.SHA256())


def load_or_create_peer_key(data_dir) -> ec.EllipticCurvePrivateKey:
    """The peer's own TLS key (P-256): made on first start, mode 0600, reused after."""
    path = Path(data_dir) / PEER_KEY_FILE
    if path.exists():
        path.chmod(0o600)
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), mode=0o600)
    return key


# OpenSSL's default security level (2) refuses RSA keys under 2048 bits, and
# nodes may have 1024-bit ones (key_bits): level 1 accepts them.
_SECURITY_LEVEL = b"DEFAULT:@SECLEVEL=1"


def _common(context: SSL.Context) -> SSL.Context:
    """What every member's context has, either side: TLS 1.3 only, no compression, no tickets,
    whole writes (above), and record buffers freed while empty (``SSL_MODE_RELEASE_BUFFERS``,
    as Tor's links: a node holds about a hundred connections, most idle at any moment, and
    each kept 33 KiB of empty buffers; ``bench/tls_memory.py``)."""
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_cipher_list(_SECURITY_LEVEL)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
    context.clear_mode(_PARTIAL_WRITE)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


@implementer(IOpenSSLContextFactory)
class ServerOptions:
    """The context factory a member listens with: its self-signed certificate, TLS 1.3 only."""

    def __init__(self, private_key):
        context = _common(SSL.Context(SSL.TLS_SERVER_METHOD))
        context.use_certificate(ossl.X509.from_cryptography(self_signed_certificate(private_key)))
        context.use_privatekey(ossl.PKey.from_cryptography_key(private_key))
        context.check_privatekey()
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


def server_options(private_key) -> ServerOptions:
    return ServerOptions(private_key)


def _check_pin(connection, certificate, errno, depth, ok) -> bool:
    """OpenSSL's verify callback: the pin decides, nothing else does.

    A self-signed certificate fails OpenSSL's own chain checks (``ok`` is 0);
    what matters is only whether the leaf's key is the one pinned.
    """
    pin = getattr(connection, "pin", None)
    if pin is None or depth != 0:
        return True
    return spki_fingerprint(certificate.to_cryptography().public_key()) == pin


def client_context() -> SSL.Context:
    context = _common(SSL.Context(SSL.TLS_CLIENT_METHOD))
    context.set_verify(SSL.VERIFY_PEER, _check_pin)
    return context


class _PinnedConnection(SSL.Connection):
    """A connection that knows its pin (Twisted keeps its own object in the app data)."""

    pin: str | None = None


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedConnectionCreator:
    def __init__(self, policy: "PinningPolicy", address: wire.Address):
        self.policy = policy
        self.address = address

    def clientConnectionForTLS(self, tls_protocol):
        # The pin is looked up for each new connection, not once per endpoint: the
        # directory (and so a node's key) may have changed since the last one.
        connection = _PinnedConnection(self.policy.context, None)
        connection.pin = self.policy.pin_for(self.address)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class PinningPolicy:
    """Connection creators for https endpoints: TLS 1.3, the server key pinned when a pin is known."""

    def __init__(self, pin_for=None):
        self._pin_for = pin_for
        self.context = client_context()  # one for every connection: made once, shared

    def pin_for(self, address: wire.Address) -> str | None:
        return self._pin_for(address) if self._pin_for is not None else None

    def creatorForNetloc(self, hostname, port):
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        return _PinnedConnectionCreator(self, wire.Address(host.strip("[]"), port))


def handshake_failure_detail(error) -> str:
    """The detail of a NextHopFailed for an OpenSSL error of the handshake."""
    # The only check this side's verify callback makes is the pin.
    if "certificate verify failed" in str(error):
        return PIN_MISMATCH
    return "next hop failed the TLS handshake"
