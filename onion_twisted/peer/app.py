"""The peer's HTTP face: a thin Klein app over ``Peer``.

Routes:

* ``POST /``              cells from the circuit's entry node (any address: the
                          peer checks the neighbour itself, PROTOCOL.md §5).
* ``GET /identity``       who this member is (§6), to any address.
* ``GET /``               the page (``static/index.html``).
* ``GET /static/NAME``    the page's own files, nothing else.
* ``GET /api/status``     ``peer.status()`` as JSON.
* ``POST /api/downloads`` ``{"file": NAME, "sha256": H?}`` -> 202 and the download's status.
* ``POST /api/downloads/NAME/retry``  a failed download again, with what it has -> 202.
* ``DELETE /api/downloads/NAME``      a failed or finished download off the list -> 200.
* ``GET /files/NAME``     a finished download, as an attachment.

Everything but ``POST /`` and ``GET /identity`` is for the user only: a
client whose IP is outside ``ui_allow`` gets 403. Two more checks keep web
pages the user visits from driving the API through the user's browser (the
browser's address *is* allowed): the ``Host`` header must name an IP literal,
``localhost`` or the peer's own host (DNS rebinding), and a request that
carries an ``Origin`` must come from the page's own origin (CSRF).
``POST /api/downloads`` (and ``.../retry``) also wants ``Content-Type:
application/json``, which no cross-origin form can send without a CORS
preflight this app never grants; nor can it send ``DELETE``.

A download is known by its file name (the peer lists one download per name).
The page's files and the name it shows are ``page``; how a finished download
reaches the browser is ``finished_files``.
"""

from __future__ import annotations

import ipaddress
import os

import time
from pathlib import Path
from urllib.parse import urlsplit

from klein import Klein
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException

from onion_twisted.protocol import wire
from onion_twisted.protocol.errors import BadRequest, ProtocolError
from onion_twisted.protocol.identity import identity_json
from onion_twisted.protocol.messages import SHA256_HEX
from onion_twisted.net.http_server import CellRoute, ip_allowed, parse_allow, respond, write_json
from onion_twisted.peer.finished_files import FILE_CSP, FileStreamer, content_disposition, parse_range
from onion_twisted.peer.page import PAGE_CSP, named_page, static_file

_log = Logger(namespace="onion_twisted.peer.app")


def _host_of(authority: str) -> str:
    """The host part of ``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT``, lowercased."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    if authority.count(":") == 1:
        return authority.split(":", 1)[0]
    return authority


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class PeerApp:
    app = Klein()

    def __init__(self, peer, ui_allow: list[str], address: str | None = None, clock=None, name: str = ""):
        self.peer = peer
        self.networks = parse_allow(ui_allow)
        own = getattr(peer, "own_address", None)
        self.address = str(own) if own is not None else address
        self.clock = clock if clock is not None else getattr(peer, "clock", None)
        self.name = name.strip()

    def who(self) -> dict:
        """Which peer this is, for the page and ``/api/status``."""
        return {"name": self.name or None, "address": self.address}

    def resource(self):
        # POST / (cells) bypasses Klein's routing: see http_server.CellRoute.
        return CellRoute(self.app.resource(), self.post_cell)

    # --- guards ---------------------------------------------------------------------------

    def _refusal(self, request) -> bytes | None:
        """None when the request may use the page and the API, else the 403 answer."""
        detail = None
        if not ip_allowed(request.getClientAddress().host, self.networks):
            detail = "this address may not use the peer's page or API (ui_allow)"
        else:
            host_header = (request.getHeader(b"host") or b"").decode("latin-1")
            host = _host_of(host_header)
            if host_header and not (_is_ip(host) or host == "localhost" or host.endswith(".localhost")
                                    or (self.address and host == _host_of(self.address))):
                detail = "the Host header must be an IP address or localhost"
            origin = request.getHeader(b"origin")
            if detail is None and origin is not None:
                parts = urlsplit(origin.decode("latin-1"))
                if parts.scheme not in ("http", "https") or parts.netloc.lower() != host_header.lower():
                    detail = "cross-origin requests are refused"
        if detail is None:
            return None
        request.setHeader(b"Cache-Control", b"no-store")
        return write_json(request, 403, wire.dumps({"error": "forbidden", "detail": detail}))

    @staticmethod
    def _api(request, status: int, obj) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return write_json(request, status, wire.dumps(obj))

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    # --- the network's routes --------------------------------------------------------------

    @app.route("/", methods=["POST"])
    def post_cell(self, request):
        body = request.content.getvalue()
        return respond(request, self.peer.receive_cell(request.getClientAddress().host, body))

    @app.route("/identity", methods=["GET"])
    def get_identity(self, request):
        address = self.address
        if address is None:  # whatever the client reached us at
            host = request.getHost()
            address = str(wire.Address(host.host, host.port))
        return write_json(request, 200, identity_json("peer", address))

    # --- the user's routes -------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def get_page(self, request):
        return self._static(request, "index.html")

    @app.route("/favicon.ico", methods=["GET"])
    def get_favicon(self, request):
        return self._static(request, "favicon.png")

    @app.route("/static/<path:name>", methods=["GET"])
    def get_static(self, request, name):
        return self._static(request, name)

    def _static(self, request, name: str):
        refused = self._refusal(request)
        if refused is not None:
            return refused
        found = static_file(name)
        if found is None:
            return self._api(request, 404, {"error": "not_found", "detail": "no such page file"})
        body, kind = found
        request.setHeader(b"Content-Type", kind)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        if name == "index.html":
            body = named_page(body, self.name, self.address)
            request.setHeader(b"Content-Security-Policy", PAGE_CSP)
            request.setHeader(b"X-Frame-Options", b"DENY")
            request.setHeader(b"Cache-Control", b"no-store")
        else:
            request.setHeader(b"Cache-Control", b"no-cache")
        return body

    @app.route("/api/status", methods=["GET"])
    def get_api_status(self, request):
        refused = self._refusal(request)
        if refused is not None:
            return refused
        return self._api(request, 200, dict(self.peer.status(), peer=self.who()))

    @app.route("/api/downloads", methods=["POST"])
    def post_api_download(self, request):
        refused = self._refusal(request)
        if refused is not None:
            return refused
        unsupported = self._not_json(request)
        if unsupported is not None:
            return unsupported
        try:
            body = wire.loads_object(request.content.getvalue(), "the request")
            name, sha256 = body.get("file"), body.get("sha256")
            if not isinstance(name, str) or not name:
                raise BadRequest("file must be a non-empty string")
            if sha256 is not None:
                if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256.lower()):
                    raise BadRequest("sha256 must be 64 hexadecimal digits")
                sha256 = sha256.lower()
            try:
                download = self.peer.download(name, sha256)
            except ValueError as e:
                raise BadRequest(str(e)) from None
        except ProtocolError as e:
            return self._api(request, e.status, e.body())
        return self._api(request, 202, download.status(self._now()))

    def _not_json(self, request) -> bytes | None:
        """None for a JSON request, else the 415 answer (no cross-origin form sends JSON)."""
        kind = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if kind == b"application/json":
            return None
        return self._api(request, 415, {"error": "unsupported_media_type",
                                        "detail": "send the request as Content-Type: application/json"})

    @app.route("/api/downloads/<name>/retry", methods=["POST"])
    def post_api_retry(self, request, name):
        refused = self._refusal(request) or self._not_json(request)
        if refused is not None:
            return refused
        try:
            download = self.peer.retry(name)
        except LookupError:
            return self._api(request, 404, {"error": "not_found", "detail": "no download of that name is listed"})
        except ProtocolError as e:
            return self._api(request, e.status, e.body())
        return self._api(request, 202, download.status(self._now()))

    @app.route("/api/downloads/<name>", methods=["DELETE"])
    def delete_api_download(self, request, name):
        refused = self._refusal(request)
        if refused is not None:
            return refused
        try:
            self.peer.dismiss(name)
        except LookupError:
            return self._api(request, 404, {"error": "not_found", "detail": "no download of that name is listed"})
        except ProtocolError as e:
            return self._api(request, e.status, e.body())
        return self._api(request, 200, {"dismissed": name})

    @app.route("/files/<path:name>", methods=["GET"])
    def get_finished_file(self, request, name):
        refused = self._refusal(request)
        if refused is not None:
            return refused
        path = None
        if name not in (".", "..") and not name.startswith(".") and "/" not in name and "\\" not in name \
                and "\x00" not in name:
            path = self.peer.store.file_path(name)
        if path is None or not Path(path).is_file():
            return self._api(request, 404, {"error": "not_found", "detail": "no finished download of that name"})
        try:
            f = open(path, "rb")
        except OSError:
            return self._api(request, 404, {"error": "not_found", "detail": "no finished download of that name"})
        size = os.fstat(f.fileno()).st_size
        request.setHeader(b"Content-Type", b"application/octet-stream")  # never rendered, never unzipped
        request.setHeader(b"Content-Disposition", content_disposition(Path(path).name))
        request.setHeader(b"Content-Security-Policy", FILE_CSP)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Accept-Ranges", b"bytes")
        wanted = parse_range(request.getHeader(b"range"), size) if request.getHeader(b"if-range") is None \
            else None
        if wanted == "unsatisfiable":
            f.close()
            request.setHeader(b"Content-Range", b"bytes */%d" % size)
            return self._api(request, 416, {"error": "range_not_satisfiable", "detail": f"the file has {size} bytes"})
        offset, length = wanted if wanted else (0, size)
        if wanted:
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (offset, offset + length - 1, size))
        request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            f.close()
            return b""
        return FileStreamer(request, f, offset, length).start()

    # --- errors from the routing itself ------------------------------------------------------

    @app.handle_errors(HTTPException)
    def routing_error(self, request, failure):
        refused = self._refusal(request)
        if refused is not None:
            return refused
        e = failure.value
        if e.code == 405:
            request.setHeader(b"Allow", ", ".join(e.valid_methods or ()).encode("ascii"))
            return self._api(request, 405, {"error": "method_not_allowed", "detail": e.name})
        return self._api(request, 404, {"error": "not_found", "detail": "Not Found"})  # redirects too

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        _log.failure("internal error while answering the page or the API", failure)
        return self._api(request, 500, {"error": "internal", "detail": "internal error"})
