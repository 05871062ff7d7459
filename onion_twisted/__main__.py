"""``python -m onion_twisted``: the command line for scripts.

    python -m onion_twisted get NAME [--peer URL] [--sha256 H] [--timeout S]

asks a running peer (its JSON API, ``POST /api/downloads`` then
``GET /api/status`` every half second) to download NAME, draws a progress bar
on stderr, and prints the finished file's URL on stdout. Exit status: 0 once
the file is verified; 1 when the peer refused the request, nobody shares the
name, the download failed, or it did not finish within ``--timeout``; 2 only
when no peer can be used at ``--peer`` (it does not answer, or what answers
is not a peer), or for a wrong command line (argparse's convention).

    python -m onion_twisted tracker-key [DATA_DIR]

prints the base64 public key of the tracker whose ``data_dir`` is DATA_DIR
(default ``run/tracker``), making the key first if the tracker has not run
yet: the value nodes and peers pin with ``--tracker-key``. It needs the
package's ``cryptography`` (the project's ``.venv``).

Standard library only: it runs wherever Python does, without Twisted.
The members themselves run under ``twistd`` (``twistd onionpeer`` …).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote, urlsplit, urlunsplit

from onion_twisted.protocol.messages import SHA256_HEX

NETWORK_PORT = 5000
DEFAULT_PEER = f"http://127.0.0.1:{NETWORK_PORT}"
POLL_INTERVAL = 0.5
UNREACHABLE_GRACE = 5.0     # seconds of failed polls before giving up on the peer
BAR_WIDTH = 30
EXIT_DONE, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NO_PEER = 2            # nothing usable at --peer: the only reason besides a bad command line
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


class Unreachable(Exception):
    """The peer did not answer (refused, timed out, not HTTP)."""


def http_fetch(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    """One JSON request: (status, body as a dict). Errors are statuses, not exceptions;
    only a peer that does not answer raises ``Unreachable``."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method, headers={"Accept": "application/json"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the peer is ours: never a proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(str(reason)) from None
    try:
        answer = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, ValueError):
        answer = {}
    return status, answer if isinstance(answer, dict) else {}


def human(n) -> str:
    if not isinstance(n, (int, float)) or n < 0:
        return "?"
    n, i = float(n), 0
    while n >= 1024 and i < len(UNITS) - 1:
        n /= 1024
        i += 1
    return f"{int(n)} B" if i == 0 else f"{n:.1f} {UNITS[i]}"


def progress_line(d: dict) -> str:
    """``[#####     ]  42% 12.3 MiB/s from 3 sources receiving`` for one download's status."""
    size, got, state = d.get("size"), d.get("bytes") or 0, d.get("state") or "?"
    if state == "done":
        fraction = 1.0
    elif isinstance(size, int) and size > 0 and isinstance(got, (int, float)):
        fraction = min(max(got / size, 0.0), 1.0)
    else:
        fraction = 0.0
    filled = int(fraction * BAR_WIDTH)
    speed = d.get("speed")
    rate = f" {human(speed)}/s" if state == "receiving" and isinstance(speed, (int, float)) and speed > 0 else ""
    asked = d.get("transfers")
    sources = f" from {asked} sources" if state == "receiving" and type(asked) is int and asked > 1 else ""
    return f"[{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {int(fraction * 100):3d}%{rate}{sources} {state}"


class Bar:
    """A one-line progress bar, redrawn in place with ``\\r``."""

    def __init__(self, stream):
        self.stream = stream
        self.width = 0
        self.last = None

    def draw(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.width = len(line)
        self.stream.flush()

    def end(self) -> None:
        if self.last is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.last = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m onion_twisted",
        description="Talk to a running onion_twisted peer. (The members themselves run under twistd: "
                    "twistd onionpeer, twistd onionnode, twistd oniontracker.)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    key = sub.add_parser(
        "tracker-key", help="print the tracker's public key (for --tracker-key), making it if needed",
        description="Print the base64 Ed25519 public key of the tracker whose data_dir is DATA_DIR, making "
                    "the key (mode 0600) if that tracker has not run yet; the tracker loads the same key "
                    "when it starts. Nodes and peers pin it with --tracker-key.")
    key.add_argument("data_dir", metavar="DATA_DIR", nargs="?", default="run/tracker",
                     help="the tracker's data_dir (default: run/tracker, as in conf/tracker.toml)")
    get = sub.add_parser(
        "get", help="ask a running peer to download a file and wait until it is verified",
        description="Ask a running peer to download NAME, show its progress, and exit 0 once the file is "
                    "verified (1 if the peer refuses, nobody shares NAME or the download fails; 2 only if "
                    "no peer answers at --peer). The finished file's URL is printed on stdout.")
    get.add_argument("name", metavar="NAME", help="the file's name, as in the catalogue")
    get.add_argument("--peer", default=DEFAULT_PEER, metavar="URL",
                     help=f"the peer's page, where its API answers (default: {DEFAULT_PEER})")
    get.add_argument("--sha256", metavar="H", help="which content, when several files share the name")
    get.add_argument("--timeout", type=float, metavar="S",
                     help="give up (exit 1) after S seconds; default: wait as long as the peer tries")
    return p


def normalise_peer(url: str) -> str:
    """``HOST``, ``HOST:PORT`` or a URL as the peer's base URL; a bare host means the
    network's port (5000), as addresses do everywhere else, not HTTP's 80."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a port: left for the request to fail on, with its reason
        return url
    if port is None and parts.hostname and parts.scheme == "http":
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        url = urlunsplit(parts._replace(netloc=f"{host}:{NETWORK_PORT}"))
    return url


def what_answers(base: str, fetch) -> str | None:
    """None when a peer answers at ``base`` (its ``/identity`` says so), else what does instead."""
    try:
        status, identity = fetch("GET", base + "/identity", None)
    except Unreachable:
        status, identity = None, {}
    role = identity.get("role") if status == 200 else None
    if role == "peer":
        return None
    if role in ("node", "tracker"):
        return f"it is an onion_twisted {role}"
    return "it has no /identity, so it is no onion_twisted member"


def tracker_key(data_dir: str, out, err) -> int:
    """Print the public key of the tracker at ``data_dir``, made first if it is not there."""
    try:
        from onion_twisted.protocol import crypto
        from onion_twisted.net import keys
    except ImportError as e:  # the command line itself runs without the package's dependencies
        print(f"error: tracker-key needs the package installed with its dependencies (.venv): {e}", file=err)
        return EXIT_USAGE
    try:
        key = keys.load_or_create_tracker_key(data_dir)
    except (OSError, ValueError) as e:
        print(f"error: cannot read or make the tracker key in {data_dir}: {e}", file=err)
        return EXIT_FAILED
    print(crypto.tracker_public_b64(key), file=out)
    return EXIT_DONE


def get(name: str, peer: str, sha256: str | None, timeout: float | None, *, fetch, sleep, clock,
        out, err) -> int:
    base = normalise_peer(peer)
    request = {"file": name}
    if sha256 is not None:
        request["sha256"] = sha256.lower()
    try:
        status, answer = fetch("POST", base + "/api/downloads", request)
    except Unreachable as e:
        print(f"error: the peer at {base} does not answer: {e}", file=err)
        return EXIT_NO_PEER
    if status != 202:
        not_a_peer = what_answers(base, fetch)
        if not_a_peer is not None:
            print(f"error: {base} is not a peer ({not_a_peer}): give --peer the address of a peer's page",
                  file=err)
            return EXIT_NO_PEER
        detail = answer.get("detail") or answer.get("error") or "no detail"
        print(f"error: the peer refused the download ({status}): {detail}", file=err)
        return EXIT_FAILED
    bar = Bar(err)
    started = clock()
    last_answer = started
    d = answer
    while True:
        if isinstance(d, dict) and d.get("file") == name:
            bar.draw(progress_line(d))
            if d.get("state") == "done":
                bar.end()
                where = d.get("path") or name
                if d.get("unverified"):
                    print(f"{name}: downloaded, but its sharer announced no sha256: nothing to check it "
                          f"against (sha256 {d.get('sha256')})", file=err)
                else:
                    print(f"{name}: downloaded and verified (sha256 {d.get('sha256')})", file=err)
                if d.get("e2e") is True:
                    print(f"{name}: end-to-end encrypted; every chunk checked against its root", file=err)
                elif d.get("e2e") is False:
                    print(f"{name}: not end-to-end encrypted: the exits of this transfer could read it", file=err)
                print(f"{base}/files/{quote(where, safe='')}", file=out)
                return EXIT_DONE
            if d.get("state") == "failed":
                bar.end()
                print(f"error: {name}: {d.get('error') or 'the download failed'}", file=err)
                return EXIT_FAILED
        if timeout is not None and clock() - started >= timeout:
            bar.end()
            state = d.get("state") if isinstance(d, dict) else "unknown"
            print(f"error: {name}: not finished after {timeout:g} s (state {state})", file=err)
            return EXIT_FAILED
        sleep(POLL_INTERVAL)
        try:
            status, answer = fetch("GET", base + "/api/status", None)
        except Unreachable as e:
            if clock() - last_answer >= UNREACHABLE_GRACE:
                bar.end()
                print(f"error: the peer at {base} stopped answering: {e}", file=err)
                return EXIT_USAGE
            continue
        last_answer = clock()
        if status != 200:
            bar.end()
            detail = answer.get("detail") or answer.get("error") or "no detail"
            print(f"error: the peer answered {status}: {detail}", file=err)
            return EXIT_FAILED
        downloads = answer.get("downloads")
        found = [x for x in downloads if isinstance(x, dict) and x.get("file") == name] \
            if isinstance(downloads, list) else []
        if not found:
            bar.end()
            print(f"error: {name}: the peer no longer lists this download", file=err)
            return EXIT_FAILED
        d = found[0]


def main(argv=None, *, fetch=http_fetch, sleep=time.sleep, clock=time.monotonic, out=None, err=None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command is None:
        p.print_help(err)
        return EXIT_USAGE
    if args.command == "tracker-key":
        return tracker_key(args.data_dir, out, err)
    if args.sha256 is not None and not SHA256_HEX.fullmatch(args.sha256.lower()):
        print("error: --sha256 must be 64 hexadecimal digits", file=err)
        return EXIT_USAGE
    if args.timeout is not None and args.timeout <= 0:
        print("error: --timeout must be positive", file=err)
        return EXIT_USAGE
    try:
        return get(args.name, args.peer, args.sha256, args.timeout, fetch=fetch, sleep=sleep, clock=clock,
                   out=out, err=err)
    except KeyboardInterrupt:
        print("\ninterrupted (the peer goes on downloading)", file=err)
        return 130


if __name__ == "__main__":
    sys.exit(main())
