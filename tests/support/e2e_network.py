"""A small network of real processes for the §13 tests (tests/test_e2e_processes.py).

``E2ENetwork`` (mixed into a trial TestCase before ``ProcessesMixin`` and
``PeerApiMixin``) is ``FaultNetwork`` (tests/support/faults.py: its peers,
waits and helpers) with fewer nodes, each of which may run as a test
double: ``node_double(i)`` returns the options of
``tests/support/tampering_node.py`` for node ``i`` (``--capture FILE``,
``--flip N``, ``--forge N``), or None for a plain ``twistd onionnode``.
Every member runs with ``tls = false`` (ProcessesMixin's default), so
what a node's links carry is what the protocol itself shows.

Peers may run as doubles too: ``start_recording_peer`` (every ``os.pwrite``
recorded, ``recording_peer.py``) and ``start_lying_sharer``
(``lying_sharer.py``: a file whose bytes are not those of the root it
announces).

Nothing waits by sleeping: every wait polls with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from tests.support import lying_sharer
from tests.support.faults import FIRST_NODE_HOST, HOP_TIMEOUT, FaultNetwork
from tests.support.processes import PORT, Member
from tests.support.recording_peer import writes_of

SUPPORT = Path(__file__).resolve().parent
TAMPERING_NODE = SUPPORT / "tampering_node.py"
RECORDING_PEER = SUPPORT / "recording_peer.py"
LYING_SHARER = SUPPORT / "lying_sharer.py"
PIECE = 256 * 1024  # §13's piece: the chunk size these tests ask for


def file_root(data: bytes) -> str:
    """The file's Merkle root (§13), computed by the test's own code."""
    return lying_sharer.merkle_root(lying_sharer.leaf_row(data))


def log_matches(member: Member, pattern: str) -> list[tuple]:
    """The groups of every match of ``pattern`` (``^`` and ``$`` at each line) in the member's log."""
    return [m.groups() for m in re.finditer(pattern, member.log_text(), re.MULTILINE)]


class E2ENetwork(FaultNetwork):
    """The tracker, ``node_count`` nodes (maybe doubles), peers by name; see the module's text."""

    node_count = 3

    def node_double(self, index: int, data_dir: Path) -> list[str] | None:
        """``tampering_node.py`` options for node ``index`` (its directory ``data_dir``); None: a plain node."""
        return None

    def start_test_nodes(self) -> list[Member]:
        """The nodes, each through ``tampering_node.py`` when ``node_double`` gives it options."""
        nodes = []
        for i in range(self.node_count):
            data_dir = self.base / f"node{i}"
            data_dir.mkdir(parents=True, exist_ok=True)
            double = self.node_double(i, data_dir)
            launcher = None if double is None else [sys.executable, str(TAMPERING_NODE), *double, "--"]
            nodes.append(self.start_node(self.ip(FIRST_NODE_HOST + i), PORT, self.tracker.address,
                                         self.tracker_key, data_dir, launcher=launcher, key_bits=1024,
                                         hop_timeout=HOP_TIMEOUT, register_interval=1))
        return nodes

    def _remove_file_copies(self):
        """The big files go (shared and downloaded copies, node captures); logs and state stay."""
        super()._remove_file_copies()
        for path in self.base.glob("node*/capture.bin"):
            path.unlink()

    # --- peers ----------------------------------------------------------------------------

    def share_bytes(self, peer: str, name: str, data: bytes) -> Path:
        """``data`` as ``base/peer/share/name``, written under a hidden name first (never announced half-done)."""
        share = self.base / peer / "share"
        share.mkdir(parents=True, exist_ok=True)
        tmp = share / ("." + name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, share / name)
        return share / name

    def writes_path(self, name: str) -> Path:
        return self.base / name / "writes.jsonl"

    def start_recording_peer(self, name: str, **options) -> Member:
        """Peer ``name`` whose every ``os.pwrite`` is recorded in ``writes_path(name)``."""
        (self.base / name).mkdir(parents=True, exist_ok=True)
        launcher = [sys.executable, str(RECORDING_PEER), "--writes", str(self.writes_path(name)), "--"]
        return self.start_test_peer(name, launcher=launcher, **options)

    def start_lying_sharer(self, name: str, file: str, honest: bytes, first_lie: int = 0, **options) -> Member:
        """Peer ``name`` announcing ``honest`` as ``file`` while its share holds other bytes from piece
        ``first_lie`` on (``lying_sharer.prepare``); it logs each request it serves."""
        self.lie = lying_sharer.prepare(self.base / name, file, honest, first_lie)
        launcher = [sys.executable, str(LYING_SHARER), "--"]
        return self.start_test_peer(name, launcher=launcher, **options)

    # --- what the requester wrote ---------------------------------------------------------------

    def check_writes(self, name: str, original: bytes) -> list[dict]:
        """Every chunk ``name`` ever wrote to a partial file: each must be ``original``'s bytes at its
        offset (so no bad chunk ever reached the disk). The writes, in order."""
        writes = [w for w in writes_of(self.writes_path(name)) if ".partial" in w["path"]]
        for w in writes:
            expected = hashlib.sha256(original[w["offset"]:w["offset"] + w["length"]]).hexdigest()
            self.assertTrue(w["offset"] + w["length"] <= len(original) and w["sha256"] == expected,
                            f"{name} wrote {w['length']} bytes at {w['offset']} that are not the file's: {w}")
        return writes
