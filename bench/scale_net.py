"""The network of ``bench/scale.py``: ``LocalNetwork`` at size, started in batches, with churn.

``ScaleNetwork`` is ``onion_twisted.ops.localnet.LocalNetwork`` (the same
``twistd`` command lines, the same options: tracker heartbeat 5 s, nodes
registering every 5 s, peers rescanning every second and refreshing their
catalogue every 5 s) with what the demo's network does not need:

* addresses for any number of members, one 127.A.B.x each, from one random
  127.A.B prefix on (the next third octet when B's 250 are used), and a
  fresh address for every node started later (the tracker lists one node
  per IP: a replacement must not reuse its victim's);
* ``start`` in batches of ``batch`` processes, each batch polled with a
  deadline until its members answer (nodes: ``/identity``; peers: a
  connected circuit) before the next is spawned: 90 Python processes
  started at once on two cores would all time out together;
* churn: ``kill_node`` (SIGKILL), ``add_node`` (a new node, new address),
  ``restart_peer`` (SIGKILL, then the same peer again: same address,
  directories, key and share), each remembering the CPU seconds and peak
  memory of the process it ended, read just before the signal;
* ``directory_views``: the node addresses the tracker lists and those each
  live node's mirror lists (``GET /nodes``): what ``converged`` compares
  with the nodes actually alive.

Nothing waits by sleeping: readiness is polled with a deadline
(``LocalNetwork._wait``).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import statistics
import time
from pathlib import Path

from common import cpu_seconds, vm
from forkserver import ForkServer
from onion_twisted.ops.localnet import LocalNetwork, Member, _get_json

FIRST_HOST = 10  # .1 is the tracker, .2 the circuit client; members from .10 on
HOSTS_PER_OCTET = 240


def _free(ip: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


def pss(pid: int) -> int:
    """Proportional set size in bytes (/proc/PID/smaps_rollup): RSS with shared pages divided
    among the processes sharing them, i.e. what one more such process costs; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ScaleNetwork(LocalNetwork):
    def __init__(self, run_dir: Path, *, nodes: int, peers: int, key_bits: int, batch: int = 10,
                 rng: random.Random | None = None, fork_starts: bool = False, **kwargs):
        self.rng = rng or random.Random()
        # --fork-starts: once the network is up (``start``), its new members are forked from a
        # process that imported them once (bench/forkserver.py); the first ones start as always.
        self.fork_starts = fork_starts
        self.fork_server: ForkServer | None = None
        a, b = self.rng.randint(100, 250), self.rng.randint(1, 200)
        self.prefix = ipaddress.IPv4Address(f"127.{a}.{b}.0")
        names = tuple(f"peer{i + 1:02d}" for i in range(peers))
        super().__init__(run_dir, base=str(self.prefix + 1), nodes=0, peers=names, big_mib=0,
                         key_bits=key_bits, **kwargs)
        self.batch = batch
        self.client_ip = str(self.prefix + 2)
        self._next = 0
        self.peer_ips = {name: self.next_ip() for name in names}
        self.node_ips = [self.next_ip() for _ in range(nodes)]
        self.node_count = 0          # nodes started so far (names node01, node02, ...)
        self.ended: dict[int, dict] = {}  # pid -> {"cpu_s", "hwm", "rss"} read just before its SIGKILL
        self.start_cpu: dict[str, list[float]] = {"node": [], "peer": []}
        self.tracker_key = ""

    def next_ip(self) -> str:
        """The next free 127.A.B.x of this network (never one given before)."""
        while True:
            k = self._next
            self._next += 1
            ip = str(self.prefix + 256 * (k // HOSTS_PER_OCTET) + FIRST_HOST + k % HOSTS_PER_OCTET)
            if _free(ip, self.port):
                return ip

    # --- members ----------------------------------------------------------------------

    def role_members(self, role: str, alive: bool = True) -> list[Member]:
        return [m for m in self.members if m.role == role and (not alive or m.process.poll() is None)]

    def member(self, name: str) -> Member:
        """The latest process of ``name`` (a restarted peer has several)."""
        return [m for m in self.members if m.name == name][-1]

    def _tracker_options(self) -> list[str]:
        return ["--tracker", self.address(self.tracker_ip), "--tracker-key", self.tracker_key]

    def spawn_node(self, ip: str) -> Member:
        self.node_count += 1
        return self._spawn(f"node{self.node_count:02d}", "node", ip,
                           [*self._tracker_options(), "--data-dir", "data", "--key-bits", str(self.key_bits),
                            "--register-interval", "5"])

    def spawn_peer(self, name: str) -> Member:
        return self._spawn(name, "peer", self.peer_ips[name],
                           [*self._tracker_options(), "--name", name, "--data-dir", "data", "--share", "share",
                            "--downloads", "downloads", "--rescan-interval", "1", "--refresh-interval", "5"])

    def answers_identity(self, member: Member):
        return _get_json(self.url(member.ip, "/identity"))

    def connected(self, member: Member) -> dict:
        status = _get_json(f"{self.page(member.name)}api/status")
        if status["circuit"]["state"] != "connected":
            raise RuntimeError("not yet")
        return status

    def tracker_lists(self) -> set[str]:
        return {n["address"] for n in _get_json(self.url(self.tracker_ip, "/nodes"))["nodes"]}

    def start(self, timeout: float = 600.0) -> dict:
        """Tracker, nodes, peers, ``batch`` at a time; seconds each part took."""
        self.make_samples()
        began = time.monotonic()
        deadline = began + timeout
        tracker = self._spawn("tracker", "tracker", self.tracker_ip, ["--data-dir", "data", "--heartbeat", "5"])
        identity = self._wait(lambda: self.answers_identity(tracker), deadline, "the tracker did not start", tracker)
        self.tracker_key = identity["public_key"]
        for first in range(0, len(self.node_ips), self.batch):
            spawned = [self.spawn_node(ip) for ip in self.node_ips[first:first + self.batch]]
            for node in spawned:
                self._wait(lambda node=node: self.answers_identity(node), deadline, f"{node.name} did not start", node)
                self.start_cpu["node"].append(cpu_seconds(node.process.pid))
        every = {self.address(ip) for ip in self.node_ips}

        def all_listed():
            if not every <= self.tracker_lists():
                raise RuntimeError("not yet")
            for ip in self.node_ips:  # each node's mirror too: peers fetch their directory there
                if not every <= {n["address"] for n in _get_json(self.url(ip, "/nodes"))["nodes"]}:
                    raise RuntimeError("not yet")
            return True
        self._wait(all_listed, deadline, "the directory did not list every node")
        nodes_up = time.monotonic()
        names = list(self.peer_ips)
        for first in range(0, len(names), self.batch):
            spawned = [self.spawn_peer(name) for name in names[first:first + self.batch]]
            for peer in spawned:
                self._wait(lambda peer=peer: self.connected(peer), deadline, f"{peer.name} did not connect", peer)
                self.start_cpu["peer"].append(cpu_seconds(peer.process.pid))
        figures = {"nodes_s": nodes_up - began, "peers_s": time.monotonic() - nodes_up,
                   "total_s": time.monotonic() - began, "batch": self.batch,
                   # CPU seconds each member had used when first seen up (a node answering /identity,
                   # a peer connected), ``batch`` starting at once: what one member's start costs.
                   "cpu_to_start_s": {role: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)}
                                      for role, v in self.start_cpu.items() if v}}
        if self.fork_starts:
            self.fork_server = ForkServer()
        return figures

    # --- churn ------------------------------------------------------------------------

    def _start(self, member: Member, command: list[str]):
        if self.fork_server is not None:
            return self.fork_server.start(command, member.directory, member.directory / "stderr.log")
        return super()._start(member, command)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self.fork_server is not None:
            self.fork_server.stop()

    def _end(self, member: Member) -> None:
        """SIGKILL ``member``, keeping its CPU seconds and peak memory read just before."""
        pid = member.process.pid
        self.ended[pid] = {"cpu_s": cpu_seconds(pid), "hwm": vm(pid, "VmHWM"), "rss": vm(pid, "VmRSS")}
        member.process.kill()
        member.process.wait(10)

    def kill_node(self, exclude=()) -> Member:
        victim = self.rng.choice([m for m in self.role_members("node") if m.name not in exclude])
        self._end(victim)
        return victim

    def add_node(self) -> Member:
        """A new node at a new address; not waited for (it registers on its own, and
        ``converged`` checks later that it was listed)."""
        ip = self.next_ip()
        self.node_ips.append(ip)
        return self.spawn_node(ip)

    def restart_peer(self, name: str) -> Member:
        self._end(self.member(name))
        return self.spawn_peer(name)

    # --- the directory ----------------------------------------------------------------

    def directory_views(self) -> dict[str, set[str]]:
        """Each live member's directory: the tracker's and every live node's mirror (``/nodes``)."""
        views = {"tracker": self.tracker_lists()}
        for node in self.role_members("node"):
            try:
                views[node.name] = {n["address"] for n in _get_json(self.url(node.ip, "/nodes"))["nodes"]}
            except Exception as e:  # noqa: BLE001 - a node just started may not answer yet
                views[node.name] = {f"unanswered: {type(e).__name__}"}
        return views

    def converged(self, timeout: float) -> dict:
        """Until every view lists exactly the live nodes (dead ones dropped, new ones listed),
        polled for at most ``timeout`` s: the seconds it took, or what still differed."""
        began = time.monotonic()
        differ: dict = {}
        while True:
            live = {self.address(m.ip) for m in self.role_members("node")}
            views = self.directory_views()
            differ = {name: {"stale": sorted(view - live), "missing": sorted(live - view)}
                      for name, view in views.items() if view != live}
            if not differ:
                return {"converged": True, "seconds": time.monotonic() - began, "live_nodes": len(live),
                        "views": len(views)}
            if time.monotonic() - began > timeout:
                stale = sorted({a for d in differ.values() for a in d["stale"]})
                return {"converged": False, "seconds": None, "live_nodes": len(live), "views": len(views),
                        "views_differing": len(differ), "stale_addresses": stale,
                        "example": dict(list(differ.items())[:3])}
            time.sleep(0.5)
