"""The source check (docs/protocol.md 11.3, 17.10 choice 64), with no I/O.

A requester whose transfer brings nothing cannot tell a sharer that is slow
from one whose circuit lost a node: a dead node answers nothing, and the
sharer's new circuit is a stranger to it (on purpose). The tracker knows
which circuit serves each transfer, and a message it sends down that circuit
fails at the dead node (its neighbour's 502) at once. So a requester may
ask, on a sealed circuit, ``{"type": "check", "transfer": T}``; the tracker
sends its own sealed ``{"type": "check", "transfer": T}`` to the sharer, and
answers ``{"type": "checked", "transfer": T, "source": STATE}``:

* ``reachable``: the message reached the sharer's peer, whose answer came back;
* ``gone``: the source circuit is forgotten, or the message did not reach the
  sharer (the tracker forgets the circuit then, as after a failed request);
* ``unknown``: the tracker cannot tell (a transfer it does not know, a source
  circuit without the sealed hop, or the message's answer timed out).

The requester learns nothing of the source but that one word; the sharer's
exit sees one more sealed message of the 1 KiB class on its circuit.
"""

from __future__ import annotations

from onion_twisted.protocol.messages import MessageError, is_transfer_id

CHECK = "check"
CHECKED = "checked"
REACHABLE, GONE, UNKNOWN = "reachable", "gone", "unknown"
STATES = (REACHABLE, GONE, UNKNOWN)


def check_message(transfer: str) -> dict:
    """The requester's check of ``transfer``'s source, and the tracker's message to that source."""
    return {"type": CHECK, "transfer": transfer}


def parse_check(message: dict) -> str:
    """The transfer id a ``check`` names; ``bad_request`` if it names none."""
    transfer = message.get("transfer")
    if not is_transfer_id(transfer):
        raise MessageError("bad_request", "a check names one transfer id")
    return transfer


def checked_message(transfer: str, state: str) -> dict:
    return {"type": CHECKED, "transfer": transfer, "source": state}


def checked_state(reply, transfer: str) -> str | None:
    """The state a tracker's reply gives ``transfer``'s source; None if the reply is not
    a ``checked`` of that transfer with one of ``STATES``."""
    if not isinstance(reply, dict) or reply.get("type") != CHECKED or reply.get("transfer") != transfer:
        return None
    state = reply.get("source")
    return state if state in STATES else None
