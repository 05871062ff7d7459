"""How members start, as real ``twistd`` processes (issue 12).

* A configuration a member cannot start with ends ``twistd`` at once: exit
  status 1, one line on stderr naming the problem, no traceback and no usage
  text above it. The shipped ``conf/node.toml`` alone is such a
  configuration: its tracker (127.0.0.1:5000) is its own address.
* A node started before its tracker joins within seconds of the tracker's
  start, not a whole ``register_interval`` later; and the directory it
  mirrors catches up within seconds with nodes that join after it.

Every test gets its own ``127.R1.R2.x`` addresses. Nothing waits by
sleeping: every wait polls with a deadline on the reactor clock.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.protocol import wire
from tests.support.processes import PORT, REPO, TWISTD, Member, ProcessesMixin, poll_until

TRACKER_HOST, NODE_HOSTS, ADMIN_HOST = 1, (11, 12), 200
EXIT_DEADLINE = 30  # seconds for a refused twistd to exit (it imports Twisted and the package first)
JOIN_DEADLINE = 10  # well under the default register_interval (30 s)


class RefusedConfigurationTests(ProcessesMixin, unittest.TestCase):
    timeout = 120
    hosts, admin_host = (TRACKER_HOST, *NODE_HOSTS, ADMIN_HOST), ADMIN_HOST

    async def twistd(self, *args: str) -> tuple[int, str, str]:
        """``twistd -n --pidfile= ARGS`` run in the checkout to its exit: (status, stdout, stderr)."""
        base = Path(self.mktemp()).resolve()
        base.mkdir(parents=True)
        err = base / "stderr"
        # exec: twistd takes bash's place, so the harness's signals (and its kill when the
        # test process dies) reach twistd itself, not a shell that would leave it running.
        argv = ["bash", "-c", 'exec "$@" 2>"$0"', str(err), *TWISTD, "-n", "--pidfile=", *args]
        member = self._started(Member(f"twistd {args[0]}", wire.Address(self.ip(TRACKER_HOST), PORT), base, argv,
                                      base / "none.log", cwd=REPO))
        code = await member.wait_exit(EXIT_DEADLINE)
        return code, member.stdio_path.read_text("utf-8"), err.read_text("utf-8")

    def assertOneLine(self, code: int, out: str, err: str, *expected: str) -> None:
        self.assertEqual(code, 1, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertEqual(out, "", "no usage text, no log")
        self.assertNotIn("Traceback", err)
        lines = err.splitlines()
        self.assertEqual(len(lines), 1, err)
        for text in expected:
            self.assertIn(text, lines[0])

    async def test_the_shipped_node_conf_alone_is_refused_in_one_line(self):
        # The README's first command before this issue: a node whose tracker is itself.
        code, out, err = await self.twistd("onionnode", "--config", "conf/node.toml",
                                           "--data-dir", str(Path(self.mktemp()).resolve()))
        self.assertOneLine(code, out, err, "onionnode: ", "tracker 127.0.0.1:5000 is this node's own address",
                           "--tracker")

    async def test_a_peer_whose_tracker_is_itself_is_refused_in_one_line(self):
        ip = self.ip(NODE_HOSTS[0])
        base = Path(self.mktemp()).resolve()
        code, out, err = await self.twistd("onionpeer", "--config", "conf/peer.toml", "--listen", ip,
                                           "--tracker", f"{ip}:{PORT}", "--data-dir", str(base / "state"),
                                           "--share", str(base / "share"), "--downloads", str(base / "dl"))
        self.assertOneLine(code, out, err, "onionpeer: ", f"tracker {ip}:{PORT} is this peer's own address")
        self.assertFalse(base.exists(), "a refused peer makes none of its directories")

    async def test_a_bad_value_is_refused_in_one_line(self):
        code, out, err = await self.twistd("onionnode", "--listen", self.ip(NODE_HOSTS[0]),
                                           "--tracker", self.ip(TRACKER_HOST), "--max-body", "3")
        self.assertOneLine(code, out, err, "onionnode: max_body must be at least 1024")

    async def test_an_unreadable_config_file_is_refused_in_one_line(self):
        code, out, err = await self.twistd("oniontracker", "--config", "conf/no-such.toml")
        self.assertOneLine(code, out, err, "oniontracker: cannot read conf/no-such.toml")

    async def test_an_unknown_option_ends_the_usage_text(self):
        code, out, err = await self.twistd("onionnode", "--colour", "blue")
        self.assertNotEqual(code, 0)
        self.assertNotIn("Traceback", out + err)
        self.assertIn("--max-body", out, "twistd's usage text, listing the node's options")
        self.assertIn("option --colour not recognized", (out + err).strip().splitlines()[-1])


class NodeJoiningTests(ProcessesMixin, unittest.TestCase):
    timeout = 120
    hosts, admin_host = (TRACKER_HOST, *NODE_HOSTS, ADMIN_HOST), ADMIN_HOST

    def tracker_key_for(self, base: Path) -> str:
        """The key of the tracker about to run in ``base`` (state in ``base/state``), made now."""
        result = subprocess.run([sys.executable, "-m", "onion_twisted", "tracker-key", str(base / "state")],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    async def listed_by(self, member: Member, nodes: list[Member]) -> bool:
        directory = await self.directory(member)
        return {n.address for n in nodes} <= set(directory.nodes)

    async def test_a_node_started_before_its_tracker_joins_within_seconds(self):
        base = Path(self.mktemp()).resolve()
        self.tracker_key = self.tracker_key_for(base / "tracker")
        node = self.start_node(self.ip(NODE_HOSTS[0]), PORT, wire.Address(self.ip(TRACKER_HOST), PORT),
                               self.tracker_key, base / "node0", key_bits=1024)
        await self.wait_identity(node, self.admin)
        # Its first registration was refused (nothing listens yet); the default period is 30 s.
        await poll_until(lambda: defer.succeed("registration at the tracker failed" in node.log_text()),
                         timeout=JOIN_DEADLINE, what="the node's first registration to fail")
        self.tracker = self.start_tracker(self.ip(TRACKER_HOST), PORT, base / "tracker")
        await self.wait_identity(self.tracker, self.admin)
        await poll_until(lambda: self.listed_by(self.tracker, [node]), timeout=JOIN_DEADLINE,
                         what="the tracker to list the node")

    async def test_a_nodes_mirror_catches_up_with_nodes_that_join_after_it(self):
        base = Path(self.mktemp()).resolve()
        self.tracker = self.start_tracker(self.ip(TRACKER_HOST), PORT, base / "tracker")
        self.tracker_key = (await self.wait_identity(self.tracker, self.admin))["public_key"]
        first = self.start_node(self.ip(NODE_HOSTS[0]), PORT, self.tracker.address, self.tracker_key,
                                base / "node0", key_bits=1024)
        await poll_until(lambda: self.listed_by(first, [first]), timeout=JOIN_DEADLINE,
                         what="the first node's mirror to list itself")
        second = self.start_node(self.ip(NODE_HOSTS[1]), PORT, self.tracker.address, self.tracker_key,
                                 base / "node1", key_bits=1024)
        await poll_until(lambda: self.listed_by(self.tracker, [first, second]), timeout=JOIN_DEADLINE,
                         what="the tracker to list both nodes")
        # Without its start-up fetches the first node would mirror the old list for 30 s.
        await poll_until(lambda: self.listed_by(first, [first, second]), timeout=JOIN_DEADLINE,
                         what="the first node's mirror to list the second")
