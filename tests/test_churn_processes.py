"""Churn between real processes (issue 17): nodes SIGKILLed, one every few seconds, while
four downloads run at once; none may be lost or corrupted, and the directory drops the dead.

The network is ``FaultNetwork``'s (tests/support/faults.py) on the test's own
``127.R1.R2.x`` prefix: the real tracker (.1, heartbeat 1 s, so a node unseen
for 3 s leaves its list), ten nodes (.11 to .20, registering every second)
and four peers, alice (.101), bob (.102), carol (.103) and dave (.104), each
asking 256 KiB chunks (one §13 piece) and capped at ``CAP`` bytes per second
of uploads, so that a ``SIZE`` file takes some fifteen seconds to cross.
Peer i downloads file i, shared by the next two peers round the ring: every
peer downloads one file and shares two, and every file has two sources.

Once every downloader's catalogue lists its file with both sources, the
four downloads are asked at once, and every ``KILL_EVERY`` seconds (the
first after ``FIRST_KILL``) a node carrying one of the peers' circuits is
SIGKILLed and a new node started at a new address (.21 on), until every
download has ended. Then:

* every download is done, within ``DOWNLOAD_DEADLINE`` (none failed, none
  stalled past it: none lost), and each copy's sha256, computed here with
  hashlib, is the shared file's (none corrupt);
* no download ever went back: its byte count, polled every ``POLL``
  seconds, never fell below what it had shown (a broken circuit's download
  goes on from the chunks it holds);
* at least ``MIN_KILLS`` kills happened while downloads were under way (else
  the test saw no churn, and says so);
* within ``CONVERGE_DEADLINE`` the tracker's directory and every live node's
  copy list exactly the nodes alive: the killed ones dropped, the new ones in.

Nothing waits by sleeping: every wait polls with a deadline, a bound and
not a promise of speed.
"""

from __future__ import annotations

import os
import random
import sys

from twisted.trial import unittest

from tests.support.deferreds import current_reactor, inline
from tests.support.faults import HOP_TIMEOUT, FaultNetwork, all_hosts
from tests.support.processes import PORT, Member, PeerApiMixin, ProcessesMixin, poll_until

PEERS = {"alice": 101, "bob": 102, "carol": 103, "dave": 104}
NODES = 10
FIRST_REPLACEMENT_HOST = 21
REPLACEMENTS = 40          # addresses kept free for new nodes (far more than a run starts)
PIECE = 256 << 10          # the chunk size the peers ask for
SIZE = 8 << 20             # 32 chunks a file
CAP = 512 << 10            # each peer's uploads together: a file's two sources bring ~CAP
FIRST_KILL = 2.0           # seconds after the downloads were asked
KILL_EVERY = 3.0           # each kill breaks a circuit, so every download loses a source or its own now and then
MIN_KILLS = 3
DOWNLOAD_DEADLINE = 90     # seconds from the ask to the last download's end
CONVERGE_DEADLINE = 30     # seconds after the churn stopped: three heartbeats and a refresh, with margin
POLL = 0.1


def log(text: str) -> None:
    print(f"\n{text}", file=sys.stderr, end="")


class ChurnTests(FaultNetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    node_count = NODES
    peer_hosts = PEERS
    timeout = 240

    @property
    def hosts(self):
        return (*all_hosts(self.node_count, self.peer_hosts),
                *range(FIRST_REPLACEMENT_HOST, FIRST_REPLACEMENT_HOST + REPLACEMENTS))

    # --- churn ---------------------------------------------------------------------------

    def live_nodes(self) -> list[Member]:
        return [n for n in self.nodes if n.running]

    async def circuit_nodes(self) -> list[Member]:
        """The live nodes some peer's circuits (announcing or downloads) go through now (all
        live nodes if none is known)."""
        on_circuits = set()
        for name in self.peers:
            try:
                on_circuits.update(await self.all_circuits(name))
            except Exception:  # noqa: BLE001 - a peer between circuits answers later
                continue
        return [n for n in self.live_nodes() if str(n.address) in on_circuits] or self.live_nodes()

    async def kill_and_replace(self) -> Member:
        """SIGKILL a node on some peer's circuit; a new node at a new address takes a place."""
        victim = random.choice(await self.circuit_nodes())
        victim.kill()
        await victim.wait_exit(10)
        self.killed.append(victim)
        host = FIRST_REPLACEMENT_HOST + len(self.killed) - 1
        self.assertLess(len(self.killed), REPLACEMENTS, "more kills than addresses kept for new nodes")
        self.nodes.append(self.start_node(self.ip(host), PORT, self.tracker.address, self.tracker_key,
                                          self.base / f"node{NODES + len(self.killed) - 1}", key_bits=1024,
                                          hop_timeout=HOP_TIMEOUT, register_interval=1))
        return victim

    async def directory_views(self) -> dict[str, set]:
        """The node addresses the tracker lists, and each live node's copy."""
        views = {"tracker": set((await self.directory(self.tracker)).nodes)}
        for node in self.live_nodes():
            views[node.name] = set((await self.directory(node)).nodes)
        return views

    # --- the files ---------------------------------------------------------------------------

    def share_ring(self) -> dict[str, tuple[str, str, list[str]]]:
        """Peer i's file (name, sha256, sharers): random bytes shared by the next two peers."""
        names = list(PEERS)
        wanted = {}
        for i, downloader in enumerate(names):
            sharers = [names[(i + 1) % len(names)], names[(i + 2) % len(names)]]
            file = f"churn-{downloader}-{os.urandom(4).hex()}.bin"
            path, sha = self.write_share(sharers[0], file, SIZE)
            self.copy_into_share(path, sharers[1])
            wanted[downloader] = (file, sha, sharers)
        return wanted

    async def wait_sources(self, wanted: dict) -> None:
        """Until each downloader's catalogue lists its file with both its sharers."""
        for downloader, (file, sha, sharers) in wanted.items():
            async def listed(downloader=downloader, file=file, sha=sha, sharers=sharers):
                return any((r.get("name"), r.get("sha256"), r.get("sources")) == (file, sha, len(sharers))
                           and r.get("root") for r in (await self.status(downloader))["catalogue"])
            try:
                await poll_until(listed, timeout=60, what=f"both sources of {file!r} in {downloader}'s catalogue",
                                 interval=0.1)
            except AssertionError as e:
                raise self.failureException(f"{e}\n{self.tails(*self.peers, 'tracker')}") from None

    # --- the test ------------------------------------------------------------------------------

    @inline
    async def test_downloads_survive_nodes_killed_under_them_and_the_directory_drops_the_dead(self):
        self.killed: list[Member] = []
        wanted = self.share_ring()
        for name in PEERS:
            self.start_test_peer(name, chunk_size=PIECE, max_upload_rate=CAP)
        await self.wait_sources(wanted)

        reactor = current_reactor()
        began = reactor.seconds()
        for downloader, (file, sha, _) in wanted.items():
            await self.ask(downloader, file, sha)
        ended: dict[str, dict] = {}      # downloader -> its download once done or failed
        seconds: dict[str, float] = {}
        most: dict[str, int] = {}        # downloader -> the most bytes its download showed
        went_back: dict[str, list] = {}  # downloader -> (bytes shown before, bytes shown after) drops
        kills_under_way = 0
        next_kill = began + FIRST_KILL

        async def churn_until_all_ended():
            nonlocal next_kill, kills_under_way
            for downloader, (file, _, _) in wanted.items():
                if downloader in ended:
                    continue
                d = await self.download(downloader, file)
                if d is not None and d["bytes"] < most.get(downloader, 0):
                    went_back.setdefault(downloader, []).append((most[downloader], d["bytes"]))
                if d is not None:
                    most[downloader] = max(most.get(downloader, 0), d["bytes"])
                if d is not None and d["state"] in ("done", "failed"):
                    ended[downloader] = d
                    seconds[downloader] = reactor.seconds() - began
            if len(ended) == len(wanted):
                return True
            if reactor.seconds() >= next_kill:
                await self.kill_and_replace()
                kills_under_way += 1
                next_kill += KILL_EVERY
            return False

        try:
            await poll_until(churn_until_all_ended, timeout=DOWNLOAD_DEADLINE, what="every download to end",
                             interval=POLL)
        except AssertionError as e:
            pending = {p: await self.download(p, wanted[p][0]) for p in wanted if p not in ended}
            raise self.failureException(
                f"{e}: lost (not ended within {DOWNLOAD_DEADLINE} s) with {kills_under_way} nodes killed: "
                f"{pending}\n{self.tails(*self.peers)}") from None
        took = reactor.seconds() - began
        summary = "; ".join(f"{p}: {d['state']} in {seconds[p]:.1f} s, {d['attempts']} attempt(s), "
                            f"{d['bytes']} of {d['size']} bytes"
                            + (f" ({d['error']})" if d["error"] else "") for p, d in ended.items())
        log(f"{len(wanted)} downloads ended in {took:.1f} s with {kills_under_way} nodes killed: {summary}")

        self.assertGreaterEqual(kills_under_way, MIN_KILLS,
                                f"the downloads ended before the churn could hit them: {summary}")
        failed = {p: d["error"] for p, d in ended.items() if d["state"] != "done"}
        self.assertEqual(failed, {}, f"downloads lost under churn ({kills_under_way} nodes killed): {summary}\n"
                                     f"{self.tails(*failed)}")
        for downloader, (file, sha, _) in wanted.items():
            self.assertOnlyFile(downloader, file, sha)  # hashed here, with hashlib: none corrupt
        self.assertEqual(went_back, {}, f"downloads went back (bytes before, after): {summary}")

        # Churn stopped: the directory must list exactly the live nodes everywhere.
        live = {n.address for n in self.live_nodes()}
        views: dict = {}

        async def converged():
            nonlocal views
            views = await self.directory_views()
            return all(view == live for view in views.values())
        started = reactor.seconds()
        try:
            await poll_until(converged, timeout=CONVERGE_DEADLINE, what="every directory to list the live nodes",
                             interval=0.2)
        except AssertionError as e:
            differ = {name: {"stale": sorted(map(str, view - live)), "missing": sorted(map(str, live - view))}
                      for name, view in views.items() if view != live}
            raise self.failureException(f"{e}: {differ}\n{self.tracker.tail()}") from None
        log(f"every directory dropped the {len(self.killed)} killed nodes and listed the "
            f"{len(live)} live ones {reactor.seconds() - started:.1f} s after the churn stopped")
        dead = {n.address for n in self.killed}
        for name, view in views.items():
            self.assertEqual(view & dead, set(), f"{name} still lists killed nodes")
