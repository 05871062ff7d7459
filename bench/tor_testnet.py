"""A private Tor network on loopback, for bench/tor_network.py: Debian's tor, test-network settings.

``ensure_tor`` installs Debian's ``tor`` package when it is missing (as
root, with apt-get) or says why it cannot. ``TorNetwork`` lays out, in a
directory of its own, one tor per address 127.A.B.x (every port bound to
it; OR, Dir, control and SOCKS ports P..P+3): ``authorities`` directory
authorities that are relays too (v3 keys by ``tor-gencert``, relay
fingerprints by ``tor --list-fingerprint``), ``relays`` more relays, an
onion service (v3) whose port 80 is a plain Twisted Web server
(``plain_get.py serve``) over a directory of files, and a client with a
SocksPort. ``TestingTorNetwork 1`` and the settings chutney uses make one
machine enough: a consensus every 10 s, flags (Guard, HSDir) voted without
uptime, relays assumed reachable, private addresses allowed. Each tor is a
``common.Proc`` (killed with this process); ``stop()`` ends them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import ALL_PROCS, Proc, pick_addresses
from tor_control import TorControl

BENCH = Path(__file__).resolve().parent


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



# Test-network settings every tor of the network takes (as chutney's common.i):
# flags voted without uptime or bandwidth, relays assumed reachable, loopback allowed.
COMMON = """TestingTorNetwork 1
AssumeReachable 1
PathsNeededToBuildCircuits 0.67
TestingDirAuthVoteExit *
TestingDirAuthVoteHSDir *
TestingDirAuthVoteGuard *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
ShutdownWaitLength 0
SafeLogging 0
Log notice stdout
CookieAuthentication 1
"""
# A consensus every 10 s (the first one 10-20 s after start): 2 s to vote and
# 2 to publish, under half the interval as tor wants when there is no consensus yet.
AUTHORITY = """AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
ContactInfo bench@onion-twisted.invalid
TestingV3AuthInitialVotingInterval 10
TestingV3AuthInitialVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthVotingInterval 10
V3AuthVoteDelay 2
V3AuthDistDelay 2
"""


def ensure_tor() -> str | None:
    """None when ``tor`` and ``tor-gencert`` are here (installed now if need be); else why not."""
    if shutil.which("tor") and shutil.which("tor-gencert"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "tor is not installed, and installing it needs root and apt-get"
    log("installing Debian's tor (apt-get install -y tor) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "tor"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}"
    return None if shutil.which("tor") and shutil.which("tor-gencert") else "apt-get installed no tor binary"


def wait_until(what: str, ready, timeout: float, interval: float = 0.25):
    """Polls ``ready()`` until it gives something true; fails after ``timeout`` s or if a member died."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in ALL_PROCS:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) while waiting for {what}:\n"
                                   + proc.tail())
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(interval)


def pick_network(count: int) -> tuple[list[str], int]:
    """``count`` addresses and a port P such that P..P+3 (OR, Dir, control, SOCKS) are free on all."""
    for _ in range(20):
        ips, port = pick_addresses(range(1, count + 1))
        try:
            for ip in ips:
                for offset in range(1, 4):
                    with socket.socket() as s:
                        s.bind((ip, port + offset))
            return ips, port
        except OSError:
            continue
    raise RuntimeError("no port P with P..P+3 free on the loopback addresses")


class TorNetwork:
    """Authorities, relays, the onion service, its HTTP server and the client; one address each."""

    def __init__(self, root: Path, authorities: int, relays: int, files: Path, options: list[str]):
        self.root, self.files, self.options = root, files, options
        names = [f"auth{i}" for i in range(authorities)] + [f"relay{i}" for i in range(relays)]
        self.relay_names = names
        ips, self.port = pick_network(len(names) + 3)
        self.ip = dict(zip(names + ["service", "client", "http"], ips))
        self.or_port, self.dir_port, self.control_port, self.socks_port = (self.port + i for i in range(4))
        self.procs: dict[str, Proc] = {}
        self.dir_authorities: list[str] = []
        (root / "empty-defaults").write_text("")  # not the system's torrc-defaults

    def datadir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def make_authority(self, name: str) -> None:
        """Its v3 authority keys and certificate, and its DirAuthority line."""
        keys = self.datadir(name) / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        ip = self.ip[name]
        subprocess.run(["tor-gencert", "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
                        "-a", f"{ip}:{self.dir_port}", "-i", str(keys / "authority_identity_key"),
                        "-s", str(keys / "authority_signing_key"), "-c", str(keys / "authority_certificate")],
                       input=b"\n", check=True, capture_output=True, cwd=keys)
        certificate = (keys / "authority_certificate").read_text().splitlines()
        v3ident = next(line.split()[1] for line in certificate if line.startswith("fingerprint "))
        # The relay identity: tor makes the key and prints it; the DirAuthority given
        # here is a stand-in, as TestingTorNetwork refuses the public authorities.
        listed = subprocess.run(["tor", "--list-fingerprint", "--quiet", "--defaults-torrc",
                                 str(self.root / "empty-defaults"), "--ignore-missing-torrc",
                                 "-f", str(self.root / "no-torrc"), "--DataDirectory", str(self.datadir(name)),
                                 "--ORPort", "1", "--DirAuthority", "standin 127.0.0.1:1 " + "F" * 40],
                                capture_output=True, text=True, check=True)
        fingerprint = "".join(listed.stdout.strip().splitlines()[-1].split()[1:])
        self.dir_authorities.append(f"DirAuthority {name} orport={self.or_port} no-v2 v3ident={v3ident} "
                                    f"{ip}:{self.dir_port} {fingerprint}")

    def torrc(self, name: str, extra: str) -> Path:
        ip = self.ip[name]
        text = (COMMON + "\n".join(self.dir_authorities) + "\n"
                + f"DataDirectory {self.datadir(name)}\nNickname {name}\nOutboundBindAddress {ip}\n"
                + f"ControlPort {ip}:{self.control_port}\n" + extra + "".join(o + "\n" for o in self.options))
        path = self.root / f"{name}.torrc"
        path.write_text(text)
        return path

    def start_tor(self, name: str, extra: str) -> None:
        torrc = self.torrc(name, extra)
        self.procs[name] = Proc(name, ["tor", "--defaults-torrc", str(self.root / "empty-defaults"),
                                       "-f", str(torrc)], self.root)

    def start(self) -> None:
        for name in self.relay_names:
            if name.startswith("auth"):
                self.make_authority(name)
        for name in self.relay_names:
            ip = self.ip[name]
            relay = (f"Address {ip}\nORPort {ip}:{self.or_port}\nDirPort {ip}:{self.dir_port}\n"
                     "SocksPort 0\nExitRelay 0\n")
            self.start_tor(name, (AUTHORITY if name.startswith("auth") else "") + relay)
        self.procs["http"] = Proc("http", [sys.executable, str(BENCH / "plain_get.py"), "serve", "--listen",
                                           self.ip["http"], "--port", str(self.port), "--root", str(self.files)],
                                  self.root)
        self.start_tor("service", f"SocksPort 0\nHiddenServiceDir {self.datadir('service') / 'onion'}\n"
                                  f"HiddenServicePort 80 {self.ip['http']}:{self.port}\n")
        self.start_tor("client", f"SocksPort {self.ip['client']}:{self.socks_port}\n")

    def control(self, name: str) -> TorControl:
        cookie = self.root / name / "control_auth_cookie"

        def connect():
            try:
                return TorControl(self.ip[name], self.control_port, cookie)
            except (OSError, RuntimeError):
                return None
        return wait_until(f"{name}'s control port", connect, 30)

    def onion_address(self) -> str:
        hostname = self.root / "service" / "onion" / "hostname"
        return wait_until("the onion service's hostname", lambda: hostname.exists() and hostname.read_text().strip(), 30)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the client, the service, all relays together and the HTTP server."""
        seconds = {name: proc.cpu_seconds() or 0.0 for name, proc in self.procs.items()}
        return {"client": seconds["client"], "service": seconds["service"], "http": seconds["http"],
                "relays": sum(seconds[name] for name in self.relay_names)}

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop(grace=5)
