"""The seed's own deployment, one IP per machine, all on port 5000 (issue 5).

Runs ``tests/netns/run.sh``: a network namespace per member (tracker, six
nodes, alice, bob), each with its own address on a bridge that lives in a
namespace of its own, and the end-to-end check inside them (see
``tests/netns/README.md``). It needs root and a working ``ip netns`` (CI runs
as root); elsewhere the test says why it skipped. Afterwards no namespace of
the run may be left, and the root namespace's interfaces must be as before.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from twisted.internet import threads
from twisted.trial import unittest

SCRIPT = Path(__file__).resolve().parent / "netns" / "run.sh"
SCRIPT_DEADLINE = 180   # seconds for the whole script; it needs about 15
CLEANUP_GRACE = 30      # seconds the script gets to clean up after a SIGTERM


def _ip(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)


def _why_not() -> str | None:
    """None when this machine can run the script, else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to make network namespaces (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "no `ip` command: install iproute2 (apt-get install -y iproute2)"
    probe = f"otprobe{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", probe)
        if made.returncode != 0:
            return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
        ran = subprocess.run(["ip", "netns", "exec", probe, "ip", "link", "set", "lo", "up"],
                             capture_output=True, text=True, timeout=10)
        if ran.returncode != 0:
            return f"`ip netns exec` does not work here: {ran.stderr.strip()}"
        bridge = _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        if bridge.returncode != 0:
            return f"no Linux bridges here: {bridge.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` is not usable: {e}"
    finally:
        _ip("netns", "del", probe)
    return None


def _namespaces(prefix: str) -> list[str]:
    listed = _ip("netns", "list").stdout.split("\n")
    return [line.split()[0] for line in listed if line.strip() and line.split()[0].startswith(prefix)]


def _root_interfaces() -> set[str]:
    return {line.split(":", 2)[1].strip().split("@")[0] for line in _ip("-o", "link").stdout.splitlines()
            if line.strip()}


def _remove_namespaces(prefix: str) -> list[str]:
    """Last resort if the script could not clean up: kill what runs in them, delete them."""
    left = _namespaces(prefix)
    for ns in left:
        for pid in _ip("netns", "pids", ns).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
    for ns in left:
        _ip("netns", "del", ns)
    return left


def _run_script(prefix: str, run_dir: Path) -> tuple[int, str]:
    """Run the script to its end (SIGTERM past the deadline: it then cleans up); (status, output)."""
    argv = ["bash", str(SCRIPT), "--python", sys.executable, "--run-dir", str(run_dir), "--prefix", prefix]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=SCRIPT_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=CLEANUP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        out += f"\n(the script did not finish within {SCRIPT_DEADLINE} s)"
    return proc.returncode, out


class NetworkNamespaceTests(unittest.TestCase):
    timeout = SCRIPT_DEADLINE + CLEANUP_GRACE + 30

    def setUp(self):
        why = _why_not()
        if why is not None:
            raise unittest.SkipTest(f"tests/netns/run.sh skipped: {why}")

    def test_one_namespace_per_member(self):
        prefix = f"ot{secrets.token_hex(3)}-"
        run_dir = Path(self.mktemp()).resolve()
        interfaces = _root_interfaces()
        self.addCleanup(_remove_namespaces, prefix)
        self.addCleanup(lambda: [shutil.rmtree(run_dir / peer / sub, ignore_errors=True)
                                 for peer in ("alice", "bob") for sub in ("share", "downloads")])

        d = threads.deferToThread(_run_script, prefix, run_dir)

        def check(result):
            status, out = result
            sys.stderr.write("\n" + "\n".join(line for line in out.splitlines()
                                              if not line.startswith("---"))[-1500:] + "\n")
            left = _remove_namespaces(prefix)
            self.assertEqual(left, [], f"the script left namespaces behind: {left}\n{out[-3000:]}")
            self.assertEqual(_root_interfaces(), interfaces, "the root namespace's interfaces changed")
            self.assertEqual(status, 0, f"tests/netns/run.sh exited {status}:\n{out[-6000:]}")
            lines = out.strip().splitlines()
            self.assertEqual(lines[-1:], ["PASS"], f"no PASS line last:\n{out[-6000:]}")
            self.assertIn("matches", out)
        return d.addCallback(check)
