"""Faults with real processes (issue 7): members that die, restart or lie.

Every test gets its own network of ``twistd`` processes on a random
``127.R1.R2.x`` prefix (``tests/support/faults.py``): the real tracker, six
nodes, and peers alice (who downloads, with 64 KiB chunks), bob (who shares
an 8 MiB random file) and, for the lying sharer, carol. Timers are short
(hop timeout 5 s, one-second heartbeat, rescan and refresh, stall timeout
5 s) so that each fault is noticed in seconds.

* ``NodeKilledTests``: a node is killed (SIGKILL) while alice downloads, once
  in each position: alice's entry, middle and exit, and bob's middle and exit.
  When it was bob's, alice's check of her silent transfer's source (docs
  17.10, choice 64) finds his old circuit gone. The
  other peer's circuit is made not to hold that node first (restarting that
  peer until its random circuit avoids it), so each test kills exactly one
  position. The peer concerned notices, builds a circuit without the dead
  node and announces again (the tracker counts one more ``ls`` than just
  before the kill); the download resumes from its partial file and ends
  with the right sha256.
* ``TrackerRestartTests``: the tracker is killed during a transfer and
  started again with the same key: peers that noticed rebuild and announce;
  the download completes. ``QuickTrackerRestartTests``: restarted between
  two of the sharer's lists, so he does not notice, he announces again on
  his old circuit when the tracker's catalogue lacks his files.
* ``SharerRestartTests``: the sharer is killed mid-transfer and started
  again; the requester's download resumes. (The requester restarted, by
  SIGTERM and SIGKILL, is ``tests/test_peer_processes.py``'s
  ``test_resume_after_sigterm`` / ``test_resume_after_sigkill``.)
* ``ForgetfulTrackerTests`` (in memory, ``tests/support/peer_network.py``): what
  makes a peer announce again on a circuit the tracker forgot, and only then.
* ``LyingSharerTests``: a sharer whose chunks are wrong (``lying_peer.py``):
  the requester rejects the file at its sha256 check, nothing wrong appears
  under the file's name, and the download completes from an honest sharer.

"Resumed, not restarted" is measured twice: the download's byte count
never falls below what it held just before the fault (a download that
starts over drops its chunk map and shows 0), and the forward bytes the
surviving nodes peeled from just before the fault on, divided by three
padded chunks per chunk, bound the file bytes sent from then on
(``FaultNetwork.sent_bound``): less than the file.

Every baseline (bytes held, bytes peeled, messages the tracker counted) is
read before the fault is caused, never after: a peer may notice a fault and
act on it within milliseconds. Nothing waits by sleeping: every wait polls
with a deadline, a bound for the poll and not a promise of speed.
"""

from __future__ import annotations

import random
import signal
import sys

from twisted.trial import unittest

from onion_twisted.tracker.catalogue import Catalogue
from tests.support.peer_network import BOB_IP
from tests.support.deferreds import current_reactor as _reactor, inline
from tests.support.faults import DownloadWatch, FaultNetwork
from tests.support.processes import PeerApiMixin, ProcessesMixin, poll_until

NAME = "fault file.bin"
SIZE = 8 * 1024 * 1024
CHUNK = 65536              # alice asks for 64 KiB chunks: 128 of them
REBUILD_DEADLINE = 30      # poll bounds only: the tests promise events, not how fast they come
TRANSFER_DEADLINE = 60
ENTRY, MIDDLE, EXIT = 0, 1, 2
POSITION_NAMES = {ENTRY: "entry", MIDDLE: "middle", EXIT: "exit"}


def log(text: str) -> None:
    print(f"\n{text}", file=sys.stderr, end="")


class _Transfers(FaultNetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    """Bob shares ``NAME`` (``SIZE`` random bytes); alice sees it in her catalogue."""

    timeout = 150
    # One circuit per peer (max_circuits = 1): these tests strike the circuit a transfer crosses
    # and read it as the status's "circuit"; the pool's separate circuits have tests of their own.
    bob_options: dict = {"window": 4, "max_circuits": 1}
    alice_options: dict = {"chunk_size": CHUNK, "max_circuits": 1}

    async def start_members(self):
        await super().start_members()
        self.file_path, self.sha = self.write_share("bob", NAME, SIZE)
        self.start_test_peer("bob", **self.bob_options)
        self.start_test_peer("alice", **self.alice_options)
        await self.wait_connected("bob")
        await self.wait_listed_file("alice", NAME, self.sha, SIZE)

    async def download_until_a_quarter(self) -> dict:
        """Alice asks for the file; her download's status once she holds a quarter of it."""
        asked = await self.ask("alice", NAME, self.sha)
        self.assertEqual((asked["file"], asked["sha256"]), (NAME, self.sha))
        return await self.wait_bytes("alice", NAME, SIZE // 4, timeout=TRANSFER_DEADLINE)

    async def assertStruckMidTransfer(self, held: int) -> dict:
        """Read just after the fault: alice holds some but not all of the file, no fewer bytes
        than the ``held`` she had just before it, and no finished copy. Her download's status."""
        after = await self.download("alice", NAME)
        self.assertGreater(after["bytes"], 0)
        self.assertLess(after["bytes"], SIZE, "the fault came after the transfer ended")
        self.assertNotEqual(after["state"], "done")
        self.assertGreaterEqual(after["bytes"], held, "the download fell back at the fault")
        part = self.base / "alice" / "downloads" / ".partial" / (NAME + ".part")
        self.assertTrue(part.is_file(), "no partial file at alice")
        self.assertFalse((self.base / "alice" / "downloads" / NAME).exists())
        return after

    async def assertResumed(self, watch: DownloadWatch, done: dict, held: int, forward_before: int, survivors):
        """The download ended verified, never fell below the ``held`` bytes of just before the fault, and
        less than the file was sent from then on (``forward_before`` was read then, at ``survivors``)."""
        self.assertEqual((done["bytes"], done["size"], done["sha256"], done["path"]), (SIZE, SIZE, self.sha, NAME))
        self.assertFalse(done["unverified"])
        self.assertGreaterEqual(watch.lowest, held, "the download started over instead of resuming")
        sent_again = self.sent_bound(await self.forward_bytes(survivors) - forward_before, CHUNK)
        self.assertLess(sent_again, SIZE, "at least the whole file crossed the network after the fault")
        self.assertOnlyFile("alice", NAME, self.sha)
        return sent_again


class NodeKilledTests(_Transfers):
    """A node dies (SIGKILL) in one position of one circuit while alice downloads."""

    async def separate(self, concerned: str, position: int) -> tuple[str, dict]:
        """The node at ``position`` of ``concerned``'s circuit, once the other peer's circuit avoids it.

        The other peer is restarted (SIGTERM, same directories) until its
        random circuit does not hold that node; both circuits, by peer.
        """
        other = "bob" if concerned == "alice" else "alice"
        target = (await self.wait_connected(concerned))[position]
        for restarts in range(12):
            theirs = await self.wait_connected(other)
            if target not in theirs:
                break
            await self.restart_peer(other)
        else:
            self.fail(f"{other}'s circuit went through {target} twelve times in a row")
        # (A restarted bob is connected, so his first ls, on his new circuit, was answered.)
        paths = {name: await self.wait_connected(name) for name in ("alice", "bob")}
        self.assertEqual(paths[concerned][position], target)
        log(f"{POSITION_NAMES[position]} of {concerned}: {target}; {other} restarted {restarts} times to avoid it")
        return target, paths

    async def kill_in_position(self, concerned: str, position: int):
        reactor = _reactor()
        target, paths = await self.separate(concerned, position)
        other = "bob" if concerned == "alice" else "alice"
        victim = self.node(target)
        survivors = [n for n in self.nodes if n is not victim]

        await self.download_until_a_quarter()
        # The baselines, read before the kill: the concerned peer may notice and rebuild within
        # milliseconds of it, so whatever is read after the kill may already include its ls.
        ls_before = (await self.tracker_messages()).get("ls", 0)
        gone_before = (await self.tracker_checks()).get("gone", 0)
        forward_before = await self.forward_bytes(survivors)
        held = (await self.download("alice", NAME))["bytes"]
        # Checked after the baselines: the circuits are still those measured, so no rebuild (the
        # only source of an ls here: the share does not change) came between them and the kill,
        # and the fault hits the position it names.
        now = {name: await self.circuit(name) for name in ("alice", "bob")}
        self.assertEqual(now, paths, "a circuit changed before the kill")
        victim.kill(signal.SIGKILL)
        killed_at = reactor.seconds()
        await victim.wait_exit(10)
        await self.assertStruckMidTransfer(held)

        # The peer concerned notices (its next message through the dead node fails), then
        # connects through other nodes.
        async def noticed():
            return await self.circuit(concerned) != paths[concerned]
        await poll_until(noticed, timeout=REBUILD_DEADLINE, what=f"{concerned} to notice the dead {target}",
                         interval=0.05)
        noticed_after = reactor.seconds() - killed_at

        async def rebuilt():
            circuit = await self.circuit(concerned)
            return circuit if circuit is not None and target not in circuit else None
        new_path = await poll_until(rebuilt, timeout=REBUILD_DEADLINE, what=f"{concerned}'s new circuit",
                                    interval=0.1)
        rebuilt_after = reactor.seconds() - killed_at
        self.assertEqual(len(set(new_path)), 3)
        # Its new circuit's first message was an ls: the tracker counted one more than before the kill.
        messages = await self.tracker_messages()
        self.assertGreater(messages.get("ls", 0), ls_before, "no announcement after the rebuild")

        watch = DownloadWatch(self, "alice", NAME)
        watch.lowest = held
        done = await watch.done(TRANSFER_DEADLINE)
        finished_after = reactor.seconds() - killed_at
        sent_again = await self.assertResumed(watch, done, held, forward_before, survivors)
        # The peer the node was not part of kept its circuit (an error reply to a chunk stops
        # only that upload; a chunk that fails first probes the circuit): the ls counted above
        # was the concerned peer's.
        self.assertEqual(await self.circuit(other), paths[other], f"{other} rebuilt its circuit")
        gone = (await self.tracker_checks()).get("gone", 0) - gone_before
        if concerned == "bob":
            # Alice's transfer went silent; her check of its source (docs 17.10, choice 64) made
            # the tracker send a message down bob's old circuit, which failed at the dead node.
            self.assertGreater(gone, 0, "no check found bob's old circuit gone")
        log(f"killed at {held * 100 // SIZE} %; {concerned} noticed in {noticed_after:.1f} s, rebuilt in "
            f"{rebuilt_after:.1f} s; done {finished_after:.1f} s after the kill in {done['attempts']} attempts; "
            f"at most {sent_again * 100 // SIZE} % of the file sent from the kill on; {gone} checks answered gone")

    @inline
    async def test_requesters_entry_killed(self):
        await self.kill_in_position("alice", ENTRY)

    @inline
    async def test_requesters_middle_killed(self):
        await self.kill_in_position("alice", MIDDLE)

    @inline
    async def test_requesters_exit_killed(self):
        await self.kill_in_position("alice", EXIT)

    @inline
    async def test_sharers_exit_killed(self):
        await self.kill_in_position("bob", EXIT)

    @inline
    async def test_sharers_middle_killed(self):
        await self.kill_in_position("bob", MIDDLE)


class TrackerRestartTests(_Transfers):
    """The tracker dies (SIGKILL) during a transfer and is started again with the same key."""

    async def restart_tracker(self):
        self.tracker = self.start_test_tracker()
        identity = await self.wait_identity(self.tracker, self.admin)
        self.assertEqual(identity["public_key"], self.tracker_key, "the tracker came back with another key")

    @inline
    async def test_tracker_restarted_after_the_peers_noticed(self):
        """Down long enough for both peers to notice: both rebuild, announce again, the download resumes."""
        reactor = _reactor()
        await self.download_until_a_quarter()
        # The baselines, read before the kill: the transfer goes on over the bridge without the
        # tracker until the peers notice, and those bytes count as sent after the fault.
        forward_before = await self.forward_bytes(self.nodes)
        held = (await self.download("alice", NAME))["bytes"]
        self.tracker.kill(signal.SIGKILL)
        await self.tracker.wait_exit(10)
        await self.assertStruckMidTransfer(held)

        async def both_noticed():
            return all([await self.circuit(name) is None for name in ("alice", "bob")])
        await poll_until(both_noticed, timeout=REBUILD_DEADLINE, what="both peers to notice the tracker is gone")

        await self.restart_tracker()
        restarted = reactor.seconds()
        for name in ("alice", "bob"):
            await self.wait_connected(name, timeout=60)

        async def announced():  # bob's file, in the new tracker's catalogue
            return await self.tracker_gauge("onion_tracker_catalogue_entries") == 1
        await poll_until(announced, timeout=60, what="bob's file in the new tracker's catalogue", interval=0.2)
        await self.wait_listed_file("alice", NAME, self.sha, SIZE, timeout=60)
        back_after = reactor.seconds() - restarted
        for name in ("alice", "bob"):  # new circuits, connected since the restart
            age = (await self.status(name))["circuit"]["age"]
            self.assertLessEqual(age, reactor.seconds() - restarted + 1, f"{name}'s circuit is older than the restart")
        self.assertGreaterEqual((await self.tracker_messages()).get("ls", 0), 2)  # counted since the restart

        watch = DownloadWatch(self, "alice", NAME)
        watch.lowest = held
        done = await watch.done(TRANSFER_DEADLINE)
        sent_again = await self.assertResumed(watch, done, held, forward_before, self.nodes)
        log(f"killed at {held * 100 // SIZE} %; both peers connected again and bob's file listed {back_after:.1f} s "
            f"after the restart; at most {sent_again * 100 // SIZE} % sent from the kill on")


class QuickTrackerRestartTests(_Transfers):
    """The tracker is killed and started again between two of bob's lists: bob sends nothing
    through it while it is down. The new tracker holds none of the sealed hops' keys (a
    tracker keeps them in memory only: that is forward secrecy), so it answers bob's next
    list 404 (PROTOCOL.md §12, docs/protocol.md 17.5); bob builds a new circuit at once and
    announces his files on it, and the download resumes.

    The restart is placed by an event, not by luck: alice lists once when she connects and
    then not for an hour, so the next list is bob's. The test waits for bob's first list,
    then has alice download a quarter of the file and kills and restarts the tracker, all
    before bob's next list ``REFRESH`` seconds later (checked: less than ``REFRESH`` went by
    between them; the tracker's count of lists cannot say, since alice's download may probe
    her circuit with a list when its chunks pause)."""

    REFRESH = 30
    bob_options = {"window": 4, "refresh_interval": REFRESH, "max_circuits": 1}
    alice_options = {"chunk_size": CHUNK, "refresh_interval": 3600, "max_circuits": 1}
    SECOND = "after the restart.bin"
    SECOND_SIZE = 256 * 1024

    async def start_members(self):
        await super(_Transfers, self).start_members()  # the tracker and the nodes; the peers in this order:
        self.file_path, self.sha = self.write_share("bob", NAME, SIZE)
        self.second = self.write_share("bob", self.SECOND, self.SECOND_SIZE)  # asked for once the tracker is back
        self.start_test_peer("alice", **self.alice_options)
        await self.wait_connected("alice")
        await self.wait_lists(1, "alice's one list")
        self.start_test_peer("bob", **self.bob_options)
        await self.wait_connected("bob")

    async def wait_lists(self, count: int, what: str) -> None:
        async def counted():
            return (await self.tracker_messages()).get("list", 0) >= count
        await poll_until(counted, timeout=30, what=what, interval=0.05)

    @inline
    async def test_tracker_restarted_before_the_peers_noticed(self):
        reactor = _reactor()
        await self.wait_lists(2, "bob's first list")
        bob_listed = reactor.seconds()
        await self.download_until_a_quarter()  # by name and sha256: alice's catalogue is older than bob
        before = {name: await self.circuit(name) for name in ("alice", "bob")}
        forward_before = await self.forward_bytes(self.nodes)
        held = (await self.download("alice", NAME))["bytes"]
        self.assertLess(reactor.seconds() - bob_listed, self.REFRESH - 1,
                        f"bob may have listed again before the kill: the quarter took longer than {self.REFRESH} s")
        self.tracker.kill(signal.SIGKILL)
        await self.tracker.wait_exit(10)
        await self.assertStruckMidTransfer(held)
        self.tracker = self.start_test_tracker()
        identity = await self.wait_identity(self.tracker, self.admin)
        self.assertEqual(identity["public_key"], self.tracker_key)
        restarted = reactor.seconds()

        # Bob's next list, then his announcement at the tick after it, fill the new catalogue
        # with his two files; the deadline is a bound for the poll, past REFRESH.
        async def announced():
            return await self.tracker_gauge("onion_tracker_catalogue_entries") == 2
        try:
            await poll_until(announced, timeout=self.REFRESH + 30, what="bob's files in the new tracker's catalogue",
                             interval=0.2)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.tails('bob', 'tracker')}") from None
        announced_after = reactor.seconds() - restarted
        # He announced on a circuit built after the restart: the 404 to his list made him rebuild.
        self.assertGreaterEqual((await self.tracker_messages()).get("ls", 0), 1, "no announcement reached it")
        bob_circuit = (await self.status("bob"))["circuit"]
        self.assertEqual((bob_circuit["protocol"], bob_circuit["sealed"]), ("onion-http/2", True))
        self.assertLessEqual(bob_circuit["age"], reactor.seconds() - restarted + 1,
                             "bob announced on a circuit older than the restart")

        watch = DownloadWatch(self, "alice", NAME)
        watch.lowest = held
        done = await watch.done(TRANSFER_DEADLINE)
        sent_again = await self.assertResumed(watch, done, held, forward_before, self.nodes)
        # The new tracker bridges a request for bob's other file.
        second_path, second_sha = self.second
        await self.ask("alice", self.SECOND, second_sha)
        second = await DownloadWatch(self, "alice", self.SECOND).done(TRANSFER_DEADLINE)
        self.assertEqual((second["bytes"], second["sha256"], second["path"]),
                         (self.SECOND_SIZE, second_sha, self.SECOND))
        after = {name: await self.circuit(name) for name in ("alice", "bob")}
        log(f"killed at {held * 100 // SIZE} %; bob's files announced again {announced_after:.1f} s after the "
            f"restart on a new circuit ({'same' if after['bob'] == before['bob'] else 'other'} nodes); "
            f"at most {sent_again * 100 // SIZE} % sent from the kill on")


class SharerRestartTests(_Transfers):
    """The sharer dies (SIGKILL) mid-transfer and is started again with the same directories."""

    @inline
    async def test_sharer_killed_and_restarted(self):
        reactor = _reactor()
        alice_path = await self.circuit("alice")
        await self.download_until_a_quarter()
        # The baselines, read before the kill (chunks in flight still cross after it).
        forward_before = await self.forward_bytes(self.nodes)
        held = (await self.download("alice", NAME))["bytes"]
        bob = self.peers["bob"]
        bob.kill(signal.SIGKILL)
        killed_at = reactor.seconds()
        await bob.wait_exit(10)
        await self.assertStruckMidTransfer(held)
        self.start_test_peer("bob", **self.bob_options)
        await self.wait_connected("bob")

        watch = DownloadWatch(self, "alice", NAME)
        watch.lowest = held
        done = await watch.done(TRANSFER_DEADLINE)
        sent_again = await self.assertResumed(watch, done, held, forward_before, self.nodes)
        self.assertEqual(await self.circuit("alice"), alice_path, "alice rebuilt her circuit")
        log(f"killed at {held * 100 // SIZE} %; done {reactor.seconds() - killed_at:.1f} s later in "
            f"{done['attempts']} attempts; at most {sent_again * 100 // SIZE} % sent from the kill on")


class LyingSharerTests(FaultNetwork, ProcessesMixin, PeerApiMixin, unittest.TestCase):
    """Bob (``lying_peer.py``) sends every chunk with a flipped byte; carol later shares the true file."""

    timeout = 120
    LIE_NAME = "lie.bin"
    LIE_SIZE = 2 * 1024 * 1024

    async def start_members(self):
        await super().start_members()
        self.file_path, self.sha = self.write_share("bob", self.LIE_NAME, self.LIE_SIZE)
        self.start_lying_peer("bob", window=4)
        self.start_test_peer("carol")  # shares nothing yet
        self.start_test_peer("alice", chunk_size=CHUNK)
        await self.wait_connected("carol")
        await self.wait_listed_file("alice", self.LIE_NAME, self.sha, self.LIE_SIZE)

    @inline
    async def test_a_lying_sharer_is_rejected_and_an_honest_one_used(self):
        name = self.LIE_NAME
        downloads = self.base / "alice" / "downloads"
        await self.ask("alice", name, self.sha)

        # Only bob shares it: his first chunk does not match the file's root (§13), so it is
        # never written and bob is excluded; the download waits for another source.
        async def rejected():
            d = await self.download("alice", name)
            if d["state"] in ("done", "failed"):
                raise AssertionError(f"the download ended {d['state']} from the lying sharer: {d}")
            if d["error"] and "does not match" in d["error"]:
                return d
            return None
        first = await poll_until(rejected, timeout=TRANSFER_DEADLINE, what="alice to reject bob's data",
                                 interval=0.02)
        self.assertIn("lying sharer: flipped", self.peers["bob"].log_text(), "bob did not serve the lie")
        # Nothing under the file's name (nor beside it): only the partial directory.
        self.assertEqual(sorted(p.name for p in downloads.iterdir()), [".partial"])
        self.assertEqual([(s["chunks"], s["mismatched"], s["excluded"]) for s in first["sources"]], [(0, 1, True)])

        # Carol shares the true file; the download goes on by itself (no new POST) and ends from her.
        self.copy_into_share(self.file_path, "carol")
        watch = DownloadWatch(self, "alice", name)
        done = await watch.done(TRANSFER_DEADLINE)
        self.assertEqual((done["bytes"], done["sha256"], done["path"]), (self.LIE_SIZE, self.sha, name))
        self.assertFalse(done["unverified"])
        self.assertGreaterEqual(done["attempts"], 2)
        self.assertOnlyFile("alice", name, self.sha)
        log(f"rejected: {first['error']!r}; done in {done['attempts']} attempts; errors seen {watch.errors}")


class ForgetfulTrackerTests(unittest.TestCase):
    """In memory: a tracker that lost its catalogue (a restart) while a peer's circuit lived on.

    The new tracker records the old circuit at its next ``list``, with no
    files; the peer sees its files missing from the reply and announces
    them again at its next tick. A listing capped by ``max_listing``, which
    leaves out files the tracker does hold, does not make it announce again
    and again: only files the reply to its last ``ls`` listed are watched.
    """

    def setUp(self):
        from tests.support.peer_network import Network
        self.net = Network(self.mktemp())

    def tearDown(self):
        self.net.run(self.net.stop())
        self.assertEqual(self.net.crashes, [], "a member crashed (answered 500)")

    def counts(self, peer):
        key = self.net.tracker_key_of(peer)
        return len(self.net.messages_on(key, "ls")), len(self.net.messages_on(key, "list"))

    async def refresh(self, peer) -> None:
        """``refresh_interval`` later, one tick of ``peer``."""
        net = self.net
        start = net.clock.seconds()
        net.pump(until=lambda: net.clock.seconds() >= start + peer.refresh_interval)
        await net.run(peer.tick())

    @inline
    async def test_a_peer_announces_again_when_the_tracker_forgot_its_files(self):
        net, bob = self.net, self.net.bob
        net.write_share(BOB_IP, "one.bin", b"1")
        net.write_share(BOB_IP, "two.bin", b"22")
        await net.start()
        self.assertEqual(self.counts(bob), (1, 0))
        await self.refresh(bob)
        self.assertEqual(self.counts(bob), (1, 1))  # the tracker lists both: nothing to do

        net.tracker.catalogue = Catalogue(net.clock, rng=random.Random(1))  # restarted: it knows nothing
        await self.refresh(bob)
        self.assertEqual(self.counts(bob), (1, 2))
        self.assertEqual(bob.catalogue, [])
        await net.run(bob.tick())                   # the next tick announces again
        self.assertEqual(self.counts(bob), (2, 2))
        self.assertEqual(sorted(r["name"] for r in net.tracker.catalogue.listing()), ["one.bin", "two.bin"])
        for _ in range(3):                          # and then only refreshes
            await self.refresh(bob)
        self.assertEqual(self.counts(bob), (2, 5))

    @inline
    async def test_a_capped_listing_does_not_make_a_peer_announce_again_and_again(self):
        net, bob = self.net, self.net.bob
        net.tracker.catalogue.max_listing = 1       # one entry per files reply
        net.write_share(BOB_IP, "one.bin", b"1")
        net.write_share(BOB_IP, "two.bin", b"22")
        await net.start()
        self.assertEqual(len(bob.catalogue), 1)     # the reply to his ls lists one of his two files
        for _ in range(4):
            await self.refresh(bob)
        self.assertEqual(self.counts(bob), (1, 4))
