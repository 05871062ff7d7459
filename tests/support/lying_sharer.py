"""A test double for §13: an onion-http/2 sharer whose file is not the file its root announces.

``prepare(data_dir, name, honest, first_lie)`` lays out a peer's data directory (the
layout ``ProcessesMixin.start_peer`` gives: ``share/``, ``state/``) so that
the peer believes, without hashing, that ``share/NAME`` is ``honest``:

* ``share/NAME`` holds ``lie(honest, first_lie)``: the same size, the
  honest bytes up to piece ``first_lie``, then one byte of every 256 KiB
  piece flipped, so every chunk from there on differs from the honest file
  (pieces before it are true: a requester may keep them, verified);
* ``state/hashes.json`` holds its entry (size and mtime of that file as it
  is on disk, the honest file's sha256 and Merkle root), which the peer
  trusts while the size and mtime are unchanged;
* ``state/leaves/ROOT`` holds the honest file's leaf row.

So the peer announces the honest ``{"name", "size", "sha256", "root"}``, the
tracker keys it with the honest sharers' entry, its ``transfer_start``
carries a leaf row that checks against the root, and its chunks, sealed
correctly under the transfer key, authenticate: only their leaves do not
match. That is the lie only the requester's per-chunk check can catch.

``python tests/support/lying_sharer.py -- [twistd arguments]`` runs twistd
for that peer, after one patch: each request it is asked to serve is logged
(``lying sharer: serving transfer T``) before the uploader serves it as
usual, so a test can count the liar's uploads from its log. The patch wraps
``Uploader.serve``; if that is gone the double exits with an error at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

PIECE = 256 * 1024  # §13's piece, written here rather than imported: what the test believes


def lie(honest: bytes, first_lie: int = 0) -> bytes:
    """``honest`` with the middle byte of each 256 KiB piece from piece ``first_lie`` on flipped."""
    data = bytearray(honest)
    for start in range(first_lie * PIECE, len(data), PIECE):
        middle = start + min(PIECE, len(data) - start) // 2
        data[middle] ^= 0xFF
    return bytes(data)


def leaf_row(data: bytes) -> bytes:
    if not data:
        return hashlib.sha256(b"").digest()
    return b"".join(hashlib.sha256(data[i:i + PIECE]).digest() for i in range(0, len(data), PIECE))


def merkle_root(leaves: bytes) -> str:
    level = [leaves[i:i + 32] for i in range(0, len(leaves), 32)]
    width = 1
    while width < len(level):
        width *= 2
    level += [bytes(32)] * (width - len(level))
    while len(level) > 1:
        level = [hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0].hex()


def prepare(data_dir, name: str, honest: bytes, first_lie: int = 0) -> dict:
    """Lay out the liar's share and state (see the module's text); what it will announce."""
    data_dir = Path(data_dir).resolve()
    share, state = data_dir / "share", data_dir / "state"
    share.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = share / name
    path.write_bytes(lie(honest, first_lie))
    st = os.stat(path)
    leaves = leaf_row(honest)
    root = merkle_root(leaves)
    sha = hashlib.sha256(honest).hexdigest()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha, "root": root}
    (state / "hashes.json").write_text(json.dumps({os.path.abspath(share.resolve() / name): entry}))
    (state / "leaves").mkdir(exist_ok=True, mode=0o700)
    (state / "leaves" / root).write_bytes(leaves)
    return {"name": name, "size": len(honest), "sha256": sha, "root": root}


def _patch() -> None:
    from twisted.logger import Logger

    from onion_twisted.peer import uploader

    if not hasattr(uploader, "Uploader") or not hasattr(uploader.Uploader, "serve"):
        sys.exit("lying_sharer: onion_twisted.peer.uploader.Uploader.serve is gone; update tests/support/lying_sharer.py")
    log = Logger(namespace="lying_sharer")
    honest_serve = uploader.Uploader.serve

    def serve(self, circuit, message, *args, **kwargs):
        log.info("lying sharer: serving transfer {transfer}", transfer=message.get("transfer"))
        return honest_serve(self, circuit, message, *args, **kwargs)

    uploader.Uploader.serve = serve


if __name__ == "__main__":
    if sys.argv[1:2] != ["--"]:
        sys.exit("lying_sharer: usage: lying_sharer.py -- TWISTD-ARGS")
    _patch()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[2:]]
    run()
