"""Circuits replaced during a long transfer (issue 16), between real processes.

The network of ``tests/support/e2e_network.py`` (``tls = false``): the real
tracker, six nodes and two peers, alice and bob, each its own ``twistd``
process. Both run with the shipped ``max_circuits`` (3: one announcing
circuit, download circuits beside it) and a ``circuit_lifetime`` of 3 s;
bob shares a 12 MiB file capped at 1 MiB/s, so alice's download lasts about
twelve seconds: several lifetimes.

* Every circuit is replaced while the transfer runs (alice's announcing
  circuit, her download circuit, bob's announcing circuit: the API's
  ``circuits`` rows count their rotations), and the download completes,
  verified, in its first attempt: the transfer ran to its end on the
  circuits it began on while new ones took the new work.
* At every poll, alice's announcing circuit and her download circuits have
  no entry and no exit in common (six nodes allow it).
* Once it is over, the tracker lists the file under one circuit of bob's
  (its ``sources``: bob's, and alice's as she seeds it).

Nothing waits by sleeping: every wait polls with a deadline, a bound for
the poll and not a promise of speed.
"""

from __future__ import annotations

import hashlib
import os

from twisted.trial import unittest

from tests.support.deferreds import inline
from tests.support.e2e_network import E2ENetwork
from tests.support.processes import PeerApiMixin, ProcessesMixin, poll_until

LIFETIME = 3.0
SIZE = 12 << 20
CAP = 1 << 20
PIECE = 256 * 1024


def ends(row: dict) -> set:
    """The entry's and the exit's addresses of a ``circuits`` row of the API."""
    nodes = row["nodes"]
    return {nodes[0]["address"], nodes[-1]["address"]} if nodes else set()


class RotationTests(E2ENetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    node_count = 6
    timeout = 120

    @inline
    async def test_circuits_are_replaced_during_a_long_transfer_and_it_completes(self):
        content = os.urandom(SIZE)
        sha = hashlib.sha256(content).hexdigest()
        file = f"rotation-{os.urandom(6).hex()}.bin"
        self.share_bytes("bob", file, content)
        self.start_test_peer("bob", max_upload_rate=CAP, circuit_lifetime=LIFETIME, max_circuits=3)
        self.start_test_peer("alice", chunk_size=PIECE, circuit_lifetime=LIFETIME, max_circuits=3,
                             stall_timeout=30)

        async def listed():
            rows = (await self.status("alice"))["catalogue"]
            return any(r.get("name") == file and r.get("sha256") == sha for r in rows)
        await poll_until(listed, timeout=60, what=f"{file!r} in alice's catalogue", interval=0.1)
        bob_before = await self.announcing("bob")

        await self.ask("alice", file, sha)
        shared, polls, errors = [], 0, []
        download_rotations = [0]  # seen on any poll: at the end a download circuit may be between two

        async def done():
            nonlocal polls
            polls += 1
            status = await self.status("alice")
            rows = status["circuits"]
            announcing = next(r for r in rows if r["purpose"] == "announcing")
            for row in rows:
                if row["purpose"] == "download" and ends(row) & ends(announcing):
                    shared.append((ends(announcing), ends(row)))
                if row["purpose"] == "download":
                    download_rotations.append(row["rotations"])
            d = next((d for d in status["downloads"] if d["file"] == file), None)
            if d is not None and d.get("error") and d["error"] not in errors:
                errors.append(d["error"])
            if d is not None and d["state"] == "failed":
                raise self.failureException(f"the download failed: {d['error']}")
            return (d, rows) if d is not None and d["state"] == "done" else None
        try:
            d, rows = await poll_until(done, timeout=90, what=f"alice's download of {file!r}", interval=0.05)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails('alice', 'bob', 'tracker')}") from None

        self.assertEqual((d["bytes"], d["sha256"], d["attempts"]), (SIZE, sha, 1), (d, errors))
        self.assertOnlyFile("alice", file, sha)
        self.assertEqual(shared, [], f"alice's announcing and download circuits shared an end ({polls} polls)")
        alice_announcing = next(r for r in rows if r["purpose"] == "announcing")
        self.assertGreaterEqual(alice_announcing["rotations"], 2, rows)
        self.assertGreaterEqual(max(download_rotations), 1, rows)
        bob_after = await self.announcing("bob")
        self.assertGreaterEqual(bob_after["rotations"] - bob_before["rotations"], 2, bob_after)

        # Bob's replaced circuits withdrew their ls: his file is listed once for him (and
        # once for alice, who seeds it now), once those still draining are gone.
        async def listed_twice():
            rows = [r for r in (await self.status("alice"))["catalogue"] if r.get("name") == file]
            return rows if rows and rows[0].get("sources") == 2 else None
        await poll_until(listed_twice, timeout=30, what="the file listed for bob and alice only", interval=0.1)

    async def announcing(self, name: str) -> dict:
        rows = (await self.status(name))["circuits"]
        return next(r for r in rows if r["purpose"] == "announcing")
