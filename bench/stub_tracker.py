"""A tiny stand-in tracker for bench/relay.py (PROTOCOL.md §3, §6), plain Twisted Web.

    python bench/stub_tracker.py --listen 127.66.0.4 --port 5000 [--key-file tracker_key]

* ``GET /identity``: ``{"role": "tracker", "public_key": base64 of the raw
  Ed25519 key, ...}``.
* ``POST /nodes``: ``{"address", "public_key"}`` from a node; listed at once
  (no check of the source IP nor of the node's ``/identity``: a stub).
* ``GET /nodes``: ``{"issued", "nodes": [...]}`` signed with Ed25519 over the
  exact body, base64 in ``X-Onion-Signature``.
* ``POST /``: answers ``{"payload": {"type": "files", "files": []}}`` to
  anything (the reply to an ``ls`` or ``list``), with no further work, so the
  node's exit hop costs the same at the far end as the plain answerer.

``--key-file``: the raw 32-byte Ed25519 private key (made if missing), so the
caller can give the node ``--tracker-key``. Runs until SIGTERM / SIGINT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.web import resource

from common import JSON, member_parser, serve

FILES = b'{"payload":{"type":"files","files":[]}}'


def load_or_make_key(path: str | None) -> ed25519.Ed25519PrivateKey:
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            return ed25519.Ed25519PrivateKey.from_private_bytes(f.read())
    key = ed25519.Ed25519PrivateKey.generate()
    if path:
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
    return key


def public_b64(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def rsa_fingerprint(pem: str) -> str:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class Tracker(resource.Resource):
    isLeaf = True

    def __init__(self, key: ed25519.Ed25519PrivateKey, address: str):
        super().__init__()
        self.key = key
        self.nodes: dict[str, dict] = {}
        self.identity = json.dumps({
            "role": "tracker", "address": address, "public_key": public_b64(key),
            "fingerprint": hashlib.sha256(base64.b64decode(public_b64(key))).hexdigest(),
            "protocol": "onion-http/1",
        }).encode("utf-8")

    def _json(self, request, body: bytes, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", JSON)
        return body

    def render_GET(self, request):
        if request.path == b"/identity":
            return self._json(request, self.identity)
        if request.path == b"/nodes":
            body = json.dumps({"issued": int(time.time()), "nodes": list(self.nodes.values())}).encode("utf-8")
            request.setHeader(b"X-Onion-Signature", base64.b64encode(self.key.sign(body)))
            return self._json(request, body)
        return self._json(request, b'{"error":"not_found"}', 404)

    def render_POST(self, request):
        body = request.content.getvalue()
        if request.path == b"/nodes":
            try:
                entry = json.loads(body)
                address, pem = entry["address"], entry["public_key"]
                self.nodes[address] = {"address": address, "public_key": pem, "fingerprint": rsa_fingerprint(pem)}
            except (ValueError, KeyError, TypeError):
                return self._json(request, b'{"error":"bad_request"}', 400)
            return self._json(request, b"{}")
        return self._json(request, FILES)


def main(argv=None) -> int:
    ap = member_parser("stand-in tracker for bench/relay.py")
    ap.add_argument("--key-file", default=None, help="raw Ed25519 private key (made if missing)")
    args = ap.parse_args(argv)
    key = load_or_make_key(args.key_file)
    return serve(lambda reactor: Tracker(key, f"{args.listen}:{args.port}"), args.listen, args.port)


if __name__ == "__main__":
    sys.exit(main())
