"""Hostile input for the fuzz tests (issue 7): hypothesis settings, strategies,
raw HTTP against an in-memory ``Site``, and a watch on the logs.

* ``fuzz_settings(n)``: ``n`` examples per property in the suite (a few
  seconds a module), derandomized and without an example database so CI is
  repeatable. ``FUZZ_EXAMPLES=10000`` (``scripts/fuzz``) runs every property
  with that many examples instead, randomly, printing a reproduction blob for
  any failure.
* ``exchange(site, client_ip, raw)``: writes ``raw`` (any bytes, as a client
  would) into a fresh connection of ``site`` (the role's real ``QuietSite``
  and Klein app) whose peer is ``client_ip``, and parses the response. No
  socket, no reactor: the site's timers run on its own ``MemoryReactorClock``.
* ``LoggedErrors``: a log observer that keeps every event a member logs as
  an error (``log_failure``, ``isError``, level error or critical); a
  hostile input must never produce one.
* Strategies: any JSON (huge integers, lone surrogates, deep nesting), bytes
  that are not UTF-8, base64 that is not base64, CIDs of every wrong shape,
  HTTP requests with odd methods, paths and headers.
"""

from __future__ import annotations

import orjson

import base64
import json
import os
import string
from typing import NamedTuple

from hypothesis import HealthCheck, settings, strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

# --- settings -----------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or 0)

#: Every status PROTOCOL.md §3 lists for ``POST /``.
CELL_STATUSES = frozenset({200, 400, 403, 404, 409, 413, 429, 502, 504})
#: The ``error`` name of each status (§3; 503 is the node's documented extra for ``GET /nodes``).
ERROR_NAMES = {400: "bad_request", 403: "forbidden", 404: "unknown_circuit", 409: "conflict",
               413: "too_large", 429: "rate_limited", 502: "next_hop_failed", 504: "next_hop_timeout",
               503: "unavailable"}


def fuzz_settings(examples: int = 200):
    """Settings of one property: ``examples`` in the suite, ``FUZZ_EXAMPLES`` when fuzzing."""
    fuzzing = FUZZ_EXAMPLES > 0
    return settings(
        max_examples=FUZZ_EXAMPLES if fuzzing else examples,
        deadline=None,
        database=None,
        derandomize=not fuzzing,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )


# --- logs -----------------------------------------------------------------------------------

class LoggedErrors:
    """``with LoggedErrors() as errors:`` keeps every error-level event logged meanwhile."""

    def __init__(self):
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if (event.get("log_failure") is not None or event.get("isError")
                or event.get("log_level") in (LogLevel.error, LogLevel.critical)):
            self.events.append(event)

    def __enter__(self) -> "LoggedErrors":
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)

    def text(self) -> str:
        lines = []
        for event in self.events:
            lines.append(formatEvent(event) or repr(event.get("why") or event.get("log_format")))
            failure = event.get("log_failure") or event.get("failure")
            if failure is not None:
                lines.append(failure.getTraceback())
        return "\n".join(lines)


# --- raw HTTP in memory ------------------------------------------------------------------------

class Response(NamedTuple):
    status: int
    headers: dict  # lower-case name -> list of values (bytes)
    body: bytes
    closed: bool   # the member closed (or was closing) the connection

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def is_json(self) -> bool:
        return (self.header(b"content-type") or b"").split(b";")[0].strip() == b"application/json"


def exchange(site, client_ip: str, raw: bytes, *, server=("127.0.0.11", 5000), head: bool = False,
             port: int = 40000) -> Response | None:
    """Write ``raw`` on a new connection of ``site`` from ``client_ip``; the first response, or None.

    None means the member said nothing (it is waiting for more bytes of the
    request, or for something the test holds). The connection is then lost
    as if the client went away, so nothing stays open.
    """
    peer = IPv4Address("TCP", client_ip, port)
    protocol = site.buildProtocol(peer)
    transport = StringTransport(hostAddress=IPv4Address("TCP", *server), peerAddress=peer)
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    written = transport.value()
    closed = transport.disconnecting
    if not transport.disconnecting:
        transport.loseConnection()
    protocol.connectionLost(Failure(ConnectionDone()))
    return parse_response(written, head=head, closed=closed)


def parse_response(raw: bytes, *, head: bool = False, closed: bool = False) -> Response | None:
    """The first HTTP/1.x response in ``raw`` (None if there is none, or it is cut short)."""
    end = raw.find(b"\r\n\r\n")
    if not raw or end < 0:
        return None
    lines = raw[:end].split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise AssertionError(f"not an HTTP response: {raw[:200]!r}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    rest = raw[end + 4:]
    status = int(status_line[1])
    if 100 <= status < 200:  # "100 Continue" before the answer
        return parse_response(rest, head=head, closed=closed)
    if head or status in (204, 304):
        return Response(status, headers, b"", closed)
    if b"chunked" in b",".join(headers.get(b"transfer-encoding", [])).lower():
        body = b""
        while True:
            size_end = rest.find(b"\r\n")
            if size_end < 0:
                return None
            size = int(rest[:size_end].split(b";")[0], 16)
            if size == 0:
                break
            chunk = rest[size_end + 2:size_end + 2 + size]
            if len(chunk) < size:
                return None
            body += chunk
            rest = rest[size_end + 2 + size + 2:]
        return Response(status, headers, body, closed)
    if b"content-length" in headers:
        length = int(headers[b"content-length"][0])
        if len(rest) < length:
            return None
        return Response(status, headers, rest[:length], closed)
    return Response(status, headers, rest, closed)


def http_request(method: bytes, path: bytes, body: bytes | None = None, headers=(), *,
                 host: bytes | None = b"127.0.0.11:5000", chunked: bool = False, version: bytes = b"HTTP/1.1") -> bytes:
    """The bytes of one request; ``Content-Length`` (or chunked framing) matches ``body``."""
    lines = [method + b" " + path + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    for name, value in headers:
        lines.append(name + b": " + value)
    framed = b""
    if body is not None:
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
            framed = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(body))
            framed = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + framed


def post_json(body: bytes, headers=(), *, path: bytes = b"/", host: bytes = b"127.0.0.11:5000") -> bytes:
    return http_request(b"POST", path, body, [(b"Content-Type", b"application/json"), *headers], host=host)


# --- strategies: values ------------------------------------------------------------------------

def weighted(*choices) -> st.SearchStrategy:
    """``weighted((3, a), (1, b))``: ``a`` three times as often as ``b``.

    (``one_of`` would flatten a branch that is itself a ``one_of`` into its
    parts and so weigh it by how many it has.)"""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


#: Integers well past 64 bits and floats at the edges of the double range.
huge_numbers = st.one_of(
    st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    st.sampled_from([2 ** 53, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 400, -(10 ** 400)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5]),
)

scalars = st.one_of(st.none(), st.booleans(), huge_numbers, st.text(max_size=40))


def json_values(max_leaves: int = 12):
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=5),
                                   st.dictionaries(st.text(max_size=12), children, max_size=5)),
        max_leaves=max_leaves)


json_objects = st.dictionaries(st.text(max_size=12), json_values(), max_size=6)


def to_json(value, *, ascii_only: bool = True) -> bytes:
    """JSON text of ``value`` by the standard library, which writes what orjson refuses:
    integers past 64 bits and lone surrogates (escaped, or raw and so not UTF-8)."""
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)
    return text.encode("utf-8", "surrogatepass")


def json_bytes(values=None) -> st.SearchStrategy:
    values = values if values is not None else json_values()
    return st.builds(to_json, values, ascii_only=st.booleans())


#: JSON nested past the 128-level limit (or just under it), as arrays or objects.
deep_nesting = st.builds(
    lambda depth, kind: (b"[" * depth + b"]" * depth) if kind else (b'{"a":' * depth + b"1" + b"}" * depth),
    st.integers(min_value=100, max_value=1200), st.booleans())

#: Text that is not JSON at all, or almost JSON.
broken_json = st.sampled_from([
    b"", b"{", b"}", b"[", b"{]", b'{"CID":', b"null", b"true", b"0", b'"x"', b"{}{}", b"{} junk",
    b'{"a":1,}', b"{'a': 1}", b"NaN", b"Infinity", b"1e999", b"-", b"\x00", b"\xef\xbb\xbf{}",
    b'{"a":"\\ud800"}', b'{"a":"\xed\xa0\x80"}', b'{"a":"\xff"}', b'{"a":1e400}', b"[" * 2000,
])

#: Bytes that are not valid UTF-8 somewhere.
not_utf8 = st.binary(min_size=1, max_size=200).filter(lambda b: not _utf8(b))


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def hostile_bodies(values=None) -> st.SearchStrategy:
    return st.one_of(st.binary(max_size=300), not_utf8, json_bytes(values), deep_nesting, broken_json)


# --- strategies: the protocol's fields ----------------------------------------------------------

uuid4s = st.uuids(version=4).map(str)

#: CIDs that are not a canonical lowercase UUIDv4 nor "control".
bad_cids = st.one_of(
    st.uuids(version=4).map(lambda u: str(u).upper()),
    st.uuids(version=1).map(str),
    st.uuids(version=4).map(lambda u: u.hex),
    st.uuids(version=4).map(lambda u: "{" + str(u) + "}"),
    st.sampled_from(["", "CONTROL", "control ", "Control", "00000000-0000-0000-0000-000000000000"]),
    st.text(max_size=40),
    st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
)

_B64 = string.ascii_letters + string.digits + "+/"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


#: Base64 of random bytes (some long enough to look like a layer or an RSA block).
good_base64 = st.one_of(st.binary(max_size=80), st.binary(min_size=120, max_size=300)).map(b64)

#: Text that strict base64 refuses: wrong padding, foreign characters, whitespace, URL alphabet.
bad_base64 = st.one_of(
    st.text(alphabet=_B64, min_size=1, max_size=40).filter(lambda s: len(s) % 4 != 0),
    st.builds(lambda s, c, i: s[:i] + c + s[i:], good_base64, st.sampled_from(list(" \n\t-_*.!é\x00=")),
              st.integers(0, 40)),
    st.sampled_from(["=", "==", "A===", "AAA", "AB=C", "QQ==QQ==", "Zm9v\n", " Zm9v", "Zm9v YmFy"]),
)

#: Values of the ``payload`` field: absent (None here), base64, not base64, objects, anything.
payloads = st.one_of(st.none(), good_base64, bad_base64, json_objects, json_values(6))

#: Addresses as a message might name them: good, bad, and odd.
addresses = st.one_of(
    st.sampled_from(["127.0.0.11", "127.0.0.11:5000", "127.0.0.12", "127.0.0.12:5000", "127.0.0.12:5001",
                     "127.0.0.1", "127.0.0.1:5000", "127.0.0.14", "127.0.0.66:5000", "[::1]", "[::1]:5000",
                     "localhost", "relay.example", "relay.example:5000", "[fe80::1%eth0]", "::1", "1.2.3.4:0",
                     "1.2.3.4:65536", "1.2.3.4:-1", "1.2.3.4:+5", "999.1.1.1", "127.1", "[::1", "a..b", "-a.b",
                     "", " ", "0x7f.1", "1.2.3.4:5000:6", "1.2.3.4:٥٠٠٠"]),
    st.ip_addresses(v=4).map(str),
    st.builds(lambda ip, port: f"{ip}:{port}", st.ip_addresses(v=4), st.integers(-5, 70000)),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.text(max_size=30),
    st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2),
)


# --- strategies: HTTP ------------------------------------------------------------------------

methods = weighted(
    (6, st.sampled_from([b"GET", b"POST", b"HEAD"])),
    (2, st.sampled_from([b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"get", b"Post"])),
    (1, st.binary(min_size=1, max_size=8).filter(lambda m: not any(c in m for c in b" \r\n"))),
)

_PATH_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


def paths(routes) -> st.SearchStrategy:
    """Request targets: the role's routes (with junk appended sometimes), and anything else."""
    known = st.sampled_from(list(routes))
    query = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20).map(str.encode)
    return weighted(
        (5, known),
        (2, st.builds(lambda p, q: p + b"?" + q, known, query)),
        (2, st.builds(lambda p, s: p + s, known, st.sampled_from([b"/", b"//", b"/..", b"/%2e%2e", b"%00", b"/x",
                                                                 b";a=b", b"%2f", b"/%ff", b"/%c3%a9"]))),
        (2, _PATH_TEXT.map(lambda t: b"/" + t.encode("utf-8").replace(b"%", b"%25").replace(b" ", b"%20")
                           .replace(b"\r", b"%0d").replace(b"\n", b"%0a"))),
        (2, st.binary(max_size=12).map(lambda b: b"/" + b"".join(b"%%%02x" % c for c in b))),  # any byte, encoded
        (1, st.binary(min_size=1, max_size=12).filter(lambda b: not any(c in b for c in b" \r\n"))
         .map(lambda b: b"/" + b)),
        (1, st.sampled_from([b"*", b"http://127.0.0.11:5000/", b"http://evil.example/identity", b"//identity",
                             b"/identity/", b"/static/../../etc/passwd", b"/files/..%2f..%2fetc%2fpasswd",
                             b"/files/.partial/x.part", b"/%ff%fe", b"/\xff", b"/api/status?x=%ZZ"])),
    )


_HEADER_VALUE = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
header_names = st.one_of(
    st.sampled_from([b"Host", b"Origin", b"Content-Type", b"Range", b"If-Range", b"Expect", b"Connection",
                     b"X-Onion-Signature", b"Cookie", b"Accept", b"Referer", b"Transfer-Encoding", b"Content-Length"]),
    st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=12).map(str.encode),
)
_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.encode)
headers = st.lists(st.tuples(header_names, weighted((3, _HEADER_TEXT), (1, _HEADER_VALUE))), max_size=3)
hosts = weighted(
    (6, st.sampled_from([b"127.0.0.11:5000", b"127.0.0.1:5000", b"localhost", b"localhost:5000", b"[::1]:5000",
                         b"a.localhost:5000"])),
    (1, st.none()),
    (2, st.sampled_from([b"evil.example", b"", b"\xff\xfe", b"[::1", b"127.0.0.11:99999", b"a:b:c", b"h\x00st",
                         b".", b"a..b", b"x" * 64 + b".example", b"-.-", b"\xc3\xa9.example"])),
    (1, _HEADER_VALUE))


def check_answer(test, response, allowed, *, context, head=False):
    """An answer of the contract: one of ``allowed``, no traceback, and an error body
    (when JSON, not 200, not to a HEAD) naming the error of its status with a detail."""
    test.assertIsNotNone(response, f"no answer to {context!r}")
    test.assertIn(response.status, allowed, f"{response.status} {response.body[:300]!r} for {context!r}")
    test.assertNotIn(b"Traceback", response.body)
    if response.is_json and response.status != 200 and not head:
        error = orjson.loads(response.body)
        test.assertEqual(error.get("error"), ERROR_NAMES.get(response.status), context)
        test.assertIsInstance(error.get("detail"), str)


def fired(d):
    """The result of a Deferred that the in-memory fakes fire at once."""
    results = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("waited on something in memory")
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


#: Headers that may differ between two answers to the same request: ``Date`` is the wall
#: clock at the moment of answering (twisted.web's, not the member's clock), so two answers
#: a second apart differ there and nowhere else.
CLOCK_HEADERS = frozenset({b"date"})


def answer_to_everyone(test, site, ips, raw, *, server, context) -> Response:
    """``raw`` sent once from each of ``ips`` (each on its own connection); the answers must
    be the same (status, headers but ``CLOCK_HEADERS``, body) whoever asked. The answer."""
    answers = {}
    for ip in ips:
        with LoggedErrors() as errors:
            response = exchange(site, ip, raw, server=server)
        test.assertEqual(errors.events, [], f"{context!r} from {ip} was logged as an error:\n{errors.text()}")
        test.assertIsNotNone(response, f"no answer to {context!r} from {ip}")
        answers[ip] = response
    first_ip, first = next(iter(answers.items()))
    seen = lambda r: (r.status, {k: v for k, v in r.headers.items() if k not in CLOCK_HEADERS}, r.body)  # noqa: E731
    for ip, response in answers.items():
        test.assertEqual(seen(response), seen(first), f"{context!r}: {ip} got another answer than {first_ip}")
    return first
