"""A test double: ``twistd onionnode`` that watches its links, or an exit that tampers with §13 transfers.

``python tests/support/tampering_node.py [--capture FILE] [--flip N] [--forge N] -- [twistd arguments]``
runs twistd exactly as ``twistd`` would (``-n ... onionnode --listen ...``),
after these changes, each only when asked for:

* ``--capture FILE``: every byte of every TCP connection of the node, both
  ways, is recorded in FILE (``wire_capture.install``): what an observer of
  each of its links sees.
* ``--flip N``: the node's relay is ``TamperingRelay``, a ``NodeRelay``
  subclass. As a sharer's exit, for the first N end-to-end ``file_chunk``
  objects it sends over a bridge (§7, §13: no ``"file"`` field), it flips
  bytes in the middle of the chunk's ciphertext (decoded from ``data``,
  XORed, encoded again) before the chunk crosses. The chunk still parses;
  only its tag no longer checks.
* ``--forge N``: as a sharer's exit, before each of the first N
  end-to-end ``file_chunk`` objects it bridges, it sends over the same
  bridge a ``file_chunk`` of its own for the same transfer and index:
  random bytes as long as the real ciphertext.

Each tampering is logged (``tampering node: flipped …`` / ``tampering node:
forged …``, with the transfer id and the chunk index) so a test can count
them and match them with what the requester reports. The relay subclass
replaces ``NodeRelay`` in ``onion_twisted.node.service`` (the name
``NodeService`` builds its relay from); ``makeService`` is wrapped to check
that the service really got a ``TamperingRelay``, and the double exits with
an error at once if the names it relies on are gone, instead of running an
honest node.
"""

from __future__ import annotations

import base64
import json
import os
import sys

DOUBLE_OPTIONS = ("--capture", "--flip", "--forge")
FILE_CHUNK = "file_chunk"  # PROTOCOL.md §8, §13: spelled here, not imported, as a test believes it


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
    """(this double's options, twistd's arguments after ``--``)."""
    if "--" not in argv:
        sys.exit("tampering_node: usage: tampering_node.py [--capture FILE] [--flip N] [--forge N] -- TWISTD-ARGS")
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1:]
    options = {"capture": None, "flip": 0, "forge": 0}
    while own:
        name = own.pop(0)
        if name not in DOUBLE_OPTIONS or not own:
            sys.exit(f"tampering_node: unknown option or missing value: {name}")
        value = own.pop(0)
        options[name[2:]] = value if name == "--capture" else int(value)
    return options, rest


def _tampering_relay(flip: int, forge: int):
    from twisted.logger import Logger

    from onion_twisted.node.relay import NodeRelay
    from onion_twisted.protocol import cells, wire

    log = Logger(namespace="tampering_node")
    marker = b'"' + FILE_CHUNK.encode() + b'"'

    class TamperingRelay(NodeRelay):
        """A node whose exit rewrites or forges the sealed chunks it bridges (see the module's text)."""

        flips_left = flip
        forgeries_left = forge

        def _sealed_chunk(self, circuit, plaintext):
            """(message, bridge) when ``plaintext`` is an end-to-end file_chunk this exit bridges, else None."""
            if marker not in bytes(plaintext[:200]):
                return None
            try:
                message = json.loads(bytes(plaintext))
            except ValueError:
                return None
            # §13's chunk names no file (§8's does): only those are tampered with.
            if (not isinstance(message, dict) or message.get("type") != FILE_CHUNK or "file" in message
                    or not isinstance(message.get("data"), str)):
                return None
            bridge = self.table.outgoing_bridge(circuit, message.get("transfer"))
            return None if bridge is None else (message, bridge)

        async def _exit_object(self, circuit, plaintext):
            if self.flips_left > 0 or self.forgeries_left > 0:
                found = self._sealed_chunk(circuit, plaintext)
                if found is not None:
                    message, bridge = found
                    if self.forgeries_left > 0:
                        self.forgeries_left -= 1
                        await self._forge(message, bridge)
                    if self.flips_left > 0:
                        self.flips_left -= 1
                        plaintext = self._flip(message)
            return await super()._exit_object(circuit, plaintext)

        def _flip(self, message: dict) -> bytes:
            data = bytearray(base64.b64decode(message["data"]))
            middle = len(data) // 2
            for i in range(middle, min(middle + 4, len(data))):
                data[i] ^= 0x5A
            log.info("tampering node: flipped 4 bytes of file_chunk {index} of transfer {transfer}",
                     index=message.get("chunk_idx"), transfer=message.get("transfer"))
            return wire.dumps({**message, "data": base64.b64encode(bytes(data)).decode("ascii")})

        async def _forge(self, message: dict, bridge) -> None:
            length = len(base64.b64decode(message["data"]))
            forged = {"type": FILE_CHUNK, "transfer": message["transfer"],
                      "chunk_idx": message.get("chunk_idx"), "chunk_size": message.get("chunk_size"),
                      "data": base64.b64encode(os.urandom(length)).decode("ascii")}
            try:
                await self.outbound.post(bridge.peer_addr, cells.encode_object_cell(bridge.bridge_cid,
                                                                                   wire.dumps(forged)))
                outcome = "taken"
            except Exception as e:  # noqa: BLE001 - whatever the other exit said, the real chunk goes on
                outcome = f"refused ({getattr(e, 'detail', e)!r})"
            log.info("tampering node: forged file_chunk {index} of transfer {transfer}: {outcome}",
                     index=message.get("chunk_idx"), transfer=message.get("transfer"), outcome=outcome)

    return TamperingRelay


def _install_relay(flip: int, forge: int) -> None:
    from onion_twisted.node import service

    if not hasattr(service, "NodeRelay") or not hasattr(service, "makeService"):
        sys.exit("tampering_node: onion_twisted.node.service has no NodeRelay/makeService; "
                 "update tests/support/tampering_node.py")
    relay_class = _tampering_relay(flip, forge)
    if not hasattr(relay_class.__mro__[1], "_exit_object"):
        sys.exit("tampering_node: NodeRelay has no _exit_object; update tests/support/tampering_node.py")
    service.NodeRelay = relay_class
    honest_make = service.makeService

    def makeService(options):
        made = honest_make(options)
        if not isinstance(getattr(made, "relay", None), relay_class):
            sys.exit("tampering_node: the node service did not build its relay from service.NodeRelay")
        return made

    service.makeService = makeService


def main(argv: list[str]) -> None:
    options, rest = _parse(argv)
    if options["capture"]:
        from tests.support import wire_capture
        wire_capture.install(options["capture"])
    if options["flip"] or options["forge"]:
        _install_relay(options["flip"], options["forge"])
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *rest]
    run()


if __name__ == "__main__":
    main(sys.argv[1:])
