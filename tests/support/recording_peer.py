"""A test double: ``twistd onionpeer`` whose every ``os.pwrite`` is recorded.

``python tests/support/recording_peer.py --writes FILE -- [twistd arguments]`` runs twistd exactly
as ``twistd`` would (``-n ... onionpeer --listen ...``), after one patch:
``os.pwrite``, the call a download writes each chunk with, first appends one
JSON line to FILE, ``{"path", "offset", "length", "sha256"}`` (the path the
descriptor names, the SHA-256 of the bytes), then writes as before.

A test then knows every byte that ever reached the requester's partial file,
not only the finished one: it can check each write against the original
file, and count them. ``writes_of(FILE)`` reads the lines back. If the peer
stopped writing through ``os.pwrite`` the record stays empty, which a test
that expects writes notices.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys


def _install(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    honest = os.pwrite

    def pwrite(target, data, offset):
        try:
            name = os.readlink(f"/proc/self/fd/{target}")
        except OSError:
            name = f"fd {target}"
        line = {"path": name, "offset": offset, "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        os.write(fd, (json.dumps(line) + "\n").encode("utf-8"))
        return honest(target, data, offset)

    os.pwrite = pwrite


def writes_of(path) -> list[dict]:
    """The writes recorded in ``path``, in order (a line cut short at the end is left out)."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] != "--writes" or argv[2] != "--":
        sys.exit("recording_peer: usage: recording_peer.py --writes FILE -- TWISTD-ARGS")
    _install(argv[1])
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv[3:]]
    run()


if __name__ == "__main__":
    main(sys.argv[1:])
