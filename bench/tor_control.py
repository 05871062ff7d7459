"""A small client of Tor's text control protocol (control-spec.txt), for bench/tor_network.py.

Only what the Tor benchmark needs, over a plain socket (stem is not a
dependency): cookie authentication, commands and their replies, asynchronous
events (``650``) queued as they arrive between replies, and on top of that:

* ``bootstrap_progress``: the ``PROGRESS=`` of ``status/bootstrap-phase``;
* ``relays``: the relays of the consensus this tor uses, with their flags;
* ``time_circuit_builds``: circuits built one after the other with
  ``EXTENDCIRCUIT 0 A,B,C`` over given relays, each timed from the command
  to its ``CIRC … BUILT`` event, then closed;
* ``DescriptorUploads``: the ``HS_DESC`` events of an onion service, to know
  when its descriptor is on every HSDir it was sent to.
"""

from __future__ import annotations

import base64
import socket
import time
from collections import deque
from pathlib import Path


class ControlError(RuntimeError):
    pass


class TorControl:
    """One control connection, authenticated with the tor's cookie file."""

    def __init__(self, host: str, port: int, cookie_path: Path, timeout: float = 30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.events: deque[list[str]] = deque()  # each event: its lines, status code stripped
        self.command("AUTHENTICATE " + cookie_path.read_bytes().hex())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _line(self) -> str:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ControlError("control connection closed")
            # ACK at once: tor writes each event as it happens (Nagle on), so a delayed
            # ACK here would hold the next event back 40 ms and time that, not the circuit.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def _reply(self) -> tuple[str, list[str]]:
        """One whole reply: its status code and its lines (data blocks inlined)."""
        lines = []
        while True:
            line = self._line()
            status, kind, text = line[:3], line[3:4], line[4:]
            lines.append(text)
            if kind == "+":  # a data block, ended by a line holding one "."
                while (data := self._line()) != ".":
                    lines.append(data[1:] if data.startswith("..") else data)
            elif kind == " ":
                return status, lines

    def command(self, text: str) -> list[str]:
        """Sends one command; its reply's lines. Raises unless the reply is 250."""
        self.sock.sendall(text.encode("utf-8") + b"\r\n")
        while True:
            status, lines = self._reply()
            if status == "650":
                self.events.append(lines)
                continue
            if status != "250":
                raise ControlError(f"{text.split()[0]}: {status} {' '.join(lines)}")
            return lines

    def next_event(self, deadline: float) -> list[str]:
        """The next asynchronous event; ControlError past ``deadline`` (time.monotonic())."""
        if self.events:
            return self.events.popleft()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlError("no event before the deadline")
        self.sock.settimeout(remaining)
        try:
            status, lines = self._reply()
        except socket.timeout:
            raise ControlError("no event before the deadline") from None
        finally:
            self.sock.settimeout(30.0)
        if status != "650":
            raise ControlError(f"unexpected reply {status} {lines}")
        return lines

    def getinfo(self, key: str) -> str:
        lines = self.command(f"GETINFO {key}")
        first = lines[0].split("=", 1)[1] if "=" in lines[0] else ""
        return "\n".join([first, *lines[1:-1]]).strip()  # the last line is "OK"

    def bootstrap_progress(self) -> int:
        phase = self.getinfo("status/bootstrap-phase")
        for field in phase.split():
            if field.startswith("PROGRESS="):
                return int(field.split("=", 1)[1])
        return 0

    def relays(self) -> dict[str, set[str]]:
        """Fingerprint (hex) → flags, of every relay in the consensus this tor uses."""
        relays, fingerprint = {}, None
        for line in self.getinfo("ns/all").splitlines():
            if line.startswith("r "):
                identity = line.split()[2]
                fingerprint = base64.b64decode(identity + "=" * (-len(identity) % 4)).hex().upper()
                relays[fingerprint] = set()
            elif line.startswith("s ") and fingerprint:
                relays[fingerprint] = set(line.split()[1:])
        return relays


def time_circuit_builds(control: TorControl, paths: list[list[str]],
                        timeout: float = 30.0) -> tuple[list[float], list[str]]:
    """One circuit per path of relay fingerprints, one after the other; build times (ms), failures."""
    times, failures = [], []
    control.command("SETEVENTS CIRC")
    try:
        for path in paths:
            started = time.perf_counter()
            reply = control.command("EXTENDCIRCUIT 0 " + ",".join("$" + fp for fp in path))
            circuit_id = reply[0].split()[1]  # "EXTENDED <id>"
            deadline = time.monotonic() + timeout
            while True:
                event = control.next_event(deadline)[0].split()  # CIRC <id> <status> ...
                if event[:2] != ["CIRC", circuit_id]:
                    continue
                if event[2] == "BUILT":
                    times.append((time.perf_counter() - started) * 1000)
                    control.command(f"CLOSECIRCUIT {circuit_id}")
                    break
                if event[2] in ("FAILED", "CLOSED"):
                    failures.append(" ".join(event[2:]))
                    break
    finally:
        control.command("SETEVENTS")
    return times, failures


class DescriptorUploads:
    """An onion service's descriptor uploads (HS_DESC events), followed from the service's start.

    ``settled()`` once at least one HSDir has stored a descriptor and no upload is
    under way: every UPLOAD has been answered by UPLOADED or FAILED.
    """

    def __init__(self, control: TorControl):
        self.control = control
        self.pending: set[str] = set()
        self.stored: set[str] = set()
        self.failed: list[str] = []
        control.command("SETEVENTS HS_DESC")

    def poll(self, seconds: float) -> None:
        """Takes in the events that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                event = self.control.next_event(deadline)[0].split()
            except ControlError:
                return
            if len(event) < 5 or event[0] != "HS_DESC":
                continue
            action, hsdir = event[1], event[4]  # HS_DESC <action> <address> <auth> <hsdir> ...
            if action == "UPLOAD":
                self.pending.add(hsdir)
            elif action == "UPLOADED":
                self.pending.discard(hsdir)
                self.stored.add(hsdir)
            elif action == "FAILED":
                self.pending.discard(hsdir)
                self.failed.append(" ".join(event[4:]))

    def settled(self) -> bool:
        return bool(self.stored) and not self.pending
