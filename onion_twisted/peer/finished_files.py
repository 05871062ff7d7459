"""A finished download, to the user's browser (``GET /files/NAME`` of the peer's app).

* ``content_disposition``: always an attachment, with an ASCII fallback name
  and the exact UTF-8 one.
* ``parse_range``: the one ``Range`` a browser or a download tool resumes with.
* ``FileStreamer``: the file's bytes as a push producer, so a large file is
  never read whole and a slow client slows the reading down.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

# Never rendered by the browser, whatever the file holds.
FILE_CSP = b"default-src 'none'; sandbox"


def content_disposition(name: str) -> bytes:
    """``attachment`` with an ASCII fallback name and the exact UTF-8 one (RFC 6266, 5987)."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}".encode("ascii")


def parse_range(header, size: int):
    """One ``bytes=A-B``, ``A-`` or ``-N`` range as (offset, length); None to send the whole file
    (no header, another unit, several ranges, nonsense); "unsatisfiable" when it starts past the end."""
    if not header:
        return None
    m = re.fullmatch(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if m is None or m.group(1) == m.group(2) == b"":
        return None
    first, last = m.group(1), m.group(2)
    if first == b"":  # the last N bytes
        n = int(last)
        if n == 0:
            return "unsatisfiable"
        n = min(n, size)
        return (size - n, n) if n else "unsatisfiable"
    start = int(first)
    end = size - 1 if last == b"" else min(int(last), size - 1)
    if last != b"" and int(last) < start:
        return None  # syntactically invalid: ignored (RFC 9110 §14.1.1)
    if start >= size:
        return "unsatisfiable"
    return start, end - start + 1


@implementer(IPushProducer)
class FileStreamer:
    """``length`` bytes of an open file from ``offset`` to a request, as a push producer:
    it writes until the transport says pause, and goes on when it says resume.

    ``start()`` returns a Deferred that fires once all is written (Klein then
    finishes the request); cancelling it (the client went away) stops reading.
    """

    chunk = 64 * 1024

    def __init__(self, request, f, offset: int, length: int):
        self.request = request
        self.file = f
        self.remaining = length
        self.paused = False
        self.busy = False
        self.done = False
        f.seek(offset)
        self.finished = defer.Deferred(lambda _: self._close())

    def start(self) -> defer.Deferred:
        self.request.registerProducer(self, True)
        self.resumeProducing()
        return self.finished

    def resumeProducing(self):
        self.paused = False
        if self.busy:
            return  # a write below called back into us: the loop goes on by itself
        self.busy = True
        try:
            while not self.paused and not self.done:
                data = self.file.read(min(self.chunk, self.remaining)) if self.remaining > 0 else b""
                if not data:
                    short = self.remaining > 0
                    self._close()
                    if short:  # the file shrank: never end a response that lies about its length
                        self.request.loseConnection()
                    self.finished.callback(None)
                    return
                self.remaining -= len(data)
                self.request.write(data)
        except OSError:
            self._close()
            self.request.loseConnection()
            if not self.finished.called:
                self.finished.callback(None)
        finally:
            self.busy = False

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self._close()

    def _close(self):
        if self.done:
            return
        self.done = True
        self.file.close()
        try:
            self.request.unregisterProducer()
        except Exception:  # the channel is already gone
            pass
