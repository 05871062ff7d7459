"""Every byte a member's TCP connections carry, recorded in its own process, and what a test looks for in them.

``install(path)`` (called by a member's launcher, e.g. ``tampering_node.py
--capture PATH``, before twistd runs) patches Twisted's TCP connection
class: every slice of bytes the kernel accepted from ``writeSomeData`` and
every read handed to ``_dataReceived`` is appended to ``path`` as one
record, with the connection's two ends. With ``tls = false`` those are the
link's bytes exactly as an observer of the link sees them (headers,
bodies, in order); nothing of the member's own code is in between.

The record is ``>B4sH4sHI`` (direction: 0 received, 1 sent; local IPv4 and
port; remote IPv4 and port; length) followed by the bytes. Records are
written with one ``os.write`` each, so a test may read the file while the
member runs.

``read_streams(path)`` gives back each direction of each connection as one
``Stream`` (its bytes in order); ``SliceFinder`` says whether a buffer holds
any ``length``-byte slice of some secrets; ``Leaks`` checks for a secret raw and
in base64 at all three alignments, ``text_leaks`` for a short text (a name).
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from array import array
from dataclasses import dataclass, field

RECORD = struct.Struct(">B4sH4sHI")
RECEIVED, SENT = 0, 1


# --- in the member's process ------------------------------------------------------------------

def install(path: str) -> None:
    """Record every TCP byte this process sends or receives into ``path`` (created, truncated)."""
    from twisted.internet import tcp

    if not (hasattr(tcp.Connection, "writeSomeData") and hasattr(tcp.Connection, "_dataReceived")):
        raise SystemExit("wire_capture: twisted.internet.tcp.Connection changed; update tests/support/wire_capture.py")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    sent_some, received = tcp.Connection.writeSomeData, tcp.Connection._dataReceived

    def ends(connection) -> tuple[bytes, int, bytes, int]:
        cached = getattr(connection, "_wire_capture_ends", None)
        if cached is None:
            local, remote = connection.getHost(), connection.getPeer()
            cached = (socket.inet_aton(local.host), local.port, socket.inet_aton(remote.host), remote.port)
            connection._wire_capture_ends = cached
        return cached

    def record(connection, direction: int, data) -> None:
        try:
            local_ip, local_port, remote_ip, remote_port = ends(connection)
        except (OSError, AttributeError):  # not an IPv4 connection: nothing in these tests
            return
        data = bytes(data)
        os.write(fd, RECORD.pack(direction, local_ip, local_port, remote_ip, remote_port, len(data)) + data)

    def writeSomeData(self, data):
        written = sent_some(self, data)
        if isinstance(written, int) and written > 0:
            record(self, SENT, memoryview(data)[:written])
        return written

    def _dataReceived(self, data):
        if data:
            record(self, RECEIVED, data)
        return received(self, data)

    tcp.Connection.writeSomeData = writeSomeData
    tcp.Connection._dataReceived = _dataReceived


# --- in the test -------------------------------------------------------------------------------

@dataclass
class Stream:
    """One direction of one connection, as one member recorded it."""

    direction: int
    local: tuple[str, int]
    remote: tuple[str, int]
    chunks: list = field(default_factory=list)

    @property
    def data(self) -> bytes:
        if len(self.chunks) != 1:
            self.chunks[:] = [b"".join(self.chunks)]
        return self.chunks[0]

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def __repr__(self) -> str:
        arrow = "->" if self.direction == SENT else "<-"
        return f"<Stream {self.local[0]}:{self.local[1]} {arrow} {self.remote[0]}:{self.remote[1]} {len(self)} B>"


def read_streams(path) -> list[Stream]:
    """Each direction of each connection in a capture file, in the order first seen.

    A connection is its pair of ends; a later connection reusing the same
    pair (ports are reused) joins the earlier one's stream, which only makes
    a stream longer. A record cut short at the end (the member was writing
    when the file was read) is left out.
    """
    with open(path, "rb") as f:
        raw = f.read()
    streams: dict[tuple, Stream] = {}
    at = 0
    while at + RECORD.size <= len(raw):
        direction, local_ip, local_port, remote_ip, remote_port, length = RECORD.unpack_from(raw, at)
        start = at + RECORD.size
        if start + length > len(raw):
            break
        key = (direction, local_ip, local_port, remote_ip, remote_port)
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = Stream(direction, (socket.inet_ntoa(local_ip), local_port),
                                           (socket.inet_ntoa(remote_ip), remote_port))
        stream.chunks.append(raw[start:start + length])
        at = start + length
    return list(streams.values())


KEY = 8  # bytes per lookup key


class SliceFinder:
    """Finds, in any buffer, a ``length``-byte slice of any of some secrets (``[(secret, length), ...]``).

    Any such slice contains one of its secret's 8-byte blocks taken every
    ``length - 7`` bytes: those blocks, of every secret, make one index
    (built once); ``find`` looks them up at every offset of a buffer, in
    eight aligned passes of 64-bit words done in C, and checks each hit
    against the whole slices around it.
    """

    def __init__(self, secrets: list[tuple[bytes, int]]):
        if array("Q").itemsize != KEY:  # pragma: no cover - every 64-bit platform
            raise RuntimeError("a 'Q' word is not 8 bytes here")
        self.secrets = secrets
        self.index: dict[int, list[tuple[int, int]]] = {}
        for which, (secret, length) in enumerate(secrets):
            if length < KEY or len(secret) < length:
                raise ValueError("a slice is at least 8 bytes and no longer than its secret")
            for start in range(0, len(secret) - KEY + 1, length - KEY + 1):
                self.index.setdefault(int.from_bytes(secret[start:start + KEY], "little"), []).append((which, start))

    def find(self, haystack: bytes) -> list[tuple[int, int]]:
        """``(index in secrets, offset in haystack)`` for each secret a slice of which ``haystack`` holds."""
        keys, found = self.index.keys(), {}
        for align in range(KEY):
            usable = (len(haystack) - align) // KEY * KEY
            if usable <= 0:
                continue
            words = array("Q", haystack[align:align + usable])
            if keys.isdisjoint(words):
                continue
            for n, word in enumerate(words):
                for which, block in self.index.get(word, ()):
                    if which not in found and self._matches(haystack, which, block, align + n * KEY):
                        found[which] = align + n * KEY
        return sorted(found.items())

    def _matches(self, haystack: bytes, which: int, block: int, at: int) -> bool:
        """Whether the secret's block at ``block``, seen at ``at``, lies in a whole slice of ``length``."""
        secret, length = self.secrets[which]
        for before in range(0, length - KEY + 1):  # the block sits 0..length-8 bytes into the slice
            s, h = block - before, at - before
            if (0 <= s <= len(secret) - length and 0 <= h <= len(haystack) - length
                    and secret[s:s + length] == haystack[h:h + length]):
                return True
        return False


def base64_forms(secret: bytes) -> list[bytes]:
    """The base64 text of ``secret`` as it reads when the encoded data starts 0, 1 or 2 bytes before it.

    Base64 turns each 3 bytes into 4 characters, so a secret inside encoded
    data shows as one of three texts, by where it falls in the 3-byte groups;
    the characters of the groups it shares with other bytes are dropped.
    """
    forms = []
    for skip in range(3):
        body = secret[skip:]
        body = body[:len(body) // 3 * 3]
        forms.append(base64.b64encode(body))
    return forms


class Leaks:
    """What of ``secret`` shows in a buffer: a ``length``-byte slice raw, or in base64 at any of the
    three alignments.

    Wherever a ``length``-byte slice falls in the 3-byte groups of encoded
    data, at least ``(length - 2) // 3`` whole groups lie inside it: 60
    characters of one of ``base64_forms`` for 48 bytes, which is what is
    looked for.
    """

    def __init__(self, secret: bytes, length: int = 48):
        encoded_length = (length - 2) // 3 * 4
        self.labels = [f"a {length}-byte slice of it, raw"] + [
            f"a {length}-byte slice of it in base64 (alignment {skip})" for skip in range(3)]
        self.finder = SliceFinder([(secret, length)] + [(form, encoded_length) for form in base64_forms(secret)])

    def __call__(self, haystack: bytes) -> list[str]:
        """Each way the secret shows in ``haystack``, with where; empty when it does not."""
        return [f"{self.labels[which]} near offset {at}" for which, at in self.finder.find(haystack)]


def leaks(haystack: bytes, secret: bytes, length: int = 48) -> list[str]:
    """``Leaks(secret, length)(haystack)``: build a ``Leaks`` once to look in several buffers."""
    return Leaks(secret, length)(haystack)


def text_leaks(haystack: bytes, text: bytes) -> list[str]:
    """Where ``text`` (a name) shows in ``haystack``, raw or in base64 at any alignment."""
    found = []
    if text in haystack:
        found.append(f"raw at offset {haystack.find(text)}")
    for skip, form in enumerate(base64_forms(text)):  # whole groups of the text's own bytes only
        if form and form in haystack:
            found.append(f"in base64 (alignment {skip}) at offset {haystack.find(form)}")
    return found
