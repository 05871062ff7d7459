"""A whole local network: tracker, six nodes and two peers (alice and bob),
each its own ``twistd`` process on its own loopback address at one port.

``python -m onion_twisted.ops.localnet`` (what ``./scripts/demo`` runs) starts
it, waits until the directory lists every node and both peers are
connected, prints the peers' pages and runs until Ctrl-C, which stops every
process it started. Each member keeps its key, state and log under
``run/NAME/``, so a second run reuses keys, hashes and partial downloads.
The end-to-end tests start the network through the same class.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TWISTD = "from twisted.scripts.twistd import run; run()"
SAMPLES = {
    "alice": {"alice-notes.txt": "Notes from alice.\n" * 40, "recipes.txt": "Bread: flour, water, salt, time.\n" * 30},
    "bob": {"bob-readme.txt": "Bob shares these files.\n" * 30, "poem.txt": "The onion has layers,\nso do we.\n" * 20},
}


def _tls_context() -> ssl.SSLContext:
    # Our own members' TLS 1.3: their certificates are self-signed, so not checked here
    # (what is asked is public: identities, directories, the peers' state).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}),  # our members: never via a proxy
                                      urllib.request.HTTPSHandler(context=_tls_context()))
PAGE_PORT = 8080  # a peer's page with tls on (ui_listen's default port)


def _get(url: str, timeout: float = 2.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.read()


def _get_json(url: str, timeout: float = 2.0):
    return json.loads(_get(url, timeout))


class Member:
    def __init__(self, name: str, role: str, ip: str, directory: Path, options: list[str]):
        self.name, self.role, self.ip, self.directory, self.options = name, role, ip, directory, options
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"


class LocalNetwork:
    def __init__(self, run_dir="run", *, base="127.0.0.10", port=5000, nodes=6, peers=("alice", "bob"),
                 big_mib=50, key_bits=2048, python=sys.executable, extra: dict | None = None, wrap=None, conf_dir=None,
                 tls: bool = True):
        """``wrap(name)``, if given, is a command prefix for that member's process, e.g.
        ``lambda name: ["ip", "netns", "exec", name]`` to start each in its own network namespace.

        With ``tls`` (the default, as in conf/) the members speak TLS 1.3 at the
        network port and each peer's page is plain HTTP at its IP, port 8080."""
        self.run_dir = Path(run_dir).resolve()
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.wrap = wrap
        # The example files in conf/ (every key at its default), with this
        # network's addresses and directories given as options on top.
        self.conf_dir = Path(conf_dir).resolve() if conf_dir else None
        self.port = port
        self.python = python
        self.big_mib = big_mib
        self.key_bits = key_bits
        self.extra = extra or {}
        first = ipaddress.IPv4Address(base)
        self.tracker_ip = str(first)
        self.node_ips = [str(first + 1 + i) for i in range(nodes)]
        self.peer_ips = {name: str(first + 11 + i) for i, name in enumerate(peers)}
        self.members: list[Member] = []

    def address(self, ip: str) -> str:
        return f"{ip}:{self.port}"

    def url(self, ip: str, path: str = "/") -> str:
        """A member's URL at the network port (https with tls)."""
        return f"{self.scheme}://{self.address(ip)}{path}"

    def page_address(self, peer: str) -> str:
        """HOST:PORT of a peer's page and API: its ui_listen with tls, else the network port."""
        ip = self.peer_ips[peer]
        return f"{ip}:{PAGE_PORT}" if self.tls else self.address(ip)

    def page(self, peer: str) -> str:
        return f"http://{self.page_address(peer)}/"

    # --- files ------------------------------------------------------------------------

    def make_samples(self) -> None:
        """A few small text files each, and bob's big binary (made once, not committed)."""
        for peer in self.peer_ips:
            share = self.run_dir / peer / "share"
            share.mkdir(parents=True, exist_ok=True)
            for name, text in SAMPLES.get(peer, {}).items():
                if not (share / name).exists():
                    (share / name).write_text(text)
        if "bob" in self.peer_ips and self.big_mib:
            big = self.run_dir / "bob" / "share" / f"big-{self.big_mib}MiB.bin"
            if not big.exists() or big.stat().st_size != self.big_mib * 1024 * 1024:
                # Not net.files.atomic_write: a sample of many MiB, written as it is made, not state.
                tmp = big.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    for _ in range(self.big_mib):
                        f.write(os.urandom(1024 * 1024))
                os.replace(tmp, big)

    # --- processes --------------------------------------------------------------------

    def _spawn(self, name: str, role: str, ip: str, options: list[str]) -> Member:
        directory = self.run_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        member = Member(name, role, ip, directory, options)
        member.process = self._start(member, self._command(member))
        self.members.append(member)
        return member

    def _start(self, member: Member, command: list[str]):
        """The member's process, running ``command`` in its directory (a subclass may start it otherwise)."""
        return subprocess.Popen(command, cwd=member.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=open(member.directory / "stderr.log", "ab"), start_new_session=True)

    def _command(self, member: Member) -> list[str]:
        role, ip, options = member.role, member.ip, member.options
        config = self.conf_dir / f"{role}.toml" if self.conf_dir else None
        config_option = ["--config", str(config)] if config and config.is_file() else []
        command = [self.python, "-c", TWISTD, "-n", "--pidfile=", f"--logfile={member.log_path}",
                   f"onion{role}", *config_option, "--listen", ip, "--port", str(self.port),
                   *([] if self.tls else ["--no-tls"]), *options]
        for key, value in self.extra.get(role, {}).items():
            option = key.replace("_", "-")
            # A switch: True turns it on, False off (--no-NAME, for those on by default).
            command += [f"--{option}"] if value is True else [f"--no-{option}"] if value is False \
                else [f"--{option}", str(value)]
        if self.wrap is not None:
            command = [*self.wrap(member.name), *command]
        return command

    def start(self, timeout: float = 60.0) -> None:
        self.make_samples()
        deadline = time.monotonic() + timeout
        tracker = self._spawn("tracker", "tracker", self.tracker_ip, ["--data-dir", "data", "--heartbeat", "5"])
        identity = self._wait(lambda: _get_json(self.url(self.tracker_ip, "/identity")), deadline,
                              "the tracker did not start", tracker)
        key = identity["public_key"]
        common = ["--tracker", self.address(self.tracker_ip), "--tracker-key", key]
        for i, ip in enumerate(self.node_ips):
            self._spawn(f"node{i + 1}", "node", ip, common + ["--data-dir", "data", "--key-bits", str(self.key_bits),
                                                             "--register-interval", "5"])

        def all_nodes_listed():
            listed = {n["address"] for n in _get_json(self.url(self.tracker_ip, "/nodes"))["nodes"]}
            if not {self.address(ip) for ip in self.node_ips} <= listed:
                raise RuntimeError("not yet")
            for ip in self.node_ips:  # each node's mirror too: peers ask them
                mirror = {n["address"] for n in _get_json(self.url(ip, "/nodes"))["nodes"]}
                if len(mirror) < len(self.node_ips):
                    raise RuntimeError("not yet")
            return True

        self._wait(all_nodes_listed, deadline, "the directory did not list every node")
        for name, ip in self.peer_ips.items():
            self._spawn(name, "peer", ip, common + ["--name", name, "--data-dir", "data", "--share", "share",
                                                    "--downloads", "downloads", "--rescan-interval", "1",
                                                    "--refresh-interval", "5"])
        for name in self.peer_ips:
            member = next(m for m in self.members if m.name == name)

            def connected(name=name):
                status = _get_json(f"{self.page(name)}api/status")
                if status["circuit"]["state"] != "connected":
                    raise RuntimeError("not yet")
                return status
            self._wait(connected, deadline, f"{name} did not connect", member)

    def _wait(self, check, deadline: float, what: str, member: Member | None = None):
        last = None
        while time.monotonic() < deadline:
            if member is not None and member.process.poll() is not None:
                raise RuntimeError(f"{what}: {member.name} exited; see {member.log_path}")
            try:
                return check()
            except (OSError, ValueError, KeyError, RuntimeError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"{what} in time ({last})")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process, then SIGKILL what is left; nothing stays running."""
        for member in reversed(self.members):
            if member.process and member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.process is None:
                continue
            try:
                member.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
        self.members = []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onion_twisted.ops.localnet",
                                     description="Run a whole local onion_twisted network until Ctrl-C.")
    parser.add_argument("--run-dir", default="run", help="where members keep keys, state and logs (default: run)")
    parser.add_argument("--base", default="127.0.0.10", help="tracker address; nodes and peers follow (default: 127.0.0.10)")
    parser.add_argument("--port", type=int, default=5000, help="the network's port (default: 5000)")
    parser.add_argument("--big-mib", type=int, default=50, help="size of bob's sample binary in MiB (default: 50)")
    parser.add_argument("--key-bits", type=int, default=2048, help="RSA key size of new nodes (default: 2048)")
    parser.add_argument("--conf-dir", default="conf", help="example configuration files (default: conf)")
    parser.add_argument("--no-tls", action="store_true", help="plain HTTP between members (default: TLS 1.3)")
    args = parser.parse_args(argv)
    net = LocalNetwork(args.run_dir, base=args.base, port=args.port, big_mib=args.big_mib, key_bits=args.key_bits,
                       conf_dir=args.conf_dir if os.path.isdir(args.conf_dir) else None, tls=not args.no_tls)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        started = time.monotonic()
        print(f"starting tracker, {len(net.node_ips)} nodes and {len(net.peer_ips)} peers under {net.run_dir} …",
              flush=True)
        net.start()
        print(f"network up in {time.monotonic() - started:.1f} s", flush=True)
        print(f"  tracker  {net.url(net.tracker_ip)}" + ("  (TLS, self-signed)" if net.tls else ""))
        for name in net.peer_ips:
            print(f"  {name:<8} {net.page(name)}")
        print(f"logs: {net.run_dir}/NAME/NAME.log   stop: Ctrl-C", flush=True)
        while all(m.process.poll() is None for m in net.members):
            time.sleep(0.5)
        dead = [m.name for m in net.members if m.process.poll() is not None]
        print(f"stopped: {', '.join(dead)} exited (see its log)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping …", flush=True)
        return 0
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        net.stop()


if __name__ == "__main__":
    sys.exit(main())
