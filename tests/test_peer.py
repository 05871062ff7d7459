"""Peer in a whole in-memory network (see tests/support/peer_network.py)."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.protocol import wire
from onion_twisted.peer.download_state import (DONE, FAILED, QUEUED, RECEIVING, REQUESTING, VERIFYING,
                                               DownloadState, IllegalTransition)
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.peer.downloads import Download
from onion_twisted.peer.peer import CONNECTED

from tests.support.deferreds import inline

from tests.support.peer_network import ALICE_IP, BOB_IP, CHUNK, NODE_IPS, NOW, WINDOW, Network


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PeerNetworkCase(unittest.TestCase):
    def setUp(self):
        self.net = Network(self.mktemp())
        self.alice, self.bob = self.net.alice, self.net.bob

    def tearDown(self):
        for peer in list(self.net.peers.values()):
            if not peer._stopped:
                self.net.run(peer.stop())  # closes the partial files it holds open
        self.net.pump()
        self.assertEqual(self.net.crashes, [], "a member crashed (answered 500)")

    async def bob_shares_and_start(self, name: str, size: int) -> bytes:
        """``size`` random bytes in bob's share as ``name``, then the network started; the bytes."""
        data = os.urandom(size)
        self.net.write_share(BOB_IP, name, data)
        await self.net.start()
        return data

    async def partly_downloaded(self, size: int, chunks: int):
        """Bob shares big.bin (``size`` random bytes), alice downloads it until she holds ``chunks`` chunks.

        The bytes and alice's download.
        """
        data = await self.bob_shares_and_start("big.bin", size)
        d = self.alice.download("big.bin")
        self.net.pump(until=has_chunks(d, chunks))
        return data, d


class ConnectTests(PeerNetworkCase):
    @inline
    async def test_both_peers_connect(self):
        net = self.net
        a_data, b_data = os.urandom(1000), os.urandom(3000)
        net.write_share(ALICE_IP, "a.bin", a_data)
        net.write_share(BOB_IP, "b.bin", b_data)
        await net.start(self.alice, self.bob)
        for peer in (self.alice, self.bob):
            self.assertEqual(peer.circuit_state, CONNECTED)
            hops = [str(h.address) for h in peer.circuit.hops]
            self.assertEqual(len(set(hops)), 3)
            self.assertTrue(all(h.address.ip in NODE_IPS for h in peer.circuit.hops))
        self.assertEqual(len(net.tracker.catalogue.circuits), 2)
        self.assertEqual({net.tracker_key_of(self.alice), net.tracker_key_of(self.bob)},
                         set(net.tracker.catalogue.circuits))
        await net.run(self.alice.tick())  # a list: alice's catalogue predates bob's ls
        rows = {(f["name"], f["size"], f["sha256"], f["sources"]) for f in self.alice.catalogue}
        self.assertEqual(rows, {("a.bin", 1000, sha(a_data), 1), ("b.bin", 3000, sha(b_data), 1)})


# --- helpers -----------------------------------------------------------------------------------


class UploadWatch:
    """What a sharer hands to its circuit: chunks in flight, chunks and transfer_ends sent.

    Wraps ``peer.uploader.send_on`` (every upload message goes through it), so it
    counts what the peer really keeps unacknowledged, independently of the
    sender's own bookkeeping.
    """

    def __init__(self, peer):
        self.in_flight = 0
        self.max_in_flight = 0
        self.chunks: list[tuple[str, int, int]] = []   # (transfer, chunk_idx, bytes)
        self.ends: list[dict] = []
        original = peer.uploader.send_on

        async def send_on(circuit, message, refusable=False, **options):
            sent = message
            if isinstance(message, bytes):  # chunks are serialised by the peer itself
                message = wire.loads_object(message)
            kind = message.get("type")
            if kind == "file_chunk":
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.chunks.append((message["transfer"], message["chunk_idx"],
                                    len(wire.b64decode(message["data"]))))
            elif kind == "transfer_end":
                self.ends.append(dict(message))
            try:
                return await original(circuit, sent, refusable, **options)
            finally:
                if kind == "file_chunk":
                    self.in_flight -= 1

        peer.uploader.send_on = send_on

    def bytes_sent(self, transfer=None) -> int:
        return sum(n for t, _, n in self.chunks if transfer is None or t == transfer)


def partial_files(net, ip) -> list[str]:
    partial = os.path.join(net.downloads_dir(ip), ".partial")
    return sorted(os.listdir(partial)) if os.path.isdir(partial) else []


def finished(d):
    return lambda: d.state in (DONE, FAILED)


def has_chunks(d, count: int):
    return lambda: d.chunks is not None and d.chunks.have >= count


def downloaded(net, name: str) -> bytes:
    """The bytes of ``name`` in alice's downloads."""
    with open(os.path.join(net.downloads_dir(ALICE_IP), name), "rb") as f:
        return f.read()


# --- downloads ---------------------------------------------------------------------------------


class DownloadTests(PeerNetworkCase):
    def assertFailsAtOnce(self, name, error):
        """Alice's download of ``name`` fails with ``error`` on its first attempt."""
        d = self.alice.download(name)
        self.net.pump(until=finished(d))
        self.assertEqual(d.state, FAILED)
        self.assertEqual(d.error, error)
        self.assertEqual(d.attempts, 1)

    def assertDownloaded(self, d, name, data):
        self.assertEqual(d.state, DONE, d.error)
        got = downloaded(self.net, name)
        self.assertEqual(len(got), len(data))
        self.assertTrue(got == data, "the downloaded bytes differ from the shared file")
        self.assertEqual(d.sha256, sha(data))
        self.assertEqual(sha(got), sha(data))
        self.assertFalse(d.unverified)
        self.assertEqual(partial_files(self.net, ALICE_IP), [])

    @inline
    async def test_alice_downloads_bobs_file_within_the_window(self):
        net = self.net
        data = await self.bob_shares_and_start("big.bin", 200 * 1024)
        watch = UploadWatch(self.bob)
        d = self.alice.download("big.bin")
        net.pump(until=lambda: finished(d)() and watch.ends)  # the file is whole before bob's end arrives
        self.assertDownloaded(d, "big.bin", data)
        self.assertEqual(d.attempts, 1)
        self.assertEqual(sorted(i for _, i, _ in watch.chunks), list(range(13)))  # 200 KiB / 16 KiB
        self.assertEqual(watch.bytes_sent(), len(data))
        self.assertLessEqual(watch.max_in_flight, WINDOW)
        self.assertEqual(watch.max_in_flight, WINDOW, "the sharer should keep a window of chunks in flight")
        self.assertEqual([e["status"] for e in watch.ends], ["ok"])
        # The request went through alice's circuit, the chunks over a bridge: the
        # tracker saw the request and no chunk.
        self.assertEqual(len(net.messages_of_type("request")), 1)
        self.assertEqual(net.messages_of_type("file_chunk"), [])

    @inline
    async def test_a_decomposed_name_is_asked_for_and_saved_in_nfc(self):
        net = self.net
        data = os.urandom(1000)
        net.write_share(BOB_IP, "re\u0301sume\u0301.pdf", data)  # decomposed on bob's disk
        await net.start()
        d = self.alice.download("re\u0301sume\u0301.pdf")      # and as alice typed it
        net.pump(until=finished(d))
        self.assertDownloaded(d, "r\u00e9sum\u00e9.pdf", data)
        self.assertEqual([m["file"] for _, _, m in net.messages_of_type("request")], ["r\u00e9sum\u00e9.pdf"])

    @inline
    async def test_a_download_that_fails_on_disk_is_logged_without_its_path(self):
        from twisted.logger import formatEvent, globalLogPublisher
        from onion_twisted.peer import downloads
        net = self.net
        await self.bob_shares_and_start("secret plans.bin", 1000)

        def full_disk(d, *args, **kwargs):
            raise OSError(28, "No space left on device", f"/data/downloads/.partial/{d.name}.part")

        self.patch(downloads.Download, "expect", full_disk)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        d = self.alice.download("secret plans.bin")
        net.pump(until=lambda: d.state == FAILED)
        text = "\n".join(formatEvent(e) or "" for e in events)
        self.assertIn("No space left on device", text)
        self.assertNotIn("secret plans", text)
        self.assertNotIn(".partial", text)
        self.assertIn("No space left on device", d.error)  # the user sees why on the page

    @inline
    async def test_a_name_nobody_shares_fails_at_once(self):
        net = self.net
        await net.start()
        self.assertFailsAtOnce("nobody.bin", "nobody shares this file")
        self.assertEqual(len(net.messages_of_type("request")), 1)

    @inline
    async def test_a_listed_file_whose_sharer_is_between_circuits_is_asked_again(self):
        net = self.net
        data = await self.bob_shares_and_start("churned.bin", 3 * CHUNK)
        await net.run(self.alice.tick())  # her catalogue lists bob's file
        self.assertIn("churned.bin", [r["name"] for r in self.alice.catalogue])
        # Bob's circuit is forgotten (a node of it died), and he has not announced again yet.
        self.assertTrue(net.tracker.catalogue.forget(net.tracker_key_of(self.bob)))
        d = self.alice.download("churned.bin")
        net.pump(until=lambda: d.error is not None)
        self.assertNotEqual(d.state, FAILED, "a file the catalogue lists was given up at once")
        self.assertIn("nobody shares this file", d.error)
        self.bob.circuit_broken(self.bob.circuit, "test: its node died")  # he builds anew and announces
        net.pump(until=finished(d), max_steps=5000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(downloaded(net, "churned.bin") == data)

    @inline
    async def test_a_sharer_away_longer_than_the_attempts_pauses_is_waited_for_within_the_grace(self):
        net = self.net
        data = await self.bob_shares_and_start("churned.bin", 3 * CHUNK)
        await net.run(self.alice.tick())
        self.assertTrue(net.tracker.catalogue.forget(net.tracker_key_of(self.bob)))
        d = self.alice.download("churned.bin")
        # Bob stays away for a minute: past the pauses of max_attempts (1 + 2 + 4 + 8 s), which
        # under churn a sharer whose builds fail can outlast, and within AWAY_GRACE.
        began = net.clock.seconds()
        net.pump(until=lambda: d.state == FAILED or net.clock.seconds() - began >= 60)
        self.assertNotEqual(d.state, FAILED, d.error)
        self.assertGreater(len(net.messages_of_type("request")), self.alice.downloader.max_attempts)
        self.bob.circuit_broken(self.bob.circuit, "test: its node died")  # he builds anew and announces
        net.pump(until=finished(d), max_steps=5000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(downloaded(net, "churned.bin") == data)

    @inline
    async def test_a_sharer_away_past_the_grace_fails_the_download(self):
        from onion_twisted.peer.downloader import AWAY_GRACE
        net = self.net
        await self.bob_shares_and_start("churned.bin", 3 * CHUNK)
        await net.run(self.alice.tick())
        self.assertTrue(net.tracker.catalogue.forget(net.tracker_key_of(self.bob)))
        d = self.alice.download("churned.bin")
        began = net.clock.seconds()
        net.pump(until=lambda: d.state == FAILED)
        self.assertGreaterEqual(net.clock.seconds() - began, AWAY_GRACE)
        self.assertEqual(d.error, "gave up after 5 attempts: nobody shares this file")

    @inline
    async def test_a_file_listed_when_asked_for_is_asked_again_after_the_catalogue_lost_it(self):
        net = self.net
        await self.bob_shares_and_start("churned.bin", 3 * CHUNK)
        await net.run(self.alice.tick())
        self.assertTrue(net.tracker.catalogue.forget(net.tracker_key_of(self.bob)))
        d = self.alice.download("churned.bin")
        self.assertIsNotNone(d.root, "the catalogue's root was not taken")
        # A refresh since (a list, a new circuit's ls) no longer lists it: bob is between circuits.
        self.patch(self.alice.downloader, "count_sources", lambda name, sha256, root: 0)
        net.pump(until=lambda: d.error is not None)
        self.assertNotEqual(d.state, FAILED, "a file listed when it was asked for was given up at once")

    @inline
    async def test_a_file_only_this_peer_shares_fails_at_once(self):
        net = self.net
        net.write_share(ALICE_IP, "mine.bin", b"alice's own bytes")
        await net.start()
        self.assertFailsAtOnce("mine.bin", "only this peer shares this file")


class ResumeTests(PeerNetworkCase):
    @inline
    async def test_a_restarted_peer_asks_only_for_the_missing_chunks(self):
        net = self.net
        data = await self.bob_shares_and_start("big.bin", 40 * CHUNK + 100)  # 41 chunks, the last one short
        watch = UploadWatch(self.bob)
        d = self.alice.download("big.bin")
        net.pump(until=has_chunks(d, 12))
        await net.run(self.alice.stop())
        had = d.chunks.bytes_received
        missing = d.chunks.missing_ranges()
        self.assertTrue(0 < had < len(data), f"had {had} of {len(data)} bytes at the stop")
        self.assertEqual(partial_files(net, ALICE_IP), ["big.bin.json", "big.bin.part"])
        # The chunks still in flight reach a stopped peer: bob's circuit breaks (the
        # bridge is gone) and bob builds another; wait until bob has announced again.
        net.pump()
        net.pump(until=lambda: self.bob.circuit is not None and self.bob.circuit.connected
                 and net.tracker.catalogue.names.get("big.bin"), max_steps=2000)
        first_transfer = {t for t, _, _ in watch.chunks}
        self.assertEqual(len(first_transfer), 1)

        alice = net.make_peer(ALICE_IP, "alice")
        requests_before = len(net.messages_of_type("request"))
        await net.start(alice)
        resumed = alice.downloads["big.bin"]
        net.pump(until=finished(resumed))
        self.assertEqual(resumed.state, DONE, resumed.error)
        requests = [m for _, _, m in net.messages_of_type("request")][requests_before:]
        self.assertEqual(len(requests), 1)
        self.assertEqual(requests[0]["chunks"], missing)
        self.assertEqual(requests[0]["sha256"], sha(data))
        second = {t for t, _, _ in watch.chunks} - first_transfer
        self.assertEqual(len(second), 1)
        sent_again = watch.bytes_sent(second.pop())
        self.assertLess(sent_again, len(data))
        self.assertEqual(sent_again, len(data) - had)
        self.assertTrue(downloaded(net, "big.bin") == data, "the resumed file differs from the shared one")
        # Long after, nothing of the stopped peer comes back to write in .partial.
        net.pump(until=lambda: net.clock.seconds() > NOW + 600)
        self.assertEqual(partial_files(net, ALICE_IP), [])
        self.assertEqual(sorted(os.listdir(net.downloads_dir(ALICE_IP))), [".partial", "big.bin"])

    @inline
    async def test_a_resumed_download_waits_for_its_sharer_to_come_back(self):
        net = self.net
        data, d = await self.partly_downloaded(20 * CHUNK, 5)
        await net.run(self.alice.stop())
        await net.run(self.bob.stop())
        net.pump()
        self.assertEqual(net.tracker.catalogue.names, {})  # bob's circuit is gone: nobody shares it
        alice = net.make_peer(ALICE_IP, "alice")
        await net.start(alice)
        resumed = alice.downloads["big.bin"]
        net.pump(until=lambda: resumed.attempts >= 2 or resumed.state == FAILED)
        # Partial data on disk: "nobody shares" is a failed attempt, not the end.
        self.assertNotEqual(resumed.state, FAILED, resumed.error)
        self.assertIn("nobody shares this file", resumed.error)
        bob = net.make_peer(BOB_IP, "bob")
        await net.start(bob)
        net.pump(until=finished(resumed))
        self.assertEqual(resumed.state, DONE, resumed.error)
        self.assertTrue(downloaded(net, "big.bin") == data, "the resumed file differs from the shared one")


class BrokenCircuitTests(PeerNetworkCase):
    @inline
    async def test_a_failed_forward_message_rebuilds_the_circuit_and_resumes(self):
        net = self.net
        data, d = await self.partly_downloaded(40 * CHUNK, 8)
        old = self.alice.circuit
        old_key = net.tracker_key_of(self.alice)
        entry = old.entry.ip
        net.down.add(entry)
        requests_before = len(net.messages_of_type("request"))
        # The next forward message fails (alice's request after the stall, or a tick).
        net.pump(until=lambda: self.alice.circuit is not old)
        self.assertTrue(old.destroyed, "the broken circuit was not destroyed")
        net.pump(until=lambda: self.alice.circuit is not None and self.alice.circuit.connected, max_steps=5000)
        new = self.alice.circuit
        self.assertNotIn(entry, [h.address.ip for h in new.hops])
        self.assertEqual(len({h.address for h in new.hops}), 3)
        new_key = net.tracker_key_of(self.alice)
        self.assertNotEqual(new_key, old_key)
        self.assertEqual(len(net.messages_on(new_key, "ls")), 1, "no ls on the new circuit")
        self.assertIn(new_key, net.tracker.catalogue.circuits)
        # (The old circuit's destroy died at the down entry: the tracker forgets it when idle.)
        net.pump(until=finished(d), max_steps=5000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(downloaded(net, "big.bin") == data, "the resumed file differs from the shared one")
        later = [m for _, _, m in net.messages_of_type("request")][requests_before:]
        self.assertTrue(later and all("chunks" in m for m in later), later)
        self.assertTrue(all(m["chunks"][0][0] >= 8 for m in later),
                        "the resumed request asked again for chunks alice had")


    @inline
    async def test_a_node_lost_mid_transfer_is_noticed_in_seconds_and_the_same_attempt_goes_on(self):
        net = self.net
        data, d = await self.partly_downloaded(40 * CHUNK, 8)
        old = self.alice.circuit
        bobs = {h.address.ip for h in self.bob.circuit.hops}
        lost = next((h.address.ip for h in old.hops if h.address.ip not in bobs), None)
        self.assertIsNotNone(lost, "every node of alice's circuit is in bob's too (the seed decides)")
        requests_before = len(net.messages_of_type("request"))
        net.down.add(lost)  # it answers nothing: only a message through it tells alice
        downed = net.clock.seconds()
        net.pump(until=lambda: self.alice.circuit is not old, max_steps=5000)
        self.assertLess(net.clock.seconds() - downed, 3, "alice noticed the lost node by her stall timeout")
        net.pump(until=finished(d), max_steps=5000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertEqual(d.attempts, 1, "the download started a new attempt instead of going on")
        self.assertTrue(downloaded(net, "big.bin") == data, "the resumed file differs from the shared one")
        later = [m for _, _, m in net.messages_of_type("request")][requests_before:]
        self.assertTrue(later and all(m["chunks"][0][0] >= 8 for m in later),
                        "the request after the loss asked again for chunks alice had")

    @inline
    async def test_a_broken_circuit_asks_again_without_waiting_for_the_stall_timeout(self):
        net = self.net
        data, d = await self.partly_downloaded(40 * CHUNK, 8)
        requests_before = len(net.messages_of_type("request"))
        self.alice.circuit_broken(self.alice.circuit, "test: the circuit went away")
        broke = net.clock.seconds()
        net.pump(until=lambda: len(net.messages_of_type("request")) > requests_before, max_steps=5000)
        self.assertLess(net.clock.seconds() - broke, self.alice.stall_timeout / 4,
                        "the download waited for the stall timeout before asking again")
        net.pump(until=finished(d), max_steps=5000)
        self.assertEqual(d.state, DONE, d.error)
        self.assertTrue(downloaded(net, "big.bin") == data, "the resumed file differs from the shared one")


class GiveUpTests(PeerNetworkCase):
    @inline
    async def test_a_download_gives_up_after_five_attempts(self):
        net = self.net
        path = net.write_share(BOB_IP, "gone.bin", os.urandom(3 * CHUNK))
        await net.start()
        os.unlink(path)  # still announced: bob's refusal reaches alice each time
        watch = UploadWatch(self.bob)
        d = self.alice.download("gone.bin")
        net.pump(until=lambda: d.attempts >= 2)
        self.assertEqual(d.error, "attempt 1 of 5: the sharer stopped: no such file")
        net.pump(until=finished(d))
        self.assertEqual(d.state, FAILED)
        self.assertEqual(d.attempts, 5)
        self.assertEqual(d.error, "gave up after 5 attempts: the sharer stopped: no such file")
        self.assertEqual(len(net.messages_of_type("request")), 5)
        self.assertEqual([(e["status"], e["detail"]) for e in watch.ends], [("error", "no such file")] * 5)
        self.assertEqual(watch.chunks, [])
        self.assertFalse(os.path.exists(os.path.join(net.downloads_dir(ALICE_IP), "gone.bin")))
        # Nothing more is tried afterwards.
        net.pump(until=lambda: net.clock.seconds() > NOW + 3600)
        self.assertEqual(len(net.messages_of_type("request")), 5)


class WrongDataTests(PeerNetworkCase):
    @inline
    async def test_a_file_that_does_not_match_its_sha256_is_not_kept(self):
        net = self.net
        data = os.urandom(3 * CHUNK + 5)
        path = net.write_share(BOB_IP, "rot.bin", data)
        await net.start()
        # Bit rot after hashing: same size and mtime, so bob still announces the old sha256.
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(CHUNK + 7)
            f.write(bytes([data[CHUNK + 7] ^ 0xFF]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        await net.run(self.bob.rescan())
        self.assertEqual(self.bob.share.entry("rot.bin")["sha256"], sha(data))
        watch = UploadWatch(self.bob)
        d = self.alice.download("rot.bin")
        net.pump(until=lambda: d.attempts >= 2 or d.state in (DONE, FAILED))
        self.assertEqual(d.error, "attempt 1 of 5: the file's sha256 did not match; partial data discarded")
        self.assertEqual(partial_files(net, ALICE_IP), [])
        self.assertEqual(os.listdir(net.downloads_dir(ALICE_IP)), [".partial"])
        net.pump(until=finished(d))
        self.assertEqual(d.state, FAILED)
        self.assertIn("sha256 did not match", d.error)
        self.assertEqual(watch.bytes_sent(), 5 * len(data))  # five whole transfers, each refused
        self.assertEqual(os.listdir(net.downloads_dir(ALICE_IP)), [".partial"])
        self.assertEqual(partial_files(net, ALICE_IP), [])


# --- the sharer's side -------------------------------------------------------------------------


class RefusalTests(PeerNetworkCase):
    @inline
    async def test_the_sharer_refuses_names_it_does_not_share_or_that_climb_out(self):
        net = self.net
        share = net.dirs[BOB_IP].share
        outside = os.path.join(net.base_dir, "secret.txt")
        with open(outside, "wb") as f:
            f.write(b"not for sharing")
        net.write_share(BOB_IP, "ok.bin", b"fine")
        os.symlink("ok.bin", os.path.join(share, "link"))       # announced: it stays inside
        os.symlink(outside, os.path.join(share, "escape"))      # never announced: it leads out
        os.mkdir(os.path.join(share, "sub"))
        with open(os.path.join(share, "sub", "inner.bin"), "wb") as f:
            f.write(b"inner")
        await net.start()
        self.assertEqual(sorted(f["name"] for f in self.bob.shared), ["link", "ok.bin"])
        os.unlink(os.path.join(share, "link"))
        os.symlink(outside, os.path.join(share, "link"))        # now it climbs out
        net.write_share(BOB_IP, "late.bin", b"on disk, never announced")
        watch = UploadWatch(self.bob)
        crafted = {
            "climb": {"file": "../secret.txt"},
            "dots": {"file": ".."},
            "separator": {"file": "sub/inner.bin"},
            "directory": {"file": "sub"},
            "escape": {"file": "escape"},
            "retargeted": {"file": "link"},
            "unannounced": {"file": "late.bin"},
            "absolute": {"file": outside},
            "not a name": {"file": 42},
            "other content": {"file": "ok.bin", "sha256": "0" * 64},
            "tiny chunks": {"file": "ok.bin", "chunk_size": 10},
            "bad ranges": {"file": "ok.bin", "chunks": [[0]]},
        }
        for transfer, fields in crafted.items():
            self.bob.serve(self.bob.circuit, dict({"type": "request", "transfer": transfer,
                                                   "chunk_size": CHUNK}, **fields))
        net.pump(until=lambda: not self.bob.uploads)
        # What Bob sent (no bridge carries these made-up transfers: his exit answers no_bridge).
        ends = {m["transfer"]: m for m in watch.ends}
        self.assertEqual(set(ends), set(crafted))
        for transfer, end in ends.items():
            self.assertEqual(end["status"], "error", transfer)
            self.assertIsInstance(end.get("detail"), str)
        self.assertEqual(ends["unannounced"]["detail"], "this peer does not share that name")
        self.assertEqual(ends["retargeted"]["detail"], "the name resolves outside the share directory")
        self.assertEqual(ends["other content"]["detail"], "this peer's copy has another content")
        self.assertEqual(watch.chunks, [])  # not one byte of any of them
        self.assertEqual(len(watch.ends), len(crafted))
        self.assertEqual(net.messages_on(net.tracker_key_of(self.bob), "file_chunk"), [])
        # A served name still works afterwards.
        d = self.alice.download("ok.bin")
        net.pump(until=finished(d))
        self.assertEqual(d.state, DONE, d.error)


# --- announcing --------------------------------------------------------------------------------


class AnnounceTests(PeerNetworkCase):
    @inline
    async def test_tick_announces_changes_every_interval_and_refreshes(self):
        net = self.net
        net.write_share(BOB_IP, "one.bin", b"1")
        await net.start()
        bob = self.bob
        key = net.tracker_key_of(bob)

        def counts():
            return len(net.messages_on(key, "ls")), len(net.messages_on(key, "list"))

        self.assertEqual(counts(), (1, 0))
        net.write_share(BOB_IP, "two.bin", b"22")
        await net.run(bob.tick())
        self.assertEqual(counts(), (2, 0))
        self.assertEqual(sorted(f["name"] for f in net.messages_on(key, "ls")[-1]["files"]), ["one.bin", "two.bin"])
        self.assertEqual(sorted(r["name"] for r in net.tracker.catalogue.listing()), ["one.bin", "two.bin"])
        self.assertEqual(sorted(f["name"] for f in bob.catalogue), ["one.bin", "two.bin"])

        await net.run(bob.tick())              # no change, never refreshed: a list
        self.assertEqual(counts(), (2, 1))
        await net.run(bob.tick())              # no change, just refreshed: nothing
        self.assertEqual(counts(), (2, 1))
        start = net.clock.seconds()
        net.pump(until=lambda: net.clock.seconds() >= start + bob.refresh_interval)
        await net.run(bob.tick())              # refresh_interval later: a list
        self.assertEqual(counts(), (2, 2))
        net.pump(until=lambda: net.clock.seconds() >= start + bob.announce_interval)
        await net.run(bob.tick())              # announce_interval after the last ls: an ls, unchanged
        self.assertEqual(counts(), (3, 2))
        self.assertEqual(net.messages_on(key, "ls")[-1], net.messages_on(key, "ls")[-2])
        await net.run(self.alice.tick())
        self.assertEqual(sorted(f["name"] for f in self.alice.catalogue), ["one.bin", "two.bin"])


# --- restarting --------------------------------------------------------------------------------


class RestartTests(PeerNetworkCase):
    @inline
    async def test_a_restarted_peer_asks_a_node_for_the_directory_not_the_tracker(self):
        net = self.net
        await net.start()
        self.assertEqual(net.tracker_gets("/nodes"), 2)  # each peer's first start
        await net.run(self.alice.stop())
        self.assertTrue(os.path.exists(os.path.join(net.dirs[ALICE_IP].data, "directory.json")))
        seen = len(net.gets)
        alice = net.make_peer(ALICE_IP, "alice")
        await net.start(alice)
        self.assertEqual(alice.circuit_state, CONNECTED)
        self.assertEqual(net.tracker_gets("/nodes"), 2)
        asked = [(sender, address.ip, path) for sender, address, path in net.gets[seen:]]
        self.assertTrue(asked)
        self.assertTrue(all(sender == ALICE_IP and ip in NODE_IPS and path == "/nodes" for sender, ip, path in asked),
                        asked)
        self.assertIsNotNone(alice.directory.current)


# --- chunks and transfer_end out of order ------------------------------------------------------


class OrderTests(PeerNetworkCase):
    @inline
    async def test_chunks_and_transfer_end_that_overtake_the_transfer_reply(self):
        net = self.net
        data = await self.bob_shares_and_start("fast.bin", 6 * CHUNK + 1)
        net.hold_replies_to.add(ALICE_IP)  # the tracker's answer to alice's request waits
        d = self.alice.download("fast.bin")
        net.pump(until=lambda: d.transfers and d.transfers[0].outcome is not None)
        t = d.transfers[0]
        self.assertIsNone(t.transfer)                 # the reply has not arrived yet
        self.assertEqual(len(t.seen), 1)
        self.assertTrue(d.chunks.complete)            # every chunk was taken before it
        self.assertEqual(t.outcome, "ok")             # and the transfer is over
        net.release()
        net.pump(until=finished(d))
        self.assertEqual(d.state, DONE, d.error)
        self.assertEqual(d.attempts, 1)
        self.assertTrue(downloaded(net, "fast.bin") == data, "the file differs from the shared one")

    @inline
    async def test_a_transfer_end_before_the_reply_and_before_any_chunk(self):
        net = self.net
        net.write_share(BOB_IP, "empty.bin", b"")
        await net.start()
        net.hold_replies_to.add(ALICE_IP)
        d = self.alice.download("empty.bin")
        net.pump(until=lambda: self.alice._orphan_ends)
        self.assertEqual([(t.transfer, t.outcome) for t in d.transfers], [(None, None)])
        net.release()
        net.pump(until=finished(d))
        self.assertEqual(d.state, DONE, d.error)
        self.assertEqual(d.attempts, 1)
        self.assertEqual(self.alice._orphan_ends, {})
        self.assertEqual(os.path.getsize(os.path.join(net.downloads_dir(ALICE_IP), "empty.bin")), 0)
        self.assertEqual(d.sha256, sha(b""))

    @inline
    async def test_an_error_transfer_end_before_the_reply_ends_the_attempt(self):
        net = self.net
        path = net.write_share(BOB_IP, "gone.bin", b"x" * 100)
        await net.start()
        os.unlink(path)
        net.hold_replies_to.add(ALICE_IP)
        d = self.alice.download("gone.bin")
        net.pump(until=lambda: self.alice._orphan_ends)
        net.release()
        net.pump(until=lambda: d.attempts >= 2)
        self.assertEqual(d.error, "attempt 1 of 5: the sharer stopped: no such file")

    def test_chunks_nobody_asked_for_are_dropped(self):
        alice = self.alice
        store = alice.store
        d = Download(store, "f.bin", None, CHUNK)
        d.start_request()
        t = d.new_transfer(None)
        alice.downloads["f.bin"] = d

        def chunk(transfer, index, name="f.bin"):
            return {"type": "file_chunk", "transfer": transfer, "file": name, "chunk_idx": index,
                    "chunk_size": CHUNK, "size": 2 * CHUNK, "data": wire.b64encode(bytes([index]) * CHUNK)}

        alice.downloader.on_chunk(chunk("t1", 0))                 # before the reply: taken
        self.assertEqual(d.chunks.have, 1)
        self.assertEqual(t.seen, {"t1"})
        alice.downloader.on_chunk(chunk("t1", 0, name="other.bin"))  # a file nobody asked for
        self.assertNotIn("other.bin", alice.downloads)
        t.transfer = "t2"                               # the reply names another transfer
        alice.downloader.on_chunk(chunk("t1", 1))                 # an earlier transfer's chunk: dropped
        self.assertEqual(d.chunks.have, 1)
        alice.downloader.on_transfer_end({"type": "transfer_end", "transfer": "t1", "status": "ok"})
        self.assertIsNone(t.outcome)                    # nor does its end end this attempt
        alice.downloader.on_transfer_end({"type": "transfer_end", "transfer": "t9", "status": "ok"})
        self.assertIsNone(t.outcome)                    # nobody's transfer: kept aside, no effect
        self.assertIn("t9", alice._orphan_ends)
        alice.downloader.on_chunk(chunk("t2", 1))
        alice.downloader.on_transfer_end({"type": "transfer_end", "transfer": "t2", "status": "ok"})
        self.assertEqual(t.outcome, "ok")
        self.assertTrue(d.chunks.complete)
        net = self.net
        net.clock.advance(121)
        alice.downloader.on_transfer_end({"type": "transfer_end", "transfer": "t10", "status": "ok"})
        self.assertNotIn("t9", alice._orphan_ends)      # old orphans are forgotten
        d.close()


# --- a download's lifecycle ----------------------------------------------------------------------


class DownloadLifecycleTests(unittest.TestCase):
    """Only a Download moves its state, and only by the moves downloads.TRANSITIONS lists."""

    def setUp(self):
        self.store = DownloadStore(self.mktemp())

    def download(self, name="f.bin", sha256=None) -> Download:
        d = Download(self.store, name, sha256, CHUNK)
        self.addCleanup(d.close)
        return d

    def refused(self, d: Download, *moves) -> None:
        """Each move raises IllegalTransition and leaves the state, error and attempts as they were."""
        before = (d.state, d.error, d.attempts)
        for move in moves:
            self.assertRaises(IllegalTransition, move)
            self.assertEqual((d.state, d.error, d.attempts), before, move)

    def finish(self, d: Download, thread=None) -> defer.Deferred:
        return d.finish(thread or (lambda f, *args: defer.maybeDeferred(f, *args)))

    def test_the_states_are_the_words_the_page_shows(self):
        self.assertEqual([s.value for s in DownloadState],
                         ["queued", "requesting", "receiving", "verifying", "done", "failed"])
        d = self.download()
        status = d.status(0)
        self.assertEqual(status["state"], "queued")
        self.assertEqual(wire.loads_object(wire.dumps(status))["state"], "queued")

    def test_a_download_from_request_to_done(self):
        data = os.urandom(CHUNK + 5)
        d = self.download(sha256=sha(data))
        d.start_request()
        self.assertEqual((d.state, d.attempts), (REQUESTING, 1))
        d.expect(len(data), CHUNK, None)
        for index in (0, 1):
            d.write_chunk({"chunk_idx": index, "chunk_size": CHUNK, "size": len(data),
                           "data": wire.b64encode(data[index * CHUNK:(index + 1) * CHUNK])}, 0)
            self.assertEqual(d.state, RECEIVING)
        self.assertTrue(self.successResultOf(self.finish(d)))
        self.assertEqual(d.state, DONE)

    def test_nothing_leaves_done(self):
        d = self.download()
        d.start_request()
        d.expect(0, CHUNK, None)
        self.assertTrue(self.successResultOf(self.finish(d)))
        self.assertEqual(d.state, DONE)
        self.refused(d, lambda: d.fail("late"), d.start_request, d.requeue, d.restart,
                     lambda: self.finish(d))

    def test_a_queued_download_is_neither_requeued_restarted_nor_verified(self):
        d = self.download()
        d.expect(0, CHUNK, None)
        self.refused(d, d.requeue, d.restart, lambda: self.finish(d))
        self.assertEqual(d.state, QUEUED)

    def test_a_failed_download_only_restarts(self):
        d = self.download()
        d.start_request()
        d.fail("nobody shares this file")
        self.assertEqual((d.state, d.error), (FAILED, "nobody shares this file"))
        self.refused(d, d.start_request, d.requeue, lambda: self.finish(d))
        d.restart()
        self.assertEqual((d.state, d.error, d.attempts), (QUEUED, None, 0))
        d.start_request()
        self.refused(d, d.restart)  # only a failed one restarts
        d.fail("again")
        d.restart()
        self.assertEqual((d.state, d.error, d.attempts), (QUEUED, None, 0))

    def test_a_verifying_download_takes_no_request_and_no_chunk(self):
        d = self.download()
        d.start_request()
        d.expect(2 * CHUNK, CHUNK, None)
        d.write_chunk({"chunk_idx": 0, "chunk_size": CHUNK, "size": 2 * CHUNK,
                       "data": wire.b64encode(b"a" * CHUNK)}, 0)
        d.write_chunk({"chunk_idx": 1, "chunk_size": CHUNK, "size": 2 * CHUNK,
                       "data": wire.b64encode(b"b" * CHUNK)}, 0)
        hashing = defer.Deferred()
        self.finish(d, thread=lambda f, *args: hashing)  # the hash never comes back
        self.assertEqual(d.state, VERIFYING)
        self.refused(d, d.start_request, lambda: d.write_chunk(
            {"chunk_idx": 1, "chunk_size": CHUNK, "size": 2 * CHUNK, "data": wire.b64encode(b"c" * CHUNK)}, 0))
        with open(d.part_path, "rb") as f:
            self.assertEqual(f.read()[CHUNK:], b"b" * CHUNK)  # the refused chunk wrote nothing

    def test_a_file_that_does_not_match_goes_back_to_the_queue(self):
        d = self.download(sha256="0" * 64)
        d.start_request()
        d.expect(0, CHUNK, None)
        self.assertFalse(self.successResultOf(self.finish(d)))
        self.assertEqual(d.state, QUEUED)
        self.assertIsNone(d.chunks)

    def test_the_state_is_not_set_from_outside(self):
        d = self.download()
        with self.assertRaises(AttributeError):
            d.state = DONE
        self.assertEqual(d.state, QUEUED)
