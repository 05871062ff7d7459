"""Codecs and field checks shared by every role.

JSON is orjson and base64 is pybase64: on a 256 KiB chunk they are 10 to 60
times faster than the standard library (bench/codecs.py), and a chunk is
encoded and decoded at every hop.
"""

from __future__ import annotations

import binascii
import functools
import ipaddress
import re
from typing import NamedTuple

import orjson
import pybase64

from onion_twisted.protocol.errors import BadRequest, NextHopFailed

DEFAULT_PORT = 5000
CONTROL_CID = "control"
# The tracker's Ed25519 signature (base64) of a body: a control cell (§7) or the
# directory (§6). Bytes, so that a received value is read as bytes and never
# decoded by Twisted (a value that is not UTF-8 would raise there, not be refused).
SIGNATURE_HEADER = b"X-Onion-Signature"

_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")

# orjson (3.13) parses nesting up to 1024 levels, but ``orjson.dumps`` refuses
# more than 254 (TypeError), so a received object could not be re-encoded:
# ``loads`` refuses more than MAX_DEPTH levels. Integers beyond 64 bits come back
# as floats (no bignum work), beyond the double range as JSONDecodeError.
MAX_DEPTH = 128


def dumps(obj) -> bytes:
    """Small objects. For a long base64 string use ``with_base64``: orjson
    reserves several times a long string's length for its output (a 466 KB
    cell cost a 4 MB allocation), which fragmented the heap of every hop."""
    return orjson.dumps(obj)


def with_base64(obj: dict, key: str, data: bytes) -> bytes:
    """The JSON of ``obj`` plus ``key``: base64 of ``data``, spliced in.

    Base64 text needs no JSON escaping, so the bytes are joined as they are.
    """
    head = orjson.dumps(obj)
    separator = b"," if len(head) > 2 else b""
    return b"".join((head[:-1], separator, b'"', key.encode("ascii"), b'":"', pybase64.b64encode(data), b'"}'))


def loads(data: bytes):
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    # Counting brackets is C-speed and skips the walk for every normal message.
    try:
        brackets = data.count(b"[") + data.count(b"{")
    except (AttributeError, TypeError):  # str or memoryview: always walk
        brackets = MAX_DEPTH + 1
    if brackets > MAX_DEPTH and _too_deep(obj):
        raise BadRequest(f"malformed JSON: nested deeper than {MAX_DEPTH} levels")
    return obj


def _too_deep(obj) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


def loads_object(data: bytes, what: str = "body") -> dict:
    obj = loads(data)
    if not isinstance(obj, dict):
        raise BadRequest(f"{what} is not a JSON object")
    return obj


# Below this length a string is parsed with the rest: splitting it out saves nothing.
LONG_STRING = 1024


def loads_with_base64(data: bytes, paths, what: str = "body") -> tuple[dict, bool]:
    """``loads_object`` for a message carrying one long base64 string.

    A cell (``payload``) or a chunk (``data``) is mostly base64: a full JSON
    parse copies and scans it twice over (the parse, the nesting count), at
    ~2 ms per MiB and per hop. Here, for the first of ``paths`` (each a tuple
    of keys, e.g. ``("payload",)`` or ``("payload", "data")``) that applies,
    the string is cut out of the text, the small rest is parsed, and the
    string is decoded straight from the received bytes: the object comes
    back with that value already decoded, as ``bytes`` (which JSON never
    yields, so ``b64decode`` tells the two apart), and ``True``.

    The shortcut is taken only when it cannot differ from a full parse: the
    key occurs once in the text, the rest holds no backslash (so no escaped
    key or quote), the rest parses with the value at the expected place
    being the emptied string, and the cut string is valid base64. Anything
    else (another formatting, escapes, bad base64, bad JSON) is parsed whole,
    with the full parse's answer and errors: ``(object, False)``.
    """
    if isinstance(data, bytes):
        for path in paths:
            obj = _loads_split(data, path)
            if obj is not None:
                return obj, True
    return loads_object(data, what), False


def _loads_split(data: bytes, path) -> dict | None:
    key = path[-1]
    marker = b'"' + key.encode("ascii") + b'"'
    at = data.find(marker)
    if at < 0:
        return None
    start = _skip_to_string(data, at + len(marker))
    if start is None:
        return None
    end = data.find(b'"', start)
    if end - start < LONG_STRING:
        return None
    tail = data[end:]
    # Once more after the string? (Inside it there is no quote once it decodes as base64.)
    if marker in tail:
        return None
    rest = data[:start] + tail
    if b"\\" in rest:
        return None
    try:
        obj = loads(rest)
    except BadRequest:
        return None
    holder = obj
    for step in path[:-1]:
        holder = holder.get(step) if isinstance(holder, dict) else None
    if not isinstance(obj, dict) or not isinstance(holder, dict) or holder.get(key) != "":
        return None
    try:
        holder[key] = pybase64.b64decode(memoryview(data)[start:end], validate=True)
    except (binascii.Error, ValueError):
        return None
    return obj


def _skip_to_string(data: bytes, index: int) -> int | None:
    """After a key: the index just inside the opening quote of its string value, if it is one."""
    size = len(data)
    while index < size and data[index] in b" \t\r\n":
        index += 1
    if index >= size or data[index] != 0x3A:  # ':'
        return None
    index += 1
    while index < size and data[index] in b" \t\r\n":
        index += 1
    if index >= size or data[index] != 0x22:  # '"'
        return None
    return index + 1


def b64encode(data: bytes) -> str:
    # Straight to str: encode-then-decode makes two large objects per chunk,
    # and glibc hands them back to the kernel and faults them in again (bench/README.md).
    return pybase64.b64encode_as_string(data)


def b64decode(text, field: str = "payload") -> bytes:
    if isinstance(text, bytes):  # decoded already by loads_with_base64
        return text
    if not isinstance(text, str):
        raise BadRequest(f"{field} is not a base64 string")
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} is not valid base64") from None


def is_circuit_id(cid) -> bool:
    return isinstance(cid, str) and len(cid) == 36 and _UUID4.fullmatch(cid) is not None


def new_circuit_id() -> str:
    import uuid

    return str(uuid.uuid4())


class Address(NamedTuple):
    """A member's address: host (IP literal or DNS name, no brackets) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self}{path}"

    @property
    def ip(self) -> str | None:
        """The host if it is an IP literal, else None (a DNS name)."""
        return _literal_host(self.host)


# Bounded: hosts come from the directory and from cells, and a parse costs ~10 µs
# (a directory copy asks for every node's IP; every extend for its target's).
@functools.lru_cache(maxsize=4096)
def _literal_host(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


async def literal_ip(address: Address) -> str:
    """The IP of an address given as an IP literal: the resolver of a member with
    no DNS (tests, in-memory networks).

    A DNS name raises NextHopFailed (502), as a real resolver raises when a name
    does not resolve (net.member_service): the member cannot reach that host.
    (The tracker's copy raised BadRequest, 400, for a node registering under a
    name; the real tracker resolves with the member service, which says 502.)
    """
    ip = address.ip
    if ip is None:
        raise NextHopFailed("a DNS name, and no resolver here")
    return ip


def parse_address(text, default_port: int = DEFAULT_PORT, field: str = "address") -> Address:
    """Parse ``HOST`` or ``HOST:PORT`` (PROTOCOL.md §1); a bare host means the network port."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise BadRequest(f"{field} is not an address string")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest(f"{field}: unclosed IPv6 bracket")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise BadRequest(f"{field}: junk after IPv6 literal")
            port = _port(rest[1:], field)
        try:
            if "%" in host:  # a zone id is local to one machine, and "%" breaks the URL
                raise ValueError(host)
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadRequest(f"{field}: bad IPv6 literal") from None
        return Address(str(ipaddress.IPv6Address(host)), port)
    if text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, field)
    elif ":" in text:
        raise BadRequest(f"{field}: IPv6 literals must be bracketed")
    try:
        return Address(str(ipaddress.IPv4Address(host)), port)
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or host.replace(".", "").isdigit():
        raise BadRequest(f"{field}: bad host name")
    return Address(host.lower(), port)


def _port(text: str, field: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) < 65536:
        raise BadRequest(f"{field}: bad port")
    return int(text)
