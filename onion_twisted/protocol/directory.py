"""The signed directory of nodes (PROTOCOL.md §6), with no I/O.

A ``SignedDirectory`` keeps the tracker's body and signature byte for byte,
so a node can mirror it unchanged, and the parsed entries keyed by address
for the exit policy and for peers choosing their three nodes.
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field

from onion_twisted.protocol import crypto, wire
from onion_twisted.protocol.errors import BadRequest, Forbidden
from onion_twisted.protocol.onion_keys import parse_onion_key


@dataclass(frozen=True, slots=True)
class NodeEntry:
    address: wire.Address
    public_key_pem: str
    fingerprint: str
    onion_key: bytes | None = None  # X25519, raw: the node speaks onion-http/2 (§10, §11)

    @property
    def speaks_v2(self) -> bool:
        return self.onion_key is not None


@dataclass(frozen=True, slots=True)
class SignedDirectory:
    body: bytes
    signature: str
    issued: float
    nodes: dict  # Address -> NodeEntry
    node_ips: frozenset = frozenset()  # literal IPs of the listed nodes
    tracker_onion_key: bytes | None = None  # X25519, raw: the tracker as a sealed last hop (§12)
    # Each entry by its fields as listed (address, public_key, fingerprint, onion_key): the
    # next copy's parse reuses an entry whose fields did not change.
    by_fields: dict = field(default_factory=dict, compare=False, repr=False)

    def __contains__(self, address: wire.Address) -> bool:
        return address in self.nodes


def parse_signed_directory(body: bytes, signature, tracker_key, default_port: int,
                           known: SignedDirectory | None = None) -> SignedDirectory:
    """Verify the tracker's signature over ``body`` and parse the node list.

    ``known``: an earlier copy (parsed with the same ``default_port``); an entry listed
    with the same fields there is taken as it was parsed, not parsed again. Members fetch
    the directory every period, and most of a parse is the nodes' keys and addresses.
    """
    if not crypto.verify_body(tracker_key, body, signature):
        raise Forbidden("directory signature does not verify with the tracker's key")
    obj = wire.loads_object(body, "directory")
    issued = obj.get("issued")
    if not isinstance(issued, (int, float)) or isinstance(issued, bool):
        raise BadRequest("directory: issued is not a number")
    entries = obj.get("nodes")
    if not isinstance(entries, list):
        raise BadRequest("directory: nodes is not a list")
    nodes, by_fields = {}, {}
    parsed_before = known.by_fields if known is not None else {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise BadRequest("directory: a node entry is not an object")
        fields = tuple(entry.get(name) for name in _ENTRY_FIELDS)
        # Only strings (or absent fields) can be looked up; anything else is refused by the parse.
        reusable = all(value is None or isinstance(value, str) for value in fields)
        node = (parsed_before.get(fields) if reusable else None) or _parse_entry(entry, default_port)
        nodes[node.address] = node
        if reusable:
            by_fields[fields] = node
    if isinstance(signature, bytes):
        signature = signature.decode("ascii")
    node_ips = frozenset(a.ip for a in nodes if a.ip is not None)
    tracker_onion_key = _onion_key(obj.get("tracker_onion_key"), "directory tracker_onion_key")
    return SignedDirectory(body, signature, issued, nodes, node_ips, tracker_onion_key, by_fields)


_ENTRY_FIELDS = ("address", "public_key", "fingerprint", "onion_key")


def _parse_entry(entry: dict, default_port: int) -> NodeEntry:
    address = wire.parse_address(entry.get("address"), default_port, field="directory address")
    pem = entry.get("public_key")
    key = crypto.load_public_key_pem(pem)
    fp = crypto.fingerprint(key)
    if entry.get("fingerprint") not in (None, fp):
        raise BadRequest("directory: fingerprint does not match the key")
    return NodeEntry(address, pem, fp, _onion_key(entry.get("onion_key"), "directory onion_key"))


class DepartureWatch:
    """Which nodes left the directory, from the copies a node fetches one after another.

    A node's IP counts as departed once it was listed and then stayed missing from
    the copies the tracker issued over ``grace`` seconds (by their ``issued``, the
    tracker's clock): a copy or two without it are not enough, since a tracker that
    has just restarted lists only the nodes that registered since, and they all
    register again within their period. A node at a DNS name is not watched (its
    circuits carry the resolved IP). What is watched is bounded by the directory:
    the nodes listed in the latest copy, and those missing for less than ``grace``.
    """

    def __init__(self, grace: float):
        self.grace = grace
        self._listed: frozenset[str] = frozenset()
        self._missing_since: dict[str, float] = {}  # IP once listed -> issued of the first copy without it

    def update(self, directory: SignedDirectory) -> frozenset[str]:
        """Take the latest copy; return the IPs found departed by it (each once)."""
        listed, issued = directory.node_ips, directory.issued
        for ip in self._listed - listed:
            self._missing_since.setdefault(ip, issued)
        for ip in listed & self._missing_since.keys():
            del self._missing_since[ip]
        self._listed = listed
        departed = frozenset(ip for ip, since in self._missing_since.items() if issued - since >= self.grace)
        for ip in departed:
            del self._missing_since[ip]
        return departed


def _onion_key(value, field: str) -> bytes | None:
    if value is None:
        return None
    try:
        return parse_onion_key(value, field)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def entry_json(address, public_key_pem: str, fingerprint: str, onion_key: bytes | None) -> dict:
    """One node's entry in ``GET /nodes``: /1's three fields, and ``onion_key`` for a /2 node."""
    entry = {"address": str(address), "public_key": public_key_pem, "fingerprint": fingerprint}
    if onion_key is not None:
        entry["onion_key"] = base64.b64encode(onion_key).decode("ascii")
    return entry


# --- choosing a circuit's nodes (§6, §15) -----------------------------------------------


def network_of(address: wire.Address) -> str:
    """The network a node's address counts in, for path diversity (PROTOCOL.md §15).

    IPv4 /16, IPv6 /32: one operator's hosts usually share one. Loopback
    addresses are exempt (all the members of a test or demo network live in
    127.0.0.0/8): each counts as its own network. A DNS name counts as its own
    network too: the peer does not resolve names to choose a path.
    """
    if address.ip is None:
        return "name " + address.host.lower()
    ip = ipaddress.ip_address(address.ip)
    if ip.is_loopback:
        return "ip " + str(ip)
    prefix = 16 if ip.version == 4 else 32
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def usable_nodes(entries, count: int, avoided=(), avoid_ends=()) -> list:
    """The entries a path of ``count`` is drawn from (``pick_path``): those whose address
    is not ``avoided`` (nodes that failed lately) while they make such a path with both ends
    apart from ``avoid_ends``; else those too whose host is not in ``avoid_ends`` (a peer's
    circuits kept apart come before a node's recent failure); else every entry."""
    entries, avoid_ends = list(entries), set(avoid_ends)
    tiers = ([e for e in entries if e.address not in avoided],
             [e for e in entries if e.address not in avoided or e.address.host not in avoid_ends])
    for tier in tiers:
        if ends_apart(tier, count, avoid_ends):
            return tier
    return entries


def ends_apart(entries, count: int, avoid_ends=()) -> bool:
    """Whether ``entries`` make a path of ``count`` whose entry and exit are not in ``avoid_ends``."""
    hosts = {e.address.host for e in entries}
    return len(hosts) >= count and len(hosts - set(avoid_ends)) >= min(2, count)


def pick_apart(entries, count: int, rng, avoided=(), avoid_tiers=((),)) -> list:
    """``pick_path`` from ``usable_nodes``, its ends apart from the first of ``avoid_tiers``
    (sets of hosts, in order of preference) that the entries allow, else the last."""
    entries = list(entries)
    for avoid in avoid_tiers:
        candidates = usable_nodes(entries, count, avoided, avoid)
        if ends_apart(candidates, count, avoid):
            break
    return pick_path(candidates, count, rng, avoid)


def pick_path(entries, count: int, rng, avoid_ends=()) -> list:
    """``count`` entries at distinct IPs, from distinct networks when the directory has enough.

    Hop by hop, as Tor does: each hop is drawn uniformly from the entries whose
    network no earlier hop has. When no such entry is left, the hop is drawn
    from those whose address no earlier hop has: one host (or one DNS name)
    never holds two hops. ValueError when not even that is possible.

    ``avoid_ends``: hosts the entry and the exit are not drawn from when others
    are left (a peer's circuits of different purposes do not share an entry or an
    exit); the entry and the exit are then drawn first, the middle hops after.
    """
    entries = list(entries)
    avoid_ends = set(avoid_ends)
    order = list(range(count))
    if avoid_ends and count > 1:
        order = [0, count - 1] + list(range(1, count - 1))
    chosen_at, networks, hosts = {}, set(), set()
    for position in order:
        fresh = [e for e in entries if network_of(e.address) not in networks and e.address.host not in hosts]
        if not fresh:
            fresh = [e for e in entries if e.address.host not in hosts]
        if not fresh:
            raise ValueError(f"the directory lists {len(hosts)} nodes at distinct addresses; "
                             f"a circuit needs {count}")
        if avoid_ends and position in (0, count - 1):
            # Distinct networks first (§15), then ends apart, when both cannot be had.
            fresh = [e for e in fresh if e.address.host not in avoid_ends] or fresh
        chosen = rng.choice(fresh)
        chosen_at[position] = chosen
        networks.add(network_of(chosen.address))
        hosts.add(chosen.address.host)
    return [chosen_at[i] for i in range(count)]
