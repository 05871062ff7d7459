"""The README's network by hand, run line by line as the README gives it.

The lines come from README.md itself (the ``sh`` blocks after the
``<!-- manual-network start`` and ``<!-- manual-network get`` markers), so
the README cannot drift from what is tested. Only two things change on the
way: the README's ``127.0.0.`` becomes this test's random ``127.R1.R2.``
prefix, and the lines run in a fresh folder that holds what a checkout
does (``conf/`` and ``.venv``, links to this checkout's and to the
virtualenv running the tests). Each line ending in ``&`` is one member, a
process of its own; ``NAME=$(COMMAND)`` sets NAME to what COMMAND prints;
any other line runs in ``bash``. Between the two blocks the test waits as
the README tells its reader to: until the tracker's page lists the file.

Then alice has bob's file, byte for byte, and every member pinned the key
``tracker-key`` printed (none fell back to trust on first use).

Nothing waits by sleeping: every wait polls with a deadline on the reactor clock.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from twisted.trial import unittest

from onion_twisted.protocol import wire
from tests.support.processes import PORT, REPO, Member, ProcessesMixin, poll_until, tail_files

README = REPO / "README.md"
README_PREFIX = "127.0.0."
ADMIN_HOST = 200
VENV = Path(sys.prefix)


def readme_block(marker: str) -> list[str]:
    """The command lines of the ``sh`` block that follows ``marker`` in the README."""
    text = README.read_text("utf-8")
    at = text.find(marker)
    if at < 0:
        raise AssertionError(f"README.md has no {marker!r}")
    block = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    if block is None:
        raise AssertionError(f"README.md has no sh block after {marker!r}")
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


START = readme_block("<!-- manual-network start")
GET = readme_block("<!-- manual-network get")
HOSTS = tuple(sorted({int(h) for h in re.findall(re.escape(README_PREFIX) + r"(\d+)", "\n".join(START + GET))}))


def option(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


class ReadmeNetworkTests(ProcessesMixin, unittest.TestCase):
    timeout = 180
    hosts, admin_host = (*HOSTS, ADMIN_HOST), ADMIN_HOST
    tls = True  # conf/*.toml's default, which the README's members run with

    async def start_members(self):
        if not (VENV / "bin" / "twistd").exists():
            raise unittest.SkipTest(f"no twistd in {VENV}/bin: the README's lines run the project's .venv")
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        (self.root / "conf").symlink_to(REPO / "conf")
        (self.root / ".venv").symlink_to(VENV)
        self.variables: dict[str, str] = {}
        self.commands = 0

    # --- running the README's lines ----------------------------------------------------------

    def here(self, line: str) -> str:
        """The line with this test's addresses instead of the README's."""
        prefix = self.ip(0).rsplit(".", 1)[0]
        return line.replace(README_PREFIX, prefix + ".")

    def argv(self, command: str) -> list[str]:
        """``command`` as argv, with ``$NAME`` and ``${NAME}`` of earlier lines expanded."""
        def expand(word: str) -> str:
            return re.sub(r"\$\{?(\w+)\}?", lambda m: self.variables[m.group(1)], word)
        return [expand(word) for word in shlex.split(command)]

    async def command(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str]:
        """Run ``argv`` in the folder to its end; its exit status and output (stdout and stderr)."""
        self.commands += 1
        stdio = self.root / "stdio" / f"command{self.commands}"
        stdio.mkdir(parents=True)
        member = self._started(Member(f"command {argv[:3]}", wire.Address(self.ip(ADMIN_HOST), PORT), stdio, argv,
                                      stdio / "none.log", cwd=self.root))
        code = await member.wait_exit(timeout)
        return code, member.stdio_path.read_text("utf-8", errors="replace")

    async def run_line(self, line: str) -> tuple[int, str] | Member:
        """One README line: a member (``... &``), an assignment, or a bash command."""
        line = self.here(line)
        if line.endswith("&"):
            argv = self.argv(line[:-1])
            listen = option(argv, "--listen")
            self.assertIsNotNone(listen, f"a member without --listen: {line}")
            log = option(argv, "--logfile")
            stdio = self.root / "stdio" / listen
            stdio.mkdir(parents=True)
            plugin = next((a for a in argv if a in ("oniontracker", "onionnode", "onionpeer")), argv[0])
            return self._started(Member(f"{plugin} {listen}", wire.Address(listen, PORT), stdio, argv,
                                        self.root / log if log else stdio / "none.log", cwd=self.root))
        assignment = re.fullmatch(r"(\w+)=\$\((.*)\)", line)
        if assignment:
            code, output = await self.command(self.argv(assignment.group(2)))
            self.assertEqual(code, 0, f"{line}\n{output}")
            self.variables[assignment.group(1)] = output.strip()
            return code, output
        code, output = await self.command(["bash", "-c", line])
        self.assertEqual(code, 0, f"{line}\n{output}")
        return code, output

    def logs(self) -> str:
        return tail_files({p.name: p for p in sorted((self.root / "run").glob("*.log"))}, 15) + "\n" + \
            tail_files({str(p.relative_to(self.root)): p for p in sorted((self.root / "stdio").glob("*/stdio.log"))}, 5)

    # --- the test ---------------------------------------------------------------------------

    async def test_the_readmes_network_moves_a_file_from_bob_to_alice(self):
        members = [m for m in [await self.run_line(line) for line in START] if isinstance(m, Member)]
        self.assertEqual(len(members), 6, "the README starts a tracker, three nodes and two peers")
        tracker = next(m for m in members if "oniontracker" in m.proc.args)
        key = self.variables.get("KEY")
        self.assertTrue(key, "the README's first line sets KEY")

        try:
            identity = await self.wait_identity(tracker, self.admin)
            self.assertEqual(identity["public_key"], key, "tracker-key printed the key the tracker uses")

            async def listed():
                for m in members:
                    if not m.running:
                        raise self.failureException(f"{m.name} exited with {m.proc.returncode}")
                status, _, body = await self.admin.get(tracker.address, "/")
                return status == 200 and b"hello.txt" in body

            # What the README tells its reader to wait for.
            await poll_until(listed, timeout=60, what="the tracker's page to list hello.txt", interval=0.2)

            [get] = GET
            code, output = await self.command(self.argv(self.here(get)), timeout=90)
        except AssertionError as e:
            raise self.failureException(f"{e}\n{self.logs()}") from None
        self.assertEqual(code, 0, f"{get}\n{output}\n{self.logs()}")
        alice = option(self.argv(self.here(get)), "--peer")  # her page: plain HTTP at ui_listen
        self.assertIn(f"http://{alice}/files/hello.txt", output)
        shared = (self.root / "run" / "bob" / "share" / "hello.txt").read_bytes()
        self.assertEqual((self.root / "run" / "alice" / "downloads" / "hello.txt").read_bytes(), shared)
        for log in (self.root / "run").glob("*.log"):
            self.assertNotIn("trusting the key the tracker showed", log.read_text("utf-8"), log.name)
