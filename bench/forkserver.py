"""Members started by fork from a process that has already imported them: ``scale.py --fork-starts``.

A member's start costs about a CPU second, nearly all of it Python's imports
(Twisted, Klein, treq, cryptography, the package). Under churn the bench
starts a node every 2 s and a peer every 10 s on the same two cores as the
downloads: a third of the cores, which a real network's new members spend
on their own machines. With ``--fork-starts`` the churn's new members are
forked from one process that imported everything once (``serve``, before
any reactor exists), so each pays only its own start: keys, service,
registration. The member is the same ``twistd`` run with the same options,
a new process at a new address with new keys; only the imports are shared.

``ForkServer.start(command, cwd, stderr_path)`` returns a ``ForkedProcess``
with what the bench uses of a ``Popen``: ``pid``, ``poll``, ``wait``,
``kill``, ``send_signal`` (through a pidfd: the member is the server's
child, not ours).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import select
import signal
import subprocess
import sys

from common import die_with_parent

# What a member imports, but Klein: klein._app imports twisted.internet.reactor, which installs
# the default reactor, and a reactor made here would be shared by every child (one epoll
# instance). Each child imports Klein and the roles' apps and services itself (about 40 ms).
PRELOAD = ("twisted.scripts.twistd", "twisted.internet.epollreactor", "twisted.web.server", "twisted.web.client",
           "treq", "werkzeug.routing", "werkzeug.exceptions", "werkzeug.serving", "werkzeug.datastructures")
PACKAGES = ("onion_twisted.protocol", "onion_twisted.net", "onion_twisted.node", "onion_twisted.peer")


class ForkedProcess:
    """A member forked by the server, watched through a pidfd."""

    def __init__(self, pid: int, args: list[str]):
        self.pid, self.args = pid, args
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._fd], [], [], 0)[0]:
            self._ended()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._ended()
        return self.returncode

    def _ended(self) -> None:
        self.returncode = -1  # not our child: its status went to the server, which reaped it
        os.close(self._fd)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, preexec_fn=die_with_parent)
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the fork server did not start: {ready!r}")

    def start(self, command: list[str], cwd, stderr_path) -> ForkedProcess:
        """``command`` as ``LocalNetwork._command`` makes it: python -c TWISTD, then twistd's arguments."""
        if command[1:2] != ["-c"]:
            raise ValueError("the fork server starts twistd commands only (no wrap)")
        argv = ["twistd", *command[3:]]
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "stderr": str(stderr_path)}) + "\n")
        self.proc.stdin.flush()
        return ForkedProcess(int(self.proc.stdout.readline()), command)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _reap(_signum, _frame) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(request: dict) -> None:
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent()
    os.chdir(request["cwd"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
    sys.argv = request["argv"]
    from twisted.scripts.twistd import run
    run()


def _preload() -> None:
    names = list(PRELOAD)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if m.name not in ("app", "service")]
    for name in names:
        importlib.import_module(name)
        if "twisted.internet.reactor" in sys.modules:
            raise SystemExit(f"importing {name} installed a reactor; cannot fork members")


def serve() -> None:
    _preload()
    signal.signal(signal.SIGCHLD, _reap)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _child(request)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
                code = 1
            finally:
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    serve()
