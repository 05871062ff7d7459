"""Configuration: ``conf/*.toml`` files, every key also a command-line option.

Each role declares its keys once (name, type, default, one line of help);
from that come the ``twistd`` options, the TOML parsing, and the check of
the values. Precedence: defaults < the file given by ``--config`` <
options on the command line. Parsing works on strings, so tests build a
configuration in memory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any

from twisted.python import usage


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None

    @property
    def option(self) -> str:
        return self.name.replace("_", "-")


COMMON = [
    Key("listen", str, "127.0.0.1", "IP address to listen on and to send from (one IP per member)"),
    Key("port", int, 5000, "the network's port: every member listens on it", 1),
    Key("max_body", int, 8 * 1024 * 1024, "largest request body accepted, in bytes (413 above)", 1024),
    Key("hop_timeout", float, 30.0, "seconds to wait for the next hop before answering 504", 0.1),
    Key("request_timeout", float, 60.0,
        "seconds a client has to send a whole request from its first byte; a slower one is cut off", 0.1),
    Key("unsafe_logging", bool, False, "debug switch: log circuit ids, addresses and file names"),
    Key("tls", bool, True, "TLS 1.3 on the network port and to every member (false: plain HTTP, /1 networks)"),
]

NODE = COMMON + [
    Key("data_dir", str, "run/node", "directory for the node's key (created, mode 0700)"),
    Key("tracker", str, "127.0.0.1:5000", "the network's tracker, HOST or HOST:PORT (the only exit target)"),
    Key("tracker_key", str, "", "tracker's Ed25519 public key, base64; empty: trust /identity on first contact"),
    Key("key_bits", int, 2048, "size of the node's RSA key when it is made (at least 1024)", 1024),
    Key("circuit_idle_timeout", float, 600.0, "seconds after which an unused circuit is dropped", 1),
    Key("bridge_idle_timeout", float, 600.0, "seconds after which an unused bridge is dropped", 1),
    Key("max_circuits", int, 100_000, "most circuits held at once (429 above)", 1),
    Key("max_bridges", int, 100_000, "most bridge ends held at once", 1),
    Key("max_nonces", int, 1_000_000, "most forward layers one circuit may carry (replay set bound)", 1),
    Key("create_rate", float, 50.0, "new circuits per second allowed from one source IP", 0.001),
    Key("create_burst", int, 200, "burst of new circuits allowed from one source IP", 1),
    Key("node_create_rate", float, 200.0,
        "new circuits per second allowed from each directory node (it extends for many peers)", 0.001),
    Key("node_create_burst", int, 1000, "burst of new circuits allowed from each directory node", 1),
    Key("create_work_rate", float, 500.0,
        "RSA decryptions (CREATEs) per second this node does in all, whoever asks (429 above)", 0.001),
    Key("create_work_burst", int, 1000, "burst of RSA decryptions this node does in all", 1),
    Key("register_interval", float, 30.0, "seconds between registrations at the tracker", 1),
    Key("control_max_skew", float, 60.0, "control messages issued further than this from our clock are refused", 1),
    Key("metrics_allow", list, ["127.0.0.0/8", "::1"],
        "addresses or networks allowed to see the status page and /metrics (live byte counts)"),
    Key("accept_v1", bool, True, "accept onion-http/1 (RSA) circuits besides onion-http/2 ones"),
    Key("speak_v2", bool, True,
        "speak onion-http/2 (an onion key, ntor circuits); false: a node of onion-http/1 only, as before /2"),
    Key("onion_key_lifetime", float, 604800.0, "seconds between rotations of the onion key (ntor)", 1),
]

TRACKER = COMMON + [
    Key("data_dir", str, "run/tracker", "directory for the tracker's key (created, mode 0700)"),
    Key("heartbeat", float, 30.0, "nodes re-register this often; a node unseen for 3 periods leaves the list", 1),
    Key("circuit_idle_timeout", float, 600.0, "circuits silent this long are forgotten (peers re-announce)", 1),
    Key("max_circuits", int, 100_000, "most circuits known at once", 1),
    Key("max_files_per_circuit", int, 10_000, "most files one ls may announce", 1),
    Key("max_catalogue_entries", int, 1_000_000, "most distinct (name, sha256) entries", 1),
    Key("max_entries_per_exit", int, 0,
        "most catalogue entries the circuits through one exit may hold alone (0: a quarter of the catalogue)", 0),
    Key("max_listing", int, 10_000, "most entries in a files reply (those with the most sources first)", 1),
    Key("listing_refresh", float, 1.0, "a large catalogue's reply is rebuilt at most this often, seconds", 0),
    Key("max_pending", int, 10_000, "most requests being bridged at once", 1),
    Key("max_nodes", int, 10_000, "most nodes in the directory", 1),
    Key("metrics_allow", list, ["127.0.0.0/8", "::1"],
        "addresses or networks allowed to see the network page and /metrics"),
    Key("onion_key_lifetime", float, 604800.0, "seconds between rotations of the onion key (ntor)", 1),
]

PEER = COMMON + [
    Key("name", str, "", "a name for this peer, shown with its address in its page's title and heading"),
    Key("data_dir", str, "run/peer", "directory for the peer's state: hash cache, saved directory"),
    Key("tracker", str, "127.0.0.1:5000", "the network's tracker, HOST or HOST:PORT"),
    Key("tracker_key", str, "", "tracker's Ed25519 public key, base64; empty: trust /identity on first contact"),
    Key("share", str, "share", "directory whose regular files this peer shares"),
    Key("downloads", str, "downloads", "where finished downloads appear (partial ones in .partial/)"),
    Key("ui_allow", list, ["127.0.0.0/8", "::1"], "addresses or networks allowed to use the page and the API"),
    Key("bootstrap", list, [], "node addresses to fetch the directory from; empty: the tracker, once"),
    Key("hops", int, 3, "nodes in a circuit", 1),
    Key("window", int, 8, "file chunks in flight per upload, at most", 1),
    Key("window_by_delay", bool, True,
        "fewer chunks in flight while an upload's path queues them (delay-based, as TCP Vegas); false: always window"),
    Key("chunk_size", int, 1048576, "chunk size asked for in requests, bytes (16 KiB to 4 MiB)", 16384),
    Key("max_attempts", int, 5, "attempts in a row bringing no chunk before a download stops with an error", 1),
    Key("stall_timeout", float, 60.0,
        "seconds without a chunk before a source is given up (after two: 20 of its gaps, 5 s at least)", 1),
    Key("refresh_interval", float, 30.0, "seconds between catalogue refreshes (list)", 1),
    Key("announce_interval", float, 300.0, "seconds between announcements (ls) of an unchanged share", 1),
    Key("rescan_interval", float, 5.0, "seconds between looks at the share directory", 0.1),
    Key("max_uploads", int, 16, "uploads served at once; more are answered transfer_end busy", 1),
    Key("max_sources", int, 4, "sources one download asks at once when several share the file", 1),
    Key("max_upload_rate", int, 0, "bytes per second all uploads together may send (0: no cap)", 0),
    Key("seed_downloads", bool, True, "share finished downloads from the downloads directory too"),
    Key("max_circuits", int, 3,
        "circuits kept at once: one announces, the others carry downloads, a spare among them (1: one for all)", 1),
    Key("circuit_lifetime", float, 900.0, "seconds before a circuit is replaced, randomised (0: never)", 0),
    Key("ui_listen", str, "", "with tls: IP:PORT of the page and its API, in plain HTTP (empty: this peer's IP:8080)"),
]

# The port of a peer's page when tls is on and ui_listen names no port (or is empty).
UI_PORT = 8080

ROLES = {"node": NODE, "tracker": TRACKER, "peer": PEER}


class ConfigError(ValueError):
    pass


class Refused(SystemExit):
    """A configuration a member must not start with, as twistd's last word.

    Raised from ``Options.postOptions`` instead of a ``UsageError``, for which
    twistd prints its whole usage text (some fifty lines) before the one line
    that matters. A ``SystemExit`` carrying a string is printed by Python to
    stderr as that line alone, with exit status 1 and no traceback.
    """

    def __init__(self, role: str, message: str):
        super().__init__(f"onion{role}: {message}")


def parse(role: str, toml_text: str = "", overrides: dict | None = None) -> dict:
    """The full configuration of ``role``: defaults, then the TOML text, then overrides."""
    keys = {k.name: k for k in ROLES[role]}
    values = {name: k.default for name, k in keys.items()}
    try:
        from_file = tomllib.loads(toml_text) if toml_text else {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file: {e}") from None
    for source in (from_file, overrides or {}):
        for name, value in source.items():
            name = name.replace("-", "_")
            if name not in keys:
                raise ConfigError(f"unknown configuration key {name!r} for a {role}")
            values[name] = _coerce(keys[name], value)
    return values


def check_start(role: str, cfg: dict) -> None:
    """What ``parse`` cannot see key by key, checked before a member starts (ConfigError).

    A node or peer whose ``tracker`` is its own address would send its
    registration and its circuits' exits to itself and log "next hop
    answered 405" forever: the shipped defaults (both 127.0.0.1:5000) are
    placeholders that collide, so it refuses to start instead.
    """
    from onion_twisted.protocol import wire
    from onion_twisted.protocol.errors import ProtocolError

    try:
        own = wire.parse_address(cfg["listen"], cfg["port"], field="listen")
        tracker = wire.parse_address(cfg["tracker"], cfg["port"], field="tracker") if "tracker" in cfg else None
        if cfg.get("ui_listen"):
            wire.parse_address(cfg["ui_listen"], UI_PORT, field="ui_listen")
    except ProtocolError as e:
        raise ConfigError(e.detail) from None
    if role == "node" and not cfg["speak_v2"] and not cfg["accept_v1"]:
        raise ConfigError("a node with speak_v2 = false and accept_v1 = false would accept no circuit at all")
    if tracker is not None and tracker == own:
        raise ConfigError(
            f"tracker {tracker} is this {role}'s own address (listen {cfg['listen']}, port {cfg['port']}): "
            f"give the network's tracker with --tracker HOST (and this {role} its own IP with --listen)")
    from onion_twisted.net.http_server import parse_allow

    for name, value in cfg.items():
        if name.endswith("_allow"):
            try:
                parse_allow(value, name)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def _coerce(key: Key, value):
    try:
        if key.type is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            return bool(value)
        if key.type is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if key.type is int and isinstance(value, float):
            raise ValueError(value)
        value = key.type(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key.name}: {value!r} is not a {key.type.__name__}") from None
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{key.name} must be at least {key.minimum}")
    return value


def options_for(role: str, description: str) -> type[usage.Options]:
    """A twistd ``Options`` class with ``--config`` and one option per key."""
    keys = ROLES[role]
    params = [["config", "c", None, f"TOML configuration file (see conf/{role}.toml)"]]
    flags = []
    for k in keys:
        if k.type is bool:
            flags.append([k.option, None, f"{k.help} (default: {str(k.default).lower()})"])
            if k.default:  # a flag can only turn a key on: --no-KEY turns one that is on by default off
                flags.append([f"no-{k.option}", None, f"{k.name} = false"])
        else:
            default = ",".join(k.default) if isinstance(k.default, list) else k.default
            params.append([k.option, None, None, f"{k.help} (default: {default})"])

    class Options(usage.Options):
        synopsis = f"[options]  ({description})"
        optParameters = params
        optFlags = flags

        def postOptions(self):
            text = ""
            if self["config"]:
                try:
                    with open(self["config"], encoding="utf-8") as f:
                        text = f.read()
                except OSError as e:
                    raise Refused(role, f"cannot read {self['config']}: {e.strerror}") from None
            overrides = {}
            for k in keys:
                value = self[k.option]
                if k.type is bool:
                    if value:
                        overrides[k.name] = True
                    elif k.default and self[f"no-{k.option}"]:
                        overrides[k.name] = False
                elif value is not None:
                    overrides[k.name] = value
            try:
                self.config = parse(role, text, overrides)
                check_start(role, self.config)
            except ConfigError as e:
                raise Refused(role, str(e)) from None

    Options.__name__ = f"{role.capitalize()}Options"
    return Options


def render_toml(role: str) -> str:
    """The example file of a role: every key, its default, one line on what it does."""
    lines = []
    for k in ROLES[role]:
        lines.append(f"# {k.help}")
        if isinstance(k.default, bool):
            value = str(k.default).lower()
        elif isinstance(k.default, (str, list)):
            value = repr(k.default).replace("'", '"')
        else:
            value = repr(k.default)
        lines.append(f"{k.name} = {value}")
        lines.append("")
    return "\n".join(lines)
